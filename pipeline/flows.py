"""Prefect flows: each wraps one stage so it can be started as a deployment and watched in the UI."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import flow, task

from pipeline.config import load_config
from pipeline.reporting import StageReporter, publish_stage_table


@flow(name="pseudo-label", log_prints=True)
def pseudo_label_flow(data: str | None = None, profile: str = "demo", labelers: list[str] | None = None,
                      overrides: list[str] | None = None, pictures: int = 3) -> dict:
    """Pseudo-label the rgb shards under `data` (default: the profile's data_root)."""
    from pipeline.reporting import LabelReporter, sample_pictures_markdown
    from stages.label import run_label

    extra = [f"label.labelers={labelers}"] if labelers else []
    config = load_config(profile, (overrides or []) + extra, {"data_root": data})
    reporter = LabelReporter("pseudo-label", config.label.labelers)
    summary = run_label(config.data_root, config, observer=reporter)
    print(reporter.finish())
    publish_stage_table(config.data_root, key="pseudo-label-stages")
    sample_pictures_markdown(config.data_root, pictures, key="pseudo-label-samples")
    if summary.failed_shards:
        raise RuntimeError(f"{len(summary.failed_shards)} shards failed (rerun to redo them): {summary.failed_shards}")
    return {"shards_done": summary.shards_done, "shards_skipped": summary.shards_skipped,
            "status_counts": {n: dict(c) for n, c in summary.status_counts.items()}, "data_root": config.data_root}


@flow(name="download", log_prints=True)
def download_flow(input: str = "data/cc12m.tsv", output: str | None = None, profile: str = "paper",
                  overrides: list[str] | None = None) -> dict:
    """Download a URL list (CC12M TSV, parquet or CSV) into webdataset shards under `output`."""
    from stages.download import run_download

    config = load_config(profile, overrides, {"data_root": output})  # a bad value fails here, before any work
    reporter = StageReporter("download")
    summary = run_download(input, config.data_root, config, observer=reporter)
    print(reporter.finish())
    publish_stage_table(config.data_root, key="download-stages")
    if summary.failed_shards:
        raise RuntimeError(f"{len(summary.failed_shards)} shards failed (rerun to redo them): {summary.failed_shards}")
    return {"shards_done": summary.shards_done, "shards_skipped": summary.shards_skipped,
            "status_counts": dict(summary.status_counts), "data_root": config.data_root}


@flow(name="train-tokenizers", log_prints=True)
def train_tokenizers_flow(data: str | None = None, profile: str = "demo", modalities: list[str] | None = None,
                          overrides: list[str] | None = None) -> dict:
    """Train every tokenizer not yet trained (text, then the dense VQ-VAEs) on the dataset under `data`."""
    from pipeline.reporting import TokenizerReporter
    from stages.train_tokenizer import run_train_tokenizers

    extra = [f"tokenizer.modalities={modalities}"] if modalities else []
    config = load_config(profile, (overrides or []) + extra, {"data_root": data})
    reporter = TokenizerReporter(config.data_root, config.tokenizer.modalities)
    results = run_train_tokenizers(config.data_root, config, observer=reporter)
    print(reporter.finish())
    publish_stage_table(config.data_root, key="train-tokenizers-stages")
    return {"data_root": config.data_root, "tokenizers": results}


@flow(name="tokenize", log_prints=True)
def tokenize_flow(data: str | None = None, profile: str = "demo", modalities: list[str] | None = None,
                  overrides: list[str] | None = None) -> dict:
    """Encode every sample's crops with every trained tokenizer into tok_<modality>@224 shards."""
    from stages.tokenize import run_tokenize

    config = load_config(profile, overrides, {"data_root": data})
    reporter = StageReporter("tokenize")
    summary = run_tokenize(config.data_root, config, modalities, observer=reporter)
    print(reporter.finish())
    publish_stage_table(config.data_root, key="tokenize-stages")
    if summary.failed_shards:
        raise RuntimeError(f"{len(summary.failed_shards)} shards not tokenized (rerun to redo them): "
                           f"{summary.failed_shards}")
    return {"shards_done": summary.shards_done, "shards_skipped": summary.shards_skipped, "tokens": summary.tokens,
            "status_counts": {m: dict(c) for m, c in summary.status_counts.items()}, "data_root": config.data_root}


# -- the whole pipeline ------------------------------------------------------------------------------------
class ShardsFailed(RuntimeError):
    """Some shards failed, typically on a lost worker or node; a rerun redoes only those."""


def is_infrastructure_error(exc: BaseException | None) -> bool:
    """Worth retrying: lost workers, nodes, objects, connections. Not: bad configuration or input."""
    import ray.exceptions as rex

    from pipeline.config import ConfigError

    if exc is None or isinstance(exc, (ConfigError, ValueError, TypeError, KeyError)):
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


def _raise_failed(stage: str, summary) -> None:
    if summary.failed_shards:
        raise ShardsFailed(f"{stage}: {len(summary.failed_shards)} shards failed: {summary.failed_shards}")


@stage_task(name="download")
def download_stage(input: str, profile: str, overrides: list[str], data: str | None) -> dict:
    from pipeline.demo import download_demo_photos
    from stages.download import run_download

    config = load_config(profile, overrides, {"data_root": data})
    reporter = StageReporter("download")
    if input == "demo":
        summary = download_demo_photos(Path(config.data_root), config, observer=reporter)
    else:
        summary = run_download(input, config.data_root, config, observer=reporter)
    reporter.finish()
    _raise_failed("download", summary)
    return {"shards_done": summary.shards_done, "shards_skipped": summary.shards_skipped}


@stage_task(name="pseudo-label")
def label_stage(profile: str, overrides: list[str], data: str | None) -> dict:
    from pipeline.demo import save_demo_models
    from pipeline.reporting import LabelReporter
    from stages.label import run_label

    config = load_config(profile, overrides, {"data_root": data})
    if config.profile == "demo":
        save_demo_models(config)
    reporter = LabelReporter("pseudo-label", config.label.labelers)
    summary = run_label(config.data_root, config, observer=reporter)
    reporter.finish()
    _raise_failed("pseudo-label", summary)
    return {"shards_done": summary.shards_done, "shards_skipped": summary.shards_skipped}


@stage_task(name="train-tokenizers")
def train_stage(profile: str, overrides: list[str], data: str | None) -> dict:
    from pipeline.reporting import TokenizerReporter
    from stages.train_tokenizer import run_train_tokenizers

    config = load_config(profile, overrides, {"data_root": data})
    reporter = TokenizerReporter(config.data_root, config.tokenizer.modalities)
    results = run_train_tokenizers(config.data_root, config, observer=reporter)
    reporter.finish()
    return {m: ("already trained" if r.get("skipped") else "trained") for m, r in results.items()}


@stage_task(name="tokenize")
def tokenize_stage(profile: str, overrides: list[str], data: str | None) -> dict:
    from stages.tokenize import run_tokenize

    config = load_config(profile, overrides, {"data_root": data})
    reporter = StageReporter("tokenize")
    summary = run_tokenize(config.data_root, config, observer=reporter)
    reporter.finish()
    _raise_failed("tokenize", summary)
    return {"shards_done": summary.shards_done, "shards_skipped": summary.shards_skipped, "tokens": summary.tokens}


@flow(name="cc12m-pipeline", log_prints=True)
def cc12m_pipeline_flow(input: str = "demo", data: str | None = None, profile: str = "demo",
                        labelers: list[str] | None = None, ray_address: str | None = None,
                        overrides: list[str] | None = None) -> dict:
    """URLs to tokens: download, pseudo-label, train the tokenizers, tokenize. Each stage skips what is
    committed, so a rerun resumes where the last one stopped. `input="demo"` serves the bundled photos."""
    overrides = list(overrides or [])
    overrides += [f"label.labelers={labelers}"] if labelers else []
    overrides += [f"ray.address={ray_address}"] if ray_address else []
    config = load_config(profile, overrides, {"data_root": data})  # bad configuration fails here, once
    data = config.data_root
    results = {}
    for name, run in (("download", lambda: download_stage(input, profile, overrides, data)),
                      ("pseudo-label", lambda: label_stage(profile, overrides, data)),
                      ("train-tokenizers", lambda: train_stage(profile, overrides, data)),
                      ("tokenize", lambda: tokenize_stage(profile, overrides, data))):
        results[name] = run()
        print(f"{name}: {results[name]}")
        publish_stage_table(data, key="cc12m-pipeline-stages")
    return {"data_root": data, "stages": results}
