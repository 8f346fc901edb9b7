"""The download stage: a URL list in, webdataset shards of images and captions out.

Consumes  a CC12M-style list (`url<TAB>caption` TSV, or parquet/CSV with url and caption columns).
Produces  <root>/rgb/shard-NNNNNN.tar      <key>.jpg  upright RGB JPEG, longest side <= max_side
          <root>/caption/shard-NNNNNN.tar  <key>.txt  UTF-8 caption
          <root>/_status/download/shard-NNNNNN.parquet  one row per input row, whatever its fate
          <root>/_status/download/shard-NNNNNN.json     shard stats, the commit marker

Shard i holds input rows [i * shard_size, (i + 1) * shard_size); a sample's key is its row number, so
keys and shard contents are the same on every rerun. Committed shards are skipped; any other is redone.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa

from core import registry
from core.config import Config, DownloadConfig
from core.ray_runtime import init_ray, require_resources
from core.storage import DataPath, absolute
from stages.dataset.provenance import provenance
from stages.dataset.shards import OK, DatasetLayout, ShardObserver, ShardsSummary, ShardWriter, shard_name
from stages.download.duplicates import Duplicates
from stages.download.fetch import Fetcher
from stages.download.images import ImageError, process_image
from stages.download.inputs import InputError, InputRow, read_rows
from stages.progress import ProgressChannel, counter, watched_shards

STAGE = "download"
# Failures that may pass on another try (`download --retry-failed`): the network's and the server's, not the URL's
RETRYABLE = {"timeout", "network_error", "dns_error", "internal_error"}
RETRYABLE_HTTP = {408, 425, 429}  # and every 5xx


STATUS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("row", pa.int64()),
    ("url", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("http_status", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("sha256", pa.string()),
    ("bytes", pa.int64()),
    ("duplicate_of", pa.string()),
])


@dataclass
class ShardTask:
    index: int
    rows: list[InputRow] = field(default_factory=list)
    duplicate_of: dict[int, str] = field(default_factory=dict)  # row index -> key of the first occurrence

    @property
    def name(self) -> str:
        return shard_name(self.index)


# -- one sample --------------------------------------------------------------------------------------
def download_sample(row: InputRow, fetcher: Fetcher, cfg: DownloadConfig) -> tuple[dict, bytes | None]:
    """Fetch and convert one row; returns its status record and the stored JPEG (None on failure)."""
    record = {"key": row.key, "row": row.index, "url": row.url}
    if row.error:
        return {**record, "status": "invalid_row", "error": row.error}, None
    result = fetcher.fetch(row.url)
    record["http_status"] = result.http_status
    if result.status != OK:
        return {**record, "status": result.status, "error": result.error}, None
    record["sha256"] = hashlib.sha256(result.data).hexdigest()
    record["bytes"] = len(result.data)
    try:
        image = process_image(result.data, cfg.max_side, cfg.jpeg_quality, cfg.max_pixels)
    except ImageError as err:
        return {**record, "status": err.status, "error": err.message}, None
    record.update(status=OK, width=image.width, height=image.height,
                  original_width=image.original_width, original_height=image.original_height)
    return record, image.jpeg


def _ordered_map(fn: Callable, items: list, threads: int) -> Iterator:
    """fn over items on a thread pool, yielded in input order, with a bounded number in flight."""
    window = max(1, threads * 2)
    with ThreadPoolExecutor(threads) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def retryable(record: dict) -> bool:
    """A failed row worth another try: a timeout, a network or DNS error, or HTTP 5xx, 408, 425 or 429."""
    status, http = record["status"], record.get("http_status")
    return status in RETRYABLE or status == "http_error" and (http is None or http >= 500 or http in RETRYABLE_HTTP)


# -- one shard ---------------------------------------------------------------------------------------
def download_shard(root: DataPath, task: ShardTask, cfg: DownloadConfig, progress: ProgressChannel | None = None
                   ) -> dict:
    """Download one shard and commit it, telling `progress` how far it is; returns the shard's stats."""
    layout = DatasetLayout(root)
    samples = counter(progress, task.name, len(task.rows))
    fetcher = Fetcher(cfg)
    started = time.time()
    records = []

    def one(row: InputRow):
        if row.index in task.duplicate_of:
            first = task.duplicate_of[row.index]
            return {"key": row.key, "row": row.index, "url": row.url, "status": "duplicate",
                    "error": f"same url as key {first}", "duplicate_of": first}, None
        try:
            return download_sample(row, fetcher, cfg)
        except Exception as err:  # noqa: BLE001 - one sample's bug must not sink the shard
            return {"key": row.key, "row": row.index, "url": row.url, "status": "internal_error",
                    "error": f"{type(err).__name__}: {err}"}, None

    photo, caption_spec = registry.photo(), registry.caption()
    with ShardWriter(layout, STAGE, task.name, [photo.folder, caption_spec.folder]) as writer:
        for row, (record, jpeg) in zip(task.rows, _ordered_map(one, task.rows, cfg.threads)):
            records.append(record)
            if jpeg is not None:
                caption = (row.caption or "").encode("utf-8")
                writer.write(row.key, {photo.folder: (photo.extension, jpeg),
                                       caption_spec.folder: (caption_spec.extension, caption)})
            samples.advance()
        samples.finish()
        return _commit(writer, records, started, cfg)


