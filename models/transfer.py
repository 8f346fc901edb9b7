"""Transfer models: a backbone that turns RGB pixels into patch tokens, and a task head on top.

Backbones
  FourMViT   4M's encoder alone (appendix D.1): the `rgb@224` pixel embedding, fixed sine-cosine positions rebuilt
             for any input size, the encoder blocks (with drop-path) and the encoder norm; no masking, no [CLS].
             Loads from a finished pretraining run's folder or from converted reference weights.
  timm       any timm model by name (`vit_base_patch16_224`, optionally a local checkpoint): the baseline measured
             by the same command on the same data.
Heads
  classification  mean of the tokens, LayerNorm, Linear
  dense           a ConvNeXt head (semantic segmentation: depth 4; depth estimation: depth 2): tokens to a 4x
                  finer map by pixel shuffle, ConvNeXt blocks, a 1x1 classifier, upsampled to the input size.

Both backbones expose timm's `group_matcher`, so timm's layer-wise learning-rate decay applies to either.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.storage import MODEL_FILES, data_path, local_copy
from models.fourm import EncoderBlock, FourM, FourMConfig, _norm, sincos_2d


class BackboneError(ValueError):
    """A backbone that cannot be used for transfer: names the folder, model or setting."""


# -- 4M's encoder on pixels -----------------------------------------------------------------------------------------
class DropPathBlock(nn.Module):
    """4M's encoder block with stochastic depth on both residual branches (fine-tuning only)."""

    def __init__(self, block: EncoderBlock, drop_path: float):
        super().__init__()
        from timm.layers import DropPath

        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, mask):
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FourMViT(nn.Module):
    """(B, 3, H, W) pixels, H and W multiples of the patch size -> (B, H/16 * W/16, dim) tokens."""

    def __init__(self, cfg: FourMConfig, drop_path: float = 0.0):
        super().__init__()
        if cfg.pixels_input is None:
            raise BackboneError(f"the model has no RGB pixel embedding (its inputs: {cfg.domains_in}); transfer "
                                f"feeds it pixels")
        self.cfg, self.patch, self.embed_dim = cfg, cfg.patch_size, cfg.dim
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.dim, bias=False)
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        rates = torch.linspace(0, drop_path, cfg.encoder_depth).tolist()  # deeper blocks dropped more often
        self.blocks = nn.ModuleList([DropPathBlock(EncoderBlock(cfg), r) for r in rates])
        self.norm = _norm(cfg)

    @classmethod
    def from_fourm(cls, model: FourM, drop_path: float = 0.0) -> "FourMViT":
        backbone = cls(model.cfg, drop_path)
        embedding = model.encoder_embeddings[model.cfg.pixels_input]
        backbone.patch_embed.weight.data.copy_(embedding.proj.weight.data)
        backbone.mod_emb.data.copy_(embedding.mod_emb.data)
        for mine, theirs in zip(backbone.blocks, model.encoder):
            mine.load_state_dict(theirs.state_dict())  # the same norms, attention and MLP; drop-path has none
        backbone.norm.load_state_dict(model.encoder_norm.state_dict())
        return backbone

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^patch_embed|mod_emb", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def no_weight_decay(self) -> set:
        return set()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        patches = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        x = self.patch_embed(patches) + self.positions(h // p, w // p, pixels.device) + self.mod_emb
        no_mask = torch.zeros(b, 1, x.shape[1], dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, no_mask)
        return self.norm(x)

    def positions(self, rows: int, cols: int, device) -> torch.Tensor:
        """The pretraining grid's sine-cosine table, generalised to a rows x cols grid (the same frequencies;
        a square grid of the pretraining size gives the pretraining table exactly)."""
        if rows == cols:
            return sincos_2d(rows, self.embed_dim).to(device)
        dim = self.embed_dim
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
        r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                              indexing="ij")
        r, c = r.reshape(-1, 1) * omega, c.reshape(-1, 1) * omega
        return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)[None].to(device)


def read_fourm(path: str | Path) -> FourM:
    """A 4M model from a folder with config.json + model.safetensors: a finished pretraining run or `convert-4m`."""
    path = data_path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return FourM.from_pretrained(local_copy(path, MODEL_FILES))  # on object storage: a cached copy
    raise BackboneError(f"no 4M model in {str(path)!r}: expected config.json and model.safetensors (a finished "
                        f"pretraining run, or `python -m pipeline convert-4m`)")


