"""The one training loop every model in the project trains with (the tokenizers, 4M, later fine-tuning).

A model brings a `TrainTask`: how to build it, its parameter groups, the batch of every step (read in DataLoader
worker processes), its forward, and the figures and files it adds. The loop brings the rest, the same for all:

    every Ray Train worker: build the model -> DDP or FSDP (optionally torch.compile) -> AdamW with the task's
    parameter groups -> restore the last checkpoint -> for each step: the step's batch, the step's seed, the
    warmup + cosine learning rate, forward under bf16 autocast on GPUs, backward, clip, step -> rank 0 logs
    metrics.jsonl, TensorBoard events and the console line, checkpoints are written aside and swapped in whole ->
    the task saves the finished model.

A checkpoint folder holds `model.safetensors`, `optimizer.safetensors` (both full, unsharded state, keyed by
parameter name, so a run may resume with another number of workers or another parallelism) and `state.json`
(step and whatever the task adds). Every random draw of a step is seeded by (seed, step, rank) and the task
fast-forwards its data to the restored step, so a resumed run takes exactly the steps of one never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from core.files import swap_folder
from core.ray_runtime import RayUnavailable, capacity, init_ray, require_resources, train_logging
from core.registry import ModalitySet
from stages.run_folder import RunFolder
from stages.run_log import RunLog

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense bf16


def device_for(name: str) -> torch.device:
    """auto: cuda when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate, scaled per group where a group says so (layer-wise decay's `lr_scale`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                state[k] = v.to(device)


# -- the data ---------------------------------------------------------------------------------------------------
def data_loader(dataset, workers: int, **options) -> torch.utils.data.DataLoader:
    """A DataLoader reading in `workers` processes (0: in the trainer), each 4 batches ahead, that end cleanly."""
    return torch.utils.data.DataLoader(dataset, num_workers=workers, prefetch_factor=4 if workers else None,
                                       worker_init_fn=_loader_process_start if workers else None,
                                       pin_memory=torch.cuda.is_available(), **options)


def _loader_process_start(worker: int) -> None:
    _forget_inherited_exit_calls(worker)
    keep_freed_arrays()


def keep_freed_arrays() -> None:
    """Keep the memory of freed arrays in the process's heap for the next sample (glibc's malloc; elsewhere a
    no-op). glibc hands a block over its mmap threshold back to the system on free, and trims the heap's top once
    more than twice that threshold is free there; both thresholds adapt to what was freed, up to 32 and 64 MB. A
    loader process frees every sample's arrays (a 512 photo, its crop, their float copies: several MB), so each next
    sample faulted its pages in anew: about 2,000 minor page faults per segmentation sample at 512, 30-40% of its
    time (measured). Fixed at glibc's largest mmap threshold (32 MB) and a 128 MB trim threshold, a worker holds on
    to at most that much more than it uses."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD


def _forget_inherited_exit_calls(_worker: int) -> None:
    """A forked loader process inherits the thread-exit calls of the trainer's threads (Prefect's services register
    one each: a flow's process has them). Run at the worker's exit for threads it does not have, they raise, the
    worker ends with code 1, and the trainer reports 'DataLoader worker exited unexpectedly' as the loader shuts
    down. The worker has none of those threads, so none of their calls."""
    calls = getattr(threading, "_threading_atexits", None)  # CPython's list behind threading._register_atexit
    if calls is not None:
        calls.clear()


# -- checkpoints ----------------------------------------------------------------------------------------------
def _full_state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_state(model, optimizer) -> tuple[dict, dict]:
    """The full (unsharded) model and optimizer state on the CPU, keyed by parameter name. Under FSDP it is a
    collective: every rank calls it, rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _full_state_options(cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else {})


def _without_aliases(weights: dict) -> tuple[dict, dict]:
    """Tied weights (4M's output heads) share storage: store each tensor once, the other names as aliases."""
    seen, unique, aliases = {}, {}, {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key], unique[name] = name, tensor.contiguous()
    return unique, aliases


def write_checkpoint(folder: Path, weights: dict, optimizer_state: dict, step: int, extra: dict) -> None:
    """Model and optimizer as safetensors, then state.json; written aside and swapped in whole."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unique, aliases = _without_aliases(weights)
    save_file(unique, tmp / "model.safetensors")
    tensors, meta = {}, {"param_groups": optimizer_state.get("param_groups", []), "slots": {}}
    for param, slots in optimizer_state.get("state", {}).items():
        meta["slots"][str(param)] = {}
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{param}/{slot}"] = value.contiguous()
            else:
                meta["slots"][str(param)][slot] = value
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": meta, "aliases": aliases, **extra},
                                               indent=1))
    swap_folder(tmp, folder)


def save_checkpoint(folder: Path, model, optimizer, step: int, extra: dict) -> None:
    """One process's model and optimizer (not sharded): gather and write."""
    write_checkpoint(folder, *gather_state(model, optimizer), step, extra)


def read_weights(folder: Path) -> dict | None:
    """The checkpoint's full model state (aliases restored), or None without a checkpoint."""
    from safetensors.torch import load_file

    if not (folder / "state.json").is_file():
        return None
    weights = load_file(folder / "model.safetensors")
    for alias, name in json.loads((folder / "state.json").read_text()).get("aliases", {}).items():
        weights[alias] = weights[name]
    return weights


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Restore model and optimizer (plain, DDP's inner module, or FSDP-sharded: every rank calls it); returns
    state.json ({"step": 0} without a checkpoint)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (folder / "state.json").is_file():
        return {"step": 0}
    state = json.loads((folder / "state.json").read_text())
    meta, tensors = state["optimizer"], load_file(folder / "optimizer.safetensors")
    slots = {param: dict(values) for param, values in meta["slots"].items()}
    for key, value in tensors.items():
        param, slot = key.rsplit("/", 1)
        slots.setdefault(param, {})[slot] = value
    set_model_state_dict(model, read_weights(folder), options=_full_state_options())
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, {"state": slots, "param_groups": meta["param_groups"]},
                                 options=_full_state_options())
    return state


# -- the loop ---------------------------------------------------------------------------------------------------
@dataclass
class LoopSettings:
    name: str                             # the console tag: "[rgb] step 5/16 ..."
    steps: int
    warmup_steps: int
    peak_lr: float
    samples_per_step: int                 # the global batch
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = None
    log_every: int = 50
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: str = "bfloat16"           # autocast dtype on GPUs; float16 adds a gradient scaler
    parallel: str = "ddp"                 # ddp, or fsdp: the task's units sharded, then the whole model
    compile: bool = False                 # torch.compile the model that trains
    tokens_per_sample: int | None = None  # for tokens/s
    flops_per_sample: float | None = None  # for MFU, against the device's peak
    stop_after: int | None = None         # stop (checkpointed) after this step, as a killed run would
    wandb: dict | None = None             # WandbConfig's fields: W&B logging beside TensorBoard (mode "off": none)
    run: RunFolder | None = None          # the run's folder on object storage, of which `folder` is this machine's
                                          # copy: checkpoints are pulled from it and pushed to it (stages/run_folder)


class TrainTask:
    """What one model brings to the loop; subclasses override what they need."""

    find_unused_parameters = False  # DDP: True where a batch may leave some parameters without a gradient

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def parameter_groups(self, model) -> list[dict]:
        raise NotImplementedError

    def batches(self, start: int, rank: int, world: int) -> Iterator:
        """The batch of every step from `start` on, identical to an uninterrupted run's."""
        raise NotImplementedError

    def forward(self, model, batch) -> dict:
        """'loss' and any other 0-d tensors to log; the rest is for `observe`."""
        raise NotImplementedError

    def fsdp_units(self, model) -> list[torch.nn.Module]:
        """Modules FSDP shards one by one (the transformer blocks) before the whole model."""
        return []

    def observe(self, out: dict) -> None:
        """Sees every step's outputs (a codebook's usage window)."""

    def log_extras(self, model, done: int) -> dict:
        """Figures added at a log step (evaluations, validation). Every rank calls it, so it may run the model;
        rank 0's figures are logged."""
        return {}

    def pictures(self) -> list[Path]:
        """Picture files the task keeps up to date (reconstructions): each new version is logged as an image."""
        return []

    def checkpoint_extras(self) -> dict:
        return {}

    def settings(self) -> dict:
        """What the run was configured with, beyond the loop's settings: shown with the run (TensorBoard's text
        panel, the W&B run's config)."""
        return {}

    def finish(self, model, resumed_at_end: bool) -> None:
        """Rank 0, once the last step is done: save the finished (unsharded) model."""


def _to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return {k: _to(v, device) for k, v in batch.items()}


def _wrap(model, task: TrainTask, s: LoopSettings, device, world: int):
    """The module that trains: the model itself, under DDP, or sharded in place by FSDP; compiled on request."""
    if s.parallel == "fsdp" and world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 parameters in forward and backward on GPUs, fp32 gradient reduction and master weights
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, s.precision), reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for unit in task.fsdp_units(model):
            fully_shard(unit, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        trained = model
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=task.find_unused_parameters)
    else:
        trained = model
    return torch.compile(trained) if s.compile else trained


