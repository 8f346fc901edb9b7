"""The dense modality tokenizers, in the architecture apple/ml-4m published its 4M tokenizers in, with their layout.

A tokenizer is a ViT encoder, a 1x1 projection to a small latent, a cosine-similarity EMA codebook, and a decoder:
a ViT (VQ-VAE: semseg, CLIP features) or a patched UNet trained as a diffusion model (DiVAE: rgb, depth, normals).
Global feature vectors (4M-21's DINOv2 and ImageBind globals) take the reference's other form: a bottleneck MLP
encoder and decoder around Memcodes, several codebooks each giving one token of the vector.
The settings are the reference constructor's own argument names (its `config.json` holds them), so a published
folder loads here one tensor to one tensor (`convert-tokenizer`), and a tokenizer trained here is a drop-in for a
published one. `tokenizer_config` builds a modality's settings from its registry entry at the paper's size (the
published tokenizers' architecture: ViT-B, the patched UNet) or tiny (the demo and tests).

Shapes (B batch, tokens per side n = size / patch):
    encoder input   float (B, C, H, W); semseg: long (B, H, W) class ids, embedded first; CLIP: (B, 512, n, n)
    token ids       long (B, n, n); memcodes: (B, codebooks, n, n) (a global vector: (B, 16, 1, 1))
    decoder output  float (B, C, H, W); semseg: logits (B, labels, H, W)
The position tables are built at the largest size the tokenizer was trained at (448 for the "224-448" ones) and
resized bicubically to the input's grid, so 224 and 448 crops both work.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core import registry
from core.files import save_safetensors, write_json
from models.published import read_checkpoint

# --- settings ----------------------------------------------------------------------------------------------

# Named architectures, as the settings name them: the reference's presets, plus tiny ones for tests and the demo.
VIT_PRESETS = {  # width, depth, heads (MLP ratio 4, qkv bias, LayerNorm eps 1e-6)
    "vit_tiny": (32, 2, 2),
    "vit_s": (512, 8, 8),
    "vit_b": (768, 12, 12),
    "vit_l": (1024, 24, 16),
}
UNET_PRESETS = {  # the OpenAI UNet over pixel patches with the codes concatenated (UNet widths: GroupNorm32); the
    # tiny one (ours: demo and tests) over 8x8 patches, 2.4x faster a step at 224 than over 4x4, as good at 64
    "unet_patched": dict(patch_size=4, channels=256, res_blocks=3, attention_at=(4, 8), mults=(1, 2, 2, 2)),
    "unet_patched_tiny": dict(patch_size=8, channels=32, res_blocks=1, attention_at=(2,), mults=(1, 1)),
}


@dataclass
class VQConfig:
    """The reference's constructor arguments (`VQ`, `VQVAE`, `DiVAE`), with its defaults."""
    dec_type: str                       # "vit_*_dec" (VQ-VAE) or "unet_patched*" (DiVAE)
    image_size: int = 224               # the largest size trained at: position tables are built for it
    image_size_enc: int | None = None
    image_size_dec: int | None = None
    n_channels: int = 3                 # input channels; semseg: the width of the class embedding
    n_labels: int | None = None         # semseg's classes (134: COCO's 133 and unlabelled)
    enc_type: str = "vit_b_enc"
    patch_proj: bool = True             # False for feature maps: one token per input vector (1x1 projection)
    post_mlp: bool = False              # a tanh MLP after the encoder's (and before the decoder's output) blocks
    patch_size: int = 16
    patch_size_dec: int | None = None
    out_conv: bool = False
    quant_type: str = "lucid"
    codebook_size: int = 16384
    num_codebooks: int = 1
    latent_dim: int = 32
    norm_codes: bool = True             # cosine similarity to the codes
    norm_latents: bool = False
    sync_codebook: bool = True
    ema_decay: float = 0.99
    threshold_ema_dead_code: float = 0.25
    code_replacement_policy: str = "batch_random"
    commitment_weight: float = 1.0
    kmeans_init: bool = False
    undo_std: bool = False
    freeze_enc: bool = False
    # DiVAE's diffusion settings (its defaults; the published tokenizers' configs set sample / linear)
    num_train_timesteps: int = 1000
    scheduler: str = "ddpm"
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    clip_sample: bool = False
    thresholding: bool = True
    conditioning: str = "concat"
    zero_terminal_snr: bool = True
    cls_free_guidance_dropout: float = 0.0
    masked_cfg: bool = False
    masked_cfg_low: int = 0
    masked_cfg_high: int | None = None
    dec_transformer_dropout: float = 0.2
    # Where the reference's training started from: recorded, not used to load
    ckpt_path: str | None = None
    ignore_keys: list = field(default_factory=list)

    @property
    def diffusion(self) -> bool:
        return self.dec_type.startswith("unet")

    @classmethod
    def from_dict(cls, settings: dict, source: str) -> VQConfig:
        """Settings as a published `config.json` holds them; unknown or unsupported ones refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{source}: unknown tokenizer settings {unknown} (known: {', '.join(sorted(known))})")
        if "dec_type" not in settings:
            raise ValueError(f"{source}: no 'dec_type' (a 'vit_*_dec' or 'unet_patched' decoder)")
        config = cls(**settings)
        config.check(source)
        return config

    def check(self, source: str) -> None:
        def refuse(name, supported):
            raise ValueError(f"{source}: {name}={getattr(self, name)!r} is not supported (supported: {supported})")

        decoders = ", ".join([*(f"{p}_dec" for p in VIT_PRESETS), *UNET_PRESETS, MLP_FORM])
        if _preset(self.enc_type, "_enc") not in VIT_PRESETS and mlp_shape(self.enc_type) is None:
            refuse("enc_type", ", ".join([*(f"{p}_enc" for p in VIT_PRESETS), MLP_FORM]))
        if not self.diffusion and _preset(self.dec_type, "_dec") not in VIT_PRESETS and \
                mlp_shape(self.dec_type) is None:
            refuse("dec_type", decoders)
        if self.diffusion and self.dec_type not in UNET_PRESETS:
            refuse("dec_type", decoders)
        if self.quant_type not in ("lucid", "memcodes"):
            refuse("quant_type", "'lucid', 'memcodes'")
        if self.quant_type == "memcodes" and self.latent_dim % self.num_codebooks:
            refuse("num_codebooks", f"a divisor of latent_dim {self.latent_dim}")
        for name, supported in ((("num_codebooks", 1),) if self.quant_type == "lucid" else ()) + (
                ("norm_codes", True), ("undo_std", False), ("conditioning", "concat"),
                ("code_replacement_policy", "batch_random")):
            if getattr(self, name) != supported:
                refuse(name, repr(supported))
        if self.diffusion and self.beta_schedule != "linear":
            refuse("beta_schedule", "'linear'")
        if self.diffusion and self.scheduler not in ("ddpm", "ddim"):
            refuse("scheduler", "'ddpm', 'ddim'")


def _preset(name: str, suffix: str) -> str:
    return name.removesuffix(suffix)


MLP_FORM = "BottleneckMLP/B_<blocks>-Wi_<width>[-Mi_<expansion>]"


def mlp_shape(name: str) -> tuple[int, int, int] | None:
    """(blocks, width, expansion) of a "BottleneckMLP/B_6-Wi_1024" architecture name (the reference's
    `build_mlp` ids, "Scaling MLPs"), or None for another name."""
    kind, _, shape = name.partition("/")
    parts = dict(part.split("_", 1) for part in shape.split("-") if "_" in part)
    if kind != "BottleneckMLP" or not {"B", "Wi"} <= set(parts) or not all(v.isdigit() for v in parts.values()):
        return None
    return int(parts["B"]), int(parts["Wi"]), int(parts.get("Mi", 4))


# --- ViT encoder and decoder --------------------------------------------------------------------------------


def sincos_table(side: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The fixed 2-D sine-cosine position table (MoCo v3), (1, dim, side, side): the first half of the channels
    encodes the row, the second the column (the reference's layout, so stored tables compare equal)."""
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows = torch.arange(side, dtype=torch.float32)[:, None].expand(side, side).reshape(-1)
    cols = torch.arange(side, dtype=torch.float32)[None, :].expand(side, side).reshape(-1)
    r, c = rows[:, None] * omega, cols[:, None] * omega
    table = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)  # (side*side, dim)
    return table.t().reshape(1, dim, side, side)


