"""`make demo`: real photos served over loopback, downloaded into the demo dataset.

The photos ship inside scikit-image and matplotlib and are free to use: NASA's astronaut, rocket (SpaceX) and
Hubble deep field and the US Navy's Grace Hopper portrait are public domain; Chelsea the cat, the coffee
cup and the cameraman are CC0; the motorcycle is from the Middlebury stereo data set, as scikit-image ships it. The
list also holds a few rows that must fail (a missing file, a web page, a duplicate, a malformed row) so the demo
shows how every row's fate is recorded, and two that the quality filters drop: the motorcycle listed with the cat's
caption, and a smaller re-encoded copy of the rocket posted under another address.
"""
from __future__ import annotations

import http.server
import json
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

from core import registry
from core.config import Config
from core.files import write_bytes
from core.storage import DataPath, data_path, is_remote, open_data_root, read_parquet, remove_tree, scratch_root
from models.fourm import FourMConfig
from models.random_weights import save_random_model
from pipeline.console import ShardProgress, print_alignment, print_summary
from pipeline.show import draw_sample
from pipeline.stage_list import STAGES
from stages.dataset.shards import CROPS, DatasetLayout
from stages.dataset.verify import verify_dataset
from stages.download.download import STAGE, run_download
from stages.fourm.pretrain import run_dir, run_pretrain
from stages.generate.generate import read_requests, run_generation
from stages.label.label import run_label
from stages.run_folder import RunFolder
from stages.tokenizers.tokenize import run_tokenize
from stages.tokenizers.tokenize import stage_name as tokenize_stage_name
from stages.tokenizers.train_tokenizer import run_train_tokenizers, tokenizer_dir, training_line
from stages.transfer.evaluate import run_evaluate
from stages.transfer.transfer import run_transfer

DEMO_PHOTOS = {
    # file served -> (package, path inside the package, caption)
    "astronaut.png": ("skimage", "data/astronaut.png", "an astronaut in a white spacesuit holding a helmet, "
                      "with the american flag behind her"),
    "chelsea.png": ("skimage", "data/chelsea.png", "a tabby cat looking to the side on a wooden floor"),
    "coffee.png": ("skimage", "data/coffee.png", "a cup of coffee on a saucer with a spoon, seen from above"),
    "rocket.jpg": ("skimage", "data/rocket.jpg", "a rocket on the launch pad at dusk"),
    "hubble.jpg": ("skimage", "data/hubble_deep_field.jpg", "hundreds of distant galaxies on a black sky"),
    "camera.png": ("skimage", "data/camera.png", "a black and white photo of a person with a camera on a tripod"),
    "grace_hopper.jpg": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
                         "a portrait of a woman in a navy uniform in front of a flag"),
    "motorcycle.png": ("skimage", "data/motorcycle_left.png", "a red motorcycle parked in a garage in front of shelves"),
}
# The list's caption where it is not the photo's own: a page that put the cat's caption under the motorcycle
MISMATCHED_CAPTIONS = {"motorcycle.png": DEMO_PHOTOS["chelsea.png"][2]}
# file served -> (the photo it copies, its caption): half the size, re-encoded, posted at another address
NEAR_DUPLICATES = {"rocket_small.jpg": ("rocket.jpg", DEMO_PHOTOS["rocket.jpg"][2])}
CLIP_FIT_STEPS = 200  # the demo CLIP's fit to the photos' own captions (stages/quality/fit_clip.py)


def demo_photo_paths() -> dict[str, Path]:
    import importlib

    paths = {}
    for name, (package, inner, _) in DEMO_PHOTOS.items():
        module = importlib.import_module(package)
        paths[name] = Path(module.__file__).parent / inner
    return paths


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        # sendfile: the kernel copies the body, so the server takes little CPU from the downloader it serves.
        self.connection.sendfile(source)


