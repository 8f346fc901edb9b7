"""Prefect artifacts for a running stage: a progress bar, a table of shards, and a summary of failures.

Artifacts are what a user watches in the Prefect UI while a stage runs for days, so they are updated as
each shard finishes; the shard table is re-published at most every `table_every` seconds and at the end.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from core.config import DashboardsConfig
from core.ray_runtime import dashboard_sign_in, dashboard_url, live_nodes
from core.storage import data_path
from pipeline.show import draw_loss_curves, draw_sample, draw_throughput, draw_transfer_curves
from pipeline.status import RANDOM_WARNING, failure_rows, node_shares, random_weight_stages, stage_rows
from stages.dataset.shards import DatasetLayout
from stages.download.download import STAGE as DOWNLOAD_STAGE
from stages.fourm.pretrain import run_dir
from stages.tokenizers.train_tokenizer import quality, tokenizer_dir


def without_pictures(markdown: str) -> str:
    """Markdown for a log: each inlined picture replaced by a word (the artifact has it)."""
    return re.sub(r"!\[([^\]]*)\]\(data:[^)]*\)", r"(\1: a picture in the artifact)", markdown)


def artifact_key(*parts: str) -> str:
    """Prefect's artifact keys allow lowercase letters, digits and dashes only: color_palette -> color-palette."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())


