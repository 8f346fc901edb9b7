"""`make bench-storage`: the stages on an object-storage data root against the same on a local disk.

The store is moto's S3 API server on loopback (the test suite's, with IAM authentication) in a process of its own,
so the figures measure our path through fsspec/s3fs and the S3 protocol, not a network: on a cloud store add its
latency and bandwidth. The server shares the machine's cores with what it serves.

  download   the same large JPEGs served over loopback, downloaded into a local folder and into s3://bench/ds:
             images/s over the stage's own span (its shard stats), and the most local scratch space the run used
             (a poll of the scratch folder every 20 ms)
  tokenize   rgb shards of real photos and label shards (bench_tokenize's), in a local folder and copied to
             s3://bench/labels; one tokenize worker's work per shard (read, decode, crop, encode with a tiny
             random-weight tokenizer of the published architecture, write the token shard) from and to each:
             samples/s. Tiny encoders make the stage's reading and writing a larger share than the paper's would.
  loader     token shards as tokenize writes them (real photos' stored 224 crops, token grids, captions, boxes),
             written to a local folder and to s3://bench/tokens, read, decoded, cropped and masked by one process
             (the 4M loader's MaskedSamples, one compute thread): masked samples/s of wall-clock time, and per CPU
             second of the loader's process (its download threads included, the server's work not), streaming
             from each

Run: python bench/bench_storage.py [--images 400] [--tokenize-images 64] [--loader-samples 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.bench_download import make_sources  # noqa: E402
from bench.bench_pretrain import BOXES, CAPTION, MODALITIES, boxes_to_text, make_token_shards  # noqa: E402
from core.config import load_config  # noqa: E402
from core.storage import SCRATCH_ENV, data_path  # noqa: E402
from pipeline.demo import serve_directory  # noqa: E402
from tests.helpers import S3Server  # noqa: E402


class RemoteS3:
    """helpers.S3Server in a process of its own (in ours, its request threads would hold our interpreter's lock
    while the loader runs): the same endpoint, credentials and buckets."""

    def __init__(self):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.answers, self.stop_event = context.Queue(), context.Event()
        self.process = context.Process(target=_serve, args=(self.answers, self.stop_event), daemon=True)
        self.process.start()
        self.endpoint, self.credentials = self.answers.get(timeout=120)

    env = S3Server.env
    options = S3Server.options
    fs = S3Server.fs
    make_bucket = S3Server.make_bucket

    def stop(self) -> None:
        self.stop_event.set()
        self.process.join(timeout=30)


def _serve(answers, stop_event) -> None:
    server = S3Server()
    answers.put((server.endpoint, server.credentials))
    stop_event.wait()
    server.stop()


class ScratchWatch:
    """The most bytes the scratch folder held while the block ran."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self.stop = folder, 0, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.02):
            size = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file()) if self.folder.is_dir() else 0
            self.peak = max(self.peak, size)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def download_span(root) -> tuple[int, float]:
    """(images kept, seconds from the first shard's start to the last shard's end), from the shard stats."""
    from stages.dataset.shards import DatasetLayout

    layout = DatasetLayout(root)
    stats = [layout.read_stats("download", s) for s in layout.committed_shards("download")]
    return sum(s["ok"] for s in stats), max(s["finished_at"] for s in stats) - min(s["started_at"] for s in stats)


def bench_download(args, s3: RemoteS3, work: Path, scratch: Path) -> dict:
    from stages.download.download import run_download

    site = work / "site"
    site.mkdir(exist_ok=True)
    make_sources(site, args.images)
    results = {}
    with serve_directory(site) as base:
        listing = work / "urls.tsv"
        listing.write_text("".join(f"{base}/{i:06d}.jpg\tphoto {i}\n" for i in range(args.images)))
        config = load_config("paper", [f"download.shard_size={args.shard_size}", "download.processes=2",
                                       "download.threads=16", "download.allow_private_hosts=true"])
        for repeat in range(args.repeats):
            for where in ("local", "s3"):
                root = work / f"local-{repeat}" if where == "local" else \
                    data_path(f"s3://{s3.make_bucket(f'bench-download-{repeat}')}/ds", s3.options)
                with ScratchWatch(scratch) as watch:
                    run_download(listing, root, config)
                images, seconds = download_span(root)
                results.setdefault(where, []).append({"images_per_s": round(images / seconds, 1),
                                                      "scratch_peak_mb": round(watch.peak / 1e6, 1)})
                print(f"download to {where} (run {repeat + 1}): {images / seconds:.1f} images/s, "
                      f"scratch peak {watch.peak / 1e6:.1f} MB", flush=True)
    return results


