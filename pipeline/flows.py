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
