"""Stages across a Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`, as Ray's own tests
run one): a worker node killed with -9 in the middle of a download, a labelling or a tokenizing loses nothing (tasks retried,
actors' shards redone), a node joining takes work, a driver killed mid-stage is rerun, each shard's stats name the
node that made it, and a cluster address where no head answers, or whose nodes lack the resources asked for, is
refused by name. Pretraining across two nodes that lose one: tests/test_pretrain.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cluster_demo import start_local_cluster
from stages.dataset.shards import DatasetLayout
from stages.dataset.verify import verify_dataset
from stages.download.download import STAGE
from tests.helpers import held_profile, large_jpeg, replace_node, worker_nodes
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
        replace_node(cluster, workers[0])  # a node joins while the other one is still held at the server
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
    shares = output[output.index("download per node:"):].splitlines()[1:len(nodes) + 1]
    assert sorted(line.split(":")[0].strip() for line in shares) == sorted(nodes)  # each node's share, printed ...
    assert all(line.endswith(", alive") for line in shares), shares  # ... and that it is still in the cluster
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


def assert_each_sample_once(root, stage: str) -> set[str]:
    """The input of make_labelled_input (five samples, two shards) through `stage` whole: every sample committed once,
    verify clean, no partial file. The nodes that made the shards."""
    layout = DatasetLayout(root)
    assert layout.committed_shards(stage) == ["shard-000000", "shard-000001"]
    keys = [k for shard in layout.committed_shards(stage) for k in layout.read_status(stage, shard)["key"].to_pylist()]
    assert sorted(keys) == [f"{i:09d}" for i in range(5)]  # each sample once
    problems, _ = verify_dataset(root)
    assert not problems
    assert not [p.name for p in root.rglob("*") if p.is_file() and ".tmp" in p.name]
    return {layout.read_stats(stage, shard)["node"] for shard in layout.committed_shards(stage)}


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


def test_labelling_takes_a_node_each_and_survives_its_driver_and_a_worker_node_killed_mid_shard(cluster, tmp_path):
    """By default a labelling actor per CPU slot of every node: two actors, one per worker node, each held in the
    middle of its shard. The driver killed (-9) there: a rerun starts over what was not committed. Then one node
    killed with -9: its actor is restarted on a node that is up and redoes its shard from scratch; every sample is
    labelled once."""
    import signal

    from tests.helpers import make_labelled_input

    cluster, workers = cluster
    gate, profile = held_profile(tmp_path / "mine", HELD)  # the paper profile's default replica count
    root = tmp_path / "data"
    make_labelled_input(root, corrupt_key=None)  # every photo decodes: verify then finds every folder aligned
    command = [sys.executable, "-m", "pipeline", "label", "--data", str(root), "--profile", str(profile),
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
        replace_node(cluster, workers[0])  # one actor killed in the middle of its shard
        gate.release()
        output, _ = rerun.communicate(timeout=300)
    finally:
        gate.release()
        for process in (first, locals().get("rerun")):
            if process is not None and process.poll() is None:
                process.kill()
    assert rerun.returncode == 0, output
    assert_each_sample_once(root, "label_held")


HOLD_TOKENIZE = '''
"""Test instrumentation, imported in every tokenizing actor as the profile's modality module: once per process, the
first shard's tokenizing waits at the test's socket before it starts (a stage held mid-shard)."""
import socket

import stages.tokenizers.tokenize as tokenize

_tokenize, _held = tokenize.tokenize_shard, []


def tokenize_shard(*args, **kwargs):
    if not _held:
        _held.append(True)
        with socket.create_connection(("127.0.0.1", {port})) as held:
            held.recv(1)
    return _tokenize(*args, **kwargs)


tokenize.tokenize_shard = tokenize_shard
'''


def test_tokenizing_takes_a_node_each_and_survives_a_worker_node_killed_mid_shard(cluster, tmp_path):
    """Tokenizing across the cluster, a replica per CPU slot by default, one tokenizer (a published one converted
    into the dataset): both actors held in the middle of a shard, one node killed with -9 and a new one added. The
    lost shard is redone from scratch, every sample is tokenized once, verify is clean, no partial file."""
    from pipeline.cli import main as cli
    from tests.helpers import make_labelled_input

    cluster, workers = cluster
    gate, profile = held_profile(tmp_path / "mine", HOLD_TOKENIZE)  # the paper profile's default replica count
    root = tmp_path / "data"
    make_labelled_input(root, corrupt_key=None)
    published = PROJECT / "tests" / "fixtures" / "reference" / "tokenizers" / "rgb"
    assert cli(["convert-tokenizer", "--checkpoint", str(published), "--modality", "rgb", "--data", str(root)]) == 0
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "tokenize", "--data", str(root), "--profile", str(profile),
         "--modalities", "rgb", "--set", f"ray.address={cluster.address}"],
        cwd=PROJECT, env=driver_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert gate.wait_for(2, 180), "the two actors did not both start a shard"
        lost = workers[0].node_id
        replace_node(cluster, workers[0])  # one actor killed in the middle of its shard, a node joins
        gate.release()
        output, _ = driver.communicate(timeout=300)
    finally:
        gate.release()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output
    nodes = assert_each_sample_once(root, "tokenize_rgb")
    assert not [n for n in nodes if lost.startswith(n.split("/")[1])], nodes  # the lost node committed nothing
