"""Labels made by a tool outside the project (ImageBind, a human-pose estimator such as HMR2.0), imported as one
modality's label shards, as if its labeler had run.

Consumes: the committed rgb shards, and a folder of files from the external tool, one per sample, named by the
          sample's key and the modality's extension (`000000042.npy` for ImageBind features, `000000042.json` for
          human poses), in the modality's stored format (its registry entry says which, and checks it).
Produces: `<root>/<modality>/shard-*.tar` aligned with the rgb shards, and `_status/label_<modality>/` per shard:
          every sample's fate (`ok`; `missing_label`: the tool wrote no file for it; `decode_error`: the entry
          refused the file, with its reason), the stats naming the folder the labels came from.
One shard at a time: the shard's files are read, checked, re-encoded in the stored form and committed atomically;
a committed shard is skipped on a rerun, so an interrupted import resumes and a tool can deliver in parts.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from core import registry
from core.config import Config
from stages.dataset.provenance import provenance
from stages.dataset.shards import OK, DatasetLayout, ShardObserver, ShardsSummary, ShardWriter, skip_or_queue
from stages.label.label import STATUS_SCHEMA, input_shards, stage_name
from stages.tokenizers.tokenizer_data import rgb_index


class ImportInputError(ValueError):
    """A modality that cannot be imported, or a folder that is not there."""


def importable(modality: str) -> registry.Modality:
    spec = registry.get(modality)
    if spec.downloaded:
        raise ImportInputError(f"{modality} is downloaded with the photos, not labelled: nothing to import")
    return spec


def import_shard(layout: DatasetLayout, modality: str, shard: str, source: Path) -> dict:
    """One rgb shard's labels from `source/<key>.<extension>`, checked by the modality's entry and committed."""
    spec, started = registry.get(modality), time.time()
    records = []
    with ShardWriter(layout, stage_name(modality), shard, [spec.folder]) as writer:
        index = rgb_index(layout, shard)
        for key in index.keys:
            path = source / f"{key}.{spec.extension}"
            if not path.is_file():
                records.append({"key": key, "status": "missing_label", "error": f"no file {path}"})
                continue
            try:
                label = spec.decode(path.read_bytes())
                spec.check_label(label)
                data = spec.encode(label)
            except Exception as err:  # noqa: BLE001 - a file the entry refuses costs only its sample
                records.append({"key": key, "status": "decode_error", "error": f"{path}: {type(err).__name__}: {err}"})
                continue
            writer.write(key, {spec.folder: (spec.extension, data)})
            height, width = index.sizes.get(key, (None, None))
            records.append({"key": key, "status": OK, "height": height, "width": width})
        counts = Counter(r["status"] for r in records)
        stats = {"rows": len(records), "ok": counts.get(OK, 0), "status_counts": dict(sorted(counts.items())),
                 "seconds": round(time.time() - started, 3),
                 "provenance": provenance({"imported_from": str(source)},
                                          {modality: {"source": f"imported from {source}", "weights_sha256": None,
                                                      "random_weights": False}})}
        writer.commit(pa.Table.from_pylist(records, schema=STATUS_SCHEMA), stats)
    return stats


def run_import(root: str | Path, config: Config, modality: str, source: str | Path,
               observer: ShardObserver | None = None) -> ShardsSummary:
    """Import an external tool's files for `modality` into every rgb shard not yet committed for it."""
    importable(modality)
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise ImportInputError(f"--source {str(source)!r}: no such folder")
    layout = DatasetLayout(root)
    layout.record_modalities(config.modalities)
    shards = input_shards(layout)
    summary = ShardsSummary(shards_total=len(shards), status_counts={modality: Counter()})
    if observer:
        observer.start(len(shards))
    started = time.time()
    todo = skip_or_queue(layout, shards, [modality], stage_name, summary, observer, lambda _, stats: stats[modality])
    for shard, _ in todo:
        stats = import_shard(layout, modality, shard, source)
        summary.shards_done += 1
        summary.status_counts[modality].update(stats["status_counts"])
        if observer:
            observer(shard, stats, False)
    summary.seconds = time.time() - started
    return summary