@contextmanager
def serve_directory(directory: str | Path) -> Iterator[str]:
    """Serve a folder over HTTP on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_demo_list(site: Path, base_url: str, path: DataPath) -> None:
    """The URL list: every demo photo, then the rows that must fail, as CC12M's TSV."""
    from PIL import Image

    for name, source in demo_photo_paths().items():
        shutil.copyfile(source, site / name)
    for name, (original, _) in NEAR_DUPLICATES.items():
        with Image.open(site / original) as photo:
            photo.convert("RGB").resize((photo.width // 2, photo.height // 2)).save(site / name, quality=70)
    (site / "about.html").write_text("<!DOCTYPE html><html><body>not a photo</body></html>")
    lines = [f"{base_url}/{name}\t{MISMATCHED_CAPTIONS.get(name, caption)}"
             for name, (_, _, caption) in DEMO_PHOTOS.items()]
    lines += [f"{base_url}/{name}\t{caption}" for name, (_, caption) in NEAR_DUPLICATES.items()]
    lines += [
        f"{base_url}/missing.jpg\ta photo that is not there",
        f"{base_url}/about.html\ta web page where a photo should be",
        f"{base_url}/chelsea.png\tthe same cat again, listed twice",
        "this row has no tab",
    ]
    write_bytes(path, ("\n".join(lines) + "\n").encode())


def download_demo_photos(root: DataPath, config: Config, observer=None):
    """Serve the bundled photos over loopback while the download stage fetches the demo list into `root`.

    Keys are row numbers, so a rerun (on a new port) skips the shards already committed.
    """
    root = data_path(root)
    if not is_remote(root):
        root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="4m-demo-site-") as site:
        with serve_directory(site) as base_url:
            urls = DatasetLayout(root).url_list
            write_demo_list(Path(site), base_url, urls)
            print(f"serving {len(DEMO_PHOTOS) + len(NEAR_DUPLICATES)} demo photos at {base_url}; list written to {urls}")
            return run_download(urls, root, allow_demo_server(config, base_url), observer=observer)


def allow_demo_server(config: Config, base_url: str) -> Config:
    """The configuration with the demo's own server, and no other private address, let through the guard."""
    host_port = base_url.split("://", 1)[1]
    download = config.download.model_copy(update={"allowed_hosts": [*config.download.allowed_hosts, host_port]})
    return config.model_copy(update={"download": download})


def save_demo_models(config: Config) -> None:
    """Tiny random-weight models at the profile's label.models paths (kept if already there); a labeler without
    weights (a palette, edges) has none to save."""
    for name in config.label.labelers:
        if registry.get(name).labeler.random_model:
            save_random_model(name, config.label.models[name], "tiny")


def save_demo_quality_models(config: Config) -> None:
    """Tiny quality networks of the real classes where the profile names them, <folder>/{image_text,aesthetic,
    watermark}: random weights, the CLIP then fitted to the demo photos' own captions (kept once fitted)."""
    from filelock import FileLock

    from models.quality import RANDOM_MODELS, save_random_quality_models
    from stages.quality.fit_clip import fit_clip, is_fitted

    cfg = config.quality
    paths = [Path(p) for p in (cfg.clip_model, cfg.aesthetic_model, cfg.watermark_model) if p]
    if len({p.parent for p in paths}) != 1 or tuple(p.name for p in paths) != RANDOM_MODELS:
        return
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with FileLock(paths[0].parent / ".demo.lock"):  # demos running side by side make them once
        save_random_quality_models(paths[0].parent, "tiny")
        if not is_fitted(paths[0], CLIP_FIT_STEPS):
            print(f"fitting the demo's random-weight CLIP to its {len(DEMO_PHOTOS)} photos' own captions "
                  f"(a real CLIP brings this from its training)")
            pairs = [(str(demo_photo_paths()[name]), caption) for name, (_, _, caption) in DEMO_PHOTOS.items()]
            fit_clip(paths[0], pairs, config, steps=CLIP_FIT_STEPS)


def trainer(workers: int | None) -> str:
    return "Ray Train, in this process" if workers == 0 else "Ray Train"


def run_demo(config: Config, label_observer=None) -> int:
    """Every stage of the stage list, in its order, on the demo photos; stops at the first that fails.
    `label_observer(progress)`: what observes the label stage's shards instead of its progress bar (the cluster
    demo's, which kills a node in the middle)."""
    root = open_data_root(config.root, writable=True)  # a bad URL or refused credentials fail here, by name
    steps = {"download": download_demo, "quality": quality_demo,
             "pseudo-label": partial(label_demo, observer=label_observer),
             "train-tokenizers": train_tokenizers_demo,
             "tokenize": tokenize_demo, "pretrain": pretrain_demo, "evaluate": evaluate_demo,
             "transfer": transfer_demo, "generate": generate_demo}
    for stage in STAGES:
        print(f"\n== {stage.name}: {stage.summary}")
        code = steps[stage.name](root, config)
        if code:
            return code
    return 0


def download_demo(root: DataPath, config: Config) -> int:
    """The bundled photos served over loopback and downloaded, each row's fate printed."""
    layout = DatasetLayout(root)
    remove_tree(layout.status_dir(STAGE))  # a fresh download each run: the demo shows it
    progress = ShardProgress("download")
    try:
        summary = download_demo_photos(root, config, observer=progress)
    finally:
        progress.close()
    print_summary(summary, root)
    print(f"\n{'key':<10} {'status':<14} {'size':<10} error")
    for shard in layout.committed_shards(STAGE):
        for r in layout.read_status(STAGE, shard).to_pylist():
            size = f"{r['width']}x{r['height']}" if r["width"] else "-"
            print(f"{r['key']:<10} {r['status']:<14} {size:<10} {r['error'] or ''}")
    print(f"\nimages:   {layout.folder(registry.photo().folder)}/shard-*.tar\n"
          f"captions: {layout.folder(_caption_domain())}/shard-*.tar\n"
          f"status:   {layout.status_dir(STAGE)}/shard-*.parquet (+ .json commit markers)")
    return 1 if summary.failed_shards else 0


def quality_demo(root: DataPath, config: Config) -> int:
    """Every photo scored (image-text, aesthetic, watermark) by tiny networks of the real classes, and what the
    profile's thresholds drop, and why."""
    from stages.quality.filters import filtering, rejected
    from stages.quality.quality import FOLDER, run_quality
    from stages.quality.quality import STAGE as QUALITY

    save_demo_quality_models(config)
    layout = DatasetLayout(root)
    remove_tree(layout.status_dir(QUALITY))  # new images each run: score them anew
    progress = ShardProgress("quality")
    try:
        summary = run_quality(root, config, observer=progress)
    finally:
        progress.close()
    print(f"\n{'key':<10} {'clip score':>10} {'aesthetic':>9} {'watermark':>9}  fate")
    dropped = 0
    for shard in layout.committed_shards(QUALITY):
        why = rejected(layout, shard, config.quality) if filtering(config.quality) else {}
        dropped += len(why)
        for r in read_parquet(layout.table(FOLDER, shard), ["key", "clip_score", "aesthetic", "watermark"]).to_pylist():
            fate = f"dropped: {why[r['key']][1]}" if r["key"] in why else "kept"
            print(f"{r['key']:<10} {_number(r['clip_score']):>10} {_number(r['aesthetic']):>9} "
                  f"{_number(r['watermark']):>9}  {fate}")
    print(f"(tiny networks: random weights, the CLIP fitted to the demo photos' own captions; aesthetic and "
          f"watermark scores mean nothing) -> {layout.folder(FOLDER)}/shard-*.parquet\n"
          f"{dropped} sample(s) dropped: the label stage labels none of them and every later folder leaves them out")
    return 1 if summary.failed_shards else 0


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def label_demo(root: DataPath, config: Config, observer=None) -> int:
    """Pseudo labels from tiny random-weight models of the real classes (the paper profile names the real ones),
    and a picture of every labelled sample."""
    layout = DatasetLayout(root)
    print("labelling with random-weight models saved at the profile's label.models paths")
    save_demo_models(config)
    for stage in (f"label_{n}" for n in config.label.labelers):  # new images each run: label them anew
        remove_tree(layout.status_dir(stage))
    progress = ShardProgress("label")
    try:
        labelled = run_label(root, config, observer=observer(progress) if observer else progress)
    finally:
        progress.close()
    for name, counts in labelled.status_counts.items():
        print(f"{name:7} " + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + f"  -> {layout.folder(name)}/")
    for shard, err in labelled.failed_shards.items():
        print(f"shard {shard} failed and will be redone on the next run: {err}", file=sys.stderr)
    pictures, labelled_by = [], registry.get(config.label.labelers[0]).stage  # the samples the filters kept, labelled
    for shard in layout.committed_shards(labelled_by):
        for r in layout.read_status(labelled_by, shard).to_pylist():
            if r["status"] == "ok":
                pictures.append(draw_sample(layout, r["key"], layout.show_dir / f"{r['key']}.png"))
    print(f"\npictures of every labelled sample: {layout.show_dir}/ ({len(pictures)} PNG files)")
    return 1 if labelled.failed_shards else 0


def train_tokenizers_demo(root: DataPath, config: Config) -> int:
    """Tiny tokenizers trained on the demo labels (new images each run: new tokenizers and tokens too)."""
    print(f"training tiny tokenizers on the demo labels ({trainer(config.tokenizer.workers)})")
    layout = DatasetLayout(root)
    remove_tree(layout.tokenizers_dir)
    for modality in config.tokenizer.modalities:
        if modality != registry.TEXT:
            remove_tree(layout.status_dir(tokenize_stage_name(modality)))
    remove_tree(layout.status_dir(CROPS))

    def report(modality, result):
        figures = training_line(modality, result.get("final", {}))
        print(f"{modality:7} -> {tokenizer_dir(root, modality)}/ {figures}")

    run_train_tokenizers(root, config, observer=report)
    pictures = sorted(str(p) for p in layout.tokenizers_dir.glob("*/reconstructions.png"))
    print("reconstructions (inputs above, reconstructions below):\n  " + "\n  ".join(pictures))
    return 0


def tokenize_demo(root: DataPath, config: Config) -> int:
    """Every sample tokenized, the dataset verified."""
    progress = ShardProgress("tokenize")
    try:
        tokenized = run_tokenize(root, config, observer=progress)
    finally:
        progress.close()
    print(f"{tokenized.tokens} tokens written to {root}/tok_*@224/ (crops in {DatasetLayout(root).folder(CROPS)}/)")
    print_alignment(tokenized.dropped, tokenized.unaligned, root)
    problems, checked = verify_dataset(root)
    print(f"verify: {checked.get('folders', 0)} folders x {checked.get('shards', 0)} shards, "
          f"{len(problems)} problems" + "".join(f"\n  {p}" for p in problems))
    return 1 if tokenized.failed_shards or problems else 0


DEMO_TEXTS = ["a photo of a cat sitting on the floor", "an astronaut standing in front of a flag",
              "a cup of coffee on a table", "a rocket on its launch pad", "a dog running on the grass",
              "a red car parked in the street", "two people walking on the beach", "a bowl of fruit"]
DEMO_MIXTURE = {"photos": 0.8, "captions": 0.2}  # as 4M-21 mixes C4's text into its image datasets


def with_text_corpus(root: DataPath, config: Config) -> Config:
    """The demo's pretraining mixture: its photos' dataset with every modality, and a caption-only text file."""
    from core.config import PretrainDatasetConfig

    corpus = DatasetLayout(root).text_corpus
    write_bytes(corpus, "".join(json.dumps({"text": t}) + "\n" for t in DEMO_TEXTS).encode())
    datasets = [PretrainDatasetConfig(name="photos", weight=DEMO_MIXTURE["photos"]),
                PretrainDatasetConfig(name="captions", type="text", root=str(corpus), weight=DEMO_MIXTURE["captions"])]
    return config.model_copy(update={"pretrain": config.pretrain.model_copy(update={"datasets": datasets})})


def pretrain_demo(root: DataPath, config: Config) -> int:
    """A tiny 4M pretrained on a mixture of the demo tokens and a text file, and its predictions from RGB drawn."""
    print(f"pretraining a tiny 4M on the demo tokens mixed with a text file ({trainer(config.pretrain.workers)}, "
          f"{config.pretrain.steps} steps, weights {DEMO_MIXTURE})")
    RunFolder(run_dir(root)).clear()  # new tokens each run: a new model too
    summary = run_pretrain(root, with_text_corpus(root, config))
    first, final = summary["first"], summary["final"]
    validation = ", ".join(f"{k.removeprefix('val_loss.')} {v:.3g}" for k, v in final.items()
                           if k.startswith("val_loss."))
    print(f"4M loss {first.get('loss', float('nan')):.3g} at step {first.get('step')} -> "
          f"{final.get('loss', float('nan')):.3g} at step {final.get('step')}; validation: {validation}")
    for name in DEMO_MIXTURE:
        losses = ", ".join(f"{k.split('.', 2)[2]} {v:.3g}" for k, v in final.items() if k.startswith(f"loss.{name}."))
        print(f"  {name}: {final.get(f'samples.{name}', 0)} samples seen; last batch's losses: {losses or '-'}")
    print(f"model: {run_dir(root)}/ (FourM.from_pretrained)\npredictions from RGB alone: {summary['predictions']}")
    return 0


def evaluate_demo(root: DataPath, config: Config) -> int:
    """The demo model scored out of the box against the pseudo labels of the held-out shard."""
    results = run_evaluate(root, config, run_dir(root), samples=8, batch_size=8)
    print(f"out of the box, from RGB alone, on {results['samples']} held-out samples "
          f"(a tiny model after a minute: expect the baselines' level):")
    for name, scores in results["scores"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3g} (baseline {scores[k + '_baseline']:.3g})"
                                       for k, v in scores.items() if not k.endswith("_baseline")))
    print(f"picture: {results['picture']}")
    return 0


