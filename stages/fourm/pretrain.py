"""4M pretraining on Ray Train: the dataset's token shards in, a trained FourM out.

Consumes  <root>/tok_*@224/, rgb/, caption/, det/, crop_settings/   aligned shards (stages/fourm/fourm_data.py), or
          the datasets of a mixture (`pretrain.datasets`, a reference data config: stages/fourm/datasets.py)
          <root>/tokenizers/<modality>/config.json, tokenizers/text/tokenizer.json   the vocabularies' sizes
Produces  <root>/pretrain/
              config.json, model.safetensors   the trained model (FourM.from_pretrained), written at the end
              checkpoint/                      model, optimizer and state.json: the resume point
              metrics.jsonl                    per log: loss per modality, lr, samples/s, tokens/s, MFU;
                                               per validation: val_loss per modality; in a mixture, per dataset
                                               too (loss.<dataset>.<modality>, samples.<dataset>, val_loss.<dataset>.*)
              train.json                       the summary, written last

One step (the project's training loop, stages/training.py): every worker reads its masked batch (decoded and
masked in DataLoader workers), runs FourM under bf16 autocast on GPUs (DDP, or FSDP with `pretrain.parallel`),
and AdamW (the reference's parameter groups) steps with a warmup then cosine schedule. A rerun resumes from the
checkpoint: the loader is fast-forwarded past the batches already trained on, so the run takes the same steps as
one never stopped.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from core import registry
from core.config import Config
from core.files import write_json
from core.storage import DataPath, absolute
from models.fourm import FourM, FourMConfig
from stages.dataset.shards import DatasetLayout
from stages.fourm.datasets import DATASET, make_loader, plan_datasets, val_loaders
from stages.fourm.fourm_pictures import draw_predictions
from stages.run_folder import RunFolder, remote_run, run_of
from stages.run_log import RunLog
from stages.tokenizers import dataset_tokenizers as tokenizers
from stages.training import LoopSettings, TrainTask, fit, parameter_groups, train_loop, world_for


class PretrainInputError(ValueError):
    """Missing or unusable input for pretraining: names the folder, tokenizer or setting."""


def run_dir(root: str | Path) -> DataPath:
    return DatasetLayout(root).pretrain_dir


def model_config(root: str | Path, config: Config):
    """FourM's settings: the configured size, the dataset's vocabularies (each tokenizer's codebook)."""
    cfg, vocab = config.pretrain, {}
    inputs, outputs = cfg.model_domains()
    for m in dict.fromkeys([*inputs, *outputs]):
        kind = registry.domain(m).kind
        if kind == "tokens":
            folder = tokenizers.folder(root, m) / "config.json"
            if not folder.is_file():
                raise PretrainInputError(f"{m}: no tokenizer at {folder.parent} (train it: make train-tokenizers)")
            vocab[m] = int(json.loads(folder.read_text())["codebook_size"])
        elif kind == "sequence":
            path = tokenizers.text_path(root)
            if not path.is_file():
                raise PretrainInputError(f"{m}: no text tokenizer at {path} (train it: make train-tokenizers)")
            vocab[m] = tokenizers.load_text(root).get_vocab_size()
    try:
        return FourMConfig.sized(cfg.size, domains_in=inputs, domains_out=outputs, vocab_sizes=vocab,
                                 modality_modules=list(config.modalities), **cfg.model)
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


def _check_token_ids(batch: dict, vocab: dict) -> None:
    for m, d in batch.items():
        if m in vocab and d["tensor"].dtype != torch.float32:
            top = int(d["tensor"].max())
            if top >= vocab[m]:
                raise PretrainInputError(f"{m}: token id {top} outside its vocabulary of {vocab[m]} "
                                         f"(tokens made by another tokenizer?)")


def preflight(root, config: Config):
    """The model's settings, once every dataset's shards (or files), the tokenizers and a first batch of each
    dataset's token ids have been checked."""
    plans = plan_datasets(root, config)
    model_cfg = model_config(root, config)
    text = tokenizers.load_text(root)
    for name, loader in val_loaders(root, config, text, batch_size=2, workers=0, plans=plans).items():
        try:
            _check_token_ids(next(iter(loader)), model_cfg.vocab_sizes)
        except PretrainInputError as err:
            raise PretrainInputError(f"pretrain.datasets[{name}]: {err}" if name else str(err)) from None
    return model_cfg


def budgets(config: Config) -> tuple[int, int]:
    """(encoder, decoder) tokens per sample the model is run with: the largest of the datasets' budgets."""
    entries = config.pretrain.dataset_entries()
    return max(d.input_tokens for d in entries), max(d.target_tokens for d in entries)


def validate(model, loader, n_in: int, n_out: int, batches: int, device, prefix: str = "val_loss") -> dict:
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
    return {f"{prefix}.{m}": v / max(count, 1) for m, v in totals.items()}


class PretrainTask(TrainTask):
    """4M on the training loop: masked batches from DataLoader workers, per-modality losses, validation."""

    find_unused_parameters = True  # a batch whose masks give a modality no target leaves its head without a gradient

    def __init__(self, config: Config, root: str, model_config: dict, folder: Path):
        self.config, self.cfg, self.root, self.model_config = config, config.pretrain, root, model_config
        self.folder = folder
        self.tokenizer = tokenizers.load_text(root)
        self.val_loaders, self.budgets = {}, budgets(config)
        self.datasets = [d.name for d in config.pretrain.dataset_entries()]
        self.seen = torch.zeros(len(self.datasets), dtype=torch.long)  # samples per dataset, this rank, this run

    def build(self):
        model = FourM(FourMConfig(**self.model_config))
        model.activation_checkpointing = self.cfg.activation_checkpointing
        return model

    def parameter_groups(self, model):
        return parameter_groups(model, self.cfg.weight_decay)

    def fsdp_units(self, model):
        return [*model.encoder, *model.decoder]

    def batches(self, start, rank, world):
        local_batch = max(1, self.cfg.batch_size // world)
        plans = plan_datasets(self.root, self.config)
        loader = iter(make_loader(self.root, self.config, self.tokenizer, split="train", batch_size=local_batch,
                                  rank=rank, plans=plans))
        for _ in range(start):  # fast-forward: the batches this run trained on before it stopped
            next(loader)
        # every rank validates on the same batches, so a sharded model runs its collectives on all of them
        self.val_loaders = val_loaders(self.root, self.config, self.tokenizer, batch_size=local_batch, plans=plans)
        self.local_batch, self.world = local_batch, world
        return loader

    def forward(self, model, batch):
        groups = batch.pop(DATASET, {}).get("index")  # a mixture's batch: each sample's dataset
        if groups is None:
            loss, losses = model(batch, *self.budgets)
            return {"loss": loss, **{f"loss.{m}": v for m, v in losses.items()}}
        loss, losses, by_dataset = model(batch, *self.budgets, groups=groups)
        self.seen += torch.bincount(groups.cpu(), minlength=len(self.datasets))
        return {"loss": loss, **{f"loss.{m}": v for m, v in losses.items()},
                **{f"loss.{self.datasets[g]}.{m}": v for g, per in by_dataset.items() for m, v in per.items()}}

    def log_extras(self, model, done):
        seen = self.seen.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and len(self.datasets) > 1:
            seen = seen.to(next(model.parameters()).device)
            torch.distributed.all_reduce(seen)  # every rank's samples
        counts = {f"samples.{name}": int(n) for name, n in zip(self.datasets, seen.tolist())} \
            if len(self.datasets) > 1 else {}
        if done % self.cfg.val_every and done != self.cfg.steps:
            return counts
        device = next(model.parameters()).device
        for name, loader in self.val_loaders.items():
            counts.update(validate(model, loader, *self.budgets, self.cfg.val_batches, device,
                                   f"val_loss.{name}" if name else "val_loss"))
        return counts

    def checkpoint_extras(self):
        return {"steps": self.cfg.steps, "batch_size": self.local_batch * self.world,
                "tokens_per_sample": sum(self.budgets)}

    def settings(self):
        return {"pretrain": self.cfg.model_dump(), "model": self.model_config}

    def finish(self, model, resumed_at_end):
        model.save_pretrained(self.folder)


def loop_settings(config: Config, model, world: int, stop_after: int | None) -> LoopSettings:
    cfg = config.pretrain
    local_batch, (n_in, n_out) = max(1, cfg.batch_size // world), budgets(config)
    return LoopSettings(
        name="4M", steps=cfg.steps, warmup_steps=cfg.warmup_steps, peak_lr=cfg.base_lr * local_batch * world / 256,
        samples_per_step=local_batch * world, betas=tuple(cfg.betas), grad_clip=cfg.grad_clip,
        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, device=cfg.device,
        parallel=cfg.parallel, compile=cfg.compile, tokens_per_sample=n_in + n_out,
        flops_per_sample=flops_per_sample(model, n_in, n_out), stop_after=stop_after,
        wandb=config.wandb.model_dump())


def train_worker(args: dict, task_class=None) -> None:
    """Runs on every Ray Train worker; rank 0 writes checkpoints and metrics."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = args["config"] if isinstance(args["config"], Config) else Config(**args["config"])  # as the driver read it
    task = (task_class or PretrainTask)(config, args["root"], args["model_config"], run_of(args["folder"]).local)
    with torch.device("meta"):  # only its shape: FLOPs per sample
        shape = FourM(FourMConfig(**args["model_config"]))
    settings = loop_settings(config, shape, world, args.get("stop_after"))
    settings.run = remote_run(args["folder"])
    train_loop(task, settings, task.folder, rank, world)


def prediction_picture(root, config: Config, folder: Path, samples: int = 4) -> Path | None:
    """<run folder>/predictions.png: validation samples' RGB, their tokens decoded, and the trained model's
    prediction of every image modality from RGB alone (`folder`: the run's local copy)."""
    loader = make_loader(root, config, tokenizers.load_text(root), split="val", batch_size=samples, workers=0)
    batch = next(iter(loader))
    model = FourM.from_pretrained(folder)
    if model.cfg.pixels_input not in batch or not any(
            tokenizers.has_model(root, m) for m in batch if registry.domain(m).kind == "tokens"):
        return None  # nothing to predict from, or no tokenizer to decode with
    return draw_predictions(root, model, batch, folder / "predictions.png",
                            f"4M-{config.pretrain.size} after {config.pretrain.steps} steps: validation samples")


def run_pretrain(root: str | Path, config: Config, stop_after: int | None = None) -> dict:
    """Pretrain (or resume) 4M on the dataset at `root`; returns the summary."""
    cfg, layout = config.pretrain, DatasetLayout(root)
    run = RunFolder(layout.pretrain_dir)
    model_cfg = preflight(root, config)  # bad input fails here, before any worker starts
    world, use_gpu = world_for(config.ray, cfg.device, cfg.workers)
    folder = run.pull()  # the run's files so far, where this machine reads them
    args = {"root": absolute(layout.root), "folder": run, "config": config,
            "model_config": asdict(model_cfg), "stop_after": stop_after}
    fit(train_worker, args, name="pretrain-4m", folder=folder, run=run, world=world, use_gpu=use_gpu,
        cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures, modalities=config.modality_set,
        resource_wait_s=config.ray.resource_wait_s,
        in_process=cfg.workers == 0)
    if stop_after is not None and stop_after < cfg.steps:
        return {"stopped_at": run.checkpoint_step(), "steps": cfg.steps}
    if cfg.workers != 0:  # in process, the local copy is what was pushed; workers may be on other machines
        run.pull()
    log = folder / "metrics.jsonl"
    metrics = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    summary = {"steps": cfg.steps, "workers": world, "size": cfg.size, "final": metrics[-1] if metrics else {},
               "first": metrics[0] if metrics else {}}
    picture = prediction_picture(root, config, folder)
    summary["predictions"] = str(run.target / picture.name) if picture else None  # where the run lives
    if picture:  # beside the run's curves in TensorBoard
        run_log = RunLog(folder, wandb=config.wandb.model_dump(), name="4M")
        run_log.pictures([picture], cfg.steps)
        run_log.close()
    write_json(folder / "train.json", summary)
    run.push()  # the picture and its TensorBoard image
    run.push(("train.json",))  # the run's commit record, last
    run.release()
    return summary
