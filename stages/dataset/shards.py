"""The dataset layout every stage shares, and the one way a stage commits a shard.

    <root>/<modality>/shard-000000.tar          members <key>.<ext>, same shard names and key order per modality
    <root>/_status/<stage>/shard-000000.parquet  one row per input sample: key, status, error, stage columns
    <root>/_status/<stage>/shard-000000.json     the shard's stats, written last: the commit marker
    <root>/tokenizers/<modality>/, tokenizers/text/   the dataset's tokenizers (trained, or converted)
    <root>/pretrain/                             the 4M pretraining run (and its evaluation, transfers, generations)
    <root>/show/<key>.png                        pictures of samples
    <root>/_dropped/<folder>/                    members the align stage took out of the loader folders

Every path under a data root comes from `DatasetLayout`, so no stage, command or flow builds one by hand.

A shard is committed when its stats JSON exists. Every file is written under a temporary name and renamed
into place, tars first and the JSON last, so a reader never sees a partial tar and a shard killed at any
point is simply redone. On object storage (an s3:// or other fsspec root, see core.storage) each file is
written in the worker's local scratch folder and uploaded as one object, in the same order: a worker's scratch
holds one shard's files at most, and a killed upload leaves no object behind.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from core import registry
from core.files import atomic_path, publish, temporary_name, write_json
from core.ray_runtime import node_name
from core.storage import DataPath, data_path, is_remote, read_parquet

STATUS_DIR = "_status"
OK = "ok"


class ShardObserver(Protocol):
    """What watches a run: a progress bar, Prefect artifacts. Called in the driver. It may also have
    `in_progress(shards)` (the workers' counts within shards: `stages.progress`) and `failed(shard, error)` (a shard
    that failed in this run, redone on the next)."""

    def start(self, total_shards: int) -> None: ...

    def __call__(self, name: str, stats: dict, skipped: bool) -> None: ...


@dataclass
class ShardsSummary:
    """What one run of a stage did: shards, and sample fates (one Counter; per model for the stages that run
    several, labelers or tokenizers)."""

    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    failed_shards: dict[str, str] = field(default_factory=dict)
    status_counts: Counter | dict[str, Counter] = field(default_factory=Counter)
    seconds: float = 0.0

    def fail(self, shard: str, error: str, observer: "ShardObserver | None" = None) -> None:
        """A shard that failed in this run (redone on the next), told to the observer where it listens."""
        self.failed_shards[shard] = error
        if callable(getattr(observer, "failed", None)):
            observer.failed(shard, error)

    @property
    def images(self) -> int:
        """Samples kept (by every model, where there are several)."""
        if isinstance(self.status_counts, Counter):
            return self.status_counts.get(OK, 0)
        return min((c.get(OK, 0) for c in self.status_counts.values()), default=0)


def skip_or_queue(layout: "DatasetLayout", shards: list[str], names: list[str], stage_of, summary: ShardsSummary,
                  observer: "ShardObserver | None", merged) -> list[tuple[str, list[str]]]:
    """The shards with work left, as (shard, the names still to do); a shard every name has committed is skipped:
    its recorded fates are counted into the summary and shown to the observer (`merged(shard, stats)`)."""
    todo = []
    for shard in shards:
        pending = [n for n in names if not layout.is_committed(stage_of(n), shard)]
        if pending:
            todo.append((shard, pending))
            continue
        summary.shards_skipped += 1
        stats = {n: layout.read_stats(stage_of(n), shard) for n in names}
        for n in names:
            summary.status_counts[n].update(stats[n]["status_counts"])
        if observer:
            observer(shard, merged(shard, stats), True)
    return todo


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


class DatasetLayout:
    """Paths inside one dataset root: a local folder, or an object-storage URL (a `UPath`, which carries its
    storage options to the workers it is pickled for)."""

    def __init__(self, root: str | os.PathLike):
        self.root: DataPath = data_path(root)

    @property
    def remote(self) -> bool:
        """True on object storage: files are published by upload, and there are no folders to make."""
        return is_remote(self.root)

    def folder(self, name: str) -> DataPath:
        """A folder of shards: a modality's (rgb/, tok_rgb@224/), or the crops' (crop_settings/)."""
        return self.root / name

    @property
    def tokenizers_dir(self) -> DataPath:
        return self.root / TOKENIZERS

    def tokenizer_dir(self, name: str) -> DataPath:
        """A modality's tokenizer folder (the text tokenizer's: registry.TEXT)."""
        return self.tokenizers_dir / name

    @property
    def pretrain_dir(self) -> DataPath:
        return self.root / PRETRAIN

    @property
    def show_dir(self) -> DataPath:
        return self.root / SHOW

    @property
    def dropped_dir(self) -> DataPath:
        return self.root / DROPPED

    @property
    def url_list(self) -> DataPath:
        """The URL list the demo downloads, kept beside its data."""
        return self.root / URL_LIST

    @property
    def text_corpus(self) -> DataPath:
        """The demo's text-only corpus (one JSON object with a `text` per line), mixed into its pretraining."""
        return self.root / TEXT_CORPUS

    @property
    def colour_classes_dir(self) -> DataPath:
        """The demo's transfer task: class folders of its photos, tinted."""
        return self.root / COLOUR_CLASSES

    @property
    def generate_dir(self) -> DataPath:
        """Generation requests kept with the dataset (the demo's)."""
        return self.root / GENERATE

    def table(self, folder: str, shard: str) -> Path:
        """A shard's table in a folder of per-sample values that are not a modality (quality/: scores)."""
        return self.root / folder / f"{shard}.parquet"

    def tar(self, modality: str, shard: str) -> Path:
        return self.root / modality / f"{shard}.tar"

    @property
    def status_root(self) -> DataPath:
        return self.root / STATUS_DIR

    def status_dir(self, stage: str) -> Path:
        return self.status_root / stage

    def status_table(self, stage: str, shard: str) -> Path:
        return self.status_dir(stage) / f"{shard}.parquet"

    def stats(self, stage: str, shard: str) -> Path:
        return self.status_dir(stage) / f"{shard}.json"

    def is_committed(self, stage: str, shard: str) -> bool:
        return self.stats(stage, shard).is_file()

    def read_stats(self, stage: str, shard: str) -> dict[str, Any]:
        return json.loads(self.stats(stage, shard).read_text())

    def read_status(self, stage: str, shard: str, columns: list[str] | None = None) -> pa.Table:
        """A committed shard's status table (one row per input sample)."""
        return read_parquet(self.status_table(stage, shard), columns)

    def committed_shards(self, stage: str) -> list[str]:
        return sorted(p.stem for p in self.status_dir(stage).glob("shard-*.json"))

    def withdraw_later_stages(self, first: str, shard: str) -> list[str]:
        """Remove the commit record of `shard` from every stage but `first`, whose shard is about to be replaced:
        the stages built on it redo it on their next run. Done before the replacement is published, so a stop in
        between costs work, never a stale commit. Returns the stages withdrawn."""
        root = self.status_root
        stages = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != first) if root.is_dir() else []
        return self.withdraw(stages, shard)

    def withdraw(self, stages: list[str], shard: str) -> list[str]:
        """Remove the commit record of `shard` from each of `stages` that committed it, in their order (what is
        built on another first); returns the stages withdrawn."""
        withdrawn = [stage for stage in stages if self.is_committed(stage, shard)]
        for stage in withdrawn:
            self.stats(stage, shard).unlink()
        return withdrawn

    @property
    def modalities_file(self) -> Path:
        return self.status_root / "modalities.json"

    def modality_modules(self) -> list[str]:
        """The modules defining the dataset's modalities beyond the built-ins, as the stages that wrote it
        recorded them: what a command reading the dataset (verify, show, status) imports."""
        return json.loads(self.modalities_file.read_text())["modules"] if self.modalities_file.is_file() else []

    def record_modalities(self, modules: list[str]) -> None:
        """Add a run's modality modules (its configuration's `modalities`) to the dataset's record."""
        known = self.modality_modules()
        if set(modules) - set(known):
            write_json(self.modalities_file, {"modules": [*known, *(m for m in modules if m not in known)]})

    def modality_set(self) -> registry.ModalitySet:
        """The dataset's modalities: the built-ins and those of its recorded modules (for a reader given no
        profile); made, it has imported them."""
        return registry.ModalitySet(self.modality_modules())

    def loader_folders(self) -> list[str]:
        """The modality folders a 4M loader reads: every top-level folder holding shards, but for our own
        (`_status`, `_dropped`, `tokenizers`, `show`)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                      and p.name not in NOT_LOADER_FOLDERS and any(p.glob("shard-*.tar")))


TOKENIZERS, PRETRAIN, SHOW, DROPPED, GENERATE = "tokenizers", "pretrain", "show", "_dropped", "generate"
URL_LIST, COLOUR_CLASSES, TEXT_CORPUS = "urls.tsv", "transfer/colours", "corpus/captions.jsonl"
NOT_LOADER_FOLDERS = {TOKENIZERS, SHOW, PRETRAIN}


CROPS = "crop_settings"  # the folder (and stage) of each sample's pre-tokenization crops
CROP_PIXELS = "crops_rgb@224"  # beside them (same stage): each crop of the photo at 224, a JPEG per crop, so the
                               # 4M loader decodes 224 pixels instead of the whole photo


def producing_stage(folder: str) -> str:
    """The stage whose status files record the fate of each sample of a folder under the data root."""
    if folder in (CROPS, CROP_PIXELS):
        return CROPS
    try:
        modality, domain = registry.of_folder(folder)
    except registry.RegistryError:  # a modality this configuration does not name: a labelled one, by the convention
        return f"label_{folder}"
    return modality.stage if domain is None else modality.tokenize_stage


class ShardWriter:
    """Writes one shard of a stage: one tar per modality, then the status table, then the stats JSON.

    Use as a context manager; without `commit()` every temporary file is removed on exit.
    """

    def __init__(self, layout: DatasetLayout, stage: str, shard: str, modalities: list[str]):
        self.layout, self.stage, self.shard = layout, stage, shard
        self._final = {m: layout.tar(m, shard) for m in modalities}
        self._tmp = {m: temporary_name(p) for m, p in self._final.items()}
        self._writers: dict[str, wds.TarWriter] = {}
        self._committed = False
        self._started_at = time.time()
        for modality, tmp in self._tmp.items():
            if not layout.remote:  # (a killed run's scratch files go with its scratch folder: core.storage)
                tmp.parent.mkdir(parents=True, exist_ok=True)
                for stale in tmp.parent.glob(f".{self._final[modality].name}.tmp-*"):
                    stale.unlink(missing_ok=True)  # left by a run killed mid-shard
            # encoder=False: members are stored as the exact bytes given; a fixed mtime keeps reruns identical.
            self._writers[modality] = wds.TarWriter(str(tmp), encoder=False, mtime=0.0)
        if not layout.remote:
            layout.status_dir(stage).mkdir(parents=True, exist_ok=True)
            for stale in layout.status_dir(stage).glob(f".{shard}.*.tmp-*"):
                stale.unlink(missing_ok=True)

    def write(self, key: str, members: dict[str, tuple[str, bytes]]) -> None:
        """members: modality -> (extension, bytes). Keys must not contain a dot (webdataset splits on it)."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        for modality, (ext, data) in members.items():
            self._writers[modality].write({"__key__": key, ext: data})

    def commit(self, status: pa.Table, stats: dict[str, Any], tables: dict[str, pa.Table] | None = None
               ) -> dict[str, Any]:
        """Publish the shard's files and its `tables` (folder -> a table at <root>/<folder>/<shard>.parquet), its
        status table, then its stats (the commit record, last); returns the stats as recorded (with the stage,
        shard and node)."""
        for writer in self._writers.values():
            writer.close()
        for modality, tmp in self._tmp.items():
            publish(tmp, self._final[modality])
        for folder, table in (tables or {}).items():
            with atomic_path(self.layout.table(folder, self.shard)) as tmp:
                pq.write_table(table, tmp)
        with atomic_path(self.layout.status_table(self.stage, self.shard)) as tmp:
            pq.write_table(status, tmp)
        stats = {"stage": self.stage, "shard": self.shard, "node": node_name(), "worker": os.getpid(),
                 "started_at": self._started_at, "finished_at": time.time(), **stats}
        # the node and the worker process on it: which machine made it (status: rates per node and per worker)
        write_json(self.layout.stats(self.stage, self.shard), stats)
        self._committed = True
        return stats

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._committed:
            return
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - best effort: the shard is being abandoned anyway
                pass
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)
