"""`make bench-label`: images/s of each labeler and of the whole label stage, and the GPU's busy fraction.

It writes rgb shards of real photos at CC12M-like sizes (longest side 768, mixed aspect ratios), saves
random-weight models (`--size paper`: the paper's model sizes; `tiny` for a quick run), then times what one
label worker does per shard (`stages.label.label_shard`: read, decode, every labeler, encode, write):
each labeler alone, then all of them sharing one decode. A decode-only pass shows whether decoding could
bound the stage. On a GPU, nvidia-smi is sampled every 100 ms for the busy fraction.

Run: python bench/bench_label.py [--size paper] [--images 256] [--batch-size 16] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pipeline.config import LABELER_NAMES, LabelConfig  # noqa: E402
from stages.label import decode_rgb, label_shard, read_rgb  # noqa: E402
from stages.shards import DatasetLayout, ShardWriter  # noqa: E402

SIZES = [(768, 512), (512, 768), (768, 576), (768, 768), (768, 432), (600, 768)]  # (width, height)


def make_rgb_shards(root: Path, n_images: int, shard_size: int) -> list[str]:
    import cv2
    import pyarrow as pa
    import skimage.data

    photos = [getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    layout, shards = DatasetLayout(root), []
    for start in range(0, n_images, shard_size):
        shard = f"shard-{start // shard_size:06d}"
        keys = [f"{i:09d}" for i in range(start, min(start + shard_size, n_images))]
        with ShardWriter(layout, "download", shard, ["rgb"]) as writer:
            for key in keys:
                i = int(key)
                photo = cv2.resize(photos[i % len(photos)], SIZES[i % len(SIZES)], interpolation=cv2.INTER_CUBIC)
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


def run(root: Path, shards: list[str], labelers: dict, cfg: LabelConfig) -> tuple[float, float | None]:
    import torch

    for stage in {f"label_{n}" for n in labelers}:
        for path in (root / "_status" / stage).glob("*.json"):
            path.unlink()
    with GpuSampler() as gpu:
        start = time.perf_counter()
        for shard in shards:
            label_shard(str(root), shard, labelers, cfg)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, gpu.busy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--labelers", default=",".join(LABELER_NAMES))
    parser.add_argument("--work", default=str(HERE / "_work" / "label"))
    args = parser.parse_args()

    import torch

    from models.labelers import load_labeler
    from models.random_weights import save_random_models

    work = Path(args.work)
    root = work / f"data-{args.images}"
    shards = make_rgb_shards(root, args.images, args.shard_size) if not (root / "rgb").is_dir() else \
        DatasetLayout(root).committed_shards("download")
    names = args.labelers.split(",")
    paths = save_random_models(work / f"models-{args.size}", args.size, names)
    cfg = LabelConfig(models=paths, device=args.device, batch_size=args.batch_size, chunk_size=128,
                      decode_threads=8, det_min_score=0.6)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"{args.images} images in {len(shards)} shards, {args.size} models, batch {args.batch_size}, on {device}")

    # Decoding alone, with the stage's decode threads: the rate the models must stay below.
    items = [item for shard in shards for item in read_rgb(root / "rgb" / f"{shard}.tar")]
    start = time.perf_counter()
    with ThreadPoolExecutor(cfg.decode_threads) as pool:
        list(pool.map(lambda item: decode_rgb(item[1]), items))
    results = {"device": device, "size": args.size, "images": args.images, "batch_size": args.batch_size,
               "decode_images_per_s": round(len(items) / (time.perf_counter() - start), 1), "labelers": {}}
    print(f"{'decode only':14} {results['decode_images_per_s']:8.1f} images/s ({cfg.decode_threads} threads)")

    options = {"det": {"min_score": cfg.det_min_score}}
    loaded = {n: load_labeler(n, paths[n], args.device, args.batch_size, **options.get(n, {})) for n in names}
    label_shard(str(root), shards[0], loaded, cfg)  # warm-up: cuDNN autotuning, allocator, lazy inits
    for name, labeler in loaded.items():
        seconds, busy = run(root, shards, {name: labeler}, cfg)
        results["labelers"][name] = {"images_per_s": round(args.images / seconds, 1), "gpu_busy": busy}
        print(f"{name:14} {args.images / seconds:8.1f} images/s" + (f"  GPU busy {busy:.0%}" if busy else ""))
    seconds, busy = run(root, shards, loaded, cfg)
    results["stage"] = {"images_per_s": round(args.images / seconds, 1), "gpu_busy": busy}
    print(f"{'all labelers':14} {args.images / seconds:8.1f} images/s" + (f"  GPU busy {busy:.0%}" if busy else ""))
    (work / f"results-{args.size}-{device.replace(' ', '_')}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
