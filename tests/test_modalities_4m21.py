"""4M-21's modalities, each one registry entry in `models/modalities_4m21.py`, against the reference's own
transforms (fixtures made by tests/fixtures/reference/make_palette_texts.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core import registry
from core.config import load_config
from tests.helpers import UNSCORED, photo

FIXTURE = json.loads((Path(__file__).parent / "fixtures/reference/palette_texts.json").read_text())
MODULE = "models.modalities_4m21"
NETWORKS = "models.modalities_4m21_networks"


@pytest.fixture
def m21():
    """The module, imported the way a profile imports it (imported directly, it would join every set's listing)."""
    import importlib

    registry.ModalitySet([MODULE])
    yield importlib.import_module(MODULE)


def test_palette_texts_equal_the_references_for_every_size(m21):
    modality, palette_text, text_palette = m21.ColorPalette(), m21.palette_text, m21.text_palette
    for name, stored in FIXTURE["photos"].items():
        texts = FIXTURE["texts"][name]
        assert sorted(texts, key=int) == [str(n) for n in range(1, 8)]
        for size, text in texts.items():
            assert palette_text(stored, int(size)) == text
        data = json.dumps(stored).encode()
        assert modality.to_text(data, None, None, 0.0) == texts["7"]  # without a generator (validation): all 7
        rng = np.random.default_rng(0)
        drawn = [modality.to_text(data, None, None, 0.0, rng=rng) for _ in range(200)]
        assert set(drawn) == set(texts.values())  # training draws a size per load, as the reference does
        assert text_palette(texts["3"]) == stored[0]["3"]


def test_the_labeler_stores_the_references_format_the_same_each_time(m21):
    modality, labeler = m21.ColorPalette(), m21.PaletteLabeler()
    for name, stored in FIXTURE["photos"].items():
        label = labeler.compute(np.asarray(photo(name)))
        assert json.loads(modality.encode(label)) == stored  # the reference read exactly these (fixture)
        assert [len(label[str(n)]) for n in range(1, 8)] == list(range(1, 8))  # a photo has 7 colours to give
        assert all(0 <= v <= 255 and isinstance(v, int) for colours in label.values() for c in colours for v in c)
    flat = labeler.compute(np.full((40, 30, 3), 200, np.uint8))  # one colour: every size gives that one
    assert all(colours == [[200, 200, 200]] for colours in flat.values())


def test_palette_texts_are_whole_tokens_of_the_caption_vocabulary(tmp_path):
    from models.text_tokenizer import load_text_tokenizer, train_text_tokenizer

    train_text_tokenizer(["a photo of a cat"], 4500, tmp_path / "tokenizer.json")
    tokenizer = load_text_tokenizer(tmp_path / "tokenizer.json")
    ids = tokenizer.encode(FIXTURE["texts"]["coffee"]["7"]).ids
    assert len(ids) == 1 + 7 * 3 and tokenizer.token_to_id("[UNK]") not in ids  # + EOS + sentinel: the 23 allowed


def test_a_profile_names_the_4m21_modalities_the_paper_profile_keeps_the_seven(m21):
    paper = load_config("paper")
    assert "color_palette" not in paper.modality_set.names() and "color_palette" not in paper.label.labelers
    mine = load_config("paper", ["modalities=[models.modalities_4m21]"])
    assert "color_palette" in mine.modality_set.names() and "color_palette" in mine.label.labelers
    domain = mine.modality_set.domain("color_palette")
    assert (domain.kind, domain.folder, domain.vocab_size) == ("sequence", "color_palette", 30000)
    stored = FIXTURE["photos"]["astronaut"]
    picture = registry.get("color_palette").picture(stored, None)
    assert picture.shape == (224, 224, 3) and np.allclose(picture[0, 0], np.array(stored[0]["7"][0]) / 255)
    assert "color_palette" not in load_config("paper").modality_set.names()  # one profile's, not the next one's


@pytest.mark.parametrize("text, colours", [("v1=2 v0=1 v0=2 v0=3 v0=4 v0=5", [[1, 2, 3]]), ("a cat", [])])
def test_a_generated_palette_keeps_whole_colours(m21, text, colours):
    assert m21.ColorPalette().generated(text) == {"colours": colours}


def test_the_loader_draws_a_palette_size_per_training_load_and_reads_all_seven_in_validation(m21):
    import io

    from stages.dataset.shards import CROPS
    from stages.fourm.fourm_data import decode_sample

    registry.ModalitySet([MODULE])
    crops = io.BytesIO()
    np.save(crops, np.array([[0, 0, 64, 64, 0]]))
    stored = FIXTURE["photos"]["coffee"]
    raw = {CROPS: crops.getvalue(), "color_palette": json.dumps(stored).encode()}
    texts = FIXTURE["texts"]["coffee"]
    assert decode_sample(raw, ["color_palette"], 0, 0.0)["color_palette"] == texts["7"]  # validation: no generator
    rng = np.random.default_rng(0)
    drawn = {decode_sample(raw, ["color_palette"], 0, 0.0, rng)["color_palette"] for _ in range(100)}
    assert drawn == set(texts.values())


def test_the_registry_agrees_with_the_references_modality_table(m21):
    """Every domain of the 4M-7 and 4M-21 entries: the reference's type, vocabulary and most tokens (fixture made
    from its `modality_info.py` by tests/fixtures/reference/make_modality_info.py)."""
    modalities = registry.ModalitySet([MODULE, NETWORKS, "models.modalities_4m21_external"])
    table = json.loads((Path(__file__).parent / "fixtures/reference/modality_info.json").read_text())
    kinds = {"tokens": "img", "pixels": "img", "sequence": "seq", "embeddings": "seq_emb"}
    domains = modalities.domains()
    assert {"tok_canny_edge@224", "color_palette", "metadata", "tok_dinov2@224", "tok_dinov2_global", "t5_caption",
            "tok_imagebind@224", "tok_imagebind_global", "human_poses", "tok_sam_edge@224", "sam_instance"} <= {
        d.name for d in domains}
    for d in domains:
        reference = table[d.name]
        assert kinds[d.kind] == reference["type"], d.name
        assert d.vocab_size == reference.get("vocab_size"), d.name  # pixels have none
        grid = reference["max_tokens"] or (reference["input_size"] // reference["patch_size"]) ** 2
        assert d.max_tokens == grid, d.name


def test_the_masking_budget_and_layout_of_a_sequence_are_its_own(m21, tmp_path):
    """The palette's 23 tokens cap its budget and size its layout, as the reference's max_tokens does; captions
    keep 256."""
    from models.text_tokenizer import load_text_tokenizer, train_text_tokenizer
    from stages.fourm.masking import Component, MaskingSampler

    train_text_tokenizer(["a photo of a cat"], 4500, tmp_path / "tokenizer.json")
    loaded = ["caption", "color_palette", "tok_rgb@224"]
    all_to_all = Component(input_alphas=dict.fromkeys(loaded, 0.5), target_alphas=dict.fromkeys(loaded, 0.5))
    sampler = MaskingSampler(loaded, [all_to_all], 128, 128, load_text_tokenizer(tmp_path / "tokenizer.json"))
    assert sampler.caps.tolist() == [256, 23, 196]
    rng = np.random.default_rng(0)
    sample = {"caption": "a photo of a cat", "color_palette": FIXTURE["texts"]["coffee"]["7"],
              "tok_rgb@224": torch.zeros(196, dtype=torch.int32)}
    for _ in range(20):
        out = sampler(sample, rng)
        assert out["color_palette"]["tensor"].shape == (48,) and out["caption"]["tensor"].shape == (514,)
        palette = out["color_palette"]
        seen = [int(t) for t in palette["tensor"][~palette["input_mask"] | ~palette["target_mask"]]]
        assert len([t for t in seen if t not in sampler.sentinel_ids]) <= 23  # each token in the input or target


def test_canny_edges_are_opencv_s_on_grey_stored_as_one_channel_png(m21):
    import cv2

    modality, labeler = registry.get("canny_edge"), m21.CannyLabeler()
    image = np.asarray(photo("coffee"))
    edges = labeler.compute(image)
    expected = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 100, 200)
    assert edges.shape == image.shape[:2] and set(np.unique(edges)) == {0.0, 1.0}
    assert np.array_equal(edges * 255, expected) and 0.01 < edges.mean() < 0.5  # a photo has edges, not only edges
    stored = modality.decode(modality.encode(edges))
    assert stored.dtype == np.uint8 and np.array_equal(stored, expected)  # 255 on an edge, one channel
    x = modality.to_tensor(stored, [0, 0, *image.shape[:2], 0], image.shape[:2])
    assert x.shape == (1, 224, 224) and x.min() >= -1 and x.max() <= 1  # in [-1, 1], as the reference's RGBTransform
    assert modality.tokenizer == {"in_channels": 1, "codebook_size": 8192, "decoder": "diffusion",
                                  "loss": "smooth_l1"}  # the reference's DiVAE edge tokenizer (its divae config)
    assert modality.picture(stored, image).shape == (*image.shape[:2], 3)


METADATA = json.loads((Path(__file__).parent / "fixtures/reference/metadata_texts.json").read_text())


def test_metadata_chunks_equal_the_references_and_training_shuffles_them(m21):
    modality = registry.get("metadata")
    for name, stored in METADATA["stored"].items():
        assert m21.metadata_chunks(stored) == METADATA["chunks"][name]  # every bin's edge, every one of the 21 keys
        data = modality.encode(stored)
        assert modality.to_text(data, None, None, 0.0) == METADATA["chunks"][name]  # validation: the stored order
        shuffled = modality.to_text(data, None, None, 0.0, rng=np.random.default_rng(1))
        assert sorted(shuffled) == sorted(METADATA["chunks"][name]) and shuffled != METADATA["chunks"][name]
        assert m21.metadata_values(" ".join(shuffled)) == {k: m21.metadata_bin(k, v) for k, v in stored.items()}
    assert modality.picture(METADATA["stored"]["coffee"], None).shape == (224, 224, 3)


def test_the_metadata_labeler_measures_the_image_and_the_labels_beside_it(m21):
    from models.coco import COCO_PANOPTIC

    labeler = m21.MetadataLabeler(min_score=0.5)
    image_keys = ["original_width", "original_height", "colorfulness", "brightness", "contrast", "saturation",
                  "entropy"]
    for name in ("astronaut", "coffee", "chelsea"):  # the image's own statistics, as the fixture stored them
        alone = labeler.compute({"image": np.asarray(photo(name))})
        assert sorted(alone) == sorted(image_keys)
        assert alone == pytest.approx({k: METADATA["stored"][name][k] for k in image_keys})
    grey = np.full((32, 64, 3), 128, np.uint8)
    road, person = COCO_PANOPTIC.index("road"), COCO_PANOPTIC.index("person")
    classes = np.full((32, 64), COCO_PANOPTIC.index("sky-other-merged"), np.uint8)
    classes[16:, :] = road
    classes[:8, :16] = person
    depth = np.zeros((32, 64), np.uint16)
    depth[:, 32:] = 65535  # one step: the column at the step is an occlusion edge
    flat = np.full((32, 64, 3), (128, 128, 255), np.uint8)
    instances = {"instances": [{"polygon": [[0, 0], [9, 0], [9, 9]], "score": 0.9}] * 3}
    stats = labeler.compute({"image": grey, "caption": "Two dogs. One runs!", "semseg": classes, "depth": depth,
                             "normal": flat, "det": [{"boxes": [0, 0, 1, 1], "class_name": "person", "score": 0.9},
                                                     {"boxes": [0, 0, 1, 1], "class_name": "dog", "score": 0.2}],
                             "sam_instance": instances, "quality": {"aesthetic": 5.2, "watermark": 0.7}})
    assert len(stats) == 21 and [chunk.split()[0] for chunk in m21.metadata_chunks(stats)] == [
        f"v1={i}" for i in range(21)]  # every one of the reference's statistics, in its id order
    assert (stats["n_sam_instances"], stats["aesthetic_score"], stats["watermark_score"]) == (3, 5.2, 0.7)
    unscored = labeler.compute({"image": grey, "quality": {"aesthetic": None, "watermark": None}})
    assert not {"aesthetic_score", "watermark_score", "n_sam_instances"} & set(unscored)  # left out, as the reference
    assert stats["colorfulness"] == 0 and stats["contrast"] == 0 and stats["entropy"] == 0
    assert (stats["caption_n_chars"], stats["caption_n_words"], stats["caption_n_sentences"]) == (19, 4, 2)
    assert (stats["n_humans"], stats["n_coco_instances"], stats["coco_instance_diversity"]) == (1, 1, 1)
    assert stats["walkability"] == 0.5 and stats["objectness"] == 0.0625 and stats["semantic_diversity"] == 3
    assert stats["occlusion_score"] == pytest.approx(1 / 64)  # the one column at the step
    assert stats["geometric_complexity"] == pytest.approx(0, abs=1e-4)  # every normal the same
    assert list(stats) == sorted(stats, key=m21.METADATA_IDS.get)  # the reference's id order


def test_metadata_chunks_are_masked_whole(m21, tmp_path):
    from models.text_tokenizer import load_text_tokenizer, train_text_tokenizer
    from stages.fourm.masking import Component, MaskingSampler

    train_text_tokenizer(["a photo of a cat"], 4500, tmp_path / "tokenizer.json")
    tokenizer = load_text_tokenizer(tmp_path / "tokenizer.json")
    both = Component(input_alphas={"metadata": 1.0}, target_alphas={"metadata": 1.0})
    sampler = MaskingSampler(["metadata"], [both], 20, 40, tokenizer)
    assert sampler.caps.tolist() == [40]
    chunks = METADATA["chunks"]["extremes"]  # 21 chunks of 2 tokens: 42 with [EOS], more than the 40 allowed
    units = sampler.units(chunks, 40)
    assert len(units) == 20 and [sampler.eos_id] not in units  # whole chunks that fit, as the reference cuts them
    pairs = {tuple(tokenizer.encode(c).ids) for c in chunks}
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = sampler({"metadata": chunks}, rng)["metadata"]
        assert out["tensor"].shape == (82,)
        inputs = [int(t) for t in out["tensor"][~out["input_mask"]] if int(t) not in sampler.sentinel_ids]
        assert len(inputs) % 2 == 0 and all(tuple(inputs[i:i + 2]) in pairs for i in range(0, len(inputs), 2))


def test_dinov2_features_are_the_models_normalised_patch_tokens_16_by_16_at_224(tmp_path):
    """The labeler on a tiny random-weight Dinov2Model (the real class), its map cropped and tokenized at the
    reference's 16x16 grid."""
    from transformers import Dinov2Model

    from models.labelers import IMAGENET_MEAN, IMAGENET_STD
    from models.random_weights import save_random_model
    from models.vqvae import VQVAE, tokenizer_config

    registry.ModalitySet([NETWORKS])
    path = save_random_model("dinov2", tmp_path / "dinov2")
    labeler = registry.get("dinov2").labeler.load(path, "cpu", 2, short_side=224)
    image = np.array(photo("astronaut"))  # 512x512
    features = labeler([image])[0]
    assert features.shape == (16, 16, 16)  # 16x16 patches of 14 pixels at 224, 16-d in the tiny model
    x = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, size=(224, 224),
                                        mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = Dinov2Model.from_pretrained(path)(pixel_values=x).last_hidden_state[0, 1:].reshape(16, 16, -1)
    assert torch.allclose(torch.as_tensor(features), expected, atol=1e-4)
    spec = registry.get("dinov2")
    stored = spec.decode(spec.encode(np.asarray(features)))
    crop = spec.to_tensor(stored, [0, 0, 512, 512, 0], (512, 512))
    assert crop.shape == (16, 16, 16)
    torch.manual_seed(0)
    tokenizer = VQVAE(tokenizer_config("dinov2", "tiny", n_channels=16, codebook_size=32))
    assert tokenizer.tokenize(crop[None]).numel() == 256 == registry.domain("tok_dinov2").max_tokens

    # the global vector: the normalised class token, one per image, 16 tokens (one per codebook) in the reference's
    # resolution-free domain tok_dinov2_global
    pooled = registry.get("dinov2_global").labeler.load(path, "cpu", 2, short_side=224)([image])[0]
    with torch.no_grad():
        cls = Dinov2Model.from_pretrained(path)(pixel_values=x).last_hidden_state[0, 0]
    assert pooled.shape == (16,) and torch.allclose(torch.as_tensor(pooled), cls, atol=1e-4)
    spec = registry.get("dinov2_global")
    vector = spec.to_tensor(spec.decode(spec.encode(np.asarray(pooled))), [0, 0, 256, 256, 1], (512, 512))
    assert vector.shape == (16, 1, 1) and torch.allclose(vector[:, 0, 0], cls, atol=1e-2)  # float16, any crop
    domain = registry.domain("tok_dinov2_global")
    assert (domain.name, domain.folder, domain.max_tokens, domain.pooled) == ("tok_dinov2_global",) * 2 + (16, True)
    torch.manual_seed(0)
    tokenizer = VQVAE(tokenizer_config("dinov2_global", "tiny", n_channels=16, codebook_size=32)).eval()
    assert tokenizer.tokenize(vector[None]).flatten(1).shape == (1, 16)
    assert spec.picture(np.asarray(pooled), None).shape == (4, 4, 3)


@pytest.fixture(scope="module")
def t5_model(tmp_path_factory):
    """A tiny random-weight T5 encoder (the real class, 4096-d as T5-XXL's) and its tokenizer, saved once."""
    from models.random_weights import save_random_model

    registry.ModalitySet([NETWORKS])
    path = save_random_model("t5_caption", tmp_path_factory.mktemp("t5") / "t5_caption")
    return path


def test_t5_caption_vectors_are_the_encoders_states_per_token_stored_as_the_references_npz(t5_model, tmp_path):
    """The label stage reads each sample's caption beside its image, runs T5's encoder and stores its valid
    states in the reference's `.npz` layout (`emb` (1, L, 4096), `mask_valid`); a sample without a caption fails
    alone, by name, and its batch's other samples are labelled one by one."""
    import io
    import tarfile

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer, T5EncoderModel

    from core.config import load_config
    from stages.label.label import label_shard
    from tests.helpers import write_rgb_shard

    registry.ModalitySet([NETWORKS])
    captions = ["a photo of a cat on a bench", None, "two dogs in the snow near a car"]
    layout, keys = write_rgb_shard(tmp_path, [(64, 64)] * 3, captions)
    labeler = registry.get("t5_caption").labeler.load(t5_model, "cpu", 4, max_length=77)
    cfg = load_config("demo", ["label.chunk_size=4"]).label
    stats = label_shard(str(tmp_path), "shard-000000", {"t5_caption": labeler}, cfg)["t5_caption"]
    assert stats["status_counts"] == {"model_error": 1, "ok": 2}
    status = pq.read_table(layout.status_table("label_t5_caption", "shard-000000")).to_pylist()
    assert status[1]["status"] == "model_error" and "no caption" in status[1]["error"]
    tokenizer, model = AutoTokenizer.from_pretrained(t5_model), T5EncoderModel.from_pretrained(t5_model).eval()
    with tarfile.open(layout.tar("t5_caption", "shard-000000")) as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar}
    assert sorted(stored) == [f"{keys[0]}.npz", f"{keys[2]}.npz"]
    for key, caption in ((keys[0], captions[0]), (keys[2], captions[2])):
        raw = np.load(io.BytesIO(stored[f"{key}.npz"]))
        ids = tokenizer(caption, return_tensors="pt")
        with torch.no_grad():
            expected = model(**ids).last_hidden_state[0]
        assert raw["emb"].shape == (1, len(expected), 4096) and raw["emb"].dtype == np.float16
        assert raw["mask_valid"].all() and raw["mask_valid"].shape == (1, len(expected))
        # the reference's CaptionEmbTransform reads emb[0][mask_valid[0]]: exactly the encoder's states
        vectors = registry.get("t5_caption").to_embeddings(stored[f"{key}.npz"])
        assert torch.allclose(vectors, expected, atol=2e-3 * float(expected.abs().max()))


