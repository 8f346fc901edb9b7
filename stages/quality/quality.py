"""The quality stage: each downloaded sample scored before any labeller spends a GPU on it.

Consumes  <root>/rgb/shard-NNNNNN.tar and <root>/caption/shard-NNNNNN.tar, the shards the download stage committed.
Produces  <root>/quality/shard-NNNNNN.parquet  one row per decodable photo, in the rgb shard's order:
              key        the sample's key
              clip_score cosine of the CLIP image and caption embeddings (null without a caption)
              aesthetic  the LAION aesthetic predictor's score, about 1..10 (null where none is configured)
              watermark  the LAION-5B detector's watermark probability, 0..1 (null where none is configured)
              embedding  the L2-normalised CLIP image embedding, float16 (for near-duplicate groups)
          <root>/_status/quality/shard-NNNNNN.{parquet,json}  every photo's fate (ok, or failed and why); commit marker
          <root>/quality/near_duplicates.parquet  once every shard is scored: each sample's most similar earlier
              sample where their cosine is at least 0.8 (stages/quality/dedup.py)
Scores only: which samples later stages keep is decided from them by the thresholds (quality.min_clip_score, ...),
so a threshold changed needs no recomputation.

One Ray actor per GPU (or per CPU slot) holds the networks (models/quality.py), loaded once; it scores shard after
shard in batches of quality.batch_size images. A shard is committed by its stats JSON and skipped on a rerun.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from core import registry
from core.config import Config, QualityConfig
from core.ray_runtime import init_ray
from core.storage import absolute
from stages.actor_pool import run_on_actors
from stages.dataset.shards import OK, DatasetLayout, ShardObserver, ShardsSummary, ShardWriter, skip_or_queue
from stages.label.label import decode_rgb, input_shards, photos_in
from stages.progress import ProgressChannel, counter
from stages.quality.dedup import covered_shards, find_near_duplicates
from stages.tokenizers.tokenizer_data import read_members

STAGE = FOLDER = "quality"
STATUS_SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("error", pa.string())])


@dataclass
class QualitySummary(ShardsSummary):
    near_duplicate_pairs: int | None = None  # where this run compared every shard: pairs at cosine >= dedup.FLOOR


class QualityInputError(ValueError):
    """The stage cannot start: its input or its models are not there; the message names which and where."""


def scores_schema(dim: int) -> pa.Schema:
    return pa.schema([("key", pa.string()), ("clip_score", pa.float32()), ("aesthetic", pa.float32()),
                      ("watermark", pa.float32()), ("embedding", pa.list_(pa.float16(), dim))])


# -- the networks -------------------------------------------------------------------------------------------------
class QualityScorer:
    """CLIP, and the aesthetic and watermark networks where configured, on one device."""

    def __init__(self, cfg: QualityConfig):
        import torch
        from torchvision import transforms

        from models.quality import AESTHETIC, IMAGENET_MEAN, IMAGENET_STD, WATERMARK, load_clip, load_quality_model

        self.device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        self.clip, self.preprocess, self.tokenizer = load_clip(cfg.clip_model, cfg.clip_pretrained, self.device)
        self.aesthetic = self.watermark = None
        self.aesthetic_clip = self.aesthetic_preprocess = None
        if cfg.aesthetic_model:
            self.aesthetic, config = load_quality_model(cfg.aesthetic_model, AESTHETIC, "quality.aesthetic_model",
                                                        self.device)
            if (config["clip_model"], config["clip_pretrained"]) == (cfg.clip_model, cfg.clip_pretrained):
                self.aesthetic_clip, self.aesthetic_preprocess = self.clip, self.preprocess  # one CLIP for both
            else:
                self.aesthetic_clip, self.aesthetic_preprocess, _ = load_clip(
                    config["clip_model"], config["clip_pretrained"], self.device)
        if cfg.watermark_model:
            self.watermark, config = load_quality_model(cfg.watermark_model, WATERMARK, "quality.watermark_model",
                                                        self.device)
            side = config.get("side", 256)
            self.watermark_preprocess = transforms.Compose([
                transforms.Resize((side, side)), transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def embed_dim(self) -> int:
        return int(self.clip.visual.output_dim)

    def score(self, images: list, captions: list[str | None]) -> dict[str, np.ndarray]:
        """Scores of PIL images and their captions (None: no caption, no image-text score)."""
        import torch

        def embed(clip, preprocess):
            pixels = torch.stack([preprocess(image) for image in images]).to(self.device)
            return torch.nn.functional.normalize(clip.encode_image(pixels).float(), dim=-1)

        # bf16 on GPUs (the networks bound the stage there); full precision on CPUs, where bf16 is slow
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            image = embed(self.clip, self.preprocess)
            text = self.clip.encode_text(self.tokenizer([c or "" for c in captions]).to(self.device)).float()
            clip_score = (image * torch.nn.functional.normalize(text, dim=-1)).sum(-1)
            clip_score[[c is None for c in captions]] = float("nan")
            out = {"clip_score": clip_score.cpu().numpy(), "embedding": image.half().cpu().numpy()}
            if self.aesthetic is not None:
                features = image if self.aesthetic_clip is self.clip else embed(self.aesthetic_clip,
                                                                               self.aesthetic_preprocess)
                out["aesthetic"] = self.aesthetic(features).float().cpu().numpy()
            if self.watermark is not None:
                pixels = torch.stack([self.watermark_preprocess(image) for image in images]).to(self.device)
                out["watermark"] = self.watermark(pixels).float().cpu().numpy()
        return out


# -- one shard ----------------------------------------------------------------------------------------------------
def score_shard(root: str, shard: str, scorer: QualityScorer, cfg: QualityConfig,
                progress: ProgressChannel | None = None) -> dict:
    """Score every photo of a shard, telling `progress` how far it is; commit its scores table, its status table
    and its stats."""
    from PIL import Image

    layout = DatasetLayout(root)
    photo, caption = registry.photo(), registry.caption()
    captions = {key: data.decode("utf-8", errors="replace")
                for key, data in read_members(layout.tar(caption.folder, shard), caption.extension)} \
        if layout.tar(caption.folder, shard).exists() else {}
    statuses, columns, batch = [], {name: [] for name in ("key", "clip_score", "aesthetic", "watermark", "embedding")}, []
    started, samples = time.time(), counter(progress, shard, lambda: photos_in(layout, shard))

    def flush():
        if not batch:
            return
        scores = scorer.score([image for _, image in batch], [captions.get(key) for key, _ in batch])
        columns["key"] += [key for key, _ in batch]
        for name in ("clip_score", "aesthetic", "watermark"):
            values = scores.get(name)
            columns[name] += [None] * len(batch) if values is None else \
                [None if np.isnan(v) else float(v) for v in values]
        columns["embedding"] += list(scores["embedding"])
        samples.advance(len(batch))
        batch.clear()

    with ShardWriter(layout, STAGE, shard, []) as writer:
        for key, data in read_members(layout.tar(photo.folder, shard), photo.extension):
            try:
                image = Image.fromarray(decode_rgb(data))
            except ValueError as err:
                statuses.append((key, "decode_error", f"{key}.{photo.extension}: {err}"))
                samples.advance()
                continue
            statuses.append((key, OK, None))
            batch.append((key, image))
            if len(batch) == cfg.batch_size:
                flush()
        flush()
        samples.finish()
        schema = scores_schema(scorer.embed_dim())
        columns["embedding"] = pa.array([e.tolist() for e in columns["embedding"]], schema.field("embedding").type)
        scores = pa.table(columns, schema=schema)
        status = pa.table({"key": [s[0] for s in statuses], "status": [s[1] for s in statuses],
                           "error": [s[2] for s in statuses]}, schema=STATUS_SCHEMA)
        counts = Counter(s[1] for s in statuses)
        seconds = time.time() - started
        return writer.commit(status, {"rows": len(statuses), "ok": counts.get(OK, 0), "status_counts": dict(counts),
                                      "seconds": round(seconds, 3),
                                      "images_per_s": round(counts.get(OK, 0) / seconds, 2) if seconds else None},
                             tables={FOLDER: scores})


# -- all shards ---------------------------------------------------------------------------------------------------
class QualityWorker:
    """A Ray actor: the networks loaded once, scoring shard after shard."""

    def __init__(self, root: str, cfg: QualityConfig):
        self.root, self.cfg, self.scorer = root, cfg, QualityScorer(cfg)

    def score(self, shard: str, _, progress: ProgressChannel | None = None) -> dict:
        return score_shard(self.root, shard, self.scorer, self.cfg, progress)


def check_models(cfg: QualityConfig) -> QualityConfig:
    """Before any work: each configured model is there, in its layout (the error names the setting); local folders
    made absolute, as Ray actors do not share the driver's working directory."""
    from models.quality import AESTHETIC, WATERMARK, QualityWeightsError, clip_name, read_quality_config

    try:
        clip_name(cfg.clip_model)
        for setting, kind in (("aesthetic_model", AESTHETIC), ("watermark_model", WATERMARK)):
            if getattr(cfg, setting):
                read_quality_config(getattr(cfg, setting), kind, f"quality.{setting}")
    except QualityWeightsError as err:
        raise QualityInputError(str(err)) from None

    def local(path):
        return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path

    return cfg.model_copy(update={name: local(getattr(cfg, name))
                                  for name in ("clip_model", "aesthetic_model", "watermark_model")})


