"""4M-21's modalities beyond the paper's seven (apple/ml-4m's "4M-21 modalities"), each one registry entry.

Not built in: a profile names this module to work with them (`modalities: [models.modalities_4m21]`), so the paper
profile keeps 4M's seven. So far the weight-free ones: Canny edges (OpenCV), the colour palette (Pillow's median
cut refined by k-means) and the metadata (the reference's image statistics, from the image and its other labels).
"""
from __future__ import annotations

import json

import numpy as np

from core.pictures import text_picture
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




# -- metadata: the reference's image statistics (`MetadataTransform`), from the image and the labels beside it --
WALKABLE = ("floor-wood", "floor-other-merged", "road", "pavement-merged", "grass-merged", "sand", "dirt-merged",
            "gravel", "playingfield", "railroad", "rug-merged", "snow", "platform", "stairs")  # COCO panoptic stuff
DEPTH_JUMP = 0.05      # a neighbour this much nearer or farther (of the map's depth range): an occlusion edge
# The reference's metadata ids (v1=) and how each value becomes a v0= bin: image sides in 32-pixel bins, counts as
# they are (at most 999), the rest in 50 bins over (low, high); a statistic whose source is not there (SAM instances
# not labelled, no quality scores) is left out of the text, as the reference leaves out a missing key.
METADATA_IDS = {
    "original_width": 0, "original_height": 1, "caption_n_chars": 2, "caption_n_words": 3, "caption_n_sentences": 4,
    "n_humans": 5, "n_sam_instances": 6, "n_coco_instances": 7, "coco_instance_diversity": 8, "colorfulness": 9,
    "brightness": 10, "contrast": 11, "saturation": 12, "entropy": 13, "walkability": 14, "objectness": 15,
    "semantic_diversity": 16, "geometric_complexity": 17, "occlusion_score": 18, "watermark_score": 19,
    "aesthetic_score": 20,
}
SIDE_BIN = 32
MOST_COUNT = 999
FIFTY_BINS = {"colorfulness": (0, 150), "brightness": (0, 255), "contrast": (0, 127), "saturation": (0, 255),
              "entropy": (0, 10), "walkability": (0, 1), "objectness": (0, 1), "geometric_complexity": (0, 0.75),
              "occlusion_score": (0, 0.25)}
THRESHOLD_BINS = {"watermark_score": (0.5,), "aesthetic_score": (4.5, 5.5)}


def metadata_bin(key: str, value: float) -> int:
    if key in ("original_width", "original_height"):
        return max(0, min(int(value) // SIDE_BIN, MOST_COUNT))
    if key in THRESHOLD_BINS:
        return sum(value >= edge for edge in THRESHOLD_BINS[key])
    if key in FIFTY_BINS:
        low, high = FIFTY_BINS[key]
        return int((max(low, min(value, high)) - low) / (high - low) * 49)
    return max(0, min(int(value), MOST_COUNT))


def metadata_chunks(stored: dict, order: list[str] | None = None) -> list[str]:
    """`v1=<id> v0=<bin>` per statistic, in the stored order or `order`: the reference masks them as whole chunks."""
    return [f"v1={METADATA_IDS[key]} v0={metadata_bin(key, stored[key])}" for key in (order or list(stored))]


def image_statistics(image: np.ndarray) -> dict[str, float]:
    """Size, colourfulness (Hasler and Suesstrunk), brightness and RMS contrast of the grey image, mean HSV
    saturation, and the grey histogram's entropy in bits."""
    import cv2

    rgb = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    counts = np.bincount(grey.ravel(), minlength=256) / grey.size
    counts = counts[counts > 0]
    return {"original_width": int(rgb.shape[1]), "original_height": int(rgb.shape[0]),
            "colorfulness": float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())),
            "brightness": float(grey.mean()), "contrast": float(grey.std()),
            "saturation": float(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].mean()),
            "entropy": float(-(counts * np.log2(counts)).sum())}


def caption_statistics(caption: str) -> dict[str, int]:
    import re

    return {"caption_n_chars": len(caption), "caption_n_words": len(caption.split()),
            "caption_n_sentences": len([s for s in re.split(r"[.!?]+", caption) if s.strip()])}


def instance_statistics(instances: list[dict], min_score: float) -> dict[str, int]:
    kept = [i for i in instances if i.get("score", 1.0) >= min_score]
    return {"n_humans": sum(i["class_name"] == "person" for i in kept), "n_coco_instances": len(kept),
            "coco_instance_diversity": len({i["class_name"] for i in kept})}


def segmentation_statistics(classes: np.ndarray, names: list[str], things: int) -> dict[str, float]:
    """Distinct classes, the share of pixels one could walk on, and the share covered by objects (things)."""
    walkable = [names.index(n) for n in WALKABLE]
    return {"semantic_diversity": int(len(np.unique(classes))), "walkability": float(np.isin(classes, walkable).mean()),
            "objectness": float((classes < things).mean())}