class TimmBackbone(nn.Module):
    """A timm model's patch tokens (its prefix tokens, [CLS] and registers, left out)."""

    def __init__(self, name: str, checkpoint: str | None = None, drop_path: float = 0.0, image_size: int = 224):
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path,
                                           img_size=image_size, checkpoint_path=checkpoint or "")
        except RuntimeError as err:
            raise BackboneError(f"timm model {name!r} cannot load {checkpoint!r}: {err}") from None
        self.embed_dim = self.model.num_features
        self.prefix = getattr(self.model, "num_prefix_tokens", 0)

    def group_matcher(self, coarse: bool = False) -> dict:
        return _prefixed(self.model.group_matcher(coarse), "model")

    def no_weight_decay(self) -> set:
        return {f"model.{n}" for n in getattr(self.model, "no_weight_decay", set)()}

    def forward(self, pixels):
        return self.model.forward_features(pixels)[:, self.prefix:]


def _prefixed(matcher, prefix: str):
    """timm's group_matcher regexes, for the same model one attribute deeper."""
    if isinstance(matcher, dict):
        return {k: _prefixed(v, prefix) for k, v in matcher.items()}
    if isinstance(matcher, (list, tuple)) and matcher and isinstance(matcher[0], (list, tuple)):
        return [(_prefixed(regex, prefix), ordinal) for regex, ordinal in matcher]
    if isinstance(matcher, str):
        return "|".join(rf"^{prefix}\." + part.lstrip("^") for part in matcher.split("|"))
    return matcher


def make_backbone(model: str | None, backbone: str | None, drop_path: float, image_size: int) -> nn.Module:
    """`backbone`: 'fourm' (the 4M encoder of `model`, a folder), a timm name, or 'timm:NAME' with `model` a local
    timm checkpoint file."""
    if backbone in (None, "fourm"):
        if model is None:
            raise BackboneError("a 4M backbone needs --model DIR (a pretraining run or a converted checkpoint)")
        return FourMViT.from_fourm(read_fourm(model), drop_path)
    name = backbone.removeprefix("timm:")
    import timm

    if not timm.is_model(name):
        raise BackboneError(f"unknown backbone {backbone!r}: 'fourm' or a timm model name")
    return TimmBackbone(name, model, drop_path, image_size)


# -- heads ----------------------------------------------------------------------------------------------------------
class ClassificationHead(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.fc.weight, std=2e-5)  # a near-zero start, as fine-tuning heads begin
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens, size):
        return self.fc(self.norm(tokens.mean(1)))


class ConvNeXtHead(nn.Module):
    """Patch tokens -> a dense map at the input size: a linear layer and pixel shuffle to a 4x finer grid,
    `depth` ConvNeXt blocks, a 1x1 convolution to `out` channels, bilinear upsampling the rest of the way."""

    def __init__(self, dim: int, out: int, depth: int, width: int = 192, patch: int = 16):
        super().__init__()
        from timm.models.convnext import ConvNeXtBlock

        self.patch, self.width = patch, width
        self.proj = nn.Linear(dim, width * 16)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(width, conv_mlp=True) for _ in range(depth)])
        self.out = nn.Conv2d(width, out, 1)

    def forward(self, tokens, size):
        h, w = size[0] // self.patch, size[1] // self.patch
        x = self.proj(tokens).transpose(1, 2).reshape(len(tokens), self.width * 16, h, w)
        x = self.blocks(F.pixel_shuffle(x, 4))
        return F.interpolate(self.out(x), size=size, mode="bilinear", align_corners=False)


class TransferModel(nn.Module):
    """backbone + head: pixels (B, 3, H, W) -> logits (B, classes) or maps (B, out, H, W)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def group_matcher(self, coarse: bool = False) -> dict:
        return _prefixed(self.backbone.group_matcher(coarse), "backbone")

    def no_weight_decay(self) -> set:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, pixels):
        return self.head(self.backbone(pixels), pixels.shape[-2:])


def make_head(task: str, dim: int, classes: int) -> nn.Module:
    if task == "classification":
        return ClassificationHead(dim, classes)
    if task == "segmentation":
        return ConvNeXtHead(dim, classes, depth=4)
    if task == "depth":
        return ConvNeXtHead(dim, 1, depth=2)
    raise ValueError(f"unknown transfer task {task!r}: classification, segmentation or depth")
