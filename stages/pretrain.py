"""4M pretraining on Ray Train: the dataset's token shards in, a trained FourM out.

Consumes  <root>/tok_*@224/, rgb/, caption/, det/, crop_settings/   aligned shards (stages/fourm_data.py)
          <root>/tokenizers/<modality>/config.json, tokenizers/text/tokenizer.json   the vocabularies' sizes
Produces  <root>/pretrain/
              config.json, model.safetensors   the trained model (FourM.from_pretrained), written at the end
              checkpoint/                      model, optimizer and state.json: the resume point
              metrics.jsonl                    per log: loss per modality, lr, samples/s, tokens/s, MFU;
                                               per validation: val_loss per modality
              train.json                       the summary, written last

One step: every worker reads its masked batch (decoded and masked in DataLoader workers), runs FourM under
bf16 autocast on GPUs, and AdamW (the reference's parameter groups) steps with a warmup then cosine schedule.
A rerun resumes from the checkpoint: the loader is fast-forwarded past the batches already trained on, so the
run takes the same steps as one never stopped.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.config import Config
from stages.shards import _atomic_write_bytes
from stages.training import (device_for, load_checkpoint, optimizer_to, parameter_groups, save_checkpoint,
                             warmup_cosine)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense bf16


class PretrainInputError(ValueError):
    """Missing or unusable input for pretraining: names the folder, tokenizer or setting."""


def run_dir(root: str | Path) -> Path:
    return Path(root) / "pretrain"


def model_config(root: str | Path, config: Config):
    """FourM's settings: the configured size, the dataset's vocabularies (each tokenizer's codebook)."""
    from models.fourm import MODALITIES, FourMConfig

    cfg, root = config.pretrain, Path(root)
    vocab = {}
    for m in cfg.modalities:
        kind = MODALITIES[m]["kind"]
        if kind == "tokens":
            folder = root / "tokenizers" / m.split("@")[0].removeprefix("tok_") / "config.json"
            if not folder.is_file():
                raise PretrainInputError(f"{m}: no tokenizer at {folder.parent} (train it: make train-tokenizers)")
            vocab[m] = int(json.loads(folder.read_text())["codebook_size"])
        elif kind == "sequence":
            path = root / "tokenizers" / "text" / "tokenizer.json"
            if not path.is_file():
                raise PretrainInputError(f"{m}: no text tokenizer at {path} (train it: make train-tokenizers)")
            from models.text_tokenizer import load_text_tokenizer

            vocab[m] = load_text_tokenizer(path).get_vocab_size()
    outputs = [m for m in cfg.modalities if MODALITIES[m]["kind"] != "pixels"]
    try:
        return FourMConfig.sized(cfg.size, domains_in=list(cfg.modalities), domains_out=outputs, vocab_sizes=vocab,
                                 **cfg.model)
    except TypeError as err:
        raise PretrainInputError(f"pretrain.model: {err}") from None


def flops_per_sample(model, n_in: int, n_out: int) -> float:
    """Training FLOPs of one sample: 6 x (encoder parameters x inputs + decoder parameters x targets), the
    output heads (6 x width x vocabulary per target, the mean vocabulary of the target modalities), and
    attention's score and value products (12 x layers x width x tokens^2, cross-attention n_out x n_in)."""
    cfg = model.cfg
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters()) + model.decoder_proj_context.weight.numel()
    vocab = sum(cfg.vocab(m) for m in cfg.domains_out) / max(len(cfg.domains_out), 1)
    attention = 12 * cfg.dim * (cfg.encoder_depth * n_in * n_in + cfg.decoder_depth * (n_out * n_out + n_out * n_in))
    return 6.0 * (encoder * n_in + decoder * n_out + cfg.dim * vocab * n_out) + attention


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _check_token_ids(batch: dict, vocab: dict) -> None:
    for m, d in batch.items():
        if m in vocab and d["tensor"].dtype != torch.float32:
            top = int(d["tensor"].max())
            if top >= vocab[m]:
                raise PretrainInputError(f"{m}: token id {top} outside its vocabulary of {vocab[m]} "
                                         f"(tokens made by another tokenizer?)")


