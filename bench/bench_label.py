"""`make bench-label`: images/s of each labeler and of the whole label stage, and the GPU's busy fraction.

It writes rgb shards of real photos at CC12M-like sizes (longest side 768, mixed aspect ratios), saves
random-weight models (`--size paper`: the paper's model sizes; `tiny` for a quick run), then times what one
label worker does per shard (`stages.label.label.label_shard`: read, decode, every labeler, encode, write):
each labeler alone, then all of them sharing one decode. A decode-only pass shows whether decoding could
bound the stage. On a GPU, nvidia-smi is sampled every 100 ms for the busy fraction.

Image sizes: `--sizes mixed` (default) draws aspect ratios like web photos (common camera and screen ratios,
portrait and landscape, and random ones between 1:2 and 2:1; longest side 768, a quarter of them smaller),
so the models see many input sizes as they do on CC12M; `--sizes six` cycles through six sizes (the
benchmark's first version). Besides images/s it prints, per labeler, images per forward pass (how full the
batches of one input size are) and the share of the run the worker spent waiting for the device (high: the
device bounds the stage) or for decoding.

`--profile DIR` then labels one shard per labeler under torch.profiler and writes each labeler's busiest
operators (by device time on a GPU, by CPU time otherwise) to DIR/profile-<labeler>.txt, and on a GPU the
source lines where the host waited for the GPU (torch.cuda.set_sync_debug_mode) to DIR/syncs-<labeler>.txt:
each such wait stops the worker from queueing the next batch while the GPU runs this one.

Run: python bench/bench_label.py [--size paper] [--images 256] [--batch-size 16] [--device auto] [--profile DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from core import registry  # noqa: E402
from core.config import LabelConfig  # noqa: E402

LABELER_NAMES = [m.name for m in registry.ModalitySet().labelled()]
from stages.label.label import decode_rgb, label_shard, read_rgb  # noqa: E402
from stages.dataset.shards import DatasetLayout, ShardWriter  # noqa: E402

SIX_SIZES = [(768, 512), (512, 768), (768, 576), (768, 768), (768, 432), (600, 768)]  # (width, height)
COMMON_RATIOS = [4 / 3, 3 / 2, 16 / 9, 1.0, 5 / 4]  # width / height; each also drawn as a portrait


def mixed_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height)s like downloaded web photos: 70% common ratios, 30% anywhere between 1:2 and 2:1."""
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(n):
        ratio = rng.choice(COMMON_RATIOS) if rng.random() < 0.7 else float(np.exp(rng.uniform(np.log(0.5), np.log(2))))
        if rng.random() < 0.5:
            ratio = 1 / ratio
        longest = 768 if rng.random() < 0.75 else int(rng.integers(400, 768))
        width, height = (longest, longest / ratio) if ratio >= 1 else (longest * ratio, longest)
        sizes.append((int(round(width)), int(round(height))))
    return sizes


