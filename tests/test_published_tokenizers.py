"""The tokenizer architecture against apple/ml-4m's own classes: tiny tokenizers built and run by the reference
(tests/fixtures/reference/make_tokenizer_outputs.py), saved in its published layout, must load here tensor for
tensor and tokenize and decode as the reference did."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.vqvae import VQVAE, VQConfig, load_tokenizer, save_tokenizer, sincos_table, tokenizer_config

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
sys.path.insert(0, str(FIXTURES))
from tokenizer_inputs import SIZES, tokenizer_input, unet_input

NAMES = ("rgb", "depth", "semseg", "clip")


@pytest.fixture(scope="module")
def reference():
    """Each fixture tokenizer loaded from its published folder, with the reference's outputs."""
    return {name: (load_tokenizer(FIXTURES / "tokenizers" / name),
                   load_file(FIXTURES / "tokenizers" / name / "outputs.safetensors")) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES)
def test_the_same_token_ids_as_the_reference_at_224_and_448(reference, name, size):
    model, outputs = reference[name]
    ids = model.tokenize(tokenizer_input(name, size))
    assert ids.shape == outputs[f"ids_{size}"].shape
    assert torch.equal(ids, outputs[f"ids_{size}"])


def test_normal_maps_tokenize_through_the_three_channel_architecture_as_rgb_does(reference):
    """Normals' published tokenizer is rgb's architecture (3 channels); only their preprocessing differs."""
    model, outputs = reference["rgb"]
    assert model.cfg.n_channels == 3 and model.cfg.diffusion
    assert torch.equal(model.tokenize(tokenizer_input("rgb", 224)), outputs["ids_224"])


def test_the_position_tables_are_the_fixed_sin_cos_ones_at_the_largest_size(reference):
    model, _ = reference["rgb"]
    assert model.encoder.pos_emb.shape == (1, 32, 28, 28)  # built at 448 for patch 16
    assert torch.equal(model.encoder.pos_emb, sincos_table(28, 32))
    assert not model.encoder.pos_emb.requires_grad


@pytest.mark.parametrize("name", ["semseg", "clip"])
def test_the_vit_decoders_decode_as_the_reference(reference, name):
    model, outputs = reference[name]
    decoded = model.decode_tokens(outputs["ids_64"])
    if name == "semseg":
        assert decoded.shape == (2, 134, 64, 64)  # logits of the 134 labels (0 = unlabelled)
        decoded = decoded[:, :, ::8, ::8]
    torch.testing.assert_close(decoded, outputs["decoded"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["rgb", "depth"])
def test_the_unet_forward_and_whole_decodes_equal_the_reference(reference, name):
    model, outputs = reference[name]
    ids = outputs["ids_64"]
    x_t, t = unet_input(model.cfg.n_channels)
    with torch.no_grad():
        prediction = model.decoder(x_t, t, model.quantize.lookup(ids))
    torch.testing.assert_close(prediction, outputs["unet_out"], atol=1e-4, rtol=0)
    ddim = model.decode_tokens(ids, steps=5, scheduler="ddim", generator=torch.Generator().manual_seed(6),
                               image_size=64)
    torch.testing.assert_close(ddim, outputs["ddim5"], atol=1e-4, rtol=0)
    ddpm = model.decode_tokens(ids, steps=10, scheduler="ddpm", generator=torch.Generator().manual_seed(7),
                               image_size=64)
    torch.testing.assert_close(ddpm, outputs["ddpm10"], atol=1e-4, rtol=0)
    # deterministic from the same noise; a different start gives a different image
    again = model.decode_tokens(ids, steps=5, generator=torch.Generator().manual_seed(6), image_size=64)
    other = model.decode_tokens(ids, steps=5, generator=torch.Generator().manual_seed(8), image_size=64)
    assert torch.equal(ddim, again) and not torch.allclose(ddim, other)


def _copy(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / "tokenizers" / name, folder)
    return folder


def test_a_single_safetensors_file_with_its_settings_in_metadata_loads(tmp_path, reference):
    folder = FIXTURES / "tokenizers" / "clip"
    settings = json.loads((folder / "config.json").read_text())
    single = tmp_path / "clip.safetensors"
    save_file(load_file(folder / "model.safetensors"), single, metadata={k: json.dumps(v) for k, v in settings.items()})
    _, outputs = reference["clip"]
    assert torch.equal(load_tokenizer(single).tokenize(tokenizer_input("clip", 224)), outputs["ids_224"])


def test_a_missing_tensor_is_refused_by_name(tmp_path):
    folder = _copy("semseg", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["encoder.blocks.1.attn.qkv.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor encoder\.blocks\.1\.attn\.qkv\.weight"):
        load_tokenizer(folder)


def test_a_wrong_codebook_size_is_refused_by_name(tmp_path):
    folder = _copy("clip", tmp_path)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "codebook_size": 128}))
    with pytest.raises(ValueError, match=r"quantize\._codebook\.embed has shape \(64, 32\), the settings make "
                                         r"\(128, 32\) \(codebook_size\?\)"):
        load_tokenizer(folder)


