"""Prefect flows: each wraps one stage so it can be started as a deployment and watched in the UI."""
from __future__ import annotations

from prefect import flow

from pipeline.config import load_config
from pipeline.reporting import StageReporter


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
    if summary.failed_shards:
        raise RuntimeError(f"{len(summary.failed_shards)} shards not tokenized (rerun to redo them): "
                           f"{summary.failed_shards}")
    return {"shards_done": summary.shards_done, "shards_skipped": summary.shards_skipped, "tokens": summary.tokens,
            "status_counts": {m: dict(c) for m, c in summary.status_counts.items()}, "data_root": config.data_root}
