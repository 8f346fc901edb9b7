"""Reading apple/ml-4m's published checkpoints (4M models and tokenizers): where they are and what they hold.

A published checkpoint is a folder with `config.json` + `model.safetensors` (what its Hugging Face classes save and
`from_pretrained` reads), one `.safetensors` whose metadata holds the settings (each value as JSON or YAML text, the
reference's `load_safetensors` route), or a hub id such as EPFL-VILAB/4M-7_B_CC12M, fetched where a network is.
"""
from __future__ import annotations

import json
from pathlib import Path


def local_path(source: str | Path, error: type[Exception]) -> Path:
    """The checkpoint on disk: the path itself, or a hub id's snapshot (config.json and safetensors only)."""
    path = Path(source)
    if path.exists():
        return path
    if str(source).count("/") != 1 or str(source).startswith((".", "/")):
        raise error(f"checkpoint {str(source)!r}: no such file or folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=["config.json", "*.safetensors"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown repository: say which and why
        raise error(f"checkpoint {str(source)!r}: not a local path, and the hub could not provide it "
                    f"({type(err).__name__}: {err})") from None


def read_checkpoint(source: str | Path, required: str, error: type[Exception]) -> tuple[dict, dict, str]:
    """(settings, tensors, where the settings came from); `required` names a setting every such checkpoint has."""
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = local_path(source, error)
    if path.is_dir():
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise error(f"{path}: expected config.json and model.safetensors (the reference's layout)")
        settings = json.loads((path / "config.json").read_text())
        return settings, load_file(path / "model.safetensors"), str(path / "config.json")
    if path.suffix != ".safetensors":
        raise error(f"{path}: not a checkpoint folder or a .safetensors file")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if required not in metadata:
        raise error(f"{path}: no settings in the safetensors metadata ({required} missing)")
    settings = {k: yaml.safe_load(v.replace("None", "null")) for k, v in metadata.items()}
    return settings, load_file(path), f"{path} (metadata)"
