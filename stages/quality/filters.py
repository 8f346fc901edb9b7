"""Which samples the quality thresholds drop, read from the quality stage's scores (nothing is recomputed).

Used by the stages after it: the label stage labels none of a shard's rejected samples and records each as
`filtered` with the score and the threshold it failed; the tokenize stage's alignment then drops them from every
folder (stages/dataset/align.py), so every folder, `verify` and the reference's loader stay aligned.
"""
from __future__ import annotations

from core.config import QualityConfig
from core.storage import read_parquet
from stages.dataset.shards import DatasetLayout

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
    """The rules whose threshold is set."""
    return [rule for rule in RULES if getattr(cfg, rule[1]) is not None]


def check_scored(layout: DatasetLayout, shards: list[str], cfg: QualityConfig) -> None:
    """Before any work: where a threshold is set, every shard to do has been scored, with the networks it reads."""
    rules = active(cfg)
    if not rules:
        return
    unscored = [s for s in shards if not layout.is_committed(SCORED, s)]
    if unscored:
        settings = ", ".join(f"quality.{setting}" for _, setting, _ in rules)
        raise QualityFilterError(f"{settings} set, but {len(unscored)} shard(s) are not scored (e.g. {unscored[0]}): "
                                 f"run `python -m pipeline quality` first, or unset the threshold")
    for shard in shards[:1]:  # the networks are the run's: one shard tells
        table = read_parquet(layout.table(SCORED, shard), ["key", *(column for column, _, _ in rules)])
        for column, setting, _ in rules:
            if table.num_rows and table[column].null_count == table.num_rows:
                raise QualityFilterError(f"quality.{setting} is set, but {shard} has no {column} scores (scored with "
                                         f"no network for them: name one and score the shards again)")


def rejected(layout: DatasetLayout, shard: str, cfg: QualityConfig) -> dict[str, str]:
    """key -> why, for the samples of one shard that a threshold drops ({} where none is set). A sample without a
    score (no caption: no image-text score) is not judged by that rule."""
    rules = active(cfg)
    if not rules:
        return {}
    table = read_parquet(layout.table(SCORED, shard), ["key", *(column for column, _, _ in rules)]).to_pydict()
    out = {}
    for i, key in enumerate(table["key"]):
        for column, setting, keeps in rules:
            score, bound = table[column][i], getattr(cfg, setting)
            if score is not None and not keeps(score, bound):
                out[key] = f"{column} {score:.3f} {'<' if setting.startswith('min') else '>'} quality.{setting} {bound}"
                break
    return out