def test_t5_vectors_are_span_masked_as_inputs_and_never_targets(tmp_path):
    """Kept runs stay in order, each masked run one zero vector (the reference's `sequence_emb_mask_span`), within
    the input budget; never a target, even where a mixture gives them target alpha (that share is lost, as an
    image's beyond its tokens is)."""
    from models.text_tokenizer import load_text_tokenizer, train_text_tokenizer
    from stages.fourm.masking import Component, MaskingSampler

    registry.ModalitySet([NETWORKS])
    train_text_tokenizer(["a photo of a cat"], 4500, tmp_path / "tokenizer.json")
    loaded = ["caption", "t5_caption", "tok_rgb@224"]
    mixture = [Component(input_alphas=dict.fromkeys(loaded, 0.5), target_alphas=dict.fromkeys(loaded, 0.5)),
               Component(input_alphas=dict.fromkeys(loaded, 0.5), target_alphas={"caption": 0.5, "tok_rgb@224": 0.5})]
    sampler = MaskingSampler(loaded, mixture, 64, 64, load_text_tokenizer(tmp_path / "tokenizer.json"))
    vectors = torch.arange(1, 31, dtype=torch.float32)[:, None].repeat(1, 4096)  # row i holds i + 1
    sample = {"caption": "a photo of a cat", "t5_caption": vectors, "tok_rgb@224": torch.zeros(196, dtype=torch.int32)}
    rng, kept_some, masked_some, targets = np.random.default_rng(0), False, False, []
    for _ in range(40):
        out = sampler(sample, rng)
        t5 = out["t5_caption"]
        assert t5["tensor"].shape == (77, 4096) and t5["target_mask"].all()
        rows = t5["tensor"][~t5["input_mask"]][:, 0].tolist()
        assert all(a < b for a, b in zip([r for r in rows if r], [r for r in rows if r][1:]))  # in order
        assert all(rows[i] or rows[i + 1] for i in range(len(rows) - 1))  # never two sentinels in a row
        assert t5["tensor"][t5["input_mask"]].abs().sum() == 0
        targets.append(sum(int((~d["target_mask"]).sum()) for d in out.values()))
        kept_some |= any(rows)
        masked_some |= 0 in rows
    assert kept_some and masked_some and max(targets) > 0


