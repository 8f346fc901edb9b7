"""`make bench-transfer`: fine-tuning and evaluation throughput of a transfer model, and its data pipeline's.

Model: 4M-B's encoder (random weights) with the classification head at 224x224 and the segmentation head at
512x512: timed steps of forward, backward and AdamW (bf16 autocast on a GPU, fp32 on a CPU) in images/s, and
forward passes alone (evaluation) in images/s. Data: JPEGs of real photos written to --work as ImageNet class
folders and an ADE20K-layout folder, read, decoded and augmented with the paper's transforms by one process
(stages.transfer.transfer_data.TransferDataset): images/s per CPU core, and the share of each step the accelerator would
wait with `transfer.<task>.loader_workers` processes feeding it.

Run: python bench/bench_transfer.py [--batch 16] [--steps 5] [--device auto] [--workers 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from core.config import load_config  # noqa: E402
from models.fourm import FourMConfig  # noqa: E402
from models.transfer import FourMViT, TransferModel, make_head  # noqa: E402
from stages.training import device_for, keep_freed_arrays  # noqa: E402
from stages.transfer.transfer_data import TransferDataset, classification_samples, segmentation_samples  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(task: str, size: int, classes: int, args, device) -> dict:
    torch.manual_seed(0)
    backbone = FourMViT(FourMConfig.sized("B", domains_in=["rgb@224"], domains_out=[]), drop_path=0.1)
    model = TransferModel(backbone, make_head(task, backbone.embed_dim, classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    pixels = torch.randn(args.batch, 3, size, size, device=device)
    target = torch.randint(0, classes, (args.batch,) if task == "classification" else (args.batch, size, size),
                           device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(pixels).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(pixels)

    figures = {}
    for name, fn in (("train", step), ("eval", forward)):
        for _ in range(args.warmup):
            fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(device)
        figures[f"{name}_images_per_s"] = round(args.steps * args.batch / (time.perf_counter() - start), 2)
    return figures


def write_photos(work: Path, count: int) -> tuple[Path, Path]:
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    for i in range(count):
        image = Image.fromarray(photos[i % len(photos)]).resize((500, 375))  # ImageNet's typical size
        folder = work / "imagenet" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.jpg", quality=90)
        (work / "ade" / "images").mkdir(parents=True, exist_ok=True)
        (work / "ade" / "annotations").mkdir(parents=True, exist_ok=True)
        image.save(work / "ade" / "images" / f"{i}.jpg", quality=90)
        labels = (np.asarray(image).mean(-1) // 2).astype(np.uint8) % 151
        Image.fromarray(labels).save(work / "ade" / "annotations" / f"{i}.png")
    return work / "imagenet", work / "ade"


def bench_loader(task: str, samples: list, settings, count: int) -> float:
    """Images/s of one thread, as in a loader worker process (torch runs those on one thread, with the heap settings
    `stages.training.data_loader` gives its workers)."""
    keep_freed_arrays()
    data = TransferDataset(task, samples, True, settings.image_size, settings, 0)
    data[(0, 0)]  # first-call costs (imports) out of the timing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for i in range(count):
        data[(i, i % len(samples))]
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return count / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=8, help="loader processes per accelerator, for the wait share")
    parser.add_argument("--loader-images", type=int, default=64)
    parser.add_argument("--work", default=str(HERE / "_work" / "transfer"))
    args = parser.parse_args()
    device = device_for(args.device)
    work = Path(args.work)
    imagenet, ade = write_photos(work, 16)
    config = load_config("paper").transfer
    results = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
               "batch": args.batch}
    for task, size, classes, samples in (
            ("classification", 224, 1000, classification_samples(imagenet, [f"class{i}" for i in range(4)])),
            ("segmentation", 512, 150, segmentation_samples(ade, "training"))):
        model = bench_model(task, size, classes, args, device)
        per_core = bench_loader(task, samples, getattr(config, task), args.loader_images)
        wait = max(0.0, 1 - args.workers * per_core / model["train_images_per_s"])
        results[task] = {"size": size, **model, "loader_images_per_s_per_core": round(per_core, 1),
                         f"wait_share_with_{args.workers}_workers": round(wait, 3)}
        print(f"4M-B {task} at {size}x{size} on {results['device']}, batch {args.batch}: fine-tuning "
              f"{model['train_images_per_s']} images/s, evaluation {model['eval_images_per_s']} images/s; loader "
              f"{per_core:.1f} images/s per core (the accelerator waits {wait:.0%} of a step with {args.workers} "
              f"workers)")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