def _blocks(width: int, depth: int, heads: int) -> nn.Sequential:
    from timm.models.vision_transformer import Block  # the reference's block, same parameter names, fused attention

    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])


class _PostMLP:
    """x + MLP(LayerNorm(x)), a tanh MLP (ViT-VQGAN), in float32 (the reference keeps it out of autocast); its
    layers sit on the encoder or decoder itself as `norm_mlp` and `post_mlp`, the published names."""

    def add_post_mlp(self, width: int) -> None:
        from timm.layers import Mlp

        self.norm_mlp = nn.LayerNorm(width, eps=1e-6)
        self.post_mlp = Mlp(width, 4 * width, act_layer=nn.Tanh)

    def apply_post_mlp(self, x):
        if not hasattr(self, "post_mlp"):
            return x
        with torch.autocast(x.device.type, enabled=False):
            return x.float() + self.post_mlp(self.norm_mlp(x.float()))


class ViTEncoder(nn.Module, _PostMLP):
    """(B, C, H, W) -> (B, width, n, n)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        width, depth, heads = VIT_PRESETS[_preset(cfg.enc_type, "_enc")]
        kernel = cfg.patch_size if cfg.patch_proj else 1
        self.patch_size, self.patch_proj, self.width = cfg.patch_size, cfg.patch_proj, width
        self.proj = nn.Conv2d(cfg.n_channels, width, kernel, kernel)
        side = (cfg.image_size_enc or cfg.image_size) // cfg.patch_size
        self.pos_emb = nn.Parameter(sincos_table(side, width), requires_grad=False)
        self.blocks = _blocks(width, depth, heads)
        if cfg.post_mlp:
            self.add_post_mlp(width)

    def forward(self, x):
        h, w = x.shape[-2:]
        grid = (h // self.patch_size, w // self.patch_size) if self.patch_proj else (h, w)
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        tokens = tokens + _resized(self.pos_emb, grid)
        tokens = self.blocks(tokens)
        tokens = self.apply_post_mlp(tokens)
        return tokens.transpose(1, 2).reshape(len(x), self.width, *grid)


class ViTDecoder(nn.Module, _PostMLP):
    """(B, width, n, n) -> (B, C, n*patch, n*patch), or (B, C, n, n) for feature maps (no patch projection)."""

    def __init__(self, cfg: VQConfig, out_channels: int):
        super().__init__()
        width, depth, heads = VIT_PRESETS[_preset(cfg.dec_type, "_dec")]
        self.patch = (cfg.patch_size_dec or cfg.patch_size) if cfg.patch_proj else 1
        self.out_channels, self.width = out_channels, width
        side = (cfg.image_size_dec or cfg.image_size) // (cfg.patch_size_dec or cfg.patch_size)
        self.pos_emb = nn.Parameter(sincos_table(side, width), requires_grad=False)
        self.blocks = _blocks(width, depth, heads)
        if cfg.post_mlp:
            self.add_post_mlp(width)
        self.out_proj = nn.Linear(width, out_channels * self.patch ** 2)
        if cfg.out_conv:  # the reference's fix for patch seams (its SAM-instance mask tokenizer): two ConvNeXt blocks
            self.out_conv = nn.Sequential(ConvNeXtBlock(out_channels), ConvNeXtBlock(out_channels))

    def forward(self, x):
        b, _, nh, nw = x.shape
        tokens = x.flatten(2).transpose(1, 2) + _resized(self.pos_emb, (nh, nw))
        tokens = self.blocks(tokens)
        tokens = self.apply_post_mlp(tokens)
        p = self.patch
        out = self.out_proj(tokens).reshape(b, nh, nw, self.out_channels, p, p)
        out = out.permute(0, 3, 1, 4, 2, 5).reshape(b, self.out_channels, nh * p, nw * p)
        return self.out_conv(out) if hasattr(self, "out_conv") else out


class ConvNeXtBlock(nn.Module):
    """A residual ConvNeXt block over the output's channels: 7x7 depthwise conv, LayerNorm, 4x MLP, layer scale."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