def test_a_t5_condition_is_read_from_the_stored_npz_and_checked(tmp_path):
    from stages.generate.generate import GenerateInputError, embedding_vectors

    registry.ModalitySet([NETWORKS])
    spec = registry.get("t5_caption")
    (tmp_path / "ok.npz").write_bytes(spec.encode(np.ones((5, 4096), np.float32)))
    assert embedding_vectors("t5_caption", str(tmp_path / "ok.npz"), "request 'a'").shape == (5, 4096)
    np.save(tmp_path / "narrow.npy", np.ones((5, 512), np.float32))
    with pytest.raises(GenerateInputError, match=r"request 'a': t5_caption .*narrow.npy.* \(5, 512\).* 4096"):
        embedding_vectors("t5_caption", str(tmp_path / "narrow.npy"), "request 'a'")


EXTERNAL = "models.modalities_4m21_external"
POSES = json.loads((Path(__file__).parent / "fixtures/reference/pose_texts.json").read_text())


def _humans(text: str) -> list[tuple[str, frozenset]]:
    """A pose text as (each human's box words, its four groups as a set): the reference orders groups at random."""
    if text.strip() == "none":
        return []
    out = []
    for chunk in text.split("human ")[1:]:
        words = chunk.split()
        groups, current = [], []
        for word in words[4:]:
            if word in ("pose", "global", "camera", "shape"):
                current = [word]
                groups.append(current)
            else:
                current.append(word)
        out.append((" ".join(words[:4]), frozenset(" ".join(g) for g in groups)))
    return out