class StageReporter:
    """A stage's Prefect artifacts while it runs: the progress bar (its description: shards, images/s, time left),
    moved as each shard commits and, every few seconds, by the workers' counts within the shards they are on
    (`stages.progress`); a line in the flow run's log per committed shard; a bounded shards table (the shards in
    progress, the last ones, the slowest, those with failures: at 12M images the full per-shard history lives in the
    status files and `status`, not in thousands of rows times thousands of table versions); a workers table (each
    worker process's shards, images/s, busy share, failures and the shard it is on)."""

    RECENT, SLOWEST, WITH_FAILURES = 20, 5, 20  # the shards table's rows, however many shards there are

    def __init__(self, stage: str, dashboards: DashboardsConfig | None = None):
        dashboards = dashboards or DashboardsConfig()
        self.stage, self.total = stage, 1
        self.progress_every, self.poll_seconds = dashboards.progress_every, dashboards.poll_seconds  # for the workers
        self.rows: list[dict] = []  # every shard seen, in the order they finished
        self.made: list[dict] = []  # the stats of the shards this run made (not found committed): per node
        self.running: dict[str, dict] = {}  # shard -> the workers' latest count, for the shards not committed yet
        self.failures: dict[str, str] = {}  # shard -> why it failed in this run
        self.counts: Counter = Counter()
        self.started = time.time()
        self.table_every, self._last_table = dashboards.table_seconds, 0.0
        self.running_table_every = dashboards.running_table_seconds
        self.progress_id = None
        self.lock = threading.Lock()  # the workers' counts arrive on another thread than the commits

    def start(self, total_shards: int) -> None:
        self.total = max(total_shards, 1)
        self.progress_id = create_progress_artifact(
            0.0, key=artifact_key(self.stage, "progress"), description=f"{self.stage}: 0 of {total_shards} shards")

    def __call__(self, name: str, stats: dict, skipped: bool) -> None:
        with self.lock:
            self.record(name, stats, skipped)
            progress = self._show_progress()
            if not skipped:  # the flow run's log: one line per shard this run committed
                row = self.rows[-1]
                failed = f", {row['failed']} failed" if row["failed"] else ""
                filtered = f", {row['filtered']} filtered" if row["filtered"] else ""
                node = f" on {row['node']}" if row["node"] else ""
                print(f"{self.stage}: {name} committed ({row['ok']} of {row['rows']} ok{failed}{filtered}{node}); "
                      f"{progress}")
            if time.time() - self._last_table >= self.table_every or len(self.rows) == self.total:
                self._publish_tables()

    def in_progress(self, shards: dict[str, dict]) -> None:
        """The workers' counts within shards (`stages.progress`): the bar and the tables move between commits."""
        with self.lock:
            ended = {row["shard"] for row in self.rows} | set(self.failures)
            self.running = {shard: count for shard, count in shards.items() if shard not in ended}
            self._show_progress()
            # a new table version per commit at most, and while none commits, now and then: Prefect keeps every one
            if self.running and time.time() - self._last_table >= max(self.table_every, self.running_table_every):
                self._publish_tables()

    def failed(self, shard: str, error: str) -> None:
        """A shard that failed in this run: out of the shards in progress, and a line in the flow run's log."""
        with self.lock:
            self.running.pop(shard, None)
            self.failures[shard] = error
            print(f"{self.stage}: {shard} failed (the next run redoes it): {error}")
            self._show_progress()

    def _show_progress(self) -> str:
        progress = self.progress_line()
        shards = len(self.rows) + sum(self._fraction(c) for c in self.running.values())
        update_progress_artifact(self.progress_id, 100.0 * shards / self.total, description=progress)
        return progress

    @staticmethod
    def _fraction(count: dict) -> float:
        return min(count["done"] / count["total"], 1.0) if count["total"] else 0.0

    def record(self, name: str, stats: dict, skipped: bool) -> None:
        """A shard's row and counts, kept for the table and the summary."""
        self.counts.update(stats["status_counts"])
        self.running.pop(name, None)
        if not skipped:
            self.made.append(stats)
        filtered = sum(stats.get("filtered_by", {}).values()) or None
        self.rows.append({
            "shard": name, "rows": stats["rows"], "ok": stats["ok"],
            "failed": (stats["rows"] - stats["ok"] - (filtered or 0)) or None, "filtered": filtered,
            "images/s": stats.get("images_per_s"), "seconds": stats.get("seconds"),
            "state": "already committed" if skipped else "done", "node": stats.get("node"),
            **({"tokens": stats["tokens"]} if "tokens" in stats else {}),
            # the label stage: which side bounded the shard, and how full the model batches were
            **({"waiting for device": stats["device_wait_share"], "waiting for decode": stats["decode_wait_share"],
                "images/batch": stats["images_per_batch"]} if "device_wait_share" in stats else {}),
            **({"random weights": ", ".join(stats["random_weights"]) or "none"} if "random_weights" in stats else {}),
        })

    def progress_line(self) -> str:
        """'12 of 40 shards (2 in progress: shard-000012 120 of 500, ...), 31.5 images/s, about 340 s left': the rate
        and the time left over the work this run did, the shards in progress counted for what their workers
        reported (shards found committed take no time)."""
        done = [row for row in self.rows if row["state"] == "done"]
        elapsed = time.time() - self.started
        line = f"{self.stage}: {len(self.rows)} of {self.total} shards"
        if self.failures:
            line += f", {len(self.failures)} failed (redone on the next run)"
        if self.running:
            shown = sorted(self.running.items())[:3]
            more = f", {len(self.running) - len(shown)} more" if len(self.running) > len(shown) else ""
            line += f" ({len(self.running)} in progress: " + ", ".join(
                f"{shard} {c['done']} of {c['total']}" for shard, c in shown) + f"{more})"
        shards = len(done) + sum(self._fraction(c) for c in self.running.values())
        images = sum(row["ok"] for row in done) + sum(c["done"] for c in self.running.values())
        if shards and elapsed:
            line += f", {images / elapsed:.1f} images/s"
            left = self.total - len(self.rows) - len(self.failures) - sum(self._fraction(c) for c in self.running.values())
            line += f", about {elapsed / shards * left:.0f} s left"
        return line

    def table_rows(self) -> list[dict]:
        """The shards in progress, then the last shards to finish, the slowest and those with failures, each once,
        in shard order."""
        recent = self.rows[-self.RECENT:]
        slowest = sorted((r for r in self.rows if r["seconds"] is not None), key=lambda r: -r["seconds"])[:self.SLOWEST]
        failing = [r for r in self.rows if r["failed"]][-self.WITH_FAILURES:]
        shown = {r["shard"]: r for r in [*recent, *slowest, *failing]}
        running = [{"shard": shard, "rows": c["total"], "ok": None, "failed": None, "filtered": None,
                    "images/s": None, "seconds": round(time.time() - c["since"], 1),
                    "state": f"running: {c['done']} of {c['total']}", "node": c["worker"].split(" pid ")[0]}
                   for shard, c in sorted(self.running.items())]
        return running + [shown[shard] for shard in sorted(shown)]

    def _publish_tables(self) -> None:
        self._last_table = time.time()
        rows = self.table_rows()
        finished = len(rows) - len(self.running)
        hidden = f"; shown: the last {self.RECENT}, the {self.SLOWEST} slowest and those with failures (every " \
                 f"shard: `python -m pipeline status`)" if finished < len(self.rows) else ""
        create_table_artifact([{k: ("" if v is None else v) for k, v in row.items()} for row in rows],
                              key=artifact_key(self.stage, "shards"),
                              description=f"{self.progress_line()}{hidden}")
        workers = worker_rows(self.made, self.running, time.time() - self.started)
        if workers:
            shown = slowest_workers(workers)
            which = f"the {len(shown)} slowest of {len(workers)}" if len(shown) < len(workers) else \
                f"each of {len(workers)}"
            create_table_artifact([{k: ("" if v is None else v) for k, v in row.items()} for row in shown],
                                  key=artifact_key(self.stage, "workers"),
                                  description=f"{self.stage}: {which} worker processes, as of "
                                              f"{time.strftime('%H:%M:%S')}")

    def finish(self) -> str:
        with self.lock:
            self.running.clear()
            self._publish_tables()
        elapsed = time.time() - self.started
        images, ok = sum(row["rows"] for row in self.rows), sum(row["ok"] for row in self.rows)
        filtered = sum(row["filtered"] or 0 for row in self.rows)
        per = "image-labeler pairs" if any("labelers" in s for s in self.made) else "rows"
        failures = [(k, v) for k, v in self.counts.most_common()
                    if k != "ok" and k.rsplit(":", 1)[-1] != "filtered"]  # label's are "depth:filtered"
        done = [row for row in self.rows if row["state"] == "done"]
        if done:  # a rate over the shards this run did, never over shards it found committed
            rate = f"**{sum(row['ok'] for row in done) / elapsed if elapsed else 0:.1f} images/s** in this run " \
                   f"({len(done)} shards done, {len(self.rows) - len(done)} already committed)"
        else:
            rate = f"**nothing to do**: all {len(self.rows)} shards were already committed"
        lines = [f"# {self.stage}", "",
                 f"**{ok}** of {images} input rows ok" + (f", {filtered} dropped by the quality filters" if filtered
                                                          else "") +
                 f"; {len(self.rows)} of {self.total} shards, {elapsed:.1f} s; {rate}", "",
                 f"| failure reason | {per} |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in failures] or ["| none | 0 |"]
        lines += worker_table(self.made, elapsed)
        lines += node_table(self.made)
        lines += throughput_picture(self.made, self.stage)
        tokens = sum(row.get("tokens", 0) for row in done)
        if tokens:
            lines += ["", f"**{tokens / elapsed if elapsed else 0:.0f} tokens/s** written in this run ({tokens} tokens)"]
        markdown = "\n".join(lines)
        create_markdown_artifact(markdown, key=artifact_key(self.stage, "summary"), description=f"{self.stage} summary")
        return markdown


def worker_rows(done: list[dict], running: dict[str, dict], elapsed: float) -> list[dict]:
    """One row per worker process (`<node> pid <pid>`): of the shards this run made (their stats), its shards,
    images, images/s while it worked, the share of the run it spent working (low: it waited for work, or joined
    late), its failed rows; and the shard it is on now (`running`: the workers' latest counts)."""
    by_worker: dict[str, dict] = {}

    def row(worker: str) -> dict:
        return by_worker.setdefault(worker, {"worker": worker, "shards": 0, "images": 0, "seconds": 0.0,
                                             "failed": 0, "now": None})

    for stats in done:
        if stats.get("worker") is not None:
            r = row(f"{stats.get('node') or '?'} pid {stats['worker']}")
            r["shards"] += 1
            r["images"] += stats["ok"]
            r["seconds"] += stats.get("seconds") or 0
            r["failed"] += stats["rows"] - stats["ok"] - sum(stats.get("filtered_by", {}).values())
    now = time.time()
    for shard, count in sorted(running.items()):
        r = row(count["worker"])
        r["now"] = f"{shard}: {count['done']} of {count['total']}"
        r["images"] += count["done"]
        r["seconds"] += now - count["since"]
    return [{"worker": r["worker"], "shards": r["shards"], "images": r["images"],
             "images/s": round(r["images"] / r["seconds"], 1) if r["seconds"] else 0.0,
             "busy": f"{min(r['seconds'] / elapsed, 1) if elapsed else 0:.0%}", "failed": r["failed"] or None,
             "now": r["now"]} for _, r in sorted(by_worker.items())]


def throughput_picture(done: list[dict], stage: str) -> list[str]:
    """Markdown lines: the run's images/s over time (all workers, and each), where it made several shards."""
    import tempfile

    if len(done) < 2:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        chart = draw_throughput(done, f"{tmp}/throughput.png", f"{stage}: images/s over the run")
        return ["", picture_markdown(chart, "throughput")] if chart else []


WORKERS_SHOWN = 50  # workers tables' rows: on a cluster of hundreds of GPUs, the slowest are the ones to look at


def slowest_workers(rows: list[dict]) -> list[dict]:
    """At most WORKERS_SHOWN of `worker_rows`, the slowest (images/s) first where some are left out."""
    if len(rows) <= WORKERS_SHOWN:
        return rows
    return sorted(rows, key=lambda r: r["images/s"])[:WORKERS_SHOWN]


def worker_table(done: list[dict], elapsed: float) -> list[str]:
    """Markdown lines: `worker_rows` of the shards this run made (the slowest, where there are many), for the
    summary."""
    rows = worker_rows(done, {}, elapsed)
    if not rows:
        return []
    shown = slowest_workers(rows)
    lines = ["", f"the {len(shown)} slowest of {len(rows)} worker processes:" if len(shown) < len(rows) else "",
             "| worker | shards | images | images/s | busy | failed |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['worker']} | {r['shards']} | {r['images']} | {r['images/s']:.1f} | {r['busy']} | "
              f"{r['failed'] or ''} |" for r in shown]
    return lines


def node_table(done: list[dict]) -> list[str]:
    """Markdown lines, where more than one node made the shards this run did (their stats): each node's shards,
    samples and samples/s, and whether it is still in the cluster."""
    rows = node_shares(done, live_nodes())
    if len(rows) < 2:
        return []
    lines = ["", "| node | shards | samples | samples/s | now |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['node']} | {r['shards']} | {r['samples']} | {r['samples_per_s'] or ''} | {r['now'] or ''} |"
              for r in rows]
    return lines


class LabelReporter(StageReporter):
    """The stage reporter plus one progress artifact per labeler, and `pictures(shard)` called once, on the first
    shard this run labels (the samples' pictures while the stage goes on)."""

    def __init__(self, stage: str, labelers: list[str], dashboards: DashboardsConfig | None = None, pictures=None):
        super().__init__(stage, dashboards)
        self.labelers, self.per_labeler, self.done = labelers, {}, Counter()
        self.pictures = pictures

    def start(self, total_shards: int) -> None:
        super().start(total_shards)
        for name in self.labelers:
            self.per_labeler[name] = create_progress_artifact(
                0.0, key=artifact_key(self.stage, name, "progress"), description=f"{name}: 0 of {total_shards} shards")

    def __call__(self, name: str, stats: dict, skipped: bool) -> None:
        super().__call__(name, stats, skipped)
        if self.pictures and not skipped and stats["ok"]:
            self.pictures(name)
            self.pictures = None
        for labeler in stats.get("labelers", {}):
            self.done[labeler] += 1
            update_progress_artifact(self.per_labeler[labeler], 100.0 * self.done[labeler] / self.total,
                                     description=f"{labeler}: {self.done[labeler]} of {self.total} shards")


def publish_stage_table(root, key: str) -> list[dict]:
    """Every stage's row (shards done of total, samples/s, failures by reason, elapsed, remaining), as
    `python -m pipeline status` prints it, and a link to the Ray dashboard when there is one."""
    from prefect.artifacts import create_link_artifact

    rows = stage_rows(root)
    if rows:
        random_stages = random_weight_stages(rows)
        warning = f" -- {RANDOM_WARNING.format(stages=', '.join(random_stages))}" if random_stages else ""
        cells = [{k: ("" if v in ("-", None) else v) for k, v in row.items()} for row in rows]  # empty, not a dash
        create_table_artifact(cells, key=key, description=f"stages of {root}{warning}")
    if dashboard_url():
        create_link_artifact(dashboard_url(), link_text="Ray dashboard", key="ray-dashboard",
                             description=f"the Ray cluster running the stages: {dashboard_sign_in()}")
    return rows


def publish_failures(root, stages: list[str], key: str, shown: int = 100) -> list[dict]:
    """The stages' failed rows as a table artifact (the first `shown`; the description says how to get every one
    and how to retry them), bounded however many there are."""
    rows = failure_rows(root, stages)
    if rows:
        more = f"; the first {shown} shown" if len(rows) > shown else ""
        retry = f"; the retryable ones again: `python -m pipeline download --input <list> --output {root} " \
                f"--retry-failed`" if DOWNLOAD_STAGE in stages else \
            f"; the shards with model errors again: `python -m pipeline label --data {root} --retry-failed`"
        create_table_artifact(rows[:shown], key=key, description=(
            f"{len(rows)} failed rows{more}; every one: `python -m pipeline failures --data {root} "
            f"{' '.join(f'--stage {s}' for s in stages)} --out failures.csv`{retry}"))
    return rows


class TokenizerReporter:
    """train-tokenizers: a progress artifact over tokenizers, a table of results, reconstruction pictures."""

    METRICS = ("loss", "codes_used", "perplexity")

    def __init__(self, root, modalities: list[str]):
        self.root, self.modalities, self.rows = root, modalities, []
        self.progress_id = create_progress_artifact(0.0, key="train-tokenizers-progress",
                                                    description=f"0 of {len(modalities)} tokenizers")

    def __call__(self, modality: str, result: dict) -> None:
        final = result.get("final", {})
        self.rows.append({"tokenizer": modality, "state": "already trained" if result.get("skipped") else "trained",
                          "steps": result.get("steps"), "samples": result.get("samples", result.get("texts")),
                          **{k: round(final[k], 4) for k in self.METRICS if k in final},
                          **self.quality_columns(modality, final),
                          **({"vocab_size": result["vocab_size"]} if "vocab_size" in result else {})})
        update_progress_artifact(self.progress_id, 100.0 * len(self.rows) / max(len(self.modalities), 1),
                                 description=f"{len(self.rows)} of {len(self.modalities)} tokenizers")
        create_table_artifact(self.rows, key="train-tokenizers-results",
                              description="tokenizers: codebook usage, and each reconstruction metric beside "
                                          "the trivial baseline's (what a tokenizer that learned nothing scores)")

    @staticmethod
    def quality_columns(modality: str, final: dict) -> dict:
        q = quality(modality, final)
        if not q:
            return {}
        return {"metric": q["metric"], "value": round(q["value"], 4),
                "baseline": None if q["baseline"] is None else round(q["baseline"], 4), "baseline is": q["baseline_of"]}

    def finish(self) -> str:
        parts = [f"# Tokenizer reconstructions under {self.root}"]
        for modality in self.modalities:
            picture = tokenizer_dir(self.root, modality) / "reconstructions.png"
            if picture.is_file():
                parts.append(f"## {modality}\n\n{picture_markdown(picture, modality)}")
        markdown = "\n\n".join(parts)
        create_markdown_artifact(markdown, key="train-tokenizers-reconstructions",
                                 description="inputs above their reconstructions")
        return markdown


def sample_pictures_markdown(root, count: int, key: str, shards: list[str] | None = None) -> str | None:
    """A markdown artifact showing `count` labelled samples of `shards` (by default the first downloaded ones),
    pictures inlined, so no file server is needed."""
    import tempfile

    layout = DatasetLayout(root)
    keys = []
    for shard in shards or layout.committed_shards(DOWNLOAD_STAGE):
        table = layout.read_status(DOWNLOAD_STAGE, shard, ["key", "status"]).to_pylist()
        keys += [r["key"] for r in table if r["status"] == "ok"]
        if len(keys) >= count:
            break
    if not keys:
        return None
    parts = [f"# Labelled samples from {root}"]
    with tempfile.TemporaryDirectory() as tmp:
        for sample in keys[:count]:
            path = draw_sample(layout, sample, f"{tmp}/{sample}.png")
            parts.append(f"## {sample}\n\n{picture_markdown(path, sample)}")
    markdown = "\n\n".join(parts)
    create_markdown_artifact(markdown, key=key, description="labelled samples")
    return markdown


def quality_markdown(root, cfg, key: str) -> str:
    """A markdown artifact: each score's histogram with its threshold, kept and dropped photos with their scores."""
    import tempfile

    from pipeline.show import draw_quality

    layout = DatasetLayout(root)
    with tempfile.TemporaryDirectory() as tmp:
        inlined = picture_markdown(draw_quality(layout, cfg, f"{tmp}/quality.png"), "quality")
    set_ = {name: getattr(cfg, name) for name in ("min_clip_score", "min_aesthetic", "max_watermark", "dedup")}
    thresholds = ", ".join(f"quality.{k} = {v}" for k, v in set_.items() if v is not None) or "none set"
    markdown = (f"# Quality scores of {root}\n\nThresholds: {thresholds} (applied by the label stage; changing one "
                f"needs no rescoring).\n\n{inlined}")
    create_markdown_artifact(markdown, key=key, description="quality scores, thresholds, kept and dropped photos")
    return markdown


class PretrainReporter:
    """pretrain: a progress artifact kept current from metrics.jsonl while Ray Train runs, then the losses as a
    table, and a markdown artifact with the loss curves and the predictions from RGB."""

    def __init__(self, root, steps: int, every: float = 5.0):
        import threading

        self.metrics, self.steps, self.every = run_dir(root) / "metrics.jsonl", steps, every
        self.progress_id = create_progress_artifact(0.0, key="pretrain-progress", description=f"0 of {steps} steps")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _last_step(self) -> int:
        if not self.metrics.is_file():
            return 0
        lines = self.metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0

    def _update(self) -> None:
        step = self._last_step()
        update_progress_artifact(self.progress_id, 100.0 * step / self.steps,
                                 description=f"{step} of {self.steps} steps")

    def _watch(self) -> None:
        while not self.stop.wait(self.every):
            self._update()

    def finish(self, summary: dict) -> str:
        self.stop.set()
        self.thread.join()
        self._update()
        lines = [json.loads(line) for line in self.metrics.read_text().splitlines()]
        rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items()
                 if k == "step" or "loss" in k or k.startswith("samples.")
                 or k in ("samples_per_s", "tokens_per_s", "mfu")} for line in lines]
        create_table_artifact(rows, key="pretrain-losses", description="4M losses per modality (train, validation; "
                                                                         "per dataset in a mixture, with its samples), "
                                                                         "samples/s, tokens/s and MFU per logged step")
        parts = ["# 4M pretraining", f"{summary['steps']} steps on {summary['workers']} worker(s)"]
        pictures = [draw_loss_curves(self.metrics, self.metrics.with_name("losses.png"))]
        if summary.get("predictions"):
            pictures.append(data_path(summary["predictions"]))
        parts += [picture_markdown(picture, picture.stem) for picture in pictures]
        markdown = "\n\n".join(parts)
        create_markdown_artifact(markdown, key="pretrain-pictures", description="loss curves and predictions from RGB")
        return markdown


