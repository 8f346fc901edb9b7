"""A training run's folder (a tokenizer's, 4M's, a fine-tune's) where its data root is: on a disk, or on object
storage.

The training loop, the tasks and the stages read and write a run's files as local files: checkpoints are swapped
in by rename, metrics.jsonl is appended to, TensorBoard writes its events. On object storage each machine works in
a local copy of the run folder (under the scratch root, named by the run's URL) and the copy is kept in step with
the store:

    pull_checkpoint  before training: the store's last complete checkpoint, into the local copy (a resume on any
                     node: the store is the only place a checkpoint has to survive)
    push_checkpoint  after each checkpoint: its files under checkpoint-<step>/, then checkpoint.json (the step)
                     last, then the older checkpoint-*/ removed; with metrics.jsonl and the TensorBoard events
    pull / push      the driver's copy of the whole folder, before it reads the run's results and after it
                     writes its own (train.json, written last, is the run's commit record)

A kill at any moment leaves the store with a complete checkpoint or the one before it: checkpoint.json names a
step whose files were all uploaded before it was written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from core.files import write_json
from core.storage import DataPath, data_path, is_remote, scratch_root

POINTER = "checkpoint.json"
CHECKPOINT = "checkpoint"
SUMMARY = "train.json"  # a finished run's commit record: pushed only when named, after everything else
NOT_PUSHED = {SUMMARY}
OWN_FOLDERS = ("tensorboard",)  # a run's own subfolders that travel with its files; the checkpoint goes its own
                                # way, Ray Train's state and W&B's have theirs, and others are other runs' (the
                                # transfers and the evaluation under a pretraining run's folder)


class RunFolder:
    """One run's folder: `target` (where it lives) and `local` (where this machine reads and writes it)."""

    def __init__(self, target: str | DataPath):
        target = data_path(target)
        self.remote = is_remote(target)
        self.target = target if self.remote else target.resolve()  # workers do not share our working folder

    @property
    def local(self) -> Path:
        """Where this machine reads and writes the run: the folder itself on a disk; for a folder on object
        storage, a copy under this machine's scratch root named by the folder's URL."""
        if not self.remote:
            return Path(self.target)
        digest = hashlib.sha256(str(self.target).encode()).hexdigest()[:16]
        return scratch_root() / "runs" / f"{self.target.name}-{digest}"

    # -- the checkpoint ---------------------------------------------------------------------------------------
    def pull_checkpoint(self) -> int | None:
        """The store's last complete checkpoint into the local copy's checkpoint/; its step (None: none)."""
        if not self.remote:
            return None
        pointer, local = self.target / POINTER, self.local / CHECKPOINT
        if not pointer.is_file():  # the store is the truth: a local copy's checkpoint of an earlier run is stale
            shutil.rmtree(local, ignore_errors=True)
            return None
        step = int(json.loads(pointer.read_text())["step"])
        if _step_of(local) == step:
            return step
        staging = self.local / f".{CHECKPOINT}.pull"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        source = self.target / f"{CHECKPOINT}-{step:09d}"
        for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
            self.target.fs.get_file((source / name).path, str(staging / name))
        shutil.rmtree(local, ignore_errors=True)
        staging.rename(local)
        return step

    def push_checkpoint(self, step: int) -> None:
        """The local checkpoint (just written) to the store, the pointer last, the older ones removed; and the
        run's other files so far (metrics, TensorBoard events, pictures), so the store shows its progress."""
        if not self.remote:
            return
        fs, base = self.target.fs, self.target.path
        folder = f"{base}/{CHECKPOINT}-{step:09d}"
        for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
            fs.put_file(str(self.local / CHECKPOINT / name), f"{folder}/{name}")
        write_json(self.target / POINTER, {"step": step, "folder": f"{CHECKPOINT}-{step:09d}"})
        for old in fs.glob(f"{base}/{CHECKPOINT}-*"):
            if old.rstrip("/") != folder:
                fs.rm(old, recursive=True)
        self.push()

    def checkpoint_state(self) -> dict | None:
        """The state.json of the run's last complete checkpoint where it lives (None: none yet)."""
        if self.remote:
            pointer = self.target / POINTER
            if not pointer.is_file():
                return None
            folder = json.loads(pointer.read_text())["folder"]
            return json.loads((self.target / folder / "state.json").read_text())
        state = self.local / CHECKPOINT / "state.json"
        return json.loads(state.read_text()) if state.is_file() else None

    def checkpoint_step(self) -> int | None:
        state = self.checkpoint_state()
        return None if state is None else int(state["step"])

    # -- the whole folder -------------------------------------------------------------------------------------
    def pull(self) -> Path:
        """The store's files of the run (but for its checkpoints) into the local copy, in place of what the copy
        held (the store is the truth: a copy may hold an earlier run's files); returns the local copy."""
        if self.remote:
            for stale in self.local.iterdir() if self.local.is_dir() else []:
                if stale.name != CHECKPOINT:
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        self.local.mkdir(parents=True, exist_ok=True)
        if self.remote and self.target.exists():
            fs, base = self.target.fs, self.target.path
            for name in fs.find(base):
                relative = name[len(base):].lstrip("/")
                if not _own(relative) or relative == POINTER:
                    continue
                destination = self.local / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(name, str(destination))
        return self.local

    def push(self, names: tuple[str, ...] | None = None) -> None:
        """Upload the local copy's files as whole objects: those under `names`, else the run's own files and
        folders but the summary."""
        if not self.remote:
            return
        tops = names if names is not None else [p.name for p in self.local.iterdir()
                                                if p.name not in NOT_PUSHED and (p.is_file() or p.name in OWN_FOLDERS)]
        files = []
        for top in tops:
            path = self.local / top
            files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
                [path] if path.is_file() else []
        files = [p for p in files if not p.name.startswith(".")]
        for path in files:
            self.target.fs.put_file(str(path), f"{self.target.path}/{path.relative_to(self.local).as_posix()}")

    def release(self) -> None:
        """A finished run's local copy removed (everything is on the store): scratch space stays bounded."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def clear(self) -> None:
        """A new run from scratch: the folder removed where it lives (and the local copy)."""
        if self.remote and self.target.exists():
            self.target.fs.rm(self.target.path, recursive=True)
        shutil.rmtree(self.local, ignore_errors=True)


def _own(relative: str) -> bool:
    """Whether a path inside a run's folder is the run's own file (a top-level file, or in one of its folders)."""
    first, _, rest = relative.partition("/")
    return not rest or first in OWN_FOLDERS


def run_of(folder: "str | DataPath | RunFolder") -> RunFolder:
    """A worker's run folder from its arguments (a RunFolder, or a path from a caller that passes one)."""
    return folder if isinstance(folder, RunFolder) else RunFolder(folder)


def remote_run(folder) -> RunFolder | None:
    """The loop's `run` setting: the run folder where it is on object storage, None where it is on a disk."""
    run = run_of(folder)
    return run if run.remote else None


def _step_of(checkpoint: Path) -> int | None:
    state = checkpoint / "state.json"
    return int(json.loads(state.read_text())["step"]) if state.is_file() else None