def train_loop(task: TrainTask, s: LoopSettings, folder: Path, rank: int, world: int) -> None:
    """Train (or resume) on this worker; rank 0 writes `folder`/metrics.jsonl and `folder`/checkpoint."""
    device = device_for(s.device)
    torch.manual_seed(s.seed)
    model = task.build().to(device)
    trained = _wrap(model, task, s, device, world)
    sharded = s.parallel == "fsdp" and world > 1
    # fused: one kernel for the whole update on a GPU (the parameters are already there)
    optimizer = torch.optim.AdamW(task.parameter_groups(model), lr=0.0, betas=tuple(s.betas),
                                  fused=device.type == "cuda")
    if s.run is not None and rank == 0:
        s.run.pull()
    if s.run is not None:
        s.run.pull_checkpoint()  # every rank reads the checkpoint: on another machine, from its own copy
    resumed = load_checkpoint(folder / "checkpoint", model, optimizer)
    start = int(resumed["step"])
    if start and rank == 0:  # a restart after a lost worker, or a rerun: where the run picked up
        sys.stdout.write(f"[{s.name}] resumed from the checkpoint of step {start}, on {world} worker(s)\n")
        sys.stdout.flush()
    optimizer_to(optimizer, device)
    autocast_dtype = getattr(torch, s.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and autocast_dtype == torch.float16)
    if resumed.get("scaler"):
        scaler.load_state_dict(resumed["scaler"])
    batches = task.batches(start, rank, world)
    stop = min(s.steps, s.stop_after or s.steps)
    peak = peak_flops(device)
    run_log = RunLog(folder, wandb=s.wandb, name=s.name) if rank == 0 else None
    if run_log:
        run_log.settings({"loop": {f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                                   if f.name not in ("run", "wandb")}, **task.settings()})
    window_start, window_steps, waited = time.perf_counter(), 0, 0.0
    for step in range(start, stop):
        asked = time.perf_counter()
        batch = _to(next(batches), device)
        waited += time.perf_counter() - asked  # the loader's share of the step: above a few % it bounds training
        torch.manual_seed(s.seed * 1_000_003 + step * world + rank)  # every draw of this step: restarts, noise
        lr = warmup_cosine(step, s.peak_lr, s.warmup_steps, s.steps)
        apply_lr(optimizer, lr)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=device.type == "cuda"):
            out = task.forward(trained, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        norm = None
        logged = (step + 1) % s.log_every == 0 or step + 1 == stop
        if s.grad_clip or logged:  # the norm of every log step, clipped or not (a days-long run's first alarm)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip or float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a distributed tensor
        scaler.step(optimizer)
        scaler.update()
        task.observe(out)
        done, window_steps = step + 1, window_steps + 1
        if done % s.log_every == 0 or done == stop:
            extras = task.log_extras(model, done)
            if rank == 0:
                elapsed = time.perf_counter() - window_start
                samples_per_s = window_steps * s.samples_per_step / elapsed
                line = {"step": done, "lr": lr,
                        **{k: v.item() for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0},
                        "samples_per_s": samples_per_s, "step_time_s": elapsed / window_steps,
                        "loader_wait_share": waited / elapsed,
                        **({"tokens_per_s": samples_per_s * s.tokens_per_sample,
                            "tokens_seen": done * s.samples_per_step * s.tokens_per_sample}
                           if s.tokens_per_sample else {}),
                        **({"gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
                           if device.type == "cuda" else {}),
                        **({"mfu": samples_per_s * s.flops_per_sample / (peak * world) if peak else None}
                           if s.flops_per_sample else {}),
                        **({"grad_norm": float(norm)} if norm is not None else {}), **extras}
                run_log.write(line)  # metrics.jsonl and TensorBoard
                run_log.pictures(task.pictures(), done)
                # Not print(): Ray Train patches it in its workers to log and echo, so each line came out twice.
                sys.stdout.write(f"[{s.name}] step {done}/{s.steps} " + " ".join(
                    f"{k}={v:.4g}" for k, v in line.items() if isinstance(v, float)) + "\n")
                sys.stdout.flush()
            window_start, window_steps, waited = time.perf_counter(), 0, 0.0
        if done % s.checkpoint_every == 0 or done == stop:
            weights, optimizer_state = gather_state(model, optimizer)  # a collective under FSDP
            if rank == 0:
                write_checkpoint(folder / "checkpoint", weights, optimizer_state, done,
                                 {**task.checkpoint_extras(), "scaler": scaler.state_dict()})
                if s.run is not None:
                    s.run.push_checkpoint(done)
            if world > 1:
                torch.distributed.barrier()  # nobody runs ahead of a checkpoint that may be resumed from
    if run_log:
        run_log.close()
    if stop == s.steps:
        weights = gather_state(model, None)[0] if sharded else None
        if rank == 0:
            if sharded:  # the finished model, unsharded, on the CPU
                model = task.build()
                model.load_state_dict(weights)
            task.finish(model.cpu(), resumed_at_end=start >= stop)
            if s.run is not None:
                s.run.push()  # the finished model (the driver pushes the run's summary last)


# -- on Ray Train -----------------------------------------------------------------------------------------------
def world_for(ray_config, device: str, workers: int | None) -> tuple[int, bool]:
    """(data-parallel workers, on GPUs?): the configured number, else one per GPU of the cluster, else one; 0
    workers: one trainer, in the calling process (see `fit`)."""
    import ray

    init_ray(ray_config)
    use_gpu = device != "cpu" and bool(ray.cluster_resources().get("GPU"))
    if workers == 0:
        return 1, use_gpu
    return workers or (int(ray.cluster_resources().get("GPU", 1)) if use_gpu else 1), use_gpu


def _on_worker(config: dict) -> None:
    """A worker computes on the threads its CPUs give it, then trains; the run's modality set arrived with its
    arguments (unpickled, it imported the modules that define the run's modalities)."""
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    config["train_fn"](config["args"])


def ray_storage(folder: Path, run: RunFolder | None) -> dict:
    """Ray Train's storage_path (and filesystem): beside the run, on the disk or on the store it lives on."""
    if run is None or not run.remote:
        return {"storage_path": str((folder / "ray").resolve())}
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return {"storage_path": f"{run.target.path}/ray", "storage_filesystem": PyFileSystem(FSSpecHandler(run.target.fs))}


def fit(train_fn, args: dict, *, name: str, folder: Path, world: int, use_gpu: bool, cpus_per_worker: float,
        max_failures: int, modalities: ModalitySet, resource_wait_s: float, in_process: bool = False,
        run: RunFolder | None = None) -> None:
    """Run `train_fn(args)` on `world` Ray Train workers (one GPU each, or `cpus_per_worker` CPUs). A lost worker
    makes Ray Train restart the group, up to `max_failures` times; the loop resumes from the last checkpoint.
    A restart waits up to `resource_wait_s` for the group's resources (a lost node's replacement), then fails with
    RayUnavailable naming what the cluster lacks: left to itself, Ray Train would retry the start without end.

    `in_process`: Ray Train's local mode instead, one trainer in this process (no worker actors, so no restarts):
    starting a worker group costs about 11 s on a 2-core machine, more than a short CPU run itself.

    `modalities`: the run's modality set, carried to every worker.
    `run`: the run's folder where it lives; on object storage Ray Train keeps its own run state there too (under
    ray/), where every node reaches it."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = ScalingConfig(num_workers=0) if in_process else ScalingConfig(
        num_workers=world, use_gpu=use_gpu, resources_per_worker={} if use_gpu else {"CPU": cpus_per_worker})
    per_worker = {"GPU": 1} if use_gpu else {"CPU": cpus_per_worker}
    if not in_process:  # before any worker starts: Ray Train would wait for missing resources without end
        require_resources(per_worker, world, name)
        # read by Ray Train's controller (passed on to it because it is set here) for every start of the group
        os.environ[START_TIMEOUT_ENV] = f"{resource_wait_s:g}"
    # A CPU worker of `cpus_per_worker` CPUs computes on that many threads, set here rather than left to Ray's
    # OMP_NUM_THREADS (which Ray does not set when the caller's environment has one): the same sums in the same
    # order on a worker and in process, so a run resumed in process takes the very steps a worker would have
    threads = None if use_gpu else max(1, int(cpus_per_worker))
    trainer = TorchTrainer(
        _on_worker, train_loop_config={"train_fn": train_fn, "modalities": modalities,
                                             "args": args, "threads": threads},
        scaling_config=scaling,
        run_config=RunConfig(name=name, **ray_storage(folder, run),
                             # a start that timed out is not retried: it already waited resource_wait_s
                             failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=0),
                             logging_config=train_logging()))
    if not in_process:
        from ray.train import ControllerError

        try:
            trainer.fit()
        except ControllerError as err:
            if type(err.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
                raise
            fits, have = capacity(per_worker)
            raise RayUnavailable(
                f"{name}: its {world} worker(s) of {per_worker} each did not start within {resource_wait_s:g} s "
                f"(ray.resource_wait_s); the cluster's live nodes hold {fits} ({have}); the run resumes from its last "
                f"checkpoint when rerun on a cluster that has them") from None
        return
    own_threads = torch.get_num_threads()  # the worker's count is set in this process for the run, then undone
    try:
        trainer.fit()
    finally:
        torch.set_num_threads(own_threads)
