"""Training one tokenizer per modality: the WordPiece vocabulary, and the dense VQ-VAEs on Ray Train.

Consumes  <root>/caption/ and <root>/det/ (text), or <root>/<modality>/ shards committed by the download or
          label stage (rgb, depth, normal, semseg, clip)
Produces  <root>/tokenizers/<modality>/
              config.json, model.safetensors      the trained tokenizer (text: tokenizer.json)
              checkpoint/                         model and optimizer (safetensors) + state.json: the resume point
              metrics.jsonl                       loss, codebook usage, reconstruction metric, one line per log
              reconstructions.png                 inputs above their reconstructions
              train.json                          the summary, written last: the commit marker

A dense tokenizer trains data-parallel on the project's training loop (stages/training.py: Ray Train, one worker
per GPU, or CPU workers), with the paper's random-resized crops and flips, AdamW (0.9, 0.95), a linear warmup then
cosine decay, and autocast on GPUs. Samples are decoded and cropped in DataLoader worker processes. Every random
draw of a step is seeded by (seed, step, rank), and each step's batch by (seed, epoch, rank, loader slot), so a run
resumed from its checkpoint takes the same steps as one never stopped.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core import registry
from core.config import Config, QualityConfig, TokenizerStageConfig
from core.files import write_bytes, write_json
from core.pictures import figure_backend, save_figure
from core.registry import ModalitySet
from core.storage import DataPath, absolute
from models.text_tokenizer import train_text_tokenizer
from models.vqvae import (
    VQVAE,
    VQConfig,
    baseline_metric,
    codebook_usage,
    dead_code_threshold,
    reconstruction_metric,
    save_tokenizer,
    tokenizer_config,
)
from stages.dataset.shards import DatasetLayout
from stages.quality.filters import QualityFilterError, check_scored, dropped, filtering
from stages.run_folder import RunFolder, remote_run, run_of
from stages.tokenizers.dataset_tokenizers import convert_published, decode_tokens
from stages.tokenizers.tokenizer_data import center_crop, crop_to_tensor, random_crop, read_members, shard_samples
from stages.training import LoopSettings, TrainTask, data_loader, fit, train_loop, world_for


class TokenizerInputError(ValueError):
    """Missing or unusable input for a tokenizer: names the modality and what is missing."""


def tokenizer_dir(root: str | Path, modality: str) -> DataPath:
    return DatasetLayout(root).tokenizer_dir(modality)


def is_trained(root: str | Path, modality: str) -> bool:
    return (tokenizer_dir(root, modality) / "train.json").is_file()


def producing_stage(modality: str) -> str:
    return registry.get(modality).stage


def modality_shards(layout: DatasetLayout, modality: str) -> list[str]:
    shards = layout.committed_shards(producing_stage(modality))
    if not shards:
        raise TokenizerInputError(f"no committed {modality} shards under {layout.root} "
                                  f"(stage {producing_stage(modality)!r} has not run)")
    return shards


def model_config(cfg: TokenizerStageConfig, modality: str, layout: DatasetLayout | None = None) -> VQConfig:
    """The tokenizer's settings: the published architecture at the configured size, the configured codebook, a
    feature map's width read off the stored maps, and the dead-code threshold of the configured batch."""
    overrides = {"codebook_size": cfg.codebook_sizes[modality]} if modality in cfg.codebook_sizes else {}
    if registry.get(modality).channels_from_data and layout is not None:
        first = next((features for shard in modality_shards(layout, modality)
                      for _, features, _ in shard_samples(layout, modality, shard)), None)
        if first is not None:
            overrides["n_channels"] = int(first.shape[-1])
    settings = tokenizer_config(modality, cfg.size, **overrides)
    tokens = registry.get(modality).token_grid ** 2
    settings.threshold_ema_dead_code = dead_code_threshold(cfg.batch_size, tokens, settings.codebook_size)
    return settings