@pytest.mark.parametrize("change, message", [
    ({"learning_rate": 0.1}, r"unknown tokenizer settings \['learning_rate'\]"),
    ({"quant_type": "fsq"}, r"quant_type='fsq' is not supported \(supported: 'lucid', 'memcodes'\)"),
    ({"num_codebooks": 2}, r"num_codebooks=2 is not supported \(supported: 1\)"),  # lucid: one codebook
    ({"dec_type": "uvit_b"}, r"dec_type='uvit_b' is not supported"),
    ({"beta_schedule": "squaredcos_cap_v2"}, r"beta_schedule='squaredcos_cap_v2' is not supported"),
])
def test_unknown_and_unsupported_settings_are_refused_by_name(tmp_path, change, message):
    folder = _copy("rgb", tmp_path)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, **change}))
    with pytest.raises(ValueError, match=message) as refused:
        load_tokenizer(folder)
    assert str(folder / "config.json") in str(refused.value)  # where the bad value came from


def test_a_saved_tokenizer_is_in_the_published_layout_and_loads_back(tmp_path, reference):
    model, outputs = reference["depth"]
    save_tokenizer(model, tmp_path / "depth")
    assert sorted(p.name for p in (tmp_path / "depth").iterdir()) == ["config.json", "model.safetensors"]
    assert set(load_file(tmp_path / "depth" / "model.safetensors")) == set(model.state_dict())
    again = load_tokenizer(tmp_path / "depth")
    assert torch.equal(again.tokenize(tokenizer_input("depth", 224)), outputs["ids_224"])


def test_the_codebook_moves_toward_its_latents_and_restarts_dead_codes():
    cfg = VQConfig(dec_type="vit_tiny_dec", enc_type="vit_tiny_enc", image_size=32, n_channels=3, codebook_size=8,
                   threshold_ema_dead_code=0.5, ema_decay=0.5)
    model = VQVAE(cfg).train()
    before = model.quantize.codebook.clone()
    latents = torch.randn(2, 32, 2, 2)
    codes, loss, ids = model.quantize(latents)
    assert codes.shape == latents.shape and ids.shape == (2, 2, 2) and float(loss) > 0
    moved = model.quantize.codebook
    used = torch.zeros(8, dtype=torch.bool)
    used[ids.flatten()] = True
    unit = torch.nn.functional.normalize(latents.permute(0, 2, 3, 1).reshape(-1, 32), dim=-1)
    # unused codes' counts decay below the threshold: each is restarted on one of the batch's unit latents
    for code in torch.nonzero(~used).flatten():
        assert torch.isclose(unit @ moved[code], torch.tensor(1.0), atol=1e-5).any()
    assert not torch.equal(before[used], moved[used])


