"""`make bench-pretrain`: 4M training throughput and the loader's, for one size.

Model: masked batches made by the project's sampler (the paper's mixture, 128 + 128 tokens) from random token
grids, captions and box sequences, then timed steps of forward, backward and AdamW (bf16 autocast on a GPU, fp32
on a CPU): samples/s, tokens/s, model FLOPs per sample (stages.fourm.pretrain.flops_per_sample), MFU against the GPU's
dense bf16 peak, peak accelerator memory. Loader: token shards of real photos written to --work, read, decoded,
cropped and masked by one process (stages.fourm.fourm_data.MaskedSamples): masked samples/s per CPU core, to set
against the model's samples/s per GPU (the loader runs in `pretrain.loader_workers` processes per GPU). Mixture
(--mixture): three datasets read at weights 0.6/0.2/0.2 as 4M-21 reads CC12M, COYO and C4 (the shards above with
every modality, the same read for RGB, its tokens, captions and boxes only, and a JSON-lines text corpus), each
alone and mixed: the mixture's time per sample against the weighted mean of its parts'.

Run: python bench/bench_pretrain.py [--size B] [--batch 64] [--steps 20] [--device auto] [--compile]
     [--loader-samples 512] [--whole-photos] [--mixture]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from models.fourm import FourM, FourMConfig  # noqa: E402
from models.text_tokenizer import boxes_to_text, train_text_tokenizer  # noqa: E402
from stages.dataset.shards import CROP_PIXELS, DatasetLayout, ShardWriter  # noqa: E402
from stages.fourm.fourm_data import MaskedSamples, collate, mixture_from  # noqa: E402
from stages.fourm.masking import MaskingSampler  # noqa: E402
from stages.fourm.pretrain import flops_per_sample  # noqa: E402
from stages.tokenizers.tokenizer_data import crop_jpegs  # noqa: E402
from stages.training import peak_flops  # noqa: E402

MODALITIES = ["rgb@224", "tok_rgb@224", "tok_depth@224", "tok_normal@224", "tok_semseg@224", "tok_clip@224",
              "caption", "det"]
CAPTION = "a tabby cat looking to the side on a wooden floor next to a cup of coffee and a red bicycle"
BOXES = [{"boxes": [0.1 * i, 0.05 * i, 0.1 * i + 0.3, 0.05 * i + 0.4], "class_name": c, "score": 0.9}
         for i, c in enumerate(["cat", "cup", "bicycle", "person", "dog"])]


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def make_token_shards(root: Path, shards: int, per_shard: int, vocab: dict, stored_crops: bool = True) -> None:
    """Token shards as the tokenize stage writes them, over real photos (JPEG, 768 on the long side), with each
    crop of the photo stored at 224 beside them (as tokenize writes it) unless `stored_crops` is False (a dataset
    tokenized before: the loader decodes every photo whole)."""
    import cv2
    import pyarrow as pa
    import skimage.data

    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        image = getattr(skimage.data, name)()
        scale = 768 / max(image.shape[:2])
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
        photos.append((cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
                       image.shape[:2]))
    rng = np.random.default_rng(0)
    layout = DatasetLayout(root)
    folders = ["rgb", "caption", "det", "crop_settings", *[m for m in MODALITIES if m.startswith("tok_")],
               *([CROP_PIXELS] if stored_crops else [])]
    for s in range(shards):
        with ShardWriter(layout, "bench", f"shard-{s:06d}", folders) as writer:
            keys = [f"{s:03d}{i:06d}" for i in range(per_shard)]
            for i, key in enumerate(keys):
                jpeg, (h, w) = photos[i % len(photos)]
                side = min(h, w)
                crops = np.array([[(h - side) // 2, (w - side) // 2, side, side, 0]] * 4, np.int32)
                members = {"rgb": ("jpg", jpeg), "caption": ("txt", CAPTION.encode()),
                           "det": ("json", json.dumps({"instances": BOXES}).encode()),
                           "crop_settings": ("npy", npy(crops))}
                if stored_crops:
                    members[CROP_PIXELS] = ("npz", crop_jpegs(jpeg, crops))
                for m in MODALITIES:
                    if m.startswith("tok_"):
                        members[m] = ("npy", npy(rng.integers(vocab[m], size=(4, 196)).astype(np.int16)))
                writer.write(key, members)
            writer.commit(pa.table({"key": keys, "status": ["ok"] * len(keys)}), {})
        with ShardWriter(layout, "download", f"shard-{s:06d}", []) as writer:  # what the download records: sizes
            sizes = [photos[i % len(photos)][1] for i in range(per_shard)]
            writer.commit(pa.table({"key": keys, "status": ["ok"] * len(keys), "width": [w for _, w in sizes],
                                    "height": [h for h, _ in sizes]}), {})


def bench_model(args, tokenizer, vocab: dict) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = FourMConfig.sized(args.size, domains_in=MODALITIES, domains_out=MODALITIES[1:], vocab_sizes=vocab)
    torch.manual_seed(0)
    model = FourM(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    sampler = MaskingSampler(MODALITIES, mixture_from("paper", MODALITIES), 128, 128, tokenizer)
    rng = np.random.default_rng(0)

    def sample():
        out = {m: torch.from_numpy(rng.integers(vocab[m], size=196)) for m in MODALITIES if m.startswith("tok_")}
        out["rgb@224"] = torch.randn(3, 224, 224)
        out["caption"], out["det"] = CAPTION, boxes_to_text(BOXES)
        return sampler(out, rng)

    batches = [collate([sample() for _ in range(args.batch)]) for _ in range(2)]
    batches = [{m: {k: v.to(device) for k, v in d.items()} for m, d in b.items()} for b in batches]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    forward = torch.compile(model) if args.compile else model  # the first (warm-up) steps compile it

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = forward(batch, 128, 128)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(args.warmup):
        step(batches[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    samples_per_s = args.steps * args.batch / seconds
    flops = flops_per_sample(model, 128, 128)
    peak = peak_flops(device)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "size": args.size,
            "batch": args.batch, "parameters_without_embeddings": model.num_parameters(),
            "flops_per_sample": flops, "samples_per_s": round(samples_per_s, 2),
            "tokens_per_s": round(samples_per_s * 256, 1),
            "mfu": round(samples_per_s * flops / peak, 4) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None}


def bench_loader(args, work: Path, tokenizer, vocab: dict) -> dict:
    root = work / ("tokens" if not args.whole_photos else "tokens_whole_photos")
    if not (root / "crop_settings").is_dir() or (not args.whole_photos and not (root / CROP_PIXELS).is_dir()):
        make_token_shards(root, 2, args.loader_samples // 2, vocab, stored_crops=not args.whole_photos)
    shards = sorted(p.stem for p in (root / "crop_settings").glob("shard-*.tar"))
    sampler = MaskingSampler(MODALITIES, mixture_from("paper", MODALITIES), 128, 128, tokenizer)
    torch.set_num_threads(1)  # one core, as one loader worker process
    stream = MaskedSamples(root, shards, MODALITIES, sampler, train=True, repeats=4, min_score=0.6,
                           shuffle_buffer=64, seed=0)
    iterator = iter(stream)
    for _ in range(64):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.loader_samples):
        next(iterator)
    per_core = args.loader_samples / (time.perf_counter() - start)
    return {"masked_samples_per_s_per_core": round(per_core, 1), "repeats": 4,
            "photo": "whole, cropped when loaded" if args.whole_photos else "stored 224 crops"}


def _per_sample_seconds(stream, samples: int) -> float:
    iterator = iter(stream)
    for _ in range(64):
        next(iterator)
    start = time.perf_counter()
    for _ in range(samples):
        next(iterator)
    return (time.perf_counter() - start) / samples


def bench_mixture(args, work: Path, tokenizer, vocab: dict) -> dict:
    from stages.fourm.datasets import MixedSamples, TextSamples

    root = work / "tokens"
    if not (root / CROP_PIXELS).is_dir():
        make_token_shards(root, 2, args.loader_samples // 2, vocab)
    corpus = work / "c4.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{CAPTION} number {i}"}) + "\n" for i in range(2000)))
    shards = sorted(p.stem for p in (root / "crop_settings").glob("shard-*.tar"))
    seven = ["rgb@224", "tok_rgb@224", "caption", "det"]
    torch.set_num_threads(1)

    def parts():
        settings = dict(train=True, repeats=4, shuffle_buffer=64)
        return [MaskedSamples(root, shards, MODALITIES, MaskingSampler(MODALITIES, mixture_from("paper", MODALITIES),
                                                                       128, 128, tokenizer),
                              min_score=0.6, seed=0, **settings),
                MaskedSamples(root, shards, seven, MaskingSampler(seven, mixture_from("paper", seven), 128, 128,
                                                                  tokenizer), min_score=0.6, seed=[0, 1], **settings),
                TextSamples([str(corpus)], "text", "caption",
                            MaskingSampler(["caption"], mixture_from("paper", ["caption"]), 128, 128, tokenizer),
                            storage_options={}, seed=[0, 2], **settings)]

    weights = [0.6, 0.2, 0.2]
    alone = [_per_sample_seconds(part, args.loader_samples) for part in parts()]
    mixed = _per_sample_seconds(MixedSamples(parts(), weights, MODALITIES, seed=0), args.loader_samples)
    expected = sum(w * t for w, t in zip(weights, alone))
    return {"parts_masked_samples_per_s_per_core": [round(1 / t, 1) for t in alone],
            "mixture_masked_samples_per_s_per_core": round(1 / mixed, 1),
            "mixture_cost_over_its_parts": round(mixed / expected, 3), "weights": weights}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="B", choices=["Ti", "S", "B", "L", "XL"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="0: the loader alone")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--loader-samples", type=int, default=512, help="0: the model alone")
    parser.add_argument("--whole-photos", action="store_true",
                        help="the loader on a dataset without stored 224 crops (each photo decoded whole)")
    parser.add_argument("--compile", action="store_true", help="time the model under torch.compile")
    parser.add_argument("--mixture", action="store_true", help="the loader on a mixture of three datasets too")
    parser.add_argument("--work", default=str(HERE / "_work" / "pretrain"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = train_text_tokenizer([CAPTION, boxes_to_text(BOXES)] * 4, 30000)
    vocab = {"tok_rgb@224": 16384, "tok_depth@224": 8192, "tok_normal@224": 8192, "tok_semseg@224": 4096,
             "tok_clip@224": 8192, "caption": 30000, "det": 30000}  # the paper's vocabularies
    results, model = {}, None
    if args.steps:
        model = results["model"] = {**bench_model(args, tokenizer, vocab), "compiled": args.compile}
        print(f"4M-{args.size}{' compiled' if args.compile else ''} on {model['device']}, batch {args.batch}: "
              f"{model['samples_per_s']} samples/s, {model['tokens_per_s']} tokens/s, "
              f"{model['flops_per_sample'] / 1e9:.1f} GFLOPs/sample, MFU {model['mfu']}, "
              f"peak memory {model['peak_memory_gib']} GiB")
    if args.loader_samples:
        loader = results["loader"] = bench_loader(args, work, tokenizer, vocab)
        needs = f" (needs {model['samples_per_s'] / loader['masked_samples_per_s_per_core']:.2f} cores per " \
                f"device)" if model else ""
        print(f"loader ({loader['photo']}): {loader['masked_samples_per_s_per_core']} masked samples/s per core"
              + needs)
    if args.mixture and args.loader_samples:
        mix = results["mixture"] = bench_mixture(args, work, tokenizer, vocab)
        print(f"mixture 0.6/0.2/0.2 (every modality / RGB, tokens, captions, boxes / text): parts "
              f"{mix['parts_masked_samples_per_s_per_core']} masked samples/s per core alone, mixed "
              f"{mix['mixture_masked_samples_per_s_per_core']}: {mix['mixture_cost_over_its_parts']} x the weighted "
              f"mean of its parts' time per sample")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