def make_rgb_shards(root: Path, n_images: int, shard_size: int, sizes: str) -> list[str]:
    import cv2
    import pyarrow as pa
    import skimage.data

    photos = [getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    size_of = mixed_sizes(n_images) if sizes == "mixed" else [SIX_SIZES[i % len(SIX_SIZES)] for i in range(n_images)]
    layout, shards = DatasetLayout(root), []
    for start in range(0, n_images, shard_size):
        shard = f"shard-{start // shard_size:06d}"
        keys = [f"{i:09d}" for i in range(start, min(start + shard_size, n_images))]
        with ShardWriter(layout, "download", shard, ["rgb"]) as writer:
            for key in keys:
                i = int(key)
                photo = cv2.resize(photos[i % len(photos)], size_of[i], interpolation=cv2.INTER_CUBIC)
                ok, jpeg = cv2.imencode(".jpg", photo[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                writer.write(key, {"rgb": ("jpg", jpeg.tobytes())})
            writer.commit(pa.table({"key": keys, "status": ["ok"] * len(keys)}), {"rows": len(keys)})
        shards.append(shard)
    return shards


class GpuSampler:
    """Mean GPU utilisation (%) from nvidia-smi while the block runs; None without a GPU."""

    def __init__(self):
        self.samples: list[float] = []
        self._proc = None

    def __enter__(self):
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            return self
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc):
        if self._proc:
            self._proc.terminate()
            self._proc.wait()

    @property
    def busy(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100, 3) if self.samples else None


def uncommit(root: Path, names) -> None:
    """Drop the labelers' commit markers, so that the next pass labels every shard again."""
    for name in names:
        for path in (root / "_status" / f"label_{name}").glob("*.json"):
            path.unlink()


def run(root: Path, shards: list[str], labelers: dict, cfg: LabelConfig) -> dict:
    """Label every shard; images/s, GPU busy, and per labeler images per batch and seconds waited."""
    import torch

    uncommit(root, labelers)
    stats = []
    with GpuSampler() as gpu:
        start = time.perf_counter()
        for shard in shards:
            stats.append(label_shard(str(root), shard, labelers, cfg))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    images = sum(next(iter(s.values()))["rows"] for s in stats)
    per = {name: {"images_per_batch": round(sum(s[name]["rows"] - s[name]["status_counts"].get("decode_error", 0)
                                                for s in stats) / sum(s[name]["batches"] for s in stats), 1),
                  "device_wait": round(sum(s[name]["device_wait_seconds"] for s in stats) / seconds, 3)}
           for name in labelers}
    decode_wait = sum(next(iter(s.values()))["decode_wait_seconds"] for s in stats) / seconds
    return {"images_per_s": round(images / seconds, 1), "gpu_busy": gpu.busy, "decode_wait": round(decode_wait, 3),
            "labelers": per}


def report(label: str, result: dict) -> str:
    line = f"{label:14} {result['images_per_s']:8.1f} images/s"
    if result["gpu_busy"] is not None:
        line += f"  GPU busy {result['gpu_busy']:4.0%}"
    batches = ", ".join(f"{n} {r['images_per_batch']}" for n, r in result["labelers"].items())
    waits = sum(r["device_wait"] for r in result["labelers"].values())
    return line + f"  images/batch: {batches}  waiting for the device {waits:.0%}, for decoding {result['decode_wait']:.0%}"


def profile_labelers(root: Path, shard: str, labelers: dict, cfg: LabelConfig, out: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and any(lab.device.type == "cuda" for lab in labelers.values())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for name, labeler in labelers.items():
        uncommit(root, [name])
        with profile(activities=activities) as prof:
            label_shard(str(root), shard, {name: labeler}, cfg)
        table = prof.key_averages().table(sort_by="self_device_time_total" if gpu else "self_cpu_time_total",
                                          row_limit=30)
        (out / f"profile-{name}.txt").write_text(table)
        print(f"profile of {name}: {out / f'profile-{name}.txt'}")
        if gpu:
            syncs = count_syncs(root, shard, {name: labeler}, cfg)
            lines = [f"{count:6d}  {where}" for where, count in syncs.most_common()]
            (out / f"syncs-{name}.txt").write_text("\n".join(lines) + "\n")
            print(f"{name}: {sum(syncs.values())} host waits for the GPU in one shard, at {len(syncs)} places")


def count_syncs(root: Path, shard: str, labelers: dict, cfg: LabelConfig) -> Counter:
    """Where the worker's thread waits for the GPU while labelling one shard: 'file:line' -> times."""
    import torch

    uncommit(root, labelers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            label_shard(str(root), shard, labelers, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-sizes", default="", help="per labeler, e.g. clip=64,semseg=32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", default="mixed", choices=["mixed", "six"])
    parser.add_argument("--window", type=int, default=512, help="label.batch_window")
    parser.add_argument("--profile", default=None, help="folder for torch.profiler tables, one per labeler")
    parser.add_argument("--labelers", default=",".join(LABELER_NAMES))
    parser.add_argument("--work", default=str(HERE / "_work" / "label"))
    args = parser.parse_args()

    import torch

    from models.labelers import load_labeler
    from models.random_weights import save_random_models

    work = Path(args.work)
    root = work / f"data-{args.sizes}-{args.images}"
    shards = make_rgb_shards(root, args.images, args.shard_size, args.sizes) if not (root / "rgb").is_dir() else \
        DatasetLayout(root).committed_shards("download")
    names = args.labelers.split(",")
    paths = save_random_models(work / f"models-{args.size}", args.size, names)
    cfg = LabelConfig(models=paths, device=args.device, batch_size=args.batch_size, chunk_size=128,
                      batch_window=args.window, decode_threads=8, det_min_score=0.6)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"{args.images} images in {len(shards)} shards, {args.size} models, batch {args.batch_size}, on {device}")

    # Decoding alone, with the stage's decode threads: the rate the models must stay below.
    items = [item for shard in shards for item in read_rgb(root / "rgb" / f"{shard}.tar")]
    start = time.perf_counter()
    with ThreadPoolExecutor(cfg.decode_threads) as pool:
        list(pool.map(lambda item: decode_rgb(item[1]), items))
    results = {"device": device, "size": args.size, "images": args.images, "batch_size": args.batch_size,
               "sizes": args.sizes, "batch_window": args.window,
               "decode_images_per_s": round(len(items) / (time.perf_counter() - start), 1), "labelers": {}}
    print(f"{'decode only':14} {results['decode_images_per_s']:8.1f} images/s ({cfg.decode_threads} threads)")

    options = {"det": {"min_score": cfg.det_min_score}}
    batch_sizes = {n: int(b) for n, b in (item.split("=") for item in args.batch_sizes.split(",") if item)}
    cfg = cfg.model_copy(update={"batch_sizes": batch_sizes})
    results["batch_sizes"] = {n: cfg.batch_size_of(n) for n in names}
    loaded = {n: load_labeler(n, paths[n], args.device, cfg.batch_size_of(n), **options.get(n, {})) for n in names}
    label_shard(str(root), shards[0], loaded, cfg)  # warm-up: cuDNN autotuning, allocator, lazy inits
    for name, labeler in loaded.items():
        results["labelers"][name] = run(root, shards, {name: labeler}, cfg)
        print(report(name, results["labelers"][name]))
    results["stage"] = run(root, shards, loaded, cfg)
    print(report("all labelers", results["stage"]))
    if args.profile:
        profile_labelers(root, shards[0], loaded, cfg, Path(args.profile))
    (work / f"results-{args.size}-{args.sizes}-{device.replace(' ', '_')}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