DEMO_COLOURS = {"blue": (30, 60, 200), "green": (40, 180, 60), "grey": (128, 128, 128), "red": (210, 40, 40)}


def colour_classes(folder: Path, size: int = 64) -> tuple[Path, Path]:
    """ImageNet-style class folders a tiny model can separate: the demo photos tinted halfway to four colours,
    five photos per class to train on, two to validate."""
    import numpy as np
    from PIL import Image

    photos = [Image.open(p).convert("RGB").resize((size, size)) for p in demo_photo_paths().values()]
    for split, chosen in (("train", photos[:5]), ("val", photos[5:7])):
        for name, colour in DEMO_COLOURS.items():
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for i, photo in enumerate(chosen):
                tinted = (np.asarray(photo) * 0.5 + np.array(colour) * 0.5).astype(np.uint8)
                Image.fromarray(tinted).save(folder / split / name / f"{i}.png")
    return folder / "train", folder / "val"


def transfer_demo(root: DataPath, config: Config) -> int:
    """The demo model's encoder fine-tuned on a tiny classification task (the transfer command's path)."""
    # the task's photos are the transfer's input, read from local folders: beside the data on a disk, else in the
    # scratch space (the same place under its root)
    local = DatasetLayout(scratch_root() if is_remote(root) else root)
    train, val = colour_classes(local.colour_classes_dir)
    out = run_dir(root) / "transfer-classification"
    RunFolder(out).clear()  # a new model each demo run: a new fine-tune too
    print(f"fine-tuning the demo model's encoder on {len(DEMO_COLOURS)} colour classes "
          f"({trainer(config.transfer.workers)})")
    results = run_transfer("classification", train, val, config, model=str(run_dir(root)), out=out)
    print(f"classification transfer: top1 {results['metrics']['top1']:.3g}% on {len(DEMO_COLOURS) * 2} validation "
          f"images (chance: {100 / len(DEMO_COLOURS):.0f}%) -> {out}/")
    return 0


