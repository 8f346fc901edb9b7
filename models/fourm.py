"""4M: a multimodal masked encoder-decoder over token sequences (Mizrahi, Bachmann et al., 2023).

One file, top to bottom: the modality registry, the configuration and the paper's sizes, the layers (pre-LN
blocks, SwiGLU, attention through `scaled_dot_product_attention`), the per-modality embeddings, and the model:
select the visible input tokens, encode them, decode the target tokens, score them.

Batch layout (the reference's, so its batches and weights work here), per modality name:
    tensor                  image tokens (B, 196) or (B, 14, 14) ids; RGB pixels (B, 3, 224, 224), normalised;
                            sequences (B, L) ids, input and target tokens in one row (see the masking sampler)
    input_mask              (B, n) bool, True = not an input (masked or padding)
    target_mask             (B, n) bool, True = not a target
    decoder_attention_mask  (B, n) int, how many following targets each target may see (images: the count of
                            targets on the first target token; sequences: 1 per token = causal)
`num_encoder_tokens` and `num_decoder_tokens` fix how many input and target slots a batch uses (128 and 128 in
the paper); valid tokens are gathered first, in modality then position order, and the rest is padding.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core import registry
from core.files import save_model_safetensors, write_json
from core.registry import RESOLUTION
from models.published import read_checkpoint


# --- the modalities: each domain's kind ("pixels": RGB patches, an input only; "tokens": a tokenizer's 14x14 ids;
# "sequence": text token ids; "embeddings": vectors, an input only), vocabulary and channels come from the registry
# (core/registry.py)
def _domain(name: str) -> registry.Domain:
    return registry.domain(name)


SEQUENCE_TABLE = 512        # sine-cosine positions of a sequence: the reference means to cut its 512-entry table to
                            # 256, but its slice falls on the batch axis, so its checkpoints carry all 512

SIZES = {  # Table 4: encoder and decoder depth, width, heads (head dimension 64)
    "Ti": dict(encoder_depth=6, decoder_depth=6, dim=384, num_heads=6),
    "S": dict(encoder_depth=8, decoder_depth=8, dim=512, num_heads=8),
    "B": dict(encoder_depth=12, decoder_depth=12, dim=768, num_heads=12),
    "L": dict(encoder_depth=24, decoder_depth=24, dim=1024, num_heads=16),
    "XL": dict(encoder_depth=24, decoder_depth=24, dim=2048, num_heads=32),
}


@dataclass
class FourMConfig:
    """The model's settings, named as the reference's `config.json` names them."""
    domains_in: list | None = None   # None: every modality of its set (the built-ins and its modules')
    domains_out: list | None = None  # None: every one of those 4M can predict
    dim: int = 768
    encoder_depth: int = 12
    decoder_depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    gated_mlp: bool = True          # SwiGLU (the final models); False: GELU MLP (the ablation reference)
    act_layer: str = "SiLU"
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    image_size: int = 224
    patch_size: int = 16
    vocab_sizes: dict = field(default_factory=dict)   # overrides of the registry's (the dataset's tokenizers)
    tie_output: bool = True         # each decoder head shares its token embedding (training); the reference's
                                    # Hugging Face checkpoints keep them apart
    decoder_sep_mask: bool = True   # decoder tokens attend within their own modality only
    modality_modules: list = field(default_factory=list)  # modules defining its modalities beyond the built-ins
                                                          # (a profile's `modalities`), imported when it is built

    @classmethod
    def sized(cls, size: str, **overrides) -> "FourMConfig":
        if size not in SIZES:
            raise ValueError(f"unknown 4M size {size!r} (known: {', '.join(SIZES)})")
        return cls(**{**SIZES[size], **overrides})

    def __post_init__(self):
        known = self.modality_set.domain_names()  # made, it has imported the modules
        if self.domains_in is None:
            self.domains_in = known
        if self.domains_out is None:
            self.domains_out = [d.name for d in self.modality_set.domains() if not d.input_only]
        unknown = [m for m in [*self.domains_in, *self.domains_out] if m not in known]
        if unknown:
            raise ValueError(f"unknown modalities {unknown} (known: {', '.join(known)})")
        inputs_only = [m for m in self.domains_out if _domain(m).input_only]
        if inputs_only:
            raise ValueError(f"{inputs_only} can only be inputs (pixels and embeddings are never a target)")
        if self.dim % self.num_heads or self.dim % 4:
            raise ValueError(f"dim {self.dim} must divide by num_heads {self.num_heads} and by 4")

    @functools.cached_property
    def modality_set(self) -> registry.ModalitySet:
        """The modalities it may be built with: the built-ins and those its `modality_modules` define."""
        return registry.ModalitySet(self.modality_modules)

    def vocab(self, modality: str) -> int:
        return int(self.vocab_sizes.get(modality, _domain(modality).vocab_size or 0))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def grid_of(self, modality: str) -> int:
        """A modality's tokens per side in this model: the pixel patches' grid, or the domain's own token grid
        (at 224) scaled to the model's image size (14 at 224 and 4 at 64 for 16-pixel patches; 16 for DINOv2's);
        a global vector's 4x4 codebooks at any size."""
        spec = _domain(modality)
        if spec.pooled:  # one vector's codebooks: as many tokens at any image size
            return spec.grid
        return self.grid if spec.kind == "pixels" else spec.grid * self.image_size // RESOLUTION

    @property
    def pixels_input(self) -> str | None:
        """The domain the model reads RGB pixels through (rgb@224), if it has one."""
        return next((m for m in self.domains_in if _domain(m).kind == "pixels"), None)

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.dim * self.mlp_ratio)
        return int(2 * hidden / 3) if self.gated_mlp else hidden


