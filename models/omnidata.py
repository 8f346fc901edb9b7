"""Omnidata's published DPT-Hybrid v2 checkpoints, read as published and converted to transformers.

Omnidata (Eftekhar et al. 2021) trains MiDaS's DPT-Hybrid code (a timm R50+ViT-B/16 hybrid, MiDaS's neck
and head) with PyTorch Lightning, so `omnidata_dpt_{depth,normal}_v2.ckpt` hold a Lightning checkpoint whose
`state_dict` keys are MiDaS's module names prefixed by `model.`. Two parts here:

- `OmnidataDPT`: MiDaS's module tree under MiDaS's names, so such a state dict loads as is (strict), with a
  forward that does what MiDaS's does. It is the reference the conversion is checked against.
- `convert_state_dict` / `convert_checkpoint`: the same weights under transformers' `DPTForDepthEstimation`
  names (hybrid config; `DPTForSurfaceNormals` for the 3-channel normal head), saved with `save_pretrained`
  as safetensors, so the labelers load them like any hub model. The conversion checks itself by running both
  layouts on one random input.
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TASK_CHANNELS = {"depth": 1, "normal": 3}
TOLERANCE = 2e-5  # largest output difference accepted between the layouts (float32; outputs are about 0..1)


class ConversionError(ValueError):
    """A checkpoint that does not hold the expected Omnidata DPT-Hybrid weights."""


def dpt_hybrid_config(size: str = "paper", channels: int = 1):
    """transformers' DPT config for Omnidata's DPT-Hybrid (`paper`) or a tiny one of the same shape."""
    from transformers import BitConfig, DPTConfig

    extra = {"num_output_channels": channels} if channels != 1 else {}
    if size == "paper":  # ViT-B/16 on a ResNet-50 stem (3, 4, 9), hooks [0, 1, 8, 11], 256 neck features
        return DPTConfig(is_hybrid=True, image_size=384, backbone_featmap_shape=[1, 1024, 24, 24],
                         neck_hidden_sizes=[256, 512, 768, 768], fusion_hidden_size=256,
                         reassemble_factors=[1, 1, 1, 0.5], readout_type="project",
                         backbone_out_indices=[0, 1, 8, 11], layer_norm_eps=1e-6, **extra)
    if size != "tiny":
        raise ValueError(f"size {size!r}: expected 'paper' or 'tiny'")
    return DPTConfig(
        is_hybrid=True, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
        image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 32, 32],
        fusion_hidden_size=16, backbone_featmap_shape=[1, 64, 4, 4], reassemble_factors=[1, 1, 1, 0.5],
        readout_type="project", layer_norm_eps=1e-6,
        backbone_config=BitConfig(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1],
                                  out_features=["stage1", "stage2", "stage3"], embedding_size=16,
                                  hidden_sizes=[16, 32, 64], num_groups=4, embedding_dynamic_padding=True),
        **extra)


def dpt_model_class(channels: int):
    if channels == 1:
        from transformers import DPTForDepthEstimation

        return DPTForDepthEstimation
    from models.dpt_normals import DPTForSurfaceNormals

    return DPTForSurfaceNormals


# --- the checkpoint's own layout -------------------------------------------------------------------------

class _ProjectReadout(nn.Module):
    """MiDaS's `project` readout: each patch token concatenated with the class token, then Linear + GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens):
        patches = tokens[:, 1:]
        return self.project(torch.cat([patches, tokens[:, :1].expand_as(patches)], dim=-1))


