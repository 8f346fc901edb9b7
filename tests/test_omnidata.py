"""Omnidata's Lightning checkpoints -> transformers: same random tensors, same outputs, clear errors."""
import numpy as np
import pytest
import torch

from models.labelers import load_labeler
from models.omnidata import (TOLERANCE, ConversionError, OmnidataDPT, TASK_CHANNELS, compare_layouts, convert_checkpoint,
                             convert_state_dict, dpt_hybrid_config, dpt_model_class, read_checkpoint)
from pipeline.cli import main as cli
from tests.helpers import photo


def omnidata_checkpoint(path, task: str, seed: int = 0) -> OmnidataDPT:
    """A checkpoint laid out as Omnidata publishes it: Lightning's dict, MiDaS names under `model.`."""
    torch.manual_seed(seed)
    reference = OmnidataDPT(dpt_hybrid_config("tiny", TASK_CHANNELS[task])).eval()
    with torch.no_grad():  # spread the weights so every layer's contribution shows in the output
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        # Centre the last convolution's output on 0.5 for photo-like inputs, so that neither the final ReLU
        # nor the clamp to [0, 1] flattens it: a live output shows any difference between the layouts.
        last, seen = reference.scratch.output_conv[4], []
        hook = last.register_forward_hook(lambda module, args, out: seen.append(out.mean((0, 2, 3))))
        reference(torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(seed)))
        hook.remove()
        last.bias.add_(0.5 - seen[0])
    state = {f"model.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 7, "global_step": 1000, "state_dict": state}, path)
    return reference


@pytest.mark.parametrize("task", ["depth", "normal"])
def test_converted_labeler_gives_the_checkpoints_own_outputs(tmp_path, task):
    reference = omnidata_checkpoint(tmp_path / "omnidata.ckpt", task)
    config = dpt_hybrid_config("tiny", TASK_CHANNELS[task])
    report = convert_checkpoint(tmp_path / "omnidata.ckpt", tmp_path / task, task, config=config)
    assert report["max_abs_diff"] < TOLERANCE and report["tensors"] > 100
    assert (tmp_path / task / "model.safetensors").is_file()

    # Through the labeler's loading path, on a real non-square photo, against the reference layout with
    # Omnidata's own preprocessing (depth: pixels to [-1, 1]; normals: [0, 1]) and clamp.
    image = np.array(photo("chelsea"))[:192, :320]
    labeler = load_labeler(task, str(tmp_path / task), device="cpu")
    label = labeler([image])[0]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    if task == "depth":
        x = (x - 0.5) / 0.5
    with torch.no_grad():
        expected = reference(x).clamp(0, 1)[0]
    expected = expected[0].numpy() if task == "depth" else expected.permute(1, 2, 0).numpy()
    assert label.shape == expected.shape
    assert np.abs(label - expected).max() < 1e-5
    assert expected.std() > 0.01  # a live output, not a constant that any mapping would reproduce


def test_the_comparison_catches_a_wrong_mapping(tmp_path):
    omnidata_checkpoint(tmp_path / "omnidata.ckpt", "depth")
    midas = read_checkpoint(tmp_path / "omnidata.ckpt")
    config = dpt_hybrid_config("tiny", 1)
    converted = convert_state_dict(midas)
    prefix = "dpt.encoder.layer.1.attention.attention."
    converted[prefix + "query.weight"], converted[prefix + "key.weight"] = (converted[prefix + "key.weight"],
                                                                            converted[prefix + "query.weight"])
    model = dpt_model_class(1)(config)
    model.load_state_dict(converted)
    assert compare_layouts(midas, model, config) > 5 * TOLERANCE


def test_command_line_converts_and_reports(tmp_path, capsys, monkeypatch):
    omnidata_checkpoint(tmp_path / "omnidata.ckpt", "normal")
    # The command converts the published (paper-sized) layout; a tiny checkpoint does not fit it.
    assert cli(["convert-omnidata", "--checkpoint", str(tmp_path / "omnidata.ckpt"), "--task", "normal",
                "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not match a normal DPT-Hybrid: missing" in err and "omnidata.ckpt" in err
    assert not (tmp_path / "out").exists()

    import models.omnidata as omnidata

    monkeypatch.setattr(omnidata, "dpt_hybrid_config", lambda size, channels: dpt_hybrid_config("tiny", channels))
    assert cli(["convert-omnidata", "--checkpoint", str(tmp_path / "omnidata.ckpt"), "--task", "normal",
                "--out", str(tmp_path / "out")]) == 0
    assert "outputs match the checkpoint's own layout" in capsys.readouterr().out
    assert (tmp_path / "out" / "config.json").is_file()


def test_wrong_task_is_refused_by_shape(tmp_path):
    omnidata_checkpoint(tmp_path / "depth.ckpt", "depth")
    with pytest.raises(ConversionError, match=r"head\.head\.4\.weight has shape \(1, 32, 1, 1\)"):
        convert_checkpoint(tmp_path / "depth.ckpt", tmp_path / "out", "normal",
                           config=dpt_hybrid_config("tiny", 3))


def test_unknown_and_missing_keys_are_named(tmp_path):
    omnidata_checkpoint(tmp_path / "omnidata.ckpt", "depth")
    state = torch.load(tmp_path / "omnidata.ckpt")["state_dict"]
    state["model.scratch.extra_conv.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "extra.ckpt")
    with pytest.raises(ConversionError, match="scratch.extra_conv.weight"):
        convert_checkpoint(tmp_path / "extra.ckpt", tmp_path / "out", "depth", config=dpt_hybrid_config("tiny", 1))
    del state["model.scratch.extra_conv.weight"], state["model.scratch.layer2_rn.weight"]
    torch.save({"state_dict": state}, tmp_path / "missing.ckpt")
    with pytest.raises(ConversionError, match=r"missing \['neck.convs.1.weight'\]"):
        convert_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out", "depth",
                           config=dpt_hybrid_config("tiny", 1))


class NotATensor:
    pass


def test_pickled_objects_need_explicit_trust(tmp_path):
    omnidata_checkpoint(tmp_path / "omnidata.ckpt", "depth")
    checkpoint = torch.load(tmp_path / "omnidata.ckpt")
    checkpoint["hyper_parameters"] = NotATensor()
    torch.save(checkpoint, tmp_path / "pickled.ckpt")
    with pytest.raises(ConversionError, match="--trust-pickle"):
        read_checkpoint(tmp_path / "pickled.ckpt")
    trusted = read_checkpoint(tmp_path / "pickled.ckpt", trust_pickle=True)
    assert {f"model.{k}" for k in trusted} == set(checkpoint["state_dict"])
    with pytest.raises(ConversionError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.ckpt")
