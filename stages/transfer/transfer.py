"""Transfer evaluation: fine-tune a backbone (4M's encoder, or a timm model as the baseline) with a task head on
classification, semantic segmentation or depth, on the project's training loop and Ray Train.

Consumes  --train DIR, --val DIR   local copies of ImageNet-1K, ADE20K or NYUv2 (stages/transfer/transfer_data.py)
          --model DIR              a pretraining run or a converted reference checkpoint (or a timm checkpoint)
Produces  <out>/
              transfer.json, model.safetensors   the fine-tuned model and what it is (task, backbone, classes)
              checkpoint/                        model, optimizer and state.json: the resume point
              metrics.jsonl                      loss and lr per log; validation metrics per evaluation
              results.json                       the final validation metrics beside the paper's, written last

One step: a batch augmented in DataLoader workers (each sample seeded by its position in the run), the model
under bf16 autocast on GPUs, AdamW with timm's layer-wise learning-rate decay (each backbone block's rate
scaled by decay^(depth - block)), warmup then cosine. Classification mixes batches with timm's mixup and cutmix
and smoothed labels; a linear probe freezes the backbone.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.files import save_model_safetensors, write_json
from core.storage import DataPath, absolute, data_path
from models.metrics import IGNORE, confusion, segmentation_scores  # noqa: F401 - IGNORE: the datasets' too
from models.transfer import BackboneError, TransferModel, make_backbone, make_head
from stages.run_folder import RunFolder, remote_run, run_of
from stages.training import LoopSettings, TrainTask, data_loader, fit, train_loop, world_for
from stages.transfer.transfer_data import (
    RunOrder,
    TransferDataset,
    TransferInputError,
    class_folders,
    classification_samples,
    depth_samples,
    model_input,
    model_target,
    read_annotation,
    read_depth,
    segmentation_samples,
)

TASKS = ("classification", "segmentation", "depth")
PAPER = {  # Table 1 of the paper: the same model size fine-tuned by the paper's recipes
    "classification": {"metric": "top1", "4M-B": 84.5, "4M-L": 86.6, "MAE-B": 84.2, "MAE-L": 86.8},
    "segmentation": {"metric": "miou", "4M-B": 50.1, "4M-L": 53.4, "MAE-B": 46.1, "MAE-L": 51.8},
    "depth": {"metric": "delta1", "4M-B": 92.0, "4M-L": 94.4, "MAE-B": 89.1, "MAE-L": 93.6},
}


# -- metrics --------------------------------------------------------------------------------------------------------
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(1).sum()) for k in ks}


def depth_sums(prediction: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per batch: [pixels, within 1.25x, sum of |d - t| / t, sum of (d - t)^2] over measured pixels (t > 0)."""
    valid = target > 0
    d, t = prediction[valid].float().clamp(min=1e-3), target[valid].float()
    ratio = torch.maximum(d / t, t / d)
    return np.array([valid.sum().item(), (ratio < 1.25).sum().item(), ((d - t).abs() / t).sum().item(),
                     ((d - t) ** 2).sum().item()])


def depth_scores(sums: np.ndarray) -> dict:
    n = max(sums[0], 1)
    return {"delta1": float(sums[1] / n * 100), "abs_rel": float(sums[2] / n), "rmse": float(np.sqrt(sums[3] / n))}


