"""The 4M loader on token shards written by the project's shard writer: one crop for every modality, held-out
validation shards, boxes moved into the crop, repeated masks, worker processes, and folders out of step."""
import io
import json
import tarfile

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from core.config import load_config
from models.text_tokenizer import train_text_tokenizer
from stages.dataset.shards import DatasetLayout, ShardWriter
from stages.fourm.datasets import make_loader
from stages.fourm.fourm_data import (
    LoaderInputError,
    MaskedSamples,
    loader_folders,
    pixels_picture,
    shard_samples,
    split_shards,
    stored_crops,
)
from stages.fourm.masking import Component, MaskingSampler

MODALITIES = ["rgb@224", "tok_rgb@224", "caption", "det"]
CROPS = np.array([[0, 0, 64, 48, 0],     # crop 0: the left (red) half
                  [0, 48, 64, 48, 0],    # crop 1: the right (blue) half
                  [0, 48, 64, 48, 1]],   # crop 2: the right half, mirrored
                 dtype=np.int32)


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_dataset(root, shards=3, per_shard=4):
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :48] = (0, 0, 255)    # BGR: red on the left
    image[:, 48:] = (255, 0, 0)    # blue on the right
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    layout = DatasetLayout(root)
    det = {"instances": [{"boxes": [0.05, 0.1, 0.4, 0.9], "class_name": "cat", "score": 0.9},
                         {"boxes": [0.05, 0.1, 0.3, 0.5], "class_name": "dog", "score": 0.3}]}
    for s in range(shards):
        shard = f"shard-{s:06d}"
        folders = ["rgb", "caption", "det", "tok_rgb@224", "crop_settings"]
        with ShardWriter(layout, "synthetic", shard, folders) as writer:
            keys = [f"{s:03d}{i:06d}" for i in range(per_shard)]
            for key in keys:
                tokens = np.stack([np.full(196, 10 * s + c, np.int16) for c in range(len(CROPS))])
                writer.write(key, {"rgb": ("jpg", jpeg), "caption": ("txt", f"a photo number {key}".encode()),
                                   "det": ("json", json.dumps(det).encode()), "tok_rgb@224": ("npy", npy(tokens)),
                                   "crop_settings": ("npy", npy(CROPS))})
            writer.commit(pa.table({"key": keys, "status": ["ok"] * len(keys)}), {})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    write_dataset(root)
    return root


@pytest.fixture(scope="module")
def tokenizer(dataset):
    return train_text_tokenizer(["a photo number", "a cat and a dog"], 4400,
                                dataset / "tokenizers" / "text" / "tokenizer.json")


def config(*extra):
    return load_config("paper", ["pretrain.modalities=[rgb@224, tok_rgb@224, caption, det]", "pretrain.val_shards=1",
                                 "pretrain.shuffle_buffer=8", "pretrain.input_tokens=64", "pretrain.target_tokens=64",
                                 *extra])


def all_visible_sampler(tokenizer):
    """Every token an input: the samples' content is read straight off the batch."""
    mixture = [Component({m: 1.0 for m in MODALITIES}, {"tok_rgb@224": 1.0}, keep={"caption": "all", "det": "all"})]
    return MaskingSampler(MODALITIES, mixture, 1000, 8, tokenizer)


def test_one_crop_for_every_modality_and_boxes_moved_into_it(dataset, tokenizer):
    train, _ = split_shards(dataset, MODALITIES, 1)
    samples = MaskedSamples(dataset, train, MODALITIES, all_visible_sampler(tokenizer), train=True, repeats=1,
                            min_score=0.6, shuffle_buffer=4, seed=0)
    crops_seen = set()
    for i, sample in zip(range(40), samples):
        crop = int(sample["tok_rgb@224"]["tensor"][0]) % 10
        crops_seen.add(crop)
        assert (sample["tok_rgb@224"]["tensor"] == sample["tok_rgb@224"]["tensor"][0]).all()
        pixels = sample["rgb@224"]["tensor"]  # ImageNet-normalised: red has a high first channel
        red = pixels[0].mean() > pixels[2].mean()
        assert red == (crop == 0), (crop, pixels.mean((1, 2)))
        det = tokenizer.decode(sample["det"]["tensor"][~sample["det"]["input_mask"]].tolist(),
                               skip_special_tokens=False)
        assert ("cat" in det) == (crop == 0) and "dog" not in det  # outside crops 1-2; the dog scores 0.3
    assert crops_seen == {0, 1, 2}