INLINE_SIDE = 800  # an inlined picture's longest side: a few tens of KB as a JPEG, whatever the picture drawn


def picture_markdown(path, alt: str) -> str:
    """A picture inlined in markdown, scaled down to INLINE_SIDE and stored as a JPEG: an artifact's size stays
    bounded by its number of pictures (a full-size PNG was 0.5 MB)."""
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data_path(path).read_bytes())) as picture:
        picture.thumbnail((INLINE_SIDE, INLINE_SIDE))
        flat = Image.new("RGB", picture.size, "white")
        flat.paste(picture.convert("RGBA"), mask=picture.convert("RGBA").getchannel("A"))
        out = io.BytesIO()
        flat.save(out, "JPEG", quality=85)
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(out.getvalue()).decode()})"


def publish_evaluation(results: dict) -> None:
    """evaluate: a table of scores beside each sample's mean (or majority class), and the predictions picture."""
    rows = [{"modality": name, "metric": metric, "value": round(value, 4),
             "baseline (each sample's mean or majority)": round(scores[f"{metric}_baseline"], 4)}
            for name, scores in results["scores"].items() for metric, value in scores.items()
            if not metric.endswith("_baseline")]
    rows += [{"modality": k.removeprefix("val_loss."), "metric": "masked validation loss", "value": round(v, 4),
              "baseline (each sample's mean or majority)": None} for k, v in results["val_loss"].items()]
    create_table_artifact(rows, key="evaluate-scores",
                          description=f"4M from RGB alone on {results['samples']} held-out samples, against the "
                                      f"pseudo labels")
    create_markdown_artifact(f"# 4M out of the box\n\n{results['samples']} samples of {', '.join(results['val_shards'])}"
                             f"\n\n{picture_markdown(results['picture'], 'predictions')}", key="evaluate-pictures",
                             description="RGB, the pseudo labels and the predictions from RGB alone")


