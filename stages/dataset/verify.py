"""`python -m pipeline verify`: is the dataset whole, aligned and consistent, shard by shard?

Checks every folder a 4M loader reads against rgb/: the same shard names; exactly rgb's keys in rgb's order,
none missing, unknown or repeated (a loader that zips the folders position by position must never diverge);
every member decodes; token ids are int16 (n_crops, 196) within their tokenizer's vocabulary; crop settings are
(n_crops, 5), with as many crops as the token files of the sample (and as the stored 224 crops of the photo,
each a decodable 224x224 JPEG). Across shards: every shard of a folder was
made by the same weights (the stats' provenance).
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import registry
from core.storage import open_tar
from stages.dataset.align import recorded_failures
from stages.dataset.shards import CROP_PIXELS, CROPS, DatasetLayout, producing_stage


@dataclass(frozen=True)
class Problem:
    shard: str
    folder: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard} {self.folder}: {self.message}"


def _vocabulary(layout: DatasetLayout, folder: str) -> int | None:
    config = layout.tokenizer_dir(registry.of_folder(folder)[0].name) / "config.json"
    return json.loads(config.read_text())["codebook_size"] if config.is_file() else None


def _own_extension(folder: str) -> str | None:
    try:
        return registry.of_folder(folder)[0].extension
    except registry.RegistryError:
        return None


def _check_member(folder: str, name: str, data: bytes, vocabulary: int | None) -> tuple[str | None, object]:
    """(problem or None, decoded value worth keeping for cross-checks)."""
    import cv2

    ext = name.rsplit(".", 1)[-1]
    try:
        if ext in ("jpg", "png"):
            if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None:
                return f"{name} does not decode", None
        elif ext == "json":
            json.loads(data)
        elif ext == "txt":
            data.decode("utf-8")
        elif ext == "npy":
            array = np.load(io.BytesIO(data))
            if registry.is_token_folder(folder):
                tokens = registry.of_folder(folder)[1].max_tokens  # its grid: 196 for 16-pixel patches of 224
                if array.dtype != np.int16 or array.ndim != 2 or array.shape[1] != tokens:
                    return f"{name}: {array.dtype} {array.shape}, expected int16 (n_crops, {tokens})", None
                if array.min() < 0 or (vocabulary is not None and array.max() >= vocabulary):
                    return f"{name}: token ids {array.min()}..{array.max()} outside 0..{vocabulary - 1}", None
            if folder == CROPS and (array.ndim != 2 or array.shape[1] != 5):
                return f"{name}: shape {array.shape}, expected (n_crops, 5)", None
            return None, array
        elif folder == CROP_PIXELS and ext == "npz":  # the photo's crops at 224, a JPEG each
            with np.load(io.BytesIO(data)) as crops:
                shapes = [getattr(cv2.imdecode(crops[name], cv2.IMREAD_COLOR), "shape", None) for name in crops.files]
            if any(shape != (224, 224, 3) for shape in shapes):
                return f"{name}: crops decode to {shapes}, expected 224x224 colour images", None
            return None, np.arange(len(shapes))  # its crop count, checked against the other folders'
        elif _own_extension(folder) == ext:  # another format (T5's .npz): the modality's own reader checks it
            registry.of_folder(folder)[0].decode(data)
        else:
            return f"{name}: unexpected member type .{ext}", None
    except Exception as err:  # noqa: BLE001 - whatever fails to decode is the finding
        return f"{name} does not decode ({type(err).__name__}: {err})", None
    return None, None


def verify_dataset(root: str | Path) -> tuple[list[Problem], dict]:
    """All problems found, and counts of what was checked."""
    import cv2  # noqa: F401 - fail early if the decoder is missing

    layout = DatasetLayout(root)
    layout.modality_set()  # its folders' modalities named (imported) before they are recognised
    problems: list[Problem] = []
    photo = registry.photo().folder
    rgb_shards = sorted(p.stem for p in layout.folder(photo).glob("shard-*.tar"))
    if not rgb_shards:
        return [Problem("-", photo, f"no shards under {layout.folder(photo)}")], {}
    folders = layout.loader_folders()
    checked = {"shards": len(rgb_shards), "folders": len(folders), "members": 0}
    for shard in rgb_shards:
        rgb_keys = _keys(layout.tar(photo, shard))
        position = {k: i for i, k in enumerate(rgb_keys)}
        crops_per_key: dict[str, int] = {}
        for folder in folders:
            path = layout.tar(folder, shard)
            if not path.is_file():
                problems.append(Problem(shard, folder, "shard missing"))
                continue
            vocabulary = _vocabulary(layout, folder) if registry.is_token_folder(folder) else None
            seen, last = set(), -1
            try:
                with open_tar(path) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key = member.name.split(".", 1)[0]
                        checked["members"] += 1
                        if key not in position:
                            problems.append(Problem(shard, folder, f"key {key} is not in rgb/{shard}.tar"))
                            continue
                        if key in seen:
                            problems.append(Problem(shard, folder, f"key {key} appears twice"))
                        elif position[key] < last:
                            problems.append(Problem(shard, folder, f"key {key} is out of rgb's order"))
                        seen.add(key)
                        last = max(last, position[key])
                        problem, value = _check_member(folder, member.name, tar.extractfile(member).read(),
                                                       vocabulary)
                        if problem:
                            problems.append(Problem(shard, folder, problem))
                        elif isinstance(value, np.ndarray) and (registry.is_token_folder(folder)
                                                                or folder in (CROPS, CROP_PIXELS)):
                            if crops_per_key.setdefault(key, len(value)) != len(value):
                                problems.append(Problem(shard, folder, f"{member.name}: {len(value)} crops, other "
                                                                       f"folders have {crops_per_key[key]}"))
            except (tarfile.TarError, OSError) as err:
                problems.append(Problem(shard, folder, f"unreadable tar ({err})"))
                continue
            absent = [k for k in rgb_keys if k not in seen]
            if absent:
                recorded = set(recorded_failures(layout, producing_stage(folder), shard))
                why = (f"failures recorded in _status/{producing_stage(folder)}" if set(absent) <= recorded
                       else f"no failure recorded in _status/{producing_stage(folder)} for some")
                problems.append(Problem(shard, folder, f"not aligned with rgb: {len(absent)} keys missing "
                                                       f"{absent[:5]} ({why}); a position-by-position loader "
                                                       f"diverges here. `python -m pipeline align` drops such "
                                                       f"samples from every folder"))
    problems += _mixed_weights(layout, folders)
    for folder in folders:
        extra = sorted(p.stem for p in layout.folder(folder).glob("shard-*.tar") if p.stem not in set(rgb_shards))
        for shard in extra:
            problems.append(Problem(shard, folder, "shard has no rgb counterpart"))
    return problems, checked


def _keys(path: Path) -> list[str]:
    with open_tar(path) as tar:
        return [m.name.split(".", 1)[0] for m in tar if m.isfile()]


def weights_by_shard(layout: DatasetLayout, folder: str) -> dict[str, list[str]]:
    """Per folder: weights hash -> the shards its stats say that model made (shards without provenance: 'unknown')."""
    stage, made = producing_stage(folder), {}
    for shard in layout.committed_shards(stage):
        models = layout.read_stats(stage, shard).get("provenance", {}).get("models", {})
        for record in models.values() or [{}]:
            made.setdefault(record.get("weights_sha256", "unknown"), []).append(shard)
    return made


def _mixed_weights(layout: DatasetLayout, folders: list[str]) -> list[Problem]:
    problems = []
    for folder in folders:
        made = weights_by_shard(layout, folder)
        if len(made) > 1:
            parts = [f"{digest[:12]} ({len(shards)} shards: {', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''})"
                     for digest, shards in sorted(made.items(), key=lambda item: -len(item[1]))]
            problems.append(Problem("-", folder, f"shards made by different weights: {'; '.join(parts)}"))
    return problems
