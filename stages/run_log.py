"""What a training run shows while it runs: each log step's figures in `metrics.jsonl` (one JSON line) and in
TensorBoard event files beside it (`<run>/tensorboard/`), its pictures (reconstructions, predictions) as images.

The loop (`stages/training.py`) writes through one `RunLog` on rank 0, so every run the project trains (the
tokenizers, 4M, transfers) can be watched live with the TensorBoard that `python -m pipeline up` starts on the data
root, or read afterwards from the JSON lines; with `wandb.mode` offline or online, in Weights & Biases too.
Figures named `loss.caption`, `val_loss.caption` become the tags `loss/caption`, `val_loss/caption` (in both), so
each family is one chart with a curve per modality.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EVENTS = "tensorboard"  # the event files' folder inside a run's folder


def tag(name: str) -> str:
    """A figure's TensorBoard tag: its family before the first dot, then the rest (loss.tok_rgb@224 -> loss/...)."""
    family, dot, rest = name.partition(".")
    return f"{family}/{rest}" if dot else name


def wandb_run(folder: Path, settings: dict, name: str):
    """A W&B run for a training run's folder (`settings`: WandbConfig's fields), or None when it is off. Its id is
    derived from the folder, so a resumed run continues the same W&B run; offline, it is written in
    `<folder>/wandb/` for `wandb sync`."""
    if not settings or settings.get("mode", "off") == "off":
        return None
    import hashlib

    import wandb

    run_id = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=settings.get("project"), entity=settings.get("entity"), name=name, id=run_id,
                      resume="allow", dir=str(folder), mode=settings["mode"], config={"folder": str(folder)},
                      settings=wandb.Settings(silent=True, console="off"))


class RunLog:
    """Appends figures to metrics.jsonl and to TensorBoard (and to W&B where `wandb` asks); adds a picture file as
    an image when it changed."""

    def __init__(self, folder: str | Path, wandb: dict | None = None, name: str = "run"):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder / EVENTS))
        self.seen: dict[Path, int] = {}
        self.wandb = wandb_run(self.folder, wandb or {}, name)

    def write(self, line: dict) -> None:
        with open(self.folder / "metrics.jsonl", "a") as log:
            log.write(json.dumps(line) + "\n")
        step = int(line["step"])
        figures = {tag(name): float(value) for name, value in line.items()
                   if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for name, value in figures.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # live: TensorBoard reads what is on disk
        if self.wandb is not None:
            self._wandb_log(figures, step)

    def settings(self, values: dict) -> None:
        """The run's settings, once: a text panel in TensorBoard, the W&B run's config."""
        text = json.dumps(values, indent=1, default=str)
        self.writer.add_text("settings", "```\n" + text + "\n```", 0)  # markdown: kept as written
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.config.update(json.loads(text), allow_val_change=True)

    def pictures(self, paths: list[Path], step: int) -> None:
        """Each picture written since the last call (by its modification time), as an image at `step`."""
        from PIL import Image

        for path in map(Path, paths):
            if not path.is_file() or self.seen.get(path) == path.stat().st_mtime_ns:
                continue
            self.seen[path] = path.stat().st_mtime_ns
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"pictures/{path.stem}", pixels, step, dataformats="HWC")
            if self.wandb is not None:
                import wandb

                self._wandb_log({f"pictures/{path.stem}": wandb.Image(pixels)}, step)
        self.writer.flush()

    def _wandb_log(self, values: dict, step: int) -> None:
        """Into the step's row, left open for the pictures of the same step (a later step or `close` commits it);
        W&B refuses steps below its own, so a resumed run's late picture goes to its current step."""
        self.wandb.log(values, step=max(step, self.wandb.step), commit=False)

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            # finish() returns before W&B's service has flushed and closed the run's file; a Ray Train worker is
            # then killed without the atexit hook that would wait, leaving `wandb sync` a cut-short run
            wandb.teardown()