# --- positions -----------------------------------------------------------------------------------------------
def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """(1, length, dim): [sin(p w), cos(p w)], w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)[None]


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(1, grid*grid, dim) in raster order: [sin(r w), cos(r w), sin(c w), cos(c w)], w_k = 10000^(-k / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    r, c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)[None]


# --- layers --------------------------------------------------------------------------------------------------
def _norm(cfg: FourMConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.dim, eps=1e-6, bias=cfg.norm_bias)


def _attend(q, k, v, mask):
    """q (B, h, n, d), k/v (B, h, m, d), mask (B, n|1, m) bool, True = may not attend.

    The mask is added as the dtype's most negative finite value, as the reference masks: a row with every key
    masked (a padding slot) then averages all keys instead of producing NaN."""
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None])


class SelfAttention(nn.Module):
    def __init__(self, cfg: FourMConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.proj_bias)

    def forward(self, x, mask, cache: dict | None = None):
        """cache (decoding one token at a time): the keys and values of the earlier tokens, extended in place."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        return self.proj(_attend(q, k, v, mask).transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    def __init__(self, cfg: FourMConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.proj_bias)

    def forward(self, x, context, mask, cache: dict | None = None):
        """cache: the context's keys and values, computed once for all the tokens decoded against it."""
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        if cache is not None and "kv" in cache:
            k, v = cache["kv"]
        else:
            m = context.shape[1]
            k, v = self.kv(context).reshape(b, m, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            if cache is not None:
                cache["kv"] = (k, v)
        return self.proj(_attend(q, k, v, mask).transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """SwiGLU, fc2(act(fc1 x) * fc3 x), or a plain two-layer MLP."""

    def __init__(self, cfg: FourMConfig):
        super().__init__()
        self.act = getattr(nn, cfg.act_layer)()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=cfg.mlp_bias)
        self.fc3 = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=cfg.mlp_bias) if cfg.gated_mlp else None

    def forward(self, x):
        hidden = self.act(self.fc1(x))
        return self.fc2(hidden * self.fc3(x) if self.fc3 is not None else hidden)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: FourMConfig):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = _norm(cfg), SelfAttention(cfg), _norm(cfg), MLP(cfg)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: FourMConfig):
        super().__init__()
        self.norm1, self.self_attn = _norm(cfg), SelfAttention(cfg)
        self.query_norm, self.context_norm, self.cross_attn = _norm(cfg), _norm(cfg), CrossAttention(cfg)
        self.norm2, self.mlp = _norm(cfg), MLP(cfg)

    def forward(self, y, context, self_mask, cross_mask, cache: dict | None = None):
        self_cache = cross_cache = None
        if cache is not None:  # decoding token by token: each attention keeps its own keys and values
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        y = y + self.self_attn(self.norm1(y), self_mask, self_cache)
        context = None if cross_cache and "kv" in cross_cache else self.context_norm(context)  # cached: not read
        y = y + self.cross_attn(self.query_norm(y), context, cross_mask, cross_cache)
        return y + self.mlp(self.norm2(y))