def _resized(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The position table resized to the grid (bicubic, as the reference), as (1, n*n, width)."""
    table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
    return table.flatten(2).transpose(1, 2)


# --- the MLP encoder and decoder (global feature vectors) ----------------------------------------------------


class _BottleneckBlock(nn.Module):
    def __init__(self, width: int, wide: int):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(width, wide), nn.GELU(), nn.Linear(wide, width))

    def forward(self, x):
        return self.block(x)


class BottleneckMLP(nn.Module):
    """Residual bottleneck blocks, x + block(LayerNorm(x)), between a linear in and a linear out, applied to each
    position of a (B, C, H, W) map (a global vector is a 1x1 map); the reference's names and layout."""

    def __init__(self, name: str, dim_in: int | None = None, dim_out: int | None = None):
        super().__init__()
        blocks, width, expansion = mlp_shape(name)
        self.width, self.dim_out = width, dim_out or width
        self.linear_in = nn.Linear(dim_in or width, width)
        self.blocks = nn.ModuleList([_BottleneckBlock(width, expansion * width) for _ in range(blocks)])
        self.layernorms = nn.ModuleList([nn.LayerNorm(width) for _ in range(blocks)])
        self.linear_out = nn.Linear(width, self.dim_out)

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.linear_in(x.flatten(2).transpose(1, 2))
        for block, norm in zip(self.blocks, self.layernorms):
            x = x + block(norm(x))
        return self.linear_out(x).transpose(1, 2).reshape(b, self.dim_out, h, w)


# --- the codebook -------------------------------------------------------------------------------------------


class CosineCodebook(nn.Module):
    """Codes compared by cosine similarity, moved by an EMA of the unit latents assigned to them; codes whose EMA
    count falls below `threshold` are replaced by latents of the batch. The code looked up is the stored row."""

    def __init__(self, size: int, dim: int, decay: float, threshold: float):
        super().__init__()
        self.size, self.decay, self.threshold = size, decay, threshold
        codes = torch.empty(size, dim)
        nn.init.kaiming_uniform_(codes)
        self.register_buffer("initted", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("embed", F.normalize(codes, dim=-1))
        # codes restarted since the count was last read (the training log); not part of the published layout
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long), persistent=False)

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        return (F.normalize(latents.float(), dim=-1) @ F.normalize(self.embed, dim=-1).t()).argmax(-1)

    @torch.no_grad()
    def update(self, latents: torch.Tensor, ids: torch.Tensor) -> None:
        """One EMA step from a batch's latents (N, dim) and their codes, summed over data-parallel workers."""
        unit = F.normalize(latents.float(), dim=-1)
        counts = torch.bincount(ids, minlength=self.size).float()
        sums = torch.zeros_like(self.embed).index_add_(0, ids, unit)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        used = counts > 0
        means = F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1)
        self.embed[used] = self.embed[used] * self.decay + means[used] * (1 - self.decay)
        dead = self.cluster_size < self.threshold
        if dead.any():
            n, k = len(unit), int(dead.sum())
            picks = torch.randperm(n, device=unit.device)[:k] if n >= k else torch.randint(n, (k,), device=unit.device)
            fresh = unit[picks]
            if _distributed():
                dist.broadcast(fresh, src=0)  # every replica restarts the same codes
            self.embed[dead] = fresh
            self.restarts += k


