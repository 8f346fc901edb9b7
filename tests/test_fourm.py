"""The 4M model: sizes as the paper counts them, its attention masks, and the reference's weights giving the
reference's outputs (fixtures made by running apple/ml-4m itself: tests/fixtures/reference/make_fourm_outputs.py)."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.fourm import SIZES, CheckpointError, FourM, FourMConfig, convert_checkpoint, sincos_2d
from pipeline.cli import main as cli

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CHECKPOINT, IO = FIXTURES / "fourm_tiny.safetensors", FIXTURES / "fourm_tiny_io.safetensors"
CHECKPOINT_21, IO_21 = FIXTURES / "fourm21_tiny.safetensors", FIXTURES / "fourm21_tiny_io.safetensors"


def reference_io(path=IO):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    batch = {m: {} for m in json.loads(meta["modalities"])}  # the reference's order: it decides truncation
    for key, value in tensors.items():
        if key.startswith("batch."):
            modality, name = key[len("batch."):].rsplit(".", 1)
            batch[modality][name] = value.bool() if name in ("input_mask", "target_mask") else value
    return batch, tensors, int(meta["num_encoder_tokens"]), int(meta["num_decoder_tokens"]), meta


@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_counts_are_the_papers_and_the_references(size):
    paper = {"Ti": 24.9e6, "S": 59.0e6, "B": 198.8e6, "L": 705.7e6, "XL": 2823e6}  # Table 4, recounted
    reference = json.loads(reference_io()[4]["parameters_without_embeddings"])
    with torch.device("meta"):
        model = FourM(FourMConfig.sized(size))
    assert model.num_parameters() == reference[size]
    assert abs(model.num_parameters() - paper[size]) < 0.06e6 * (10 if size == "XL" else 1)


def test_reference_weights_give_the_reference_loss_and_logits(tmp_path):
    assert cli(["convert-4m", "--checkpoint", str(CHECKPOINT), "--out", str(tmp_path / "model")]) == 0
    model = FourM.from_pretrained(tmp_path / "model").eval()
    batch, expected, n_in, n_out, _ = reference_io()
    with torch.no_grad():
        loss, losses = model(batch, n_in, n_out)
        logits = model(batch, n_in, n_out, return_logits=True)
    assert float(loss) == pytest.approx(float(expected["loss"]), abs=1e-4)
    assert set(losses) == {"tok_rgb@224", "tok_depth@224", "caption"}
    for modality in losses:
        assert float(losses[modality]) == pytest.approx(float(expected[f"loss.{modality}"]), abs=1e-4)
        assert logits[modality].shape == expected[f"logits.{modality}"].shape
        assert torch.allclose(logits[modality], expected[f"logits.{modality}"], atol=1e-4)


def test_a_4m21_checkpoint_converts_with_its_modules_modalities_and_gives_the_reference_loss(tmp_path, capsys):
    """Canny-edge tokens, DINOv2's global tokens (learned positions), the palette, the metadata, SAM instances and
    T5 vectors beside RGB and captions, made by the reference's FourM with 4M-21's embedding settings: refused by
    name without the modules that define them, then equal to it."""

    out = tmp_path / "model"
    assert cli(["convert-4m", "--checkpoint", str(CHECKPOINT_21), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "['tok_canny_edge@224', 'tok_dinov2_global', 'color_palette', 'metadata', 'sam_instance', 't5_caption'" in err
    assert "models.modalities_4m21_networks" in err and not out.exists()
    modules = ["models.modalities_4m21", "models.modalities_4m21_networks"]
    assert cli(["convert-4m", "--checkpoint", str(CHECKPOINT_21), "--out", str(out), "--modalities", *modules]) == 0
    model = FourM.from_pretrained(out).eval()  # the saved model names the modules, and loading it imports them
    assert model.cfg.modality_modules == modules and {"metadata", "t5_caption"} <= set(model.cfg.modality_set.names())
    assert "t5_caption" in model.cfg.domains_in and "t5_caption" not in model.cfg.domains_out  # an input only
    batch, expected, n_in, n_out, _ = reference_io(IO_21)
    with torch.no_grad():
        loss, losses = model(batch, n_in, n_out)
        batch["t5_caption"]["tensor"] = torch.zeros_like(batch["t5_caption"]["tensor"])
        without_t5 = model(batch, n_in, n_out)[0]
    assert float(loss) == pytest.approx(float(expected["loss"]), abs=1e-4)
    assert set(losses) == {"tok_rgb@224", "tok_canny_edge@224", "tok_dinov2_global", "caption", "color_palette",
                           "metadata", "sam_instance"}
    assert model.cfg.grid_of("tok_dinov2_global") == 4 and model.cfg.image_size == 64  # 16 tokens at any size
    for modality in losses:
        assert float(losses[modality]) == pytest.approx(float(expected[f"loss.{modality}"]), abs=1e-4)
    assert abs(float(without_t5) - float(loss)) > 1e-3  # the T5 vectors are read: the loss depends on them


def test_sequence_targets_past_256_tokens_take_the_references_positions_per_modality(tmp_path):
    """Captions, SAM instances and poses with targets of up to 285 tokens (made by the reference's FourM): a decoder
    position resets to 0 from each modality's own embedding length on (captions 256, SAM instances 290, poses 263),
    so every per-modality loss equals the reference's; one shared 256 for all of them differed by about 2e-3."""
    out = tmp_path / "model"
    modules = ["models.modalities_4m21_networks", "models.modalities_4m21_external"]
    assert cli(["convert-4m", "--checkpoint", str(FIXTURES / "fourm21_long.safetensors"), "--out", str(out),
                "--modalities", *modules]) == 0
    model = FourM.from_pretrained(out).eval()
    batch, expected, n_in, n_out, _ = reference_io(FIXTURES / "fourm21_long_io.safetensors")
    assert int((~batch["sam_instance"]["target_mask"]).sum(1).max()) > 256  # past one shared limit
    assert [model.decoder_embeddings[m].max_length for m in ("caption", "sam_instance", "human_poses")] == \
        [256, 290, 263]
    with torch.no_grad():
        loss, losses = model(batch, n_in, n_out)
    for modality in ("caption", "sam_instance", "human_poses", "tok_rgb@224"):
        assert float(losses[modality]) == pytest.approx(float(expected[f"loss.{modality}"]), abs=1e-4), modality
    assert float(loss) == pytest.approx(float(expected["loss"]), abs=1e-4)
    from models.generate import Step  # and generation goes as far as each one's length, not one cap of 255

    assert [Step(m, scheme="autoregressive").max_tokens for m in ("caption", "sam_instance", "human_poses")] == \
        [255, 289, 274]


def test_the_hugging_face_folder_layout_converts_to_the_same_model(tmp_path):
    """The reference's FM class saves config.json + model.safetensors without the decoders' shared modality
    embeddings, and with untied heads."""
    tensors = load_file(CHECKPOINT)
    with safe_open(str(CHECKPOINT), "pt") as f:  # the settings as the Hugging Face class's config.json holds them
        settings = {k: yaml.safe_load(v) for k, v in f.metadata().items()}
    folder = tmp_path / "hf"
    folder.mkdir()
    kept = {k: v.clone() for k, v in tensors.items() if not (k.startswith("decoder_embeddings.") and
                                                             k.endswith(".mod_emb"))}
    kept["decoder_embeddings.caption.to_logits.weight"] += 0.01  # untied: the head differs from the embedding
    save_file(kept, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(settings))
    model = convert_checkpoint(folder, tmp_path / "out")
    assert not model.cfg.tie_output
    assert torch.equal(model.decoder_embeddings["caption"].to_logits.weight,
                       kept["decoder_embeddings.caption.to_logits.weight"])
    assert model.decoder_embeddings["tok_rgb@224"].mod_emb is model.encoder_embeddings["tok_rgb@224"].mod_emb
    loaded = FourM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.decoder_embeddings["caption"].to_logits.weight,
                       kept["decoder_embeddings.caption.to_logits.weight"])


