"""4M-21's modalities that networks make (DINOv2's features and global vector, T5 caption embeddings, SAM's
instances and their edges), each one registry entry.

Not built in, and apart from the weight-free ones (`models/modalities_4m21.py`) so that a profile can have those
without these: the `paper21` profile names both, with real weights; tests use tiny random-weight models of the
same classes.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from core import pictures
from core.registry import RESOLUTION, Labeling, register
from models import labelers, random_weights
from models.labelers import ComputedLabeler
from models.modality_kinds import (
    DenseModality,
    EmbeddingSequenceModality,
    FeatureMapModality,
    GlobalFeatureModality,
    sequence_domains,
)


class Dinov2(FeatureMapModality):
    """DINOv2 ViT-B/14 patch features (768-d), one per 14x14 patch at shortest side 224: 16x16 tokens at 224."""

    name, label_order, token_grid = "dinov2", 10, 16
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_DINOv2-B14_8k_224-448"
    labeler = Labeling(load=labelers.Dinov2Labeler, weights="facebook/dinov2-base",
                       random_model=random_weights.dinov2, options=lambda cfg: {"short_side": 224})
    # the reference's DINOv2-B14 tokenizer config: ViT-B, 8k codes, smooth L1, crops from 0.2 of the area
    tokenizer = dict(in_channels=768, codebook_size=8192, decoder="vit", loss="smooth_l1", patch_size=1,
                     crop_scale=(0.2, 1.0), dtype="bfloat16")
    # per crop for a published tokenizer: its own options (224, ImageNet's mean and std, as the tokenizer's training)


class Dinov2Global(GlobalFeatureModality):
    """DINOv2 ViT-B/14's global vector (the normalised class token, 768-d) at shortest side 224: 16 tokens, one per
    Memcodes codebook."""

    name, label_order = "dinov2_global", 11
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_DINOv2-B14-global_8k_16_224"
    labeler = Labeling(load=labelers.Dinov2GlobalLabeler, weights="facebook/dinov2-base",
                       random_model=random_weights.dinov2, options=lambda cfg: {"short_side": 224})
    # the reference's DINOv2-B14-global tokenizer: BottleneckMLP B_6-Wi_1024 both sides, Memcodes with 8,192 codes
    # (its published one: 16 codebooks, 16 tokens), 1 - cosine similarity, crops from 0.2 of the area
    tokenizer = dict(in_channels=768, codebook_size=8192, decoder="mlp", num_codebooks=16, loss="cosine",
                     patch_size=1, crop_scale=(0.2, 1.0), dtype="bfloat16")


class T5Caption(EmbeddingSequenceModality):
    """The caption through T5-XXL's encoder: 4096-d vectors, one per token, at most 77; an input only (the
    reference's `seq_emb`: 4M reads them through a linear projection and never predicts them)."""

    name, label_order = "t5_caption", 12
    labeler = Labeling(load=labelers.TextEncoderLabeler, weights="google/t5-v1_1-xxl",
                       random_model=random_weights.t5_encoder, reads=("caption",),
                       options=lambda cfg: {"max_length": T5Caption.max_tokens})


MASK_SIDE = 64        # each instance's mask, cut to its box (the reference's mask_size)
TINY_BOX = 0.0005     # instances whose box covers less of the 224 crop are dropped (its bbox_area_threshold)
QUERY_POINTS = 7      # points a text answers for: drawn anew at each training load, a 7x7 grid's diagonal-free
                      # 49 in validation (the reference's points_per_side 7, random and grid orders)
ID_HALF = 512         # an instance's token ids as words: v0=<id> below 512, v1=<id - 512> above (the reference's)


