"""Where every stage of a dataset stands, read from its status files alone (no service needed).

One row per stage: shards committed of the shards it has to do, samples kept and failed, failures by reason,
samples/s over the stage's wall-clock span, elapsed and (when unfinished) estimated remaining time, the models
that made its folder (source, weights hash, RANDOM WEIGHTS for the demo's) and the project version. Shared by
`python -m pipeline status` and the flows' status tables.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from core import registry
from pipeline.stage_list import status_rank
from stages.dataset.provenance import RANDOM_MARK, describe_model
from stages.dataset.shards import DatasetLayout
from stages.run_folder import RunFolder


def _stage_order(layout: DatasetLayout) -> list[str]:
    """The status folders present, in the order of the stages that record into them (pipeline/stage_list.py)."""
    status = layout.status_root
    present = {p.name for p in status.iterdir() if p.is_dir()} if status.is_dir() else set()
    return sorted(present, key=lambda s: (status_rank(s), s))


def models_of(stats: list[dict]) -> dict[str, dict]:
    """The distinct models that made a stage's shards: description -> record, in the order first met."""
    made = {}
    for s in stats:
        for record in s.get("provenance", {}).get("models", {}).values():
            made.setdefault(describe_model(record), record)
    return made


def random_weight_stages(rows: list[dict]) -> list[str]:
    """Of `stage_rows`, the stages whose shards were made, even in part, by random-weight models (the demo's)."""
    return [row["stage"] for row in rows if RANDOM_MARK in (row["made_by"] or "")]


RANDOM_WARNING = ("WARNING: labelled by random-weight models (the demo's): {stages}. These labels mean nothing; "
                  "label with real weights (the paper profile) for a dataset to train on.")


def stage_rows(root: str | Path) -> list[dict]:
    layout = DatasetLayout(root)
    layout.modality_set()  # its status folders' modalities named (imported) before they are recognised
    first = registry.photo().stage
    downloaded = len(layout.committed_shards(first))
    rows = []
    for stage in _stage_order(layout):
        stats = [json.loads(p.read_text()) for p in sorted(layout.status_dir(stage).glob("shard-*.json"))]
        total = downloaded if stage != first else len(stats)
        counts = sum((Counter(s.get("status_counts", {})) for s in stats), Counter())
        filtered_by = sum((Counter(s.get("filtered_by", {})) for s in stats), Counter())  # per quality threshold
        ok = counts.get("ok", 0)
        starts = [s["started_at"] for s in stats if "started_at" in s]
        ends = [s["finished_at"] for s in stats if "finished_at" in s]
        elapsed = max(ends) - min(starts) if starts and ends else None
        done = len(stats)
        if done >= total:
            remaining = 0.0
        else:  # at the pace so far; unknown before the first shard commits
            remaining = elapsed / done * (total - done) if elapsed and done else None
        rows.append({
            "stage": stage, "shards": f"{done}/{total}", "ok": ok, "failed": sum(counts.values()) - ok,
            "failures": ", ".join(f"{k} {v}" + (f" ({', '.join(f'{r} {n}' for r, n in filtered_by.most_common())})"
                                                  if k == "filtered" and filtered_by else "")
                                  for k, v in counts.most_common() if k != "ok") or "-",
            "samples_per_s": round(sum(counts.values()) / elapsed, 2) if elapsed else None,
            "elapsed_s": round(elapsed, 1) if elapsed is not None else None,
            "remaining_s": round(remaining, 1) if remaining is not None else None,
            "made_by": "; ".join(models_of(stats)) or None,
            "version": ", ".join(sorted({s["provenance"]["version"] for s in stats if "provenance" in s})) or None,
        })
    return rows


def node_shares(stats: list[dict], alive: set[str] | None = None) -> list[dict]:
    """Per node that made some of these shards (their stats): shards, samples, samples/s over the node's span of work,
    and whether it is still in the cluster where `alive` (the live nodes) is known. Shards committed before nodes
    were recorded count as '?'."""
    by_node: dict[str, list[dict]] = {}
    for shard in stats:
        by_node.setdefault(shard.get("node") or "?", []).append(shard)
    rows = []
    for node, shards in sorted(by_node.items()):
        samples = sum(s.get("ok", 0) for s in shards)
        starts = [s["started_at"] for s in shards if "started_at" in s]
        ends = [s["finished_at"] for s in shards if "finished_at" in s]
        span = max(ends) - min(starts) if starts and ends else None
        rows.append({"node": node, "shards": len(shards), "samples": samples,
                     "samples_per_s": round(samples / span, 2) if span else None,
                     "now": None if alive is None else "alive" if node in alive else "gone"})
    return rows


def node_rows(root: str | Path) -> list[dict]:
    """Per stage and node, from the stage's committed shards' stats (node_shares)."""
    layout = DatasetLayout(root)
    return [{"stage": stage, **{k: v for k, v in row.items() if k != "now"}}
            for stage in _stage_order(layout)
            for row in node_shares([json.loads(p.read_text()) for p in sorted(layout.status_dir(stage).glob("shard-*.json"))])]


