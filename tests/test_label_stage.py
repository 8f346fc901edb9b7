"""The pseudo-label stage on a real Ray, with tiny random-weight models of the real classes."""
import io
import json
import os
import subprocess
import sys
import tarfile

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from core.config import load_config
from stages.label.label import LabelInputError, _one_by_one, label_shard, run_label, stage_name
from tests.helpers import DATASET_PHOTOS as PHOTOS
from tests.helpers import UNSCORED, photo, write_rgb_shard
from tests.helpers import make_labelled_input as make_dataset


def members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def config(tiny_models, *extra):
    return load_config("demo", [f"label.models={tiny_models}", "label.chunk_size=2", "label.batch_size=2", *UNSCORED,
                                *extra])


def test_labels_are_aligned_with_rgb_in_the_reference_formats(ray_address, tiny_models, tmp_path):
    layout = make_dataset(tmp_path)
    demo = config(tiny_models)  # the demo profile names 4M-21's weight-free modalities too
    load_config("paper")  # another profile loaded in this process since: the stage still runs the demo's own
    summary = run_label(tmp_path, demo)
    assert summary.shards_done == 2 and not summary.failed_shards
    for name in ("depth", "normal", "semseg", "det", "clip", "canny_edge", "color_palette", "metadata"):
        assert summary.status_counts[name] == {"ok": 4, "decode_error": 1}
        for shard in ("shard-000000", "shard-000001"):
            rgb_keys = [n.split(".")[0] for n, _ in members(layout.tar("rgb", shard))]
            keys = [n.split(".")[0] for n, _ in members(layout.tar(name, shard))]
            assert keys == [k for k in rgb_keys if k != "000000003"], "same keys, same order, corrupt one absent"
            status = pq.read_table(layout.status_table(stage_name(name), shard)).to_pylist()
            assert [r["key"] for r in status] == rgb_keys, "every rgb sample recorded exactly once"
        bad = pq.read_table(layout.status_table(stage_name(name), "shard-000001")).to_pylist()[0]
        assert bad["status"] == "decode_error" and "000000003.jpg" in bad["error"]

    sizes = {f"{i:09d}": np.asarray(photo(n)).shape[:2] for i, n in enumerate(PHOTOS)}
    for member, data in members(layout.tar("depth", "shard-000000")):
        depth = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert member.endswith(".png") and depth.dtype == np.uint16 and depth.shape == sizes[member[:9]]
    for member, data in members(layout.tar("normal", "shard-000000")):
        normal = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert normal.dtype == np.uint8 and normal.shape == (*sizes[member[:9]], 3)
    for member, data in members(layout.tar("semseg", "shard-000000")):
        seg = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert seg.dtype == np.uint8 and seg.shape == sizes[member[:9]] and seg.max() < 133
    for member, data in members(layout.tar("det", "shard-000000")):
        instances = json.loads(data)["instances"]
        assert member.endswith(".json") and instances  # the demo profile keeps every box
        assert all(0 <= v <= 1 for inst in instances for v in inst["boxes"])
        assert all(set(inst) == {"boxes", "class_name", "score"} for inst in instances)
    for member, data in members(layout.tar("color_palette", "shard-000000")):
        palettes = json.loads(data)[0]  # the reference's layout: a list holding one palette of each size
        assert member.endswith(".json") and [len(palettes[str(n)]) for n in range(1, 8)] == list(range(1, 8))
    for member, data in members(layout.tar("metadata", "shard-000000")):
        # the second pass read the caption and the labels the first one committed
        stats = json.loads(data)
        name = PHOTOS[int(member[:9])]
        assert stats["caption_n_words"] == len(f"a photo of a {name}".split()) and stats["semantic_diversity"] >= 1
        assert {"n_coco_instances", "walkability", "occlusion_score", "geometric_complexity"} <= set(stats)
    name, data = members(layout.tar("clip", "shard-000000"))[2]  # astronaut, 512x512
    clip = np.load(io.BytesIO(data))
    assert name == "000000002.npy" and clip.dtype == np.float16 and clip.shape == (14, 14, 16)


