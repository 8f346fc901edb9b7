"""Fit an open_clip CLIP to captioned photos on the project's one training loop (contrastive: open_clip's ClipLoss).

Consumes  a CLIP folder in open_clip's layout (models/quality.py: open_clip_config.json + open_clip_model.safetensors)
          and (photo file, caption) pairs
Produces  the fitted CLIP in that folder (with fitted.json: steps, captions), replaced whole once the last step is
          done; the run's metrics.jsonl, TensorBoard events and checkpoint in <folder>-fit/ (a rerun resumes there)

What a real CLIP brings from its web-scale training, photos brought together with the captions that describe them,
a tiny one gets here from a handful of pairs: the demo fits its random-weight CLIP to its photos' true captions, so
that the caption of another photo, listed with one of them, scores low and is filtered. Each worker contrasts the
pairs of its own batch (no gathering across workers): enough for fitting, not a recipe for pretraining a CLIP.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from core.files import swap_folder
from stages.training import LoopSettings, TrainTask, fit, train_loop, world_for

FITTED = "fitted.json"  # in the model folder, beside the weights it describes


class ClipFitTask(TrainTask):
    def __init__(self, args: dict):
        from PIL import Image

        from models.quality import load_clip

        self.folder, self.args = Path(args["model"]), args
        _, preprocess, tokenizer = load_clip(str(self.folder), None, "cpu")
        pairs = args["pairs"]
        self.images = torch.stack([preprocess(Image.open(path).convert("RGB")) for path, _ in pairs])
        self.texts = tokenizer([caption for _, caption in pairs])

    def build(self):
        from models.quality import load_clip

        return load_clip(str(self.folder), None, "cpu")[0].train()

    def parameter_groups(self, model):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.1}]

    def batches(self, start, rank, world):
        n, size = len(self.images), self.args["batch_size"]
        for step in range(start, 1 << 62):  # pairs in a fixed order, batch after batch: a resumed run takes the same
            first = (step * world + rank) * size
            rows = [(first + i) % n for i in range(min(size, n))]
            yield self.images[rows], self.texts[rows]

    def forward(self, model, batch):
        import open_clip

        images, texts = batch
        image_features, text_features, logit_scale = model(images, texts)[:3]
        return {"loss": open_clip.ClipLoss()(image_features, text_features, logit_scale),
                "logit_scale": logit_scale.detach()}

    def settings(self):
        return {"clip_fit": {"pairs": len(self.args["pairs"]), "batch_size": self.args["batch_size"]}}

    def finish(self, model, resumed_at_end):
        from models.quality import save_clip

        # Written aside, then swapped in: a scorer never reads half a model
        config = json.loads((self.folder / "open_clip_config.json").read_text())["model_cfg"]
        aside = self.folder.with_name(self.folder.name + ".fitted")
        shutil.rmtree(aside, ignore_errors=True)
        save_clip(model.eval(), config, aside)
        (aside / FITTED).write_text(json.dumps({"steps": self.args["steps"], "pairs": len(self.args["pairs"]),
                                                "captions": [caption for _, caption in self.args["pairs"]]}))
        for extra in self.folder.iterdir():  # what sat beside the weights (the random-weights marker) stays
            if not (aside / extra.name).exists():
                shutil.copy2(extra, aside / extra.name)
        swap_folder(aside, self.folder)


def fit_worker(args: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = ClipFitTask(args)
    settings = LoopSettings(name="clip fit", steps=args["steps"], warmup_steps=max(1, args["steps"] // 10),
                            peak_lr=args["lr"], samples_per_step=min(args["batch_size"], len(args["pairs"])) * world,
                            log_every=args["steps"], checkpoint_every=args["steps"], seed=args["seed"],
                            device=args["device"])
    train_loop(task, settings, Path(args["run"]), rank, world)


def run_folder(model: str | Path) -> Path:
    model = Path(model).resolve()
    return model.with_name(model.name + "-fit")


def is_fitted(model: str | Path, steps: int) -> bool:
    """Whether the CLIP in `model` is one fitted for `steps` steps (the record swapped in with its weights)."""
    record = Path(model) / FITTED
    return record.is_file() and json.loads(record.read_text()).get("steps", 0) >= steps


def fit_clip(model: str | Path, pairs: list[tuple[str, str]], config, *, steps: int = 200, lr: float = 1e-3,
             batch_size: int = 64, seed: int = 0, workers: int | None = 0) -> Path:
    """Fit the CLIP in the folder `model` to `pairs` (photo file, caption) for `steps` steps; returns its run
    folder (<model>-fit). workers=0: one trainer in this process."""
    if len(pairs) < 2:
        raise ValueError(f"fitting a CLIP contrasts pairs with each other: {len(pairs)} pair(s) given")
    model, run = Path(model).resolve(), run_folder(model)
    run.mkdir(parents=True, exist_ok=True)
    device = config.quality.device
    world, use_gpu = world_for(config.ray, device, workers)
    args = {"model": str(model), "pairs": [(str(Path(p).resolve()), c) for p, c in pairs], "run": str(run),
            "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
            "device": "cpu" if device == "cpu" else "auto"}
    fit(fit_worker, args, name=f"clip-fit-{model.name}", folder=run, world=world, use_gpu=use_gpu,
        cpus_per_worker=config.quality.cpus_per_worker, max_failures=0, modalities=config.modality_set,
        resource_wait_s=config.ray.resource_wait_s, in_process=workers == 0)
    return run