def test_pose_texts_equal_the_references_and_training_shuffles_each_humans_groups():
    """Each human's box in the crop and its pose, global, camera and shape groups equal the reference's
    HumanPoseTransform on the same files and crops (fixture: tests/fixtures/reference/make_pose_texts.py); humans
    outside the crop are left out, none left is `none`."""
    registry.ModalitySet([EXTERNAL])
    spec = registry.get("human_poses")
    for key, expected in POSES["texts"].items():
        name, crop_index = key.split("/")
        crop = [*POSES["crops"][int(crop_index)], 0]
        stored = spec.encode(POSES["samples"][name])
        spec.check_label(spec.decode(stored))
        ours = spec.to_text(stored, crop, tuple(POSES["image"]), 0.0)
        assert _humans(ours) == _humans(expected), key
        assert (ours == "none") == (expected == "none")
    rng, stored = np.random.default_rng(0), spec.encode(POSES["samples"]["one"])
    orders = {tuple(w for w in spec.to_text(stored, [0, 0, 480, 640, 0], (480, 640), 0.0, rng=rng).split()
                    if w in ("pose", "global", "camera", "shape")) for _ in range(30)}
    assert len(orders) > 5  # drawn per load; without a generator (validation) always pose, global, camera, shape
    assert spec.to_text(stored, [0, 0, 480, 640, 0], (480, 640), 0.0).split()[5] == "pose"


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("pred_cam"), "missing 'pred_cam'"),
    (lambda s: s.update(pose_tokenized=[[1] * 7]), r"pose_tokenized \(1, 7\), expected \(1, 8\)"),
    (lambda s: s.update(pose_tokenized=[[2000] * 8]), "outside 0..1023"),
])
def test_a_pose_file_not_in_the_references_format_is_refused_by_reason(change, message):
    import copy

    registry.ModalitySet([EXTERNAL])
    stored = copy.deepcopy(POSES["samples"]["one"])
    change(stored)
    with pytest.raises(ValueError, match=message):
        registry.get("human_poses").check_label(stored)


