"""Which samples the quality thresholds drop, read from the quality stage's scores (nothing is recomputed).

Used by the stages after it: the label stage labels none of a shard's rejected samples and records each as
`filtered` with the score and the threshold it failed; the tokenize stage's alignment then drops them from every
folder (stages/dataset/align.py), so every folder, `verify` and the reference's loader stay aligned.
"""
from __future__ import annotations

from core.config import QualityConfig
from core.storage import read_parquet
from stages.dataset.shards import DatasetLayout
from stages.quality.dedup import covered_shards, near_duplicates_in

FILTERED = "filtered"
SCORED = "quality"  # the folder and stage of the scores (stages/quality/quality.py)
RULES = (  # (score column, threshold setting, keeps when)
    ("clip_score", "min_clip_score", lambda score, bound: score >= bound),
    ("aesthetic", "min_aesthetic", lambda score, bound: score >= bound),
    ("watermark", "max_watermark", lambda score, bound: score <= bound),
)


class QualityFilterError(ValueError):
    """Thresholds that cannot be applied: shards not scored, or scored without the network a threshold reads."""


def active(cfg: QualityConfig) -> list[tuple[str, str, object]]:
    """The score rules whose threshold is set."""
    return [rule for rule in RULES if getattr(cfg, rule[1]) is not None]


def filtering(cfg: QualityConfig) -> bool:
    return bool(active(cfg)) or cfg.dedup is not None


def check_scored(layout: DatasetLayout, shards: list[str], cfg: QualityConfig) -> None:
    """Before any work: where a threshold is set, every shard to do has been scored, with the networks it reads."""
    rules = active(cfg)
    if not filtering(cfg):
        return
    unscored = [s for s in shards if not layout.is_committed(SCORED, s)]
    if unscored:
        named = [setting for _, setting, _ in rules] + ["dedup"] * (cfg.dedup is not None)
        settings = ", ".join(f"quality.{setting}" for setting in named)
        raise QualityFilterError(f"{settings} set, but {len(unscored)} shard(s) are not scored (e.g. {unscored[0]}): "
                                 f"run `python -m pipeline quality` first, or unset the threshold")
    for shard in shards[:1]:  # the networks are the run's: one shard tells
        table = read_parquet(layout.table(SCORED, shard), ["key", *(column for column, _, _ in rules)])
        for column, setting, _ in rules:
            if table.num_rows and table[column].null_count == table.num_rows:
                raise QualityFilterError(f"quality.{setting} is set, but {shard} has no {column} scores (scored with "
                                         f"no network for them: name one and score the shards again)")
    if cfg.dedup is not None:
        covered = set(covered_shards(layout) or [])
        if not covered.issuperset(shards):
            raise QualityFilterError("quality.dedup is set, but the near-duplicate search has not covered every shard "
                                     "(it runs when the quality stage has scored them all): run `python -m pipeline "
                                     "quality` again")


def rejected(layout: DatasetLayout, shard: str, cfg: QualityConfig) -> dict[str, tuple[str, str]]:
    """key -> (the threshold's setting, why), for the samples of one shard that a threshold drops ({} where none is
    set). A sample without a score (no caption: no image-text score) is not judged by that rule."""
    rules, out = active(cfg), {}
    if rules:
        table = read_parquet(layout.table(SCORED, shard), ["key", *(column for column, _, _ in rules)]).to_pydict()
        for i, key in enumerate(table["key"]):
            for column, setting, keeps in rules:
                score, bound = table[column][i], getattr(cfg, setting)
                if score is not None and not keeps(score, bound):
                    sign = "<" if setting.startswith("min") else ">"
                    out[key] = (setting, f"{column} {score:.3f} {sign} quality.{setting} {bound}")
                    break
    if cfg.dedup is not None:
        for key, (first, cosine) in near_duplicates_in(layout, shard).items():
            if cosine >= cfg.dedup:
                out.setdefault(key, ("dedup", f"near duplicate of {first} (cosine {cosine:.3f} >= quality.dedup "
                                              f"{cfg.dedup})"))
    return out


def dropped(layout: DatasetLayout, shard: str, cfg: QualityConfig | None) -> frozenset[str]:
    """The keys of a shard that the thresholds drop, for the readers of the downloaded folders (the tokenizers'
    training data, the text corpus): the label stage labels none of them, and tokenize's alignment drops them."""
    return frozenset(rejected(layout, shard, cfg)) if cfg is not None and filtering(cfg) else frozenset()
