"""The quality filters: their networks loaded the way the real weights load (open_clip's CLIP class from its folder
layout, the published aesthetic and watermark state dicts converted), scores on the test photos, and clear errors."""
import pytest
import torch

from models.quality import (
    AESTHETIC,
    WATERMARK,
    AestheticMLP,
    QualityWeightsError,
    WatermarkClassifier,
    convert_aesthetic,
    convert_watermark,
    load_clip,
    load_quality_model,
    save_random_quality_models,
)
from stages.tokenizers.tokenizer_data import read_members
from tests.helpers import UNSCORED


@pytest.fixture(scope="module")
def quality_models(tmp_path_factory):
    return save_random_quality_models(tmp_path_factory.mktemp("quality-models"))


def test_the_published_layouts_convert_and_load_to_the_same_outputs(tmp_path):
    """Files laid out as the published ones (the aesthetic MLP's bare `layers.*` state dict, the watermark detector's
    timm state dict with its replaced classifier), made here with random weights, convert into folders whose models
    give the same outputs."""
    torch.manual_seed(0)
    mlp = AestheticMLP(768).eval()
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    folder = convert_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", tmp_path / "aesthetic")
    loaded, config = load_quality_model(folder, AESTHETIC, "quality.aesthetic_model")
    embeddings = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    assert config["clip_model"] == "ViT-L-14" and config["input_dim"] == 768
    assert torch.equal(loaded(embeddings), mlp(embeddings))

    detector = WatermarkClassifier("test_efficientnet").eval()
    torch.save(detector.model.state_dict(), tmp_path / "watermark_model_v1.pt")
    folder = convert_watermark(tmp_path / "watermark_model_v1.pt", tmp_path / "watermark", backbone="test_efficientnet")
    loaded, _ = load_quality_model(folder, WATERMARK, "quality.watermark_model")
    images = torch.randn(2, 3, 256, 256)
    probabilities = loaded(images)
    assert torch.equal(probabilities, detector(images)) and ((probabilities >= 0) & (probabilities <= 1)).all()