class Quantizer(nn.Module):
    """(B, dim, n, n) latents -> (straight-through codes (B, dim, n, n), commitment loss, ids (B, n, n))."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.commitment_weight = cfg.commitment_weight
        # "_codebook": the name the published state dicts use (quantize._codebook.embed)
        self._codebook = CosineCodebook(cfg.codebook_size, cfg.latent_dim, cfg.ema_decay,
                                        cfg.threshold_ema_dead_code)

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.codebook).permute(0, 3, 1, 2)

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, dim, n, n) latents -> their codes' ids (B, n, n), the codebook untouched."""
        return self._codebook.nearest(latents.permute(0, 2, 3, 1))

    def take_restarts(self) -> int:
        """Codes restarted since the last call."""
        count = int(self._codebook.restarts)
        self._codebook.restarts.zero_()
        return count

    def forward(self, latents: torch.Tensor):
        b, d, nh, nw = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(b, nh * nw, d)
        ids = self._codebook.nearest(flat)
        codes = F.embedding(ids, self.codebook)
        loss = torch.zeros((), device=latents.device)
        if self.training:
            self._codebook.update(flat.detach().reshape(-1, d), ids.reshape(-1))
            loss = self.commitment_weight * F.mse_loss(codes.detach(), flat.float())
            codes = flat + (codes - flat).detach()
        codes = codes.reshape(b, nh, nw, d).permute(0, 3, 1, 2)
        return codes, loss, ids.reshape(b, nh, nw)