def test_our_crops_reach_the_reference_tokenizers_preprocessed_as_its_own_transforms_do():
    """Depth standardised per crop without its top and bottom 10%, normals' x mirrored on a flip, semseg ids
    shifted by one (unlabelled 255 -> 0): against the reference's DepthTransform, NormalTransform, SemsegTransform."""
    from tokenizer_inputs import preprocessing_labels

    from core import registry

    expected = load_file(FIXTURES / "preprocessing.safetensors")
    depth, normal, semseg = preprocessing_labels()
    whole, flipped = [0, 0, 224, 224, 0], [0, 0, 224, 224, 1]

    def ours(name, labels, crop):
        modality = registry.get(name)
        return modality.reference_input(torch.stack([modality.to_tensor(x, crop, (224, 224)) for x in labels]))

    torch.testing.assert_close(ours("depth", depth, whole)[:, :, :64, :64], expected["depth"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours("normal", normal, flipped)[:, :, :64, :64], expected["normal_flipped"],
                               atol=1e-5, rtol=0)
    assert torch.equal(ours("semseg", semseg, whole), expected["semseg"].long())
    # and back: the decoder's 134 logits are ours shifted by one; standardised depth is stretched to [-1, 1]
    logits = torch.randn(2, 134, 4, 4)
    assert torch.equal(registry.get("semseg").from_reference_output(logits).argmax(1), logits[:, 1:].argmax(1))
    back = registry.get("depth").from_reference_output(expected["depth"])
    assert float(back.amin()) == -1 and float(back.amax()) == 1


def test_each_modality_names_its_published_tokenizer_and_our_paper_settings_are_its_architecture():
    from core import registry

    for modality in registry.ModalitySet().tokenized():
        assert modality.published_tokenizer.startswith("EPFL-VILAB/4M_tokenizers_")
        cfg = tokenizer_config(modality.name, "paper", image_size=448)
        cfg.check(modality.name)
        assert modality.reference_tokenizer_problems(cfg) == []
        assert cfg.enc_type == "vit_b_enc" and cfg.dec_type in ("vit_b_dec", "unet_patched") and cfg.post_mlp
    rgb, semseg, clip = (tokenizer_config(m, "paper") for m in ("rgb", "semseg", "clip"))
    assert (rgb.codebook_size, rgb.dec_type, rgb.prediction_type, rgb.beta_schedule) == (16384, "unet_patched",
                                                                                         "sample", "linear")
    assert (semseg.n_labels, semseg.n_channels, semseg.dec_type) == (134, 64, "vit_b_dec")
    assert (clip.n_channels, clip.patch_proj, clip.codebook_size) == (512, False, 8192)
    assert registry.get("depth").reference_tokenizer_problems(rgb) == [
        "depth is 1-channel images: the tokenizer reads n_channels=3, n_labels=None, patch_proj=True"]


def test_a_global_vector_tokenizer_tokenizes_and_decodes_as_the_references_memcodes():
    """The reference's other form (its DINOv2 and ImageBind global tokenizers): bottleneck MLPs around Memcodes,
    16 codebooks each giving one token of a 1x1 map; loaded from its layout, the same ids and decoded vectors."""
    model = load_tokenizer(FIXTURES / "tokenizers" / "dinov2_global")
    outputs = load_file(FIXTURES / "tokenizers" / "dinov2_global" / "outputs.safetensors")
    ids = model.tokenize(tokenizer_input("dinov2_global", 224))
    assert ids.shape == (8, 16, 1, 1) and torch.equal(ids, outputs["ids"])
    assert torch.equal(model.unflatten(ids.flatten(1)), ids)  # as the token shards store them: 16 per crop
    torch.testing.assert_close(model.decode_tokens(ids), outputs["decoded"], atol=1e-5, rtol=0)


def test_the_dinov2_global_entry_is_the_references_global_tokenizer_and_trains_through_its_codes():
    """Our paper settings are the published DINOv2-B14-global architecture (BMLP B_6-Wi_1024 both sides, Memcodes
    8,192 x 16); in training the straight-through Gumbel choice lets the loss reach the encoder."""
    from core import registry

    registry.ModalitySet(["models.modalities_4m21_networks"])
    cfg = tokenizer_config("dinov2_global", "paper")
    assert (cfg.enc_type, cfg.dec_type, cfg.quant_type, cfg.codebook_size, cfg.num_codebooks, cfg.latent_dim) == (
        "BottleneckMLP/B_6-Wi_1024", "BottleneckMLP/B_6-Wi_1024", "memcodes", 8192, 16, 1024)
    assert registry.get("dinov2_global").reference_tokenizer_problems(cfg) == []
    assert registry.get("dinov2_global").reference_tokenizer_problems(tokenizer_config("dinov2", "paper"))
    torch.manual_seed(0)
    model = VQVAE(tokenizer_config("dinov2_global", "tiny", n_channels=16, codebook_size=32)).train()
    x = torch.randn(8, 16, 1, 1)
    out = model(x, loss="cosine")
    assert out["ids"].shape == (8, 16, 1, 1) and float(out["commitment_loss"]) == 0
    assert float(out["loss"].detach()) == pytest.approx(
        1 - float(torch.nn.functional.cosine_similarity(model.decode_tokens(out["ids"]).flatten(1), x.flatten(1)).mean()),
        abs=1e-5)  # the Gumbel choice is hard: the codes decoded are the ids' codes
    out["loss"].backward()
    assert model.encoder.linear_in.weight.grad.abs().sum() > 0 and model.quantize.codes.grad.abs().sum() > 0


def test_the_sam_instance_mask_tokenizer_is_the_references_with_its_convnext_output_blocks():
    """4M-21's SAM-instance tokenizer (ViT both sides, two ConvNeXt blocks after the decoder, `out_conv`): a
    reference-made one loads one tensor to one tensor and gives its ids of 64x64 masks (4x4) and its decoded
    logits; our paper settings are the published config's (ViT-B, 1,024 codes, latent 1,024, 16-pixel patches)."""
    from core import registry

    model = load_tokenizer(FIXTURES / "tokenizers" / "sam_instance")
    outputs = load_file(FIXTURES / "tokenizers" / "sam_instance" / "outputs.safetensors")
    ids = model.tokenize(tokenizer_input("sam_instance", 64))
    assert ids.shape == (8, 4, 4) and torch.equal(ids, outputs["ids"])
    torch.testing.assert_close(model.decode_tokens(ids), outputs["decoded"], atol=1e-5, rtol=0)
    registry.ModalitySet(["models.modalities_4m21_networks"])
    cfg = tokenizer_config("sam_instance", "paper")
    assert (cfg.enc_type, cfg.dec_type, cfg.codebook_size, cfg.latent_dim, cfg.patch_size, cfg.out_conv) == (
        "vit_b_enc", "vit_b_dec", 1024, 1024, 16, True)
    assert registry.get("sam_instance").reference_tokenizer_problems(cfg) == []