def test_a_labeler_reading_labels_not_committed_fails_its_shards_by_name(ray_address, tiny_models, tmp_path):
    make_dataset(tmp_path)
    watching = WatchingWithinShards()
    summary = run_label(tmp_path, config(tiny_models), ["metadata"], observer=watching)
    assert summary.shards_done == 0 and set(summary.failed_shards) == {"shard-000000", "shard-000001"}
    assert watching.failures == summary.failed_shards  # told as they failed, not only in the summary
    assert "metadata reads det labels, not committed for shard-000000 (label det first" in (
        summary.failed_shards["shard-000000"])


def test_rerun_skips_committed_labelers_and_redoes_the_rest(ray_address, tiny_models, tmp_path):
    layout = make_dataset(tmp_path)
    first = run_label(tmp_path, config(tiny_models), ["depth"])
    assert first.shards_done == 2
    stamp = layout.stats("label_depth", "shard-000000").stat().st_mtime_ns
    # An interrupted clip shard, as a kill leaves it: no commit marker, a temporary file.
    (layout.root / "clip").mkdir()
    (layout.root / "clip" / ".shard-000000.tar.tmp-0123abcd").write_bytes(b"partial")
    watching = WatchingWithinShards()
    second = run_label(tmp_path, config(tiny_models), ["depth", "clip"], observer=watching)
    assert second.shards_done == 2 and second.status_counts["clip"]["ok"] == 4
    # within each shard the worker reported at its start, after every sample (progress_every=1) and at its end,
    # under the name its committed stats give the worker
    counts = watching.seen[-1]
    assert sorted(counts) == sorted(watching.committed)
    for shard, count in counts.items():
        images = layout.read_stats("download", shard)["ok"]
        stats = layout.read_stats("label_clip", shard)
        assert (count["done"], count["total"], count["reports"]) == (images, images, images + 2)
        assert count["worker"] == f"{stats['node']} pid {stats['worker']}"
    assert layout.stats("label_depth", "shard-000000").stat().st_mtime_ns == stamp, "depth was not redone"
    assert not list(layout.root.rglob("*.tmp-*"))
    third = run_label(tmp_path, config(tiny_models), ["depth", "clip"])
    assert (third.shards_done, third.shards_skipped) == (0, 2)


class WatchingWithinShards:
    """An observer that keeps what the workers report within shards (`stages.progress`), read once at the end."""

    progress_every, poll_seconds = 1, 3600.0

    def __init__(self):
        self.seen, self.committed, self.failures = [], [], {}

    def start(self, total_shards: int) -> None:
        pass

    def __call__(self, name: str, stats: dict, skipped: bool) -> None:
        self.committed.append(name)

    def in_progress(self, shards: dict) -> None:
        self.seen.append(shards)

    def failed(self, shard: str, error: str) -> None:
        self.failures[shard] = error


def test_one_failing_sample_costs_only_itself():
    """Each sample of a failed batch alone, as the labeler gets it: an image, or (a labeler that reads other
    labels) the image with those labels."""
    from models.labelers import ComputedLabeler

    class FailsOnThirteen(ComputedLabeler):
        def compute(self, sample):
            image = sample["image"] if isinstance(sample, dict) else sample
            if image.shape[0] == 13:
                raise RuntimeError("cannot label a 13-pixel image")
            return image.shape

    images = [np.zeros((10, 10, 3)), np.zeros((13, 10, 3)), np.zeros((11, 10, 3))]
    for given in (images, [{"image": im, "caption": "a cat"} for im in images]):
        results = _one_by_one(FailsOnThirteen(), given)
        assert results[0] == ((10, 10, 3), None) and results[2] == ((11, 10, 3), None)
        assert results[1] == (None, "RuntimeError: cannot label a 13-pixel image")


