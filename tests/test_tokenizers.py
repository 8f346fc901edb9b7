"""The modality tokenizers: quantizer, models, training on Ray Train (improves, resumes exactly),
pre-tokenization into aligned token shards, and the verifier."""
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from core import registry
from core.config import load_config
from models.vqvae import VQVAE, CosineCodebook, baseline_metric, load_tokenizer, save_tokenizer, tokenizer_config
from pipeline.cli import main as cli
from stages.dataset.shards import DatasetLayout
from stages.dataset.verify import verify_dataset
from stages.fourm.fourm_data import crop_pixels, pixels_picture, stored_crop_pixels
from stages.label.label import run_label
from stages.tokenizers.tokenize import run_tokenize
from stages.tokenizers.train_tokenizer import (
    eval_batch,
    modality_shards,
    model_config,
    run_train_tokenizers,
    tokenizer_dir,
    train_dense,
)
from tests.helpers import UNSCORED, make_labelled_input

TOKENIZED = [m.name for m in registry.ModalitySet().tokenized()]

SETTINGS = ["tokenizer.batch_size=2", "tokenizer.epochs=8", "tokenizer.epochs_by_modality={rgb: 8}",
            "tokenizer.warmup_epochs=1",
            "tokenizer.checkpoint_every=3", "tokenizer.log_every=2", "tokenizer.eval_every=100",
            "tokenizer.eval_samples=4", "label.chunk_size=2", "label.batch_size=2"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_restart_revives_dead_codes():
    torch.manual_seed(0)
    codebook = CosineCodebook(size=16, dim=4, decay=0.5, threshold=1.0)
    direction = F.normalize(torch.tensor([1.0, 0.2, 0.0, 0.0]), dim=0)
    codebook.embed[0] = direction  # one code sits where every vector falls; the rest, opposite, never win
    codebook.embed[1:] = F.normalize(-direction + 0.1 * torch.randn(15, 4), dim=-1)
    before = codebook.embed.clone()
    batch = direction + 0.3 * torch.randn(64, 4)
    ids = codebook.nearest(batch)
    assert torch.equal(ids, torch.zeros(64, dtype=torch.long))
    codebook.update(batch, ids)
    # code 0 took all 64 vectors (EMA count 32); the 15 others stayed at 0, below 1, and restarted
    assert int(codebook.restarts) == 15 and (codebook.embed[1:] != before[1:]).any(-1).all()
    # every revived code is one of the batch's (unit) vectors, so it now wins some of them
    unit = F.normalize(batch, dim=-1)
    for code in codebook.embed[1:]:
        assert torch.isclose(unit @ code, torch.ones(1), atol=1e-5).any()
    assert len(codebook.nearest(batch).unique()) > 1


def test_ema_moves_used_codes_towards_their_vectors():
    codebook = CosineCodebook(size=4, dim=2, decay=0.9, threshold=0.0)  # no code is ever dead here
    codebook.embed.copy_(torch.eye(2).repeat(2, 1))
    target = F.normalize(torch.tensor([[1.0, 0.5]]), dim=-1)
    for _ in range(80):
        codebook.update(target.repeat(8, 1) * 3, torch.zeros(8, dtype=torch.long))  # any length: cosine codes
    assert torch.allclose(codebook.embed[0], target[0], atol=1e-3)
    assert torch.equal(codebook.embed[1], torch.tensor([0.0, 1.0]))  # unused codes stay put


@pytest.mark.parametrize("modality", TOKENIZED)
def test_every_tokenizer_encodes_decodes_and_trains(modality, tmp_path):
    spec = registry.get(modality)
    cfg = tokenizer_config(modality, "tiny", codebook_size=32, **({"n_channels": 16} if modality == "clip" else {}))
    model = VQVAE(cfg)
    if modality == "semseg":
        x = torch.randint(0, 133, (2, 224, 224))
    elif modality == "clip":
        x = torch.randn(2, 16, 14, 14)
    else:
        x = torch.rand(2, cfg.n_channels, 224, 224) * 2 - 1
    x = spec.reference_input(x)
    out = model(x, loss=spec.tokenizer["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)  # straight-through
    ids = model.tokenize(x)
    assert ids.shape == (2, 14, 14) and 0 <= int(ids.min()) and int(ids.max()) < 32
    decoded = model.decode_tokens(ids, steps=2)
    assert decoded.shape[-2:] == ((224, 224) if modality != "clip" else (14, 14))
    assert decoded.shape[1] == (134 if modality == "semseg" else cfg.n_channels)
    save_tokenizer(model, tmp_path / modality)
    assert torch.equal(load_tokenizer(tmp_path / modality).tokenize(x), ids)


def test_paper_settings_follow_table_3_and_the_published_architecture():
    sizes = {m: tokenizer_config(m).codebook_size for m in TOKENIZED}
    assert sizes == {"rgb": 16384, "normal": 8192, "depth": 8192, "semseg": 4096, "clip": 8192}
    rgb, clip = VQVAE(tokenizer_config("rgb")), tokenizer_config("clip")
    assert (rgb.cfg.latent_dim, rgb.cfg.patch_size, rgb.cfg.ema_decay, rgb.encoder.width,
            len(rgb.encoder.blocks)) == (32, 16, 0.99, 768, 12)
    assert rgb.cfg.diffusion and not clip.diffusion and registry.get("clip").tokenizer["crop_scale"] == (0.2, 1.0)
    assert rgb.cfg.num_train_timesteps == 1000 and rgb.decoder.base == 256  # the published UNet
    assert float(rgb.noise_scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR: sampling starts from noise


# -- the stages, on a real Ray with a labelled dataset of real photos --------------------------------------
@pytest.fixture(scope="module")
def dataset(ray_address, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    make_labelled_input(root)
    run_label(root, load_config("demo", [f"label.models={tiny_models}", *SETTINGS, *UNSCORED]), ["clip", "semseg"])
    return root


def config(*extra):
    return load_config("demo", [*SETTINGS, *UNSCORED, *extra])


@pytest.fixture(scope="module")
def trained_rgb(dataset):
    train_dense(dataset, config(), "rgb")
    return dataset


def test_training_lowers_the_reconstruction_error_on_photos(trained_rgb):
    cfg = config().tokenizer
    torch.manual_seed(cfg.seed)  # the same initial weights as the run
    initial = VQVAE(model_config(cfg, "rgb")).eval()
    trained = load_tokenizer(tokenizer_dir(trained_rgb, "rgb"))
    photos = eval_batch(str(trained_rgb), "rgb", modality_shards(DatasetLayout(trained_rgb), "rgb"), 4)

    def error(model):  # the training objective on the same photos, noise and timesteps for both models
        with torch.no_grad():
            return float(model(photos, generator=torch.Generator().manual_seed(0))["reconstruction_loss"])

    # seeded: 0.32 -> 0.17 in 16 steps of a tiny model (decoding from noise needs hundreds: test_tokenizer_quality)
    assert error(trained) < 0.7 * error(initial)
    log = [json.loads(line) for line in (tokenizer_dir(trained_rgb, "rgb") / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 16 and {"loss", "codes_used", "perplexity", "psnr_db", "eval_loss", "lr"} <= set(log[-1])
    assert log[-1]["psnr_db_baseline"] == pytest.approx(baseline_metric("rgb", photos))  # the mean-colour image
    assert log[-1]["reconstruction_loss"] < log[0]["reconstruction_loss"]
    assert (tokenizer_dir(trained_rgb, "rgb") / "reconstructions.png").stat().st_size > 1000
    summary = json.loads((tokenizer_dir(trained_rgb, "rgb") / "train.json").read_text())
    assert summary["steps"] == 16 and summary["samples"] == 5  # as the download status counts them


def test_resumed_training_matches_an_uninterrupted_run(trained_rgb, tmp_path):
    import shutil

    # the same dataset in a second root, so the run has its own tokenizer folder
    for name in ("rgb", "caption", "_status"):
        shutil.copytree(trained_rgb / name, tmp_path / name)
    # stopped and resumed (the demo profile trains in this process, Ray Train's local mode: test_pretrain compares
    # a run resumed in process against one on a Ray Train worker, test_modalities trains a tokenizer on a worker)
    in_process = config("tokenizer.workers=0")
    stopped = train_dense(tmp_path, in_process, "rgb", stop_after=5)  # mid-epoch: 2 steps per epoch
    assert stopped["stopped_at"] == 5 and not (tokenizer_dir(tmp_path, "rgb") / "train.json").exists()
    state = json.loads((tokenizer_dir(tmp_path, "rgb") / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    assert set(load_file(tokenizer_dir(tmp_path, "rgb") / "checkpoint" / "optimizer.safetensors"))
    train_dense(tmp_path, in_process, "rgb")
    resumed = load_file(tokenizer_dir(tmp_path, "rgb") / "model.safetensors")
    straight = load_file(tokenizer_dir(trained_rgb, "rgb") / "model.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not (tokenizer_dir(tmp_path, "rgb") / "ray").exists()  # no worker group (its run state lives there)


def test_a_run_killed_after_its_last_checkpoint_finishes_on_rerun(trained_rgb, tmp_path):
    import shutil

    # killed between the final checkpoint and train.json (its worker outlived the driver): no metrics, no summary
    for name in ("rgb", "caption", "_status"):
        shutil.copytree(trained_rgb / name, tmp_path / name)
    shutil.copytree(tokenizer_dir(trained_rgb, "rgb") / "checkpoint", tokenizer_dir(tmp_path, "rgb") / "checkpoint")
    summary = train_dense(tmp_path, config("tokenizer.workers=0"), "rgb")
    assert summary["steps"] == 16 and summary["final"]["step"] == 16
    assert summary["final"]["psnr_db"] > 0 and "psnr_db_baseline" in summary["final"]
    assert (tokenizer_dir(tmp_path, "rgb") / "train.json").is_file()
    trained = load_file(tokenizer_dir(trained_rgb, "rgb") / "model.safetensors")
    finished = load_file(tokenizer_dir(tmp_path, "rgb") / "model.safetensors")
    assert finished.keys() == trained.keys() and all(torch.equal(v, trained[k]) for k, v in finished.items())


def test_epochs_can_be_set_per_tokenizer(dataset):
    from core.config import ConfigError
    from stages.tokenizers.train_tokenizer import make_plan

    cfg = config("tokenizer.epochs_by_modality={clip: 3}").tokenizer
    layout = DatasetLayout(dataset)
    clip, rgb = make_plan(layout, "clip", cfg, 1), make_plan(layout, "rgb", cfg, 1)
    assert clip.steps == 3 * clip.steps_per_epoch and rgb.steps == 8 * rgb.steps_per_epoch
    with pytest.raises(ConfigError, match="lidar"):
        config("tokenizer.epochs_by_modality={lidar: 3}")


def test_text_tokenizer_is_trained_from_captions_and_boxes(dataset, tmp_path):
    import shutil

    for name in ("rgb", "caption", "_status"):
        shutil.copytree(dataset / name, tmp_path / name, dirs_exist_ok=True)
    results = run_train_tokenizers(tmp_path, config(), ["text"])
    assert results["text"]["texts"] == 5  # the corrupt image's caption too: captions do not depend on pixels
    from models.text_tokenizer import load_text_tokenizer

    tokenizer = load_text_tokenizer(tokenizer_dir(tmp_path, "text") / "tokenizer.json")
    assert tokenizer.token_to_id("[S_0]") == 4 and "astronaut" in tokenizer.get_vocab()
    assert run_train_tokenizers(tmp_path, config(), ["text"])["text"]["skipped"]


def test_tokenize_writes_aligned_shards_and_verify_catches_a_broken_one(trained_rgb, capsys):
    root = trained_rgb
    train_dense(root, config("tokenizer.epochs=2", "tokenizer.workers=0"), "clip")
    summary = run_tokenize(root, config())
    assert summary.shards_done == 2 and not summary.failed_shards
    assert summary.status_counts["rgb"] == {"ok": 4, "decode_error": 1}
    assert summary.status_counts["clip"] == {"ok": 4, "decode_error": 1}
    layout = DatasetLayout(root)
    for shard in ("shard-000000", "shard-000001"):
        rgb_keys = [n.split(".")[0] for n in members(layout.tar("rgb", shard))]
        crops = members(layout.tar("crop_settings", shard))
        for folder in ("tok_rgb@224", "tok_clip@224"):
            tokens = members(layout.tar(folder, shard))
            assert [n.split(".")[0] for n in tokens] == [k for k in rgb_keys if k != "000000003"]
            for name, data in tokens.items():
                ids = np.load(io.BytesIO(data))
                assert ids.dtype == np.int16 and ids.shape == (2, 196) and ids.min() >= 0
                assert ids.max() < load_tokenizer(tokenizer_dir(root, folder[4:-4])).cfg.codebook_size
                settings = np.load(io.BytesIO(crops[name]))
                assert settings.shape == (2, 5) and settings[0, 4] == 0  # crop 0: the center crop, unflipped
                assert settings[0, 2] == settings[0, 3]  # square
        # beside them, each crop of the photo at 224 (a JPEG), what the 4M loader reads for rgb@224: within
        # 40 dB of the crop cut from the whole photo decoded, as the loader otherwise makes it
        photos, stored = members(layout.tar("rgb", shard)), members(layout.tar("crops_rgb@224", shard))
        assert [n.split(".")[0] for n in stored] == [n.split(".")[0] for n in crops]
        for name, member in stored.items():
            settings = np.load(io.BytesIO(crops[name.replace(".npz", ".npy")]))
            for index, crop in enumerate(settings):
                whole = crop_pixels(photos[name.replace(".npz", ".jpg")], crop)
                cut = stored_crop_pixels(member, index, crop)
                assert psnr(pixels_picture(cut), pixels_picture(whole)) >= 40
    # a redone shard gets the same crops and tokens
    before = members(layout.tar("tok_rgb@224", "shard-000001"))
    layout.stats("tokenize_rgb", "shard-000001").unlink()
    again = run_tokenize(root, config())
    assert again.shards_done == 1 and again.shards_skipped == 1
    assert members(layout.tar("tok_rgb@224", "shard-000001")) == before

    # The fixture's one corrupt JPEG (committed as ok, as disk corruption would leave it) failed every later
    # stage: alignment dropped it from rgb and caption too, kept its members aside and recorded why.
    problems, checked = verify_dataset(root)
    assert problems == []
    assert checked["shards"] == 2 and checked["folders"] == 8  # rgb caption semseg clip crop_settings
    # crops_rgb@224 tok_x2
    assert list(members(root / "_dropped" / "rgb" / "shard-000001.tar")) == ["000000003.jpg"]
    assert list(members(root / "_dropped" / "caption" / "shard-000001.tar")) == ["000000003.txt"]
    align = {r["key"]: r for r in pq.read_table(layout.status_table("align", "shard-000001")).to_pylist()}
    assert align["000000004"]["status"] == "ok" and align["000000003"]["status"] == "dropped"
    assert "missing from clip" in align["000000003"]["error"] and "label_clip: decode_error" in align["000000003"]["error"]

    # break one shard: a token id out of the vocabulary and a key dropped without a recorded failure
    path = layout.tar("tok_clip@224", "shard-000000")
    kept = members(path)
    first, second = list(kept)[:2]
    bad = np.load(io.BytesIO(kept[first]))
    bad[0, 0] = 30000
    buf = io.BytesIO()
    np.save(buf, bad)
    with tarfile.open(path, "w") as tar:
        for name, data in ((first, buf.getvalue()),) + tuple((n, d) for n, d in kept.items() if n not in (first,
                                                                                                          second)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    capsys.readouterr()
    assert cli(["verify", "--data", str(root)]) == 1
    out = capsys.readouterr().out
    assert "shard-000000: 2 problem(s)" in out and "outside 0..31" in out
    assert f"not aligned with rgb: 1 keys missing ['{second.split('.')[0]}'] (no failure recorded" in out
    assert "shard-000001" not in out


def test_status_reads_each_stage_from_the_status_files(trained_rgb, capsys):
    from pipeline.status import stage_rows

    rows = {r["stage"]: r for r in stage_rows(trained_rgb)}
    assert rows["download"]["shards"] == "2/2" and rows["label_clip"]["shards"] == "2/2"
    assert rows["label_clip"]["failures"] == "decode_error 1" and rows["label_clip"]["remaining_s"] == 0.0
    assert rows["label_clip"]["samples_per_s"] > 0 and rows["label_clip"]["elapsed_s"] >= 0
    assert cli(["status", "--data", str(trained_rgb)]) == 0
    out = capsys.readouterr().out
    assert "label_semseg" in out and "rgb        trained (16 steps)" in out


def test_a_sample_failed_anywhere_is_dropped_everywhere_so_a_positional_zip_never_diverges(ray_address, tiny_models,
                                                                                           tmp_path):
    """One labeler fails on a sample in the middle of a shard and on the last sample of another; after tokenize
    every folder holds the same keys, and zipping the tars position by position (as the reference loader does)
    yields every surviving sample whole."""
    from models.labelers import ClipLabeler, load_labeler
    from models.vqvae import save_tokenizer
    from stages.label.label import label_shard

    def injected(image) -> bool:  # coffee (400x600) is key 1, mid shard 0; the grey camera is key 4, shard 1's last
        return image.shape[:2] == (400, 600) or bool((image[..., 0] == image[..., 1]).all())

    class FailingClip(ClipLabeler):
        def launch(self, images):
            if any(injected(im) for im in images):
                raise RuntimeError("injected failure")
            return super().launch(images)

    root = tmp_path / "data"
    make_labelled_input(root, corrupt_key=None)
    models = tiny_models
    cfg = config(f"label.models={models}").label
    labelers = {"clip": FailingClip(models["clip"], "cpu", 2), "semseg": load_labeler("semseg", models["semseg"], "cpu", 2)}
    for shard in ("shard-000000", "shard-000001"):
        label_shard(str(root), shard, labelers, cfg)
    layout = DatasetLayout(root)
    assert [k.split(".")[0] for k in members(layout.tar("clip", "shard-000001"))] == ["000000003"]
    for modality in ("rgb", "clip"):  # untrained tokenizers are enough to write token shards
        tokenizer_cfg = config().tokenizer
        save_tokenizer(VQVAE(model_config(tokenizer_cfg, modality, layout)), tokenizer_dir(root, modality))
        (tokenizer_dir(root, modality) / "train.json").write_text("{}")

    summary = run_tokenize(root, config())
    assert not summary.failed_shards and not summary.unaligned and summary.dropped == 2
    folders = layout.loader_folders()
    assert folders == ["caption", "clip", "crop_settings", "crops_rgb@224", "rgb", "semseg", "tok_clip@224",
                       "tok_rgb@224"]
    survivors = []
    for shard in ("shard-000000", "shard-000001"):
        tars = [tarfile.open(layout.tar(f, shard)) for f in folders]
        streams = [[m for m in tar if m.isfile()] for tar in tars]
        assert len({len(s) for s in streams}) == 1, "every folder holds as many samples"
        for position in zip(*streams):  # the reference loader's zip: one member per folder, by position
            keys = {m.name.split(".", 1)[0] for m in position}
            assert len(keys) == 1, f"{shard}: folders diverge at {[m.name for m in position]}"
            survivors.append(keys.pop())
    assert survivors == ["000000000", "000000002", "000000003"]
    assert verify_dataset(root)[0] == []
    dropped = {r["key"]: r["error"] for shard in ("shard-000000", "shard-000001")
               for r in pq.read_table(layout.status_table("align", shard)).to_pylist() if r["status"] == "dropped"}
    assert set(dropped) == {"000000001", "000000004"}
    assert all("label_clip: model_error: RuntimeError: injected failure" in e for e in dropped.values())
    assert sorted(members(root / "_dropped" / "rgb" / "shard-000001.tar")) == ["000000004.jpg"]
    # Nothing to do the second time: the shards stay as they are.
    before = {f: layout.tar(f, "shard-000000").stat().st_mtime_ns for f in folders}
    assert run_tokenize(root, config()).shards_done == 0
    assert {f: layout.tar(f, "shard-000000").stat().st_mtime_ns for f in folders} == before


def test_loader_workers_serve_each_step_the_same_batch_wherever_the_run_resumes(dataset):
    from stages.tokenizers.train_tokenizer import Plan, TokenizerBatches

    shards = modality_shards(DatasetLayout(dataset), "rgb")
    assert len(shards) == 2
    # two DataLoader processes, one per shard; 3 steps an epoch, so slots and epochs fall out of step
    plan = Plan(samples=5, world=1, local_batch=2, steps_per_epoch=3, steps=9, warmup_steps=0, lr=0.0,
                loader_workers=2)

    def steps_from(start):
        data = TokenizerBatches(str(dataset), "rgb", shards, (0.5, 1.0), 0, 0, plan, start)
        # spawned, not forked: a fork of this process (Ray, Prefect threads) is not what the trainer forks
        return list(torch.utils.data.DataLoader(data, batch_size=None, num_workers=2, multiprocessing_context="spawn"))

    straight = steps_from(0)
    assert len(straight) == 9 and straight[0].shape[:2] == (2, 3)
    assert not torch.equal(straight[0], straight[1])
    for start in (4, 5):  # a worker serving the other slot than it would from step 0
        resumed = steps_from(start)
        assert len(resumed) == 9 - start
        assert all(torch.equal(a, b) for a, b in zip(resumed, straight[start:]))


def test_published_tokenizers_converted_for_a_dataset_tokenize_and_decode_it(dataset, tiny_models, tmp_path, capsys):
    """`convert-tokenizer` installs tokenizers in the reference's layout (here the tiny ones its own classes made,
    tests/fixtures/reference) as a dataset's rgb and semseg tokenizers; tokenize then encodes every crop through them
    with the reference's preprocessing, and the stages' one way in decodes their tokens back into our maps."""
    import shutil
    from pathlib import Path

    from models.labelers import ClipLabeler
    from stages.tokenizers import dataset_tokenizers as tokenizers
    from stages.tokenizers.tokenizer_data import crop_to_tensor, photo_crop, read_members, shard_samples

    published = Path(__file__).parent / "fixtures" / "reference" / "tokenizers"
    root = tmp_path / "dataset"
    # the labelled dataset without what earlier tests tokenized into it
    shutil.copytree(dataset, root, ignore=shutil.ignore_patterns("tokenizers", "tok_*", "crop_settings", "tokenize_*"))
    # one through the command, one through the profile's `tokenizer.published` (train-tokenizer installs it)
    assert cli(["convert-tokenizer", "--checkpoint", str(published / "rgb"), "--modality", "rgb", "--data",
                str(root)]) == 0
    installed = run_train_tokenizers(root, config(f"tokenizer.published={{semseg: {published / 'semseg'}}}"),
                                     ["semseg"])
    assert installed["semseg"]["converted_from"] == str(published / "semseg")
    for name in ("rgb", "semseg"):
        out = tokenizer_dir(root, name)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "train.json"]
    # the wrong modality, or one already installed, is refused by name before anything is written
    with pytest.raises(ValueError, match=r"rgb is 3-channel images: the tokenizer reads n_channels=1"):
        tokenizers.convert_published(published / "depth", "rgb", tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match="already holds a tokenizer"):
        tokenizers.convert_published(published / "rgb", "rgb", tokenizer_dir(root, "rgb"))
    assert not (tmp_path / "elsewhere").exists()

    # and a feature tokenizer in the published layout (for the tiny CLIP's features): it saw CLIP run on each crop
    layout = DatasetLayout(root)
    stored = np.load(io.BytesIO(dict(read_members(layout.tar("clip", "shard-000000"), "npy"))["000000000"]))
    torch.manual_seed(0)
    save_tokenizer(VQVAE(tokenizer_config("clip", "tiny", n_channels=stored.shape[-1], codebook_size=64)),
                   tmp_path / "published-clip")
    tokenizers.convert_published(tmp_path / "published-clip", "clip", tokenizer_dir(root, "clip"))

    summary = run_tokenize(root, config(f"label.models={tiny_models}"), ["rgb", "semseg", "clip"])
    assert summary.status_counts["rgb"]["ok"] == 4 and not summary.failed_shards
    crops = members(layout.tar("crop_settings", "shard-000000"))
    for modality, folder, side in (("rgb", "tok_rgb@224", 14), ("semseg", "tok_semseg@224", 28)):  # semseg: patch 8
        tokenizer = tokenizers.load(root, modality)
        tokens = members(layout.tar(folder, "shard-000000"))
        key, label, size = next(shard_samples(layout, modality, "shard-000000"))
        ids = np.load(io.BytesIO(tokens[f"{key}.npy"]))
        settings = np.load(io.BytesIO(crops[f"{key}.npy"]))
        inputs = torch.stack([crop_to_tensor(modality, label, c, size) for c in settings])
        expected = tokenizer.model.tokenize(tokenizer.modality.reference_input(inputs)).flatten(1)
        assert ids.shape == (2, side * side) and np.array_equal(ids, expected.numpy())
        decoded = tokenizer.decode(torch.from_numpy(ids).long(), seeds=[0, 1])
        assert decoded.shape == ((2, 3, 224, 224) if modality == "rgb" else (2, 133, 224, 224))
        assert torch.equal(decoded, tokenizer.decode(torch.from_numpy(ids).long(), seeds=[0, 1]))  # seeded
    assert tokenizers.load(root, "semseg").classes == 133

    # tokenize ran the CLIP labeler on every crop of the photo, not cut the stored whole-image map (a tokenizer
    # trained here keeps reading crops of the stored map, as it was trained)
    tokenizer = tokenizers.load(root, "clip")
    labeler = ClipLabeler(tiny_models["clip"], "cpu", 8, short_side=224, normalisation="imagenet")  # as its training
    photo = np.asarray(registry.photo().decode(dict(read_members(layout.tar("rgb", "shard-000000"), "jpg"))[
        "000000000"]))
    settings = np.load(io.BytesIO(crops["000000000.npy"]))
    per_crop = torch.stack([torch.as_tensor(f).float().permute(2, 0, 1)
                            for f in labeler([photo_crop(photo, c) for c in settings])])
    ids = np.load(io.BytesIO(members(layout.tar("tok_clip@224", "shard-000000"))["000000000.npy"]))
    assert np.array_equal(ids, tokenizer.encode(per_crop).numpy())
    cut = torch.stack([crop_to_tensor("clip", stored, c, photo.shape[:2]) for c in settings])
    assert cut.shape == per_crop.shape and not np.array_equal(ids, tokenizer.encode(cut).numpy())  # not the map's
    made = json.loads(layout.stats("tokenize_clip", "shard-000000").read_text())["provenance"]["models"]["clip"]
    assert made["features_per_crop"]["random_weights"] is True  # the labeler that made them, recorded


def test_the_tokenize_benchmark_runs_and_reports_every_tokenizer(tmp_path):
    """`make bench-tokenize` at the tiny size on two photos: every tokenizer's stage, encoder and decode rates."""
    run = subprocess.run([sys.executable, "bench/bench_tokenize.py", "--size", "tiny", "--images", "2", "--crops", "1",
                          "--decode-samples", "1", "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout[run.stdout.index("\n{") + 1:])
    assert report["size"] == "tiny" and set(report["results"]) == set(TOKENIZED)
    for rates in report["results"].values():
        assert rates["samples_per_s"] > 0 and rates["encoder_samples_per_s"] > 0 and rates["decode_samples_per_s"] > 0



def test_a_small_datasets_decoded_shards_are_kept_across_epochs_and_a_rewritten_shard_is_read_anew(tmp_path):
    """Tokenizer training decodes a shard that fits in the kept budget once (the demo's seven photos are cropped
    anew at every step, an epoch a step), hands out copies, and reads a shard again once it is rewritten."""
    import os

    from stages.tokenizers.train_tokenizer import decoded_samples
    from tests.helpers import write_rgb_shard

    layout, keys = write_rgb_shard(tmp_path, [(64, 64), (48, 80)])
    first = list(decoded_samples(layout, "rgb", "shard-000000"))
    assert [k for k, _, _ in first] == keys and first[1][1].shape == (48, 80, 3)
    first[0][1][:] = 0  # a user of the samples changes its copy, not the kept one
    path = layout.tar("rgb", "shard-000000")
    stat = path.stat()
    original = path.read_bytes()
    path.write_bytes(original[:512] + bytes(len(original) - 512))  # same size, unreadable members ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))        # ... and the same time: the kept decode is used
    again = list(decoded_samples(layout, "rgb", "shard-000000"))
    assert [k for k, _, _ in again] == keys and again[0][1].any()
    path.write_bytes(original)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten: read anew
    assert [k for k, _, _ in decoded_samples(layout, "rgb", "shard-000000")] == keys


def test_a_depth_reconstruction_is_drawn_on_its_inputs_scale():
    """A nearly flat depth crop reconstructed within 1e-3 (in the tokenizer's standardised space) is drawn as nearly
    flat too: taken back with the input's own statistics, not stretched to the full colour range by its own."""
    depth = registry.get("depth")
    x = torch.full((1, 1, 16, 16), 0.2) + torch.linspace(0, 0.02, 16)[None, None, None, :]
    y = depth.reference_input(x) + 1e-3 * torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    drawn = depth.on_input_scale(y, x)
    assert (drawn - x).abs().max() < 1e-3
    assert float(depth.from_reference_output(y).max() - depth.from_reference_output(y).min()) == pytest.approx(2)
    pictures = [depth.tensor_picture(t[0]) for t in (x, drawn)]
    assert abs(pictures[0] - pictures[1]).max() < 0.02  # the two rows of the panel look alike
