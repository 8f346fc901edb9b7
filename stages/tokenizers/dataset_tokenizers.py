"""A dataset's tokenizers, one way in: where they are, load, encode, decode, picture.

    <root>/tokenizers/text/tokenizer.json        the WordPiece vocabulary of every sequence modality
    <root>/tokenizers/<modality>/                a VQ-VAE per tokenized modality (config.json, model.safetensors):
                                                 trained here, or converted from apple/ml-4m's published ones
                                                 (the same architecture and layout, models/vqvae.py)

Tokenize, pretraining's pictures, evaluation and generation all read them through here. A 4M domain name
(tok_depth@224, tok_depth) or a modality's name (depth) both find a modality's tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import registry
from core.files import publish, temporary_name, write_json
from core.registry import Modality
from core.storage import MODEL_FILES, DataPath, data_path, is_remote, local_copy
from models.text_tokenizer import load_text_tokenizer
from models.vqvae import VQVAE, load_tokenizer, read_published, save_tokenizer, state_dict_problems
from models.weights import weights_sha256
from stages.dataset.shards import DatasetLayout


def folder(root: str | Path, modality: str) -> DataPath:
    """The tokenizer folder of a modality (or of the text tokenizer: registry.TEXT)."""
    name = modality if modality == registry.TEXT else registry.domain_or_modality(modality).name
    return DatasetLayout(root).tokenizer_dir(name)


def text_path(root: str | Path) -> Path:
    return folder(root, registry.TEXT) / "tokenizer.json"


def load_text(root: str | Path, required: bool = False):
    """The text tokenizer, or None where there is none (and none is `required`)."""
    path = text_path(root)
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"no text tokenizer at {path} (train it: make train-tokenizers)")
        return None
    return load_text_tokenizer(local_copy(path.parent, (path.name,)) / path.name)


def has_model(root: str | Path, modality: str) -> bool:
    return (folder(root, modality) / "model.safetensors").is_file()


def is_converted(root: str | Path, modality: str) -> bool:
    """Whether the modality's tokenizer is a converted published one (`convert-tokenizer`), not trained here."""
    summary = folder(root, modality) / "train.json"
    return summary.is_file() and "converted_from" in json.loads(summary.read_text())


@dataclass
class DatasetTokenizer:
    """A modality's tokenizer as every stage uses it: crops in (our tokenizer input, `to_tensor`), flat ids
    (B, 196) out, and back to maps in our form, with the reference's preprocessing on the way in and out (the
    modality's `reference_input` / `from_reference_output`: depth standardised, class ids shifted by one)."""

    modality: Modality
    model: torch.nn.Module

    @property
    def classes(self) -> int | None:
        """Class count of a class-map tokenizer's decoded logits (ours: the reference's unlabelled one dropped)."""
        return self.model.cfg.n_labels - 1 if self.model.cfg.n_labels else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Our tokenizer inputs (B, ...) -> token ids (B, n*n)."""
        return self.model.tokenize(self.modality.reference_input(x)).flatten(1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, first: int = 0, seeds: list[int] | None = None) -> torch.Tensor:
        """Token ids (B, n*n) -> maps in our form. A diffusion decoder starts each sample from its own seeded noise
        (seed: `seeds`, or the sample's index in the run from `first` on), so a result does not depend on how
        samples were batched."""
        seeds = list(range(first, first + len(ids))) if seeds is None else seeds
        ids = ids.to(self.device).long()
        return self.modality.from_reference_output(decode_tokens(self.model, ids, seeds)).float()

    def pictures(self, ids: torch.Tensor, seeds: list[int]) -> list[np.ndarray]:
        """A batch of token ids (B, n*n) -> pictures, decoded in one pass with per-sample seeded noise."""
        return [self.modality.tensor_picture(x) for x in self.decode(ids, seeds=seeds).cpu()]


DECODE_STEPS = 25  # DDIM steps of a diffusion decoder (trailing spacing: deterministic given the noise)


def decode_tokens(model, ids: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Flat token ids (B, n*n) -> the tokenizer's own output (diffusion: DDIM from each sample's seeded noise)."""
    grid = model.unflatten(ids)
    if not model.cfg.diffusion:
        return model.decode_tokens(grid)
    size = grid.shape[-1] * model.cfg.patch_size
    noise = torch.stack([torch.randn((model.cfg.n_channels, size, size), generator=torch.Generator().manual_seed(
        int(seed))) for seed in seeds])
    return model.decode_tokens(grid, steps=DECODE_STEPS, scheduler="ddim", noise=noise)


def load_folder(path: str | Path, modality: str, device: str | torch.device = "cpu") -> DatasetTokenizer:
    """A tokenizer folder (trained here, or converted) for a modality (or a 4M domain of it)."""
    return DatasetTokenizer(registry.domain_or_modality(modality), load_tokenizer(path, device))


def load(root: str | Path, modality: str, device: str | torch.device = "cpu") -> DatasetTokenizer:
    """A dataset's tokenizer of a modality, in evaluation mode."""
    return load_folder(local_copy(folder(root, modality), MODEL_FILES), modality, device)


def picture(modality: str, x: torch.Tensor) -> np.ndarray:
    """A tokenizer input or a decoded map (C, H, W) -> an RGB picture in [0, 1]."""
    return registry.domain_or_modality(modality).tensor_picture(x)


def convert_published(source: str | Path, modality: str, out: str | Path) -> dict:
    """`convert-tokenizer`: a published tokenizer (folder, .safetensors with its settings, or hub id), checked
    against the modality it will serve, written as that modality's tokenizer folder: config.json and
    model.safetensors in the reference's layout, then train.json (the commit marker: training skips it)."""
    spec = registry.get(modality)
    if spec.tokenizer is None:
        raise ValueError(f"modality {modality!r} has no image tokenizer (tokenized: "
                         f"{', '.join(m.name for m in registry.loaded().tokenized())})")
    config, tensors = read_published(source)
    model = VQVAE(config)
    problems = state_dict_problems(model, tensors) + spec.reference_tokenizer_problems(config)
    if problems:
        raise ValueError(f"{source}: cannot serve as the {modality} tokenizer:\n  " + "\n  ".join(problems))
    model.load_state_dict(tensors)
    out = data_path(out)
    if out.is_dir() and any(out.iterdir()):  # a tokenizer, or a training run's checkpoint: never overwritten
        raise FileExistsError(f"{out} already holds a tokenizer (or a training run): remove it to replace it")
    if not is_remote(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(out)
    staging.mkdir(parents=True)
    save_tokenizer(model, staging)
    summary = {"modality": modality, "converted_from": str(source), "weights_sha256": weights_sha256(model),
               "codebook_size": config.codebook_size, "decoder": config.dec_type, "final": {}}
    write_json(staging / "train.json", summary)
    if not is_remote(out) and out.exists():
        out.rmdir()  # empty (checked above)
    publish(staging, out, last="train.json")  # on object storage file by file, the commit record last
    return summary
