"""Where a dataset lives: a local folder, or an object-storage URL (s3://bucket/prefix, gs://..., any fsspec URL).

A data root becomes one path object here, once: a `pathlib.Path` for a local folder (or a file:// URL), a
`upath.UPath` over fsspec for anything else. Both answer the same calls (`/`, `open`, `is_file`, `glob`,
`read_text`), and a UPath carries its storage options when pickled, so a Ray worker on another machine opens
the same store with nothing but its arguments. Credentials and endpoints come from each store's own chain (for
S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles), plus the profile's
`storage_options`.

Object storage has no rename, so a file is published there as one complete object: written in local scratch
space first and uploaded whole (a multipart upload stays invisible until it completes), see `core.files`.
"""
from __future__ import annotations

import io
import logging
import os
import pathlib
import queue
import shutil
import tarfile
import tempfile
import threading
import uuid
from typing import Any, Union

from upath import UPath

DataPath = Union[pathlib.Path, UPath]

# botocore says at INFO where it found the credentials and the endpoint, on every new client: not for the console
for _name in ("botocore", "aiobotocore", "s3fs"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# Listings are read afresh: a shard committed by a worker in another process must be seen by the driver that
# listed the folder before it (s3fs would otherwise answer from the listing it cached then).
_FRESH_LISTINGS = {"s3": {"use_listings_cache": False}, "gs": {"use_listings_cache": False},
                   "gcs": {"use_listings_cache": False}}


class StorageError(ValueError):
    """A data root that cannot be used: unsupported scheme, missing bucket, refused credentials, no answer (the
    command line's exit status 2, as for any bad input)."""


def scheme_of(root: str | os.PathLike) -> str:
    """'s3' for s3://bucket/x, '' for a local path (a Path object is always local)."""
    if isinstance(root, pathlib.PurePath) and not _is_upath(root):
        return ""
    text = str(root)
    scheme, sep, _ = text.partition("://")
    return scheme.lower() if sep and scheme.isidentifier() else ""


def _is_upath(path) -> bool:
    """A path over fsspec that is not the local filesystem's (UPath gives local paths a pathlib.Path subclass)."""
    return isinstance(path, UPath) and not isinstance(path, pathlib.Path)


def is_remote(path) -> bool:
    """True for a path on object storage (anything but the local filesystem): written by upload, not rename."""
    return _is_upath(path)


def data_path(root: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> DataPath:
    """The data root as a path object: local paths (and file:// URLs) as `Path`, other URLs as `UPath`.

    An unknown scheme, or one whose fsspec implementation is not installed, is a StorageError naming the root.
    """
    if _is_upath(root) or (isinstance(root, pathlib.Path) and not storage_options):
        return root
    scheme = scheme_of(root)
    if not scheme:
        return pathlib.Path(root)
    text = str(root)
    if scheme in ("file", "local"):
        return pathlib.Path(text.split("://", 1)[1])
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise StorageError(f"data root {text!r}: unsupported scheme {scheme}:// (a data root is a local path, "
                           f"file://, s3://, gs:// with the project's [gcs] extra, or the URL of another fsspec "
                           f"filesystem whose package is installed)") from None
    except ImportError as err:
        raise StorageError(f"data root {text!r}: the {scheme}:// scheme needs a package that is not installed "
                           f"({err}); for gs:// install the project's [gcs] extra") from None
    options = {**_FRESH_LISTINGS.get(scheme, {}), **(storage_options or {})}
    return UPath(text.rstrip("/"), **options)


def check_data_root(root: DataPath, *, writable: bool) -> None:
    """Before any work: the store answers, accepts the credentials and holds the bucket. Raises StorageError.

    Local roots need nothing here (a folder is made on first write). On object storage the bucket is listed;
    `writable` also writes and removes one small object under the root, so refused write rights fail now rather
    than after a shard's work.
    """
    if not is_remote(root):
        return
    fs, where = _checking_fs(root), root.path
    bucket = where.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
        if writable:
            probe = f"{where}/_status/.write-check-{uuid.uuid4().hex[:12]}"
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
    except FileNotFoundError:
        raise StorageError(f"data root {root}: no bucket {bucket!r} at {_endpoint(root)}") from None
    except PermissionError as err:
        raise StorageError(f"data root {root}: the credentials were refused at {_endpoint(root)} ({_first(err)}); "
                           f"set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or the profile's "
                           f"storage_options") from None
    except Exception as err:  # noqa: BLE001 - connection errors come in many types (botocore, aiohttp, OSError)
        raise StorageError(f"data root {root}: the store at {_endpoint(root)} did not answer "
                           f"({type(err).__name__}: {_first(err)})") from None


def _checking_fs(root: DataPath):
    """The filesystem the check goes through: on S3 one that gives up on an endpoint after two tries of 5 seconds
    (botocore's and s3fs's own retries took about 9 s to say an endpoint does not answer); elsewhere the root's."""
    if root.protocol not in ("s3", "s3a"):
        return root.fs
    import fsspec

    options = dict(root.storage_options)
    config = {**options.pop("config_kwargs", {}), "connect_timeout": 5, "retries": {"max_attempts": 2}}
    fs = fsspec.filesystem("s3", **options, config_kwargs=config, skip_instance_cache=True)
    fs.retries = 2
    return fs


def _endpoint(root) -> str:
    options = getattr(root, "storage_options", {}) or {}
    endpoint = (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    return endpoint or f"the default {root.protocol}:// endpoint"


def _first(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def open_data_root(root: str | os.PathLike, storage_options: dict[str, Any] | None = None, *,
                   writable: bool) -> DataPath:
    """`data_path` and `check_data_root` together: what a command does with the root it was given."""
    path = data_path(root, storage_options)
    check_data_root(path, writable=writable)
    return path


# -- reading, the same calls for both kinds of root ----------------------------------------------------------------
READ_BLOCK = 8 << 20  # object storage is read in ranged requests of this size, one ahead of the reader


def open_read(path: DataPath, buffering: int = 1 << 20):
    """A file open for reading in binary, streamed: a local file with a buffer; an object read ahead in a thread,
    READ_BLOCK at a time (see `_ReadAhead`), under a C buffer that makes the many small reads of a tar's headers and
    members as cheap as a local file's."""
    if is_remote(path):
        return io.BufferedReader(_ReadAhead(path.fs, path.path), buffering)
    return open(path, "rb", buffering=buffering)


class _ReadAhead(io.RawIOBase):
    """An object read front to back by a thread, one block ahead of the reader: its download starts when it is
    opened (a shard's folders, opened side by side, download side by side) and goes on while the reader computes.
    At most three blocks are held (the one read, the one queued, the one arriving). Seeks go forward only, as a
    shard is read; a seek back inside the block being read is allowed."""

    def __init__(self, fs, path: str):
        self.name = f"{fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol}://{path}"
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._chunk, self._at, self._start, self._ended = b"", 0, 0, False
        self._stop = threading.Event()
        threading.Thread(target=self._fill, args=(fs, path), daemon=True).start()

    def _fill(self, fs, path: str) -> None:
        try:
            with fs.open(path, "rb", block_size=READ_BLOCK, cache_type="none") as f:
                while not self._stop.is_set():
                    data = f.read(READ_BLOCK)
                    self._put(data)
                    if not data:
                        return
        except BaseException as err:  # noqa: BLE001 - handed to the reader, which raises it
            self._put(err)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _advance(self) -> bool:
        """The next block; False at the end of the object."""
        if self._ended:
            return False
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._start += len(self._chunk)
        self._chunk, self._at = item, 0
        self._ended = not item
        return not self._ended

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at >= len(self._chunk):
            if not self._advance():
                return 0
        n = min(len(buffer), len(self._chunk) - self._at)
        buffer[:n] = memoryview(self._chunk)[self._at:self._at + n]  # one copy, not two
        self._at += n
        return n

    def tell(self) -> int:
        return self._start + self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise io.UnsupportedOperation(f"{self.name}: read in order; no seek from the end")
        target = offset if whence == io.SEEK_SET else self.tell() + offset
        if target < self._start:
            raise io.UnsupportedOperation(f"{self.name}: read in order; no seek back to byte {target}")
        while target > self._start + len(self._chunk) and self._advance():
            pass
        self._at = min(target - self._start, len(self._chunk))
        return self.tell()

    def close(self) -> None:
        self._stop.set()
        super().close()


class _StreamTar(tarfile.TarFile):
    """A tar read from a stream we opened: closing the tar closes the stream too."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.fileobj.close()


def open_tar(path: DataPath) -> tarfile.TarFile:
    """A shard's tar for reading, streamed from either kind of root (an uncompressed tar, as every shard is)."""
    if not is_remote(path):
        return tarfile.open(path)
    return _StreamTar(fileobj=open_read(path), mode="r")


def open_random(path: DataPath):
    """A file open for reading anywhere in it (a parquet file's footer first): on object storage, fsspec's file,
    which fetches the ranges asked for."""
    return path.open("rb") if is_remote(path) else open(path, "rb")


def read_parquet(path: DataPath, columns: list[str] | None = None, filters: list | None = None):
    """A parquet table, or its rows that pass `filters` (pyarrow's [(column, op, value)]: row groups pruned)."""
    import pyarrow.parquet as pq

    if not is_remote(path):
        return pq.read_table(path, columns=columns, filters=filters)
    with open_random(path) as f:
        return pq.read_table(f, columns=columns, filters=filters)


MODEL_FILES = ("config.json", "model.safetensors")  # what loading a saved model reads from its folder


def read_parquet_schema(path: DataPath) -> list[str]:
    """A parquet file's column names (its footer alone)."""
    import pyarrow.parquet as pq

    if not is_remote(path):
        return pq.read_schema(path).names
    with open_random(path) as f:
        return pq.read_schema(f).names


def local_copy(path: DataPath, only: tuple[str, ...] | None = None) -> pathlib.Path:
    """A folder (a tokenizer, a model) as a local folder: itself on a disk; on object storage, downloaded into a
    cache under the scratch root, kept by the objects' names, sizes and times (a changed folder is fetched anew).
    `only`: the top-level names to fetch (a model's files, not its run's checkpoints)."""
    if not is_remote(path):
        return pathlib.Path(path)
    import hashlib

    path = data_path(path)
    base = path.path.rstrip("/")
    listing = sorted((info["name"], info.get("size"), str(info.get("LastModified") or info.get("mtime") or ""))
                     for info in path.fs.find(base, detail=True).values()
                     if only is None or info["name"][len(base):].strip("/").split("/", 1)[0] in only)
    if not listing:
        raise FileNotFoundError(f"{path}: no such folder")
    digest = hashlib.sha256(repr(listing).encode()).hexdigest()[:16]
    cached = scratch_root() / "cache" / digest
    if (cached / ".complete").is_file():
        os.utime(cached)  # recently used: kept by the pruning below
    else:
        staging = cached.with_name(f"{digest}.tmp-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        for name, _, _ in listing:
            target = staging / pathlib.PurePosixPath(name).relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.fs.get_file(name, str(target))
        (staging / ".complete").write_text("")
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(staging, cached)
        _prune_cache(cached.parent)
    return cached


CACHE_ENTRIES = 8  # model and tokenizer folders kept in the cache, the most recently used


def _prune_cache(cache: pathlib.Path) -> None:
    entries = sorted((p for p in cache.iterdir() if p.is_dir() and "." not in p.name),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[CACHE_ENTRIES:]:
        shutil.rmtree(old, ignore_errors=True)


def modified_ns(path: DataPath) -> int:
    """A file's modification time in nanoseconds (on object storage: the object's, to the second on S3)."""
    if not is_remote(path):
        return path.stat().st_mtime_ns
    info = path.fs.info(path.path)
    stamp = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if hasattr(stamp, "timestamp"):
        return int(stamp.timestamp() * 1e9)
    from datetime import datetime

    return int(datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp() * 1e9)


def remove_tree(path: DataPath) -> None:
    """Remove a folder and everything under it, where it lives (nothing there: nothing to do)."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.fs.exists(path.path):
        path.fs.rm(path.path, recursive=True)


def absolute(path: DataPath) -> DataPath:
    """The root as a worker elsewhere needs it: a local one resolved (workers do not share our working
    folder), a remote one as it is."""
    return path if is_remote(path) else path.resolve()


# The driver's credential chain, as environment variables, handed on to the Ray job's workers: a worker started
# by a cluster that was up before the driver set them (or on another machine) reads the same store as the driver.
# Instance roles and ~/.aws on each machine need nothing handed on.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                  "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "GOOGLE_APPLICATION_CREDENTIALS",
                  "FOURM_SCRATCH")


def storage_env() -> dict[str, str]:
    return {name: os.environ[name] for name in CREDENTIAL_ENV if os.environ.get(name)}


# -- local scratch space for files bound for object storage --------------------------------------------------
SCRATCH_ENV = "FOURM_SCRATCH"


def scratch_root() -> pathlib.Path:
    """Where files bound for object storage are written before their upload: $FOURM_SCRATCH, or the system's
    temporary folder. Each process uses a folder of its own under it, named by its process id."""
    return pathlib.Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()) / "fourm-scratch"


_own_scratch: pathlib.Path | None = None


def scratch_dir() -> pathlib.Path:
    """This process's scratch folder. Made on first use, after removing the folders of processes that are gone
    (a worker killed mid-upload leaves its shard's files there)."""
    global _own_scratch
    if _own_scratch is None or _own_scratch.name != str(os.getpid()) or not _own_scratch.is_dir():
        base = scratch_root()
        base.mkdir(parents=True, exist_ok=True)
        clean_scratch(base)
        _own_scratch = base / str(os.getpid())
        _own_scratch.mkdir(exist_ok=True)
    return _own_scratch


def clean_scratch(base: pathlib.Path) -> list[pathlib.Path]:
    """Remove the scratch folders of processes no longer running; returns what was removed."""
    removed = []
    for folder in base.iterdir():
        if folder.is_dir() and folder.name.isdigit() and not _alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