def tokenizer_rows(root: str | Path) -> list[dict]:
    rows = []
    layout = DatasetLayout(root)
    for modality in layout.modality_set().tokenizer_names():
        folder = layout.tokenizer_dir(modality)
        if (folder / "train.json").is_file():
            summary = json.loads((folder / "train.json").read_text())
            state = f"trained ({summary.get('steps', summary.get('vocab_size'))} " \
                    f"{'steps' if 'steps' in summary else 'ids'})"
        elif (checkpoint := RunFolder(folder).checkpoint_state()) is not None:
            state = (f"interrupted at step {checkpoint['step']} of {checkpoint.get('plan', {}).get('steps', '?')} "
                     "(resumes from there)")
        else:
            continue
        rows.append({"tokenizer": modality, "state": state})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(nothing yet)"
    columns = list(rows[0])
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def pretrain_row(root: str | Path) -> dict | None:
    """The 4M run under <root>/pretrain: step, tokens seen, last losses, and the time left at its recent pace."""
    folder = DatasetLayout(root).pretrain_dir
    state = RunFolder(folder).checkpoint_state()
    if state is None or not (folder / "metrics.jsonl").is_file():
        return None
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = lines[-1] if lines else {}
    steps, batch, tokens = state.get("steps"), state.get("batch_size"), state.get("tokens_per_sample")
    done = (folder / "train.json").is_file()
    rate = last.get("samples_per_s")
    left = None if done or not (rate and steps and batch) else (steps - state["step"]) * batch / rate
    return {"run": str(folder), "state": "trained" if done else "stopped or running (resumes from its checkpoint)",
            "step": f"{state['step']}/{steps}", "tokens_seen": f"{state['step'] * batch * tokens:.3g}"
            if batch and tokens else None, "loss": round(last["loss"], 4) if "loss" in last else None,
            "val_loss": ", ".join(f"{k.removeprefix('val_loss.')} {v:.3g}" for k, v in last.items()
                                  if k.startswith("val_loss.")) or None,
            "remaining": None if left is None else f"{left / 3600:.1f} h"}


def evaluation_rows(root: str | Path) -> list[dict]:
    """The finished transfers of the dataset's model (<root>/pretrain/transfer-*/results.json) and its
    out-of-the-box evaluation, each with its scores."""
    folder, rows = DatasetLayout(root).pretrain_dir, []
    for path in sorted(folder.glob("transfer-*/results.json")):
        results = json.loads(path.read_text())
        paper = results["paper"]
        rows.append({"evaluation": f"transfer {results['task']}", "backbone": results["backbone"],
                     "scores": ", ".join(f"{k} {v:.4g}" for k, v in results["metrics"].items()),
                     "reference": f"paper 4M-B {paper['metric']} {paper['4M-B']}", "folder": str(path.parent)})
    path = folder / "evaluation" / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
        scores = "; ".join(f"{name} " + ", ".join(f"{k} {v:.3g}" for k, v in s.items() if not k.endswith("_baseline"))
                           for name, s in results["scores"].items())
        rows.append({"evaluation": "out of the box (RGB alone)", "backbone": "4M", "scores": scores,
                     "reference": "baselines in results.json", "folder": str(path.parent)})
    return rows


NOT_FAILURES = {"ok", "filtered"}  # a sample the quality thresholds dropped was decided, not lost


def failure_rows(root: str | Path, stages: list[str] | None = None) -> list[dict]:
    """Every failed row of the stages' committed shards (all stages by default), in stage and shard order: stage,
    shard, key, status, error, for the download its URL, and whether `download --retry-failed` (or `label
    --retry-failed`, for a labeler's) tries it again."""
    from stages.download.download import STAGE as DOWNLOAD
    from stages.download.download import retryable
    from stages.label.label import RETRYABLE as LABEL_RETRYABLE

    layout = DatasetLayout(root)
    labelled = {m.stage for m in layout.modality_set().labelled()}
    present = _stage_order(layout)
    unknown = [stage for stage in stages or [] if stage not in present]
    if unknown:
        raise ValueError(f"--stage {', '.join(unknown)}: no such status folder under {layout.status_root} "
                         f"(there: {', '.join(present) or 'none'})")
    rows = []
    for stage in stages or present:
        for shard in layout.committed_shards(stage):
            if not set(layout.read_stats(stage, shard).get("status_counts", {})) - NOT_FAILURES:
                continue  # nothing failed in it: its table is not read
            for r in layout.read_status(stage, shard).to_pylist():
                if r["status"] not in NOT_FAILURES:
                    rows.append({"stage": stage, "shard": shard, "key": r["key"], "status": r["status"],
                                 "error": r.get("error") or "", "url": r.get("url") or "",
                                 "retryable": ("yes" if retryable(r) else "no") if stage == DOWNLOAD else
                                 ("yes" if r["status"] in LABEL_RETRYABLE else "no") if stage in labelled else ""})
    return rows
