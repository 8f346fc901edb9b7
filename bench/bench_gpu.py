"""`make bench-gpu`: every benchmark at the paper's sizes on a machine with one GPU, within about 8 minutes, as one
table and one file.

On a GPU: the labelers on mixed-size images (paper models, random weights), tokenizer encode and decode (paper
size), 4M-B pretraining steps under bf16 autocast and again under torch.compile, 4M-L, transfer fine-tuning and
evaluation at 224 and 512 with the data pipeline's per-core rate, generation at batch 1 and 32, and the quality
stage's scoring (ViT-B/32, EfficientNet-B3) and near-duplicate search over 1M embeddings; each reports
samples/s or images/s, and those that measure it tokens/s, MFU, peak memory and the GPU's busy share. The 4M
loader's masked samples per core ride along with pretraining. Without a GPU it says so and runs the same
benchmarks at tiny sizes: a check that every path runs, not figures to quote.

Each benchmark runs as its own process under a time limit (a stuck one costs its limit, not the session); its
printed lines and its own JSON results are kept. Writes bench/results/<host>-<date>.json and prints one table and
the markdown rows for docs/benchmarks.md.

Run: python bench/bench_gpu.py [--cpu] [--only label,pretrain]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"

# (name, script and arguments, time limit in seconds, the results file it writes under bench/_work)
GPU_PLAN = [
    ("label", ["bench_label.py", "--size", "paper", "--images", "256", "--shard-size", "128"], 120, None),
    ("tokenize", ["bench_tokenize.py", "--size", "paper", "--images", "32", "--crops", "2"], 90, None),
    ("pretrain 4M-B bf16", ["bench_pretrain.py", "--size", "B", "--batch", "128", "--steps", "20"], 90,
     "pretrain/results.json"),
    ("pretrain 4M-B compiled", ["bench_pretrain.py", "--size", "B", "--batch", "128", "--steps", "20", "--compile",
                                "--loader-samples", "0"], 120, "pretrain/results.json"),
    ("pretrain 4M-L", ["bench_pretrain.py", "--size", "L", "--batch", "64", "--steps", "10", "--loader-samples",
                       "0"], 60, "pretrain/results.json"),
    ("transfer 224/512", ["bench_transfer.py", "--batch", "64", "--steps", "10"], 60, "transfer/results.json"),
    ("generate batch 1/32", ["bench_generate.py", "--batches", "1,32", "--steps", "8"], 60, None),
    ("quality", ["bench_quality.py", "--size", "paper", "--images", "256", "--batch-size", "64"], 150,
     "quality.json"),
]
CPU_PLAN = [  # the same paths at tiny sizes
    ("label", ["bench_label.py", "--size", "tiny", "--images", "16", "--shard-size", "8"], 300, None),
    ("tokenize", ["bench_tokenize.py", "--size", "tiny", "--images", "4", "--crops", "1", "--decode-samples", "1"],
     300, None),
    ("pretrain 4M-Ti", ["bench_pretrain.py", "--size", "Ti", "--batch", "8", "--steps", "3", "--loader-samples",
                        "64"], 300, "pretrain/results.json"),
    ("transfer 224/512", ["bench_transfer.py", "--batch", "2", "--steps", "1", "--warmup", "1",
                          "--loader-images", "8"], 300, "transfer/results.json"),
    ("generate batch 1/32", ["bench_generate.py", "--batches", "1", "--steps", "2", "--caption-batch", "2",
                             "--caption-tokens", "4"], 300, None),
    ("quality", ["bench_quality.py", "--size", "tiny", "--images", "8", "--batch-size", "8", "--embeddings", "5000",
                 "--cluster-size", "500"], 300, "quality.json"),
]


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def json_values(text: str) -> list:
    """The JSON objects a benchmark printed: whole lines, or one indented block."""
    found, block = [], []
    for line in text.splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                found.append(json.loads(line))
                continue
            except json.JSONDecodeError:
                pass
        if line.startswith("{") or block:
            block.append(line)
            if line.startswith("}"):
                try:
                    found.append(json.loads("\n".join(block)))
                except json.JSONDecodeError:
                    pass
                block = []
    return found


def run(name: str, command: list[str], limit: int, results_file: str | None) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], capture_output=True,
                              text=True, timeout=limit, cwd=HERE.parent)
        status, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as stopped:
        status, out, err = "timeout", stopped.stdout or "", stopped.stderr or ""
        out, err = (v.decode() if isinstance(v, bytes) else v for v in (out, err))
    seconds = time.perf_counter() - started
    own = WORK / results_file if results_file else None
    lines = [line for line in out.splitlines() if line and not line.startswith((" ", "{", "}", "]", "["))]
    return {"name": name, "command": " ".join(["python", "bench/" + command[0], *command[1:]]), "status": status,
            "seconds": round(seconds, 1), "summary": lines[-4:],
            "results": json.loads(own.read_text()) if own and own.is_file() and status == 0 else json_values(out),
            "error": err.strip().splitlines()[-3:] if status != 0 else []}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU plan even where there is a GPU")
    parser.add_argument("--only", default="", help="comma-separated name prefixes, e.g. pretrain,generate")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    gpu = has_gpu() and not args.cpu
    if not gpu:
        print("no GPU here: running the CPU versions (tiny sizes: the paths run; the figures are not the paper's)")
    plan = [p for p in (GPU_PLAN if gpu else CPU_PLAN)
            if not args.only or any(p[0].startswith(o) for o in args.only.split(","))]
    import torch

    device = torch.cuda.get_device_name(0) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    host, date = platform.node() or "host", datetime.date.today().isoformat()
    results = []
    for name, command, limit, results_file in plan:
        print(f"== {name} (at most {limit} s)", flush=True)
        results.append(run(name, command, limit, results_file))
        for line in results[-1]["summary"] or results[-1]["error"]:
            print("   " + line, flush=True)
    out = Path(args.out) / f"{host}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": host, "date": date, "device": device, "gpu": gpu, "benchmarks": results},
                              indent=1) + "\n")
    print(f"\n{'benchmark':24} {'status':8} {'seconds':>8}  result")
    for r in results:
        print(f"{r['name']:24} {str(r['status']):8} {r['seconds']:8.1f}  {(r['summary'] or [''])[-1][:90]}")
    print(f"\nmarkdown rows for docs/benchmarks.md ({out}):")
    for r in results:
        print(f"| {date} | {device} | {r['name']} | {(r['summary'] or ['-'])[-1]} | `{r['command']}` |")
    return 0 if all(r["status"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
