"""4M pretraining on a real Ray Train: the loss falls, metrics and validation losses are logged, a stopped run
resumes to exactly the weights of an uninterrupted one; two workers train alike under DDP and under FSDP, through
a worker that dies (Ray Train restarts the group, which resumes from the checkpoint); bad input fails before
training."""
import functools
import json
import os
import sys
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from models.fourm import FourM
from models.vqvae import VQVAE, save_tokenizer, tokenizer_config
from models.text_tokenizer import train_text_tokenizer
from core.config import load_config
from stages.fourm.pretrain import PretrainInputError, PretrainTask, model_config, run_dir, run_pretrain, train_worker
from tests.test_fourm_data import write_dataset

SETTINGS = ["pretrain.modalities=[rgb@224, tok_rgb@224, caption, det]", "pretrain.size=Ti",
            "pretrain.model={dim: 32, encoder_depth: 1, decoder_depth: 1, num_heads: 2}", "pretrain.batch_size=4",
            "pretrain.steps=6", "pretrain.warmup_steps=2", "pretrain.base_lr=0.2", "pretrain.log_every=1",
            "pretrain.val_every=3", "pretrain.val_batches=1", "pretrain.checkpoint_every=2",
            "pretrain.loader_workers=0", "pretrain.device=cpu", "pretrain.input_tokens=32",
            "pretrain.target_tokens=32", "pretrain.shuffle_buffer=8"]


def dataset(root, codebook=64):
    write_dataset(root)
    train_text_tokenizer(["a photo number", "a cat and a dog"], 4400, root / "tokenizers/text/tokenizer.json")
    # a tiny random-weight rgb tokenizer of the real class: its codebook sizes the model, it decodes the predictions
    save_tokenizer(VQVAE(tokenizer_config("rgb", "tiny", codebook_size=codebook)), root / "tokenizers/rgb")
    return root


def config(*extra):
    return load_config("paper", [*SETTINGS, *extra])


@pytest.fixture(scope="module")
def pretrained(ray_address, tmp_path_factory):
    root = dataset(tmp_path_factory.mktemp("pretrain"))
    return root, run_pretrain(root, config())