# --- embeddings: content x and emb = position + modality, per modality ---------------------------------------
class Embedding(nn.Module):
    """One modality's encoder (or decoder) embedding. `mod_emb` is shared by a modality's two embeddings."""

    def __init__(self, cfg: FourMConfig, modality: str, decoder: bool):
        super().__init__()
        spec = _domain(modality)
        self.kind, self.decoder = spec.kind, decoder
        self.max_length = spec.position_limit  # a decoder position at or past its modality's embedding length
                                               # reads position 0, as the reference's (SAM instances 290, poses 263)
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        if self.kind == "pixels":
            self.patch = cfg.patch_size
            self.proj = nn.Linear(spec.channels * cfg.patch_size ** 2, cfg.dim, bias=False)
        elif self.kind == "embeddings":  # vectors from another model (T5's), projected as they are
            self.emb_proj = nn.Linear(spec.channels, cfg.dim)
        else:
            padding = 0 if self.kind == "sequence" else None
            self.token_emb = nn.Embedding(cfg.vocab(modality), cfg.dim, padding_idx=padding)
        if spec.pooled:  # learned: a global vector's codebooks have no geometry (the reference's choice too)
            self.pos_emb = nn.Parameter(torch.zeros(1, cfg.grid_of(modality) ** 2, cfg.dim))
        else:
            if self.kind in ("sequence", "embeddings"):
                positions = sincos_1d(SEQUENCE_TABLE, cfg.dim)
            else:
                positions = sincos_2d(cfg.grid_of(modality), cfg.dim)
            self.register_buffer("pos_emb", positions, persistent=False)
        if decoder:
            self.to_logits = nn.Linear(cfg.dim, cfg.vocab(modality), bias=False)
            if cfg.tie_output:
                self.to_logits.weight = self.token_emb.weight

    def forward(self, d: dict) -> tuple[torch.Tensor, torch.Tensor]:
        data = d["tensor"]
        b = data.shape[0]
        if self.kind == "pixels":  # (B, C, H, W) -> patches flattened in (row, col, channel) order
            p = self.patch
            c, h, w = data.shape[1:]
            patches = data.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
            return self.proj(patches), (self.pos_emb + self.mod_emb).expand(b, -1, -1)
        if self.kind == "embeddings":
            x = self.emb_proj(data.to(self.emb_proj.weight.dtype))
        else:
            x = self.token_emb(data.reshape(b, -1))
        if self.kind == "tokens":
            return x, (self.pos_emb + self.mod_emb).expand(b, -1, -1)
        # sequences of tokens or vectors: a token's position is its rank among the valid tokens of its part
        invalid = d["target_mask" if self.decoder else "input_mask"]
        rank = (~invalid).long().cumsum(1) - 1
        rank = rank.masked_fill(invalid | ((rank >= self.max_length) if self.decoder else False), 0)
        positions = self.pos_emb[0][rank].masked_fill(invalid[..., None], 0.0)
        return x, positions + self.mod_emb


