"""Out-of-the-box evaluation: the metrics on hand-made cases, and `evaluate` on a small dataset with depth pseudo
labels, a depth tokenizer and a 4M model that predicts depth from RGB."""
import json

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from models.fourm import FourM, FourMConfig
from models.vqvae import VQVAE, save_tokenizer, tokenizer_config
from core.config import load_config
from stages.transfer.evaluate import EvaluateInputError, depth_figures, normal_angles, run_evaluate
from stages.dataset.shards import DatasetLayout, ShardWriter
from tests.test_pretrain import dataset as token_dataset


def test_depth_is_scored_up_to_scale_and_shift_and_normals_by_angle():
    label = torch.rand(2, 1, 8, 8) * 0.8 + 0.1
    affine = depth_figures(2 * label + 0.1, label)  # the same depth, another scale and shift
    assert torch.allclose(affine["standardised_l1"], torch.zeros(2), atol=1e-6)
    assert torch.equal(affine["delta1"], torch.full((2,), 100.0))
    assert (depth_figures(1 - label, label)["standardised_l1"] > 1).all()  # near and far swapped
    assert (depth_figures(label ** 4, label)["delta1"] < 90).all()  # no scale and shift makes it the label
    up = torch.zeros(1, 3, 2, 2)
    up[:, 2] = 1
    assert normal_angles(up, up).item() == pytest.approx(0, abs=1e-5)
    assert normal_angles(-up, up).item() == pytest.approx(180)
    side = torch.zeros(1, 3, 2, 2)
    side[:, 0] = 1
    assert normal_angles(side, up).item() == pytest.approx(90)


def evaluation_dataset(root):
    """The pretraining test's token shards, with depth pseudo labels, a depth tokenizer and a model predicting depth;
    returns (root, config)."""
    root = token_dataset(root)
    layout = DatasetLayout(root)
    depth = (np.linspace(1000, 60000, 96)[None, :] * np.ones((64, 1))).astype(np.uint16)  # the photos are 96x64
    png = cv2.imencode(".png", depth)[1].tobytes()
    for shard in sorted(p.stem for p in (root / "rgb").glob("shard-*.tar")):
        keys = [f"{shard[-3:]}{i:06d}" for i in range(4)]
        with ShardWriter(layout, "label_depth", shard, ["depth"]) as writer:
            for key in keys:
                writer.write(key, {"depth": ("png", png)})
            writer.commit(pa.table({"key": keys, "status": ["ok"] * 4}), {})
    torch.manual_seed(0)
    save_tokenizer(VQVAE(tokenizer_config("depth", "tiny", codebook_size=32)), root / "tokenizers" / "depth")
    model = FourM(FourMConfig.sized("Ti", dim=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                                    domains_in=["rgb@224", "tok_rgb@224"], domains_out=["tok_rgb@224", "tok_depth@224"],
                                    vocab_sizes={"tok_rgb@224": 64, "tok_depth@224": 32}))
    model.save_pretrained(root / "model")
    config = load_config("paper", ["pretrain.modalities=[rgb@224, tok_rgb@224, caption, det]", "pretrain.val_batches=1",
                                   "pretrain.input_tokens=32", "pretrain.target_tokens=32"])
    return root, config


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root, config = evaluation_dataset(tmp_path_factory.mktemp("evaluate"))
    return root, config, run_evaluate(root, config, root / "model", samples=3, batch_size=2, pictures=2)


def test_evaluate_scores_predictions_from_rgb_against_the_pseudo_labels(evaluated):
    root, config, results = evaluated
    assert results["samples"] == 3 and results["val_shards"] == ["shard-000002"]
    depth = results["scores"]["depth"]
    assert set(depth) == {"standardised_l1", "delta1", "standardised_l1_baseline", "delta1_baseline"}
    assert 0 <= depth["delta1"] <= 100 and depth["standardised_l1"] >= 0
    # the label is a ramp; a constant (each sample's mean) standardises to 0 and scores the ramp's mean absolute
    # deviation over its standard deviation, sqrt(12) / 4
    assert depth["standardised_l1_baseline"] == pytest.approx(np.sqrt(12) / 4, rel=0.02)
    assert "val_loss.tok_rgb@224" in results["val_loss"]
    saved = json.loads((root / "model" / "evaluation" / "results.json").read_text())
    assert saved["scores"] == results["scores"]
    from PIL import Image

    picture = Image.open(results["picture"])  # 2 rows: rgb, depth label, depth predicted
    assert picture.width > 3 * 1.9 * 70 * 0.9 and picture.height > 2 * 2.0 * 70 * 0.9
    again = run_evaluate(root, config, root / "model", samples=3, batch_size=3, pictures=1)
    assert again["scores"]["depth"] == pytest.approx(results["scores"]["depth"])  # batching changes no score


def test_evaluate_names_what_it_cannot_use(evaluated, tmp_path):
    root, config, _ = evaluated
    FourM(FourMConfig.sized("Ti", dim=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                            domains_in=["tok_rgb@224"], domains_out=["tok_rgb@224"],
                            vocab_sizes={"tok_rgb@224": 64})).save_pretrained(tmp_path / "no-rgb")
    with pytest.raises(EvaluateInputError, match="no RGB pixel embedding"):
        run_evaluate(root, config, tmp_path / "no-rgb")
    FourM(FourMConfig.sized("Ti", dim=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                            domains_in=["rgb@224"], domains_out=["tok_rgb@224"],
                            vocab_sizes={"tok_rgb@224": 64})).save_pretrained(tmp_path / "rgb-only")
    with pytest.raises(EvaluateInputError, match="predicts none of"):
        run_evaluate(root, config, tmp_path / "rgb-only")


def test_the_command_prints_each_score_beside_its_baseline(evaluated, capsys):
    from pipeline.cli import main as cli

    root, _, _ = evaluated
    code = cli(["evaluate", "--data", str(root), "--model", str(root / "model"), "--samples", "2", "--profile", "paper",
                "--set", "pretrain.modalities=[rgb@224, tok_rgb@224, caption, det]", "--set", "pretrain.val_batches=1",
                "--set", "pretrain.input_tokens=32", "--set", "pretrain.target_tokens=32"])
    out = capsys.readouterr().out
    assert code == 0 and "on 2 validation samples (shard-000002)" in out
    assert "depth: standardised_l1 " in out and "(each sample's mean or majority: 0.866" in out
    assert "masked validation loss: tok_rgb@224" in out and "predictions.png" in out