def test_a_folder_as_the_references_save_pretrained_writes_it_converts_to_the_same_model(tmp_path):
    """`FM.save_pretrained` writes through safetensors' `save_model`, which keeps one name of a tensor two modules
    share: of each modality embedding shared by the encoder and the decoder, the decoder's. Those modalities stay
    inputs, and the model gives the reference's loss."""
    from dataclasses import replace

    from safetensors.torch import save_model

    reference = convert_checkpoint(CHECKPOINT, tmp_path / "from-file")
    untied = FourM(replace(reference.cfg, tie_output=False))  # the FM class's heads are apart from the embeddings
    untied.load_state_dict(reference.state_dict())
    folder = tmp_path / "saved"
    folder.mkdir()
    save_model(untied, str(folder / "model.safetensors"))
    with safe_open(str(CHECKPOINT), "pt") as f:
        (folder / "config.json").write_text(json.dumps({k: yaml.safe_load(v) for k, v in f.metadata().items()}))
    written = set(load_file(folder / "model.safetensors"))
    assert "decoder_embeddings.tok_rgb@224.mod_emb" in written and "encoder_embeddings.tok_rgb@224.mod_emb" not in written
    model = convert_checkpoint(folder, tmp_path / "out").eval()
    assert model.cfg.domains_in == reference.cfg.domains_in and "tok_rgb@224" in model.cfg.domains_in
    batch, expected, n_in, n_out, _ = reference_io()
    with torch.no_grad():
        loss, _ = model(batch, n_in, n_out)
    assert float(loss) == pytest.approx(float(expected["loss"]), abs=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"encoder.7.attn.qkv.weight": torch.zeros(192, 64)}), "unknown tensors.*encoder.7"),
    (lambda t: t.pop("decoder.1.cross_attn.kv.weight"), "missing tensors.*decoder.1.cross_attn.kv.weight"),
    (lambda t: t.update({"encoder.0.mlp.fc1.weight": torch.zeros(100, 64)}), "wrong shape.*encoder.0.mlp.fc1"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path, change, message):
    tensors = load_file(CHECKPOINT)
    with safe_open(str(CHECKPOINT), "pt") as f:
        metadata = f.metadata()
    change(tensors)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(tmp_path / "bad.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_names_a_missing_checkpoint(tmp_path, capsys):
    assert cli(["convert-4m", "--checkpoint", str(tmp_path / "nothing.safetensors"), "--out", str(tmp_path)]) == 2
    assert "nothing.safetensors" in capsys.readouterr().err


def test_decoder_attention_is_bidirectional_for_images_causal_for_sequences_and_within_modalities():
    model = FourM(FourMConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, image_size=32,
                              domains_in=["tok_rgb@224", "caption"], domains_out=["tok_rgb@224", "caption"],
                              vocab_sizes={"tok_rgb@224": 16, "caption": 50}))
    # slots: 3 image targets (count 3 on the first), then 3 caption slots (one each), then a padding slot
    see = torch.tensor([[3, 0, 0, 1, 1, 1, 0]])
    modality = torch.tensor([[0, 0, 0, 1, 1, 1, -1]])
    blocked = model._decoder_mask(see, modality)[0]
    allowed = ~blocked
    assert allowed[:3, :3].all() and not allowed[:3, 3:].any()        # images: every target of the image
    assert torch.equal(allowed[3:6, 3:6], torch.tril(torch.ones(3, 3, dtype=torch.bool)))  # captions: causal
    assert not allowed[3:6, :3].any() and not allowed[:6, 6].any()    # never another modality, never padding


