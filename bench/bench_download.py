"""`make bench-download`: this stage against img2dataset 1.47 on the same large JPEGs served over loopback.

Both tools get the same URL list, the same number of processes and threads, the same output (longest side
768, never upscaled, JPEG quality 95, webdataset shards of 100). img2dataset is installed in its own virtual
environment (bench/.venv-img2dataset); it is not a dependency of the project.

Throughput is images written per second of the download itself: from the first shard's start to the last
shard's end, read from each tool's own shard stats (so Ray's and Python's start-up are not counted; the
whole-process wall time is printed too). Quality is the mean PSNR of each tool's output against a full-
resolution decode of the source resized with Lanczos to the same size.

Run: python bench/bench_download.py [--images 2000] [--processes 2] [--threads 16] [--profile-steps]
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from pipeline.demo import serve_directory  # noqa: E402

IMG2DATASET_VENV = HERE / ".venv-img2dataset"
SOURCES = [  # (scikit-image photo, size): CC12M-like sizes, about 2000x1500 and larger
    ("astronaut", (2000, 1500)), ("coffee", (2400, 1800)), ("chelsea", (3200, 2400)),
    ("rocket", (2048, 1536)), ("hubble_deep_field", (1600, 2400)), ("camera", (2560, 1920)),
]


def make_sources(site: Path, n_images: int) -> dict[str, Path]:
    """Upscaled real photos with film-grain noise (fine detail is what DCT-scaled decoding could lose)."""
    import skimage.data

    rng = np.random.default_rng(0)
    originals = {}
    for name, size in SOURCES:
        path = site / f"src-{name}.jpg"
        if not path.exists():
            im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.Resampling.LANCZOS)
            arr = np.asarray(im).astype(np.float32) + rng.normal(0, 4, (size[1], size[0], 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        originals[path.name] = path
    names = sorted(originals)
    for i in range(n_images):  # distinct URLs (both tools would skip repeats), the same few files behind them
        link = site / f"{i:06d}.jpg"
        if not link.exists():
            os.link(originals[names[i % len(names)]], link)
    return {f"{i:06d}.jpg": originals[names[i % len(names)]] for i in range(n_images)}


def ensure_img2dataset() -> Path:
    exe = IMG2DATASET_VENV / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(IMG2DATASET_VENV)], check=True)
        subprocess.run([str(IMG2DATASET_VENV / "bin" / "pip"), "install", "-q", "img2dataset==1.47.0"], check=True)
    return exe


def run_ours(listing: Path, out: Path, processes: int, threads: int) -> tuple[float, float]:
    start = time.time()
    subprocess.run([sys.executable, "-m", "pipeline", "download", "--input", str(listing), "--output", str(out),
                    "--profile", "paper", "--shard-size", "100", "--processes", str(processes),
                    "--threads", str(threads), "--allow-private-hosts", "--set", "ray.num_cpus=" + str(processes)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - start
    stats = [json.loads(p.read_text()) for p in (out / "_status" / "download").glob("*.json")]
    return wall, max(s["finished_at"] for s in stats) - min(s["started_at"] for s in stats)


def run_img2dataset(exe: Path, listing: Path, out: Path, processes: int, threads: int) -> tuple[float, float]:
    start = time.time()
    subprocess.run([str(exe), "--url_list", str(listing), "--input_format", "tsv", "--url_col", "url",
                    "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
                    "--processes_count", str(processes), "--thread_count", str(threads), "--image_size", "768",
                    "--resize_mode", "keep_ratio_largest", "--resize_only_if_bigger", "True",
                    "--encode_quality", "95", "--number_sample_per_shard", "100", "--distributor", "multiprocessing",
                    "--enable_wandb", "False"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - start
    stats = [json.loads(Path(p).read_text()) for p in glob.glob(str(out / "*_stats.json"))]
    return wall, max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)


def tar_images(folder: Path) -> dict[str, bytes]:
    images = {}
    for path in sorted(folder.rglob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    images[member.name.rsplit(".", 1)[0]] = tar.extractfile(member).read()
    return images


def mean_psnr(images: list[tuple[bytes, Path]], limit: int = 60) -> float:
    """Mean PSNR (dB) of stored images against full decodes of their sources resized with Lanczos."""
    cache, values = {}, []
    for data, source in images[:limit]:
        out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)
        size = (out.shape[1], out.shape[0])
        if (source, size) not in cache:
            cache[(source, size)] = np.asarray(Image.open(source).convert("RGB").resize(size, Image.Resampling.LANCZOS))
        mse = np.mean((out - cache[(source, size)]) ** 2)
        values.append(10 * np.log10(255**2 / mse))
    return float(np.mean(values))


def profile_steps(base: str, names: list[str], shard_size: int = 100) -> dict[str, float]:
    """Where one image's time goes in this stage, single-threaded on this machine, in ms per image: the HTTP fetch
    over loopback (the stage's Fetcher), header read and checks (Pillow), DCT-scaled decode, resize and JPEG encode
    (the stage's own OpenCV calls, as process_image makes them), the tar write (ShardWriter) and the status
    parquet with the commit (per image, a shard of `shard_size`)."""
    import tempfile

    import cv2
    import pyarrow as pa

    from core.config import DownloadConfig
    from stages.dataset.shards import DatasetLayout, ShardWriter
    from stages.download.fetch import Fetcher
    from stages.download.images import CV2_REDUCED_DECODE, _resize_array, target_size

    fetcher = Fetcher(DownloadConfig(allow_private_hosts=True))
    spent = dict.fromkeys(["fetch", "header", "decode", "resize", "encode", "tar write", "status parquet"], 0.0)

    def timed(step, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        spent[step] += time.perf_counter() - start
        return out

    encoded = []
    for name in names[:shard_size]:
        data = timed("fetch", lambda: fetcher.fetch(f"{base}/{name}").data)
        im = timed("header", lambda: Image.open(io.BytesIO(data)))
        size = target_size(*im.size, 768)
        scale = next(k for k in (8, 4, 2, 1) if k <= max(min(im.size[0] // size[0], im.size[1] // size[1]), 1))
        pixels = timed("decode", cv2.imdecode, np.frombuffer(data, np.uint8), CV2_REDUCED_DECODE[scale])
        pixels = timed("resize", _resize_array, pixels, size)
        encoded.append(timed("encode", lambda: cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
                             .tobytes()))
    with tempfile.TemporaryDirectory() as folder:
        layout = DatasetLayout(folder)
        with ShardWriter(layout, "download", "shard-000000", ["rgb", "caption"]) as writer:
            keys = [f"{i:09d}" for i in range(len(encoded))]
            for key, jpeg in zip(keys, encoded):
                timed("tar write", writer.write, key, {"rgb": ("jpg", jpeg), "caption": ("txt", b"a photo")})
            table = pa.table({"key": keys, "status": ["ok"] * len(keys), "error": [None] * len(keys)})
            timed("status parquet", writer.commit, table, {"rows": len(keys)})
    return {step: round(seconds / len(encoded) * 1000, 2) for step, seconds in spent.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--work", default=str(HERE / "_work"))
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--profile-steps", action="store_true",
                        help="also time this stage's steps one by one for each image (single-threaded)")
    args = parser.parse_args()

    work = Path(args.work)
    site = work / "site"
    site.mkdir(parents=True, exist_ok=True)
    sources = make_sources(site, args.images)
    results = {"images": args.images, "processes": args.processes, "threads": args.threads,
               "cpus": os.cpu_count(), "source_sizes": [s for _, s in SOURCES]}
    with serve_directory(site) as base:
        ours_list, theirs_list = work / "urls.tsv", work / "urls-header.tsv"
        rows = [f"{base}/{name}\tphoto {name}" for name in sources]
        ours_list.write_text("\n".join(rows) + "\n")
        theirs_list.write_text("url\tcaption\n" + "\n".join(rows) + "\n")
        runs = [("ours", lambda out: run_ours(ours_list, out, args.processes, args.threads))]
        if not args.skip_img2dataset:
            exe = ensure_img2dataset()
            runs.append(("img2dataset", lambda out: run_img2dataset(exe, theirs_list, out, args.processes,
                                                                    args.threads)))
        if args.profile_steps:
            steps = results["steps_ms_per_image"] = profile_steps(base, list(sources))
            total = sum(steps.values())
            print("this stage, one image, single-threaded: " + ", ".join(
                f"{step} {ms:.2f} ms ({ms / total:.0%})" for step, ms in steps.items()) + f"; {total:.1f} ms in all")
        for name, run in runs:
            out = work / f"out-{name}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            wall, busy = run(out)
            stored = tar_images(out)
            # Both tools' keys are the input row number (img2dataset's: shard * 100 + index in the shard).
            pairs = [(data, sources[f"{int(key):06d}.jpg"]) for key, data in stored.items()]
            results[name] = {"images": len(stored), "wall_s": round(wall, 2), "download_s": round(busy, 2),
                             "images_per_s": round(len(stored) / busy, 1), "psnr_db": round(mean_psnr(pairs), 2)}
            print(f"{name:12} {len(stored):5d} images  {results[name]['images_per_s']:7.1f} images/s "
                  f"({busy:.1f} s downloading, {wall:.1f} s whole process)  "
                  f"mean PSNR {results[name]['psnr_db']:.2f} dB", flush=True)
    if "img2dataset" in results:
        ratio = results["ours"]["images_per_s"] / results["img2dataset"]["images_per_s"]
        results["ratio"] = round(ratio, 2)
        print(f"ratio ours / img2dataset: {ratio:.2f}x at the same processes and threads")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    ok = results["ours"]["psnr_db"] >= 35.0 and results["ours"]["images"] == args.images
    print("quality check (mean PSNR >= 35 dB, every image stored):", "pass" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
