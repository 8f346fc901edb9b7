"""What every training run in the project shares: the device, the learning-rate schedule, parameter groups,
checkpoints written aside and swapped in whole, and exact resume.

The tokenizers (`stages/train_tokenizer.py`) and 4M (`stages/pretrain.py`) train on Ray Train with these; a
checkpoint folder holds `model.safetensors`, `optimizer.safetensors` and `state.json` (step and whatever the run
adds), and a run restored from it takes exactly the steps an uninterrupted run would.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch


def device_for(name: str) -> torch.device:
    """auto: cuda when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def warmup_cosine(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at `total` (per step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on everything but norms and biases (the reference's groups: embeddings, modality embeddings
    and the mask token are decayed)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 and ("norm" in name or name.endswith(".bias")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                state[k] = v.to(device)


def save_checkpoint(folder: Path, model, optimizer, step: int, extra: dict) -> None:
    """Model and optimizer as safetensors, then state.json; written aside and swapped in whole."""
    from safetensors.torch import save_file, save_model

    tmp, final = folder.with_name(folder.name + ".tmp"), folder
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # tied weights (4M's heads) stored once
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "slots": {}}
    for pid, slots in state["state"].items():
        meta["slots"][str(pid)] = {}
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.contiguous()
            else:
                meta["slots"][str(pid)][name] = value
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": meta, **extra}, indent=1))
    old = folder.with_name(folder.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Restore model and optimizer; returns state.json ({"step": 0} without a checkpoint)."""
    from safetensors.torch import load_file, load_model

    if not (folder / "state.json").is_file():
        return {"step": 0}
    state = json.loads((folder / "state.json").read_text())
    load_model(model, str(folder / "model.safetensors"))
    tensors, meta = load_file(folder / "optimizer.safetensors"), state["optimizer"]
    slots = {int(pid): dict(values) for pid, values in meta["slots"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        slots.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    return state