def preflight(root, config: Config):
    """The model's settings, once the shards, tokenizers and a first batch's token ids have been checked."""
    from models.text_tokenizer import load_text_tokenizer
    from stages.fourm_data import make_loader, split_shards

    split_shards(root, config.pretrain.modalities, config.pretrain.val_shards)
    model_cfg = model_config(root, config)
    text = Path(root) / "tokenizers" / "text" / "tokenizer.json"
    loader = make_loader(root, config, load_text_tokenizer(text) if text.is_file() else None, split="val",
                         batch_size=2, workers=0)
    _check_token_ids(next(iter(loader)), model_cfg.vocab_sizes)
    return model_cfg


def validate(model, loader, n_in: int, n_out: int, batches: int, device) -> dict:
    totals, count = {}, 0
    model.eval()
    with torch.no_grad():
        for batch, _ in zip(loader, range(batches)):
            batch = {m: {k: v.to(device) for k, v in d.items()} for m, d in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                _, losses = model(batch, n_in, n_out)
            for m, v in losses.items():
                totals[m] = totals.get(m, 0.0) + float(v)
            count += 1
    model.train()
    return {f"val_loss.{m}": v / max(count, 1) for m, v in totals.items()}


def train_worker(args: dict) -> None:
    """Runs on every Ray Train worker; rank 0 writes checkpoints and metrics."""
    import ray.train

    from models.fourm import FourM, FourMConfig
    from models.text_tokenizer import load_text_tokenizer
    from pipeline.config import Config
    from stages.fourm_data import make_loader

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = Config(**args["config"])
    cfg, folder, root = config.pretrain, Path(args["folder"]), args["root"]
    device = device_for(cfg.device)
    torch.manual_seed(cfg.seed)
    model = FourM(FourMConfig(**args["model_config"])).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    # fused: one kernel for the whole update on a GPU (the parameters are already there)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=0.0, betas=tuple(cfg.betas),
                                  fused=device.type == "cuda")
    start = int(load_checkpoint(folder / "checkpoint", model, optimizer)["step"])
    optimizer_to(optimizer, device)
    trained = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # a batch whose masks give a modality no target leaves its head without a gradient: let DDP skip it
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True)
    text = Path(root) / "tokenizers" / "text" / "tokenizer.json"
    tokenizer = load_text_tokenizer(text) if text.is_file() else None
    local_batch = max(1, cfg.batch_size // world)
    peak_lr = cfg.base_lr * local_batch * world / 256
    train_loader = iter(make_loader(root, config, tokenizer, split="train", batch_size=local_batch, rank=rank))
    for _ in range(start):  # fast-forward: the batches this run trained on before it stopped
        next(train_loader)
    val_loader = make_loader(root, config, tokenizer, split="val", batch_size=local_batch, rank=rank) \
        if rank == 0 else None
    per_sample = flops_per_sample(model, cfg.input_tokens, cfg.target_tokens)
    peak = peak_flops(device)
    stop = min(cfg.steps, args.get("stop_after") or cfg.steps)
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start, stop):
        batch = next(train_loader)
        batch = {m: {k: v.to(device, non_blocking=True) for k, v in d.items()} for m, d in batch.items()}
        lr = warmup_cosine(step, peak_lr, cfg.warmup_steps, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, losses = trained(batch, cfg.input_tokens, cfg.target_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        done, window_steps = step + 1, window_steps + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == stop):
            elapsed = time.perf_counter() - window_start
            samples_per_s = window_steps * local_batch * world / elapsed
            line = {"step": done, "lr": lr, "loss": loss.item(), **{f"loss.{m}": v.item() for m, v in losses.items()},
                    "samples_per_s": samples_per_s,
                    "tokens_per_s": samples_per_s * (cfg.input_tokens + cfg.target_tokens),
                    "mfu": samples_per_s * per_sample / (peak * world) if peak else None,
                    **({"grad_norm": float(norm)} if norm is not None else {})}
            if done % cfg.val_every == 0 or done == cfg.steps:
                line.update(validate(model, val_loader, cfg.input_tokens, cfg.target_tokens, cfg.val_batches, device))
            with open(folder / "metrics.jsonl", "a") as log:
                log.write(json.dumps(line) + "\n")
            sys.stdout.write(f"[4M] step {done}/{cfg.steps} " + " ".join(
                f"{k}={v:.4g}" for k, v in line.items() if isinstance(v, float)) + "\n")
            sys.stdout.flush()
            window_start, window_steps = time.perf_counter(), 0
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == stop):
            save_checkpoint(folder / "checkpoint", model, optimizer, done,
                            {"steps": cfg.steps, "batch_size": local_batch * world,
                             "tokens_per_sample": cfg.input_tokens + cfg.target_tokens})
        if world > 1 and done % cfg.checkpoint_every == 0:
            torch.distributed.barrier()
    if rank == 0 and stop == cfg.steps:
        model.cpu().save_pretrained(folder)