# -- the text tokenizer ------------------------------------------------------------------------------
def text_corpus(layout: DatasetLayout, modalities: ModalitySet, quality: QualityConfig | None = None) -> Iterator[str]:
    """Every sequence modality's texts (captions, then boxes as text), streamed shard by shard; the downloaded
    ones must be there, a labelled one is read where its labeler ran. The samples the quality filters drop are
    left out."""
    for modality in modalities.sequences():
        shards = modality_shards(layout, modality.name) if modality.downloaded else \
            layout.committed_shards(modality.stage)
        for shard in shards:
            drop = dropped(layout, shard, quality)
            for key, data in read_members(layout.tar(modality.folder, shard), modality.extension):
                if key not in drop:
                    yield modality.corpus_text(data)


def install_text(root: str | Path, source: str | Path) -> dict:
    """A published text tokenizer (the reference's `text_tokenizer_4m_wordpiece_30k.json`, which its 4M weights
    read captions and boxes with) as the dataset's text tokenizer, refused by token if its fixed ids differ."""
    from models.text_tokenizer import fixed_token_problems, load_text_tokenizer

    try:
        tokenizer = load_text_tokenizer(source)
    except Exception as err:  # noqa: BLE001 - any unreadable file is named
        raise TokenizerInputError(f"tokenizer.published.text = {str(source)!r}: not a tokenizers JSON file "
                                  f"({err})") from None
    problems = fixed_token_problems(tokenizer)
    if problems:
        raise TokenizerInputError(f"tokenizer.published.text = {str(source)!r}: not the reference's layout:\n  "
                                  + "\n  ".join(problems))
    folder = tokenizer_dir(root, registry.TEXT)
    write_bytes(folder / "tokenizer.json", Path(source).read_bytes())
    summary = {"modality": registry.TEXT, "converted_from": str(source), "vocab_size": tokenizer.get_vocab_size()}
    write_json(folder / "train.json", summary)  # last: the commit marker
    return summary


def quality_filters(layout: DatasetLayout, shards: list[str], cfg: QualityConfig | None) -> QualityConfig | None:
    """The quality thresholds whose rejects the tokenizers leave out (None where none is set), checked to be
    applicable to these shards before any work."""
    if cfg is None or not filtering(cfg):
        return None
    try:
        check_scored(layout, shards, cfg)
    except QualityFilterError as err:
        raise TokenizerInputError(str(err)) from None
    return cfg


def train_text(root: str | Path, cfg: TokenizerStageConfig, quality: QualityConfig | None = None) -> dict:
    layout, folder = DatasetLayout(root), tokenizer_dir(root, registry.TEXT)
    quality = quality_filters(layout, modality_shards(layout, registry.caption().name), quality) \
        if quality is not None and filtering(quality) else None
    counted = {"texts": 0}

    def corpus():
        for text in text_corpus(layout, cfg.modality_set, quality):
            counted["texts"] += 1
            yield text

    tokenizer = train_text_tokenizer(corpus(), cfg.vocab_size, folder / "tokenizer.json")
    summary = {"modality": registry.TEXT, "texts": counted["texts"], "vocab_size": tokenizer.get_vocab_size()}
    write_json(folder / "train.json", summary)
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
    loader_workers: int = 0  # DataLoader processes per training worker, at most one per shard it reads


