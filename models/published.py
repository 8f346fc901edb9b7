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


def read_settings_file(path: Path, error: type[Exception]) -> dict:
    """A checkpoint's config.json, or an error naming the file and what is wrong with it."""
    try:
        settings = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (a config.json of settings is expected)") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); the file may be "
                    f"cut short: fetch or convert it again") from None
    if not isinstance(settings, dict):
        raise error(f"{path}: holds a JSON {type(settings).__name__}, not an object of settings")
    return settings


def read_tensors(path: Path, error: type[Exception]) -> dict:
    """A .safetensors file's tensors, or an error naming the file and what is wrong with it."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error, OSError or others for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"{path}: not a readable safetensors file ({reason}); the file may be cut short or "
                    f"corrupt: fetch or convert it again") from None


def read_checkpoint(source: str | Path, required: str, error: type[Exception]) -> tuple[dict, dict, str]:
    """(settings, tensors, where the settings came from); `required` names a setting every such checkpoint has."""
    import yaml
    from safetensors import safe_open

    path = local_path(source, error)
    if path.is_dir():
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise error(f"{path}: expected config.json and model.safetensors (the reference's layout)")
        settings = read_settings_file(path / "config.json", error)
        return settings, read_tensors(path / "model.safetensors", error), str(path / "config.json")
    if path.suffix != ".safetensors":
        raise error(f"{path}: not a checkpoint folder or a .safetensors file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - as read_tensors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"{path}: not a readable safetensors file ({reason})") from None
    if required not in metadata:
        raise error(f"{path}: no settings in the safetensors metadata ({required} missing)")
    settings = {k: yaml.safe_load(v.replace("None", "null")) for k, v in metadata.items()}
    return settings, read_tensors(path, error), f"{path} (metadata)"
