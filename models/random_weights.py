"""Random-weight labeler models of the real classes, saved with `save_pretrained` to a local folder.

`tiny`: a few thousand parameters each, for the demo and the tests (built and saved in a second on a CPU).
`paper`: the paper's model sizes (DPT-Hybrid, Mask2Former Swin-B with 200 queries, a D-FINE, CLIP ViT-B/16),
for benchmarks where the real weights cannot be downloaded. Both load through `models.labelers`, exactly
like a hub id or a converted checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from core import registry
from models.coco import COCO_PANOPTIC, COCO_THINGS
from models.omnidata import dpt_hybrid_config, dpt_model_class
from models.weights import mark_random_weights

hf_logging.disable_progress_bar()  # a bar per saved model would drown the demo's own output


def _labels(names: list[str]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def dpt(size: str, channels: int):
    return dpt_model_class(channels)(dpt_hybrid_config(size, channels))


def mask2former(size: str):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if size == "paper":  # Swin-B, 200 queries, COCO panoptic's 133 classes
        backbone = SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
                              out_features=stages)
        cfg = Mask2FormerConfig(backbone_config=backbone, num_queries=200, **_labels(COCO_PANOPTIC))
    else:
        backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                              out_features=stages)
        cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                                encoder_feedforward_dim=64, dim_feedforward=64, decoder_layers=2, encoder_layers=1,
                                num_queries=10, num_attention_heads=2, common_stride=4, **_labels(COCO_PANOPTIC))
    return Mask2FormerForUniversalSegmentation(cfg)


def dfine(size: str):
    from transformers import DFineConfig, DFineForObjectDetection, HGNetV2Config

    if size == "paper":  # transformers' D-FINE defaults: HGNetV2 backbone, 300 queries
        cfg = DFineConfig(**_labels(COCO_THINGS))
    else:
        backbone = HGNetV2Config(
            stem_channels=[3, 16, 16], stage_in_channels=[16, 32, 64, 128], stage_mid_channels=[16, 16, 32, 64],
            stage_out_channels=[32, 64, 128, 256], stage_num_blocks=[1, 1, 1, 1],
            stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
            stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[2, 2, 2, 2],
            out_features=["stage2", "stage3", "stage4"], hidden_sizes=[32, 64, 128, 256])
        cfg = DFineConfig(backbone_config=backbone, encoder_hidden_dim=32, encoder_in_channels=[64, 128, 256],
                          d_model=32, decoder_layers=2, num_queries=20, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          decoder_in_channels=[32, 32, 32], num_feature_levels=3, decoder_n_points=[2, 2, 2],
                          hidden_expansion=0.5, encoder_attention_heads=2, decoder_attention_heads=2,
                          **_labels(COCO_THINGS))
    return DFineForObjectDetection(cfg)


def clip(size: str):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if size == "paper":  # ViT-B/16, 512-d projection
        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=16, projection_dim=512)
    else:
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                               image_size=224, patch_size=16, projection_dim=16)
    return CLIPVisionModelWithProjection(cfg)


def dinov2(size: str):
    from transformers import Dinov2Config, Dinov2Model

    if size == "paper":  # ViT-B/14, 768-d
        cfg = Dinov2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=518, patch_size=14)
    else:
        cfg = Dinov2Config(hidden_size=16, mlp_ratio=2, num_hidden_layers=1, num_attention_heads=2, image_size=224,
                           patch_size=14)
    return Dinov2Model(cfg)


def sam(size: str):
    """SAM with the image processor it reads (saved together): ViT-B at 1024 pixels, or a tiny one at 256."""
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig,
                              SamVisionConfig)

    if size == "paper":  # transformers' defaults: SAM ViT-B
        return SamModel(SamConfig()), SamImageProcessor()
    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_channels=16,
                             image_size=256, patch_size=16, global_attn_indexes=[1], mlp_dim=64, window_size=4,
                             num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=256, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                   iou_head_hidden_dim=16)
    cfg = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                    mask_decoder_config=decoder.to_dict())
    return SamModel(cfg), SamImageProcessor(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256})


def tiny_text_tokenizer():
    """T5's tokenizer class over a tiny vocabulary (COCO's class names, common words, letters for the rest):
    what a tiny random T5 reads, as no T5 vocabulary can be downloaded here."""
    from transformers import T5Tokenizer

    words = sorted({w for name in [*COCO_PANOPTIC, *COCO_THINGS] for w in name.lower().replace("-", " ").split()} |
                   set("a an the of on in with and at by is are photo picture image view front back near".split()))
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [(f"\u2581{w}", -1.0) for w in words] + [(c, -10.0) for c in letters] + [("\u2581", -5.0)]
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces], extra_ids=0)


def t5_encoder(size: str):
    """T5's encoder with the tokenizer it reads, saved together (a labeler loads both from one folder)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_text_tokenizer()
    if size == "paper":  # T5-XXL (v1.1): 4096-d, 24 layers, 64 heads, gated GELU
        cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       feed_forward_proj="gated-gelu")
    else:  # 4096-d as T5-XXL's, so its vectors are what 4M's t5_caption reads; one narrow layer
        cfg = T5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                       feed_forward_proj="gated-gelu")
    return T5EncoderModel(cfg), tokenizer


def save_random_model(name: str, path: str | Path, size: str = "tiny", seed: int = 0) -> str:
    """Build one labeler's model with random weights and save it to `path` (kept if already there)."""
    if size not in ("tiny", "paper"):
        raise ValueError(f"size {size!r}: expected 'tiny' or 'paper'")
    path = Path(path)
    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        model = registry.get(name).labeler.random_model(size)
        model, *processors = model if isinstance(model, tuple) else (model,)  # a tokenizer it reads, saved too
        if size == "tiny":
            # Some heads start at constants (zero weights, a prior bias): jitter every parameter so
            # outputs differ between pixels, queries and classes, as they do with trained weights.
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(path)
        for processor in processors:
            processor.save_pretrained(path)
        mark_random_weights(path, labeler=name, size=size, seed=seed)  # every label it makes says so
    return str(path)


def random_model_names(modalities: registry.ModalitySet | None = None) -> list[str]:
    """The labelers of the set's modalities (the built-ins by default) that have a random model of their class."""
    return [m.name for m in (modalities or registry.ModalitySet()).labelled() if m.labeler.random_model]


def save_random_models(folder: str | Path, size: str = "tiny", names: list[str] | None = None,
                       seed: int = 0) -> dict[str, str]:
    """Each named labeler's random-weight model (every built-in one by default), saved to folder/<name>; returns
    the paths."""
    return {name: save_random_model(name, Path(folder) / name, size, seed) for name in names or random_model_names()}
