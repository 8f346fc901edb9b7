"""Alignment: every folder a 4M loader reads holds the same keys, in the same order, in every shard.

Consumes  every loader folder's shards (rgb, caption, det, the label folders, tok_*, crop_settings) and the
          status tables of the stages that wrote them.
Produces  the same shards, less every sample that is missing from any of them; the dropped samples' members
          moved (not deleted) to <root>/_dropped/<folder>/shard-NNNNNN.tar
          <root>/_status/align/shard-NNNNNN.parquet  one row per sample: ok, or dropped with the reason each
                                                     stage recorded; earlier drops are kept
          <root>/_status/align/shard-NNNNNN.json     stats and provenance, written last

Why: the reference loader zips the modality tars position by position. A key missing from one folder makes
it report a divergence and skip the rest of that shard; a key missing at a shard's end silently drops the
sample from every modality. So a sample that failed anywhere (an undecodable image, a labeler's error, a label
the tokenizer could not read) is dropped everywhere.

Run at the end of the tokenize stage, per shard, by the worker that tokenized it (and for shards whose folders
changed since their last alignment, by `run_tokenize` itself); `python -m pipeline align` runs it alone.
Idempotent and resumable: a shard killed mid-way is finished by the next run, since each tar is filtered
against the keys present everywhere, which a half-done run only shrinks; dropped members are written to
_dropped before the filtered tar replaces the original.
"""
from __future__ import annotations

import io
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core import registry
from core.files import atomic_path, publish, temporary_name, write_json
from core.storage import is_remote, modified_ns, open_tar, read_parquet
from stages.dataset.provenance import provenance
from stages.dataset.shards import OK, DatasetLayout, producing_stage

STAGE = "align"
DROPPED = "dropped"
STATUS_SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("error", pa.string())])


class AlignError(ValueError):
    """A shard that cannot be aligned yet: a folder has no tar for it."""


def member_keys(path: Path) -> list[str]:
    """Keys of a shard's members in tar order (one key per sample; members of a key are consecutive)."""
    keys = []
    with open_tar(path) as tar:
        for member in tar:
            if member.isfile():
                key = member.name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def recorded_failures(layout: DatasetLayout, stage: str, shard: str) -> dict[str, str]:
    """key -> "status: error" for every sample a stage's status table records as failed in one shard."""
    path = layout.status_table(stage, shard)
    if not path.is_file():
        return {}
    rows = read_parquet(path).to_pylist()
    return {r["key"]: f"{r['status']}: {r['error']}" if r.get("error") else r["status"] for r in rows
            if r["status"] != OK}


def _move_members(source: Path, keep: set[str], dropped_tar: Path) -> None:
    """Rewrite `source` with the kept keys' members (same order, same headers); the others go to `dropped_tar`."""
    if not is_remote(dropped_tar):
        dropped_tar.parent.mkdir(parents=True, exist_ok=True)
    earlier: list[tuple[tarfile.TarInfo, bytes]] = []
    if dropped_tar.is_file():
        with open_tar(dropped_tar) as old:
            earlier = [(m, old.extractfile(m).read()) for m in old if m.isfile()]
    names = {m.name for m, _ in earlier}
    kept_tmp, dropped_tmp = temporary_name(source), temporary_name(dropped_tar)
    try:
        with open_tar(source) as tar, tarfile.open(kept_tmp, "w") as kept, tarfile.open(dropped_tmp, "w") as gone:
            for member, data in earlier:
                gone.addfile(member, io.BytesIO(data))
            for member in tar:
                if not member.isfile():
                    continue
                data = tar.extractfile(member)
                if member.name.split(".", 1)[0] in keep:
                    kept.addfile(member, data)
                elif member.name not in names:  # a rerun after a kill may meet a member already moved
                    gone.addfile(member, data)
        publish(dropped_tmp, dropped_tar)  # first the copy, then the shrunk shard: nothing is ever lost
        publish(kept_tmp, source)
    finally:
        kept_tmp.unlink(missing_ok=True)
        dropped_tmp.unlink(missing_ok=True)