def test_batches_fill_with_one_input_size_across_chunks(tiny_models, tmp_path):
    from models.labelers import load_labeler

    # Two aspect ratios taking turns, decoded two at a time: each chunk holds one image of each size.
    sizes = [(96, 128), (128, 96)] * 4
    layout, keys = write_rgb_shard(tmp_path, sizes)
    depth = load_labeler("depth", tiny_models["depth"], device="cpu", batch_size=4)
    cfg = config(tiny_models, "label.chunk_size=2", "label.batch_window=8").label
    stats = label_shard(str(tmp_path), "shard-000000", {"depth": depth}, cfg)["depth"]
    assert (stats["batches"], stats["images_per_batch"]) == (2, 4.0), "one full batch per input size"
    stored = members(layout.tar("depth", "shard-000000"))
    assert [n.split(".")[0] for n, _ in stored] == keys, "labels written in the rgb shard's order"
    expected = depth([np.asarray(photo("astronaut"))[:h, :w] for h, w in sizes])
    for (_, data), want in zip(stored, expected):
        got = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert got.shape == want.shape and np.abs(got / 65535 - want).max() < 1e-4

    # A window of 2 waiting images sends the oldest image's bucket out part-full.
    stats = label_shard(str(tmp_path), "shard-000000", {"depth": depth},
                        cfg.model_copy(update={"batch_window": 2}))["depth"]
    assert (stats["batches"], stats["images_per_batch"]) == (4, 2.0)


def test_each_labeler_batches_at_its_own_size(tiny_models, tmp_path):
    from stages.label.label import LabelWorker

    write_rgb_shard(tmp_path, [(96, 128)] * 4)
    cfg = config(tiny_models, "label.batch_size=1", "label.batch_sizes={clip: 4}").label
    stats = LabelWorker(str(tmp_path), cfg, ["depth", "clip"]).label("shard-000000", ["depth", "clip"])
    assert (stats["depth"]["batches"], stats["clip"]["batches"]) == (4, 1)


def test_size_buckets_send_the_oldest_image_first():
    from models.labelers import SizeBuckets

    buckets = SizeBuckets(lambda h, w: (h, w), batch_size=3, window=4)
    image = {size: np.zeros((*size, 3), np.uint8) for size in [(1, 1), (2, 2), (3, 3)]}
    assert buckets.add("a", image[1, 1]) == [] and buckets.add("b", image[2, 2]) == []
    assert buckets.add("c", image[2, 2]) == [] and buckets.add("d", image[3, 3]) == []
    # A fifth waiting image is one too many: the bucket holding the oldest ("a") goes, part-full.
    assert [[t for t, _ in b] for b in buckets.add("e", image[2, 2])] == [["b", "c", "e"]]
    assert [[t for t, _ in b] for b in buckets.add("f", image[3, 3])] == []
    assert [[t for t, _ in b] for b in buckets.add("g", image[3, 3])] == [["d", "f", "g"]]
    assert [[t for t, _ in b] for b in buckets.flush()] == [["a"]] and buckets.waiting == 0


def test_next_batch_is_queued_before_the_last_is_read_back(tiny_models):
    from models.labelers import DepthLabeler, run_overlapped

    events = []

    class Recording(DepthLabeler):  # the real labeler, telling the order of its two halves
        def launch(self, images):
            events.append(("launch", len(images)))
            return super().launch(images)

        def collect(self, launched):
            events.append(("collect", len(launched.outputs)))
            return super().collect(launched)

    labeler = Recording(tiny_models["depth"], device="cpu")
    images = [np.asarray(photo("astronaut"))[:64, :64]] * 6
    done = list(run_overlapped((labeler, n, images[:n]) for n in (1, 2, 3)))
    assert events == [("launch", 1), ("launch", 2), ("collect", 1), ("launch", 3), ("collect", 2), ("collect", 3)]
    assert [d.tag for d in done] == [1, 2, 3] and all(d.error is None and len(d.labels) == d.tag for d in done)