class _ResidualConvUnit(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """MiDaS's FeatureFusionBlock_custom without batch norm: residual units, 2x upsample, 1x1 projection."""

    def __init__(self, dim: int):
        super().__init__()
        self.resConfUnit1 = _ResidualConvUnit(dim)
        self.resConfUnit2 = _ResidualConvUnit(dim)
        self.out_conv = nn.Conv2d(dim, dim, 1)

    def forward(self, x, skip=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = F.interpolate(self.resConfUnit2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class OmnidataDPT(nn.Module):
    """MiDaS's DPTDepthModel(backbone='vitb_rn50_384', readout='project') under its own parameter names.

    Built from the transformers config so both layouts share one description of the sizes. Layers 1-2 of
    the neck are the ResNet's first two stages, layers 3-4 the ViT blocks at `backbone_out_indices[2:]`.
    """

    def __init__(self, config):
        super().__init__()
        from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
        from timm.models.resnetv2 import ResNetV2
        from timm.models.vision_transformer import VisionTransformer

        bit, dim = config.backbone_config, config.hidden_size
        resnet = ResNetV2(layers=bit.depths, channels=bit.hidden_sizes, stem_chs=bit.embedding_size, num_classes=0,
                          global_pool="", preact=False, stem_type="same",
                          conv_layer=partial(StdConv2dSame, eps=1e-8),
                          norm_layer=partial(GroupNormAct, num_groups=bit.num_groups))
        self.hooks = list(config.backbone_out_indices)
        self.pretrained = nn.Module()
        # num_classes=1000: timm's ImageNet classifier is in the published checkpoints, unused by DPT
        self.pretrained.model = VisionTransformer(
            img_size=config.image_size, patch_size=1, embed_dim=dim, depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads, mlp_ratio=config.intermediate_size / dim,
            embed_layer=partial(HybridEmbed, backbone=resnet), num_classes=1000)
        neck, fused = config.neck_hidden_sizes, config.fusion_hidden_size
        self.pretrained.act_postprocess3 = nn.Sequential(_ProjectReadout(dim), nn.Identity(), nn.Identity(),
                                                         nn.Conv2d(dim, neck[2], 1))
        self.pretrained.act_postprocess4 = nn.Sequential(_ProjectReadout(dim), nn.Identity(), nn.Identity(),
                                                         nn.Conv2d(dim, neck[3], 1),
                                                         nn.Conv2d(neck[3], neck[3], 3, stride=2, padding=1))
        self.scratch = nn.Module()
        for i, channels in enumerate(neck, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(channels, fused, 3, padding=1, bias=False))
            setattr(self.scratch, f"refinenet{i}", _FusionBlock(fused))
        channels = getattr(config, "num_output_channels", 1)
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(fused, fused // 2, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear",
                                                                     align_corners=True),
            nn.Conv2d(fused // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, channels, 1), nn.ReLU(),
            nn.Identity())

    def _tokens_to_map(self, postprocess: nn.Sequential, tokens, grid):
        x = postprocess[0](tokens).transpose(1, 2)
        return postprocess[3:](x.reshape(x.shape[0], x.shape[1], *grid))

    def forward(self, x):
        vit = self.pretrained.model
        grid = (x.shape[-2] // 16, x.shape[-1] // 16)
        resnet = vit.patch_embed.backbone
        features = resnet.stem(x)
        stage_outputs = []
        for stage in resnet.stages:
            features = stage(features)
            stage_outputs.append(features)
        tokens = vit.patch_embed.proj(resnet.norm(features)).flatten(2).transpose(1, 2)
        pos_cls, pos_grid = vit.pos_embed[:, :1], vit.pos_embed[0, 1:]
        side = int(round(pos_grid.shape[0] ** 0.5))
        pos_grid = F.interpolate(pos_grid.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=grid,
                                 mode="bilinear")
        pos = torch.cat([pos_cls, pos_grid.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)
        tokens = torch.cat([vit.cls_token.expand(len(x), -1, -1), tokens], dim=1) + pos
        block_outputs = []
        for block in vit.blocks:
            tokens = block(tokens)
            block_outputs.append(tokens)
        layers = [stage_outputs[0], stage_outputs[1],
                  self._tokens_to_map(self.pretrained.act_postprocess3, block_outputs[self.hooks[2]], grid),
                  self._tokens_to_map(self.pretrained.act_postprocess4, block_outputs[self.hooks[3]], grid)]
        s = self.scratch
        rn = [getattr(s, f"layer{i}_rn")(layer) for i, layer in enumerate(layers, start=1)]
        path = s.refinenet4(rn[3])
        path = s.refinenet3(path, rn[2])
        path = s.refinenet2(path, rn[1])
        path = s.refinenet1(path, rn[0])
        return s.output_conv(path)  # (B, channels, H, W)


# --- conversion ------------------------------------------------------------------------------------------

_IGNORED = re.compile(r"^pretrained\.model\.head\.")  # timm's ImageNet classifier: unused by DPT

_RENAMES = [  # (MiDaS pattern, transformers replacement), applied in order, first match wins
    (r"^pretrained\.model\.cls_token$", "dpt.embeddings.cls_token"),
    (r"^pretrained\.model\.pos_embed$", "dpt.embeddings.position_embeddings"),
    (r"^pretrained\.model\.norm\.", "dpt.layernorm."),
    (r"^pretrained\.model\.patch_embed\.proj\.", "dpt.embeddings.projection."),
    (r"^pretrained\.model\.patch_embed\.backbone\.stem\.conv\.", "dpt.embeddings.backbone.bit.embedder.convolution."),
    (r"^pretrained\.model\.patch_embed\.backbone\.stem\.norm\.", "dpt.embeddings.backbone.bit.embedder.norm."),
    (r"^pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.",
     r"dpt.embeddings.backbone.bit.encoder.stages.\1.layers.\2."),
    (r"^pretrained\.model\.blocks\.(\d+)\.norm1\.", r"dpt.encoder.layer.\1.layernorm_before."),
    (r"^pretrained\.model\.blocks\.(\d+)\.norm2\.", r"dpt.encoder.layer.\1.layernorm_after."),
    (r"^pretrained\.model\.blocks\.(\d+)\.attn\.proj\.", r"dpt.encoder.layer.\1.attention.output.dense."),
    (r"^pretrained\.model\.blocks\.(\d+)\.mlp\.fc1\.", r"dpt.encoder.layer.\1.intermediate.dense."),
    (r"^pretrained\.model\.blocks\.(\d+)\.mlp\.fc2\.", r"dpt.encoder.layer.\1.output.dense."),
    (r"^pretrained\.act_postprocess([34])\.0\.project\.0\.",
     lambda m: f"neck.reassemble_stage.readout_projects.{int(m[1]) - 1}.0."),
    (r"^pretrained\.act_postprocess([34])\.3\.",
     lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.projection."),
    (r"^pretrained\.act_postprocess4\.4\.", "neck.reassemble_stage.layers.3.resize."),
    (r"^scratch\.layer([1-4])_rn\.", lambda m: f"neck.convs.{int(m[1]) - 1}."),
    (r"^scratch\.refinenet([1-4])\.resConfUnit([12])\.conv([12])\.",
     lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.residual_layer{m[2]}.convolution{m[3]}."),
    (r"^scratch\.refinenet([1-4])\.out_conv\.", lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.projection."),
    (r"^scratch\.output_conv\.([024])\.", r"head.head.\1."),
]
_QKV = re.compile(r"^pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def strip_lightning_prefix(state_dict: dict) -> dict:
    """A Lightning module's `model.` prefix removed, as Omnidata's own loading code does."""
    if state_dict and all(k.startswith("model.") for k in state_dict):
        return {k[len("model."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def convert_state_dict(midas: dict) -> dict:
    """MiDaS/Omnidata parameter names -> transformers' DPT-Hybrid names (qkv split into query/key/value)."""
    out = {}
    for key, value in midas.items():
        if _IGNORED.match(key):
            continue
        qkv = _QKV.match(key)
        if qkv:
            block, kind = qkv.groups()
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"dpt.encoder.layer.{block}.attention.attention.{name}.{kind}"] = part.clone()
            continue
        for pattern, replacement in _RENAMES:
            new, count = re.subn(pattern, replacement, key)
            if count:
                out[new] = value
                break
        else:
            raise ConversionError(f"checkpoint key {key!r} is not part of Omnidata's DPT-Hybrid layout")
    return out


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict:
    """The MiDaS-named state dict of an Omnidata checkpoint (a Lightning `.ckpt` or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a refused or broken pickle
        hint = "" if trust_pickle else " (if you trust its source, --trust-pickle loads arbitrary pickled objects)"
        raise ConversionError(f"cannot read checkpoint {str(path)!r}: {exc}{hint}") from exc
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    return strip_lightning_prefix(state)


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, task: str, config=None,
                       trust_pickle: bool = False, verify: bool = True) -> dict:
    """Convert one Omnidata checkpoint into a transformers folder; returns a report (max output difference).

    `config` defaults to the published DPT-Hybrid's; a checkpoint of another shape fails with the first key
    whose shape differs. With `verify`, both layouts run on one random 384x512 input and must agree.
    """
    if task not in TASK_CHANNELS:
        raise ConversionError(f"task {task!r}: expected one of {', '.join(TASK_CHANNELS)}")
    channels = TASK_CHANNELS[task]
    config = config or dpt_hybrid_config("paper", channels)
    midas = read_checkpoint(checkpoint, trust_pickle)
    converted = convert_state_dict(midas)
    model = dpt_model_class(channels)(config).eval()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"checkpoint {str(checkpoint)!r} does not match a {task} DPT-Hybrid: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise ConversionError(f"checkpoint {str(checkpoint)!r}: {key} has shape {tuple(value.shape)}, "
                                  f"the {task} DPT-Hybrid expects {tuple(expected[key].shape)}")
    model.load_state_dict(converted, strict=True)
    report = {"task": task, "tensors": len(converted), "max_abs_diff": None}
    if verify:
        report["max_abs_diff"] = compare_layouts(midas, model, config)
        if report["max_abs_diff"] > TOLERANCE:
            raise ConversionError(f"converted {task} model differs from the checkpoint's own layout by "
                                  f"{report['max_abs_diff']:.3g} (tolerance {TOLERANCE})")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    report["out_dir"] = str(out_dir)
    return report


@torch.no_grad()
def compare_layouts(midas: dict, converted_model, config, height: int = 384, width: int = 512,
                    seed: int = 0) -> float:
    """Largest absolute difference between the MiDaS-layout and the converted model on one random input.

    Compared before the head's final ReLU, where a difference cannot hide in a region clipped to zero.
    """
    from models.labelers import dpt_forward

    reference = OmnidataDPT(config).eval()
    reference.load_state_dict(midas, strict=True)
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    outputs = []
    hooks = [head[4].register_forward_hook(lambda module, args, out: outputs.append(out))
             for head in (reference.scratch.output_conv, converted_model.head.head)]
    try:
        reference(x)
        dpt_forward(converted_model.eval(), x)
    finally:
        for hook in hooks:
            hook.remove()
    expected, actual = outputs
    return float((expected - actual).abs().max())
