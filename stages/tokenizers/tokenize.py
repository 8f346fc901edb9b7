"""Pre-tokenization: every sample's crops, encoded once by every trained dense tokenizer.

Consumes  <root>/rgb/ and the label folders (committed shards), <root>/tokenizers/<modality>/ (trained)
Produces  <root>/crop_settings/shard-NNNNNN.tar    <key>.npy  int32 (n_crops, 5) = [top, left, h, w, hflip]
                                                   in rgb pixels; crop 0 the center crop, the others
                                                   random-resized crops shared by every modality
          <root>/crops_rgb@224/shard-NNNNNN.tar      <key>.npz  entry "i": crop i of the photo at 224x224 as a
                                                   JPEG (quality 95, 4:4:4, unmirrored), so the 4M loader decodes
                                                   224 pixels, not the whole photo (with crop_settings, unless
                                                   tokenizer.store_crops is off)
          <root>/tok_<modality>@224/shard-NNNNNN.tar  <key>.npy  int16 (n_crops, 196) token ids; a modality may
                                                   store its own member (`token_member`: SAM instances' records
                                                   per crop, poses' JSON with their ids, in tok_<modality>/)
          <root>/_status/tokenize_<modality>/shard-NNNNNN.{parquet,json}  one row per rgb sample; json last
          (crop_settings: _status/crop_settings/)
Captions and boxes stay text in caption/ and det/ (tokenized when loaded, with tokenizers/text).
A feature map (CLIP) whose tokenizer is a converted published one is computed on each crop by its labeler
(`label.models`), as the reference's tokenizers saw it; a tokenizer trained here reads crops of the stored map,
as it was trained.

A sample's crops depend only on (seed, key) and its image size, so a redone shard gets the same crops. A
sample whose image or label cannot be read is recorded (`decode_error`, `missing_label`), one the quality filters
drop as `filtered`, with why. Once a shard's tokens are written, the worker aligns it (`stages/dataset/align.py`):
a sample missing from any loader folder is dropped from all of them, with its reason in _status/align/, so a
position-by-position loader never diverges. One Ray actor
per GPU (or CPU slot) holds every tokenizer; shards are the unit of resume.
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from core import registry
from core.config import Config, QualityConfig, TokenizerStageConfig
from core.files import npy_bytes
from core.ray_runtime import init_ray
from core.storage import MODEL_FILES, absolute, local_copy
from models.weights import file_sha256
from stages.actor_pool import run_on_actors
from stages.dataset.align import STAGE as ALIGN_STAGE
from stages.dataset.align import AlignError, align_dataset, align_shard
from stages.dataset.provenance import provenance
from stages.dataset.shards import (
    CROP_PIXELS,
    CROPS,
    OK,
    DatasetLayout,
    ShardObserver,
    ShardsSummary,
    ShardWriter,
    skip_or_queue,
)
from stages.progress import ProgressChannel, SampleCounter, counter
from stages.quality.filters import FILTERED, rejected
from stages.tokenizers import dataset_tokenizers as tokenizers
from stages.tokenizers.tokenizer_data import (
    RgbIndex,
    center_crop,
    crop_jpegs,
    decode,
    photo_crop,
    random_crop,
    read_members,
    rgb_index,
)
from stages.tokenizers.train_tokenizer import TokenizerInputError, is_trained, quality_filters, tokenizer_dir

ALIGN = "align"  # the key of a shard's alignment in the worker's result


def token_folder(modality: str) -> str:
    return registry.get(modality).token_folder


def stage_name(modality: str) -> str:
    return CROPS if modality == CROPS else registry.get(modality).tokenize_stage


def sample_crops(key: str, size: tuple[int, int], cfg: TokenizerStageConfig) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, int(key)])
    crops = [center_crop(*size)] + [random_crop(rng, *size, scale=cfg.crop_scale) for _ in range(cfg.n_crops - 1)]
    return np.asarray(crops, dtype=np.int32)


STATUS_SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("error", pa.string())])


# -- one shard ---------------------------------------------------------------------------------------
def write_crops(layout: DatasetLayout, shard: str, cfg: TokenizerStageConfig, index: RgbIndex,
                filtered: dict[str, tuple[str, str]] | None = None, samples: SampleCounter | None = None) -> dict:
    """Each sample's crop settings, and the photo cut to each crop at 224 (`CROP_PIXELS`) for the 4M loader;
    none for the samples the quality filters drop (`filtered`: key -> (setting, why)). `samples` counts them."""
    filtered, samples = filtered or {}, samples or counter(None, shard, 0)
    rows, started = [], time.time()
    sizes = index.sizes
    photo = registry.photo()
    photos = read_members(layout.tar(photo.folder, shard), photo.extension)
    with ShardWriter(layout, CROPS, shard, [CROPS, CROP_PIXELS] if cfg.store_crops else [CROPS]) as writer:
        for key, data in photos:
            samples.advance()
            if key in filtered:
                rows.append({"key": key, "status": FILTERED, "error": filtered[key][1]})
                continue
            settings = sample_crops(key, sizes[key], cfg) if key in sizes else None
            members = {CROPS: ("npy", npy_bytes(settings))} if settings is not None else None
            if members and cfg.store_crops:
                pixels = crop_jpegs(data, settings)
                members = {**members, CROP_PIXELS: ("npz", pixels)} if pixels is not None else None
            if members:
                writer.write(key, members)
            rows.append({"key": key, "status": OK if members else "decode_error",
                         "error": None if members else "rgb image unreadable"})
        table = pa.Table.from_pylist(rows, schema=STATUS_SCHEMA)
        counts = Counter(r["status"] for r in rows)
        stats = {"rows": len(rows), "ok": counts[OK], "status_counts": dict(counts),
                 "seconds": round(time.time() - started, 3), "provenance": provenance(cfg)}
        stats = writer.commit(table, stats)
    return stats


def tokenize_shard(layout: DatasetLayout, shard: str, modality: str, model, cfg: TokenizerStageConfig,
                   device: torch.device, index: RgbIndex | None = None, model_record: dict | None = None,
                   crop_labeler=None, filtered: dict[str, tuple[str, str]] | None = None,
                   samples: SampleCounter | None = None) -> dict:
    """Encode every crop of every sample of one shard with one tokenizer, and commit the token shard.

    `model_record` (source, weights_sha256) goes into the shard's provenance. `crop_labeler`: the modality's
    labeler, run on each crop of the photo to make the tokenizer's input (instead of cropping the stored label).
    `filtered`: the samples the quality filters drop (key -> (setting, why)), recorded as such, not encoded.
    `samples` counts the samples encoded."""
    started, filtered, samples = time.time(), filtered or {}, samples or counter(None, shard, 0)
    index = index or rgb_index(layout, shard)
    keys, sizes = index.keys, index.sizes
    entry = registry.get(modality)
    spec = registry.photo() if crop_labeler else entry
    source = spec.folder
    labels = dict(read_members(layout.tar(source, shard), spec.extension))
    status: dict[str, tuple[str, str | None]] = {}
    pending: list[tuple[str, torch.Tensor, object]] = []  # (key, its crops' inputs as one batch, their layout)
    tokens: dict[str, tuple[str, bytes]] = {}  # key -> its token member (extension, bytes)
    counted = {"tokens": 0}

    def flush():
        if not pending:
            return
        if crop_labeler:  # every pending crop through the labeler at once: (D, h, w) feature maps, (D, 1, 1) vectors
            features = crop_labeler([im for _, crops, _ in pending for im in crops])
            batch = torch.stack([entry.features_tensor(f) for f in features]).to(device)
        else:
            batch = torch.cat([x for _, x, _ in pending]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ids = model.encode(batch).cpu().numpy() if len(batch) else np.zeros((0, 0), np.int64)
        start = 0
        for key, x, layout in pending:
            tokens[key] = entry.token_member(ids[start:start + len(x)], layout)
            counted["tokens"] += ids[start:start + len(x)].size
            start += len(x)
        pending.clear()

    def prepare(key):  # decode and crop one sample: OpenCV and torch release the GIL, so threads overlap
        if key in filtered:
            return key, None, (FILTERED, filtered[key][1])
        if key not in sizes:
            return key, None, ("decode_error", "rgb image header unreadable")
        if key not in labels:
            return key, None, ("missing_label", f"no {modality} label in {layout.tar(source, shard).name}")
        try:
            settings = sample_crops(key, sizes[key], cfg)
            if crop_labeler:
                image = spec.decode(labels.pop(key))
                return key, ([photo_crop(image, c) for c in settings], None), (OK, None)
            label = decode(modality, labels.pop(key))
            return key, entry.crops_input(label, settings, sizes[key]), (OK, None)
        except Exception as err:  # noqa: BLE001 - one unreadable label costs one sample
            return key, None, ("decode_error", f"{type(err).__name__}: {err}")

    per_batch = max(1, cfg.tokenize_batch_size // cfg.n_crops)
    chunks = [keys[i:i + per_batch] for i in range(0, len(keys), per_batch)]
    with ThreadPoolExecutor(cfg.decode_threads) as pool:
        ahead = [pool.submit(prepare, k) for k in chunks[0]] if chunks else []
        for i in range(len(chunks)):  # the next chunk is decoded while this one is encoded
            current = ahead
            ahead = [pool.submit(prepare, k) for k in chunks[i + 1]] if i + 1 < len(chunks) else []
            for future in current:
                key, crops, fate = future.result()
                status[key] = fate
                if crops is not None:
                    pending.append((key, *crops))
            flush()
            samples.advance(len(chunks[i]))
    flush()
    folder = token_folder(modality)
    with ShardWriter(layout, stage_name(modality), shard, [folder]) as writer:
        for key in keys:
            if key in tokens:
                writer.write(key, {folder: tokens[key]})
        rows = [{"key": k, "status": status[k][0], "error": status[k][1]} for k in keys]
        counts = Counter(r["status"] for r in rows)
        seconds = time.time() - started
        stats = {"rows": len(rows), "ok": counts[OK], "status_counts": dict(counts), "seconds": round(seconds, 3),
                 "tokens": int(counted["tokens"]),
                 "samples_per_s": round(counts[OK] / seconds, 2) if seconds else None,
                 "provenance": provenance(cfg, {modality: model_record} if model_record else None)}
        stats = writer.commit(pa.Table.from_pylist(rows, schema=STATUS_SCHEMA), stats)
    return stats


# -- all shards --------------------------------------------------------------------------------------
class TokenizeWorker:
    """A Ray actor: every trained tokenizer, loaded once, encoding shard after shard."""

    def __init__(self, root: str, cfg: TokenizerStageConfig, modalities: list[str],
                 crop_labelers: dict[str, tuple[str, dict]] | None = None, quality: QualityConfig | None = None):
        # `cfg` arrives with the run's modality set, which imported the modules defining its modalities
        self.layout, self.cfg, self.quality = DatasetLayout(root), cfg, quality
        self.device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
        # a cached copy of each model where the root is remote (its files only, not its training run's)
        local = {m: local_copy(tokenizer_dir(root, m), MODEL_FILES) for m in modalities}
        self.models = {m: tokenizers.load_folder(local[m], m, self.device) for m in modalities}
        self.records = {m: {"source": str(tokenizer_dir(root, m)),
                            "weights_sha256": file_sha256(local[m] / "model.safetensors")}
                        for m in modalities}
        self.crop_labelers = {m: registry.get(m).labeler.load(path, self.device.type, cfg.tokenize_batch_size,
                                                              **options)
                              for m, (path, options) in (crop_labelers or {}).items()}
        for m, labeler in self.crop_labelers.items():
            self.records[m]["features_per_crop"] = getattr(labeler, "provenance", None)

    def tokenize(self, shard: str, modalities: list[str], progress: ProgressChannel | None = None) -> dict:
        index, out = rgb_index(self.layout, shard), {}  # read once for the crops and every tokenizer
        filtered = rejected(self.layout, shard, self.quality) if self.quality else {}
        crops = not self.layout.is_committed(CROPS, shard)
        samples = counter(progress, shard, len(index.keys), len(modalities) + crops)  # a step per pass per sample
        if crops:
            out[CROPS] = write_crops(self.layout, shard, self.cfg, index, filtered, samples)
        for m in modalities:
            out[m] = tokenize_shard(self.layout, shard, m, self.models[m], self.cfg, self.device, index,
                                    self.records[m], self.crop_labelers.get(m), filtered, samples)
        samples.finish()
        try:  # the shard's folders now complete: drop what failed anywhere from all of them
            out[ALIGN] = align_shard(self.layout, shard)
        except AlignError as err:
            out[ALIGN] = str(err)
        return out


@dataclass
class TokenizeSummary(ShardsSummary):
    tokens: int = 0
    dropped: int = 0  # samples dropped from every folder so that all folders align (all shards, every run)
    unaligned: dict[str, str] = field(default_factory=dict)  # shard -> why it could not be aligned yet


def tokenized_modalities(root: str | Path, cfg: TokenizerStageConfig) -> list[str]:
    """The tokenized modalities asked for whose tokenizer is trained."""
    dense = {m.name for m in cfg.modality_set.tokenized()}
    return [m for m in cfg.modalities if m in dense and is_trained(root, m)]


def per_crop_labelers(root: str | Path, config: Config, names: list[str]) -> dict[str, tuple[str, dict]]:
    """modality -> (its labeler's model, options) for each feature map whose tokenizer is a converted published
    one: the reference's tokenizers read features computed on each crop. Checked before any work."""
    from models.labelers import check_weights

    out = {}
    for m in names:
        spec = registry.get(m)
        if not (spec.labelled_per_crop and spec.labeler is not None and tokenizers.is_converted(root, m)):
            continue
        path = config.label.models.get(m, spec.labeler.weights)
        if spec.labeler.weights and not path:
            raise TokenizerInputError(f"{m}: its published tokenizer reads {m} features computed on each crop, "
                                      f"but label.models names no model for {m}")
        if path and Path(path).exists():
            path = str(Path(path).resolve())  # Ray actors do not share the driver's working directory
        if spec.labeler.weights:
            check_weights(m, path)
        out[m] = (path, {**config.label.options_of(m), **spec.per_crop_options})
    return out


def run_tokenize(root: str | Path, config: Config, modalities: list[str] | None = None,
                 observer: ShardObserver | None = None) -> TokenizeSummary:
    """Tokenize every rgb shard with every trained tokenizer not yet committed for it."""
    cfg, layout = config.tokenizer, DatasetLayout(root)
    layout.record_modalities(config.modalities)
    names = modalities or tokenized_modalities(root, cfg)
    untrained = [m for m in names if not is_trained(root, m)]
    if not names or untrained:
        raise TokenizerInputError(f"no trained tokenizer for {untrained or 'any dense modality'} under "
                                  f"{tokenizer_dir(root, '*')} (run train-tokenizer first)")
    shards = layout.committed_shards(registry.photo().stage)
    if not shards:
        raise TokenizerInputError(f"no committed {registry.photo().folder} shards under {layout.root} (run the download stage first)")
    summary = TokenizeSummary(shards_total=len(shards), status_counts={m: Counter() for m in names})
    if observer:
        observer.start(len(shards))
    for shard in shards:
        pending = [m for m in names if not layout.is_committed(stage_name(m), shard)]
        missing = [m for m in pending if not registry.get(m).downloaded
                   and not layout.is_committed(registry.get(m).stage, shard)]
        if missing:
            summary.fail(shard, f"labels not committed for {missing} (run the label stage first)", observer)
    crop_labelers = per_crop_labelers(root, config, names)
    quality = quality_filters(layout, shards, config.quality)  # the samples its thresholds drop: not tokenized
    ready = [s for s in shards if s not in summary.failed_shards]
    todo = skip_or_queue(layout, ready, names, stage_name, summary, observer,
                         lambda shard, _: _merged(layout, shard, names))
    started = time.time()
    if todo:
        init_ray(config.ray)
        worker_args = (absolute(layout.root), cfg, names, crop_labelers, quality)
        for shard, stats, error in run_on_actors(TokenizeWorker, worker_args, todo, "tokenize", device=cfg.device,
                                                 workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker,
                                                 observer=observer):
            if error:
                summary.fail(shard, error, observer)
                continue
            summary.shards_done += 1
            for m in names:
                if m in stats:
                    summary.status_counts[m].update(stats[m]["status_counts"])
                    summary.tokens += stats[m]["tokens"]
            if observer:
                observer(shard, _merged(layout, shard, names), False)
    # Shards tokenized earlier whose folders changed since (a labeler rerun, a new folder): align them too.
    for shard, result in align_dataset(root, [s for s in shards if s not in summary.failed_shards]).items():
        if isinstance(result, str):
            summary.unaligned[shard] = result
    for shard in layout.committed_shards(ALIGN_STAGE):
        summary.dropped += layout.read_stats(ALIGN_STAGE, shard)["status_counts"].get("dropped", 0)
    summary.seconds = time.time() - started
    return summary


def _merged(layout: DatasetLayout, shard: str, names: list[str]) -> dict:
    """One line of progress for a shard across its tokenizers."""
    per = {m: layout.read_stats(stage_name(m), shard) for m in names}
    seconds = sum(s["seconds"] for s in per.values())
    rows = next(iter(per.values()))["rows"]
    return {"rows": rows, "ok": min(s["ok"] for s in per.values()), "seconds": seconds,
            "node": next(iter(per.values())).get("node"),
            "tokens": sum(s["tokens"] for s in per.values()),
            "status_counts": dict(sum((Counter({f"{m}:{k}" if k != OK else k: v for k, v in s["status_counts"].items()})
                                       for m, s in per.items()), Counter())),
            "images_per_s": round(rows / seconds, 2) if seconds else None}