# --- the model -----------------------------------------------------------------------------------------------
class FourM(nn.Module):
    def __init__(self, cfg: FourMConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder_embeddings = nn.ModuleDict({m: Embedding(cfg, m, decoder=False) for m in cfg.domains_in})
        self.decoder_embeddings = nn.ModuleDict({m: Embedding(cfg, m, decoder=True) for m in cfg.domains_out})
        self.encoder = nn.ModuleList([EncoderBlock(cfg) for _ in range(cfg.encoder_depth)])
        self.encoder_norm = _norm(cfg)
        self.decoder_proj_context = nn.Linear(cfg.dim, cfg.dim)  # with a bias, even in the bias-free models
        self.decoder = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = _norm(cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.modality_ids = {m: i for i, m in enumerate(sorted(set(cfg.domains_in) | set(cfg.domains_out)))}
        self.activation_checkpointing = False  # recompute each block's activations in backward (L/XL memory)
        self.init_weights()
        for m in set(cfg.domains_in) & set(cfg.domains_out):  # one modality embedding per modality
            self.decoder_embeddings[m].mod_emb = self.encoder_embeddings[m].mod_emb

    def init_weights(self) -> None:
        """MAE-style: xavier-uniform Linears (fused q/k/v and k/v bounded per part), zero biases, N(0, 0.02)
        embeddings, modality embeddings, learned positions and the mask token. Tied heads end xavier-uniform, as
        the reference's."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                parts = 3 if name.endswith(".qkv") else 2 if name.endswith(".kv") else 1
                bound = math.sqrt(6.0 / (module.weight.shape[0] // parts + module.weight.shape[1]))
                nn.init.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, parameter in self.named_parameters():
            if name.endswith(("mod_emb", "pos_emb")) or name == "mask_token":  # pos_emb: learned ones only
                nn.init.normal_(parameter, std=0.02)

    # -- selecting the visible tokens and the targets ---------------------------------------------------------
    @staticmethod
    def _gather(tensors: list[torch.Tensor], invalid: torch.Tensor, count: int):
        """Keep `count` slots per sample, valid ones first in their original order (a stable sort)."""
        order = torch.sort(invalid.to(torch.uint8), dim=1, stable=True).indices[:, :count]
        return [t.gather(1, order if t.ndim == 2 else order[..., None].expand(-1, -1, t.shape[-1])) for t in tensors]

    def _encoder_tokens(self, batch: dict, count: int):
        xs, embs, invalid = [], [], []
        for m, d in batch.items():
            if m not in self.encoder_embeddings:
                continue
            x, emb = self.encoder_embeddings[m](d)
            xs.append(x), embs.append(emb), invalid.append(d["input_mask"])
        all_invalid = torch.cat(invalid, 1)
        x, emb, mask = self._gather([torch.cat(xs, 1), torch.cat(embs, 1), all_invalid], all_invalid, count)
        keep = ~mask[..., None]
        return x * keep, emb * keep, mask

    def _decoder_tokens(self, batch: dict, count: int):
        xs, embs, invalid, targets, see, ids = [], [], [], [], [], []
        for m, d in batch.items():
            if m not in self.decoder_embeddings:
                continue
            x, emb = self.decoder_embeddings[m](d)
            target_mask, attention = d["target_mask"], d["decoder_attention_mask"]
            if _domain(m).kind == "sequence":  # teacher forcing: slot i reads token i, predicts token i+1
                xs.append(x[:, :-1]), embs.append(emb[:, :-1])
                invalid.append(target_mask[:, 1:] | target_mask[:, :-1])
                targets.append(d["tensor"][:, 1:]), see.append(attention[:, :-1])
            else:  # image targets are queried by the mask token at their positions
                xs.append(self.mask_token.expand_as(x)), embs.append(emb)
                invalid.append(target_mask), targets.append(d["tensor"].reshape(len(x), -1)), see.append(attention)
            ids.append(torch.full_like(invalid[-1], self.modality_ids[m], dtype=torch.long))
        all_invalid = torch.cat(invalid, 1)
        y, emb, mask, target, see, modality = self._gather(
            [torch.cat(xs, 1), torch.cat(embs, 1), all_invalid, torch.cat(targets, 1), torch.cat(see, 1),
             torch.cat(ids, 1)], all_invalid, count)
        keep = ~mask[..., None]
        modality = modality.masked_fill(mask, -1)
        return y * keep, emb * keep, mask, target.masked_fill(mask, 0), self._decoder_mask(see, modality), modality

    def _decoder_mask(self, see: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """(B, M, M), True = may not attend: slot q sees slot k iff k < cumsum(see)[q] (an image's count on its
        first target opens all of them; one per sequence token is causal), and only within its modality."""
        n = see.shape[1]
        blocked = torch.arange(n, device=see.device)[None, None, :] >= see.cumsum(1)[..., None]
        if self.cfg.decoder_sep_mask:
            blocked = blocked | (modality[:, None, :] != modality[:, :, None])
        return blocked

    def _run(self, block, *args):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # -- the two halves: generation calls them directly ------------------------------------------------------
    def encode(self, batch: dict, num_encoder_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, n, D) for the decoder's cross-attention, mask (B, 1, n), True = padding) from the
        visible input tokens of `batch`, at most `num_encoder_tokens` per sample."""
        x, x_emb, x_mask = self._encoder_tokens(batch, num_encoder_tokens)
        mask = x_mask[:, None, :]
        x = x + x_emb
        for block in self.encoder:
            x = self._run(block, x, mask)
        return self.decoder_proj_context(self.encoder_norm(x)) + x_emb, mask

    def decode(self, y, context, self_mask, cross_mask, caches: list[dict] | None = None) -> torch.Tensor:
        """The decoder over queries `y` (content + position + modality), normalised. With `caches` (one dict per
        block, empty at first) `y` holds only the new tokens and `self_mask` covers every token so far."""
        for i, block in enumerate(self.decoder):
            if caches is None:
                y = self._run(block, y, context, self_mask, cross_mask)
            else:
                y = block(y, context, self_mask, cross_mask, caches[i])
        return self.decoder_norm(y)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, batch: dict, num_encoder_tokens: int, num_decoder_tokens: int, return_logits: bool = False,
                groups: torch.Tensor | None = None):
        """The loss (mean over target modalities of each one's mean cross-entropy) and the per-modality losses;
        or, with return_logits, {modality: logits (K, vocab)} for its K target slots in (sample, slot) order.
        With `groups` (B,) (each sample's dataset in a mixture), also {group: {modality: its mean cross-entropy
        over that group's targets}}, for the logs (no gradient)."""
        context, cross_mask = self.encode(batch, num_encoder_tokens)
        y, y_emb, _, target, self_mask, modality = self._decoder_tokens(batch, num_decoder_tokens)
        y = self.decode(y + y_emb, context, self_mask, cross_mask)
        target = target.long()  # ids of sequences alone (a text-only batch) are int32
        logits, losses, by_group = {}, {}, {}
        for m in batch:
            if m not in self.decoder_embeddings:
                continue
            slots = modality == self.modality_ids[m]
            logits[m] = self.decoder_embeddings[m].to_logits(y[slots])
            losses[m] = F.cross_entropy(logits[m].float(), target[slots]) if slots.any() \
                else y.new_zeros((), dtype=torch.float32)  # counted in the mean, as the reference counts it
            if groups is not None and slots.any():
                with torch.no_grad():
                    each = F.cross_entropy(logits[m].float(), target[slots], reduction="none")
                    owner = groups.to(slots.device)[:, None].expand_as(slots)[slots]
                    for g in owner.unique().tolist():
                        by_group.setdefault(g, {})[m] = each[owner == g].mean()
        if return_logits:
            return logits
        if groups is not None:
            return sum(losses.values()) / len(losses), losses, by_group
        return sum(losses.values()) / len(losses), losses

    @torch.no_grad()
    def predict_from_rgb(self, pixels: torch.Tensor, targets: list[str]) -> dict[str, torch.Tensor]:
        """Every token of each target image modality from RGB pixels alone, in one pass: {modality: (B, 196)}
        ids, the most likely at each position (what the paper's RGB->X transfers decode)."""
        b, n = len(pixels), self.cfg.grid ** 2
        visible = torch.zeros(b, n, dtype=torch.bool, device=pixels.device)
        batch = {self.cfg.pixels_input: {"tensor": pixels, "input_mask": visible, "target_mask": ~visible,
                             "decoder_attention_mask": torch.zeros(b, n, dtype=torch.int32, device=pixels.device)}}
        sizes = {m: self.cfg.grid_of(m) ** 2 for m in targets}  # each target's own grid
        for m, size in sizes.items():
            wanted = torch.zeros(b, size, dtype=torch.bool, device=pixels.device)
            attention = torch.zeros(b, size, dtype=torch.int32, device=pixels.device)
            attention[:, 0] = size  # all positions see each other
            batch[m] = {"tensor": torch.zeros(b, size, dtype=torch.long, device=pixels.device), "input_mask": ~wanted,
                        "target_mask": wanted, "decoder_attention_mask": attention}
        logits = self(batch, n, sum(sizes.values()), return_logits=True)
        return {m: logits[m].argmax(-1).reshape(b, size) for m, size in sizes.items()}

    # -- sizes, saving, loading -------------------------------------------------------------------------------
    def num_parameters(self, embeddings: bool = False) -> int:
        """Trainable parameters; without embeddings as the paper counts them (Table 4)."""
        skip = ("encoder_embeddings.", "decoder_embeddings.", "mask_token")
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (not embeddings and name.startswith(skip)):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        save_model_safetensors(self, folder / "model.safetensors")
        write_json(folder / "config.json", asdict(self.cfg))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "FourM":
        from safetensors.torch import load_model

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no 4M model in {str(folder)!r} (config.json missing); a reference checkpoint "
                                    f"needs `python -m pipeline convert-4m` first")
        model = cls(FourMConfig(**json.loads((folder / "config.json").read_text())))
        load_model(model, str(folder / "model.safetensors"), device=str(device))
        return model.to(device)


