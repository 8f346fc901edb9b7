"""Files written whole or not at all: under a temporary name beside the target, then renamed into place.

A reader never sees half a file, and a writer killed at any point leaves only a hidden temporary. The file
that lands keeps the permissions the user's umask gives a new file (some writers, safetensors among them,
create theirs private to the owner), so a colleague on a shared filesystem can read a run's weights.

On object storage (a `UPath` target, see core.storage) there is no rename: the temporary is written in this
process's local scratch folder and uploaded as one object (a large one as a multipart upload, which the store
shows only once it completes), then removed. The object gets the bucket's default ACL: nothing is made public.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.storage import data_path, is_remote, scratch_dir


def temporary_name(path) -> Path:
    # Unique per writer: a stale writer from a killed run can never rename over a newer one's file.
    if is_remote(path):  # the whole key in the name: rgb/ and caption/ both have a shard-000000.tar
        return scratch_dir() / f".{path.path.replace('/', '~')}.tmp-{uuid.uuid4().hex[:12]}"
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def umask_mode(directory: bool = False) -> int:
    """The mode the user's umask gives a new file (or folder)."""
    current = os.umask(0)
    os.umask(current)
    return (0o777 if directory else 0o666) & ~current


def publish(tmp: Path, path, last: str | None = None) -> Path:
    """Rename a finished temporary file (or folder) into place, with the umask's permissions; on object
    storage, upload it (a folder file by file, the file named `last`, a folder's commit record, after the others)
    and remove the temporary."""
    if is_remote(path):
        return _upload(Path(tmp), path, last)
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir():
        os.chmod(tmp, umask_mode(directory=True))
        for child in tmp.rglob("*"):
            os.chmod(child, umask_mode(directory=child.is_dir()))
    else:
        os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
    return path


def swap_folder(tmp: Path, folder: Path) -> Path:
    """Replace the local folder `folder` by the finished folder `tmp`: the old one moved aside, the new one renamed
    in, the old one removed (a reader sees the old folder or the new one, never half of either)."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    publish(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _upload(tmp: Path, path, last: str | None):
    if tmp.is_dir():
        for child in sorted(tmp.rglob("*"), key=lambda p: (p.name == last, str(p))):
            if child.is_file():
                path.fs.put_file(str(child), f"{path.path}/{child.relative_to(tmp).as_posix()}")
        shutil.rmtree(tmp)
    else:
        path.fs.put_file(str(tmp), path.path)
        tmp.unlink()
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write `path` through; renamed into place when the block ends without an error.

    `suffix` keeps an extension that a writer reads to choose its format (matplotlib: `.png`).
    """
    path = data_path(path)
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp = tmp.with_name(tmp.name + suffix)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if tmp.is_file():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return data_path(path)


def write_json(path: str | os.PathLike, data, indent: int | None = 1) -> Path:
    return write_bytes(path, json.dumps(data, indent=indent).encode())


def npy_bytes(array) -> bytes:
    """An array as the bytes of a .npy file (a shard member or a file)."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return data_path(path)


def save_model_safetensors(model, path: str | os.PathLike) -> Path:
    """A module's weights (tied ones once, as safetensors' save_model keeps them)."""
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, str(tmp))
    return data_path(path)
