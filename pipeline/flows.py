"""Prefect flows: each stage as a flow (deployments `<stage>/cc12m` and `<stage>/demo`), and `cc12m-pipeline`
chaining them. With no `profile` given, a flow runs the paper's settings; the demo's only where it is named.

Every stage runs through one function here that also publishes its artifacts (progress, shard table, summary,
the per-stage status table), so a stage looks the same in the UI whether it runs alone or in the pipeline.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import flow, task

from core.config import Config, load_config
from pipeline.reporting import StageReporter, publish_stage_table


class ShardsFailed(RuntimeError):
    """Some shards failed, typically on a lost worker or node; a rerun redoes only those."""


def _check(stage: str, summary) -> None:
    if summary.failed_shards:
        raise ShardsFailed(f"{stage}: {len(summary.failed_shards)} shards failed (a rerun redoes them): "
                           f"{summary.failed_shards}")


def _counts(summary) -> dict:
    return {"shards_done": summary.shards_done, "shards_skipped": summary.shards_skipped}


# -- each stage, with its artifacts ---------------------------------------------------------------------------
def download_with_artifacts(config: Config, input: str):
    """`input="demo"` serves the bundled photos over loopback while they are downloaded."""
    from pipeline.demo import download_demo_photos
    from stages.download.download import run_download

    reporter = StageReporter("download")
    if input == "demo":
        summary = download_demo_photos(Path(config.data_root), config, observer=reporter)
    else:
        summary = run_download(input, config.data_root, config, observer=reporter)
    print(reporter.finish())
    publish_stage_table(config.data_root, key="download-stages")
    _check("download", summary)
    return summary


def label_with_artifacts(config: Config, pictures: int = 3):
    from pipeline.demo import save_demo_models
    from pipeline.reporting import LabelReporter, sample_pictures_markdown
    from stages.label.label import run_label

    if config.profile == "demo":  # the demo's tiny random-weight models, where the profile names them
        save_demo_models(config)
    reporter = LabelReporter("pseudo-label", config.label.labelers)
    summary = run_label(config.data_root, config, observer=reporter)
    print(reporter.finish())
    publish_stage_table(config.data_root, key="pseudo-label-stages")
    if pictures:
        sample_pictures_markdown(config.data_root, pictures, key="pseudo-label-samples")
    _check("pseudo-label", summary)
    return summary


def train_with_artifacts(config: Config) -> dict:
    from pipeline.reporting import TokenizerReporter
    from stages.tokenizers.train_tokenizer import run_train_tokenizers

    reporter = TokenizerReporter(config.data_root, config.tokenizer.modalities)
    results = run_train_tokenizers(config.data_root, config, observer=reporter)
    print(reporter.finish())
    publish_stage_table(config.data_root, key="train-tokenizers-stages")
    return results


def tokenize_with_artifacts(config: Config, modalities: list[str] | None = None):
    from stages.tokenizers.tokenize import run_tokenize

    reporter = StageReporter("tokenize")
    summary = run_tokenize(config.data_root, config, modalities, observer=reporter)
    print(reporter.finish())
    publish_stage_table(config.data_root, key="tokenize-stages")
    _check("tokenize", summary)
    return summary


def pretrain_with_artifacts(config: Config) -> dict:
    from pipeline.reporting import PretrainReporter
    from stages.fourm.pretrain import run_pretrain

    reporter = PretrainReporter(config.data_root, config.pretrain.steps)
    try:
        summary = run_pretrain(config.data_root, config)
    finally:
        reporter.stop.set()
    print(reporter.finish(summary).split("![")[0])
    return summary


# -- one flow per stage -----------------------------------------------------------------------------------------
@flow(name="download", log_prints=True)
def download_flow(input: str = "data/cc12m.tsv", output: str | None = None, profile: str = "paper",
                  overrides: list[str] | None = None) -> dict:
    """Download a URL list (CC12M TSV, parquet or CSV) into webdataset shards under `output`."""
    config = load_config(profile, overrides, {"data_root": output})  # a bad value fails here, before any work
    summary = download_with_artifacts(config, input)
    return {**_counts(summary), "status_counts": dict(summary.status_counts), "data_root": config.data_root}


@flow(name="pseudo-label", log_prints=True)
def pseudo_label_flow(data: str | None = None, profile: str = "paper", labelers: list[str] | None = None,
                      overrides: list[str] | None = None, pictures: int = 3) -> dict:
    """Pseudo-label the rgb shards under `data` (default: the profile's data_root)."""
    extra = [f"label.labelers={labelers}"] if labelers else []
    config = load_config(profile, (overrides or []) + extra, {"data_root": data})
    summary = label_with_artifacts(config, pictures)
    return {**_counts(summary), "status_counts": {n: dict(c) for n, c in summary.status_counts.items()},
            "data_root": config.data_root}


@flow(name="train-tokenizers", log_prints=True)
def train_tokenizers_flow(data: str | None = None, profile: str = "paper", modalities: list[str] | None = None,
                          overrides: list[str] | None = None) -> dict:
    """Train every tokenizer not yet trained (text, then the dense VQ-VAEs) on the dataset under `data`."""
    extra = [f"tokenizer.modalities={modalities}"] if modalities else []
    config = load_config(profile, (overrides or []) + extra, {"data_root": data})
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
    from pipeline.reporting import publish_transfer
    from stages.transfer.transfer import run_transfer

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
    from pipeline.reporting import publish_evaluation
    from stages.transfer.evaluate import run_evaluate
    from stages.fourm.pretrain import run_dir

    config = load_config(profile, overrides, {"data_root": data})
    results = run_evaluate(config.data_root, config, model or run_dir(config.data_root), samples=samples)
    publish_evaluation(results)
    return results


@flow(name="generate", log_prints=True)
def generate_flow(requests: str = "data/cc12m/generate/requests.jsonl", model: str = "data/cc12m/pretrain",
                  tokenizers: str = "data/cc12m/tokenizers", out: str | None = None, batch_size: int = 16,
                  device: str | None = None) -> dict:
    """Generate from a JSONL file of requests (see the README) in batches; every sample's grid as a picture."""
    from pipeline.reporting import publish_generation
    from stages.generate.generate import read_requests, run_generation

    out = out or str(Path(model) / "generations")
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


@stage_task(name="download")
def download_stage(input: str, profile: str, overrides: list[str], data: str | None) -> dict:
    return _counts(download_with_artifacts(load_config(profile, overrides, {"data_root": data}), input))


@stage_task(name="pseudo-label")
def label_stage(profile: str, overrides: list[str], data: str | None) -> dict:
    return _counts(label_with_artifacts(load_config(profile, overrides, {"data_root": data}), pictures=0))


@stage_task(name="train-tokenizers")
def train_stage(profile: str, overrides: list[str], data: str | None) -> dict:
    results = train_with_artifacts(load_config(profile, overrides, {"data_root": data}))
    return {m: ("already trained" if r.get("skipped") else "trained") for m, r in results.items()}


@stage_task(name="tokenize")
def tokenize_stage(profile: str, overrides: list[str], data: str | None) -> dict:
    summary = tokenize_with_artifacts(load_config(profile, overrides, {"data_root": data}))
    return {**_counts(summary), "tokens": summary.tokens}


@stage_task(name="pretrain")
def pretrain_stage(profile: str, overrides: list[str], data: str | None) -> dict:
    summary = pretrain_with_artifacts(load_config(profile, overrides, {"data_root": data}))
    return {"steps": summary["steps"], "loss": summary["final"].get("loss")}


@flow(name="cc12m-pipeline", log_prints=True)
def cc12m_pipeline_flow(input: str = "data/cc12m.tsv", data: str | None = None, profile: str = "paper",
                        labelers: list[str] | None = None, ray_address: str | None = None,
                        overrides: list[str] | None = None) -> dict:
    """URLs to a trained 4M: download, pseudo-label, train the tokenizers, tokenize, pretrain. Each stage skips
    what is committed (pretraining resumes from its checkpoint), so a rerun resumes where the last one stopped.
    `input="demo"` serves the bundled photos."""
    overrides = list(overrides or [])
    overrides += [f"label.labelers={labelers}"] if labelers else []
    overrides += [f"ray.address={ray_address}"] if ray_address else []
    config = load_config(profile, overrides, {"data_root": data})  # bad configuration fails here, once
    data = config.data_root
    results = {}
    for name, run in (("download", lambda: download_stage(input, profile, overrides, data)),
                      ("pseudo-label", lambda: label_stage(profile, overrides, data)),
                      ("train-tokenizers", lambda: train_stage(profile, overrides, data)),
                      ("tokenize", lambda: tokenize_stage(profile, overrides, data)),
                      ("pretrain", lambda: pretrain_stage(profile, overrides, data))):
        results[name] = run()
        print(f"{name}: {results[name]}")
        publish_stage_table(data, key="cc12m-pipeline-stages")
    return {"data_root": data, "stages": results}
