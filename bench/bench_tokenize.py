"""`make bench-tokenize`: samples/s each tokenizer encodes in the tokenize stage, against its encoder alone.

It writes rgb shards of real photos at CC12M-like sizes and label shards of the same sizes (depth, normals,
segmentation, CLIP maps of 512 features), saves random-weight tokenizers (`--size paper`: ViT-B encoders as
in the paper; `tiny` for a quick run), then times what one tokenize worker does per shard
(`stages.tokenizers.tokenize.tokenize_shard`: read, decode, crop, encode, write) for each modality, and the encoder alone
on the same number of crops. stage/encoder near 1 means the encoder bounds the stage. On a GPU, nvidia-smi
is sampled for the busy fraction.

The tokenizers have the published ones' architecture (`--size paper`: ViT-B encoders, the patched UNet, as
`convert-tokenizer` installs them). It also times decoding `--decode-samples` samples (diffusion decoders: 25
DDIM steps from noise).

Run: python bench/bench_tokenize.py [--size paper] [--images 64] [--crops 4] [--decode-samples 2] [--device auto]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_label import GpuSampler, make_rgb_shards  # noqa: E402

from core.config import TokenizerStageConfig  # noqa: E402
from stages.dataset.shards import DatasetLayout, ShardWriter  # noqa: E402
from stages.tokenizers.tokenizer_data import rgb_index  # noqa: E402

MODALITIES = ("rgb", "depth", "normal", "semseg", "clip")


def make_label_shards(root: Path, shards: list[str]) -> None:
    """Labels of the right formats and sizes for every rgb image (smooth fields, not model outputs)."""
    import cv2
    import pyarrow as pa

    layout = DatasetLayout(root)
    for shard in shards:
        index = rgb_index(layout, shard)
        keys, sizes = index.keys, index.sizes
        for modality in ("depth", "normal", "semseg", "clip"):
            with ShardWriter(layout, f"label_{modality}", shard, [modality]) as writer:
                for key in keys:
                    h, w = sizes[key]
                    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
                    if modality == "depth":
                        data = cv2.imencode(".png", ((xx + yy) / (h + w) * 65535).astype(np.uint16))[1].tobytes()
                    elif modality == "normal":
                        field = np.stack([xx / w, yy / h, np.full_like(xx, 0.8)], -1)
                        data = cv2.imencode(".png", (field * 255).astype(np.uint8))[1].tobytes()
                    elif modality == "semseg":
                        data = cv2.imencode(".png", ((xx // 64 + yy // 64) % 133).astype(np.uint8))[1].tobytes()
                    else:
                        scale = 224 / min(h, w)
                        grid = (max(1, round(h * scale / 16)), max(1, round(w * scale / 16)), 512)
                        buf = io.BytesIO()
                        np.save(buf, np.random.default_rng(int(key)).standard_normal(grid).astype(np.float16))
                        data = buf.getvalue()
                    writer.write(key, {modality: ("npy" if modality == "clip" else "png", data)})
                writer.commit(pa.table({"key": keys, "status": ["ok"] * len(keys)}), {"rows": len(keys)})


def main() -> int:
    import torch

    from core import registry
    from models.vqvae import VQVAE, save_tokenizer
    from stages.tokenizers import dataset_tokenizers as tokenizers
    from stages.tokenizers.tokenize import tokenize_shard
    from stages.tokenizers.train_tokenizer import model_config, tokenizer_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="paper", choices=["paper", "tiny"])
    parser.add_argument("--decode-samples", type=int, default=2)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--crops", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default=str(HERE / "_work" / "tokenize"))
    args = parser.parse_args()

    root = Path(args.work)
    if not (root / "_status/download").is_dir():
        shards = make_rgb_shards(root, args.images, shard_size=max(1, args.images // 2), sizes="mixed")
        make_label_shards(root, shards)
    shards = DatasetLayout(root).committed_shards("download")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg = TokenizerStageConfig(size=args.size, n_crops=args.crops, tokenize_batch_size=args.batch_size,
                               device=str(device))
    layout, results = DatasetLayout(root), {}
    for modality in MODALITIES:
        folder = tokenizer_dir(root, modality)
        save_tokenizer(VQVAE(model_config(cfg, modality, layout)), folder)
        model = tokenizers.load_folder(folder, modality, device)
        tokenize_shard(layout, shards[0], modality, model, cfg, device)  # warm-up: allocator, kernels
        with GpuSampler() as gpu:
            started = time.perf_counter()
            samples = sum(tokenize_shard(layout, s, modality, model, cfg, device)["ok"] for s in shards)
            if device.type == "cuda":
                torch.cuda.synchronize()
            stage_seconds = time.perf_counter() - started
        channels = registry.get(modality).channels
        shape = (args.batch_size, 512, 14, 14) if modality == "clip" else (args.batch_size, channels, 224, 224)
        batch = (torch.randint(0, 133, (args.batch_size, 224, 224)) if modality == "semseg"
                 else torch.rand(shape) * 2 - 1).to(device)
        crops, started = samples * args.crops, time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for _ in range(0, crops, args.batch_size):
                ids = model.encode(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        encoder_seconds = (time.perf_counter() - started) * crops / (-(-crops // args.batch_size) * args.batch_size)
        started = time.perf_counter()
        model.decode(ids[:args.decode_samples], seeds=list(range(args.decode_samples)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[modality] = {"samples_per_s": round(samples / stage_seconds, 2),
                             "encoder_samples_per_s": round(samples / encoder_seconds, 2),
                             "stage_over_encoder": round(encoder_seconds / stage_seconds, 2),
                             "decode_samples_per_s": round(args.decode_samples / (time.perf_counter() - started), 3),
                             "gpu_busy": gpu.busy}
        print(f"{modality:7} stage {results[modality]['samples_per_s']:8.2f} samples/s "
              f"({args.crops} crops each), encoder alone {results[modality]['encoder_samples_per_s']:8.2f}; "
              f"stage/encoder {results[modality]['stage_over_encoder']:.2f}; decode "
              f"{results[modality]['decode_samples_per_s']:.3f} samples/s"
              + (f", GPU busy {gpu.busy:.0%}" if gpu.busy is not None else ""), flush=True)
    print(json.dumps({"device": str(device), "size": args.size, "images": args.images, "crops": args.crops,
                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