def make_plan(layout: DatasetLayout, modality: str, cfg: TokenizerStageConfig, world: int,
              quality: QualityConfig | None = None) -> Plan:
    shards, stage = modality_shards(layout, modality), producing_stage(modality)
    samples = 0
    for shard in shards:
        drop = dropped(layout, shard, quality)  # the quality filters' rejects: not trained on
        samples += sum(r["status"] == "ok" and r["key"] not in drop
                       for r in layout.read_status(stage, shard, ["key", "status"]).to_pylist())
    if samples == 0:
        raise TokenizerInputError(f"no {modality} samples in {len(shards)} committed shards under {layout.root}")
    if len(shards) < world:
        raise TokenizerInputError(f"{modality}: {len(shards)} shards for {world} workers; use at most one worker "
                                  f"per shard (tokenizer.workers)")
    local_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, samples // (local_batch * world))
    epochs = cfg.epochs_by_modality.get(modality, cfg.epochs)
    return Plan(samples, world, local_batch, steps_per_epoch, max(1, round(epochs * steps_per_epoch)),
                round(cfg.warmup_epochs * steps_per_epoch), cfg.base_lr * local_batch * world / 256,
                min(cfg.loader_workers, len(shards) // world))


DECODED_KEPT_BYTES = 256 << 20  # per loader process: decoded shards that fit are kept for the next epochs
_decoded: dict[tuple[str, str, str], list] = {}


def decoded_samples(layout: DatasetLayout, modality: str, shard: str,
                    drop: frozenset[str] = frozenset()) -> Iterator[tuple[str, np.ndarray, tuple]]:
    """A shard's decoded samples, as `shard_samples` gives them. While the shards decoded so far fit in
    DECODED_KEPT_BYTES they are kept, so a small dataset (the demo's seven photos, a few per step, an epoch a
    step) is decoded once, not at every epoch; a large one streams as before. Each use gets its own copy."""
    files = [layout.tar(folder, shard) for folder in (registry.get(modality).folder, registry.photo().folder)]
    # keyed by the files' size and time: a rewritten shard is read anew
    where = (modality, drop, *((str(p), st.st_mtime_ns, st.st_size) for p in files for st in [p.stat()]))
    if where in _decoded:
        yield from ((key, label.copy(), size) for key, label, size in _decoded[where])
        return
    kept, used = [], sum(label.nbytes for samples in _decoded.values() for _, label, _ in samples)
    for key, label, size in shard_samples(layout, modality, shard, drop):
        if kept is not None and isinstance(label, np.ndarray) and used + label.nbytes <= DECODED_KEPT_BYTES:
            used += label.nbytes
            kept.append((key, label.copy(), size))
        else:
            kept = None
        yield key, label, size
    if kept is not None:
        _decoded[where] = kept


def sample_stream(root: str, modality: str, shards: list[str], crop_scale, seed: int, epoch: int, rank: int,
                  world: int, slot: int = 0, slots: int = 1, buffer: int = 256,
                  drops: dict[str, frozenset[str]] | None = None) -> Iterator[torch.Tensor]:
    """One endless stream of cropped samples for one epoch: this rank's shards (of an epoch-seeded order), split
    between the loader's `slots`, through a seeded shuffle buffer, cycling if the epoch asks for more."""
    layout, rng = DatasetLayout(root), np.random.default_rng([seed, epoch, rank, slot])
    order = [shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(shards))]
    mine, pool = order[rank::world][slot::slots], []
    drops = drops or {}  # shard -> the keys the quality filters drop
    while True:
        found = 0
        for shard in mine:
            for _, label, size in decoded_samples(layout, modality, shard, drops.get(shard, frozenset())):
                crop = random_crop(rng, *size, scale=crop_scale)
                x = crop_to_tensor(modality, label, crop, size)
                if x is not None:  # None: nothing to learn from in this sample (poses: no human in it)
                    pool.append(x)
                    found += 1
                if len(pool) >= buffer:
                    yield pool.pop(int(rng.integers(len(pool))))
        if not found:
            raise TokenizerInputError(f"{modality}: nothing to learn from in shards {mine} (every sample left out)")
        while pool:
            yield pool.pop(int(rng.integers(len(pool))))


class TokenizerBatches(torch.utils.data.IterableDataset):
    """A rank's batches from step `start` on, decoded and cropped in DataLoader workers.

    Step s belongs to slot s % slots and is the k-th batch of the (epoch, slot) stream, k counting that slot's
    earlier steps in the epoch: a step's batch depends on the step alone, not on where the run (re)started.
    The DataLoader takes its workers' batches in turn, so worker w serves the slot of step start + w."""

    def __init__(self, root: str, modality: str, shards: list[str], crop_scale, seed: int, rank: int, plan: Plan,
                 start: int, quality: QualityConfig | None = None):
        super().__init__()
        self.root, self.modality, self.shards, self.crop_scale = root, modality, shards, crop_scale
        self.seed, self.rank, self.plan, self.start, self.quality = seed, rank, plan, start, quality

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, slots = (info.id, info.num_workers) if info else (0, 1)
        plan, stream, stream_epoch = self.plan, None, None
        layout = DatasetLayout(self.root)  # the quality filters' rejects, read once for every epoch
        drops = {shard: dropped(layout, shard, self.quality) for shard in self.shards}
        for step in range(self.start + worker, plan.steps, slots):
            epoch = step // plan.steps_per_epoch
            if stream_epoch != epoch:
                stream, stream_epoch = sample_stream(self.root, self.modality, self.shards, self.crop_scale,
                                                     self.seed, epoch, self.rank, plan.world, step % slots,
                                                     slots, drops=drops), epoch
                first = epoch * plan.steps_per_epoch + (step - epoch * plan.steps_per_epoch) % slots
                for _ in range(len(range(first, step, slots)) * plan.local_batch):  # resume inside an epoch
                    next(stream)
            yield torch.stack([next(stream) for _ in range(plan.local_batch)])


def eval_batch(root: str, modality: str, shards: list[str], count: int,
               quality: QualityConfig | None = None) -> torch.Tensor:
    """The first samples, center-cropped: the same pictures at every evaluation (samples with nothing to learn
    from, a pose file without a human, left out)."""
    samples = []
    for shard in shards:
        for _, label, size in shard_samples(DatasetLayout(root), modality, shard,
                                            dropped(DatasetLayout(root), shard, quality)):
            x = crop_to_tensor(modality, label, center_crop(*size), size)
            samples += [] if x is None else [x]
            if len(samples) == count:
                return torch.stack(samples)
    if not samples:
        raise TokenizerInputError(f"{modality}: no sample to evaluate on in {len(shards)} shards (every one left "
                                  f"out: nothing to learn from)")
    return torch.stack(samples)


# -- pictures -----------------------------------------------------------------------------------------
def to_picture(modality: str, x: torch.Tensor) -> np.ndarray:
    """One input or reconstruction (C, H, W) -> an RGB picture in [0, 1] (the modality's `tensor_picture`)."""
    return registry.get(modality).tensor_picture(x)


def save_reconstructions(path: Path, modality: str, inputs, reconstructions, title: str) -> None:
    plt = figure_backend()
    n = len(inputs)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    fig.suptitle(title, fontsize=10)
    for i in range(n):
        for row, x in enumerate((inputs[i], reconstructions[i])):
            axes[row][i].imshow(to_picture(modality, x.cpu()), interpolation="nearest")
            axes[row][i].set_axis_off()
    axes[0][0].set_title("input", fontsize=9, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=9, loc="left")
    save_figure(fig, path, dpi=70)


# -- one worker's training loop ---------------------------------------------------------------------------
def evaluate(model, modality: str, batch: torch.Tensor, seed: int) -> dict:
    """Reconstructions of the evaluation batch (diffusion decoders: sampled from seeded noise, as users decode)
    and their metric, beside the trivial baseline's (each sample's mean, or its majority class), both in the
    tokenizer's own space (standardised depth, shifted class ids); the reconstructions in our form for pictures."""
    spec = registry.get(modality)
    model.eval()
    target = spec.reference_input(batch)
    ids = model.tokenize(target).flatten(1)
    decoded = decode_tokens(model, ids, [seed + i for i in range(len(ids))]).float()
    name, value = reconstruction_metric(modality, decoded, target)
    model.train()
    return {"metric": name, "value": value, "baseline": baseline_metric(modality, target, model.cfg.n_labels),
            "reconstruction": spec.on_input_scale(decoded, batch)}  # drawn on the inputs' scale


QUALITY_METRICS = ("psnr_db", "mean_angle_deg", "l1", "miou", "cosine")


def quality(modality: str, final: dict) -> dict:
    """A tokenizer's reconstruction metric beside what learning nothing scores (each sample's mean colour,
    depth, normal or feature, or its majority class), from its last logged metrics; {} before any evaluation."""
    name = next((k for k in QUALITY_METRICS if k in final), None)
    if name is None:
        return {}
    return {"metric": name, "value": final[name], "baseline": final.get(f"{name}_baseline"),
            "baseline_of": registry.get(modality).baseline_name}


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


class TokenizerTask(TrainTask):
    """A dense tokenizer on the training loop: cropped batches from DataLoader workers, codebook usage per log
    window, reconstructions of a fixed evaluation batch with their metric and picture."""

    def __init__(self, args: dict, rank: int):
        self.cfg, self.plan = args["cfg"], Plan(**args["plan"])
        self.mcfg = VQConfig(**args["model_config"])
        self.spec = registry.get(args["modality"])
        self.root, self.modality, self.folder, self.shards = args["root"], args["modality"], \
            run_of(args["folder"]).local, args["shards"]
        self.rank, self.window, self.evaluation = rank, [], None
        self.quality = args.get("quality")  # where its thresholds are set: the samples they drop are not trained on

    def build(self):
        return VQVAE(self.mcfg)

    def parameter_groups(self, model):
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # not the fixed position tables
        return [{"params": [p for n, p in trained if p.ndim >= 2], "weight_decay": self.cfg.weight_decay},
                {"params": [p for n, p in trained if p.ndim < 2], "weight_decay": 0.0}]

    def batches(self, start, rank, world):
        if rank == 0:
            self.evaluation = eval_batch(self.root, self.modality, self.shards, self.cfg.eval_samples, self.quality)
        crop_scale = self.spec.tokenizer.get("crop_scale", (0.8, 1.0))
        data = TokenizerBatches(self.root, self.modality, self.shards, crop_scale, self.cfg.seed, rank, self.plan, start,
                                self.quality)
        return iter(data_loader(data, self.plan.loader_workers, batch_size=None))

    def forward(self, model, batch):
        return model(self.spec.reference_input(batch), loss=self.spec.tokenizer["loss"])

    def observe(self, out):
        if self.rank == 0:
            self.window.append(out["ids"].detach().flatten().cpu())

    def _evaluate(self, model, done: int) -> dict:
        device = next(model.parameters()).device
        result = evaluate(model, self.modality, self.evaluation.to(device), self.cfg.seed)
        figures = {result["metric"]: result["value"], f"{result['metric']}_baseline": result["baseline"],
                   "eval_loss": self._eval_loss(model, device)}
        save_reconstructions(self.folder / "reconstructions.png", self.modality, self.evaluation,
                             result["reconstruction"].cpu(),
                             f"{self.modality} tokenizer, step {done}: {quality_line(self.modality, figures)}")
        return figures

    def _eval_loss(self, model, device) -> float:
        """The training loss on the fixed evaluation batch (center crops, seeded noise): a curve comparable from
        one evaluation to the next, where the training loss moves with every batch."""
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the run's own draws go on untouched
            torch.manual_seed(self.cfg.seed)
            model.eval()
            loss = model(self.spec.reference_input(self.evaluation.to(device)), loss=self.spec.tokenizer["loss"])["loss"]
            model.train()
        return float(loss)

    def log_extras(self, model, done):
        if self.rank != 0:
            return {}
        figures = {"epoch": round(done / self.plan.steps_per_epoch, 3),
                   **codebook_usage(torch.cat(self.window), self.mcfg.codebook_size),
                   "restarts": model.quantize.take_restarts()}  # in this log window
        self.window = []
        if done % self.cfg.eval_every == 0 or done == self.plan.steps:
            figures.update(self._evaluate(model, done))
        return figures

    def pictures(self):
        return [self.folder / "reconstructions.png"]

    def checkpoint_extras(self):
        return {"plan": asdict(self.plan)}

    def settings(self):
        return {"tokenizer": self.cfg.model_dump(), "model": asdict(self.mcfg), "plan": asdict(self.plan)}

    def finish(self, model, resumed_at_end):
        if resumed_at_end:  # resumed from the final checkpoint of a run stopped before it finished: record its metric
            with open(self.folder / "metrics.jsonl", "a") as log:
                log.write(json.dumps({"step": self.plan.steps, **self._evaluate(model, self.plan.steps)}) + "\n")
        save_tokenizer(model, self.folder)


def train_worker(args: dict) -> None:
    """Runs on every Ray Train worker; rank 0 writes checkpoints, metrics and pictures."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = TokenizerTask(args, rank)
    cfg, plan = task.cfg, task.plan
    settings = LoopSettings(name=task.modality, steps=plan.steps, warmup_steps=plan.warmup_steps, peak_lr=plan.lr,
                            samples_per_step=plan.local_batch * world, betas=(0.9, 0.95), log_every=cfg.log_every,
                            checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, device=cfg.device,
                            precision=task.spec.tokenizer.get("dtype", "float16"), stop_after=args.get("stop_after"),
                            wandb=args.get("wandb"), run=remote_run(args["folder"]))
    train_loop(task, settings, task.folder, rank, world)


def train_dense(root: str | Path, config: Config, modality: str, stop_after: int | None = None) -> dict:
    """Train (or resume) one dense tokenizer on Ray Train; returns its summary."""
    cfg, layout = config.tokenizer, DatasetLayout(root)
    run = RunFolder(layout.tokenizer_dir(modality))
    world, use_gpu = world_for(config.ray, cfg.device, cfg.workers)
    quality = quality_filters(layout, modality_shards(layout, modality), config.quality)
    plan = make_plan(layout, modality, cfg, world, quality)
    folder = run.pull()  # the run's files so far (a resumed run's metrics), where this machine reads them
    args = {"root": absolute(layout.root), "modality": modality, "folder": run,
            "cfg": cfg, "plan": asdict(plan), "model_config": asdict(model_config(cfg, modality, layout)),
            "shards": modality_shards(layout, modality), "stop_after": stop_after, "quality": quality,
            "wandb": config.wandb.model_dump()}
    fit(train_worker, args, name=f"tokenizer-{modality}", folder=folder, run=run, world=world, use_gpu=use_gpu,
        cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures, modalities=config.modality_set,
        resource_wait_s=config.ray.resource_wait_s,
        in_process=cfg.workers == 0)
    if stop_after is not None and stop_after < plan.steps:
        return {"modality": modality, "stopped_at": stop_after, "steps": plan.steps}
    if cfg.workers != 0:  # in process, the local copy is what was pushed; workers may be on other machines
        run.pull()
    log = folder / "metrics.jsonl"
    metrics = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    summary = {"modality": modality, "samples": plan.samples, "steps": plan.steps, "workers": world,
               "final": metrics[-1] if metrics else {}}
    write_json(folder / "train.json", summary)
    run.push(("train.json",))  # the commit record, after everything the workers pushed
    run.release()
    return summary


def run_train_tokenizers(root: str | Path, config: Config, modalities: list[str] | None = None,
                         observer=None) -> dict[str, dict]:
    """Every requested tokenizer not yet trained (or installed from `tokenizer.published`); a trained one
    (train.json present) is kept."""
    results = {}
    for modality in modalities or config.tokenizer.modalities:
        if is_trained(root, modality):
            results[modality] = {**json.loads((tokenizer_dir(root, modality) / "train.json").read_text()),
                                 "skipped": True}
        elif modality == registry.TEXT and modality in config.tokenizer.published:  # installed, not trained
            results[modality] = install_text(root, config.tokenizer.published[modality])
        elif modality == registry.TEXT:
            results[modality] = train_text(root, config.tokenizer, config.quality)
        elif modality in config.tokenizer.published:  # installed, not trained
            results[modality] = convert_published(config.tokenizer.published[modality], modality,
                                                  tokenizer_dir(root, modality))
        elif modality in {m.name for m in config.modality_set.tokenized()}:
            results[modality] = train_dense(root, config, modality)
        else:
            raise TokenizerInputError(f"no tokenizer for modality {modality!r}")
        if observer:
            observer(modality, results[modality])
    return results