def test_an_external_tools_files_are_imported_as_label_shards_with_every_samples_fate(tmp_path):
    """ImageBind's features, its global vectors and human poses come from tools outside the project: one file per
    sample, named by its key, checked by the entry; a missing or refused file costs its sample, named in the status
    files; a rerun skips committed shards."""
    import pyarrow.parquet as pq

    from core.config import load_config
    from pipeline.cli import main as cli
    from stages.dataset.shards import DatasetLayout
    from tests.helpers import write_rgb_shard

    layout, keys = write_rgb_shard(tmp_path / "data", [(64, 64)] * 4)
    source = tmp_path / "imagebind"
    source.mkdir()
    for i, key in enumerate(keys[:3]):
        np.save(source / f"{key}.npy", np.full((4, 4, 1280 if i != 1 else 1024), i, np.float32))
    args = ["import-labels", "--data", str(tmp_path / "data"), "--profile", "demo", "--set",
            f"modalities=[{MODULE},{EXTERNAL}]", "--modality", "imagebind", "--source", str(source)]
    assert cli(args) == 0
    status = {r["key"]: r for r in pq.read_table(layout.status_table("label_imagebind", "shard-000000")).to_pylist()}
    assert [status[k]["status"] for k in keys] == ["ok", "decode_error", "ok", "missing_label"]
    assert "(height, width, 1280); got (4, 4, 1024)" in status[keys[1]]["error"]
    assert "no file" in status[keys[3]]["error"] and status[keys[0]]["height"] == 64
    import io
    import tarfile

    with tarfile.open(layout.tar("imagebind", "shard-000000")) as tar:
        stored = {m.name: np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar}
    assert sorted(stored) == [f"{keys[0]}.npy", f"{keys[2]}.npy"] and stored[f"{keys[2]}.npy"].dtype == np.float16
    assert "imported from" in layout.read_stats("label_imagebind", "shard-000000")["provenance"]["models"][
        "imagebind"]["source"]
    (source / f"{keys[3]}.npy").unlink(missing_ok=True)
    np.save(source / f"{keys[3]}.npy", np.zeros((4, 4, 1280), np.float32))
    assert cli(args) == 0  # committed: skipped, not redone
    assert pq.read_table(layout.status_table("label_imagebind", "shard-000000")).to_pylist()[3]["status"] == \
        "missing_label"
    assert DatasetLayout(tmp_path / "data").modality_modules() == [MODULE, EXTERNAL]
    load_config("demo")  # the registry back to the demo's own modalities for the tests after