def retry_shard(root: DataPath, task: ShardTask, cfg: DownloadConfig, progress: ProgressChannel | None = None
                ) -> dict:
    """Fetch a committed shard's retryable failures again (`task.rows`: those rows) and publish the shard anew, its
    earlier photos with those that now succeed, in key order. The later stages' commits of the shard are withdrawn
    first, so that each redoes the shard on its next run; returns the shard's new stats."""
    from stages.tokenizers.tokenizer_data import read_members  # here: it imports torch, which downloads need not

    layout = DatasetLayout(root)
    photo, caption_spec = registry.photo(), registry.caption()
    records = {r["key"]: r for r in layout.read_status(STAGE, task.name).to_pylist()}
    members = {key: {photo.folder: (photo.extension, data)}
               for key, data in read_members(layout.tar(photo.folder, task.name), photo.extension)}
    for key, data in read_members(layout.tar(caption_spec.folder, task.name), caption_spec.extension):
        members.setdefault(key, {})[caption_spec.folder] = (caption_spec.extension, data)
    fetcher, started, samples = Fetcher(cfg), time.time(), counter(progress, task.name, len(task.rows))
    for row, (record, jpeg) in zip(task.rows, _ordered_map(lambda r: download_sample(r, fetcher, cfg), task.rows,
                                                           cfg.threads)):
        records[row.key] = record
        if jpeg is not None:
            members[row.key] = {photo.folder: (photo.extension, jpeg),
                                caption_spec.folder: (caption_spec.extension, (row.caption or "").encode("utf-8"))}
        samples.advance()
    samples.finish()
    layout.withdraw_later_stages(STAGE, task.name)
    with ShardWriter(layout, STAGE, task.name, [photo.folder, caption_spec.folder]) as writer:
        for key in sorted(members):
            writer.write(key, members[key])
        return _commit(writer, [records[key] for key in sorted(records)], started, cfg)


def _commit(writer: ShardWriter, records: list[dict], started: float, cfg: DownloadConfig) -> dict:
    """The shard's status table and stats, committed (the stats last)."""
    table = pa.Table.from_pylist(records, schema=STATUS_SCHEMA)
    counts = Counter(r["status"] for r in records)
    seconds = time.time() - started
    stats = {
        "rows": len(records),
        "ok": counts.get(OK, 0),
        "status_counts": dict(sorted(counts.items())),
        "bytes_downloaded": int(sum(r.get("bytes") or 0 for r in records)),
        "seconds": round(seconds, 3),
        "images_per_s": round(counts.get(OK, 0) / seconds, 2) if seconds > 0 else None,
        "started_at": started,
        "finished_at": time.time(),
        "provenance": provenance(cfg),
    }
    stats = writer.commit(table, stats)
    return stats