class _HeadLinear(nn.Module):
    """A linear map per codebook: (h, n, d) -> (h, n, c) with weight (h, d, c) (the reference's einops `EinMix`)."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        bound = dim ** -0.5
        self.weight = nn.Parameter(torch.empty(heads, dim, dim).uniform_(-bound, bound))

    def forward(self, x):
        return torch.einsum("hnd,hdc->hnc", x, self.weight)


class Memcodes(nn.Module):
    """Memcodes (the reference's `quant_type="memcodes"`): each of `num_codebooks` heads reads its slice of the
    latent as a query, attends over that codebook's codes (keys and values linear in the codes), and takes one
    code: hard straight-through Gumbel softmax in training, the argmax otherwise. No codebook loss, no EMA.

    (B, dim, n, n) latents -> codes (B, dim, n, n), ids (B, heads, n, n) ((B, n, n) with one head)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.heads, self.size = cfg.num_codebooks, cfg.codebook_size
        dim = cfg.latent_dim // cfg.num_codebooks
        self.scale = dim ** -0.5
        self.codes = nn.Parameter(torch.randn(self.heads, self.size, dim))
        self.to_k, self.to_v = _HeadLinear(self.heads, dim), _HeadLinear(self.heads, dim)

    def _logits(self, latents: torch.Tensor) -> torch.Tensor:
        b, d, nh, nw = latents.shape
        q = latents.flatten(2).transpose(1, 2).reshape(b, nh * nw, self.heads, d // self.heads).transpose(1, 2)
        return torch.einsum("bhid,hjd->bhij", q * self.scale, self.to_k(self.codes))

    def _ids_shape(self, ids: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        ids = ids.reshape(len(ids), self.heads, nh, nw)
        return ids[:, 0] if self.heads == 1 else ids

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        return self._ids_shape(self._logits(latents).argmax(-1), *latents.shape[-2:])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, heads, n, n) (or (B, n, n) with one head) -> codes (B, dim, n, n)."""
        b, nh, nw = len(ids), ids.shape[-2], ids.shape[-1]
        values = self.to_v(self.codes)                                       # (h, size, d)
        flat = ids.reshape(b, self.heads, nh * nw)
        picked = torch.stack([values[h][flat[:, h]] for h in range(self.heads)], 1)   # (b, h, n*n, d)
        return picked.permute(0, 1, 3, 2).reshape(b, -1, nh, nw)

    def forward(self, latents: torch.Tensor):
        b, d, nh, nw = latents.shape
        logits = self._logits(latents)
        if self.training:
            choice = F.gumbel_softmax(logits.float(), tau=1.0, dim=-1, hard=True).to(logits.dtype)
        else:
            choice = F.one_hot(logits.argmax(-1), self.size).to(logits.dtype)
        codes = torch.einsum("bhij,hjd->bhid", choice, self.to_v(self.codes))   # (b, h, n*n, d)
        codes = codes.permute(0, 1, 3, 2).reshape(b, d, nh, nw)
        return codes, torch.zeros((), device=latents.device), self._ids_shape(choice.argmax(-1), nh, nw)

    def take_restarts(self) -> int:
        return 0  # no dead codes to restart: every code is reachable through the attention


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --- the diffusion decoder: a patched UNet ----------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """32 groups, computed in float32 (the UNet's normalisation)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, out: int, emb: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(GroupNorm32(out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)
        nn.init.zeros_(self.out_layers[-1].weight)  # each block starts as the identity
        nn.init.zeros_(self.out_layers[-1].bias)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb).type(x.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over positions, one head, q/k/v split per head first (the OpenAI UNet's "legacy" order)."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        q, k, v = self.qkv(self.norm(flat)).reshape(b * self.heads, 3 * c // self.heads, h * w).chunk(3, dim=1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return (flat + self.proj_out(a.transpose(1, 2).reshape(b, c, h * w))).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Layers in order; the residual blocks also get the timestep embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class PatchedUNet(nn.Module):
    """The diffusion decoder: x_t patched to (C*p*p, H/p, W/p), the codes resized (nearest) to that grid and
    concatenated, a UNet with skip connections, unpatched back. Predicts what `prediction_type` says (x0)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        preset = UNET_PRESETS[cfg.dec_type]
        p, base, mults = preset["patch_size"], preset["channels"], preset["mults"]
        self.patch, self.base = p, base
        emb, first = 4 * base, mults[0] * base
        self.time_embed = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.n_channels * p * p + cfg.latent_dim,
                                                                     first, 3, padding=1))])
        skips, ch, scale = [first], first, 1
        for level, mult in enumerate(mults):
            for _ in range(preset["res_blocks"]):
                layers = [ResBlock(ch, mult * base, emb)]
                ch = mult * base
                if scale in preset["attention_at"]:
                    layers.append(AttentionBlock(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skips.append(ch)
            if level < len(mults) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skips.append(ch)
                scale *= 2
        self.middle_block = EmbedSequential(ResBlock(ch, ch, emb), AttentionBlock(ch), ResBlock(ch, ch, emb))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(preset["res_blocks"] + 1):
                layers = [ResBlock(ch + skips.pop(), mult * base, emb)]
                ch = mult * base
                if scale in preset["attention_at"]:
                    layers.append(AttentionBlock(ch))
                if level and i == preset["res_blocks"]:
                    layers.append(Upsample(ch))
                    scale //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(first, cfg.n_channels * p * p, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t, t, codes):
        x = F.pixel_unshuffle(x_t, self.patch)  # channels in (c, row, col) order, as the reference's patches
        x = torch.cat([x, F.interpolate(codes.type(x.dtype), size=x.shape[-2:], mode="nearest")], dim=1)
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        emb = self.time_embed(timestep_embedding(t, self.base)).type(x.dtype)
        skips = []
        for block in self.input_blocks:
            x = block(x, emb)
            skips.append(x)
        x = self.middle_block(x, emb)
        for block in self.output_blocks:
            x = block(torch.cat([x, skips.pop()], dim=1), emb)
        return F.pixel_shuffle(self.out(x), self.patch)


def diffusion_scheduler(cfg: VQConfig, kind: str | None = None):
    """diffusers' scheduler with the tokenizer's settings: DDIM with trailing timesteps (its first step starts
    from pure noise; deterministic), or DDPM with the reference's leading spacing (its default decoder)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kind = kind or cfg.scheduler
    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                  prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample, thresholding=cfg.thresholding,
                  sample_max_value=1.0, rescale_betas_zero_snr=cfg.zero_terminal_snr)
    if kind == "ddim":
        return DDIMScheduler(**common, timestep_spacing="trailing")
    if kind == "ddpm":
        return DDPMScheduler(**common, timestep_spacing="leading")
    raise ValueError(f"scheduler {kind!r}: expected 'ddim' or 'ddpm'")


# --- the tokenizer -------------------------------------------------------------------------------------------


class VQVAE(nn.Module):
    """Encoder, quantizer and decoder under the published names: `cls_emb`, `encoder`, `quant_proj`, `quantize`,
    and `post_quant_proj` + a ViT `decoder`, or a UNet `decoder` conditioned on the codes themselves."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        cfg.check("tokenizer settings")
        self.cfg = cfg
        self.cls_emb = nn.Embedding(cfg.n_labels, cfg.n_channels) if cfg.n_labels else None
        self.encoder = BottleneckMLP(cfg.enc_type, cfg.n_channels) if mlp_shape(cfg.enc_type) else ViTEncoder(cfg)
        self.quant_proj = nn.Conv2d(self.encoder.width, cfg.latent_dim, 1)
        self.quantize = Memcodes(cfg) if cfg.quant_type == "memcodes" else Quantizer(cfg)
        if cfg.diffusion:
            self.decoder = PatchedUNet(cfg)
            self.noise_scheduler = diffusion_scheduler(cfg, "ddpm")  # training's noising (not a module)
        else:
            out = cfg.n_labels or cfg.n_channels
            self.decoder = BottleneckMLP(cfg.dec_type, dim_out=out) if mlp_shape(cfg.dec_type) else \
                ViTDecoder(cfg, out)
            self.post_quant_proj = nn.Conv2d(cfg.latent_dim, self.decoder.width, 1)

    def encode(self, x: torch.Tensor):
        """Inputs -> (codes (B, latent, n, n), commitment loss, ids (B, n, n)); training moves the codebook."""
        return self.quantize(self._latents(x))

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_emb is not None:
            x = self.cls_emb(x).permute(0, 3, 1, 2)
        return self.quant_proj(self.encoder(x))

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs -> token ids (B, n, n); in training mode too, without moving the codebook."""
        return self.quantize.nearest(self._latents(x))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The ViT decoder's output from codes (B, latent, n, n)."""
        return self.decoder(self.post_quant_proj(codes))

    def forward(self, x: torch.Tensor, loss: str = "mse", generator: torch.Generator | None = None) -> dict:
        """One training step's losses on a batch of (preprocessed) inputs. A ViT decoder reconstructs from the
        codes; a diffusion decoder is asked, at a timestep drawn uniformly, for what `prediction_type` names (x0,
        the noise or v) from the noised input. `loss`: "mse", "smooth_l1", "ce" over the labels, "cosine" (1 -
        the cosine similarity of each position's vector: the reference's `cosine_1d`, for global vectors), or
        "bce" (binary cross-entropy of the decoded logits against masks in {0, 1}: SAM instance masks; the
        reference's own runs a softmax over (sigmoid, 1 - sigmoid), which has the same optimum and weaker
        gradients)."""
        measure = {"ce": F.cross_entropy, "smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss,
                   "bce": F.binary_cross_entropy_with_logits,
                   "cosine": lambda p, t: 1 - F.cosine_similarity(p.flatten(2), t.flatten(2), dim=1).mean()}[loss]
        codes, commitment, ids = self.encode(x)
        if self.cfg.diffusion:
            scheduler = self.noise_scheduler
            t = torch.randint(self.cfg.num_train_timesteps, (len(x),), generator=generator).to(x.device)
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
            prediction = self.decoder(scheduler.add_noise(x, noise, t), t, codes)
            target = {"sample": x, "epsilon": noise}.get(self.cfg.prediction_type)
            if target is None:
                target = scheduler.get_velocity(x, noise, t)
            reconstruction = measure(prediction.float(), target.float())
        else:
            prediction = self.decode_codes(codes).float()
            reconstruction = measure(prediction, x if loss == "ce" else x.float())
        return {"loss": reconstruction + commitment, "reconstruction_loss": reconstruction,
                "commitment_loss": commitment, "ids": ids}

    def unflatten(self, ids: torch.Tensor) -> torch.Tensor:
        """Flat ids (B, N) -> the shape `decode_tokens` reads: (B, n, n), or (B, codebooks, n, n) for memcodes."""
        heads = self.cfg.num_codebooks if self.cfg.quant_type == "memcodes" else 1
        side = math.isqrt(ids.shape[1] // heads)
        return ids.reshape(len(ids), side, side) if heads == 1 else ids.reshape(len(ids), heads, side, side)

    @torch.no_grad()
    def decode_tokens(self, ids: torch.Tensor, steps: int | None = None, scheduler: str = "ddim",
                      generator: torch.Generator | None = None, image_size: int | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, n, n) -> the decoded input. Diffusion decoders sample `steps` steps (DDIM by default,
        deterministic given the starting noise; "ddpm" is the reference's own default) from `noise`, or from
        Gaussian noise drawn on the CPU from `generator` as the reference's pipeline draws it."""
        codes = self.quantize.lookup(ids)
        if not self.cfg.diffusion:
            return self.decode_codes(codes)
        sampler = diffusion_scheduler(self.cfg, scheduler)
        sampler.set_timesteps(steps or self.cfg.num_train_timesteps)
        size = image_size or ids.shape[-1] * self.cfg.patch_size
        if noise is None:
            noise = torch.randn(len(ids), self.cfg.n_channels, size, size, generator=generator)
        x = noise.to(codes.device)
        for t in sampler.timesteps:
            prediction = self.decoder(x, t, codes).float()
            x = sampler.step(prediction, t, x, generator=generator).prev_sample
        return x


# --- a modality's settings -------------------------------------------------------------------------------------

SIZES = {  # the encoder, the two decoders, a class map's embedding width, and the global vectors' MLP and latent
    "paper": dict(enc_type="vit_b_enc", vit_dec="vit_b_dec", unet_dec="unet_patched", label_width=64,
                  mlp="BottleneckMLP/B_6-Wi_1024", mlp_latent=1024),
    "tiny": dict(enc_type="vit_tiny_enc", vit_dec="vit_tiny_dec", unet_dec="unet_patched_tiny", label_width=16,
                 mlp="BottleneckMLP/B_2-Wi_32", mlp_latent=64),
}
DIFFUSION = dict(num_train_timesteps=1000, scheduler="ddpm", beta_schedule="linear", prediction_type="sample",
                 clip_sample=True, thresholding=True, zero_terminal_snr=True)  # the published tokenizers' own


def tokenizer_config(modality: str, size: str = "paper", **overrides) -> VQConfig:
    """A modality's tokenizer settings from its registry entry (`tokenizer`: in_channels, codebook_size, decoder
    "vit", "diffusion" or "mlp" (global vectors, with num_codebooks), loss; patch_size 1 for feature maps;
    input_size when the input is not 224 pixels, latent_dim at the paper's size, out_conv), at a size;
    `overrides` are VQConfig fields.
    Class maps are embedded, with one label more than their classes (the reference's unlabelled 0)."""
    known = [m.name for m in registry.loaded().tokenized()]
    if modality not in known:
        raise ValueError(f"no tokenizer for modality {modality!r} (known: {', '.join(known)})")
    if size not in SIZES:
        raise ValueError(f"size {size!r}: expected {' or '.join(map(repr, SIZES))}")
    entry, preset = registry.get(modality).tokenizer, SIZES[size]
    classes = entry["loss"] == "ce"
    # patch_size sets the token grid (224 // 16 = 14; DINOv2's 14-pixel patches: 16; SAM's 64-pixel masks: 4),
    # for feature maps too; the position tables stay built for 224, as the reference's (input_size_max)
    side = entry.get("input_size", 224)
    settings = dict(image_size=224, enc_type=preset["enc_type"], patch_size=side // registry.get(modality).token_grid,
                    post_mlp=True, latent_dim=entry.get("latent_dim", 32) if size == "paper" else 32,
                    patch_proj=entry.get("patch_size", 16) != 1, codebook_size=entry["codebook_size"],
                    n_channels=preset["label_width"] if classes else entry["in_channels"],
                    n_labels=entry["in_channels"] + 1 if classes else None, out_conv=entry.get("out_conv", False))
    if entry["decoder"] == "diffusion":
        settings |= dict(DIFFUSION, dec_type=preset["unet_dec"])
    elif entry["decoder"] == "mlp":  # a global vector: the reference's BMLP-BMLP with Memcodes
        settings |= dict(enc_type=preset["mlp"], dec_type=preset["mlp"], quant_type="memcodes", post_mlp=False,
                         num_codebooks=entry["num_codebooks"], latent_dim=preset["mlp_latent"])
    else:
        settings["dec_type"] = preset["vit_dec"]
    return VQConfig(**{**settings, **overrides})


def dead_code_threshold(batch_size: int, tokens_per_sample: int, codebook_size: int, coefficient: float = 32.0):
    """The EMA count under which a code is restarted: 1/32 of its share of a batch's tokens (the reference's
    `coef_ema_dead_code` 32)."""
    return batch_size * tokens_per_sample / codebook_size / coefficient


# --- quality figures ----------------------------------------------------------------------------------------


def reconstruction_metric(modality: str, reconstruction, target) -> tuple[str, float]:
    """The paper's kind of quality figure for the modality (its registry entry's `metric`), on a batch."""
    return registry.get(modality).metric(reconstruction, target)


def baseline_metric(modality: str, target: torch.Tensor, classes: int | None = None) -> float:
    """What a tokenizer that learned nothing would score (each sample's mean, or its majority class)."""
    return registry.get(modality).baseline_metric(target, classes)


def codebook_usage(ids: torch.Tensor, size: int) -> dict:
    """Fraction of codes used and perplexity of their distribution, over a window of token ids."""
    counts = torch.bincount(ids.flatten(), minlength=size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codes_used": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}


# --- loading and saving ------------------------------------------------------------------------------------


def state_dict_problems(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `tensors` from loading into `model` one to one: missing, unknown and mis-shaped names."""
    expected = model.state_dict()
    problems = [f"missing tensor {k} {tuple(v.shape)}" for k, v in expected.items() if k not in tensors]
    problems += [f"unknown tensor {k} {tuple(v.shape)}" for k, v in tensors.items() if k not in expected]
    problems += [f"tensor {k} has shape {tuple(v.shape)}, the settings make {tuple(expected[k].shape)}"
                 + (" (codebook_size?)" if k.endswith(("_codebook.embed", "cluster_size")) else "")
                 for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    return problems


def read_published(source: str | Path) -> tuple[VQConfig, dict[str, torch.Tensor]]:
    """A published tokenizer's settings and tensors (float ones as float32); see models/published.py."""
    settings, tensors, where = read_checkpoint(source, "dec_type", ValueError)
    config = VQConfig.from_dict(settings, where)
    return config, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def load_tokenizer(source: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    config, tensors = read_published(source)
    model = VQVAE(config)
    problems = state_dict_problems(model, tensors)
    if problems:
        raise ValueError(f"{source}: its tensors do not fit its settings:\n  " + "\n  ".join(problems))
    model.load_state_dict(tensors)
    return model.to(device).eval()


def save_tokenizer(model: VQVAE, folder: str | Path) -> None:
    """The published layout: `config.json` (the constructor's arguments) and `model.safetensors`."""
    folder = Path(folder)
    write_json(folder / "config.json", asdict(model.cfg))
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
