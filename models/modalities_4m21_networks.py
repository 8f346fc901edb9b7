"""4M-21's modalities that networks make (DINOv2, T5 caption embeddings), each one registry entry.

Not built in, and apart from the weight-free ones (`models/modalities_4m21.py`) so that a profile can have those
without these: the `paper21` profile names both, with real weights; tests use tiny random-weight models of the
same classes.
"""
from __future__ import annotations

from core.registry import Labeling, register
from models import labelers, random_weights
from models.modality_kinds import EmbeddingSequenceModality, FeatureMapModality


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


class T5Caption(EmbeddingSequenceModality):
    """The caption through T5-XXL's encoder: 4096-d vectors, one per token, at most 77; an input only (the
    reference's `seq_emb`: 4M reads them through a linear projection and never predicts them)."""

    name, label_order = "t5_caption", 11
    labeler = Labeling(load=labelers.TextEncoderLabeler, weights="google/t5-v1_1-xxl",
                       random_model=random_weights.t5_encoder, reads=("caption",),
                       options=lambda cfg: {"max_length": T5Caption.max_tokens})


register(Dinov2())
register(T5Caption())