# -- all shards --------------------------------------------------------------------------------------
def retry_rows(layout: DatasetLayout, task: ShardTask, listed: str) -> list[InputRow]:
    """The rows of a committed shard whose failure is retryable; a row whose URL is not the one the shard recorded
    (another list than the dataset's) fails with InputError, before that shard is touched."""
    stats = layout.read_stats(STAGE, task.name)
    if not set(stats["status_counts"]) - {OK}:
        return []
    failed = {r["row"]: r for r in layout.read_status(STAGE, task.name).to_pylist()
              if r["status"] != OK and retryable(r)}
    rows = [row for row in task.rows if row.index in failed]
    for row in rows:
        if row.url != failed[row.index]["url"]:
            raise InputError(f"--retry-failed: row {row.index} of {listed} is {row.url!r}, but {task.name} recorded "
                             f"{failed[row.index]['url']!r} for key {row.key}: retry with the list the dataset was "
                             f"downloaded from")
    return rows


def plan_shards(rows: Iterable[InputRow], shard_size: int, duplicates: Iterable[tuple[int, int]]) -> Iterator[ShardTask]:
    """Cut the row stream into shards, marking the rows `duplicates` names (row, first row with its URL, in row
    order) as duplicates of their first occurrence. Holds one shard at a time."""
    repeats = iter(duplicates)
    repeat = next(repeats, None)
    task = ShardTask(0)
    for row in rows:
        if row.index // shard_size != task.index:
            yield task
            task = ShardTask(row.index // shard_size)
        task.rows.append(row)
        if repeat is not None and repeat[0] == row.index:
            task.duplicate_of[row.index] = InputRow(repeat[1], None, None).key
            repeat = next(repeats, None)
    if task.rows:
        yield task


def run_download(input_path: str | Path, root: DataPath | str, config: Config,
                 observer: ShardObserver | None = None, retry_failed: bool = False) -> ShardsSummary:
    """Download every shard not yet committed, `processes` Ray tasks at a time; `retry_failed`: fetch the
    retryable failures of committed shards again too (`retry_shard`).

    The observer hears the number of shards, then each shard as it finishes or is found committed (and, where it
    has `in_progress`, the shards in progress every few seconds: `stages.progress`).
    """
    import ray

    cfg = config.download
    layout = DatasetLayout(root)

    def rows():
        return read_rows(input_path, cfg.url_column, cfg.caption_column, cfg.max_url_chars, cfg.max_caption_chars)

    scratch = tempfile.TemporaryDirectory(prefix="download-duplicates-")
    duplicates = Duplicates(rows(), scratch.name, cfg.duplicate_memory_rows)  # a first pass over the whole list
    summary = ShardsSummary(shards_total=-(-duplicates.rows // cfg.shard_size))
    if observer:
        observer.start(summary.shards_total)
    init_ray(config.ray)
    require_resources({"CPU": 1}, 1, "download")  # a cluster of no CPU would queue the shards forever
    remote = ray.remote(num_cpus=1, max_retries=3)(download_shard)
    remote_retry = ray.remote(num_cpus=1, max_retries=3)(retry_shard)
    root_arg = absolute(layout.root)
    cfg_ref = ray.put(cfg)
    in_flight: dict[ray.ObjectRef, str] = {}
    started = time.time()

    def settle(block_until: int) -> None:
        while len(in_flight) > block_until:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            name = in_flight.pop(done[0])
            try:
                stats = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - record and go on; the shard is redone next run
                summary.fail(name, f"{type(err).__name__}: {err}", observer)
                continue
            summary.shards_done += 1
            summary.status_counts.update(stats["status_counts"])
            if observer:
                observer(name, stats, False)

    with watched_shards(observer) as channel:
        for task in plan_shards(rows(), cfg.shard_size, duplicates):
            work = remote
            if layout.is_committed(STAGE, task.name) and retry_failed:
                again = retry_rows(layout, task, str(input_path))
                if again:
                    task, work = ShardTask(task.index, again), remote_retry
            if work is remote and layout.is_committed(STAGE, task.name):
                stats = layout.read_stats(STAGE, task.name)
                summary.shards_skipped += 1
                summary.status_counts.update(stats["status_counts"])
                if observer:
                    observer(task.name, stats, True)
                continue
            settle(cfg.processes - 1)
            named = work.options(name=f"download {task.name}")  # the task's name in the Ray dashboard
            in_flight[named.remote(root_arg, task, cfg_ref, channel)] = task.name
        settle(0)
    scratch.cleanup()
    summary.seconds = time.time() - started
    return summary