def test_positions_and_shared_embeddings_follow_the_paper():
    table = sincos_2d(14, 768)
    assert table.shape == (1, 196, 768)
    omega = 1.0 / 10000 ** (torch.arange(192) / 192)
    row1_col0, row0_col1 = table[0, 14], table[0, 1]  # raster order: [sin rw, cos rw, sin cw, cos cw]
    assert torch.allclose(row1_col0[:192], torch.sin(omega)) and torch.allclose(row1_col0[384:576], torch.zeros(192))
    assert torch.allclose(row0_col1[:192], torch.zeros(192)) and torch.allclose(row0_col1[384:576], torch.sin(omega))
    model = FourM(FourMConfig.sized("Ti", encoder_depth=1, decoder_depth=1))
    caption = model.decoder_embeddings["caption"]
    assert caption.to_logits.weight is caption.token_emb.weight       # tied heads for training
    assert caption.mod_emb is model.encoder_embeddings["caption"].mod_emb
    with pytest.raises(ValueError, match="rgb@224"):
        FourMConfig(domains_out=["rgb@224"])                            # pixels are never a target


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    batch, _, n_in, n_out, _ = reference_io()
    model = FourM(FourMConfig(dim=64, encoder_depth=2, decoder_depth=2, num_heads=4, image_size=64,
                              domains_in=list(batch), domains_out=["tok_rgb@224", "tok_depth@224", "caption"],
                              vocab_sizes={"tok_rgb@224": 64, "tok_depth@224": 32, "caption": 300}))
    calls = []
    model.encoder[0].register_forward_pre_hook(lambda *_: calls.append(1))
    results, counted = [], []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        calls.clear()
        loss, _ = model(batch, n_in, n_out)
        loss.backward()
        counted.append(len(calls))
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert counted == [1, 2]  # checkpointed: the block runs again in backward instead of keeping its activations
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert plain == pytest.approx(recomputed, abs=1e-6) and plain_grads.keys() == recomputed_grads.keys()
    assert all(torch.allclose(plain_grads[n], recomputed_grads[n], atol=1e-6) for n in plain_grads)
