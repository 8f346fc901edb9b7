"""`make bench-quality`: images/s of the quality stage's scoring, and the near-duplicate search's time and memory.

Scoring: one worker's `score_shard` (read, decode, CLIP image and text, aesthetic MLP, watermark EfficientNet, write)
on a shard of the test photos resized to CC12M-like sizes, with random-weight networks of the real classes: `--size
tiny` (the demo's) or `paper` (ViT-B/32 for the image-text score and the embeddings, EfficientNet-B3 for watermarks;
the aesthetic MLP reads the ViT-B/32 embeddings here, as a random ViT-L/14 would only be slower). Per core on a CPU
(torch on one thread), per GPU where there is one.

Near-duplicates: `stages.quality.dedup` over --embeddings synthetic unit vectors of --dim dimensions (clusters of
near-copies planted, so pairs exist), each run in a fresh process for its peak memory (getrusage): k-means and the
comparisons within clusters, with plain torch (faiss is not used: see docs/benchmarks.md).

Run: python bench/bench_quality.py [--size tiny] [--images 64] [--embeddings 1000000] [--dim 512] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def write_shard(root: Path, images: int) -> None:
    import pyarrow as pa

    from stages.dataset.shards import DatasetLayout, ShardWriter
    from tests.helpers import QUALITY_PHOTOS, encode, photo

    rng = np.random.default_rng(0)
    keys = [f"{i:09d}" for i in range(images)]
    with ShardWriter(DatasetLayout(root), "download", "shard-000000", ["rgb", "caption"]) as writer:
        for i, key in enumerate(keys):
            longest = 768 if rng.random() < 0.75 else int(rng.integers(400, 768))
            ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2))))
            size = (longest, max(16, int(longest / ratio))) if ratio >= 1 else (max(16, int(longest * ratio)), longest)
            name = QUALITY_PHOTOS[i % len(QUALITY_PHOTOS)]
            writer.write(key, {"rgb": ("jpg", encode(photo(name).resize(size), quality=90)),
                               "caption": ("txt", f"a photo of a {name.replace('_', ' ')}".encode())})
        writer.commit(pa.table({"key": keys, "status": ["ok"] * images}), {"rows": images})


def score(size: str, images: int, device: str, batch_size: int) -> dict:
    import torch

    from core.config import QualityConfig
    from models.quality import save_random_quality_models
    from stages.quality.quality import QualityScorer, score_shard

    if device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(1)  # per core
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "data"
        write_shard(root, images)
        models = save_random_quality_models(Path(work) / "models", size)
        if size == "paper":  # the aesthetic MLP on the scoring CLIP's 512-d embeddings (see the docstring)
            from models.quality import AESTHETIC, AestheticMLP, save_quality_model

            save_quality_model(AestheticMLP(512), models["aesthetic"], {
                "kind": AESTHETIC, "input_dim": 512, "source": "random", "clip_model": models["image_text"],
                "clip_pretrained": None})
        cfg = QualityConfig(clip_model=models["image_text"], clip_pretrained=None, aesthetic_model=models["aesthetic"],
                            watermark_model=models["watermark"], device=device, batch_size=batch_size)
        scorer = QualityScorer(cfg)
        score_shard(str(root), "shard-000000", scorer, cfg)  # warm-up (and the first shard's lazy imports)
        (root / "_status" / "quality" / "shard-000000.json").unlink()
        started = time.perf_counter()
        stats = score_shard(str(root), "shard-000000", scorer, cfg)
        seconds = time.perf_counter() - started
    return {"size": size, "device": scorer.device, "images": stats["ok"], "seconds": round(seconds, 2),
            "images_per_s": round(stats["ok"] / seconds, 2)}


def near_duplicates(embeddings: int, dim: int, cluster_size: int) -> dict:
    """The search's own functions on synthetic embeddings: 2% of them near-copies of another."""
    import torch

    from stages.quality.dedup import FLOOR, earlier_neighbours, spherical_kmeans

    rng = np.random.default_rng(0)
    x = torch.empty((embeddings, dim), dtype=torch.float16)  # as the quality tables store them
    for start in range(0, embeddings, 100_000):  # made a block at a time: the peak is the search's, not ours
        block = torch.from_numpy(rng.standard_normal((min(100_000, embeddings - start), dim), dtype=np.float32))
        x[start:start + len(block)] = torch.nn.functional.normalize(block, dim=1).half()
    copies = torch.from_numpy(rng.choice(embeddings, embeddings // 50, replace=False))
    noise = torch.from_numpy(0.05 / np.sqrt(dim) * rng.standard_normal((len(copies), dim), dtype=np.float32))
    x[copies] = torch.nn.functional.normalize(x[(copies + 1) % embeddings].float() + noise, dim=1).half()
    started = time.perf_counter()
    assign = spherical_kmeans(x, max(1, embeddings // cluster_size))
    clustered = time.perf_counter()
    _, cosine = earlier_neighbours(x, assign)
    done = time.perf_counter()
    return {"embeddings": embeddings, "dim": dim, "clusters": int(assign.max()) + 1,
            "kmeans_s": round(clustered - started, 1), "pairs_s": round(done - clustered, 1),
            "pairs": int((cosine >= FLOOR).sum()), "planted": len(copies),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--embeddings", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--cluster-size", type=int, default=1000)
    parser.add_argument("--only", default="score,dedup", help="comma-separated: score, dedup")
    parser.add_argument("--dedup-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.dedup_only:
        print(json.dumps(near_duplicates(args.embeddings, args.dim, args.cluster_size)))
        return 0
    results = {}
    if "score" in args.only:
        results["score"] = score(args.size, args.images, args.device, args.batch_size)
        r = results["score"]
        print(f"scoring ({r['size']} networks, {r['device']}{', one thread' if r['device'] == 'cpu' else ''}): "
              f"{r['images']} images in {r['seconds']} s, {r['images_per_s']} images/s")
    if "dedup" in args.only:
        child = subprocess.run([sys.executable, __file__, "--dedup-only", "--embeddings", str(args.embeddings),
                                "--dim", str(args.dim), "--cluster-size", str(args.cluster_size)],
                               capture_output=True, text=True, check=True)
        r = results["dedup"] = json.loads(child.stdout)
        print(f"near-duplicates: {r['embeddings']:,} x {r['dim']} embeddings in {r['clusters']:,} clusters: k-means "
              f"{r['kmeans_s']} s, pairs within clusters {r['pairs_s']} s, {r['pairs']:,} at cosine >= 0.8 "
              f"({r['planted']:,} near-copies planted); peak {r['peak_rss_gib']} GiB")
    out = HERE / "_work" / "quality.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
