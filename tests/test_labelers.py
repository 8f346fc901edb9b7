"""Every labeler through its one loading path: random-weight models of the real classes, saved to a folder."""
import numpy as np
import pytest
import torch

from models.coco import COCO_PANOPTIC, COCO_THINGS
from models.labelers import dpt_input_size, load_labeler
from models.random_weights import save_random_models
from tests.helpers import photo


@pytest.fixture(scope="module")
def images():
    # Real photos of two sizes and aspect ratios, as they come out of the download stage.
    # The last one shares the first one's model input size but not its own size: a batch of mixed sizes.
    return [np.array(photo("chelsea")), np.array(photo("coffee")), np.array(photo("chelsea")),
            np.array(photo("chelsea"))[:299, :450]]


def test_dpt_input_follows_the_paper():
    assert dpt_input_size(300, 451) == (288, 448)
    assert dpt_input_size(576, 768) == (576, 768)
    assert dpt_input_size(500, 1000) == (384, 768)  # longest side kept at most 768
    assert all(s % 32 == 0 for s in dpt_input_size(333, 517))


def test_depth_and_normals_come_back_at_image_size_in_range(tiny_models, images):
    depth = load_labeler("depth", tiny_models["depth"], device="cpu", batch_size=2)(images)
    normal = load_labeler("normal", tiny_models["normal"], device="cpu")(images)
    for im, d, n in zip(images, depth, normal):
        assert d.shape == im.shape[:2] and d.dtype == np.float32 and 0 <= d.min() and d.max() <= 1
        assert n.shape == im.shape and 0 <= n.min() and n.max() <= 1


def test_normal_model_has_three_output_channels_after_reload(tiny_models):
    from models.dpt_normals import DPTForSurfaceNormals

    model = DPTForSurfaceNormals.from_pretrained(tiny_models["normal"])
    assert model.config.num_output_channels == 3 and model.head.head[-2].out_channels == 3


def test_semseg_gives_coco_panoptic_class_ids(tiny_models, images):
    labeler = load_labeler("semseg", tiny_models["semseg"], device="cpu")
    assert labeler.model.config.num_labels == len(COCO_PANOPTIC) == 133
    for im, seg in zip(images, labeler(images)):
        assert seg.shape == im.shape[:2] and seg.dtype == np.uint8 and seg.max() < 133


def test_det_gives_normalized_boxes_with_coco_names(tiny_models, images):
    everything = load_labeler("det", tiny_models["det"], device="cpu", min_score=0.0)(images)
    assert len(everything) == 4 and all(len(instances) == 20 for instances in everything)  # every query
    for inst in everything[0]:
        xmin, ymin, xmax, ymax = inst["boxes"]
        assert 0 <= xmin <= xmax <= 1 and 0 <= ymin <= ymax <= 1
        assert inst["class_name"] in COCO_THINGS and 0 <= inst["score"] <= 1


def test_det_keeps_instances_at_or_above_the_threshold_best_first(tiny_models):
    labeler = load_labeler("det", tiny_models["det"], device="cpu", min_score=0.6)
    scores = torch.tensor([0.2, 0.9, 0.6, 0.59, 0.75])
    labels = torch.tensor([0, 15, 16, 2, 34])
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 5)
    kept = labeler.to_label((scores, labels, boxes))
    assert [(i["class_name"], i["score"]) for i in kept] == [("cat", 0.9), ("baseball bat", 0.75), ("dog", 0.6)]
    assert kept[0]["boxes"] == [0.1, 0.2, 0.3, 0.4]


def test_clip_map_is_projected_patch_tokens(tiny_models, images):
    labeler = load_labeler("clip", tiny_models["clip"], device="cpu")
    maps = labeler(images)
    assert maps[0].shape == (14, 21, 16) and maps[1].shape == (14, 21, 16)  # 300x451 and 400x600 at short side 224
    square = np.array(photo("astronaut"))  # 512x512 -> 224x224 -> 14x14
    (grid,) = labeler([square])
    assert grid.shape == (14, 14, labeler.model.config.projection_dim)
    # The same numbers as the model's own pooled path would give for these tokens: layer norm, then projection.
    model = labeler.model
    x = labeler._batch([square], (224, 224))
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=x).last_hidden_state[:, 1:]
        expected = model.visual_projection(model.vision_model.post_layernorm(hidden))
    assert np.allclose(grid.reshape(-1, grid.shape[-1]), expected[0].numpy(), atol=1e-5)