def test_pretraining_logs_losses_rates_and_validation_and_saves_the_model(pretrained):
    root, summary = pretrained
    log = [json.loads(line) for line in (run_dir(root) / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"loss.tok_rgb@224", "loss.caption", "loss.det", "samples_per_s", "tokens_per_s", "lr"} <= set(log[0])
    assert log[0]["mfu"] is None  # no accelerator peak to compare against on a CPU
    assert {"val_loss.tok_rgb@224", "val_loss.caption"} <= set(log[2]) and "val_loss.caption" not in log[1]
    assert summary["steps"] == 6 and summary["final"]["step"] == 6
    model = FourM.from_pretrained(run_dir(root))
    assert model.cfg.vocab_sizes["tok_rgb@224"] == 64 and model.cfg.dim == 32
    assert (run_dir(root) / "train.json").is_file()
    from pipeline.status import pretrain_row

    assert pretrain_row(root)["state"] == "trained" and pretrain_row(root)["step"] == "6/6"
    from PIL import Image

    picture = Image.open(summary["predictions"])  # rgb, tok_rgb decoded, tok_rgb predicted; a row per sample
    assert picture.width > 2.5 * 1.9 * 70 and picture.height > 4 * 1.5 * 70


def test_a_stopped_run_resumes_to_the_same_weights(pretrained, tmp_path, capsys):
    from pipeline.cli import main as cli

    import shutil

    root, _ = pretrained
    again = tmp_path / "again"  # the same shards and tokenizers (a WordPiece retrained may number its pieces otherwise)
    shutil.copytree(root, again, ignore=lambda folder, names: ["pretrain"] if folder == str(root) else [])
    # stopped and resumed in this process (Ray Train's local mode) against the run on a Ray Train worker
    stopped = run_pretrain(again, config("pretrain.workers=0"), stop_after=3)
    assert stopped["stopped_at"] == 3 and not (run_dir(again) / "model.safetensors").exists()
    capsys.readouterr()
    assert cli(["status", "--data", str(again)]) == 0
    shown = capsys.readouterr().out
    assert "3/6" in shown and "resumes from its checkpoint" in shown
    assert f"{3 * 4 * 64:.3g}" in shown  # tokens seen: 3 steps x 4 samples x (32 + 32) tokens
    run_pretrain(again, config("pretrain.workers=0"))
    straight, resumed = load_file(run_dir(root) / "model.safetensors"), load_file(run_dir(again) / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def copy_of(root, folder):
    """The same shards and tokenizers (a WordPiece retrained may number its pieces otherwise), no run."""
    import shutil

    shutil.copytree(root, folder, ignore=lambda at, names: ["pretrain"] if at == str(root) else [])
    return folder


class DiesOnce(PretrainTask):
    """The real task, but rank 0's process dies (as on a lost machine) before its 4th step, once."""

    def batches(self, start, rank, world):
        marker = self.folder / "died-once"
        for step, batch in enumerate(super().batches(start, rank, world), start):
            if step == 3 and rank == 0 and not marker.exists():
                marker.touch()
                os._exit(1)
            yield batch


def test_two_workers_train_alike_under_ddp_and_under_fsdp_through_a_worker_that_dies(pretrained, tmp_path):
    """Two workers under DDP, and two under FSDP whose rank 0 dies after the checkpoint of step 2: Ray Train
    restarts the group, which resumes from that (whole-tensor) checkpoint under FSDP and ends where DDP did."""
    import ray.cloudpickle

    from stages.training import fit

    root, _ = pretrained
    two = ["pretrain.workers=2", "pretrain.steps=4", "pretrain.val_every=100", "pretrain.grad_clip=0.5"]
    ddp, fsdp = copy_of(root, tmp_path / "ddp"), copy_of(root, tmp_path / "fsdp")
    run_pretrain(ddp, config(*two))
    cfg = config(*two, "pretrain.parallel=fsdp")
    run_dir(fsdp).mkdir()
    args = {"root": str(fsdp), "folder": str(run_dir(fsdp)), "config": cfg.model_dump(),
            "model_config": asdict(model_config(fsdp, cfg)), "stop_after": None}
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    fit(functools.partial(train_worker, task_class=DiesOnce), args, name="fsdp-dies-once", folder=run_dir(fsdp),
        world=2, use_gpu=False, cpus_per_worker=1, max_failures=cfg.pretrain.max_failures,
        resource_wait_s=cfg.ray.resource_wait_s, modalities=cfg.modality_set)
    assert (run_dir(fsdp) / "died-once").exists()  # it did die, after the checkpoint of step 2
    checkpoint = load_file(run_dir(fsdp) / "checkpoint" / "model.safetensors")  # whole tensors, not shards
    assert checkpoint["decoder_embeddings.tok_rgb@224.token_emb.weight"].shape == (64, 32)

    def log(run):
        return [json.loads(line) for line in (run_dir(run) / "metrics.jsonl").read_text().splitlines()]

    assert [line["step"] for line in log(fsdp)] == [1, 2, 3, 3, 4]  # resumed at the checkpoint: step 3 again
    resumed = {line["step"]: line["loss"] for line in log(fsdp)}  # the steps taken after the restart
    assert [line["step"] for line in log(ddp)] == [1, 2, 3, 4]
    assert [resumed[step] for step in (1, 2, 3, 4)] == pytest.approx([line["loss"] for line in log(ddp)], rel=1e-4)
    a, b = load_file(run_dir(ddp) / "model.safetensors"), load_file(run_dir(fsdp) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    one = load_file(run_dir(root) / "model.safetensors")  # one worker, 6 steps: another run altogether
    assert not torch.allclose(one["encoder_embeddings.tok_rgb@224.token_emb.weight"],
                              a["encoder_embeddings.tok_rgb@224.token_emb.weight"])


def test_bad_input_fails_before_training_naming_it(tmp_path):
    root = dataset(tmp_path / "small", codebook=8)  # the shards hold ids up to 22
    with pytest.raises(PretrainInputError, match="tok_rgb@224: token id 2[0-2] outside its vocabulary of 8"):
        run_pretrain(root, config())
    (root / "tokenizers/rgb/config.json").unlink()
    with pytest.raises(PretrainInputError, match="tokenizers/rgb"):
        run_pretrain(root, config())
    assert not (run_dir(root) / "checkpoint").exists()