def test_a_failing_batch_is_redone_image_by_image(tiny_models, tmp_path):
    from models.labelers import DepthLabeler

    class FailsOnNarrow(DepthLabeler):  # a model error on one image, as a bad input would cause
        def launch(self, images):
            if any(im.shape[1] == 120 for im in images):
                raise RuntimeError("cannot label a narrow image")
            return super().launch(images)

    # 96x120 shares 96x128's model input size: all four go to the model as one batch, which fails.
    layout, keys = write_rgb_shard(tmp_path, [(96, 128), (96, 128), (96, 120), (96, 128)])
    labeler = FailsOnNarrow(tiny_models["depth"], device="cpu", batch_size=4)
    cfg = config(tiny_models, "label.chunk_size=4").label
    stats = label_shard(str(tmp_path), "shard-000000", {"depth": labeler}, cfg)["depth"]
    assert stats["status_counts"] == {"model_error": 1, "ok": 3} and stats["batches"] == 1
    status = pq.read_table(layout.status_table("label_depth", "shard-000000")).to_pylist()
    assert [(r["key"], r["status"]) for r in status] == [(k, "model_error" if k == keys[2] else "ok") for k in keys]
    assert "cannot label a narrow image" in status[2]["error"]
    assert [n.split(".")[0] for n, _ in members(layout.tar("depth", "shard-000000"))] == [keys[0], keys[1], keys[3]]


def test_missing_input_is_a_clear_error(tiny_models, tmp_path):
    with pytest.raises(LabelInputError, match="no committed rgb shards"):
        run_label(tmp_path, config(tiny_models))
    layout = make_dataset(tmp_path)
    layout.tar("rgb", "shard-000001").unlink()
    with pytest.raises(LabelInputError, match="rgb/shard-000001.tar"):
        run_label(tmp_path, config(tiny_models))


def test_label_command_runs_a_subset(ray_address, tiny_models, tmp_path):
    make_dataset(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": ray_address, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "label", "--data", str(tmp_path), "--labelers",
                             "semseg,det", "--set", f"label.models={tiny_models}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "label: 100%" in result.stderr and "semseg  ok 4, decode_error 1" in result.stdout
    assert "gpu_wait=0%" in result.stderr, "the bar says how long the worker waited for the device (none on a CPU)"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("_")) == ["caption", "det", "rgb",
                                                                                       "semseg"]


def assert_every_sample_once(layout, names) -> None:
    for name in names:
        keys = [r["key"] for s in ("shard-000000", "shard-000001")
                for r in pq.read_table(layout.status_table(stage_name(name), s)).to_pylist()]
        assert keys == [f"{i:09d}" for i in range(5)], "every sample recorded exactly once"
        assert [n.split(".")[0] for s in ("shard-000000", "shard-000001")
                for n, _ in members(layout.tar(name, s))] == keys


def test_killed_label_run_resumes_without_redoing_committed_shards(ray_address, tiny_models, tmp_path):
    import signal

    layout = make_dataset(tmp_path, corrupt_key=None)
    tar = layout.tar("rgb", "shard-000001")
    real = tar.read_bytes()
    tar.unlink()
    os.mkfifo(tar)  # the worker blocks opening shard 1 until the test opens the other end
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    args = [sys.executable, "-m", "pipeline", "label", "--data", str(tmp_path), "--labelers", "depth,semseg",
            "--set", f"label.models={tiny_models}", "--set", "label.workers=1"]
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    with open(tar, "wb"):
        # Opened: the only worker has finished shard 0 and started reading shard 1. Kill the run now.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert layout.committed_shards("label_depth") == ["shard-000000"]
    stamp = layout.stats("label_depth", "shard-000000").stat().st_mtime_ns
    tar.unlink()
    tar.write_bytes(real)

    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1 shards labelled, 1 already committed" in result.stdout
    assert layout.stats("label_depth", "shard-000000").stat().st_mtime_ns == stamp
    assert_every_sample_once(layout, ("depth", "semseg"))


def test_detectron2_backend_without_detectron2_is_a_clear_error(tiny_models, tmp_path):
    import importlib.util

    if importlib.util.find_spec("detectron2"):
        pytest.skip("detectron2 is installed here")
    make_dataset(tmp_path)
    cfg = config(tiny_models, "label.det_backend=detectron2", "label.det_detectron2_config=vitdet_h.py",
                 "label.det_detectron2_weights=model_final.pkl")
    with pytest.raises(LabelInputError, match="detectron2 is not importable; detectron2 installs from source"):
        run_label(tmp_path, cfg)
    assert not (tmp_path / "det").exists()
    # auto falls back to the transformers detector when detectron2 cannot run
    assert cfg.label.model_copy(update={"det_backend": "auto"}).resolved_det_backend() == "transformers"


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _ours(pid: int) -> bool:
    """Started under this test process (its Ray's workers are): another test process's workers are not ours."""
    try:
        while pid > 1:
            pid = _parent(pid)
            if pid == os.getpid():
                return True
    except OSError:
        return False
    return False


