"""4M-21's modalities that networks make (DINOv2's features and global vector, T5 caption embeddings), each one
registry entry.

Not built in, and apart from the weight-free ones (`models/modalities_4m21.py`) so that a profile can have those
without these: the `paper21` profile names both, with real weights; tests use tiny random-weight models of the
same classes.
"""
from __future__ import annotations

from core.registry import Labeling, register
from models import labelers, random_weights
from models.modality_kinds import EmbeddingSequenceModality, FeatureMapModality, GlobalFeatureModality


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


register(Dinov2())
register(Dinov2Global())
register(T5Caption())
