"""Which weights a model has: a hash of its tensors, and a marker on folders saved with random weights."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

RANDOM_WEIGHTS_MARKER = "random_weights.json"  # written next to a model saved with random weights


def weights_sha256(module) -> str:
    """sha256 over a torch module's state: every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_random_weights(source: str | Path) -> bool:
    return (Path(source) / RANDOM_WEIGHTS_MARKER).is_file()


def mark_random_weights(folder: str | Path, **details) -> None:
    (Path(folder) / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(
        {"random_weights": True, **details, "note": "random weights: for demos and tests; its outputs mean nothing"}))


def model_record(source: str, module) -> dict[str, Any]:
    return {"source": str(source), "weights_sha256": weights_sha256(module), "random_weights": has_random_weights(source)}