def _processes_named(prefix: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(prefix.encode()) and _ours(int(entry)):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_a_killed_ray_worker_is_replaced_and_the_stage_completes(ray_address, tiny_models, tmp_path):
    """A Ray worker process dies mid-shard (SIGKILL): Ray restarts the actor, the shard is redone, and every
    sample is recorded exactly once."""
    import signal
    import threading

    layout = make_dataset(tmp_path, corrupt_key=None)
    tar = layout.tar("rgb", "shard-000001")
    real = tar.read_bytes()
    tar.unlink()
    os.mkfifo(tar)
    before = set(_processes_named("ray::label shard-000001"))  # a running task's process is titled by its name
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(
        summary=run_label(tmp_path, config(tiny_models, "label.workers=1"), ["depth", "semseg"])))
    run.start()
    with open(tar, "wb"):
        # Opened: the worker is inside shard 1, blocked reading it. Put the real shard at the path (its open
        # descriptor still points at the pipe), then kill the worker's process.
        tar.unlink()
        tar.write_bytes(real)
        workers = [pid for pid in _processes_named("ray::label shard-000001") if pid not in before]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
    run.join(timeout=280)
    summary = outcome["summary"]
    assert summary.shards_done == 2 and not summary.failed_shards
    assert_every_sample_once(layout, ("depth", "semseg"))


def test_shards_record_what_made_them_and_verify_reports_mixed_weights(tiny_models, tmp_path, capsys):
    from PIL import Image

    from models.labelers import load_labeler
    from models.random_weights import save_random_model
    from pipeline.cli import main
    from pipeline.status import stage_rows
    from stages.dataset.provenance import project_version
    from stages.dataset.verify import verify_dataset

    layout = make_dataset(tmp_path)
    cfg = config(tiny_models).label
    clip = load_labeler("clip", tiny_models["clip"], "cpu", 2)
    for shard in ("shard-000000", "shard-000001"):
        label_shard(str(tmp_path), shard, {"clip": clip}, cfg)
    made = layout.read_stats("label_clip", "shard-000000")["provenance"]
    assert made["version"] == project_version() and made["config"]["batch_size"] == 2
    assert made["models"]["clip"] == clip.provenance and made["models"]["clip"]["random_weights"] is True
    assert not any("different weights" in str(p) for p in verify_dataset(tmp_path)[0])

    # shard 1 redone by other weights: verify names both hashes and their shards
    other = load_labeler("clip", save_random_model("clip", tmp_path / "clip-seed1", "tiny", seed=1), "cpu", 2)
    label_shard(str(tmp_path), "shard-000001", {"clip": other}, cfg)
    mixed = [str(p) for p in verify_dataset(tmp_path)[0] if "different weights" in str(p)]
    assert mixed == [f"- clip: shards made by different weights: {clip.provenance['weights_sha256'][:12]} (1 shards: "
                     f"shard-000000); {other.provenance['weights_sha256'][:12]} (1 shards: shard-000001)"]
    row = {r["stage"]: r for r in stage_rows(tmp_path)}["label_clip"]
    assert row["made_by"].count("RANDOM WEIGHTS") == 2 and tiny_models["clip"] in row["made_by"]

    # random weights say so wherever the dataset is shown: status, verify, the show picture
    capsys.readouterr()
    assert main(["status", "--data", str(tmp_path)]) == 0
    assert "WARNING: labelled by random-weight models (the demo's): label_clip" in capsys.readouterr().out
    assert main(["verify", "--data", str(tmp_path)]) == 1
    assert "WARNING: labelled by random-weight models" in capsys.readouterr().out
    assert main(["show", "--data", str(tmp_path), "--key", "000000000", "--out", str(tmp_path / "s.png")]) == 0
    assert "RANDOM WEIGHTS made clip" in Image.open(tmp_path / "s.png").text["Description"]