# --- the reference's checkpoints -----------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A reference checkpoint that cannot be read as this model: names the tensor or setting."""


REFERENCE_SETTINGS = ("domains_in", "domains_out", "dim", "encoder_depth", "decoder_depth", "num_heads", "mlp_ratio",
                      "gated_mlp", "act_layer", "qkv_bias", "proj_bias", "mlp_bias", "norm_bias", "image_size",
                      "patch_size")
UNSUPPORTED = {"qk_norm": False, "num_register_tokens": 0, "decoder_causal_mask": False}


def read_reference_checkpoint(source: str | Path) -> tuple[dict, dict, str]:
    """(settings, tensors, where the settings came from): see models/published.py for the layouts read."""
    return read_checkpoint(source, "domains_in", CheckpointError)


def with_shared_embeddings(tensors: dict, domains_in: list[str], domains_out: list[str]) -> dict:
    """The tensors with each modality embedding under both of its names: the reference's `FM.save_pretrained`
    (safetensors' `save_model`) keeps one name of a tensor the encoder and decoder embeddings share (the decoder's
    `mod_emb`), where its single-file checkpoints hold both."""
    out = dict(tensors)
    for m in set(domains_in) & set(domains_out):
        encoder, decoder = f"encoder_embeddings.{m}.mod_emb", f"decoder_embeddings.{m}.mod_emb"
        has_encoder = any(k.startswith(f"encoder_embeddings.{m}.") for k in tensors)
        if decoder in out and encoder not in out and has_encoder:
            out[encoder] = out[decoder]
        elif encoder in out and decoder not in out:
            out[decoder] = out[encoder]
    return out


