"""Training one tokenizer per modality: the WordPiece vocabulary, and the dense VQ-VAEs on Ray Train.

Consumes  <root>/caption/ and <root>/det/ (text), or <root>/<modality>/ shards committed by the download or
          label stage (rgb, depth, normal, semseg, clip)
Produces  <root>/tokenizers/<modality>/
              config.json, model.safetensors      the trained tokenizer (text: tokenizer.json)
              checkpoint/                         model and optimizer (safetensors) + state.json: the resume point
              metrics.jsonl                       loss, codebook usage, reconstruction metric, one line per log
              reconstructions.png                 inputs above their reconstructions
              train.json                          the summary, written last: the commit marker

A dense tokenizer trains data-parallel on Ray Train (`TorchTrainer`, one worker per GPU, or CPU workers), with
the paper's random-resized crops and flips, AdamW (0.9, 0.95), a linear warmup then cosine decay, and autocast
on GPUs. Every random draw of a step is seeded by (seed, step, rank), and the data stream of an epoch by
(seed, epoch, rank), so a run resumed from its checkpoint takes the same steps as one never stopped.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, TokenizerStageConfig
from stages.shards import DatasetLayout, _atomic_write_bytes
from stages.tokenizer_data import crop_to_tensor, random_crop, center_crop, shard_samples
from stages.training import device_for, load_checkpoint, optimizer_to, save_checkpoint, warmup_cosine

DENSE = ("rgb", "depth", "normal", "semseg", "clip")


class TokenizerInputError(ValueError):
    """Missing or unusable input for a tokenizer: names the modality and what is missing."""


def tokenizer_dir(root: str | Path, modality: str) -> Path:
    return Path(root) / "tokenizers" / modality


def is_trained(root: str | Path, modality: str) -> bool:
    return (tokenizer_dir(root, modality) / "train.json").is_file()


def producing_stage(modality: str) -> str:
    return "download" if modality in ("rgb", "caption") else f"label_{modality}"


def modality_shards(layout: DatasetLayout, modality: str) -> list[str]:
    shards = layout.committed_shards(producing_stage(modality))
    if not shards:
        raise TokenizerInputError(f"no committed {modality} shards under {layout.root} "
                                  f"(stage {producing_stage(modality)!r} has not run)")
    return shards


def model_config(cfg: TokenizerStageConfig, modality: str, layout: DatasetLayout | None = None):
    """The tokenizer's settings: Table 3 at the configured size; CLIP's width read off the stored maps."""
    from models.vqvae import tokenizer_config

    overrides = {"codebook_size": cfg.codebook_sizes[modality]} if modality in cfg.codebook_sizes else {}
    if modality == "clip" and layout is not None:
        first = next((features for shard in modality_shards(layout, modality)
                      for _, features, _ in shard_samples(layout, modality, shard)), None)
        if first is not None:
            overrides["in_channels"] = int(first.shape[-1])
    return tokenizer_config(modality, cfg.size, **overrides)


def _write_json_atomic(path: Path, data: dict) -> None:
    _atomic_write_bytes(path, json.dumps(data, indent=1).encode())


# -- the text tokenizer ------------------------------------------------------------------------------
def text_corpus(layout: DatasetLayout) -> Iterator[str]:
    """Every caption, then every box sequence, streamed shard by shard."""
    from models.text_tokenizer import boxes_to_text
    from stages.tokenizer_data import read_members

    for shard in modality_shards(layout, "caption"):
        for _, data in read_members(layout.tar("caption", shard), "txt"):
            yield data.decode("utf-8", errors="replace")
    for shard in layout.committed_shards("label_det"):
        for _, data in read_members(layout.tar("det", shard), "json"):
            yield boxes_to_text(json.loads(data)["instances"])


def train_text(root: str | Path, cfg: TokenizerStageConfig) -> dict:
    from models.text_tokenizer import train_text_tokenizer

    layout, folder = DatasetLayout(root), tokenizer_dir(root, "text")
    folder.mkdir(parents=True, exist_ok=True)
    counted = {"texts": 0}

    def corpus():
        for text in text_corpus(layout):
            counted["texts"] += 1
            yield text

    tokenizer = train_text_tokenizer(corpus(), cfg.vocab_size, folder / "tokenizer.json")
    summary = {"modality": "text", "texts": counted["texts"], "vocab_size": tokenizer.get_vocab_size()}
    _write_json_atomic(folder / "train.json", summary)
    return summary


# -- the dense tokenizers: plan, data, checkpoints -------------------------------------------------------
@dataclass
class Plan:
    samples: int
    world: int
    local_batch: int
    steps_per_epoch: int
    steps: int
    warmup_steps: int
    lr: float


def make_plan(layout: DatasetLayout, modality: str, cfg: TokenizerStageConfig, world: int) -> Plan:
    import pyarrow.parquet as pq

    shards, stage = modality_shards(layout, modality), producing_stage(modality)
    samples = sum(pq.read_table(layout.status_table(stage, s), columns=["status"]).column("status")
                  .to_pylist().count("ok") for s in shards)
    if samples == 0:
        raise TokenizerInputError(f"no {modality} samples in {len(shards)} committed shards under {layout.root}")
    if len(shards) < world:
        raise TokenizerInputError(f"{modality}: {len(shards)} shards for {world} workers; use at most one worker "
                                  f"per shard (tokenizer.workers)")
    local_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, samples // (local_batch * world))
    epochs = cfg.epochs_by_modality.get(modality, cfg.epochs)
    return Plan(samples, world, local_batch, steps_per_epoch, max(1, round(epochs * steps_per_epoch)),
                round(cfg.warmup_epochs * steps_per_epoch), cfg.base_lr * local_batch * world / 256)


def lr_at(step: int, plan: Plan) -> float:
    return warmup_cosine(step, plan.lr, plan.warmup_steps, plan.steps)


def sample_stream(root: str, modality: str, shards: list[str], crop_scale, seed: int, epoch: int, rank: int,
                  world: int, buffer: int = 256) -> Iterator[torch.Tensor]:
    """This worker's endless stream of cropped samples for one epoch: its shards in an epoch-seeded order,
    through a seeded shuffle buffer, cycling if the epoch asks for more than the shards hold."""
    layout, rng = DatasetLayout(root), np.random.default_rng([seed, epoch, rank])
    order = [shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(shards))]
    mine, pool = order[rank::world], []
    while True:
        for shard in mine:
            for _, label, size in shard_samples(layout, modality, shard):
                crop = random_crop(rng, *size, scale=crop_scale)
                pool.append(crop_to_tensor(modality, label, crop, size))
                if len(pool) >= buffer:
                    yield pool.pop(int(rng.integers(len(pool))))
        while pool:
            yield pool.pop(int(rng.integers(len(pool))))


def eval_batch(root: str, modality: str, shards: list[str], count: int) -> torch.Tensor:
    """The first samples of the first shard, center-cropped: the same pictures at every evaluation."""
    samples = []
    for _, label, size in shard_samples(DatasetLayout(root), modality, shards[0]):
        samples.append(crop_to_tensor(modality, label, center_crop(*size), size))
        if len(samples) == count:
            break
    return torch.stack(samples)


# -- pictures -----------------------------------------------------------------------------------------
def to_picture(modality: str, x: torch.Tensor) -> np.ndarray:
    """One input or reconstruction (C, H, W) -> an RGB picture in [0, 1]."""
    import matplotlib

    if modality in ("rgb", "normal"):
        return ((x.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    if modality == "depth":
        return matplotlib.colormaps["turbo"](((x[0].float().clamp(-1, 1) + 1) / 2).numpy())[..., :3]
    if modality == "semseg":
        ids = x.argmax(0) if x.ndim == 3 else x
        return matplotlib.colormaps["tab20"]((ids % 20).numpy() / 19)[..., :3]
    from pipeline.show import clip_pca

    return clip_pca(x.float().permute(1, 2, 0).numpy())


def save_reconstructions(path: Path, modality: str, inputs, reconstructions, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(inputs)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    fig.suptitle(title, fontsize=10)
    for i in range(n):
        for row, x in enumerate((inputs[i], reconstructions[i])):
            axes[row][i].imshow(to_picture(modality, x.cpu()), interpolation="nearest")
            axes[row][i].set_axis_off()
    axes[0][0].set_title("input", fontsize=9, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=9, loc="left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    os.replace(tmp, path)


# -- one worker's training loop ---------------------------------------------------------------------------
def evaluate(model, modality: str, batch: torch.Tensor, seed: int) -> dict:
    """Reconstructions of the evaluation batch (diffusion decoders: sampled from noise, as users decode) and
    their metric, beside the trivial baseline's (each sample's mean, or its majority class)."""
    from models.vqvae import baseline_metric, reconstruction_metric

    model.eval()
    ids = model.tokenize(batch)
    reconstruction = model.detokenize(ids, generator=torch.Generator(batch.device).manual_seed(seed)).float()
    name, value = reconstruction_metric(modality, reconstruction, batch)
    model.train()
    return {"metric": name, "value": value, "baseline": baseline_metric(modality, batch, model.cfg.in_channels),
            "reconstruction": reconstruction}


QUALITY_METRICS = ("psnr_db", "mean_angle_deg", "l1", "miou", "cosine")


def quality(modality: str, final: dict) -> dict:
    """A tokenizer's reconstruction metric beside what learning nothing scores (each sample's mean colour,
    depth, normal or feature, or its majority class), from its last logged metrics; {} before any evaluation."""
    from models.vqvae import BASELINES

    name = next((k for k in QUALITY_METRICS if k in final), None)
    if name is None:
        return {}
    return {"metric": name, "value": final[name], "baseline": final.get(f"{name}_baseline"),
            "baseline_of": BASELINES[modality]}


def quality_line(modality: str, final: dict) -> str:
    """'psnr_db 19.2 (mean-colour image: 12.9)'."""
    q = quality(modality, final)
    if not q:
        return ""
    beside = f" ({q['baseline_of']}: {q['baseline']:.4g})" if q["baseline"] is not None else ""
    return f"{q['metric']} {q['value']:.4g}{beside}"


def training_line(modality: str, final: dict) -> str:
    """A finished run's figures for the console: loss, codebook usage, then the metric beside its baseline."""
    figures = [f"{k} {final[k]:.4g}" for k in ("loss", "codes_used", "perplexity") if k in final]
    return ", ".join(figures + ([quality_line(modality, final)] if quality(modality, final) else []))


