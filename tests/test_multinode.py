"""Stages across a Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`, as Ray's own tests
run one): a worker node killed with -9 in the middle of a download, a labelling or a pretraining run loses nothing
(tasks retried, actors' shards redone, Ray Train's group restarted from the checkpoint), a node joining takes work,
a driver killed mid-stage is rerun, each shard's stats name the node that made it, and a cluster address where no
head answers, or whose nodes lack the resources asked for, is refused by name."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cluster_demo import kill_node, start_local_cluster
from stages.dataset.shards import DatasetLayout
from stages.dataset.verify import verify_dataset
from stages.download.download import STAGE
from tests.helpers import large_jpeg
from tests.test_download_stage import statuses

PROJECT = Path(__file__).resolve().parents[1]


def driver_env() -> dict:
    """The environment of a driver joining the cluster by its setting, not by an inherited RAY_ADDRESS."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@pytest.fixture(scope="module")
def shared_cluster():
    """One cluster for the module (starting one costs seconds): a head that runs nothing (no CPUs), worker nodes of
    one CPU each added per test, so every task runs on a worker node, one shard per node at a time."""
    cluster = start_local_cluster(workers=0, cpus_per_worker=1)
    yield cluster
    cluster.shutdown()


def worker_nodes(cluster, count: int) -> list:
    """Exactly `count` live worker nodes (those a test before killed are gone from the list; extra ones removed)."""
    while len(cluster.worker_nodes) > count:
        cluster.remove_node(next(iter(cluster.worker_nodes)))
    while len(cluster.worker_nodes) < count:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return list(cluster.worker_nodes)


@pytest.fixture
def cluster(shared_cluster):
    return shared_cluster, worker_nodes(shared_cluster, 2)


def test_a_worker_node_killed_mid_download_loses_nothing_and_a_joining_node_takes_work(cluster, server, tmp_path):
    cluster, workers = cluster
    jpeg = large_jpeg((320, 240))
    rows = []
    for shard in range(4):  # each shard's first photo waits at the server until the test lets it go
        server.add(f"held{shard}.jpg", jpeg)
        rows.append(f"{server.base}/block/held{shard}.jpg\tphoto {shard} 0")
        rows += [f"{server.add(f'p{shard}{i}.jpg', jpeg)}\tphoto {shard} {i}" for i in range(1, 3)]
    urls = tmp_path / "urls.tsv"
    urls.write_text("\n".join(rows) + "\n")
    root = tmp_path / "data"
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "download", "--input", str(urls), "--output", str(root), "--profile",
         "demo", "--shard-size", "3", "--processes", "4", "--allow-private-hosts",
         "--set", f"ray.address={cluster.address}", "--set", "download.timeout=90", "--set", "download.deadline=180"],
        cwd=PROJECT, env=driver_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.arrived.wait(120), "no shard started"  # a shard is in the middle of its download
        kill_node(cluster, workers[0])
        cluster.add_node(num_cpus=1)  # a node joins while the other one is still held at the server
        cluster.wait_for_nodes()
        server.release.set()
        output, _ = driver.communicate(timeout=300)
    finally:
        server.release.set()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output
    assert "Ray: 3 node(s)" in output  # where the stage started: the cluster it joined
    found = statuses(root)  # every row recorded exactly once
    assert len(found) == 12 and all(row["status"] == "ok" for row in found.values())
    layout = DatasetLayout(root)
    assert len(layout.committed_shards(STAGE)) == 4
    nodes = {layout.read_stats(STAGE, shard)["node"] for shard in layout.committed_shards(STAGE)}
    assert len(nodes) >= 2  # the surviving node and the one that joined both made shards
    problems, checked = verify_dataset(root)
    assert not problems and checked["shards"] == 4
    leftovers = [p.name for p in root.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not leftovers  # no partial shard anywhere
    from pipeline.status import node_rows

    per_node = [row for row in node_rows(root) if row["stage"] == STAGE]
    assert sum(row["samples"] for row in per_node) == 12 and len(per_node) == len(nodes)


def test_a_cluster_address_where_no_head_answers_is_refused_by_name_before_work(tmp_path):
    urls = tmp_path / "urls.tsv"
    urls.write_text("http://127.0.0.1:9/a.jpg\ta\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "download", "--input", str(urls), "--output", str(tmp_path / "data"),
         "--profile", "demo"], cwd=PROJECT, env={**driver_env(), "RAY_ADDRESS": "127.0.0.1:9"},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "RAY_ADDRESS = '127.0.0.1:9': no Ray head answers there" in result.stderr
    assert not (tmp_path / "data" / "rgb").exists()


def test_a_cluster_without_the_resources_a_stage_asks_for_is_refused_by_name_before_work(shared_cluster, tmp_path):
    """The head that runs nothing and no worker node: the download's tasks (one CPU each) would wait forever."""
    worker_nodes(shared_cluster, 0)
    urls = tmp_path / "urls.tsv"
    urls.write_text("http://127.0.0.1:9/a.jpg\ta\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "download", "--input", str(urls), "--output", str(tmp_path / "data"),
         "--profile", "demo", "--set", f"ray.address={shared_cluster.address}"], cwd=PROJECT, env=driver_env(),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "download: 1 worker(s) of {'CPU': 1} each, but the cluster's nodes hold 0 ({CPU: 0, GPU: 0})" in \
        result.stderr
    assert not (tmp_path / "data" / "rgb").exists()


HELD = '''
"""A labeler that, once per process, waits at the test's socket before its first label: a stage held mid-shard."""
import socket

from core.registry import Labeling, register
from models.labelers import ComputedLabeler
from models.modality_kinds import SequenceModality

_released = []


class HeldLabeler(ComputedLabeler):
    def compute(self, image):
        if not _released:
            with socket.create_connection(("127.0.0.1", {port})) as held:
                held.recv(1)  # until the test lets labelling go on
            _released.append(True)
        return "a held picture"


class Held(SequenceModality):
    name, label_order = "held", 61
    labeler = Labeling(load=HeldLabeler)


register(Held())
'''


class Gate:
    """Labelers report at a socket and wait there; `release` lets every one waiting, and every later one, go on."""

    def __init__(self):
        import socket
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.waiting, self.released, self.cond = [], False, threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            connection, _ = self.listener.accept()
            with self.cond:
                if self.released:
                    connection.sendall(b"x")
                    connection.close()
                else:
                    self.waiting.append(connection)
                self.cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.waiting) >= count, timeout)

    def release(self):
        with self.cond:
            self.released = True
            for connection in self.waiting:
                try:
                    connection.sendall(b"x")
                except OSError:  # its process was killed with its node
                    pass
                connection.close()
            self.waiting = []


