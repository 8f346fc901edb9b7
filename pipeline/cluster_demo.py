"""`make cluster-demo`: the demo's chain across a Ray cluster of several nodes on this machine, one of them lost.

A head that runs nothing and two worker nodes (`ray.cluster_utils.Cluster`, as Ray's own tests build one: each node
its own raylet, object store and workers), the demo's photos downloaded and labelled on the worker nodes, and in
the middle of labelling one worker node killed as a lost machine goes (kill -9: its raylet and every process it
started). The stages finish on the node left; then each node's share of every stage and the exactly-once check:
every downloaded image labelled and tokenized once, no partial shard, `verify` clean.

On a real cluster the same stages run with `RAY_ADDRESS` (or `ray.address`) naming its head; see the README's
"Scaling out".
"""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from core.config import Config
from core.storage import is_remote, open_data_root
from pipeline.status import node_rows
from stages.dataset.shards import DatasetLayout
from stages.dataset.verify import verify_dataset
from stages.download.download import STAGE


def start_local_cluster(workers: int, cpus_per_worker: int):
    """A head with no CPUs (it schedules, the driver joins it) and `workers` worker nodes, on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(num_cpus=cpus_per_worker)
    cluster.wait_for_nodes()
    return cluster


def kill_node(cluster, node) -> None:
    """kill -9 a worker node as a lost machine goes: its raylet and every process it started (the workers of Ray's
    tasks, actors and Ray Train, which would otherwise run on a while before they noticed), then wait until the
    cluster sees it gone."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    started = descendants(raylet)
    cluster.remove_node(node, allow_graceful=False)
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.wait_for_nodes()


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class KillDuringLabelling:
    """The label stage's progress observer, wrapped (`watch`): once the first shard commits while others remain,
    the worker node that did not make it (busy with a shard of its own) is killed."""

    def __init__(self, cluster):
        self.cluster, self.observer, self.total, self.seen, self.killed = cluster, None, 0, 0, None

    def watch(self, observer):
        self.observer = observer
        return self

    def start(self, total_shards: int) -> None:
        self.total = total_shards
        self.observer.start(total_shards)

    def __call__(self, name: str, stats: dict, skipped: bool) -> None:
        self.observer(name, stats, skipped)
        self.seen += 1
        if self.killed or skipped or self.seen >= self.total or len(self.cluster.worker_nodes) < 2:
            return  # once, in the middle of the stage, and never the last node
        made_it = (stats.get("node") or "").rpartition("/")[2]
        others = [n for n in self.cluster.worker_nodes if not made_it or not n.node_id.startswith(made_it)]
        node = (others or list(self.cluster.worker_nodes))[0]
        self.killed = node.node_id
        kill_node(self.cluster, node)
        from tqdm import tqdm

        tqdm.write(f"cluster demo: worker node {self.killed[:8]} killed (kill -9, with every process it started) "
                   f"after shard {name}, {self.seen} of {self.total}", file=sys.stderr)

    def close(self) -> None:
        self.observer.close()


def run_cluster_demo(make_config: Callable[[dict], Config], workers: int = 2) -> int:
    """`make_config(settings)`: the demo's configuration with these settings added (the cluster's address)."""
    from pipeline.demo import run_demo
    from pipeline.services import forget_service, remember_service

    root = make_config({}).root
    if is_remote(root):  # its checks read the folder as files; the nodes share this machine's disk
        raise ValueError(f"the cluster demo writes to a folder on this machine, not {root} (--output)")
    cpus = max(1, (os.cpu_count() or 2) // workers)
    print(f"starting a Ray cluster on this machine: a head (no CPUs) and {workers} worker nodes of {cpus} CPU(s)")
    cluster = start_local_cluster(workers, cpus)
    remember_service("cluster-demo", os.getpid())  # `make down` stops it (and so its nodes) if it is left running
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        # a labelling replica on each node, more shards than nodes, so the kill lands in the middle of the stage;
        # a tokenizing replica fits on one node
        config = make_config({"ray.address": cluster.address, "download.shard_size": 2, "label.workers": workers,
                              "tokenizer.cpus_per_worker": cpus})
        kill = KillDuringLabelling(cluster)
        code = run_demo(config, label_observer=kill.watch)
        root = open_data_root(config.root, writable=False)
        report(root, kill.killed)
        return code or (0 if exactly_once(root) else 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        import ray

        ray.shutdown()  # this driver leaves before the head it joined goes down
        cluster.shutdown()
        forget_service("cluster-demo")


def report(root, killed: str | None) -> None:
    print(f"\n== the cluster's nodes (worker node {killed[:8] if killed else '-'} killed during labelling)")
    print(f"{'stage':<26} {'node':<28} {'shards':>6} {'samples':>8} {'samples/s':>10}")
    for row in node_rows(root):
        rate = f"{row['samples_per_s']:.2f}" if row["samples_per_s"] else "-"
        print(f"{row['stage']:<26} {row['node']:<28} {row['shards']:>6} {row['samples']:>8} {rate:>10}")


def exactly_once(root) -> bool:
    """Every sample the download kept is in every per-sample stage once; no partial file; `verify` clean."""
    layout = DatasetLayout(root)
    kept = sorted(r["key"] for shard in layout.committed_shards(STAGE) for r in layout.read_status(STAGE, shard)
                  .to_pylist() if r["status"] == "ok")
    good = True
    for stage in sorted(p.name for p in Path(layout.status_root).iterdir() if p.name.startswith(("label_", "tokenize"))):
        keys = [k for shard in layout.committed_shards(stage) for k in layout.read_status(stage, shard)["key"]
                .to_pylist()]
        once = sorted(keys) == kept
        good &= once
        print(f"{stage:<26} {len(keys)} samples for {len(kept)} images: {'each once' if once else 'NOT each once'}")
    partial = [str(p) for p in Path(str(root)).rglob("*") if p.is_file() and ".tmp" in p.name]
    problems, checked = verify_dataset(root)
    print(f"partial files: {len(partial)}; verify: {len(problems)} problem(s) in {checked['shards']} shards")
    return good and not partial and not problems
