"""The dense modality tokenizers: ViT VQ-VAEs with an EMA codebook, and ViT or diffusion decoders.

One file, top to bottom: the settings (each modality's own, from the registry: what its tokenizer sees and how it is
trained, the paper's Table 3), the quantizer, the encoder, the two decoders, the VQ-VAE, saving and loading.

Inputs, as `stages/tokenizers/tokenizer_data.py` prepares them from the labelled shards (B = batch, 224x224 crops):
    rgb, normal  float (B, 3, 224, 224) in [-1, 1]
    depth        float (B, 1, 224, 224) in [-1, 1]  (relative depth 0..1 mapped linearly)
    semseg       long  (B, 224, 224) class ids
    clip         float (B, 512, 14, 14)              (feature maps: no patch projection, a token per feature)
Tokens: (B, 196) ids into the modality's codebook; 14x14 per 224x224 crop.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core import registry
from core.files import save_safetensors, write_json

# --- the registry ----------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    modality: str
    in_channels: int              # image channels, classes for semseg, feature size for clip
    codebook_size: int
    decoder: str                  # "vit" or "diffusion"
    loss: str                     # "mse", "smooth_l1" or "ce"
    image_size: int = 224
    patch_size: int = 16          # 1 for clip: its maps are already one vector per 16x16 patch
    latent_dim: int = 32
    width: int = 768              # encoder (and ViT decoder) width, depth and heads: ViT-B
    depth: int = 12
    heads: int = 12
    unet_channels: int = 128      # diffusion decoder: base width, one multiplier per level
    unet_mults: tuple = (1, 2, 3, 4)
    unet_blocks: int = 3          # residual blocks per level
    unet_attention_levels: int = 2  # self-attention at this many of the smallest levels
    ema_decay: float = 0.99
    c_replace: float = 32.0       # restart codes whose EMA count < batch_tokens / (c_replace * codebook_size)
    commitment_weight: float = 1.0
    diffusion_steps: int = 1000   # DDPM, linear schedule
    sample_steps: int = 25        # DDIM at inference
    crop_scale: tuple = (0.8, 1.0)
    crop_ratio: tuple = (0.75, 4 / 3)
    dtype: str = "float16"        # autocast type on GPUs (Table 3)
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return self.image_size // 16  # tokens per side: 14 at 224, for images and CLIP maps alike


TINY = dict(width=32, depth=1, heads=2, unet_channels=16, unet_mults=(1, 2), unet_blocks=1,
            unet_attention_levels=1, diffusion_steps=100, sample_steps=5)


def tokenizer_config(modality: str, size: str = "paper", **overrides) -> TokenizerConfig:
    """A modality's tokenizer at a size: its registry entry's settings (Table 3 at `paper`), `overrides` on top."""
    known = [m.name for m in registry.tokenized()]
    if modality not in known:
        raise ValueError(f"no tokenizer for modality {modality!r} (known: {', '.join(known)})")
    if size not in ("paper", "tiny"):
        raise ValueError(f"size {size!r}: expected 'paper' or 'tiny'")
    settings = {**registry.get(modality).tokenizer, **(TINY if size == "tiny" else {}), **overrides}
    return TokenizerConfig(modality=modality, **settings)


# --- quantizer -------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EMAQuantizer(nn.Module):
    """l2-normalized codebook updated by EMA, with dead-code restart (paper B.3).

    Codes and encoder outputs are unit vectors, so the nearest code is the one with the largest dot
    product. After each training step, codes whose EMA count fell below batch_tokens / (c * N) are replaced
    by random encoder outputs of the batch. Statistics are summed over data-parallel workers and restarts
    are drawn on rank 0, so every replica keeps the same codebook.
    """

    def __init__(self, size: int, dim: int, decay: float = 0.99, c_replace: float = 32.0):
        super().__init__()
        self.size, self.decay, self.c_replace = size, decay, c_replace
        codes = F.normalize(torch.randn(size, dim), dim=-1)
        self.register_buffer("codebook", codes)
        self.register_buffer("ema_count", torch.ones(size))
        self.register_buffer("ema_sum", codes.clone())
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.codebook)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() @ self.codebook.t()).argmax(-1)

    def forward(self, z: torch.Tensor):
        """z (B, n, d), unit vectors -> (straight-through codes, ids (B, n), commitment loss)."""
        ids = self.nearest(z)
        codes = self.lookup(ids).to(z.dtype)
        if self.training:
            self.update(z.detach().reshape(-1, z.shape[-1]).float(), ids.reshape(-1))
        commitment = F.mse_loss(z, codes.detach())
        return z + (codes - z).detach(), ids, commitment

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids, minlength=self.size).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, vectors)
        tokens = torch.tensor(float(len(ids)), device=vectors.device)
        if _distributed():
            for t in (counts, sums, tokens):
                dist.all_reduce(t)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.codebook.copy_(F.normalize(self.ema_sum, dim=-1))
        threshold = float(tokens) / (self.c_replace * self.size)
        dead = self.ema_count < threshold
        if dead.any():
            self.restart(dead, vectors, threshold)

    @torch.no_grad()
    def restart(self, dead: torch.Tensor, vectors: torch.Tensor, threshold: float) -> None:
        picks = torch.randint(len(vectors), (int(dead.sum()),), device=vectors.device)
        fresh = F.normalize(vectors[picks], dim=-1)
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.codebook[dead] = fresh
        self.ema_sum[dead] = fresh * threshold
        self.ema_count[dead] = threshold
        self.restarts += int(dead.sum())


# --- encoder and decoders ----------------------------------------------------------------------------------


def _blocks(width: int, depth: int, heads: int) -> nn.Sequential:
    from timm.models.vision_transformer import Block

    return nn.Sequential(*[Block(width, heads, qkv_bias=True) for _ in range(depth)])


class ViTEncoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        channels = cfg.in_channels
        if cfg.loss == "ce":  # class ids -> a small learned embedding per class, then the patch projection
            self.classes = nn.Embedding(cfg.in_channels, cfg.latent_dim)
            channels = cfg.latent_dim
        self.patch = nn.Conv2d(channels, cfg.width, cfg.patch_size, cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, cfg.grid * cfg.grid, cfg.width) * 0.02)
        self.blocks = _blocks(cfg.width, cfg.depth, cfg.heads)
        self.norm = nn.LayerNorm(cfg.width)
        self.to_latent = nn.Linear(cfg.width, cfg.latent_dim)

    def forward(self, x):
        if hasattr(self, "classes"):
            x = self.classes(x).permute(0, 3, 1, 2)
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return F.normalize(self.to_latent(self.norm(self.blocks(tokens))), dim=-1)


class ViTDecoder(nn.Module):
    """Codes -> per-token outputs: class logits per pixel (semseg) or the feature vector (clip)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.from_latent = nn.Linear(cfg.latent_dim, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.grid * cfg.grid, cfg.width) * 0.02)
        self.blocks = _blocks(cfg.width, cfg.depth, cfg.heads)
        self.norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.in_channels * cfg.patch_size ** 2)

    def forward(self, codes):
        cfg, grid, p = self.cfg, self.cfg.grid, self.cfg.patch_size
        out = self.out(self.norm(self.blocks(self.from_latent(codes) + self.pos)))  # (B, n, C*p*p)
        out = out.reshape(len(codes), grid, grid, cfg.in_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(len(codes), cfg.in_channels, grid * p, grid * p)


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, t):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.attn = nn.MultiheadAttention(channels, heads if channels % heads == 0 else 1, batch_first=True)

    def forward(self, x):
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(seq, seq, seq, need_weights=False)[0].transpose(1, 2).reshape(b, c, h, w)