def bench_tokenize(args, s3: RemoteS3, work: Path) -> dict:
    import torch

    from bench.bench_label import make_rgb_shards
    from bench.bench_tokenize import make_label_shards
    from core.config import TokenizerStageConfig
    from models.vqvae import VQVAE, save_tokenizer
    from stages.dataset.shards import DatasetLayout
    from stages.tokenizers import dataset_tokenizers as tokenizers
    from stages.tokenizers.tokenize import tokenize_shard
    from stages.tokenizers.train_tokenizer import model_config

    local = work / "labels"
    shards = make_rgb_shards(local, args.tokenize_images, shard_size=max(1, args.tokenize_images // 2), sizes="mixed")
    make_label_shards(local, shards)
    bucket = s3.make_bucket("bench-labels")
    s3.fs().put(str(local), f"{bucket}/labels", recursive=True)
    roots = {"local": local, "s3": data_path(f"s3://{bucket}/labels", s3.options)}
    torch.set_num_threads(1)
    cfg, device, results = TokenizerStageConfig(size="tiny", n_crops=4), torch.device("cpu"), {}
    for modality in ("rgb", "depth"):
        folder = work / "tokenizers" / modality
        save_tokenizer(VQVAE(model_config(cfg, modality, DatasetLayout(local))), folder)
        model = tokenizers.load_folder(folder, modality, device)
        for repeat in range(args.repeats):
            for where, root in roots.items():
                layout = DatasetLayout(root)
                started = time.perf_counter()
                samples = sum(tokenize_shard(layout, s, modality, model, cfg, device)["ok"] for s in shards)
                rate = samples / (time.perf_counter() - started)
                results.setdefault(f"{modality} {where}", []).append(round(rate, 1))
                print(f"tokenize {modality} from and to {where} (run {repeat + 1}): {rate:.1f} samples/s",
                      flush=True)
    return results


def bench_loader(args, s3: RemoteS3, work: Path) -> dict:
    import torch

    from models.text_tokenizer import train_text_tokenizer
    from stages.fourm.fourm_data import MaskedSamples, mixture_from
    from stages.fourm.masking import MaskingSampler

    tokenizer = train_text_tokenizer([CAPTION, boxes_to_text(BOXES)] * 4, 30000)
    vocab = {"tok_rgb@224": 16384, "tok_depth@224": 8192, "tok_normal@224": 8192, "tok_semseg@224": 4096,
             "tok_clip@224": 8192, "caption": 30000, "det": 30000}
    roots = {"local": work / "tokens", "s3": data_path(f"s3://{s3.make_bucket('bench-tokens')}/tokens", s3.options)}
    for root in roots.values():
        make_token_shards(root, 2, args.loader_samples // 2, vocab)
    torch.set_num_threads(1)  # one core, as one loader worker process
    results = {}
    for repeat in range(args.repeats):
        for where, root in roots.items():
            sampler = MaskingSampler(MODALITIES, mixture_from("paper", MODALITIES), 128, 128, tokenizer)
            stream = iter(MaskedSamples(root, ["shard-000000", "shard-000001"], MODALITIES, sampler, train=True,
                                        repeats=4, min_score=0.6, shuffle_buffer=64, seed=0))
            for _ in range(64):
                next(stream)
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.loader_samples):
                next(stream)
            rate = args.loader_samples / (time.perf_counter() - start)
            per_cpu = args.loader_samples / (time.process_time() - cpu)
            results.setdefault(where, []).append(round(rate, 1))
            results.setdefault(f"{where}_per_cpu_second", []).append(round(per_cpu, 1))
            print(f"loader from {where} (run {repeat + 1}): {rate:.1f} masked samples/s on one core, {per_cpu:.1f} "
                  f"per CPU second of the loader's process (its download threads included)", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--tokenize-images", type=int, default=64)
    parser.add_argument("--loader-samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=str(HERE / "_work" / "storage"))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-scratch-"))
    os.environ[SCRATCH_ENV] = str(scratch)  # the driver's, handed on to the Ray workers
    s3 = RemoteS3()
    os.environ.update(s3.env)
    try:
        results = {"download": bench_download(args, s3, work, scratch), "tokenize": bench_tokenize(args, s3, work),
                   "loader": bench_loader(args, s3, work)}
    finally:
        s3.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    loader = results["loader"]
    median = {where: sorted(rates)[len(rates) // 2] for where, rates in loader.items()}
    print(f"loader from s3 / local: {median['s3'] / median['local']:.2f} (medians of the wall-clock rates; the server "
          f"shares the cores), {median['s3_per_cpu_second'] / median['local_per_cpu_second']:.2f} (per CPU second "
          f"of the loader's process)")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