def test_labelling_takes_a_node_each_and_survives_its_driver_and_a_worker_node_killed_mid_shard(cluster, tmp_path):
    """By default a labelling actor per CPU slot of every node: two actors, one per worker node, each held in the
    middle of its shard. The driver killed (-9) there: a rerun starts over what was not committed. Then one node
    killed with -9: its actor is restarted on a node that is up and redoes its shard from scratch; every sample is
    labelled once."""
    import signal

    from tests.helpers import make_labelled_input

    cluster, workers = cluster
    gate = Gate()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "held.py").write_text(HELD.replace("{port}", str(gate.port)))
    (folder / "mine.yaml").write_text("extends: demo\nmodalities: [held.py]\n")
    root = tmp_path / "data"
    make_labelled_input(root, corrupt_key=None)  # every photo decodes: verify then finds every folder aligned
    command = [sys.executable, "-m", "pipeline", "label", "--data", str(root), "--profile", str(folder / "mine.yaml"),
               "--labelers", "held", "--set", f"ray.address={cluster.address}"]

    def driver():
        return subprocess.Popen(command, cwd=PROJECT, env=driver_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    first = driver()
    try:
        assert gate.wait_for(2, 180), "the two actors did not both start a shard"
        first.send_signal(signal.SIGKILL)  # the head's driver lost mid-stage: Ray ends its job's actors with it
        first.wait(60)
        rerun = driver()
        assert gate.wait_for(4, 180), "the rerun's two actors did not both start a shard"
        kill_node(cluster, workers[0])  # one actor killed in the middle of its shard
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        gate.release()
        output, _ = rerun.communicate(timeout=300)
    finally:
        gate.release()
        for process in (first, locals().get("rerun")):
            if process is not None and process.poll() is None:
                process.kill()
    assert rerun.returncode == 0, output
    layout = DatasetLayout(root)
    stage = "label_held"
    assert layout.committed_shards(stage) == ["shard-000000", "shard-000001"]
    keys = [k for shard in layout.committed_shards(stage) for k in layout.read_status(stage, shard)["key"].to_pylist()]
    assert sorted(keys) == [f"{i:09d}" for i in range(5)]  # each sample once
    problems, _ = verify_dataset(root)
    assert not problems
    assert not [p.name for p in root.rglob("*") if p.is_file() and ".tmp" in p.name]


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


def pretrain_command(root, address: str, profile: str = "paper", *settings) -> list[str]:
    from tests.test_pretrain import SETTINGS

    two = ["pretrain.workers=2", "pretrain.val_every=100", "pretrain.max_failures=1", f"ray.address={address}"]
    return [sys.executable, "-m", "pipeline", "pretrain", "--data", str(root), "--profile", profile,
            *(arg for setting in [*SETTINGS, *two, *settings] for arg in ("--set", setting))]


def held_pretraining(root, cluster, gate, tmp_path, *settings) -> subprocess.Popen:
    """A two-worker pretraining run on the cluster whose rank 0 waits at `gate` after the checkpoint of step 2."""
    (tmp_path / "hold.py").write_text(HOLD_AFTER_CHECKPOINT.replace("{port}", str(gate.port)))
    (tmp_path / "held.yaml").write_text("extends: paper\nmodalities: [hold.py]\n")
    return subprocess.Popen(pretrain_command(root, cluster.address, str(tmp_path / "held.yaml"), *settings),
                            cwd=PROJECT, env=driver_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_pretraining_on_two_nodes_restarts_from_its_checkpoint_when_one_is_lost(cluster, tmp_path):
    """One Ray Train worker per node; a node killed after the checkpoint of step 2: Ray Train restarts the group
    on the node that replaced it, from that checkpoint, and the weights end equal to an uninterrupted run's. A
    second run, whose lost node never comes back, fails after ray.resource_wait_s naming what the cluster lacks."""
    import torch
    from safetensors.torch import load_file

    from stages.fourm.pretrain import run_dir
    from tests.test_pretrain import copy_of, dataset

    cluster, workers = cluster
    straight = dataset(tmp_path / "straight")
    lost, never = copy_of(straight, tmp_path / "lost"), copy_of(straight, tmp_path / "never")
    uninterrupted = subprocess.run(pretrain_command(straight, cluster.address), cwd=PROJECT, env=driver_env(),
                                   capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr

    gate = Gate()
    driver = held_pretraining(lost, cluster, gate, tmp_path)
    try:
        assert gate.wait_for(1, 240), "rank 0 did not reach the checkpoint of step 2"
        kill_node(cluster, workers[0])  # one worker, and its rank, gone
        cluster.add_node(num_cpus=1)  # the replacement the restarted group starts on
        cluster.wait_for_nodes()
        gate.release()
        output, _ = driver.communicate(timeout=300)
    finally:
        gate.release()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output
    assert "resumed from the checkpoint of step 2, on 2 worker(s)" in output
    a, b = load_file(run_dir(straight) / "model.safetensors"), load_file(run_dir(lost) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    gate = Gate()
    driver = held_pretraining(never, cluster, gate, tmp_path, "ray.resource_wait_s=5")
    try:
        assert gate.wait_for(1, 240), "rank 0 did not reach the checkpoint of step 2"
        kill_node(cluster, next(iter(cluster.worker_nodes)))  # and no node replaces it
        gate.release()
        output, _ = driver.communicate(timeout=300)
    finally:
        gate.release()
        if driver.poll() is None:
            driver.kill()
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert driver.returncode == 2 and len(errors) == 1, output[-3000:]
    assert errors[0].startswith("error: pretrain-4m: its 2 worker(s) of {'CPU': 1.0} each did not start within 5 s "
                                "(ray.resource_wait_s); the cluster's live nodes hold "), errors
    assert errors[0].endswith("the run resumes from its last checkpoint when rerun on a cluster that has them")
    assert (run_dir(never) / "checkpoint" / "state.json").is_file()  # a rerun resumes from step 2
    assert not (run_dir(never) / "model.safetensors").exists()
