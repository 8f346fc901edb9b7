"""Prefect flows: each wraps one stage so it can be started as a deployment and watched in the UI."""
from __future__ import annotations

from prefect import flow

from pipeline.config import load_config
from pipeline.reporting import StageReporter


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
