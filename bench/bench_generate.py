"""`make bench-generate`: how fast 4M-B generates, with random weights (speed does not depend on them).

Images: tok_rgb (196 tokens) from a 16-token caption with MaskGIT's cosine schedule at 8 and 25 steps, batches of
1 and 32, in samples/s. Captions: 32 tokens left to right from RGB pixels, with the key-value cache and without
it (recomputing the decoder over the whole prefix for every token, as the reference does), in captions/s.
bf16 autocast on a GPU, fp32 on a CPU. Each figure is one timed run after one untimed warm-up run.

Run: python bench/bench_generate.py [--device auto] [--batches 1,32] [--steps 8,25] [--caption-batch 32]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from models.fourm import FourM, FourMConfig  # noqa: E402
from models.generate import Sampler, Schedule, Step, pixels_entry, sequence_entry  # noqa: E402
from stages.training import device_for  # noqa: E402

SENTINELS = list(range(4, 204))  # the vocabulary layout's [S_0].. ids
CAPTION = [4300 + 37 * i for i in range(15)] + [3]  # 15 word pieces and [EOS]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    fn()  # warm-up: kernels, allocator, caches
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--steps", default="8,25")
    parser.add_argument("--caption-batch", type=int, default=32)
    parser.add_argument("--caption-tokens", type=int, default=32)
    args = parser.parse_args()
    device = device_for(args.device)
    torch.manual_seed(0)
    model = FourM(FourMConfig.sized("B")).to(device).eval()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"4M-B ({model.num_parameters() / 1e6:.0f}M parameters without embeddings), random weights, on {where}")
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        for steps in (int(s) for s in args.steps.split(",")):
            schedule = Schedule([Step("tok_rgb@224", "maskgit", steps)])

            def image():
                state = {"caption": sequence_entry([CAPTION] * batch, device=device)}
                Sampler(model, SENTINELS).generate(state, schedule, ["caption"], list(range(batch)))
            seconds = timed(image, device)
            results.append({"what": "image", "scheme": "maskgit", "steps": steps, "batch": batch,
                            "seconds": round(seconds, 3), "samples_per_s": round(batch / seconds, 3)})
            print(json.dumps(results[-1]), flush=True)
    pixels = torch.randn(args.caption_batch, 3, 224, 224, device=device)
    for cache in (True, False):
        step = Step("caption", "autoregressive", temperature=1.0, max_tokens=args.caption_tokens)

        def caption():
            state = {"rgb@224": pixels_entry(pixels, model.cfg.grid)}
            Sampler(model, SENTINELS, cache=cache).generate(state, Schedule([step]), ["rgb@224"],
                                                            list(range(args.caption_batch)))
        seconds = timed(caption, device)
        results.append({"what": "caption", "tokens": args.caption_tokens, "cache": cache,
                        "batch": args.caption_batch, "seconds": round(seconds, 3),
                        "captions_per_s": round(args.caption_batch / seconds, 3)})
        print(json.dumps(results[-1]), flush=True)
    cached, recomputed = (r["captions_per_s"] for r in results if r["what"] == "caption")
    print(f"key-value cache: {cached / recomputed:.1f}x the captions per second of recomputing the decoder")


if __name__ == "__main__":
    main()