def train_worker(args: dict) -> None:
    """Runs on every Ray Train worker; rank 0 writes checkpoints, metrics and pictures."""
    import ray.train
    import torch.distributed as dist

    from models.vqvae import VQVAE, codebook_usage, save_tokenizer

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg, plan, mcfg = TokenizerStageConfig(**args["cfg"]), Plan(**args["plan"]), args["model_config"]
    root, modality, folder = args["root"], args["modality"], Path(args["folder"])
    device = device_for(cfg.device)
    torch.manual_seed(cfg.seed)
    model = VQVAE(mcfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=plan.lr, betas=(0.9, 0.95))
    resumed = load_checkpoint(folder / "checkpoint", model, optimizer)
    start = int(resumed["step"])
    model.to(device)
    optimizer_to(optimizer, device)
    trained = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast_dtype = getattr(torch, mcfg.dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and autocast_dtype == torch.float16)
    if resumed.get("scaler"):
        scaler.load_state_dict(resumed["scaler"])
    shards = args["shards"]
    stop = min(plan.steps, args.get("stop_after") or plan.steps)
    evaluation = eval_batch(root, modality, shards, cfg.eval_samples).to(device) if rank == 0 else None
    stream, stream_epoch, window, last = None, None, [], {}
    for step in range(start, stop):
        epoch = step // plan.steps_per_epoch
        if stream_epoch != epoch:
            stream = sample_stream(root, modality, shards, mcfg.crop_scale, cfg.seed, epoch, rank, world)
            stream_epoch = epoch
            for _ in range((step % plan.steps_per_epoch) * plan.local_batch):  # resume inside an epoch
                next(stream)
        batch = torch.stack([next(stream) for _ in range(plan.local_batch)]).to(device, non_blocking=True)
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # every draw of this step: restarts, noise
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, plan)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=device.type == "cuda"):
            out = trained(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        window.append(out["ids"].detach().flatten().cpu())
        done = step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == stop):
            usage = codebook_usage(torch.cat(window), mcfg.codebook_size)
            last = {"step": done, "epoch": round(done / plan.steps_per_epoch, 3), "lr": lr_at(step, plan),
                    "loss": out["loss"].item(), "reconstruction_loss": out["reconstruction_loss"].item(),
                    "commitment_loss": out["commitment_loss"].item(), **usage,
                    "restarts": int(model.quantizer.restarts)}
            if done % cfg.eval_every == 0 or done == plan.steps:
                result = evaluate(model, modality, evaluation, cfg.seed)
                last[result["metric"]] = result["value"]
                last[f"{result['metric']}_baseline"] = result["baseline"]
                save_reconstructions(folder / "reconstructions.png", modality, evaluation.cpu(),
                                     result["reconstruction"].cpu(),
                                     f"{modality} tokenizer, step {done}: {quality_line(modality, last)}")
            with open(folder / "metrics.jsonl", "a") as log:
                log.write(json.dumps(last) + "\n")
            # Not print(): Ray Train patches it in its workers to log and echo, so each line came out twice.
            sys.stdout.write(f"[{modality}] step {done}/{plan.steps} " + " ".join(
                f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)) + "\n")
            sys.stdout.flush()
            window = []
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == stop):
            save_checkpoint(folder / "checkpoint", model, optimizer, done,
                            {"plan": asdict(plan), "scaler": scaler.state_dict()})
        if world > 1 and done % cfg.checkpoint_every == 0:
            dist.barrier()
    if rank == 0 and stop == plan.steps:
        if start >= stop:  # resumed from the final checkpoint of a run stopped before it finished: record its metric
            result = evaluate(model, modality, evaluation, cfg.seed)
            with open(folder / "metrics.jsonl", "a") as log:
                log.write(json.dumps({"step": stop, result["metric"]: result["value"],
                                      f"{result['metric']}_baseline": result["baseline"]}) + "\n")
        save_tokenizer(model.cpu(), folder)


