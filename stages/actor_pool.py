"""Shards over a pool of Ray actors: one replica per GPU (or per CPU slot), each taking the next shard."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from core.ray_runtime import capacity, job_metadata, named_for_the_dashboard, require_resources
from stages.progress import watched_shards

MAX_LOST = 3  # times a shard is redone because the actor (or node) running it went away


def run_on_actors(worker_class, init_args: tuple, todo: list[tuple[str, Any]], method: str, *, device: str,
                  workers: int | None, cpus_per_worker: float, observer=None) -> Iterator[tuple[str, Any, str | None]]:
    """Run `worker.method(shard, payload, progress)` for every (shard, payload); yields (shard, result, error) as
    each finishes; `progress` is the channel the worker counts the shard's samples on for `observer` (None when it
    does not watch within shards: `stages.progress`). `workers` replicas, or by default one per GPU (or
    `cpus_per_worker` CPUs) of the nodes alive: the pool grows when a node joins and shrinks when one is lost. An actor lost mid-shard (its process or its node
    killed) is dropped and its shard redone from scratch by a live one (a new actor where the cluster has room for
    it); a shard whose task fails otherwise yields its error and the others go on. Ray must be initialised."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and device != "cpu"
    per_worker = {"GPU": 1} if use_gpu else {"CPU": cpus_per_worker}
    what = f"{method} ({worker_class.__name__})"
    require_resources(per_worker, 1, what)
    # not restarted by Ray: a restart waits for room on a node that may never come back; the pool replaces it
    actor = ray.remote(max_restarts=0, **({"num_gpus": 1} if use_gpu else {"num_cpus": cpus_per_worker}))(
        named_for_the_dashboard(worker_class, job_metadata()["job_name"]))
    with watched_shards(observer) as progress:
        yield from _run(actor, init_args, list(todo), method, per_worker, what, workers, progress)


def _run(actor, init_args, todo, method, per_worker, what, workers, progress):
    import ray

    idle, running, lost, actors = [], {}, {}, 0
    try:
        while todo or running:
            wanted = min(workers or capacity(per_worker)[0], actors + len(todo) - len(idle))
            while actors < wanted:
                idle.append(actor.remote(*init_args))
                actors += 1
            if not actors:  # every node that could hold a replica is gone, and nothing runs
                require_resources(per_worker, 1, what)
            while idle and todo:
                shard, payload = todo.pop(0)
                worker = idle.pop()
                # the task named after its shard in the dashboard: "label shard-000012"
                task = getattr(worker, method).options(name=f"{method} {shard}").remote(shard, payload, progress)
                running[task] = (worker, shard, payload)
            done, _ = ray.wait(list(running), num_returns=1)
            worker, shard, payload = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as err:  # its actor, or the node under it, went away mid-shard
                actors -= 1
                ray.kill(worker)
                lost[shard] = lost.get(shard, 0) + 1
                if lost[shard] <= MAX_LOST:  # redone from scratch: nothing of it was committed
                    todo.insert(0, (shard, payload))
                    continue
                yield shard, None, f"{type(err).__name__} {lost[shard]} times: {err}"
                continue
            except Exception as err:  # noqa: BLE001 - reported; the shard is redone on the next run
                idle.append(worker)
                yield shard, None, f"{type(err).__name__}: {err}"
                continue
            idle.append(worker)
            yield shard, result, None
    finally:
        for worker in idle + [w for w, _, _ in running.values()]:
            ray.kill(worker)