def align_shard(layout: DatasetLayout, shard: str, folders: list[str] | None = None) -> dict:
    """Drop from every folder of one shard the samples missing from any; returns the shard's stats.

    Raises AlignError when a folder lacks the shard altogether (its stage has not written it yet).
    """
    started = time.time()
    folders = folders or layout.loader_folders()
    missing = [f for f in folders if not layout.tar(f, shard).is_file()]
    if missing:
        raise AlignError(f"{shard}: cannot align, no shard in {', '.join(missing)} (run the stages that write them)")
    keys = {folder: member_keys(layout.tar(folder, shard)) for folder in folders}
    present = {folder: set(found) for folder, found in keys.items()}
    photo = registry.photo().folder
    order = keys[photo] if photo in keys else keys[folders[0]]
    everywhere = [k for k in order if all(k in found for found in present.values())]
    keep = set(everywhere)

    failures = {folder: recorded_failures(layout, producing_stage(folder), shard) for folder in folders}
    rows: dict[str, dict] = {}
    if layout.status_table(STAGE, shard).is_file():  # earlier drops stay recorded
        for row in layout.read_status(STAGE, shard).to_pylist():
            if row["status"] == DROPPED:
                rows[row["key"]] = row
    for key in sorted({k for found in keys.values() for k in found} - keep):
        absent_from = [f for f in folders if key not in present[f]]
        reasons = dict.fromkeys(f"{producing_stage(f)}: {failures[f].get(key, 'absent, no failure recorded')}"
                                for f in absent_from)  # one reason per stage, in folder order
        rows[key] = {"key": key, "status": DROPPED,
                     "error": f"missing from {', '.join(absent_from)} ({'; '.join(reasons)})"}
    for key in everywhere:
        rows[key] = {"key": key, "status": OK, "error": None}

    changed = [f for f in folders if len(keys[f]) != len(everywhere)]
    for folder in changed:
        _move_members(layout.tar(folder, shard), keep, layout.dropped_dir / folder / f"{shard}.tar")

    table = pa.Table.from_pylist(sorted(rows.values(), key=lambda r: r["key"]), schema=STATUS_SCHEMA)
    counts = Counter(r["status"] for r in rows.values())
    stats = {"stage": STAGE, "shard": shard, "rows": len(rows), "ok": counts.get(OK, 0),
             "status_counts": dict(sorted(counts.items())), "folders": folders, "rewritten": changed,
             "seconds": round(time.time() - started, 3), "started_at": started, "finished_at": time.time(),
             "provenance": provenance({})}
    with atomic_path(layout.status_table(STAGE, shard)) as tmp:
        pq.write_table(table, tmp)
    write_json(layout.stats(STAGE, shard), stats)
    return stats


def is_aligned(layout: DatasetLayout, shard: str, folders: list[str]) -> bool:
    """Aligned since the last change: the commit marker is newer than every folder's tar, and names them all."""
    marker = layout.stats(STAGE, shard)
    if not marker.is_file():
        return False
    stats = layout.read_stats(STAGE, shard)
    if set(stats.get("folders", [])) != set(folders):
        return False
    newest = max((modified_ns(layout.tar(f, shard)) for f in folders if layout.tar(f, shard).is_file()), default=0)
    return modified_ns(marker) >= newest


def align_dataset(root: str | Path, shards: list[str] | None = None) -> dict[str, dict | str]:
    """Align every shard (or those given) not aligned since its folders last changed: shard -> stats, or the
    reason it could not be aligned yet."""
    layout = DatasetLayout(root)
    folders = layout.loader_folders()
    results: dict[str, dict | str] = {}
    for shard in shards if shards is not None else layout.committed_shards("download"):
        if is_aligned(layout, shard, folders):
            continue
        try:
            results[shard] = align_shard(layout, shard, folders)
        except AlignError as err:
            results[shard] = str(err)
    return results
