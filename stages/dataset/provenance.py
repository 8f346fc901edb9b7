"""What made a shard: the project's version, the configuration its stage ran with, and the models it used.

Every stage writes `provenance(...)` into each shard's stats JSON:

    {"version": "0.1.0+git.3f2a9c1",                  the project's version (and commit, in a git checkout)
     "config": {...},                                  the stage's configuration section, as used
     "models": {"depth": {"source": "models/omnidata/depth",        hub id or folder it was loaded from
                          "weights_sha256": "9c1e...",              sha256 of its weights (below)
                          "random_weights": false}}}               true: a demo model, labels mean nothing

A labeler's `weights_sha256` hashes its tensors (each name, dtype, shape and bytes, in name order), so it is the
same whichever file format or hub revision delivered them; a tokenizer's is the sha256 of its
`model.safetensors` (both made by `models/weights.py`). `python -m pipeline status` and `verify` read these
back.
"""
from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def project_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        base = version("fourm-data-engine")
    except PackageNotFoundError:
        base = "unknown"
    checkout = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{base}+git.{commit}" if commit else base


def provenance(config_section, models: dict[str, dict] | None = None) -> dict[str, Any]:
    config = config_section.model_dump(mode="json") if hasattr(config_section, "model_dump") else dict(config_section)
    return {"version": project_version(), "config": config, "models": models or {}}


RANDOM_MARK = "RANDOM WEIGHTS"


def describe_model(record: dict) -> str:
    """One line for tables: source, short hash, and a warning for random weights."""
    digest = record.get("weights_sha256")  # none for labels without weights (computed, or imported)
    text = f"{record.get('source')}" + (f" (sha256 {str(digest)[:12]})" if digest else "")
    return f"{text} {RANDOM_MARK}" if record.get("random_weights") else text
