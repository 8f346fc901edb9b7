"""How full the label stage's batches are on web photos' mix of sizes: images per forward pass per labeler.

Each labeler batches only images of one model input size, and web photos come in many sizes. This replays
one shard's worth of `bench_label.mixed_sizes` through `models.labelers.SizeBuckets` with each labeler's own
input-size rule (paper settings), once grouping each decode chunk on its own (the stage's first version) and
once with buckets filled across chunks for several `label.batch_window`s. No model runs: it counts batches.

Run: python bench/batch_fill.py [--images 1000] [--batch-size 16] [--chunk 256]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_label import mixed_sizes  # noqa: E402
from models.labelers import SizeBuckets, load_labeler  # noqa: E402
from models.random_weights import save_random_models  # noqa: E402
from core import registry  # noqa: E402
from core.config import LabelConfig  # noqa: E402

LABELER_NAMES = [m.name for m in registry.ModalitySet().labelled()]


def images_per_batch(input_size, shapes, batch_size: int, window: int, chunk: int | None = None) -> float:
    """Mean images per batch; with `chunk`, every chunk is batched on its own (flushed at its end)."""
    batches, buckets = 0, SizeBuckets(input_size, batch_size, window)
    for i, shape in enumerate(shapes):
        batches += len(buckets.add(i, np.broadcast_to(np.uint8(0), shape)))  # a view: no pixels are made
        if chunk and (i + 1) % chunk == 0:
            batches += len(buckets.flush())
    batches += len(buckets.flush())
    return len(shapes) / batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="one shard (the paper profile's shard size)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--windows", default="128,256,512,1000")
    args = parser.parse_args()

    cfg = LabelConfig()
    options = {"semseg": {"short_side": cfg.semseg_short_side}, "clip": {"short_side": cfg.clip_short_side}}
    shapes = [(h, w, 3) for w, h in mixed_sizes(args.images)]
    windows = [int(w) for w in args.windows.split(",")]
    print(f"{args.images} images, batch {args.batch_size}; images per forward pass")
    print(f"{'labeler':8} {'sizes':>5} {'per chunk of ' + str(args.chunk):>18} " +
          " ".join(f"{'window ' + str(w):>12}" for w in windows))
    with tempfile.TemporaryDirectory() as tmp:  # tiny models: only their input-size rules are used
        paths = save_random_models(tmp, "tiny", list(LABELER_NAMES))
        for name in LABELER_NAMES:
            rule = load_labeler(name, paths[name], "cpu", args.batch_size, **options.get(name, {})).input_size
            distinct = len({rule(h, w) for h, w, _ in shapes})
            per_chunk = images_per_batch(rule, shapes, args.batch_size, args.images, args.chunk)
            filled = [images_per_batch(rule, shapes, args.batch_size, w) for w in windows]
            print(f"{name:8} {distinct:5} {per_chunk:18.1f} " + " ".join(f"{f:12.1f}" for f in filled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