class PatchUNet(nn.Module):
    """The diffusion decoder: a UNet over 4x4 pixel patches, conditioned on the upsampled codes.

    Input: the noised image patched to (16C, 56, 56) concatenated with the 32-d codes upsampled from 14x14
    to 56x56; output: the clean image (x0 prediction), unpatched to (C, 224, 224).
    """

    patch = 4

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        c, base, tdim = cfg.in_channels * self.patch ** 2, cfg.unet_channels, cfg.unet_channels * 4
        self.time = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(c + cfg.latent_dim, base, 3, padding=1)
        widths = [base * m for m in cfg.unet_mults]
        attention_from = len(widths) - cfg.unet_attention_levels
        self.down, self.up, skips, cin = nn.ModuleList(), nn.ModuleList(), [base], base
        for level, width in enumerate(widths):
            for _ in range(cfg.unet_blocks):
                self.down.append(nn.ModuleList([ResBlock(cin, width, tdim),
                                                SelfAttention(width) if level >= attention_from else nn.Identity()]))
                cin = width
                skips.append(cin)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
                skips.append(cin)
        self.mid = nn.ModuleList([ResBlock(cin, cin, tdim), SelfAttention(cin), ResBlock(cin, cin, tdim)])
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(cfg.unet_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(cin + skips.pop(), width, tdim),
                                              SelfAttention(width) if level >= attention_from else nn.Identity()]))
                cin = width
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(nn.GroupNorm(min(8, cin), cin), nn.SiLU(), nn.Conv2d(cin, c, 3, padding=1))
        self.base = base

    def forward(self, noisy, t, codes_map):
        x = F.pixel_unshuffle(noisy, self.patch)
        cond = F.interpolate(codes_map, size=x.shape[-2:], mode="nearest")
        temb = self.time(_timestep_embedding(t, self.base))
        h = self.inp(torch.cat([x, cond], dim=1))
        skips = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](h, temb))
            else:
                h = layer(h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](torch.cat([h, skips.pop()], dim=1), temb))
            else:
                h = layer(h)
        return F.pixel_shuffle(self.out(h), self.patch)