def task_loss(task: str, out: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The task's training loss: cross-entropy over classes (or pixels' classes), L1 over pixels with a depth."""
    if task == "classification":
        return F.cross_entropy(out, target, label_smoothing=label_smoothing)
    if task == "segmentation":
        return F.cross_entropy(out, target, ignore_index=IGNORE)
    valid = target > 0
    return (out[:, 0] - target).abs()[valid].mean() if valid.any() else out.sum() * 0


@torch.no_grad()
def evaluate(model, task: str, loader, classes: int, device) -> dict:
    """The task's validation metrics over the whole loader, with its loss (no smoothing, no mixing)."""
    model.eval()
    totals, count, matrix, sums = {1: 0, 5: 0}, 0, torch.zeros(classes, classes, dtype=torch.long), np.zeros(4)
    losses = []
    for pixels, target in loader:
        pixels, target = model_input(pixels.to(device)), model_target(target.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(pixels).float()
        losses.append(float(task_loss(task, out, target)))
        if task == "classification":
            for k, v in topk_correct(out, target).items():
                totals[k] += v
            count += len(target)
        elif task == "segmentation":
            matrix += confusion(out.argmax(1), target, classes)
        else:
            sums += depth_sums(out[:, 0], target)
    model.train()
    loss = {"loss": float(np.mean(losses))} if losses else {}
    if task == "classification":
        return {"top1": totals[1] / max(count, 1) * 100, "top5": totals[5] / max(count, 1) * 100, **loss}
    return {**(segmentation_scores(matrix) if task == "segmentation" else depth_scores(sums)), **loss}


# -- the plan -------------------------------------------------------------------------------------------------------
@dataclass
class TransferPlan:
    task: str
    train: str
    val: str
    model: str | None
    backbone: str
    classes: int
    class_names: list
    samples: int
    local_batch: int
    steps_per_epoch: int
    steps: int
    warmup_steps: int
    lr: float


def task_settings(config, task: str):
    if task not in TASKS:
        raise TransferInputError(f"unknown transfer task {task!r} (known: {', '.join(TASKS)})")
    return getattr(config.transfer, task)


def samples_of(task: str, folder, split: str, settings, class_names=None) -> list:
    if task == "classification":
        return classification_samples(Path(folder), class_names)
    if task == "segmentation":
        return segmentation_samples(Path(folder), split)
    return depth_samples(Path(folder))


def check_labels(task: str, samples: list, settings) -> None:
    """Read every label once before training: a wrong size or an id beyond the head fails here, naming the file."""
    from PIL import Image

    for image, label in samples if task != "classification" else []:
        with Image.open(image) as opened:
            size = (opened.height, opened.width)
        read_annotation(label, size, settings.classes) if task == "segmentation" \
            else read_depth(label, size, settings.depth_scale)


def make_transfer_plan(task: str, train, val, model, backbone, config, world: int) -> TransferPlan:
    """Every dataset and label checked, the backbone loadable, the schedule in steps."""
    s = task_settings(config, task)
    make_backbone(model, backbone, 0.0, s.image_size)  # a missing or unusable backbone fails here, first
    names = class_folders(Path(train)) if task == "classification" else []
    train_samples = samples_of(task, train, "training", s, names)
    val_samples = samples_of(task, val, "validation", s, names)
    check_labels(task, train_samples + val_samples, s)
    classes = len(names) if task == "classification" else s.classes if task == "segmentation" else 1
    local_batch = max(1, s.batch_size // world)
    per_epoch = max(1, len(train_samples) // (local_batch * world))
    return TransferPlan(task, str(Path(train).resolve()), str(Path(val).resolve()),
                        str(absolute(data_path(model))) if model else None, backbone or "fourm", classes, names,
                        len(train_samples), local_batch, per_epoch, max(1, round(s.epochs * per_epoch)),
                        round(s.warmup_epochs * per_epoch), s.base_lr * local_batch * world / 256)


# -- the task on the training loop ----------------------------------------------------------------------------------
class TransferTask(TrainTask):
    def __init__(self, plan: TransferPlan, settings, folder: Path, seed: int, rank: int):
        self.plan, self.s, self.folder, self.seed, self.rank = plan, settings, folder, seed, rank
        self.mixup = None
        if plan.task == "classification" and (settings.mixup or settings.cutmix):
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix,
                               label_smoothing=settings.label_smoothing, num_classes=plan.classes)

    def build(self):
        backbone = make_backbone(self.plan.model, self.plan.backbone, self.s.drop_path, self.s.image_size)
        if self.s.linear_probe:
            backbone.requires_grad_(False)
        return TransferModel(backbone, make_head(self.plan.task, backbone.embed_dim, self.plan.classes))

    def parameter_groups(self, model):
        from timm.optim import param_groups_layer_decay

        # timm's groups: no decay on 1-d parameters, lr_scale = layer_decay^(blocks + 1 - layer); the head at 1
        return param_groups_layer_decay(model, weight_decay=self.s.weight_decay, layer_decay=self.s.layer_decay,
                                        no_weight_decay_list=model.no_weight_decay())

    def _loader(self, split: str, start: int = 0, rank: int = 0, world: int = 1):
        plan, s = self.plan, self.s
        names = plan.class_names or None
        samples = samples_of(plan.task, plan.train if split == "train" else plan.val,
                             "training" if split == "train" else "validation", s, names)
        data = TransferDataset(plan.task, samples, split == "train", s.image_size, s, self.seed)
        if split == "train":
            order = RunOrder(len(samples), plan.local_batch, start, plan.steps, self.seed, rank, world)
            return data_loader(data, s.loader_workers, batch_size=plan.local_batch, sampler=order)
        return data_loader(data, s.loader_workers, batch_size=plan.local_batch)

    def batches(self, start, rank, world):
        self.val_loader = self._loader("val") if rank == 0 else None
        return iter(self._loader("train", start, rank, world))

    def forward(self, model, batch):
        pixels, target = batch
        pixels, target = model_input(pixels), model_target(target)
        if self.plan.task == "classification":
            if self.mixup is not None:
                np.random.seed(torch.initial_seed() % 2 ** 32)  # the step's seed: mixup draws from numpy
                pixels, soft = self.mixup(pixels, target)
                out = model(pixels)
                return {"loss": torch.sum(-soft * F.log_softmax(out.float(), dim=-1), dim=-1).mean()}
        return {"loss": task_loss(self.plan.task, model(pixels).float(), target, self.s.label_smoothing)}

    def log_extras(self, model, done):
        if self.rank != 0 or (done % self.s.eval_every and done != self.plan.steps):
            return {}
        scores = evaluate(model, self.plan.task, self.val_loader, self.plan.classes, next(model.parameters()).device)
        return {f"val_{k}": v for k, v in scores.items()}

    def checkpoint_extras(self):
        return {"plan": asdict(self.plan)}

    def settings(self):
        return {"transfer": self.s.model_dump(), "plan": asdict(self.plan)}

    def finish(self, model, resumed_at_end):
        save_model_safetensors(model, self.folder / "model.safetensors")
        (self.folder / "transfer.json").write_text(json.dumps(
            {"plan": asdict(self.plan), "settings": self.s.model_dump()}, indent=1))


def train_worker(args: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config, plan = args["config"], TransferPlan(**args["plan"])
    s = task_settings(config, plan.task)
    task = TransferTask(plan, s, run_of(args["folder"]).local, config.transfer.seed, rank)
    settings = LoopSettings(name=f"transfer {plan.task}", steps=plan.steps, warmup_steps=plan.warmup_steps,
                            peak_lr=plan.lr, samples_per_step=plan.local_batch * world, betas=tuple(s.betas),
                            log_every=config.transfer.log_every, checkpoint_every=config.transfer.checkpoint_every,
                            seed=config.transfer.seed, device=config.transfer.device,
                            stop_after=args.get("stop_after"), wandb=config.wandb.model_dump(),
                            run=remote_run(args["folder"]))
    train_loop(task, settings, task.folder, rank, world)


def default_out(task: str, model: str | None, backbone: str | None) -> DataPath:
    if backbone in (None, "fourm"):
        if model is None:

            raise BackboneError("a 4M backbone needs --model DIR (a finished pretraining run or a convert-4m folder)")
        return data_path(model) / f"transfer-{task}"
    return Path("runs") / f"transfer-{task}-{backbone.removeprefix('timm:').replace('/', '_')}"


def run_transfer(task: str, train, val, config, model: str | None = None, backbone: str | None = None,
                 out: str | Path | None = None, stop_after: int | None = None) -> dict:
    """Fine-tune (or resume) and score on the validation set; returns the results."""
    cfg = config.transfer
    run = RunFolder(out if out else default_out(task, model, backbone))
    world, use_gpu = world_for(config.ray, cfg.device, cfg.workers)
    plan = make_transfer_plan(task, train, val, model, backbone, config, world)  # bad input fails here
    folder = run.pull()  # the run's files so far, where this machine reads them
    args = {"config": config, "plan": asdict(plan), "folder": run,
            "stop_after": stop_after}
    fit(train_worker, args, name=f"transfer-{task}", folder=folder, run=run, world=world, use_gpu=use_gpu,
        cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures, modalities=config.modality_set,
        resource_wait_s=config.ray.resource_wait_s,
        in_process=cfg.workers == 0)
    if stop_after is not None and stop_after < plan.steps:
        return {"stopped_at": stop_after, "steps": plan.steps}
    if cfg.workers != 0:  # in process, the local copy is what was pushed; workers may be on other machines
        run.pull()
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    final = next(line for line in reversed(log) if any(k.startswith("val_") for k in line))
    paper = PAPER[task]
    results = {"task": task, "backbone": plan.backbone, "model": plan.model, "steps": plan.steps,
               "samples": plan.samples, "metrics": {k[4:]: v for k, v in final.items() if k.startswith("val_")},
               "paper": paper, "folder": str(run.target)}
    write_json(folder / "results.json", results)
    run.push(("results.json",))  # last: what `status` reads as a finished transfer
    run.release()
    return results
