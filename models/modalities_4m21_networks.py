"""4M-21's modalities that networks make (DINOv2's features and global vector, T5 caption embeddings, SAM's
instances and their edges), each one registry entry.

Not built in, and apart from the weight-free ones (`models/modalities_4m21.py`) so that a profile can have those
without these: the `paper21` profile names both, with real weights; tests use tiny random-weight models of the
same classes.
"""
from __future__ import annotations

import json

import numpy as np

from core import pictures
from core.registry import Labeling, Modality, register
from models import labelers, random_weights
from models.labelers import ComputedLabeler
from models.modality_kinds import DenseModality, EmbeddingSequenceModality, FeatureMapModality, GlobalFeatureModality


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


class SamInstance(Modality):
    """SAM ViT-H's automatic instances (`label.options.sam_instance`: points_per_side 32, pred_iou_thresh 0.88,
    stability_score_thresh 0.95, SAM's own), each its largest outer contour: JSON `{"instances": [{"polygon":
    [[x, y], ...] in the image's pixels, "score": predicted IoU}]}`, best first (the reference keeps contours too).
    4M's `sam_instance` sequence reads them pretokenized by the reference's SAM-instance mask tokenizer per crop;
    that form is not built here yet, so the entry has no 4M domain: it is labelled, drawn and feeds `sam_edge`."""

    name, label_order, extension = "sam_instance", 16, "json"
    labeler = Labeling(load=labelers.SamLabeler, weights="facebook/sam-vit-huge", random_model=random_weights.sam)

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