def publish_transfer(results: dict) -> None:
    """transfer: our validation scores beside the paper's Table 1 for the same task, and the training curves."""
    paper = results["paper"]
    columns = [k for k in paper if k != "metric"]
    rows = [{"metric": metric, "ours": round(value, 3),
             **{f"paper {k}": (paper[k] if metric == paper["metric"] else None) for k in columns}}
            for metric, value in results["metrics"].items()]
    create_table_artifact(rows, key="transfer-results",
                          description=f"{results['task']} transfer of {results['backbone']} after {results['steps']} "
                                      f"steps; the paper's figures are on the full dataset")
    folder = data_path(results["folder"])
    curves = draw_transfer_curves(folder / "metrics.jsonl", folder / "curves.png",
                                  f"{results['task']}: {results['backbone']}")
    create_markdown_artifact(f"# {results['task']} transfer\n\n{picture_markdown(curves, 'curves')}",
                             key="transfer-curves", description="training loss and validation scores")


def publish_generation(results: dict, pictures: int = 12) -> None:
    """generate: a table of every sample's texts and files, and the first samples' grids."""
    rows, grids = [], []
    for request in results["requests"]:
        for i, sample in enumerate(request["samples"]):
            rows.append({"request": request["name"], "sample": i, "seed": request["seed"] + i,
                         **{f"{k} text": v["text"] for k, v in sample.items() if isinstance(v, dict) and "text" in v},
                         "grid": sample["grid"]})
            grids.append((f"{request['name']} sample {i}", sample["grid"]))
    create_table_artifact(rows, key="generate-samples", description=f"{len(rows)} samples under {results['out']}")
    shown = "\n\n".join(f"**{title}**\n\n{picture_markdown(path, title)}" for title, path in grids[:pictures])
    more = f"\n\n{len(grids) - pictures} more under {results['out']}" if len(grids) > pictures else ""
    create_markdown_artifact(f"# Generated samples\n\n{shown}{more}", key="generate-pictures",
                             description="the conditions, then every generated modality, per sample")
