"""The pseudo-label stage: RGB shards in, one aligned shard per labeler out.

Consumes  <root>/rgb/shard-NNNNNN.tar, the shards the download stage committed.
Produces  <root>/depth/shard-NNNNNN.tar    <key>.png   16-bit grayscale, depth in [0, 1] scaled to 0..65535
          <root>/normal/shard-NNNNNN.tar   <key>.png   8-bit RGB, normal components in [0, 1] scaled to 0..255
          <root>/semseg/shard-NNNNNN.tar   <key>.png   8-bit class ids, COCO panoptic (0..132)
          <root>/det/shard-NNNNNN.tar      <key>.json  {"instances": [{"boxes": [xmin, ymin, xmax, ymax] in 0..1,
                                                        "class_name": str, "score": float}]}
          <root>/clip/shard-NNNNNN.tar     <key>.npy   float16 (h, w, 512), h x w = 14 x 14 for a square image
          <root>/_status/label_<labeler>/shard-NNNNNN.{parquet,json}   one row per rgb sample; commit marker
Every label has the stored image's resolution (CLIP: one feature per 16x16 patch at shortest side 224), and
each modality's shard holds the rgb shard's keys in the rgb shard's order (a sample a labeler failed on is
absent from that modality and recorded; the tokenize stage then drops it from every folder, `stages/dataset/align.py`).
Each shard's stats record the model that made it (source, sha256 of its weights, random or not). Samples that the
quality thresholds drop (quality.min_clip_score, ..., stages/quality/filters.py) are neither decoded nor labelled:
their rows say `filtered` and why.

One Ray actor per GPU (or per CPU slot) holds every requested labeler; it reads and decodes each image once
for all of them, in chunks, decoding the next chunk while the models run on this one; it fills each model's
batches with images of one input size, keeps one batch queued on the device while the last one's labels are
read back, and encodes labels on CPU threads, so that the GPU, not the CPU, bounds the stage. Shards are the unit
of progress: a labeler's shard is committed by its stats JSON and skipped on the next run.
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from core import registry
from core.config import Config, LabelConfig, QualityConfig
from core.ray_runtime import init_ray
from core.storage import absolute, open_tar, read_parquet
from models.labelers import SizeBuckets, WeightsUnavailable, check_weights, run_overlapped
from stages.actor_pool import run_on_actors
from stages.dataset.align import STAGE as ALIGN_STAGE
from stages.dataset.provenance import provenance
from stages.dataset.shards import OK, DatasetLayout, ShardObserver, ShardsSummary, ShardWriter, skip_or_queue
from stages.download.download import STAGE as DOWNLOAD_STAGE
from stages.progress import ProgressChannel, SampleCounter, counter
from stages.quality.filters import FILTERED, QualityFilterError, check_scored, rejected
from stages.quality.filters import SCORED as QUALITY

STATUS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
])


class LabelInputError(ValueError):
    """The stage's input is not there: no committed rgb shards, or a committed shard's tar is missing."""


def stage_name(labeler: str) -> str:
    return registry.get(labeler).stage


# -- reading rgb shards ------------------------------------------------------------------------------
def read_rgb(path: Path) -> Iterator[tuple[str, bytes]]:
    """(key, jpeg bytes) in the shard's order, streamed."""
    with open_tar(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                yield member.name.rsplit(".", 1)[0], tar.extractfile(member).read()


def decode_rgb(data: bytes) -> np.ndarray:
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        raise ValueError("not a decodable image")
    return np.ascontiguousarray(pixels[..., ::-1])  # BGR -> RGB


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- one shard ---------------------------------------------------------------------------------------
def _one_by_one(labeler, images: list[np.ndarray]) -> list[tuple[object, str | None]]:
    """Labels for a batch that failed as a whole: each image alone, so one bad sample costs only itself."""
    results = []
    for image in images:
        try:
            results.append((labeler.collect(labeler.launch([image]))[0], None))  # the image, or its labels too
        except Exception as err:  # noqa: BLE001 - recorded as this sample's fate
            results.append((None, f"{type(err).__name__}: {err}"))
    return results


class ShardLabelling:
    """One rgb shard through every labeler, in named steps; commits one shard per labeler.

    read      the rgb members in the shard's key order, a chunk (`chunk_size`) at a time
    decode    each chunk on the decode threads, the next one while the models work on this one
    batch     each labeler's images grouped by its model input size (`SizeBuckets`, `batch_window` waiting)
    run       the batches on the device, one queued ahead while the last one's labels come back
              (`run_overlapped`); a batch that fails is redone image by image, so one bad sample costs itself
    encode    labels into their stored bytes (the modality's `encode`) on the decode threads
    write     one writer thread per labeler keeps its tar in the rgb key order; every sample's fate recorded
    commit    each labeler's status table and stats, the stats (the commit marker) last
    """

    def __init__(self, root: str, shard: str, labelers: dict, cfg: LabelConfig, quality: QualityConfig | None = None,
                 samples: SampleCounter | None = None):
        self.layout, self.shard, self.labelers, self.cfg = DatasetLayout(root), shard, labelers, cfg
        self.samples = samples or counter(None, shard, 0)  # a step per sample written by one labeler
        # the samples the quality thresholds drop: recorded as filtered, never decoded nor labelled
        self.rejected = rejected(self.layout, shard, quality) if quality else {}
        # the committed shards of other modalities a labeler reads beside the image, streamed in the rgb key order
        # (name -> modality -> reader), and each waiting sample's stored labels (name -> key -> modality -> bytes)
        self.read = {name: {m: self.label_reader(name, m) for m in self.reads_of(name)} for name in labelers}
        self.scores = {name: self.quality_scores() for name in labelers if registry.get(name).labeler.reads_quality}
        self.read_ahead: dict[str, dict[str, dict]] = {name: {} for name in labelers}
        self.started = time.time()
        self.records: dict[str, list[dict]] = {name: [] for name in labelers}
        self.clock = {name: Counter() for name in labelers}  # seconds, waited, batches, images
        self.decode_wait = 0.0
        # a sample's (encoded bytes, error) per labeler, filled when its label is encoded; its writer waits on it
        self.slots: dict[str, dict[str, Future]] = {name: {} for name in labelers}
        self.writes: list[Future] = []

    def run(self) -> dict[str, dict]:
        with ExitStack() as stack:
            for readers in self.read.values():
                for reader in readers.values():
                    stack.callback(reader.close)
            self.writers = {name: stack.enter_context(ShardWriter(self.layout, stage_name(name), self.shard, [name]))
                            for name in self.labelers}
            self.pool = stack.enter_context(ThreadPoolExecutor(self.cfg.decode_threads))
            self.write_queues = {name: stack.enter_context(ThreadPoolExecutor(1)) for name in self.labelers}
            try:
                for done in run_overlapped(self.batches()):
                    self.hand_over(done)
            finally:  # on an error, release the writer threads waiting for labels that will never come
                self.release_waiting()
            for job in self.writes:
                job.result()  # surfaces a write error here, before anything is committed
            return self.commit()

    # read and decode ------------------------------------------------------------------------------------------
    def decoded_chunks(self) -> Iterator[list[tuple[str, np.ndarray | None, tuple[str, str] | None]]]:
        """(key, image, fate) per sample, a chunk at a time, the fate (status, error) of a sample that is not
        labelled (filtered, or not decodable); the next chunk decodes while this one runs."""
        chunks = _chunks(read_rgb(self.layout.tar(registry.photo().folder, self.shard)), self.cfg.chunk_size)

        def start(chunk):
            return None if chunk is None else [self.pool.submit(self.decode, item) for item in chunk]

        pending = start(next(chunks, None))
        while pending is not None:
            t = time.perf_counter()
            decoded = [f.result() for f in pending]
            self.decode_wait += time.perf_counter() - t
            pending = start(next(chunks, None))
            yield decoded

    def decode(self, item):
        key, data = item
        if key in self.rejected:
            return key, None, (FILTERED, self.rejected[key][1])
        try:
            return key, decode_rgb(data), None
        except Exception as err:  # noqa: BLE001 - recorded as this sample's fate
            return key, None, ("decode_error", f"cannot decode {key}.jpg: {err}")

    def reads_of(self, name: str) -> list[str]:
        """The modalities a labeler reads: those it must, and those it reads where they are committed."""
        labeling, known = registry.get(name).labeler, set(registry.loaded().names())
        return [*labeling.reads, *(m for m in labeling.reads_if_present  # a modality not imported has no labels
                                   if m in known and self.layout.is_committed(registry.get(m).stage, self.shard))]

    def quality_scores(self) -> dict[str, dict]:
        """key -> the scores the quality stage gave this shard's samples ({} where it is not scored)."""
        if not self.layout.is_committed(QUALITY, self.shard):
            return {}
        table = read_parquet(self.layout.table(QUALITY, self.shard), ["key", "aesthetic", "watermark"]).to_pylist()
        return {row.pop("key"): row for row in table}

    def label_reader(self, name: str, modality: str) -> "KeyOrderedMembers":
        """The committed shard of a modality the labeler `name` reads."""
        source = registry.get(modality)
        if not self.layout.is_committed(source.stage, self.shard):
            raise LabelInputError(f"{name} reads {modality} labels, not committed for {self.shard} (label "
                                  f"{modality} first, or in the same run)")
        return KeyOrderedMembers(self.layout.tar(source.folder, self.shard))

    def read_labels(self, key: str) -> None:
        """The stored labels each reading labeler needs for `key`, read as the keys come in rgb order."""
        for name, readers in self.read.items():
            if readers:
                self.read_ahead[name][key] = {m: reader.get(key) for m, reader in readers.items()}

    def with_labels(self, name: str, key: str, image: np.ndarray):
        """What a labeler gets for one sample: the image, or (a labeler that reads other labels) the image and
        each of those labels decoded (None where that labeler failed on the sample)."""
        if not self.read[name] and name not in self.scores:
            return image
        stored = self.read_ahead[name].pop(key, {})
        return {"image": image, **{m: None if data is None else registry.get(m).decode(data)
                                   for m, data in stored.items()},
                **({"quality": self.scores[name].get(key)} if name in self.scores else {})}

    # batch ----------------------------------------------------------------------------------------------------
    def batches(self):
        """(labeler, (name, keys), images) for every batch of every labeler, in the order they fill up."""
        buckets = {name: SizeBuckets(labeler.input_size, labeler.batch_size, self.cfg.batch_window)
                   for name, labeler in self.labelers.items()}
        for decoded in self.decoded_chunks():
            for key, image, fate in decoded:
                self.expect(key, None if fate else image.shape[:2], fate)
                if fate is None:
                    self.read_labels(key)
                    for name, labeler in self.labelers.items():
                        for batch in buckets[name].add(key, image):
                            yield labeler, (name, [k for k, _ in batch]), [self.with_labels(name, *b) for b in batch]
        for name, labeler in self.labelers.items():
            for batch in buckets[name].flush():
                yield labeler, (name, [k for k, _ in batch]), [self.with_labels(name, *b) for b in batch]

    def expect(self, key: str, shape, fate: tuple[str, str] | None) -> None:
        """Queue the sample's write in every labeler's writer, in key order; it waits for the sample's label."""
        for name in self.labelers:
            slot = None if fate else self.slots[name].setdefault(key, Future())
            self.writes.append(self.write_queues[name].submit(self.write, name, key, shape, fate, slot))

    # run and encode -------------------------------------------------------------------------------------------
    def hand_over(self, done) -> None:
        """A finished batch's labels (or, for a failed batch, each image's own attempt) to the encoders."""
        name, keys = done.tag
        results = ([(label, None) for label in done.labels] if done.error is None
                   else _one_by_one(done.labeler, done.images))
        self.clock[name].update(seconds=done.seconds, waited=done.waited, batches=1, images=len(keys))
        for key, (label, err) in zip(keys, results):
            self.pool.submit(self.encode, self.slots[name].pop(key), name, label, err)

    @staticmethod
    def encode(slot: Future, name: str, label, err: str | None) -> None:
        data = None
        if err is None:
            try:
                data = registry.get(name).encode(label)
            except Exception as enc_err:  # noqa: BLE001
                err = f"cannot encode the {name} label: {enc_err}"
        slot.set_result((data, err))

    def release_waiting(self) -> None:
        for per_key in self.slots.values():
            for slot in per_key.values():
                if not slot.done():
                    slot.set_exception(RuntimeError(f"{self.shard}: labelling stopped before this sample"))

    # write and commit -----------------------------------------------------------------------------------------
    def write(self, name: str, key: str, shape, fate: tuple[str, str] | None, slot: Future | None) -> None:
        self.samples.advance()
        if fate:
            self.records[name].append({"key": key, "status": fate[0], "error": fate[1]})
            return
        data, err = slot.result()
        if err:
            self.records[name].append({"key": key, "status": "model_error", "error": err})
        else:
            self.writers[name].write(key, {name: (registry.get(name).extension, data)})
            self.records[name].append({"key": key, "status": OK, "height": shape[0], "width": shape[1]})

    def commit(self) -> dict[str, dict]:
        all_stats = {}
        for name, writer in self.writers.items():
            records, c = self.records[name], self.clock[name]
            counts = Counter(r["status"] for r in records)
            model = getattr(self.labelers[name], "provenance", None)
            stats = {"rows": len(records), "ok": counts.get(OK, 0), "status_counts": dict(sorted(counts.items())),
                     "seconds": round(time.time() - self.started, 3), "model_seconds": round(c["seconds"], 3),
                     "images_per_s": round(len(records) / c["seconds"], 2) if c["seconds"] else None,
                     "batches": c["batches"],
                     "images_per_batch": round(c["images"] / c["batches"], 2) if c["batches"] else None,
                     "device_wait_seconds": round(c["waited"], 3), "decode_wait_seconds": round(self.decode_wait, 3),
                     "started_at": self.started, "finished_at": time.time(),
                     "provenance": provenance(self.cfg, {name: model} if model else None),
                     **({"filtered_by": dict(Counter(rule for rule, _ in self.rejected.values()))}
                        if self.rejected else {})}
            stats = writer.commit(pa.Table.from_pylist(records, schema=STATUS_SCHEMA), stats)
            all_stats[name] = stats
        return all_stats


class KeyOrderedMembers:
    """One label shard's members, streamed: asked for keys in the rgb shard's order (increasing, as the download
    stage writes them), it returns each key's bytes, or None for a key the labeler failed on (absent)."""

    def __init__(self, path: Path):
        self.tar = open_tar(path)
        self.members = (m for m in self.tar if m.isfile())
        self.next = next(self.members, None)

    def get(self, key: str) -> bytes | None:
        while self.next is not None and self.next.name.rsplit(".", 1)[0] < key:
            self.next = next(self.members, None)  # a key the rgb shard no longer asks for
        if self.next is None or self.next.name.rsplit(".", 1)[0] != key:
            return None
        data = self.tar.extractfile(self.next).read()
        self.next = next(self.members, None)
        return data

    def close(self) -> None:
        self.tar.close()


def waves(names: list[str]) -> list[list[str]]:
    """The labelers in passes: one that reads another's labels runs in a pass after that one's."""
    left, done, out = list(names), set(), []
    while left:
        ready = [n for n in left if not set(registry.get(n).labeler.reads + registry.get(n).labeler.reads_if_present)
                 & (set(left) - {n})]
        if not ready:
            raise LabelInputError(f"labelers {left} read each other's labels in a circle")
        out.append(ready)
        done |= set(ready)
        left = [n for n in left if n not in done]
    return out


def label_shard(root: str, shard: str, labelers: dict, cfg: LabelConfig, quality: QualityConfig | None = None,
                progress: ProgressChannel | None = None) -> dict[str, dict]:
    """Label one rgb shard with every labeler given (name -> Labeler), but the samples `quality`'s thresholds drop,
    telling `progress` how far it is; returns each labeler's committed stats. A labeler that reads other labels
    (4M-21's metadata) runs in a second pass, once those are committed."""
    stats = {}
    samples = counter(progress, shard, lambda: photos_in(DatasetLayout(root), shard), len(labelers))
    for wave in waves(list(labelers)):
        stats.update(ShardLabelling(root, shard, {n: labelers[n] for n in wave}, cfg, quality, samples).run())
    samples.finish()
    return stats


def merge_stats(per_labeler: dict[str, dict]) -> dict:
    """One shard's stats across labelers, for progress displays: a sample is ok when every labeler is.

    The wait shares say which side bounded the shard: of its seconds, how many the worker spent waiting for
    the device (the models) and for decoding (None for shards committed before these were recorded).
    """
    first = next(iter(per_labeler.values()))
    counts = Counter()
    for name, stats in per_labeler.items():
        counts.update({(k if k == OK else f"{name}:{k}"): v for k, v in stats["status_counts"].items()})
    seconds = max(s["seconds"] for s in per_labeler.values())

    def share(total):
        return round(total / seconds, 3) if seconds and total is not None else None

    recorded = all("device_wait_seconds" in s for s in per_labeler.values())
    return {"rows": first["rows"], "ok": min(s["ok"] for s in per_labeler.values()), "status_counts": dict(counts),
            "node": first.get("node"), "worker": first.get("worker"),
            # the quality thresholds drop the same samples for every labeler: filtered, not failed
            **({"filtered_by": first["filtered_by"]} if "filtered_by" in first else {}),
            "seconds": seconds, "images_per_s": round(first["rows"] / seconds, 2) if seconds else None,
            "device_wait_share": share(sum(s["device_wait_seconds"] for s in per_labeler.values()) if recorded else None),
            "decode_wait_share": share(first.get("decode_wait_seconds")),
            "images_per_batch": ", ".join(f"{n} {s['images_per_batch']}" for n, s in per_labeler.items()
                                          if s.get("images_per_batch")) or None,
            "random_weights": [n for n, s in per_labeler.items()
                               if any(m.get("random_weights") for m in s.get("provenance", {}).get("models", {}).values())],
            "labelers": per_labeler}


# -- all shards --------------------------------------------------------------------------------------
class LabelWorker:
    """A Ray actor: one replica of every requested labeler, loaded once, labelling shard after shard."""

    def __init__(self, root: str, cfg: LabelConfig, names: list[str], quality: QualityConfig | None = None):
        # `cfg` arrives with the run's modality set, which imported the modules defining its modalities
        self.root, self.cfg, self.quality = root, cfg, quality
        self.labelers = {}
        for name in names:
            labeling = registry.get(name).labeler
            self.labelers[name] = labeling.load(cfg.models.get(name), cfg.device, cfg.batch_size_of(name),
                                                **cfg.options_of(name))

    def label(self, shard: str, names: list[str], progress: ProgressChannel | None = None) -> dict:
        return label_shard(self.root, shard, {n: self.labelers[n] for n in names}, self.cfg, self.quality, progress)


# A model that failed on a sample (out of memory on a large photo, a device error) may not fail the next time; a
# photo that does not decode, or a threshold that drops it, will: `label --retry-failed` redoes only these.
RETRYABLE = ("model_error",)


def built_on(name: str, modalities: registry.ModalitySet) -> list[str]:
    """The stages a labeler's shard feeds, latest first, then its own: the labelers that read its labels (and what
    feeds on those), its tokens, the alignment of the loader folders."""
    readers = [m.name for m in modalities.labelled()
               if name in (*m.labeler.reads, *m.labeler.reads_if_present)]
    later = [stage for reader in readers for stage in built_on(reader, modalities)]
    return list(dict.fromkeys([ALIGN_STAGE, registry.get(name).tokenize_stage, *later, stage_name(name)]))


def withdraw_retryable(layout: DatasetLayout, shards: list[str], names: list[str],
                       modalities: registry.ModalitySet) -> dict[str, list[str]]:
    """Withdraw the commit of every labeler's shard holding a sample that failed for a reason that may pass
    (`RETRYABLE`), and first that of each stage built on it, so that this run redoes them (a stop in between costs
    work, never a stale commit); returns shard -> the labelers withdrawn."""
    withdrawn: dict[str, list[str]] = {}
    for shard in shards:
        for name in names:
            if not layout.is_committed(stage_name(name), shard):
                continue
            counts = layout.read_stats(stage_name(name), shard)["status_counts"]
            if not any(counts.get(status) for status in RETRYABLE):
                continue
            layout.withdraw(built_on(name, modalities), shard)
            withdrawn.setdefault(shard, []).append(name)
    return withdrawn


def photos_in(layout: DatasetLayout, shard: str) -> int:
    """How many photos a committed download shard holds, as its stats say (0: not recorded)."""
    return layout.read_stats(DOWNLOAD_STAGE, shard).get("ok", 0)


def input_shards(layout: DatasetLayout) -> list[str]:
    photo = registry.photo().folder
    shards = layout.committed_shards(DOWNLOAD_STAGE)
    if not shards:
        raise LabelInputError(f"no committed {photo} shards under {layout.root} (run the download stage first)")
    missing = [str(layout.tar(photo, s)) for s in shards if not layout.tar(photo, s).exists()]
    if missing:
        raise LabelInputError(f"{photo} shards committed by the download stage are missing: {', '.join(missing[:5])}")
    return shards


def check_all_weights(models: dict[str, str]) -> None:
    """Before any work: every labeler's weights reachable, or one error naming each that is not."""
    problems = []
    for name, path in models.items():
        try:
            check_weights(name, path)
        except WeightsUnavailable as err:
            problems.append(str(err))
    if problems:
        raise WeightsUnavailable("labeler weights not available (nothing was labelled):\n  " + "\n  ".join(problems))


def run_label(root: str | Path, config: Config, labelers: list[str] | None = None,
              observer: ShardObserver | None = None, retry_failed: bool = False) -> ShardsSummary:
    """Label every rgb shard with every requested labeler not yet committed for it; `retry_failed`: redo too the
    committed shards of a labeler that failed on some sample for a reason that may pass (`withdraw_retryable`)."""
    cfg = config.label
    names = labelers or cfg.labelers
    layout = DatasetLayout(root)
    layout.record_modalities(config.modalities)
    shards = input_shards(layout)
    labelings = {n: registry.get(n).labeler for n in names}
    missing_models = [n for n, lab in labelings.items() if lab.weights_used(cfg) and lab.weights and n not in cfg.models]
    if missing_models:
        raise LabelInputError(f"no model configured for {missing_models} (label.models)")
    for name, labeling in labelings.items():
        try:
            if labeling.check:
                labeling.check(cfg)
        except ImportError as err:
            raise LabelInputError(f"{name}: {err}") from None

    # Local files become absolute paths: Ray actors do not share the driver's working directory.
    def local(path):
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    cfg = cfg.model_copy(update={"models": {n: local(p) for n, p in cfg.models.items()},
                                 "det_detectron2_config": local(cfg.det_detectron2_config),
                                 "det_detectron2_weights": local(cfg.det_detectron2_weights)})
    if retry_failed:
        withdraw_retryable(layout, shards, names, config.modality_set)
    needed = [n for n in names if any(not layout.is_committed(stage_name(n), shard) for shard in shards)]
    check_all_weights({n: cfg.models[n] for n in needed
                       if labelings[n].weights_used(cfg) and labelings[n].weights and n in cfg.models})
    try:
        check_scored(layout, [s for s in shards if any(not layout.is_committed(stage_name(n), s) for n in names)],
                     config.quality)
    except QualityFilterError as err:
        raise LabelInputError(str(err)) from None
    summary = ShardsSummary(shards_total=len(shards), status_counts={n: Counter() for n in names})
    if observer:
        observer.start(len(shards))

    todo = skip_or_queue(layout, shards, names, stage_name, summary, observer, lambda _, stats: merge_stats(stats))

    started = time.time()
    if todo:
        init_ray(config.ray)
        worker_args = (absolute(layout.root), cfg, names, config.quality)
        for shard, stats, error in run_on_actors(LabelWorker, worker_args, todo,
                                                 "label", device=cfg.device, workers=cfg.workers,
                                                 cpus_per_worker=cfg.cpus_per_worker, observer=observer):
            if error:
                summary.fail(shard, error, observer)
                continue
            summary.shards_done += 1
            for n, s in stats.items():
                summary.status_counts[n].update(s["status_counts"])
            if observer:
                observer(shard, merge_stats(stats), False)
    summary.seconds = time.time() - started
    return summary