def train_dense(root: str | Path, config: Config, modality: str, stop_after: int | None = None) -> dict:
    """Train (or resume) one dense tokenizer on Ray Train; returns its summary."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_runtime import init_ray, train_logging

    cfg, layout, folder = config.tokenizer, DatasetLayout(root), tokenizer_dir(root, modality)
    init_ray(config.ray)
    use_gpu = cfg.device != "cpu" and bool(ray.cluster_resources().get("GPU"))
    world = cfg.workers or (int(ray.cluster_resources().get("GPU", 1)) if use_gpu else 1)
    plan = make_plan(layout, modality, cfg, world)
    folder.mkdir(parents=True, exist_ok=True)
    args = {"root": str(Path(root).resolve()), "modality": modality, "folder": str(folder.resolve()),
            "cfg": cfg.model_dump(), "plan": asdict(plan), "model_config": model_config(cfg, modality, layout),
            "shards": modality_shards(layout, modality), "stop_after": stop_after}
    resources = {} if use_gpu else {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        train_worker, train_loop_config=args,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"tokenizer-{modality}", storage_path=str((folder / "ray").resolve()),
                             logging_config=train_logging()))
    trainer.fit()
    if stop_after is not None and stop_after < plan.steps:
        return {"modality": modality, "stopped_at": stop_after, "steps": plan.steps}
    log = folder / "metrics.jsonl"
    metrics = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    summary = {"modality": modality, "samples": plan.samples, "steps": plan.steps, "workers": world,
               "final": metrics[-1] if metrics else {}}
    _write_json_atomic(folder / "train.json", summary)
    return summary


def run_train_tokenizers(root: str | Path, config: Config, modalities: list[str] | None = None,
                         observer=None) -> dict[str, dict]:
    """Every requested tokenizer not yet trained; a trained one (train.json present) is kept."""
    results = {}
    for modality in modalities or config.tokenizer.modalities:
        if is_trained(root, modality):
            results[modality] = {**json.loads((tokenizer_dir(root, modality) / "train.json").read_text()),
                                 "skipped": True}
        elif modality == "text":
            results[modality] = train_text(root, config.tokenizer)
        elif modality in DENSE:
            results[modality] = train_dense(root, config, modality)
        else:
            raise TokenizerInputError(f"no tokenizer for modality {modality!r}")
        if observer:
            observer(modality, results[modality])
    return results