def _caption_domain() -> str:
    """The downloaded text's name (the caption)."""
    return next(m.name for m in registry.loaded().sequences() if m.downloaded)


def demo_requests(root: DataPath, outputs: list[str]) -> DataPath:
    """The generate/demo deployment's requests: every modality the model predicts from one caption (chained,
    guided) and from one photo; written to <root>/generate/requests.jsonl."""
    name, (_, _, caption) = next(iter(DEMO_PHOTOS.items()))
    described_by = _caption_domain()
    known = registry.loaded().domains()  # in the registry's order, which the pictures follow
    images = [d.name for d in known if d.kind == "tokens" and d.name in outputs]
    images.sort(key=lambda m: not registry.domain(m).modality.channels_from_data)  # feature maps first: they
    # carry the semantics the others are drawn from (caption -> CLIP -> RGB, the released text-to-image order)
    texts = [d.name for d in known if d.kind == "sequence" and d.name in outputs]
    requests = [
        {"name": "from-caption", "conditions": {described_by: caption},
         "targets": images + [t for t in texts if t != described_by], "scheme": "maskgit",
         "steps": 8, "cfg": 3.0, "grow_conditioning": True, "samples": 2, "seed": 0},
        {"name": "from-photo", "conditions": {registry.photo().name: str(demo_photo_paths()[name])},
         "targets": texts + images, "steps": 8, "temperature": 0.7, "samples": 2, "seed": 0}]
    path = DatasetLayout(root).generate_dir / "requests.jsonl"
    write_bytes(path, "".join(json.dumps(r) + "\n" for r in requests).encode())
    return path


def generate_demo(root: DataPath, config: Config | None = None) -> int:
    """The demo model generating every modality from a caption and from a photo (the generate command's path)."""
    model = run_dir(root)
    outputs = FourMConfig(**json.loads((model / "config.json").read_text())).domains_out
    requests = demo_requests(root, outputs)
    out = model / "generations"
    remove_tree(out)  # a new model each demo run: new samples too
    print(f"generating every modality from a caption and from a photo ({requests})")
    results = run_generation(read_requests(requests), model, DatasetLayout(root).tokenizers_dir, out, batch_size=4,
                             device="cpu",
                             progress=True)
    for request in results["requests"]:
        given = ", ".join(f"{k}={v!r}" for k, v in request["conditions"].items())
        print(f"  {request['name']} ({given}):")
        for sample in request["samples"]:
            caption = sample.get(_caption_domain(), {}).get("text")
            print(f"    {sample['grid']}" + (f"  caption: {caption!r}" if caption is not None else ""))
    print(f"(a tiny model after a minute of training: expect texture, not objects) -> {out}/; "
          f"`prefect deployment run generate/demo` reruns the requests in {requests}")
    return 0