def open_clip_copy(hf, folder):
    """transformers' CLIP image tower (a CLIPVisionModelWithProjection) as open_clip's CLIP class with the same
    weights, saved in open_clip's folder layout: the test's own mapping between the two libraries' names."""
    import open_clip

    from models.quality import save_clip

    c = hf.config
    model_cfg = {"embed_dim": c.projection_dim, "quick_gelu": c.hidden_act == "quick_gelu",
                 "vision_cfg": {"image_size": c.image_size, "layers": c.num_hidden_layers, "width": c.hidden_size,
                                "patch_size": c.patch_size, "head_width": c.hidden_size // c.num_attention_heads,
                                "mlp_ratio": c.intermediate_size / c.hidden_size},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    clip = open_clip.CLIP(**model_cfg)
    v, h = hf.vision_model, hf.state_dict()
    state = {"conv1.weight": h["vision_model.embeddings.patch_embedding.weight"],
             "class_embedding": h["vision_model.embeddings.class_embedding"],
             "positional_embedding": h["vision_model.embeddings.position_embedding.weight"],
             "proj": h["visual_projection.weight"].T}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            state[f"{ours}.{p}"] = h[f"vision_model.{theirs}.{p}"]
    for i in range(len(v.encoder.layers)):
        layer, block = f"vision_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for p in ("weight", "bias"):
            state[f"{block}.attn.in_proj_{p}"] = torch.cat([h[f"{layer}.self_attn.{q}_proj.{p}"] for q in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                state[f"{block}.{ours}.{p}"] = h[f"{layer}.{theirs}.{p}"]
    missing, _ = clip.visual.load_state_dict(state, strict=False)
    assert not missing, missing
    return save_clip(clip, model_cfg, folder)


def test_clip_features_are_the_same_through_open_clip(tiny_models, images, tmp_path):
    """The CLIP labeler through open_clip's classes (`label.options.clip.library: open_clip`) gives the same maps as
    through transformers' for the same weights, square or not (position embeddings resized alike)."""
    from core import registry
    from core.config import load_config
    from models.labelers import OpenClipLabeler, load_clip_labeler

    through_transformers = load_labeler("clip", tiny_models["clip"], device="cpu")
    folder = open_clip_copy(through_transformers.model, tmp_path / "open_clip")
    through_open_clip = load_clip_labeler(str(folder), "cpu", 8, library="open_clip", short_side=224)
    assert isinstance(through_open_clip, OpenClipLabeler)
    square = np.array(photo("astronaut"))
    for ours, theirs in zip(through_open_clip([*images[:2], square]), through_transformers([*images[:2], square])):
        assert ours.shape == theirs.shape and np.allclose(ours, theirs, atol=1e-5)
    bad = load_config("demo", ["label.options={clip: {library: open_clip}}", "label.models.clip=ViT-Nope@openai"])
    with pytest.raises(ValueError, match="label.models.clip = 'ViT-Nope@openai': with label.options.clip.library"):
        registry.get("clip").labeler.check(bad.label)  # what the label stage runs before any work


def test_unknown_labeler_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match="unknown labeler 'dept'"):
        load_labeler("dept", tiny_models["depth"])


def test_unreachable_weights_fail_at_once_naming_the_model_and_how_to_provide_it(tmp_path, monkeypatch):
    from models.labelers import WeightsUnavailable, check_weights

    with pytest.raises(WeightsUnavailable, match=r"label\.models\.depth = 'models/omnidata/depth': no such folder; "
                                                 r"convert Omnidata's omnidata_dpt_depth_v2\.ckpt with `python -m "
                                                 r"pipeline convert-omnidata"):
        check_weights("depth", "models/omnidata/depth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailable, match="holds no config.json"):
        check_weights("clip", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # empty: nothing to fall back on
    with pytest.raises(WeightsUnavailable, match=r"label\.models\.semseg = 'facebook/mask2former-swin-base-coco-"
                                                 r"panoptic': not in the local Hugging Face cache .*hf download"):
        check_weights("semseg", "facebook/mask2former-swin-base-coco-panoptic")
    check_weights("clip", save_random_models(tmp_path / "models", "tiny", ["clip"])["clip"])  # a model folder: fine


def test_a_labeler_records_its_source_and_weights_hash_and_random_weights(tiny_models, tmp_path):
    from models.random_weights import save_random_model

    first = load_labeler("clip", tiny_models["clip"], "cpu")
    again = load_labeler("clip", tiny_models["clip"], "cpu")
    other = load_labeler("clip", save_random_model("clip", tmp_path / "clip-seed1", "tiny", seed=1), "cpu")
    assert first.provenance == again.provenance and first.provenance["source"] == tiny_models["clip"]
    assert first.provenance["random_weights"] is True and len(first.provenance["weights_sha256"]) == 64
    assert other.provenance["weights_sha256"] != first.provenance["weights_sha256"]
    real = tmp_path / "saved"  # the same model class saved without the random-weights marker
    first.model.save_pretrained(real)
    assert load_labeler("clip", str(real), "cpu").provenance["random_weights"] is False