def crop_instances(stored: dict, crop, image_size, side: int = RESOLUTION) -> list[tuple[np.ndarray, list[int]]]:
    """The instances in a crop [top, left, h, w, flip] of the image, at side x side pixels: each (outline (N, 2)
    int32 in the crop's pixels, box [ymin, xmin, ymax, xmax]). A polygon is filled at the crop's size and outlined
    again, which cuts an instance crossing the crop's border to its part inside; tiny boxes are dropped."""
    import cv2

    top, left, h, w = (float(v) for v in crop[:4])
    found = []
    for instance in stored["instances"]:
        points = np.asarray(instance["polygon"], np.float64).reshape(-1, 2)
        xy = np.stack([(points[:, 0] - left) * side / w, (points[:, 1] - top) * side / h], 1)
        if int(crop[4]):
            xy[:, 0] = side - xy[:, 0]
        canvas = np.zeros((side, side), np.uint8)
        cv2.fillPoly(canvas, [np.round(xy).astype(np.int32)], 1)
        if not canvas.any():
            continue
        contours, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outline = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.int32)
        (xmin, ymin), (xmax, ymax) = outline.min(0), outline.max(0)
        if (xmax - xmin) * (ymax - ymin) < TINY_BOX * side * side:
            continue
        found.append((outline, [int(ymin), int(xmin), int(ymax), int(xmax)]))
    return found


def instance_mask(outline: np.ndarray, box) -> np.ndarray:
    """An instance's outline filled inside its box, stretched to MASK_SIDE x MASK_SIDE, in {0, 1}."""
    import cv2

    ymin, xmin, ymax, xmax = box
    scale = np.array([MASK_SIDE / max(xmax - xmin, 1), MASK_SIDE / max(ymax - ymin, 1)])
    mask = np.zeros((MASK_SIDE, MASK_SIDE), np.uint8)
    cv2.fillPoly(mask, [((outline - [xmin, ymin]) * scale).astype(np.int32)], 1)
    return mask.astype(np.float32)


def grid_points(side: int = RESOLUTION, per_side: int = QUERY_POINTS) -> np.ndarray:
    """The validation query points (x, y): a per_side x per_side grid inside the crop, in the reference's order."""
    inner = np.linspace(0, side, per_side + 2)[1:-1]
    ys, xs = np.meshgrid(inner, inner)
    return np.stack((xs, ys), axis=2).astype(np.int32).reshape(-1, 2)


def instances_text(instances: list[tuple[np.ndarray, list[int], list[int]]], points: np.ndarray,
                   rng: np.random.Generator | None) -> str:
    """The reference's text: per query point (x, y), `point v0=<y> v1=<x>`, then each instance whose outline holds
    it, `polygon` with its box `v0=<xmin> v1=<ymin> v2=<xmax> v3=<ymax>` and its token ids, or `none`. With `rng`
    (training) the points and each point's instances come in a drawn order."""
    import cv2

    words = []
    for p in (points if rng is None else points[rng.permutation(len(points))]):
        x, y = int(p[0]), int(p[1])
        holding = [(box, ids) for outline, box, ids in instances
                   if cv2.pointPolygonTest(outline.reshape(-1, 1, 2), (x, y), True) >= 0]
        if rng is not None:
            holding = [holding[i] for i in rng.permutation(len(holding))]
        words += ["point", f"v0={y}", f"v1={x}"]
        for (ymin, xmin, ymax, xmax), ids in holding:
            words += ["polygon", f"v0={xmin}", f"v1={ymin}", f"v2={xmax}", f"v3={ymax}"]
            words += [f"v0={i}" if i < ID_HALF else f"v1={i - ID_HALF}" for i in ids]
        if not holding:
            words.append("none")
    return " ".join(words)


def text_instances(text: str, tokens: int) -> list[dict]:
    """The whole instances a (generated) text names: box (xmin, ymin, xmax, ymax) and `tokens` ids each."""
    found, words = [], text.split()
    for i, word in enumerate(words):
        if word != "polygon":
            continue
        part = words[i + 1:i + 5 + tokens]
        names = [w.split("=", 1) for w in part]
        if len(part) < 4 + tokens or any(len(n) != 2 or not n[1].isdigit() for n in names):
            continue
        values = [int(v) for _, v in names]
        if [n for n, _ in names[:4]] != ["v0", "v1", "v2", "v3"]:
            continue
        ids = [v + (ID_HALF if n == "v1" else 0) for (n, _), v in zip(names[4:], values[4:])]
        found.append({"box": values[:4], "token_ids": ids})
    return found