def convert_reference(source: str | Path, modalities: list[str] = ()) -> tuple[FourMConfig, dict]:
    """The reference's checkpoint as this model's configuration and state dict; refuses unknown, missing or
    mis-shaped tensors and settings this model does not implement, by name. `modalities`: modules defining
    modalities beyond the built-ins (4M-21's: models.modalities_4m21 and models.modalities_4m21_networks),
    recorded in the configuration."""
    modalities = [str(Path(m).resolve()) if m.endswith(".py") else m for m in modalities]  # read anywhere
    modality_set = registry.ModalitySet(modalities)
    settings, tensors, _ = read_reference_checkpoint(source)
    for key, supported in UNSUPPORTED.items():
        if settings.get(key, supported) != supported:
            raise CheckpointError(f"{source}: {key}={settings[key]!r} is not supported (only {supported!r})")
    missing = [k for k in ("domains_in", "domains_out", "dim", "encoder_depth", "decoder_depth", "num_heads")
               if k not in settings]
    if missing:
        raise CheckpointError(f"{source}: settings {missing} missing")
    kept = {k: settings[k] for k in REFERENCE_SETTINGS if k in settings}
    known = modality_set.domain_names()
    tensors = with_shared_embeddings(tensors, settings["domains_in"], settings["domains_out"])
    kept["domains_in"] = [m for m in kept["domains_in"] if m in known and
                          f"encoder_embeddings.{m}.mod_emb" in tensors]  # the reference drops embedding-less ones
    unknown = [m for m in [*settings["domains_in"], *settings["domains_out"]] if m not in known]
    if unknown:
        raise CheckpointError(f"{source}: modalities {unknown} are not in this project's registry "
                              f"({', '.join(known)}); name the module that defines them (convert-4m --modalities; "
                              f"4M-21's: models.modalities_4m21 models.modalities_4m21_networks)")
    vocab = {}
    for m in settings["domains_in"] + settings["domains_out"]:
        for side in ("encoder", "decoder"):
            weight = tensors.get(f"{side}_embeddings.{m}.token_emb.weight")
            if weight is not None:
                vocab[m] = int(weight.shape[0])
    kept["vocab_sizes"] = vocab
    kept["modality_modules"] = list(modalities)
    kept["tie_output"] = all(torch.equal(tensors.get(f"decoder_embeddings.{m}.to_logits.weight", torch.empty(0)),
                                         tensors.get(f"decoder_embeddings.{m}.token_emb.weight", torch.empty(1)))
                             for m in settings["domains_out"])
    try:
        cfg = FourMConfig(**kept)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None
    with torch.device("meta"):
        expected = FourM(cfg).state_dict()
    state = {}
    for key, value in tensors.items():
        if key.endswith(".pos_emb") and key not in expected:  # fixed sine-cosine tables: rebuilt, but they must
            continue                                          # be the same ones (learned ones load as weights)
        if key.endswith(".bias") and key not in expected and not cfg.norm_bias and not value.any():
            continue  # the reference's bias-free LayerNorm keeps a zero bias buffer
        state[key] = value
    extra = sorted(set(state) - set(expected))
    absent = sorted(set(expected) - set(state))
    if extra or absent:
        raise CheckpointError(f"{source}: " + "; ".join(
            part for part in (f"unknown tensors {extra[:8]}" if extra else "",
                              f"missing tensors {absent[:8]}" if absent else "") if part))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{source}: tensors of the wrong shape: {', '.join(wrong[:8])}")
    reference = {k: v for k, v in tensors.items() if k.endswith(".pos_emb") and k not in expected}
    model = FourM(cfg)
    ours = dict(model.named_buffers())
    for key, table in reference.items():
        if key in ours and (ours[key].shape != table.shape or not torch.allclose(ours[key], table, atol=1e-5)):
            raise CheckpointError(f"{source}: {key} is not the sine-cosine table this model builds")
    return cfg, state


def convert_checkpoint(source: str | Path, out: str | Path, modalities: list[str] = ()) -> FourM:
    """`convert-4m`: the reference's checkpoint saved as a folder `FourM.from_pretrained` reads."""
    cfg, state = convert_reference(source, modalities)
    model = FourM(cfg)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    return model