def test_validation_shards_are_held_out(dataset, tokenizer):
    train, val = split_shards(dataset, MODALITIES, 1)
    assert val == ["shard-000002"] and train == ["shard-000000", "shard-000001"]
    cfg = config("pretrain.repeats=4")
    seen = set()
    for batch, _ in zip(make_loader(dataset, cfg, tokenizer, split="train", batch_size=4, workers=0), range(30)):
        seen |= set((batch["tok_rgb@224"]["tensor"][:, 0] // 10).tolist())
    assert seen == {0, 1}  # never shard 2
    val_batches = list(make_loader(dataset, cfg, tokenizer, split="val", batch_size=3, workers=0))
    ids = torch.cat([b["tok_rgb@224"]["tensor"][:, 0] for b in val_batches])
    assert ids.tolist() == [20] * 4  # shard 2, center crop, each sample once, unshuffled


def test_batches_come_from_worker_processes_in_the_models_layout(dataset, tokenizer):
    loader = make_loader(dataset, config(), tokenizer, split="train", batch_size=6, workers=2)
    batch = next(iter(loader))
    assert batch["rgb@224"]["tensor"].shape == (6, 3, 224, 224)
    assert batch["tok_rgb@224"]["tensor"].shape == (6, 196) and batch["caption"]["tensor"].shape == (6, 514)
    for m in MODALITIES:
        assert batch[m]["input_mask"].dtype == torch.bool and batch[m]["target_mask"].shape[0] == 6
    visible = sum(int((~batch[m]["input_mask"]).sum()) for m in MODALITIES)
    assert visible <= 6 * 64  # the input budget


def test_folders_out_of_step_are_an_error_naming_the_shard(tmp_path):
    write_dataset(tmp_path, shards=2, per_shard=3)
    layout = DatasetLayout(tmp_path)
    with ShardWriter(layout, "synthetic", "shard-000000", ["caption"]) as writer:  # caption loses its first key
        for key in ("000000001", "000000002"):
            writer.write(key, {"caption": ("txt", b"x")})
        writer.commit(pa.table({"key": ["000000001", "000000002"], "status": ["ok", "ok"]}), {})
    with pytest.raises(LoaderInputError, match="shard-000000.*align"):
        list(shard_samples(tmp_path, "shard-000000", ["caption", "rgb"]))


def test_too_few_shards_for_the_held_out_split_is_refused(dataset):
    with pytest.raises(LoaderInputError, match="val_shards=3"):
        split_shards(dataset, MODALITIES, 3)


def test_the_model_trains_on_the_loaders_batches(dataset, tokenizer):
    from models.fourm import FourM, FourMConfig

    cfg = config()
    model = FourM(FourMConfig(dim=64, encoder_depth=1, decoder_depth=1, num_heads=2, domains_in=MODALITIES,
                              domains_out=["tok_rgb@224", "caption", "det"],
                              vocab_sizes={"tok_rgb@224": 64, "caption": tokenizer.get_vocab_size(),
                                           "det": tokenizer.get_vocab_size()}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = next(iter(make_loader(dataset, cfg, tokenizer, split="train", batch_size=8, workers=0)))
    losses = []
    for _ in range(15):  # one batch, over and over: the loss must fall
        loss, per_modality = model(batch, cfg.pretrain.input_tokens, cfg.pretrain.target_tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(per_modality) == {"tok_rgb@224", "caption", "det"}
    assert losses[-1] < 0.7 * losses[0]


def test_inspect_masking_prints_the_mean_tokens_and_draws_a_sample(dataset, tokenizer, tmp_path, capsys):
    from PIL import Image

    from pipeline.cli import main as cli

    args = ["inspect-masking", "--data", str(dataset), "--samples", "200", "--out", str(tmp_path / "masked.png"),
            "--set", "pretrain.modalities=[rgb@224, tok_rgb@224, caption, det]"]
    assert cli([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    means = report["mean_tokens"]
    assert report["samples"] == 200 and set(means) == set(MODALITIES)
    assert means["rgb@224"]["target"] == 0 and 0 < means["rgb@224"]["input"] <= 128
    assert sum(m["input"] for m in means.values()) <= 128 and sum(m["target"] for m in means.values()) <= 128
    assert Image.open(tmp_path / "masked.png").width > 100
    assert cli(args) == 0
    assert "tok_rgb@224" in capsys.readouterr().out


def test_stored_224_crops_are_read_instead_of_the_whole_photo_and_the_batches_stay_the_same(dataset, tokenizer,
                                                                                          tmp_path):
    """Where tokenize stored each crop of the photo at 224 (`crops_rgb@224`), the loader decodes those instead of
    the whole photo: the same samples, crops, masks and texts for the same seed, the pixels within 40 dB; a
    dataset with some shard lacking them reads every photo whole."""
    import shutil

    from stages.dataset.shards import CROP_PIXELS
    from stages.tokenizers.tokenizer_data import crop_jpegs

    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    layout = DatasetLayout(root)
    for shard in ("shard-000000", "shard-000001", "shard-000002"):
        with tarfile.open(layout.tar("rgb", shard)) as tar:
            photos = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar}
        with ShardWriter(layout, "crops", shard, [CROP_PIXELS]) as writer:
            for key, jpeg in photos.items():
                writer.write(key, {CROP_PIXELS: ("npz", crop_jpegs(jpeg, CROPS))})
            writer.commit(pa.table({"key": list(photos), "status": ["ok"] * len(photos)}), {})
    pixels_only = ["rgb@224", "tok_rgb@224"]
    assert loader_folders(pixels_only, root) == ["crop_settings", CROP_PIXELS, "tok_rgb@224"]
    assert "rgb" in loader_folders(MODALITIES, root) and CROP_PIXELS in loader_folders(MODALITIES, root)
    assert loader_folders(pixels_only, dataset) == loader_folders(pixels_only) == ["crop_settings", "rgb",
                                                                                   "tok_rgb@224"]

    def first(where, count=12):
        train, _ = split_shards(where, MODALITIES, 1)
        stream = MaskedSamples(where, train, MODALITIES, all_visible_sampler(tokenizer), train=True, repeats=2,
                               min_score=0.6, shuffle_buffer=4, seed=3)
        return [s for _, s in zip(range(count), stream)]

    for whole, cut in zip(first(dataset), first(root)):
        for m in MODALITIES:
            for k in whole[m]:
                if (m, k) != ("rgb@224", "tensor"):
                    assert torch.equal(whole[m][k], cut[m][k]), (m, k)
        a, b = pixels_picture(whole["rgb@224"]["tensor"]), pixels_picture(cut["rgb@224"]["tensor"])
        assert 10 * np.log10(1 / max(float(np.mean((a - b) ** 2)), 1e-12)) >= 40
    # and where the download recorded each photo's size (every downloaded dataset), the boxes' crop reads the size
    # from its status table instead of the photo: the photo is not read at all, the samples are the same
    from stages.fourm.fourm_data import PHOTO_SIZE

    for shard in ("shard-000000", "shard-000001", "shard-000002"):
        keys = [r["key"] for r in layout.read_status("synthetic", shard).to_pylist()]
        with ShardWriter(layout, "download", shard, []) as writer:
            writer.commit(pa.table({"key": keys, "status": ["ok"] * len(keys), "width": [96] * len(keys),
                                    "height": [64] * len(keys)}), {})
    assert loader_folders(MODALITIES, root) == sorted([PHOTO_SIZE, "caption", "crop_settings", CROP_PIXELS, "det",
                                                       "tok_rgb@224"])
    for photo, size in zip(first(dataset), first(root)):
        for m in MODALITIES:
            for k in photo[m]:
                if (m, k) != ("rgb@224", "tensor"):
                    assert torch.equal(photo[m][k], size[m][k]), (m, k)
    layout.tar(CROP_PIXELS, "shard-000002").unlink()  # one shard without them: every photo read whole
    assert not stored_crops(root) and "rgb" in loader_folders(pixels_only, root)
    assert "rgb" in loader_folders(MODALITIES, root) and PHOTO_SIZE not in loader_folders(MODALITIES, root)


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_loaders_tar_reader_reads_what_tarfile_reads_and_refuses_a_corrupt_header(tmp_path, tar_format):
    """Members by name and bytes as tarfile lists them: long names (pax records, GNU long names, ustar prefixes),
    float mtimes (a pax record each), empty members, a directory skipped; a damaged header is an error naming the
    file and the byte."""
    from stages.fourm.fourm_data import _members

    path = tmp_path / "shard-000000.tar"
    names = ["000000001.jpg", "000000001.txt", "d" * 60 + "/" + "k" * 90 + ".npy", "000000002.json"]
    with tarfile.open(path, "w", format=tar_format) as tar:
        tar.addfile(_directory("a_directory"))
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = bytes(range(256)) * i + b"x" * (i * 700)
            info.size, info.mtime = len(data), 1700000000.5
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name.split(".", 1)[0], tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(_members(path)) == expected and len(expected) == 4
    original = path.read_bytes()
    with tarfile.open(path) as tar:
        second = next(m for m in tar if m.name == names[1])
    damaged = bytearray(original)
    damaged[second.offset + 10] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(LoaderInputError, match="corrupt tar header at byte"):
        list(_members(path))
    path.write_bytes(original[:second.offset_data + 100])  # a shard cut short inside a member
    with pytest.raises(LoaderInputError, match="cut short inside a member"):
        list(_members(path))


def _directory(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_pixels_are_normalised_as_imagenet_s_mean_and_std_say(tmp_path):
    from stages.fourm.fourm_data import IMAGENET_MEAN, IMAGENET_STD, normalised

    bgr = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for flip in (0, 1):
        rgb = bgr[:, ::-1, ::-1] if flip else bgr[:, :, ::-1]
        expected = ((rgb.astype(np.float64) / 255 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
        assert np.abs(normalised(bgr, flip).numpy() - expected).max() < 1e-6


def test_npy_members_read_as_numpy_reads_them_and_pickles_are_refused():
    from stages.fourm.fourm_data import npy_array

    arrays = [np.arange(784, dtype=np.int16).reshape(4, 196), np.zeros((2, 5), np.int32), np.array(3.5),
              np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.zeros((0, 196), np.int16)]
    for array in arrays:
        read = npy_array(npy(array))
        assert read.dtype == array.dtype and read.shape == array.shape and np.array_equal(read, array)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LoaderInputError, match="pickled"):
        npy_array(buffer.getvalue())
    with pytest.raises(LoaderInputError, match="magic"):
        npy_array(b"not a numpy file")


@pytest.mark.parametrize("store", [True, False])
def test_tokenize_stores_the_224_crops_unless_told_not_to(tmp_path, store):
    """`tokenizer.store_crops` (on by default): each sample's crop settings, and its photo's crops at 224 beside
    them; off, the settings alone and the loader reads each photo whole."""
    from stages.dataset.shards import CROP_PIXELS
    from stages.tokenizers.tokenize import write_crops
    from stages.tokenizers.tokenizer_data import rgb_index
    from tests.helpers import write_rgb_shard

    assert load_config("paper").tokenizer.store_crops
    layout, keys = write_rgb_shard(tmp_path, [(96, 128), (80, 80)])
    cfg = load_config("demo", [f"tokenizer.store_crops={store}"]).tokenizer
    stats = write_crops(layout, "shard-000000", cfg, rgb_index(layout, "shard-000000"))
    assert stats["status_counts"] == {"ok": 2}
    assert layout.tar(CROP_PIXELS, "shard-000000").is_file() == store and stored_crops(tmp_path) == store
    with tarfile.open(layout.tar("crop_settings", "shard-000000")) as tar:
        assert [m.name for m in tar] == [f"{k}.npy" for k in keys]