class SamInstance(DenseModality):
    """SAM ViT-H's automatic instances (`label.options.sam_instance`: points_per_side 32, pred_iou_thresh 0.88,
    stability_score_thresh 0.95, SAM's own), each its largest outer contour: JSON `{"instances": [{"polygon":
    [[x, y], ...] in the image's pixels, "score": predicted IoU}]}`, best first (the reference keeps contours too).

    4M reads the reference's `sam_instance` sequence (in the caption vocabulary, at most 290 tokens), made in two
    steps as the reference's. Pre-tokenization: on each crop, every instance cut to the crop (at 224), its box,
    and its mask inside the box (64x64) through the SAM-instance mask tokenizer (the reference's: ViT-B both sides,
    ConvNeXt output blocks, 1,024 codes, 4x4 = 16 tokens, binary cross-entropy); stored per crop in
    `tok_sam_instance/` as JSON `[{"points": [[outline]], "token_ids": [[16 ids]], "bbox": [[ymin, xmin, ymax,
    xmax]]}, ...]`, the reference's per-crop record with lists for its arrays (the reference reads a pickled .npy
    from a folder named `sam_instance`; ours is not pickled, and its loader reads ours with a `path` entry and
    `np.asarray`). Loading: 7 query points drawn per load, and per point the instances holding it
    (`instances_text`)."""

    name, label_order, extension = "sam_instance", 16, "json"
    kind = "sequence"              # what 4M reads of it is text; the text tokenizer learns its words from it
    channels, colour_map, metric_name, baseline_name = 1, "gray", "mask_iou", "the batch's mean mask"
    condition_from_image = False
    needs_photo = False
    token_grid = 4
    max_tokens = 290
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_sam-instance_1k_64"
    labeler = Labeling(load=labelers.SamLabeler, weights="facebook/sam-vit-huge", random_model=random_weights.sam)
    # the reference's sam_instance ViTB-ViTB_1k_224_64 config: masks of 64, 16-pixel patches, latent 1024
    tokenizer = dict(in_channels=1, codebook_size=1024, decoder="vit", loss="bce", input_size=MASK_SIDE,
                     latent_dim=1024, out_conv=True, crop_scale=(0.8, 1.0))

    pretokenized = True            # tok_sam_instance/: each crop's instances, boxes and ids

    def domains(self):
        return sequence_domains(self)

    # -- storage --------------------------------------------------------------------------------------------
    def encode(self, label) -> bytes:
        return json.dumps(label).encode()

    def decode(self, data: bytes):
        return json.loads(data)

    def check_label(self, label) -> None:
        if not isinstance(label, dict) or not all(np.shape(i.get("polygon"))[-1:] == (2,)
                                                  for i in label.get("instances", [None])):
            raise ValueError('sam_instance: expected {"instances": [{"polygon": [[x, y], ...], "score": s}]}')

    def picture(self, stored, photo):
        import cv2

        base = np.asarray(photo, np.float32) / 255.0
        overlay = base.copy()
        for i, instance in enumerate(stored["instances"]):
            colour = pictures.palette_picture(np.array([[i]]))[0, 0]
            cv2.fillPoly(overlay, [np.asarray(instance["polygon"], np.int32)], tuple(float(c) for c in colour))
        return 0.5 * base + 0.5 * overlay

    # -- the mask tokenizer: one instance's mask in its box --------------------------------------------------
    def to_tensor(self, label, crop, image_size):
        """One instance of the crop (drawn by the crop's own numbers; the reference trains on one at random) as
        its mask (1, 64, 64) in {0, 1}; None without one (left out of the tokenizer's training)."""
        found = crop_instances(label, crop, image_size)
        if not found:
            return None
        outline, box = found[int(np.random.default_rng([int(v) for v in crop]).integers(len(found)))]
        return torch.from_numpy(instance_mask(outline, box))[None]

    def crops_input(self, label, crops, image_size):
        """Every instance of every crop: masks (N, 1, 64, 64), and per crop its instances' outlines and boxes."""
        layout = [crop_instances(label, crop, image_size) for crop in crops]
        masks = [instance_mask(outline, box) for found in layout for outline, box in found]
        return (torch.from_numpy(np.stack(masks))[:, None] if masks else torch.zeros(0, 1, MASK_SIDE, MASK_SIDE)), \
            layout

    def token_member(self, ids, layout):
        records, start = [], 0
        for found in layout:
            records.append({"points": [[outline.tolist()] for outline, _ in found],
                            "token_ids": ids[start:start + len(found)].astype(int).tolist(),
                            "bbox": [box for _, box in found]})
            start += len(found)
        return "json", json.dumps(records).encode()

    def reference_tokenizer_problems(self, cfg):
        if cfg.n_channels != 1 or cfg.n_labels or not cfg.patch_proj:
            return [f"{self.name} is one-channel masks: the tokenizer reads n_channels={cfg.n_channels}, "
                    f"n_labels={cfg.n_labels}, patch_proj={cfg.patch_proj}"]
        return []

    def from_reference_output(self, y):
        return torch.sigmoid(y.float())  # the decoder gives logits

    def tensor_picture(self, x):
        return pictures.colormap_picture(x.float().clamp(0, 1).cpu()[0].numpy(), self.colour_map)

    def metric(self, reconstruction, target):  # intersection over union of the masks at 0.5
        a, b = reconstruction > 0.5, target > 0.5
        union = (a | b).flatten(1).sum(1).clamp(min=1)
        return self.metric_name, float(((a & b).flatten(1).sum(1) / union).mean())

    def baseline(self, target, classes=None):
        return target.float().mean(0, keepdim=True).expand_as(target)

    # -- 4M's sequence --------------------------------------------------------------------------------------
    def crop_part(self, data, index):
        return json.loads(data)[index]

    @staticmethod
    def _instances(record) -> list:
        return [(np.asarray(points[0], np.int32).reshape(-1, 2), box, ids)
                for points, box, ids in zip(record["points"], record["bbox"], record["token_ids"])]

    def to_text(self, record, crop, image_size, min_score, rng=None):
        """A crop's record -> the text for 7 query points drawn from `rng` (training), or the 7x7 grid's 49."""
        points = grid_points() if rng is None else rng.integers(0, RESOLUTION, (QUERY_POINTS, 2))
        return instances_text(self._instances(record), points, rng)

    def corpus_text(self, data):
        """Its words for the text tokenizer: the instances' boxes at the image's extent, queried on the grid."""
        stored = self.decode(data)
        corners = [np.asarray(i["polygon"]).reshape(-1, 2).max(0) for i in stored["instances"]]
        w, h = (np.max(corners, axis=0) + 1) if corners else (RESOLUTION, RESOLUTION)
        found = crop_instances(stored, [0, 0, h, w, 0], None)
        return instances_text([(outline, box, []) for outline, box in found], grid_points(), None)

    def condition_text(self, value):
        return str(value)

    def generated(self, text):
        return {"instances": text_instances(text, self.token_grid ** 2)}

    def generated_picture(self, extras, photo):
        """The generated instances' boxes over the photo (their masks need the mask tokenizer: `decode-tokens`)."""
        import cv2

        base = np.full((RESOLUTION, RESOLUTION, 3), 0.5, np.float32) if photo is None else \
            cv2.resize(np.asarray(photo, np.float32) / 255.0, (RESOLUTION, RESOLUTION))
        for i, instance in enumerate(extras.get("instances", [])):
            xmin, ymin, xmax, ymax = instance["box"]
            colour = tuple(float(c) for c in pictures.palette_picture(np.array([[i]]))[0, 0])
            cv2.rectangle(base, (xmin, ymin), (xmax, ymax), colour, 2)
        return base


class SamEdgeLabeler(ComputedLabeler):
    """The outlines of the sample's SAM instances, one pixel wide, at the image's size (1 on an outline)."""

    def compute(self, sample):
        import cv2

        instances = sample["sam_instance"]
        if instances is None:
            raise ValueError("no sam_instance label for this sample")
        edges = np.zeros(sample["image"].shape[:2], np.uint8)
        cv2.polylines(edges, [np.asarray(i["polygon"], np.int32) for i in instances["instances"]], True, 255, 1)
        return edges / np.float32(255)


class SamEdge(DenseModality):
    """Edges of SAM's instances (drawn from the stored sam_instance polygons, no weights), a one-channel PNG; 4M
    reads them as `tok_sam_edge@224` from an edge tokenizer like Canny's (diffusion decoder, 8k codes)."""

    name, label_order, colour_map = "sam_edge", 17, "gray"
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_edge_8k_224-512"
    labeler = Labeling(load=SamEdgeLabeler, reads=("sam_instance",))
    tokenizer = dict(in_channels=1, codebook_size=8192, decoder="diffusion", loss="smooth_l1")


register(Dinov2())
register(Dinov2Global())
register(T5Caption())
register(SamInstance())
register(SamEdge())