TERMINAL_SIGNAL = 1e-3  # alpha_bar at the last training timestep: sampling starts from pure noise, so must training


def noise_schedule(steps: int) -> torch.Tensor:
    """DDPM's linear betas (1e-4 .. 0.02 over 1000 steps), scaled by 1000/steps for shorter schedules.

    Unscaled, 100 steps would end at alpha_bar 0.36: the decoder would never see an input without most of the
    image in it, learn to denoise rather than to decode its tokens, and fail from the pure noise sampling
    starts with. Scaled, every schedule of 2 steps or more ends near zero signal (1000 steps: 4e-5).
    """
    scale = 1000 / steps
    betas = torch.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=torch.float64).clamp(max=0.999)
    terminal = float(torch.prod(1 - betas))
    if terminal > TERMINAL_SIGNAL:
        raise ValueError(f"diffusion_steps={steps}: the schedule ends at alpha_bar {terminal:.3g}, above "
                         f"{TERMINAL_SIGNAL} (signal left where sampling starts from noise); use 2 steps or more")
    return betas


class Diffusion(nn.Module):
    """The diffusion decoder: diffusers' DDPM noising for training (x0 prediction), DDIM for sampling.

    Sampling uses the "trailing" timesteps (Lin et al. 2023, the reference's default): the first step is the
    last training timestep, the one whose input is (near) pure noise, as the sampler's start is.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        from diffusers import DDIMScheduler, DDPMScheduler

        self.cfg, self.unet = cfg, PatchUNet(cfg)
        betas = noise_schedule(cfg.diffusion_steps).numpy()
        common = dict(num_train_timesteps=cfg.diffusion_steps, trained_betas=betas, prediction_type="sample",
                      clip_sample=True, clip_sample_range=1.0)
        self.train_scheduler = DDPMScheduler(**common)
        self.sampler = DDIMScheduler(**common, set_alpha_to_one=True, timestep_spacing="trailing")

    @property
    def alpha_bar(self) -> torch.Tensor:
        return self.train_scheduler.alphas_cumprod

    def noised(self, x0, t, noise):
        return self.train_scheduler.add_noise(x0, noise, t)

    def training_prediction(self, x0, codes_map, generator=None):
        t = torch.randint(self.cfg.diffusion_steps, (len(x0),), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        return self.unet(self.noised(x0, t, noise), t, codes_map)

    @torch.no_grad()
    def sample(self, codes_map, shape, steps: int | None = None, generator=None, start=None):
        """DDIM from pure noise, or from `start` (a tensor already noised to the first timestep)."""
        self.sampler.set_timesteps(steps or self.cfg.sample_steps)
        x = start if start is not None else torch.randn(shape, generator=generator, device=codes_map.device)
        for t in self.sampler.timesteps:
            prediction = self.unet(x, t.to(x.device).expand(len(x)), codes_map).float()
            x = self.sampler.step(prediction, int(t), x).prev_sample
        return x

    def first_timestep(self, steps: int | None = None) -> int:
        self.sampler.set_timesteps(steps or self.cfg.sample_steps)
        return int(self.sampler.timesteps[0])


# --- the VQ-VAE --------------------------------------------------------------------------------------------


class VQVAE(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg)
        self.quantizer = EMAQuantizer(cfg.codebook_size, cfg.latent_dim, cfg.ema_decay, cfg.c_replace)
        self.decoder = Diffusion(cfg) if cfg.decoder == "diffusion" else ViTDecoder(cfg)

    def _codes_map(self, codes):
        g = self.cfg.grid
        return codes.transpose(1, 2).reshape(len(codes), -1, g, g)

    @torch.no_grad()
    def tokenize(self, x) -> torch.Tensor:
        """Inputs -> token ids (B, 196)."""
        return self.quantizer.nearest(self.encoder(x))

    @torch.no_grad()
    def detokenize(self, ids, steps: int | None = None, generator=None, start=None) -> torch.Tensor:
        """Token ids -> reconstruction (semseg: class logits; diffusion decoders: DDIM sampling from noise,
        or from `start`, an input already noised to the sampler's first timestep)."""
        codes = self.quantizer.lookup(ids)
        if self.cfg.decoder == "diffusion":
            size = self.cfg.image_size
            return self.decoder.sample(self._codes_map(codes), (len(ids), self.cfg.in_channels, size, size),
                                       steps, generator, start)
        return self.decoder(codes)

    def forward(self, x, generator=None) -> dict:
        codes, ids, commitment = self.quantizer(self.encoder(x))
        if self.cfg.decoder == "diffusion":
            prediction = self.decoder.training_prediction(x, self._codes_map(codes), generator)
        else:
            prediction = self.decoder(codes)
        reconstruction = reconstruction_loss(self.cfg.loss, prediction.float(), x)
        loss = reconstruction + self.cfg.commitment_weight * commitment
        return {"loss": loss, "reconstruction_loss": reconstruction, "commitment_loss": commitment, "ids": ids}


def reconstruction_loss(kind: str, prediction, target):
    if kind == "ce":
        return F.cross_entropy(prediction, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(prediction, target.float())
    return F.mse_loss(prediction, target.float())


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


def save_tokenizer(model: VQVAE, folder: str | Path) -> None:
    folder = Path(folder)
    write_json(folder / "config.json", asdict(model.cfg))
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def load_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {str(folder)!r} (config.json missing): train it first")
    settings = json.loads((folder / "config.json").read_text())
    for key in ("unet_mults", "crop_scale", "crop_ratio"):
        settings[key] = tuple(settings[key])
    model = VQVAE(TokenizerConfig(**settings))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.to(device).eval()
