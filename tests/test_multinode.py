"""Stages across a Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`, as Ray's own tests
run one): a worker node killed in the middle of a stage loses nothing, a node joining takes work, each shard's
stats name the node that made it, and a cluster address where no head answers is refused by name at once."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.dataset.shards import DatasetLayout
from stages.dataset.verify import verify_dataset
from stages.download.download import STAGE
from tests.helpers import large_jpeg
from tests.test_download_stage import statuses

PROJECT = Path(__file__).resolve().parents[1]


def driver_env() -> dict:
    """The environment of a driver joining the cluster by its setting, not by an inherited RAY_ADDRESS."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@pytest.fixture
def cluster():
    """A head that runs nothing (no CPUs) and two worker nodes of one CPU each: every task runs on a worker node,
    one shard per node at a time."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


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
        cluster.remove_node(workers[0], allow_graceful=False)  # kill -9: its raylet and every process it started
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


def test_a_cluster_without_the_resources_a_stage_asks_for_is_refused_by_name_before_work(tmp_path):
    """A head that runs nothing and no worker node yet: the download's tasks (one CPU each) would wait forever."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        urls = tmp_path / "urls.tsv"
        urls.write_text("http://127.0.0.1:9/a.jpg\ta\n")
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "download", "--input", str(urls), "--output", str(tmp_path / "data"),
             "--profile", "demo", "--set", f"ray.address={cluster.address}"], cwd=PROJECT, env=driver_env(),
            capture_output=True, text=True, timeout=120)
    finally:
        cluster.shutdown()
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


def test_a_worker_node_killed_mid_label_loses_nothing(cluster, tmp_path):
    """Two labelling actors, one per worker node, each held in the middle of its shard; one node killed with -9:
    its actor is restarted on a node that is up and redoes its shard from scratch; every sample labelled once."""
    from tests.helpers import make_labelled_input

    cluster, workers = cluster
    gate = Gate()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "held.py").write_text(HELD.replace("{port}", str(gate.port)))
    (folder / "mine.yaml").write_text("extends: demo\nmodalities: [held.py]\n")
    root = tmp_path / "data"
    make_labelled_input(root, corrupt_key=None)  # every photo decodes: verify then finds every folder aligned
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "label", "--data", str(root), "--profile", str(folder / "mine.yaml"),
         "--labelers", "held", "--set", f"ray.address={cluster.address}", "--set", "label.workers=2"],
        cwd=PROJECT, env=driver_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert gate.wait_for(2, 180), "the two actors did not both start a shard"
        cluster.remove_node(workers[0], allow_graceful=False)  # one actor killed in the middle of its shard
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        gate.release()
        output, _ = driver.communicate(timeout=300)
    finally:
        gate.release()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output
    layout = DatasetLayout(root)
    stage = "label_held"
    assert layout.committed_shards(stage) == ["shard-000000", "shard-000001"]
    keys = [k for shard in layout.committed_shards(stage) for k in layout.read_status(stage, shard)["key"].to_pylist()]
    assert sorted(keys) == [f"{i:09d}" for i in range(5)]  # each sample once
    problems, _ = verify_dataset(root)
    assert not problems
    assert not [p.name for p in root.rglob("*") if p.is_file() and ".tmp" in p.name]
