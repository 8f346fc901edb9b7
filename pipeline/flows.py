"""Prefect flows: each stage as a flow (deployments `<stage>/cc12m` and `<stage>/demo`), and `cc12m-pipeline`
chaining them. With no `profile` given, a flow runs the paper's settings; the demo's only where it is named.

Every stage runs through one function here that also publishes its artifacts (progress, shard table, summary,
the per-stage status table), so a stage looks the same in the UI whether it runs alone or in the pipeline.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from prefect import flow, task

from core import registry
from core.config import Config, load_config
from core.storage import data_path, open_data_root
from pipeline.demo import download_demo_photos, save_demo_models, save_demo_quality_models
from pipeline.reporting import (
    LabelReporter,
    PretrainReporter,
    StageReporter,
    TokenizerReporter,
    publish_evaluation,
    publish_failures,
    publish_generation,
    publish_stage_table,
    publish_transfer,
    quality_markdown,
    sample_pictures_markdown,
    without_pictures,
)
from pipeline.stage_list import pipeline_stages, stage
from stages.download.download import STAGE as DOWNLOAD_STAGE
from stages.download.download import run_download
from stages.fourm.pretrain import run_dir, run_pretrain
from stages.generate.generate import read_requests, run_generation
from stages.label.label import run_label
from stages.quality.quality import run_quality
from stages.tokenizers.tokenize import run_tokenize
from stages.tokenizers.train_tokenizer import run_train_tokenizers
from stages.transfer.evaluate import run_evaluate
from stages.transfer.transfer import run_transfer


class ShardsFailed(RuntimeError):
    """Some shards failed, typically on a lost worker or node; a rerun redoes only those."""


def _check(stage: str, summary) -> None:
    if summary.failed_shards:
        raise ShardsFailed(f"{stage}: {len(summary.failed_shards)} shards failed (a rerun redoes them): "
                           f"{summary.failed_shards}")


def _counts(summary) -> dict:
    return {"shards_done": summary.shards_done, "shards_skipped": summary.shards_skipped}


# -- each stage, with its artifacts ---------------------------------------------------------------------------
def download_with_artifacts(config: Config, input: str, retry_failed: bool = False):
    """`input="demo"` serves the bundled photos over loopback while they are downloaded."""
    root = open_data_root(config.root, writable=True)  # a bad URL or refused credentials fail here, by name
    reporter = StageReporter("download", config.dashboards)
    if input == "demo":
        summary = download_demo_photos(root, config, observer=reporter)
    else:
        summary = run_download(input, root, config, observer=reporter, retry_failed=retry_failed)
    print(without_pictures(reporter.finish()))
    publish_stage_table(root, key="download-stages")
    publish_failures(root, [DOWNLOAD_STAGE], key="download-failures")
    _check("download", summary)
    return summary


def quality_with_artifacts(config: Config):
    if config.profile == "demo":  # the demo's tiny random-weight networks, where the profile names them
        save_demo_quality_models(config)
    root = open_data_root(config.root, writable=True)
    reporter = StageReporter("quality", config.dashboards)
    summary = run_quality(root, config, observer=reporter)
    print(without_pictures(reporter.finish()))
    publish_stage_table(root, key="quality-stages")
    quality_markdown(root, config.quality, key="quality-scores")
    _check("quality", summary)
    return summary


def label_with_artifacts(config: Config, pictures: int = 3, retry_failed: bool = False):
    if config.profile == "demo":  # the demo's tiny random-weight models, where the profile names them
        save_demo_models(config)
    root = open_data_root(config.root, writable=True)
    # the first labelled shard's pictures while the others are labelled, the first shards' at the end
    first = (lambda shard: sample_pictures_markdown(root, pictures, "pseudo-label-samples", [shard])) if pictures \
        else None
    reporter = LabelReporter("pseudo-label", config.label.labelers, config.dashboards, first)
    summary = run_label(root, config, observer=reporter, retry_failed=retry_failed)
    print(without_pictures(reporter.finish()))
    publish_stage_table(root, key="pseudo-label-stages")
    publish_failures(root, [registry.get(n).stage for n in config.label.labelers], key="pseudo-label-failures")
    if pictures:
        sample_pictures_markdown(root, pictures, key="pseudo-label-samples")
    _check("pseudo-label", summary)
    return summary


def train_with_artifacts(config: Config) -> dict:
    root = open_data_root(config.root, writable=True)
    reporter = TokenizerReporter(root, config.tokenizer.modalities)
    results = run_train_tokenizers(root, config, observer=reporter)
    print(without_pictures(reporter.finish()))
    publish_stage_table(root, key="train-tokenizers-stages")
    return results


def tokenize_with_artifacts(config: Config, modalities: list[str] | None = None):
    root = open_data_root(config.root, writable=True)
    reporter = StageReporter("tokenize", config.dashboards)
    summary = run_tokenize(root, config, modalities, observer=reporter)
    print(without_pictures(reporter.finish()))
    publish_stage_table(root, key="tokenize-stages")
    _check("tokenize", summary)
    return summary


def pretrain_with_artifacts(config: Config) -> dict:
    root = open_data_root(config.root, writable=True)
    reporter = PretrainReporter(root, config.pretrain.steps)
    try:
        summary = run_pretrain(root, config)
    finally:
        reporter.stop.set()
    print(without_pictures(reporter.finish(summary)))
    return summary


# -- one flow per stage -----------------------------------------------------------------------------------------
@flow(name="download", log_prints=True)
def download_flow(input: str = "data/cc12m.tsv", output: str | None = None, profile: str = "paper",
                  overrides: list[str] | None = None, retry_failed: bool = False) -> dict:
    """Download a URL list (CC12M TSV, parquet or CSV) into webdataset shards under `output`; `retry_failed`:
    fetch again the retryable failures of shards already committed."""
    config = load_config(profile, overrides, {"data_root": output})  # a bad value fails here, before any work
    summary = download_with_artifacts(config, input, retry_failed)
    return {**_counts(summary), "status_counts": dict(summary.status_counts), "data_root": config.data_root}


@flow(name="quality", log_prints=True)
def quality_flow(data: str | None = None, profile: str = "paper", overrides: list[str] | None = None) -> dict:
    """Score every downloaded photo (CLIP image-text score, aesthetic, watermark) and find near-duplicates."""
    config = load_config(profile, overrides, {"data_root": data})
    summary = quality_with_artifacts(config)
    return {**_counts(summary), "status_counts": {n: dict(c) for n, c in summary.status_counts.items()},
            "near_duplicate_pairs": summary.near_duplicate_pairs, "data_root": config.data_root}


@flow(name="pseudo-label", log_prints=True)
def pseudo_label_flow(data: str | None = None, profile: str = "paper", labelers: list[str] | None = None,
                      overrides: list[str] | None = None, pictures: int = 3, retry_failed: bool = False) -> dict:
    """Pseudo-label the rgb shards under `data` (default: the profile's data_root); `retry_failed`: redo too the
    shards of a labeler that failed on some photo for a reason that may pass (model_error)."""
    config = load_config(profile, overrides, {"data_root": data, "label.labelers": labelers})
    summary = label_with_artifacts(config, pictures, retry_failed)
    return {**_counts(summary), "status_counts": {n: dict(c) for n, c in summary.status_counts.items()},
            "data_root": config.data_root}


@flow(name="train-tokenizers", log_prints=True)
def train_tokenizers_flow(data: str | None = None, profile: str = "paper", modalities: list[str] | None = None,
                          overrides: list[str] | None = None) -> dict:
    """Train every tokenizer not yet trained (text, then the dense VQ-VAEs) on the dataset under `data`."""
    config = load_config(profile, overrides, {"data_root": data, "tokenizer.modalities": modalities})
    return {"data_root": config.data_root, "tokenizers": train_with_artifacts(config)}


@flow(name="tokenize", log_prints=True)
def tokenize_flow(data: str | None = None, profile: str = "paper", modalities: list[str] | None = None,
                  overrides: list[str] | None = None) -> dict:
    """Encode every sample's crops with every trained tokenizer into tok_<modality>@224 shards."""
    config = load_config(profile, overrides, {"data_root": data})
    summary = tokenize_with_artifacts(config, modalities)
    return {**_counts(summary), "tokens": summary.tokens, "data_root": config.data_root,
            "status_counts": {m: dict(c) for m, c in summary.status_counts.items()}}


@flow(name="transfer", log_prints=True)
def transfer_flow(task: str = "classification", train: str = "data/imagenet/train", val: str = "data/imagenet/val",
                  model: str | None = "data/cc12m/pretrain", backbone: str | None = None, out: str | None = None,
                  profile: str = "paper", overrides: list[str] | None = None) -> dict:
    """Fine-tune 4M's encoder (or a timm baseline) on classification, segmentation or depth and score it, with a
    results table beside the paper's and the training curves."""
    config = load_config(profile, overrides)
    results = run_transfer(task, train, val, config, model=model, backbone=backbone, out=out)
    publish_transfer(results)
    print(f"{task} transfer of {results['backbone']}: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                                   results["metrics"].items()))
    return results


@flow(name="evaluate", log_prints=True)
def evaluate_flow(data: str | None = None, model: str | None = None, samples: int = 200, profile: str = "paper",
                  overrides: list[str] | None = None) -> dict:
    """Score a 4M model's depth, normals and segmentation from RGB alone against the held-out pseudo labels."""
    config = load_config(profile, overrides, {"data_root": data})
    root = open_data_root(config.root, writable=True)
    results = run_evaluate(root, config, model or run_dir(root), samples=samples)
    publish_evaluation(results)
    return results


@flow(name="generate", log_prints=True)
def generate_flow(requests: str = "data/cc12m/generate/requests.jsonl", model: str = "data/cc12m/pretrain",
                  tokenizers: str = "data/cc12m/tokenizers", out: str | None = None, batch_size: int = 16,
                  device: str | None = None) -> dict:
    """Generate from a JSONL file of requests (see the README) in batches; every sample's grid as a picture."""
    out = out or str(data_path(model) / "generations")
    results = run_generation(read_requests(requests), model, tokenizers, out, batch_size=batch_size, device=device)
    publish_generation(results)
    print(f"{sum(len(r['samples']) for r in results['requests'])} samples of {len(results['requests'])} requests "
          f"-> {out}/")
    return results


@flow(name="pretrain", log_prints=True)
def pretrain_flow(data: str | None = None, profile: str = "paper", overrides: list[str] | None = None) -> dict:
    """Pretrain 4M on the token shards under `data` (resuming from its checkpoint), with loss and prediction
    pictures."""
    config = load_config(profile, overrides, {"data_root": data})
    summary = pretrain_with_artifacts(config)
    return {"data_root": config.data_root, "steps": summary["steps"], "final": summary["final"],
            "predictions": summary.get("predictions")}


# -- the whole pipeline: each stage a task, retried on infrastructure failures only ---------------------------
def is_infrastructure_error(exc: BaseException | None) -> bool:
    """Worth retrying: lost workers, nodes, objects, connections. Not: bad configuration or input."""
    import ray.exceptions as rex

    if exc is None or isinstance(exc, (ValueError, TypeError, KeyError)):  # ConfigError is a ValueError
        return False
    return isinstance(exc, (ShardsFailed, rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError,
                            rex.ObjectLostError, rex.RaySystemError, rex.GetTimeoutError, ConnectionError))


def retry_on_infrastructure(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as err:  # noqa: BLE001 - the failed run's exception is what we judge
            exc = err
    return is_infrastructure_error(exc)


stage_task = partial(task, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_infrastructure)


# Each pipeline stage's runner (with its artifacts), registered against its name in the stage list; the list's
# order is the pipeline's.
RUNNERS: dict[str, Callable[[Config, dict], dict]] = {}


def runs(name: str):
    stage(name)  # a runner only for a stage the list defines

    def register(fn):
        RUNNERS[name] = fn
        return fn
    return register


@runs("download")
def _download_step(config: Config, settings: dict) -> dict:
    return _counts(download_with_artifacts(config, settings["input"]))


@runs("quality")
def _quality_step(config: Config, settings: dict) -> dict:
    return _counts(quality_with_artifacts(config))


@runs("pseudo-label")
def _label_step(config: Config, settings: dict) -> dict:
    return _counts(label_with_artifacts(config, pictures=0))


@runs("train-tokenizers")
def _train_step(config: Config, settings: dict) -> dict:
    return {m: ("already trained" if r.get("skipped") else "trained") for m, r in train_with_artifacts(config).items()}


@runs("tokenize")
def _tokenize_step(config: Config, settings: dict) -> dict:
    summary = tokenize_with_artifacts(config)
    return {**_counts(summary), "tokens": summary.tokens}


@runs("pretrain")
def _pretrain_step(config: Config, settings: dict) -> dict:
    summary = pretrain_with_artifacts(config)
    return {"steps": summary["steps"], "loss": summary["final"].get("loss")}


@stage_task
def run_stage(name: str, profile: str, overrides: list[str], flags: dict, settings: dict) -> dict:
    """One stage of the pipeline as a Prefect task: its configuration loaded where it runs, then its runner."""
    return RUNNERS[name](load_config(profile, overrides, flags), settings)


@flow(name="cc12m-pipeline", log_prints=True)
def cc12m_pipeline_flow(input: str = "data/cc12m.tsv", data: str | None = None, profile: str = "paper",
                        labelers: list[str] | None = None, ray_address: str | None = None,
                        overrides: list[str] | None = None) -> dict:
    """URLs to a trained 4M: download, quality scores, pseudo-label, train the tokenizers, tokenize, pretrain. Each stage skips
    what is committed (pretraining resumes from its checkpoint), so a rerun resumes where the last one stopped.
    `input="demo"` serves the bundled photos."""
    overrides = list(overrides or [])
    flags = {"data_root": data, "label.labelers": labelers, "ray.address": ray_address}
    config = load_config(profile, overrides, flags)  # bad configuration fails here, once
    flags["data_root"] = data = config.data_root
    results = {}
    for s in pipeline_stages():
        results[s.name] = run_stage.with_options(name=s.name)(s.name, profile, overrides, flags, {"input": input})
        print(f"{s.name}: {results[s.name]}")
        publish_stage_table(data, key="cc12m-pipeline-stages")
    return {"data_root": data, "stages": results}
