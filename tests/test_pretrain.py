"""4M pretraining on a real Ray Train: the loss falls, metrics and validation losses are logged, a stopped run
resumes to exactly the weights of an uninterrupted one; two workers train alike under DDP and under FSDP, the FSDP
run on a cluster of two nodes that loses one (Ray Train restarts the group, which resumes from the checkpoint); a
lost node that never comes back fails the run by name; bad input fails before training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.fourm import FourM
from models.vqvae import VQVAE, save_tokenizer, tokenizer_config
from models.text_tokenizer import train_text_tokenizer
from core.config import load_config
from stages.fourm.pretrain import PretrainInputError, run_dir, run_pretrain
from tests.helpers import held_profile, replace_node, worker_nodes
from tests.test_fourm_data import write_dataset

PROJECT = Path(__file__).resolve().parents[1]

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


HOLD_AFTER_CHECKPOINT = '''
"""Test instrumentation, imported in every Ray Train worker as the profile's modality module: once per process,
right after the checkpoint of step 2 is written (by the real function), rank 0 waits at the test's socket."""
import socket

import stages.training as training

_write, _held = training.write_checkpoint, []


def write_checkpoint(folder, weights, optimizer_state, step, extra):
    _write(folder, weights, optimizer_state, step, extra)
    if step == 2 and not _held:
        _held.append(True)
        with socket.create_connection(("127.0.0.1", {port})) as held:
            held.recv(1)


training.write_checkpoint = write_checkpoint
'''
TWO_WORKERS = ["pretrain.workers=2", "pretrain.steps=4", "pretrain.val_every=100", "pretrain.grad_clip=0.5",
               "pretrain.max_failures=1"]


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster on this machine (`ray.cluster_utils.Cluster`): a head that runs nothing; worker nodes added
    per test."""
    from pipeline.cluster_demo import start_local_cluster

    cluster = start_local_cluster(workers=0, cpus_per_worker=1)
    yield cluster
    cluster.shutdown()


@pytest.fixture
def two_nodes(cluster):
    """Two worker nodes of one CPU each: each of two Ray Train workers has a node of its own."""
    worker_nodes(cluster, 2)
    return cluster


def lose_a_node_mid_run(root, cluster, folder, *settings, replaced: bool) -> tuple[int, str]:
    """`python -m pipeline pretrain` on the cluster, two workers; once rank 0 has written the checkpoint of step 2
    (and waits at the test's socket), the node of one worker is killed (-9, with every process it started) and,
    if `replaced`, a new node joins; then the run goes on. Its exit code and output."""
    from pipeline.cluster_demo import kill_node

    gate, profile = held_profile(folder, HOLD_AFTER_CHECKPOINT)
    command = [sys.executable, "-m", "pipeline", "pretrain", "--data", str(root), "--profile", str(profile),
               *(arg for setting in [*SETTINGS, *TWO_WORKERS, f"ray.address={cluster.address}", *settings]
                 for arg in ("--set", setting))]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the cluster named by its setting
    driver = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        assert gate.wait_for(1, 240), "rank 0 did not reach the checkpoint of step 2"
        lost = next(iter(cluster.worker_nodes))  # one worker, and its rank, gone
        if replaced:
            replace_node(cluster, lost)
        else:
            kill_node(cluster, lost)
        gate.release()
        output, _ = driver.communicate(timeout=240)
    finally:
        gate.release()
        if driver.poll() is None:
            driver.kill()
    return driver.returncode, output


def test_two_workers_train_alike_under_ddp_and_under_fsdp_on_two_nodes_through_a_lost_node(pretrained, two_nodes,
                                                                                           tmp_path):
    """Two workers under DDP; then two under FSDP, one on each node of a cluster, whose node holding a worker is
    killed (-9, with every process it started) after the checkpoint of step 2: Ray Train restarts the group on the
    node that replaced it, from that (whole-tensor) checkpoint under FSDP, and it ends where DDP did."""
    root, _ = pretrained
    ddp, fsdp = copy_of(root, tmp_path / "ddp"), copy_of(root, tmp_path / "fsdp")
    run_pretrain(ddp, config(*TWO_WORKERS))
    code, output = lose_a_node_mid_run(fsdp, two_nodes, tmp_path, "pretrain.parallel=fsdp", replaced=True)
    assert code == 0, output[-3000:]
    assert "resumed from the checkpoint of step 2, on 2 worker(s)" in output
    checkpoint = load_file(run_dir(fsdp) / "checkpoint" / "model.safetensors")  # whole tensors, not shards
    assert checkpoint["decoder_embeddings.tok_rgb@224.token_emb.weight"].shape == (64, 32)

    def log(run):
        return [json.loads(line) for line in (run_dir(run) / "metrics.jsonl").read_text().splitlines()]

    assert [line["step"] for line in log(ddp)] == [1, 2, 3, 4] == [line["step"] for line in log(fsdp)]
    assert [line["loss"] for line in log(fsdp)] == pytest.approx([line["loss"] for line in log(ddp)], rel=1e-4)
    a, b = load_file(run_dir(ddp) / "model.safetensors"), load_file(run_dir(fsdp) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    one = load_file(run_dir(root) / "model.safetensors")  # one worker, 6 steps: another run altogether
    assert not torch.allclose(one["encoder_embeddings.tok_rgb@224.token_emb.weight"],
                              a["encoder_embeddings.tok_rgb@224.token_emb.weight"])


def test_a_lost_node_that_never_comes_back_fails_the_run_naming_the_resources(pretrained, two_nodes, tmp_path):
    """Ray Train would retry starting the group without end; after ray.resource_wait_s the run fails, naming what
    the cluster lacks, its checkpoint kept for a rerun."""
    root, _ = pretrained
    never = copy_of(root, tmp_path / "never")
    code, output = lose_a_node_mid_run(never, two_nodes, tmp_path, "ray.resource_wait_s=5", replaced=False)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, output[-3000:]
    assert errors[0].startswith("error: pretrain-4m: its 2 worker(s) of {'CPU': 1.0} each did not start within 5 s "
                                "(ray.resource_wait_s); the cluster's live nodes hold "), errors
    assert errors[0].endswith("the run resumes from its last checkpoint when rerun on a cluster that has them")
    assert (run_dir(never) / "checkpoint" / "state.json").is_file()  # a rerun resumes from step 2
    assert not (run_dir(never) / "model.safetensors").exists()


def test_bad_input_fails_before_training_naming_it(tmp_path):
    root = dataset(tmp_path / "small", codebook=8)  # the shards hold ids up to 22
    with pytest.raises(PretrainInputError, match="tok_rgb@224: token id 2[0-2] outside its vocabulary of 8"):
        run_pretrain(root, config())
    (root / "tokenizers/rgb/config.json").unlink()
    with pytest.raises(PretrainInputError, match="tokenizers/rgb"):
        run_pretrain(root, config())
    assert not (run_dir(root) / "checkpoint").exists()
