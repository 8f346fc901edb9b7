"""A dataset's tokenizers, one way in: where they are, load, encode, decode, picture.

    <root>/tokenizers/text/tokenizer.json        the WordPiece vocabulary of every sequence modality
    <root>/tokenizers/<modality>/                a VQ-VAE per tokenized modality (config.json, model.safetensors)

Tokenize, pretraining's pictures, evaluation and generation all read them through here. A 4M domain name
(tok_depth@224, tok_depth) or a modality's name (depth) both find a modality's tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core import registry
from models.text_tokenizer import load_text_tokenizer
from models.vqvae import load_tokenizer


def folder(root: str | Path, modality: str) -> Path:
    """The tokenizer folder of a modality (or of the text tokenizer: registry.TEXT)."""
    name = modality if modality == registry.TEXT else registry.domain_or_modality(modality).name
    return Path(root) / "tokenizers" / name


def text_path(root: str | Path) -> Path:
    return folder(root, registry.TEXT) / "tokenizer.json"


def load_text(root: str | Path, required: bool = False):
    """The text tokenizer, or None where there is none (and none is `required`)."""
    path = text_path(root)
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"no text tokenizer at {path} (train it: make train-tokenizers)")
        return None
    return load_text_tokenizer(path)


def has_model(root: str | Path, modality: str) -> bool:
    return (folder(root, modality) / "model.safetensors").is_file()


def load(root: str | Path, modality: str, device: str | torch.device = "cpu"):
    """A modality's trained VQ-VAE, in evaluation mode."""
    return load_tokenizer(folder(root, modality), device).eval()


def decode(tokenizer, ids: torch.Tensor, first: int = 0, seeds: list[int] | None = None) -> torch.Tensor:
    """Token ids -> maps. A diffusion decoder starts each sample from its own seeded noise (seed: `seeds`, or the
    sample's index in the run from `first` on), so a result does not depend on how samples were batched."""
    if tokenizer.cfg.decoder != "diffusion":
        return tokenizer.detokenize(ids).float()
    shape = (tokenizer.cfg.in_channels, tokenizer.cfg.image_size, tokenizer.cfg.image_size)
    seeds = list(range(first, first + len(ids))) if seeds is None else seeds
    start = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return tokenizer.detokenize(ids, start=start.to(ids.device)).float()


def picture(modality: str, x: torch.Tensor) -> np.ndarray:
    """A tokenizer input or a decoded map (C, H, W) -> an RGB picture in [0, 1]."""
    return registry.domain_or_modality(modality).tensor_picture(x)


def pictures(tokenizer, modality: str, ids: torch.Tensor, seeds: list[int]) -> list[np.ndarray]:
    """A batch of token ids (B, 196) -> pictures, decoded in one pass with per-sample seeded noise."""
    return [picture(modality, x) for x in decode(tokenizer, ids, seeds=seeds).cpu()]
