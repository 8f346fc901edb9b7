"""What a training run shows while it runs: each log step's figures in `metrics.jsonl` (one JSON line) and in
TensorBoard event files beside it (`<run>/tensorboard/`), its pictures (reconstructions, predictions) as images.

The loop (`stages/training.py`) writes through one `RunLog` on rank 0, so every run the project trains (the
tokenizers, 4M, transfers) can be watched live with the TensorBoard that `python -m pipeline up` starts on the data
root, or read afterwards from the JSON lines. Figures named `loss.caption`, `val_loss.caption` become the
TensorBoard tags `loss/caption`, `val_loss/caption`, so each family is one chart with a curve per modality.
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


class RunLog:
    """Appends figures to metrics.jsonl and to TensorBoard; adds a picture file as an image when it changed."""

    def __init__(self, folder: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder / EVENTS))
        self.seen: dict[Path, int] = {}

    def write(self, line: dict) -> None:
        with open(self.folder / "metrics.jsonl", "a") as log:
            log.write(json.dumps(line) + "\n")
        step = int(line["step"])
        for name, value in line.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(name), float(value), step)
        self.writer.flush()  # live: TensorBoard reads what is on disk

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
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