def prediction_picture(root, config: Config, samples: int = 4) -> Path | None:
    """<root>/pretrain/predictions.png: validation samples' RGB, their tokens decoded, and the trained model's
    prediction of every image modality from RGB alone."""
    from models.fourm import FourM
    from models.text_tokenizer import load_text_tokenizer
    from pipeline.show import draw_predictions
    from stages.fourm_data import make_loader

    text = Path(root) / "tokenizers" / "text" / "tokenizer.json"
    loader = make_loader(root, config, load_text_tokenizer(text) if text.is_file() else None, split="val",
                         batch_size=samples, workers=0)
    batch = next(iter(loader))
    model = FourM.from_pretrained(run_dir(root))
    if "rgb@224" not in batch or not any((Path(root) / "tokenizers" / m.split("@")[0].removeprefix("tok_") /
                                          "model.safetensors").is_file() for m in batch if m.startswith("tok_")):
        return None  # nothing to predict from, or no tokenizer to decode with
    return draw_predictions(root, model, batch, run_dir(root) / "predictions.png",
                            f"4M-{config.pretrain.size} after {config.pretrain.steps} steps: validation samples")


def run_pretrain(root: str | Path, config: Config, stop_after: int | None = None) -> dict:
    """Pretrain (or resume) 4M on the dataset at `root`; returns the summary."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_runtime import init_ray, train_logging
    from stages.fourm_data import split_shards

    cfg, folder = config.pretrain, run_dir(root)
    model_cfg = preflight(root, config)  # bad input fails here, before any worker starts
    init_ray(config.ray)
    use_gpu = cfg.device != "cpu" and bool(ray.cluster_resources().get("GPU"))
    world = cfg.workers or (int(ray.cluster_resources().get("GPU", 1)) if use_gpu else 1)
    folder.mkdir(parents=True, exist_ok=True)
    args = {"root": str(Path(root).resolve()), "folder": str(folder.resolve()), "config": config.model_dump(),
            "model_config": asdict(model_cfg), "stop_after": stop_after}
    trainer = TorchTrainer(
        train_worker, train_loop_config=args,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                     resources_per_worker={} if use_gpu else {"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="pretrain-4m", storage_path=str((folder / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),  # restarts resume
                             logging_config=train_logging()))
    trainer.fit()
    state = json.loads((folder / "checkpoint" / "state.json").read_text())
    if stop_after is not None and stop_after < cfg.steps:
        return {"stopped_at": state["step"], "steps": cfg.steps}
    log = folder / "metrics.jsonl"
    metrics = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    summary = {"steps": cfg.steps, "workers": world, "size": cfg.size, "final": metrics[-1] if metrics else {},
               "first": metrics[0] if metrics else {}}
    picture = prediction_picture(root, config)
    summary["predictions"] = str(picture) if picture else None
    _atomic_write_bytes(folder / "train.json", json.dumps(summary, indent=1).encode())
    return summary