def run_quality(root: str | Path, config: Config, observer: ShardObserver | None = None) -> QualitySummary:
    """Score every committed download shard not yet scored; once all are, find the near-duplicate pairs among
    them (again whenever new shards were scored)."""
    layout = DatasetLayout(root)
    layout.record_modalities(config.modalities)
    try:
        shards = input_shards(layout)
    except ValueError as err:
        raise QualityInputError(str(err)) from None
    cfg = check_models(config.quality)
    summary = QualitySummary(shards_total=len(shards), status_counts={STAGE: Counter()})
    if observer:
        observer.start(len(shards))
    todo = skip_or_queue(layout, shards, [STAGE], lambda _: STAGE, summary, observer, lambda _, stats: stats[STAGE])
    started = time.time()
    if todo:
        init_ray(config.ray)
        for shard, stats, error in run_on_actors(QualityWorker, (absolute(layout.root), cfg), todo, "score",
                                                 device=cfg.device, workers=cfg.workers,
                                                 cpus_per_worker=cfg.cpus_per_worker, observer=observer):
            if error:
                summary.fail(shard, error, observer)
                continue
            summary.shards_done += 1
            summary.status_counts[STAGE].update(stats["status_counts"])
            if observer:
                observer(shard, stats, False)
    scored = layout.committed_shards(STAGE)
    if scored == shards and covered_shards(layout) != scored:  # every shard scored: compare them all
        found = find_near_duplicates(layout.root, scored, cfg.dedup_cluster_size,
                                     "cuda" if cfg.device != "cpu" and torch_cuda() else "cpu")
        summary.near_duplicate_pairs = found["pairs"]
    summary.seconds = time.time() - started
    return summary


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