def test_4m21_texts_are_whole_tokens_of_the_references_vocabulary_and_of_ours(tmp_path):
    """Palettes and metadata read only the fixed v0=..v3= tokens; pose texts add six words, each one token of the
    reference's published text tokenizer (fixture: make_text_words.py) and of a tokenizer trained here on the
    dataset's texts (the text corpus takes every sequence modality's `corpus_text`)."""
    from models.text_tokenizer import load_text_tokenizer, train_text_tokenizer

    registry.ModalitySet([EXTERNAL])
    reference = json.loads((Path(__file__).parent / "fixtures/reference/text_words_4m21.json").read_text())["words"]
    spec = registry.get("human_poses")
    texts = [spec.corpus_text(spec.encode(sample)) for sample in POSES["samples"].values()]
    words = {w for text in texts for w in text.split() if not w[:3] in ("v0=", "v1=", "v2=", "v3=")}
    assert words == set(reference) and all(pieces == [w] for w, pieces in reference.items())
    train_text_tokenizer(["a photo of a cat", *texts, *POSES["texts"].values()], 4500, tmp_path / "tokenizer.json")
    tokenizer = load_text_tokenizer(tmp_path / "tokenizer.json")
    for text in POSES["texts"].values():
        encoded = tokenizer.encode(text)
        assert len(encoded.ids) == len(text.split()) and tokenizer.token_to_id("[UNK]") not in encoded.ids


def test_sam_instances_are_polygons_of_sams_masks_and_their_edges_are_drawn_from_them(tmp_path):
    """SAM through transformers' mask-generation pipeline on a tiny random SamModel (the real class), its settings
    from `label.options`; the label stage stores each mask's outline as a polygon, then (a second pass, reading
    them) draws `sam_edge` from those polygons."""
    import tarfile

    import cv2

    from models.random_weights import save_random_model
    from stages.label.label import LabelWorker
    from tests.helpers import write_rgb_shard

    registry.ModalitySet([NETWORKS])
    path = save_random_model("sam_instance", tmp_path / "sam")
    options = "{sam_instance: {points_per_side: 4, pred_iou_thresh: 0.0, stability_score_thresh: 0.0}}"
    cfg = load_config("demo", [f"modalities=[{MODULE},{NETWORKS}]", f"label.models={{sam_instance: {path}}}",
                               f"label.options={options}", "label.chunk_size=2"]).label
    assert cfg.options_of("sam_instance")["points_per_side"] == 4  # over the entry's own (SAM's 32)
    layout, keys = write_rgb_shard(tmp_path, [(96, 128), (80, 80)])
    stats = LabelWorker(str(tmp_path), cfg, ["sam_instance", "sam_edge"]).label("shard-000000",
                                                                                ["sam_instance", "sam_edge"])
    assert stats["sam_instance"]["ok"] == stats["sam_edge"]["ok"] == 2
    with tarfile.open(layout.tar("sam_instance", "shard-000000")) as tar:
        instances = [json.loads(tar.extractfile(m).read()) for m in tar]
    with tarfile.open(layout.tar("sam_edge", "shard-000000")) as tar:
        edges = [cv2.imdecode(np.frombuffer(tar.extractfile(m).read(), np.uint8), cv2.IMREAD_UNCHANGED) for m in tar]
    labeler = registry.get("sam_instance").labeler.load(path, "cpu", 1, **cfg.options_of("sam_instance"))
    with tarfile.open(layout.tar("rgb", "shard-000000")) as tar:  # the stored JPEG, as the stage decoded it
        image = cv2.imdecode(np.frombuffer(tar.extractfile(tar.getmembers()[0]).read(), np.uint8), cv2.IMREAD_COLOR)
    assert instances[0] == labeler.collect(labeler.launch([np.ascontiguousarray(image[..., ::-1])]))[0]
    assert instances[0]["instances"] and all(len(i["polygon"]) >= 3 for i in instances[0]["instances"])
    drawn = np.zeros((96, 128), np.uint8)
    cv2.polylines(drawn, [np.asarray(i["polygon"], np.int32) for i in instances[0]["instances"]], True, 255, 1)
    assert edges[0].shape == (96, 128) and np.array_equal(edges[0], drawn)
    assert registry.get("sam_instance").picture(instances[0], image[..., ::-1]).shape == (96, 128, 3)


