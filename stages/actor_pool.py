"""Shards over a pool of Ray actors: one replica per GPU (or per CPU slot), each taking the next shard."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from core.ray_runtime import require_resources

MAX_LOST = 3  # times a shard is redone because the actor (or node) running it went away


def run_on_actors(worker_class, init_args: tuple, todo: list[tuple[str, Any]], method: str, *, device: str,
                  workers: int | None, cpus_per_worker: float) -> Iterator[tuple[str, Any, str | None]]:
    """Run `worker.method(shard, payload)` for every (shard, payload); yields (shard, result, error) as each
    finishes. An actor lost mid-shard (its process or its node killed) is restarted by Ray, or replaced, and the
    shard redone from scratch by a live actor; a shard whose task fails otherwise yields its error and the others
    go on. Ray must be initialised."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and device != "cpu"
    count = min(workers or (gpus if use_gpu else 1), len(todo))
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": cpus_per_worker}
    require_resources({"GPU": 1} if use_gpu else {"CPU": cpus_per_worker}, 1, f"{method} ({worker_class.__name__})")
    actor = ray.remote(max_restarts=2, max_task_retries=2, **resources)(worker_class)
    idle = [actor.remote(*init_args) for _ in range(count)]
    todo, running, lost = list(todo), {}, {}
    try:
        while todo or running:
            while idle and todo:
                shard, payload = todo.pop(0)
                worker = idle.pop()
                running[getattr(worker, method).remote(shard, payload)] = (worker, shard, payload)
            done, _ = ray.wait(list(running), num_returns=1)
            worker, shard, payload = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as err:  # its actor, or the node under it, went away mid-shard
                lost[shard] = lost.get(shard, 0) + 1
                # A new actor where Ray gave this one up, the same (restarting) one otherwise; the shard redone
                # from scratch (nothing of it was committed), unless it keeps losing its actor
                idle.append(actor.remote(*init_args) if isinstance(err, ray.exceptions.ActorDiedError) else worker)
                if lost[shard] <= MAX_LOST:
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
        for worker in idle + [w for w, _ in running.values()]:
            ray.kill(worker)