def test_labels_read_beside_the_image_stream_in_key_order_with_gaps(tmp_path):
    """A labeler that reads other labels gets them streamed from their shard as the rgb keys come, None for a key
    whose label is absent (its labeler failed on it), without reading the whole shard into memory first."""
    from stages.label.label import KeyOrderedMembers

    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key in ("000000000", "000000001", "000000003"):
            info = tarfile.TarInfo(f"{key}.json")
            data = key.encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reader = KeyOrderedMembers(path)
    got = [reader.get(f"{i:09d}") for i in (0, 2, 3, 4)]  # key 1 skipped (its image did not decode), 2 absent
    reader.close()
    assert got == [b"000000000", None, b"000000003", None]


FLAKY = '''
"""A labeler that fails on one photo (its size given) while a file exists: a device error that passes."""
import os

from core.registry import Labeling, register
from models.labelers import ComputedLabeler
from models.modality_kinds import SequenceModality


class FlakyLabeler(ComputedLabeler):
    def compute(self, image):
        if image.shape[:2] == {shape} and os.path.exists({marker!r}):
            raise RuntimeError("CUDA error: out of memory (the test's)")
        return "a label"


class Flaky(SequenceModality):
    name, label_order = "flaky", 62
    labeler = Labeling(load=FlakyLabeler)


register(Flaky())
'''


def test_label_retry_failed_redoes_only_the_shards_with_model_errors(ray_address, tiny_models, tmp_path):
    """`label --retry-failed` redoes a labeler's shard where the model failed on a photo (model_error), withdrawing
    first what is built on it; a shard whose only failure is a photo that does not decode is left as it is, and so
    are the other labelers' shards."""
    from pipeline.cli import main as cli
    from stages.label.label import built_on

    layout = make_dataset(tmp_path / "data")
    marker = tmp_path / "device-fails"
    marker.touch()
    plugin = tmp_path / "flaky.py"
    plugin.write_text(FLAKY.format(shape=tuple(np.asarray(photo(PHOTOS[1])).shape[:2]), marker=str(marker)))
    modules = f"modalities=[{', '.join([*load_config('demo').modalities, str(plugin)])}]"  # the demo's and this one
    cfg = config(tiny_models, modules)
    first = run_label(layout.root, cfg, ["flaky", "canny_edge"])
    assert first.status_counts["flaky"] == {"ok": 3, "model_error": 1, "decode_error": 1}, first.failed_shards
    # what a tokenize run would have committed on that shard: withdrawn with the labeler's shard
    tokens = layout.stats("tokenize_flaky", "shard-000000")
    tokens.parent.mkdir(parents=True)
    tokens.write_text(json.dumps({"rows": 3, "ok": 2}))
    kept = {(stage, shard): layout.stats(stage, shard).stat().st_mtime_ns
            for stage in ("label_flaky", "label_canny_edge") for shard in ("shard-000000", "shard-000001")}

    marker.unlink()  # the device error passes
    assert cli(["label", "--data", str(layout.root), "--labelers", "flaky,canny_edge", "--retry-failed",
                "--profile", "demo", "--set", f"label.models={tiny_models}", "--set", modules,
                *[f"--set={o}" for o in UNSCORED]]) == 0
    status = pq.read_table(layout.status_table("label_flaky", "shard-000000")).to_pylist()
    assert [r["status"] for r in status] == ["ok", "ok", "ok"]
    redone = [key for key, stamp in kept.items() if layout.stats(*key).stat().st_mtime_ns != stamp]
    assert redone == [("label_flaky", "shard-000000")]  # not the decode error's shard, nor canny_edge's
    assert not layout.is_committed("tokenize_flaky", "shard-000000")
    assert built_on("det", load_config("paper21").modality_set) == [
        "align", "tokenize_det", "tokenize_metadata", "label_metadata", "label_det"]  # metadata reads det's boxes
