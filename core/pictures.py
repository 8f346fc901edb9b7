"""Pictures: arrays in [0, 1] for people to look at, and figures saved whole.

Every modality draws itself through these (its registry entry says which): a colour map for one-channel maps,
a palette for class ids, the first three principal components for feature maps, boxes drawn on an image,
statistics as lines of text.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.files import atomic_path
from core.storage import data_path


def colormap_picture(values: np.ndarray, name: str = "turbo", stretch: bool = False) -> np.ndarray:
    """A (H, W) map in [0, 1] -> RGB; `stretch` spreads each map's own 2nd..98th percentile over the colours."""
    import matplotlib

    values = np.asarray(values, np.float32)
    if stretch:
        low, high = np.nanpercentile(values, [2, 98])  # NaN: no value (drawn apart)
        values = (values - low) / max(high - low, 1e-6)
    return matplotlib.colormaps[name](np.clip(values, 0, 1))[..., :3]


def palette_picture(ids: np.ndarray, colours: int = 20) -> np.ndarray:
    """Class ids (H, W) -> RGB, one of `colours` colours per class (tab20)."""
    import matplotlib

    return matplotlib.colormaps["tab20"]((np.asarray(ids) % colours) / (colours - 1))[..., :3]


def pca_picture(features: np.ndarray) -> np.ndarray:
    """First three principal components of a (h, w, D) feature map, scaled to [0, 1] for display."""
    flat = features.reshape(-1, features.shape[-1]).astype(np.float32)
    flat -= flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    proj = flat @ vt[:3].T
    if proj.shape[1] < 3:  # fewer than three channels: pad so the picture stays RGB
        proj = np.concatenate([proj, np.zeros((len(proj), 3 - proj.shape[1]), np.float32)], 1)
    proj = (proj - proj.min(0)) / np.maximum(proj.max(0) - proj.min(0), 1e-6)
    return proj.reshape(*features.shape[:2], 3)


def boxes_picture(picture: np.ndarray | None, boxes: list[dict], size: int | None = None) -> np.ndarray:
    """Boxes (normalised xmin, ymin, xmax, ymax; class_name; score if known) drawn on a picture in [0, 1], or on
    grey. `size` resizes the picture to size x size first (generation draws on 224-pixel crops)."""
    import cv2

    if picture is None:
        picture = np.full((size or 224, size or 224, 3), 0.85, np.float32)
    canvas = np.ascontiguousarray(np.clip(picture, 0, 1) * 255).astype(np.uint8)  # OpenCV draws text on 8 bits
    if size:
        canvas = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_NEAREST)
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 150))
    for box in boxes:
        x0, y0, x1, y1 = box["boxes"]
        x0, x1 = (int(round(c * (width - 1))) for c in (x0, x1))
        y0, y1 = (int(round(c * (height - 1))) for c in (y0, y1))
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (255, 25, 25), thickness)
        label = box["class_name"] + (f" {box['score']:.2f}" if "score" in box else "")
        cv2.putText(canvas, label, (x0 + 2, max(10, y0 + 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.35 * thickness,
                    (255, 25, 25), 1)
    return canvas.astype(np.float32) / 255.0


def text_picture(lines: list[str], size: int = 224) -> np.ndarray:
    """Lines of text (statistics, a sequence) in black on a light square, one line per 20th of its side."""
    import cv2

    canvas = np.full((size, size, 3), 235, np.uint8)
    step = max(10, size // 20)
    for i, line in enumerate(lines[:size // step - 1]):
        cv2.putText(canvas, line, (6, step * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, size / 600, (20, 20, 20), 1)
    return canvas.astype(np.float32) / 255.0


def png_bytes(picture: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def save_figure(fig, out: str | Path, dpi: int, metadata: dict | None = None, tight: bool = True) -> Path:
    """Laid out, written aside and renamed into place (a reader never sees half a PNG), then closed."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        if not ax.axison:  # ticks hidden are still laid out and measured (most of a picture's time): drop them
            ax.set_xticks([])
            ax.set_yticks([])
    if tight:
        fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, metadata=metadata)
    plt.close(fig)
    return data_path(out)


def figure_backend():
    """matplotlib's pyplot on the file-only backend (no display on workers and servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