def geometry_statistics(depth: np.ndarray | None, normal: np.ndarray | None) -> dict[str, float]:
    """Geometric complexity: the normals' circular variance (1 - length of the mean unit normal); occlusion: the
    share of pixels with a depth jump to a neighbour above DEPTH_JUMP of the map's range."""
    out = {}
    if normal is not None:
        vectors = np.asarray(normal, np.float32).reshape(-1, 3) / 255.0 * 2 - 1
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-6)
        out["geometric_complexity"] = max(0.0, float(1 - np.linalg.norm(vectors.mean(0))))
    if depth is not None:
        d = np.asarray(depth, np.float32)
        d = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)
        jumps = np.zeros(d.shape, bool)
        jumps[:, 1:] |= np.abs(np.diff(d, axis=1)) > DEPTH_JUMP
        jumps[1:] |= np.abs(np.diff(d, axis=0)) > DEPTH_JUMP
        out["occlusion_score"] = float(jumps.mean())
    return out


class MetadataLabeler(ComputedLabeler):
    """The statistics of one sample: its image's, and those of its caption, boxes, classes, depth and normals, its
    SAM instances (where labelled) and its watermark and aesthetic scores (where the quality stage scored it)."""

    def __init__(self, path=None, device="cpu", batch_size=8, min_score: float = 0.0, **options):
        super().__init__(path, device, batch_size, **options)
        self.min_score = min_score  # boxes scored below it are not counted (label.det_min_score)

    def compute(self, sample: dict) -> dict:
        from models.coco import COCO_PANOPTIC, COCO_THINGS

        found = image_statistics(sample["image"])
        if sample.get("caption") is not None:
            found.update(caption_statistics(sample["caption"]))
        if sample.get("det") is not None:
            found.update(instance_statistics(sample["det"], self.min_score))
        if sample.get("semseg") is not None:
            found.update(segmentation_statistics(sample["semseg"], COCO_PANOPTIC, len(COCO_THINGS)))
        found.update(geometry_statistics(sample.get("depth"), sample.get("normal")))
        if sample.get("sam_instance") is not None:
            found["n_sam_instances"] = len(sample["sam_instance"].get("instances", []))
        scores = sample.get("quality") or {}
        found.update({name: scores[score] for name, score in (("watermark_score", "watermark"),
                                                               ("aesthetic_score", "aesthetic"))
                      if scores.get(score) is not None})
        return {key: found[key] for key in sorted(found, key=METADATA_IDS.__getitem__)}


def metadata_values(text: str) -> dict[str, int]:
    """The bins a (generated) metadata text names, by statistic."""
    names, values, words = {i: k for k, i in METADATA_IDS.items()}, {}, text.split()
    for first, second in zip(words, words[1:]):
        if first.startswith("v1=") and second.startswith("v0=") and first[3:].isdigit() and second[3:].isdigit():
            if int(first[3:]) in names:
                values[names[int(first[3:])]] = int(second[3:])
    return values


class Metadata(SequenceModality):
    """The reference's image statistics, stored as its JSON (`{"brightness": 112.3, ...}`, raw values) and read by
    4M as `v1=<statistic> v0=<bin>` chunks in the caption vocabulary, masked whole; training shuffles their order
    at each load, as the reference does."""

    name, label_order, extension = "metadata", 9, "json"
    max_tokens = 40  # the reference's budget: about 19 statistics of two tokens, [EOS]
    labeler = Labeling(load=MetadataLabeler, reads=("caption", "det", "semseg", "depth", "normal"),
                       reads_if_present=("sam_instance",), reads_quality=True,
                       options=lambda cfg: {"min_score": cfg.det_min_score})

    def encode(self, label) -> bytes:
        return json.dumps(label).encode()

    def decode(self, data: bytes):
        return json.loads(data)

    def corpus_text(self, data):
        return " ".join(metadata_chunks(self.decode(data)))

    def to_text(self, data, crop, image_size, min_score, rng: np.random.Generator | None = None):
        """The chunks in a random order drawn from `rng` (training), in the stored order without one."""
        stored = self.decode(data)
        order = list(stored)
        if rng is not None:
            order = [order[i] for i in rng.permutation(len(order))]
        return metadata_chunks(stored, order)

    def generated(self, text):
        return {"metadata": metadata_values(text)}

    def picture(self, stored, photo):
        return text_picture([f"{key} {value:.3g}" for key, value in stored.items()])

    def generated_picture(self, extras, photo):
        return text_picture([f"{key} bin {value}" for key, value in extras.get("metadata", {}).items()])


register(CannyEdge())
register(ColorPalette())
register(Metadata())