def test_bad_weights_are_named_before_any_work(tmp_path):
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(QualityWeightsError, match="truncated.pth: not a readable PyTorch state dict"):
        convert_aesthetic(tmp_path / "truncated.pth", tmp_path / "out")
    torch.save(AestheticMLP(768).state_dict(), tmp_path / "aesthetic.pth")
    with pytest.raises(QualityWeightsError, match=r"aesthetic.pth: not the layout of EfficientNet: \d+ missing"):
        convert_watermark(tmp_path / "aesthetic.pth", tmp_path / "watermark", backbone="test_efficientnet")
    with pytest.raises(QualityWeightsError, match="no such file"):
        convert_aesthetic(tmp_path / "nowhere.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "watermark").exists()
    with pytest.raises(QualityWeightsError, match=r"quality.aesthetic_model = .*: no config.json there \(convert"):
        load_quality_model(tmp_path / "empty", AESTHETIC, "quality.aesthetic_model")
    with pytest.raises(QualityWeightsError, match="CLIP model 'ViT-Nope': neither a folder nor one of open_clip's"):
        load_clip("ViT-Nope", "openai", "cpu")


def test_the_tiny_clip_loads_through_open_clips_folder_layout(quality_models):
    import open_clip

    clip, preprocess, tokenizer = load_clip(quality_models["image_text"], None, "cpu")
    assert isinstance(clip, open_clip.CLIP)
    with torch.no_grad():
        text = clip.encode_text(tokenizer(["a photo of a cat", "a diagram"]))
    assert text.shape == (2, 16)


def test_the_stage_scores_every_photo_and_commits_aligned_tables(ray_address, quality_models, tmp_path):
    """Every decodable photo of each committed download shard gets a row, in the rgb shard's order: a CLIP score in
    [-1, 1] (computed as the cosine of open_clip's own embeddings), an aesthetic score and a watermark probability
    from the converted networks, and its normalised embedding; the corrupt photo's fate is recorded; a rerun skips
    the committed shards."""
    import numpy as np
    import open_clip
    import pyarrow.parquet as pq
    from PIL import Image

    from core.config import load_config
    from stages.label.label import decode_rgb
    from stages.quality.quality import run_quality
    from tests.helpers import make_labelled_input

    root = tmp_path / "data"
    layout = make_labelled_input(root)  # five photos in two shards, key 000000003 not a JPEG
    config = load_config("demo", [f"quality.clip_model={quality_models['image_text']}",
                                  f"quality.aesthetic_model={quality_models['aesthetic']}",
                                  f"quality.watermark_model={quality_models['watermark']}", "quality.batch_size=2"])
    summary = run_quality(root, config)
    assert summary.shards_done == 2 and not summary.failed_shards
    assert summary.status_counts["quality"] == {"ok": 4, "decode_error": 1}
    rows = {}
    for shard in ("shard-000000", "shard-000001"):
        table = pq.read_table(layout.table("quality", shard))
        rgb_keys = [k for k, _ in read_members(layout.tar("rgb", shard), "jpg")]
        assert table["key"].to_pylist() == [k for k in rgb_keys if k != "000000003"]
        rows.update({r["key"]: r for r in table.to_pylist()})
        status = layout.read_status("quality", shard).to_pylist()
        assert [s["key"] for s in status] == rgb_keys
    assert "not a decodable image" in layout.read_status("quality", "shard-000001").to_pylist()[0]["error"]

    name = f"local-dir:{quality_models['image_text']}"
    clip, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    key = "000000001"
    data = dict(read_members(layout.tar("rgb", "shard-000000"), "jpg"))[key]
    caption = dict(read_members(layout.tar("caption", "shard-000000"), "txt"))[key].decode()
    with torch.no_grad():
        image = clip.eval().encode_image(preprocess(Image.fromarray(decode_rgb(data)))[None])
        text = clip.encode_text(tokenizer([caption]))
    expected = torch.nn.functional.cosine_similarity(image, text).item()
    assert abs(rows[key]["clip_score"] - expected) < 1e-4
    embedding = np.array(rows[key]["embedding"], dtype=np.float32)
    assert embedding.shape == (16,) and abs(np.linalg.norm(embedding) - 1) < 1e-2
    assert all(r["aesthetic"] is not None and 0 <= r["watermark"] <= 1 for r in rows.values())

    again = run_quality(root, config)
    assert again.shards_skipped == 2 and again.shards_done == 0



def test_thresholds_drop_samples_from_labelling_and_alignment_without_rescoring(ray_address, quality_models, tmp_path):
    """A minimum CLIP score set after scoring: the label stage labels none of the samples under it and records each
    as filtered with its score and the threshold; alignment then drops them from every folder (verify is clean), and
    nothing is scored again. Thresholds on shards not scored, or on a score not computed, fail before any work."""
    import pyarrow.parquet as pq

    from core.config import ConfigError, load_config
    from stages.dataset.align import align_dataset
    from stages.dataset.verify import verify_dataset
    from stages.label.label import LabelInputError, run_label
    from stages.quality.quality import run_quality
    from tests.helpers import make_labelled_input

    root = tmp_path / "data"
    layout = make_labelled_input(root, corrupt_key=None)
    models = [f"quality.clip_model={quality_models['image_text']}", f"quality.watermark_model={quality_models['watermark']}",
              "quality.aesthetic_model=null", *UNSCORED]
    with pytest.raises(LabelInputError, match=r"quality.min_clip_score set, but 2 shard\(s\) are not scored"):
        run_label(root, load_config("demo", [*models, "quality.min_clip_score=0.1"]), ["canny_edge"])
    run_quality(root, load_config("demo", models))
    scores = {r["key"]: r["clip_score"] for shard in ("shard-000000", "shard-000001")
              for r in pq.read_table(layout.table("quality", shard)).to_pylist()}
    bound = sorted(scores.values())[2]  # the two lowest scores fall under it
    with pytest.raises(LabelInputError, match="quality.min_aesthetic is set, but shard-000000 has no aesthetic scores"):
        run_label(root, load_config("demo", [*models, "quality.min_aesthetic=5"]), ["canny_edge"])
    with pytest.raises(ConfigError, match="min_clip_score"):
        load_config("demo", ["quality.min_clip_score=2"])

    from pipeline.show import draw_quality, quality_examples, quality_histograms

    config = load_config("demo", [*models, f"quality.min_clip_score={bound}"])
    kept, dropped = quality_examples(layout, config.quality, examples=4)  # what the Prefect artifact draws
    assert sorted(k for k, *_ in dropped) == sorted(k for k, v in scores.items() if v < bound) and len(kept) == 3
    assert dropped[0][3].startswith("clip_score ") and kept[0][1][:2] == b"\xff\xd8"  # why, and the photo
    assert quality_histograms(layout)["clip_score"].sum() == 5
    assert draw_quality(layout, config.quality, tmp_path / "quality.png").stat().st_size > 0
    from stages.tokenizers.train_tokenizer import text_corpus

    every = list(text_corpus(layout, config.modality_set))  # the text tokenizer's corpus leaves their captions out
    assert len(list(text_corpus(layout, config.modality_set, config.quality))) == len(every) - 2
    summary = run_label(root, config, ["canny_edge"])
    assert summary.status_counts["canny_edge"] == {"ok": 3, "filtered": 2}
    from pipeline.status import stage_rows

    row = next(r for r in stage_rows(root) if r["stage"] == "label_canny_edge")
    assert row["failures"] == "filtered 2 (min_clip_score 2)"  # what `status` shows: how many each threshold dropped
    dropped = {k for k, v in scores.items() if v < bound}
    for shard in ("shard-000000", "shard-000001"):
        for row in layout.read_status("label_canny_edge", shard).to_pylist():
            if row["key"] in dropped:
                assert row["status"] == "filtered"
                assert row["error"] == f"clip_score {scores[row['key']]:.3f} < quality.min_clip_score {bound}"
    align_dataset(root)
    kept = {k for shard in ("shard-000000", "shard-000001")
            for k, _ in read_members(layout.tar("rgb", shard), "jpg")}
    assert kept == set(scores) - dropped  # gone from rgb (kept aside in _dropped), as from every folder
    reasons = [r["error"] for shard in ("shard-000000", "shard-000001")
               for r in layout.read_status("align", shard).to_pylist() if r["status"] != "ok"]
    assert len(reasons) == 2 and all("label_canny_edge: filtered: clip_score" in r for r in reasons)
    problems, _ = verify_dataset(root)
    assert not problems
    assert layout.read_stats("quality", "shard-000000")["finished_at"] < layout.read_stats(
        "label_canny_edge", "shard-000000")["started_at"]  # scored once, before; never again


def test_near_duplicate_photos_across_shards_keep_their_first(ray_address, quality_models, tmp_path):
    """A photo posted again in another shard (re-encoded, so not the same bytes): the near-duplicate search over
    every shard's embeddings pairs it with its first occurrence, and quality.dedup drops the later one only; a dedup
    threshold under the table's floor is refused by the configuration."""
    import io

    import pyarrow as pa
    from PIL import Image

    from core.config import ConfigError, load_config
    from stages.dataset.shards import ShardWriter
    from stages.label.label import run_label
    from stages.quality.dedup import near_duplicates_in
    from stages.quality.quality import run_quality
    from tests.helpers import encode, make_labelled_input, photo

    root = tmp_path / "data"
    layout = make_labelled_input(root, corrupt_key=None)  # five different photos in shards 0 and 1
    first = dict(read_members(layout.tar("rgb", "shard-000000"), "jpg"))["000000000"]
    with ShardWriter(layout, "download", "shard-000002", ["rgb", "caption"]) as writer:
        again = encode(Image.open(io.BytesIO(first)), quality=80)  # the same photo, other bytes
        writer.write("000000005", {"rgb": ("jpg", again), "caption": ("txt", b"the same photo again")})
        writer.write("000000006", {"rgb": ("jpg", encode(photo("hubble_deep_field"), quality=90)), "caption": ("txt", b"x")})
        writer.commit(pa.table({"key": ["000000005", "000000006"], "status": ["ok", "ok"]}), {"rows": 2})
    models = [f"quality.clip_model={quality_models['image_text']}", "quality.aesthetic_model=null",
              "quality.watermark_model=null", "quality.dedup_cluster_size=2", *UNSCORED]
    summary = run_quality(root, load_config("demo", models))
    assert summary.near_duplicate_pairs >= 1
    pairs = near_duplicates_in(layout, "shard-000002")
    assert pairs["000000005"][0] == "000000000" and pairs["000000005"][1] > 0.9999
    assert pairs.get("000000006", (None, 0))[1] < 0.999  # another photo (random weights: CLIP is near-blind)
    labelled = run_label(root, load_config("demo", [*models, "quality.dedup=0.9999"]), ["canny_edge"])
    filtered = {r["key"]: r["error"] for shard in layout.committed_shards("label_canny_edge")
                for r in layout.read_status("label_canny_edge", shard).to_pylist() if r["status"] == "filtered"}
    assert list(filtered) == ["000000005"] and filtered["000000005"].startswith("near duplicate of 000000000 (cosine")
    assert labelled.status_counts["canny_edge"]["ok"] == 6
    with pytest.raises(ConfigError, match="dedup"):
        load_config("demo", ["quality.dedup=0.5"])