def test_random_models_are_saved_for_a_profiles_own_labelers(tmp_path, capsys):
    """`random-models --profile paper21` knows the profile's labelers (T5, SAM, DINOv2), each saved with what it
    reads (T5's tokenizer beside its weights); an unknown name is refused before any work."""
    from pipeline.cli import main as cli

    assert cli(["random-models", "--out", str(tmp_path), "--profile", "paper21", "--labelers", "t5_caption"]) == 0
    assert (tmp_path / "t5_caption" / "config.json").is_file() and (tmp_path / "t5_caption" / "tokenizer.json").is_file()
    assert cli(["random-models", "--out", str(tmp_path / "b"), "--labelers", "t5_caption"]) == 2  # paper: no T5
    assert "no random model" in capsys.readouterr().err and not (tmp_path / "b").exists()


SAM = json.loads((Path(__file__).parent / "fixtures/reference/sam_instance_outputs.json").read_text())


def _reference_mask(packed: str) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), np.uint8)).reshape(64, 64).astype(bool)


def test_sam_instances_are_cut_to_each_crop_and_written_as_the_references_text():
    """Per crop, the instances the mask tokenizer reads are the reference's `SAMInstanceTransform`'s (the same
    instances and boxes at 224 within a pixel, masks at IoU >= 0.96: it clips polygons, we fill and outline them);
    a crop's record becomes `SAMInstanceTokTransform`'s text, word for word, on the grid's query points (fixture:
    make_sam_instance_outputs.py, its shuffles left out); training draws 7 points and orders afresh."""
    from models.modalities_4m21_networks import crop_instances, instance_mask

    registry.ModalitySet([NETWORKS])
    stored = {"instances": [{"polygon": p, "score": 1.0} for p in SAM["polygons"]]}
    for reference in SAM["crops"]:
        ours = crop_instances(stored, reference["crop"], SAM["image"])
        assert len(ours) == len(reference["bbox"]) == 4  # the tiny one dropped in every crop
        for (outline, box), ref_box, ref_mask in zip(ours, reference["bbox"], reference["masks"]):
            assert np.abs(np.subtract(box, ref_box)).max() <= 1
            mask, ref = instance_mask(outline, box) > 0.5, _reference_mask(ref_mask)
            assert (mask & ref).sum() / (mask | ref).sum() >= 0.96
    spec = registry.get("sam_instance")
    for case in SAM["texts"]:
        assert spec.to_text(case["record"], None, None, 0.0) == case["text"]
    record, rng = SAM["texts"][2]["record"], np.random.default_rng(0)
    drawn = [spec.to_text(record, None, None, 0.0, rng) for _ in range(5)]
    assert all(text.split().count("point") == 7 for text in drawn) and len(set(drawn)) == 5
    boxes = {tuple(f"v{i}={v}" for i, v in enumerate((b[1], b[0], b[3], b[2]))) for b in record["bbox"]}
    for text in drawn:  # every instance named is one of the crop's, whole
        words = text.split()
        named = [tuple(words[i + 1:i + 5]) for i, w in enumerate(words) if w == "polygon"]
        assert set(named) <= boxes and all(len(words) >= i + 21 for i, w in enumerate(words) if w == "polygon")
    generated = spec.generated(SAM["texts"][2]["text"] + " polygon v0=1 v1=2")["instances"]  # one cut short
    named = {(tuple(i["box"]), tuple(i["token_ids"])) for i in generated}
    assert named == {((b[1], b[0], b[3], b[2]), tuple(ids)) for b, ids in zip(record["bbox"], record["token_ids"])}


def test_sam_instances_train_their_mask_tokenizer_tokenize_per_crop_and_load_as_text(tmp_path):
    """Imported SAM polygons: the mask tokenizer (the reference's architecture, tiny) trains on one instance per
    crop; pre-tokenization stores each crop's outlines, boxes and 16 ids per instance (`tok_sam_instance`), which
    `verify` accepts; the 4M loader reads a crop's record as the text, and the text tokenizer trained on the
    dataset knows its words."""
    import io
    import tarfile

    from models.text_tokenizer import load_text_tokenizer
    from models.vqvae import load_tokenizer
    from pipeline.cli import main as cli
    from stages.dataset.verify import verify_dataset
    from stages.fourm.fourm_data import decode_sample, loader_folders, shard_samples
    from stages.tokenizers.tokenize import TokenizeWorker
    from stages.tokenizers.train_tokenizer import train_dense, train_text
    from tests.helpers import write_rgb_shard

    root = tmp_path / "data"
    layout, keys = write_rgb_shard(root, [(240, 320)] * 4, ["a photo of an astronaut"] * 4)
    source = tmp_path / "sam"
    source.mkdir()
    for i, key in enumerate(keys):
        shifted = [[[x + 7 * i, y] for x, y in p] for p in SAM["polygons"]]
        (source / f"{key}.json").write_text(json.dumps({"instances": [{"polygon": p, "score": 1.0} for p in shifted]}))
    settings = [f"modalities=[{NETWORKS}]", "tokenizer.batch_size=4", "tokenizer.epochs=3", "tokenizer.workers=0",
                "tokenizer.warmup_epochs=1", "tokenizer.eval_every=100", "tokenizer.eval_samples=2",
                "tokenizer.codebook_sizes={sam_instance: 16}", "tokenizer.n_crops=2"]
    assert cli(["import-labels", "--data", str(root), "--profile", "demo", "--set", *settings[:1],
                "--modality", "sam_instance", "--source", str(source)]) == 0
    config = load_config("demo", [*settings, *UNSCORED])
    summary = train_dense(root, config, "sam_instance")
    assert summary["steps"] == 3 and "mask_iou" in json.dumps(summary["final"])
    model = load_tokenizer(root / "tokenizers" / "sam_instance")
    assert model.cfg.out_conv and model.tokenize(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 4)

    stats = TokenizeWorker(str(root), config.tokenizer, ["sam_instance"]).tokenize(
        "shard-000000", ["sam_instance"])
    assert stats["sam_instance"]["ok"] == 4 and stats["sam_instance"]["tokens"] == 4 * 2 * 4 * 16
    with tarfile.open(layout.tar("tok_sam_instance", "shard-000000")) as tar:
        records = {m.name: json.loads(tar.extractfile(m).read()) for m in tar}
    with tarfile.open(layout.tar("crop_settings", "shard-000000")) as tar:
        crops = {m.name: np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar}
    from models.modalities_4m21_networks import crop_instances

    first = json.loads((source / f"{keys[0]}.json").read_text())
    for crop, record in zip(crops[f"{keys[0]}.npy"], records[f"{keys[0]}.json"]):
        assert record["bbox"] == [box for _, box in crop_instances(first, crop, (240, 320))]
        assert np.shape(record["token_ids"]) == (4, 16) and 0 <= np.min(record["token_ids"]) <= \
            np.max(record["token_ids"]) < 16
    problems, _ = verify_dataset(root)
    assert [p for p in problems if "sam" in p.folder] == []

    registry.ModalitySet([NETWORKS])
    raw = next(shard_samples(root, "shard-000000", loader_folders(["sam_instance"])))
    text = decode_sample(raw, ["sam_instance"], 1, 0.0)["sam_instance"]
    assert text == registry.get("sam_instance").to_text(records[f"{keys[0]}.json"][1], None, None, 0.0)
    assert text.split().count("point") == 49 and "polygon" in text
    train_text(root, config.tokenizer)
    tokenizer = load_text_tokenizer(root / "tokenizers" / "text" / "tokenizer.json")
    assert tokenizer.token_to_id("[UNK]") not in tokenizer.encode(text).ids


