"""4M-21's modalities beyond the paper's seven (apple/ml-4m's "4M-21 modalities"), each one registry entry.

Not built in: a profile names this module to work with them (`modalities: [models.modalities_4m21]`), so the paper
profile keeps 4M's seven. So far the weight-free ones: Canny edges (OpenCV) and the colour palette (Pillow's median
cut refined by k-means).
"""
from __future__ import annotations

import json

import numpy as np

from core.registry import RESOLUTION, Labeling, register
from models.labelers import ComputedLabeler
from models.modality_kinds import DenseModality, SequenceModality

CANNY_THRESHOLDS = (100, 200)  # OpenCV's hysteresis thresholds on 8-bit grey, as ControlNet's Canny condition
MOST_COLOURS = 7      # the reference stores a palette of every size from 1 to 7 and reads one at random
PALETTE_SIDE = 128    # the image is reduced to at most this side first: a palette needs no detail


def image_palettes(image: np.ndarray, most: int = MOST_COLOURS, side: int = PALETTE_SIDE) -> dict[str, list]:
    """{"1": [[r, g, b]], ..., "7": [...]}: for each size, the image's colours by median cut refined by k-means,
    the most frequent first (an image with fewer colours gives fewer)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    im.thumbnail((side, side), Image.Resampling.BILINEAR)
    palettes = {}
    for size in range(1, most + 1):
        quantized = im.quantize(colors=size, method=Image.Quantize.MEDIANCUT, kmeans=size)
        flat = quantized.getpalette()
        used = sorted(quantized.getcolors(), key=lambda c: (-c[0], c[1]))  # (pixels, palette index)
        palettes[str(size)] = [flat[3 * index:3 * index + 3] for _, index in used]
    return palettes


def palette_text(stored: list[dict], size: int) -> str:
    """The reference's text for the stored palette of `size` colours: `v1=<colours> v0=<r> v0=<g> v0=<b> ...`."""
    values = [v for colour in stored[0][str(size)] for v in colour]
    return " ".join([f"v1={round(len(values) / 3)}", *(f"v0={round(v)}" for v in values)])


def text_palette(text: str) -> list[list[int]]:
    """The colours a palette text names (a generated one may be cut short: whole colours only)."""
    values = [int(w[3:]) for w in text.split() if w.startswith("v0=") and w[3:].isdigit()]
    return [values[i:i + 3] for i in range(0, len(values) - 2, 3)]


def palette_picture(colours: list[list[int]], size: int = RESOLUTION) -> np.ndarray:
    """The colours as vertical stripes, in [0, 1]; grey without any."""
    picture = np.full((size, size, 3), 0.5, np.float32)
    for i, colour in enumerate(colours):
        picture[:, i * size // len(colours):(i + 1) * size // len(colours)] = np.clip(colour, 0, 255) / 255.0
    return picture


class CannyLabeler(ComputedLabeler):
    """Edges of the image at its own size: 1 on an edge pixel, 0 elsewhere."""

    def compute(self, image):
        import cv2

        grey = cv2.cvtColor(np.ascontiguousarray(image[..., :3]).astype(np.uint8), cv2.COLOR_RGB2GRAY)
        return cv2.Canny(grey, *CANNY_THRESHOLDS) / np.float32(255)


class CannyEdge(DenseModality):
    """Canny edges of the photo, a one-channel 8-bit PNG (255 on an edge); 4M reads them as `tok_canny_edge@224`
    from a tokenizer like RGB's (the reference's `DiVAE` edge tokenizer: 8k codes, diffusion decoder, smooth L1)."""

    name, label_order, colour_map = "canny_edge", 8, "gray"
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_edge_8k_224-512"
    labeler = Labeling(load=CannyLabeler)
    tokenizer = dict(in_channels=1, codebook_size=8192, decoder="diffusion", loss="smooth_l1")


class PaletteLabeler(ComputedLabeler):
    def compute(self, image):
        return image_palettes(image)


class ColorPalette(SequenceModality):
    """The image's colour palette: stored as the reference's JSON (`[{"1": [[r, g, b]], ..., "7": [...]}]`), read
    by 4M as `v1=<n>` then three `v0=` values per colour, in the caption vocabulary."""

    name, label_order, extension = "color_palette", 7, "json"
    max_tokens = 23  # v1= and 21 values of seven colours, [EOS]: the reference's budget
    labeler = Labeling(load=PaletteLabeler)

    def encode(self, label) -> bytes:
        return json.dumps([label]).encode()

    def decode(self, data: bytes):
        return json.loads(data)

    def corpus_text(self, data):
        return palette_text(self.decode(data), MOST_COLOURS)

    def to_text(self, data, crop, image_size, min_score, rng: np.random.Generator | None = None):
        """A palette of 1 to 7 colours drawn from `rng`, as the reference draws one each time it loads a sample;
        all seven without one (validation)."""
        size = MOST_COLOURS if rng is None else int(rng.integers(1, MOST_COLOURS + 1))
        return palette_text(self.decode(data), size)

    def generated(self, text):
        return {"colours": text_palette(text)}

    def picture(self, stored, photo):
        return palette_picture(stored[0][str(MOST_COLOURS)])

    def generated_picture(self, extras, photo):
        return palette_picture(extras.get("colours", []))


register(CannyEdge())
register(ColorPalette())