def test_poses_train_their_tokenizer_and_tokenize_fills_each_humans_ids(tmp_path):
    """Imported poses without `pose_tokenized` (an external tool's raw fits): the pose tokenizer (the reference's
    bottleneck MLPs around Memcodes, 8 codebooks over the 207 rotation numbers; tiny) trains on one human per
    sample, a sample without one left out; `tokenize` writes each sample's JSON with its humans' 8 ids from that
    tokenizer into `tok_human_poses/`, which `verify` accepts and the 4M loader reads as the pose text."""
    import copy
    import tarfile

    from models.vqvae import load_tokenizer, tokenizer_config
    from pipeline.cli import main as cli
    from stages.dataset.verify import verify_dataset
    from stages.fourm.fourm_data import decode_sample, loader_folders, shard_samples
    from stages.tokenizers.tokenize import TokenizeWorker
    from stages.tokenizers.train_tokenizer import train_dense
    from tests.helpers import write_rgb_shard

    registry.ModalitySet([EXTERNAL])
    cfg = tokenizer_config("human_poses", "paper")
    assert (cfg.enc_type, cfg.quant_type, cfg.codebook_size, cfg.num_codebooks, cfg.latent_dim, cfg.n_channels) == (
        "BottleneckMLP/B_6-Wi_1024", "memcodes", 1024, 8, 1024, 207)
    root = tmp_path / "data"
    layout, keys = write_rgb_shard(root, [(240, 320)] * 4)
    source = tmp_path / "poses"
    source.mkdir()
    raw = {}
    for key, name in zip(keys, ["one", "none", "two", "gone"]):
        raw[key] = copy.deepcopy(POSES["samples"][name])
        raw[key].pop("pose_tokenized", None)
        (source / f"{key}.json").write_text(json.dumps(raw[key]))
    settings = [f"modalities=[{EXTERNAL}]", "tokenizer.batch_size=2", "tokenizer.epochs=2", "tokenizer.workers=0",
                "tokenizer.warmup_epochs=1", "tokenizer.eval_every=100", "tokenizer.eval_samples=2",
                "tokenizer.codebook_sizes={human_poses: 16}", "tokenizer.n_crops=2"]
    assert cli(["import-labels", "--data", str(root), "--profile", "demo", "--set", settings[0],
                "--modality", "human_poses", "--source", str(source)]) == 0
    config = load_config("demo", [*settings, *UNSCORED])
    assert train_dense(root, config, "human_poses")["steps"] == 4
    model = load_tokenizer(root / "tokenizers" / "human_poses")
    stats = TokenizeWorker(str(root), config.tokenizer, ["human_poses"]).tokenize(
        "shard-000000", ["human_poses"])
    assert stats["human_poses"]["ok"] == 4 and stats["human_poses"]["tokens"] == (1 + 2 + 3) * 8
    with tarfile.open(layout.tar("tok_human_poses", "shard-000000")) as tar:
        filled = {m.name.split(".")[0]: json.loads(tar.extractfile(m).read()) for m in tar}
    assert filled[keys[1]] == {}
    poses = torch.tensor(raw[keys[2]]["pred_smpl_params"]["body_pose"], dtype=torch.float32).reshape(2, 207, 1, 1)
    assert filled[keys[2]]["pose_tokenized"] == model.tokenize(poses).reshape(2, 8).tolist()
    assert {k: v for k, v in filled[keys[2]].items() if k != "pose_tokenized"} == raw[keys[2]]
    assert [p for p in verify_dataset(root)[0] if "pose" in p.folder] == []
    sample = next(shard_samples(root, "shard-000000", loader_folders(["human_poses"])))
    text = decode_sample(sample, ["human_poses"], 0, 0.0)["human_poses"]
    ids = filled[keys[0]]["pose_tokenized"][0]
    assert " ".join(["pose", *(f"v0={i}" if i < 512 else f"v1={i - 512}" for i in ids)]) in text
