"""Progress within a shard: at CC12M size one shard takes minutes, so watching only commits leaves a dashboard still
for that long. Workers count the samples they finish and tell one small actor every `every` samples; the driver reads
that actor every few seconds and hands what it holds to the stage's observer (its `in_progress` method).

    with watched_shards(observer) as channel:      # the driver; channel is None when nobody watches
        ... pass `channel` to the workers with the rest of their arguments ...
    samples = counter(channel, shard, total)        # a worker, for one shard (counts silently without a channel)
    samples.advance()                               # each sample done
    samples.finish()                                # before the shard's result goes back

What the observer gets: {shard: {"done", "total", "worker", "reports", "since", "at"}} for every shard reported so far
in this run (a committed shard stays, its `done` at its `total`); `worker` is "<node> pid <pid>", as the shard stats'
node and worker read; `since` and `at` are the times of its first and latest report.
"""
from __future__ import annotations

import contextvars
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from core.ray_runtime import job_metadata, named_for_the_dashboard, node_name

POLL_SECONDS = 2.0  # how often the driver reads the board: what the dashboards show is at most this old


class ProgressBoard:
    """A Ray actor (no CPU): the latest count of every shard in progress."""

    def __init__(self):
        self.shards: dict[str, dict] = {}

    def report(self, shard: str, done: int, total: int, worker: str) -> None:
        entry = self.shards.setdefault(shard, {"reports": 0, "since": time.time()})
        entry.update(done=done, total=total, worker=worker, at=time.time())
        entry["reports"] += 1

    def snapshot(self) -> dict[str, dict]:
        return self.shards


@dataclass(frozen=True)
class ProgressChannel:
    """What a worker needs to report: the board's handle and how often (picklable, passed with the arguments)."""

    board: Any
    every: int


class SampleCounter:
    """One shard's finished samples in a worker, where each sample has `parts` steps (its labelers, its
    tokenizers): reports every `every` samples and at the last, without waiting for the board (a report is a
    message, not a round trip)."""

    def __init__(self, channel: ProgressChannel | None, shard: str, total: int, parts: int = 1):
        self.channel, self.shard, self.total, self.parts = channel, shard, total, max(parts, 1)
        self.steps, self._reported = 0, 0
        self._lock = threading.Lock()  # the label stage counts from one writer thread per labeler
        self.worker = f"{node_name()} pid {os.getpid()}"
        if channel is not None:
            self._report()  # "started": the shard shows as running from its first second

    @property
    def done(self) -> int:
        return self.steps // self.parts

    def advance(self, steps: int = 1) -> None:
        """`steps` more sample steps finished (samples, where a sample has one part)."""
        with self._lock:
            self.steps += steps
            if self.channel is not None and (self.done - self._reported >= self.channel.every
                                             or self.done >= self.total > self._reported):
                self._report()

    def finish(self) -> None:
        """The shard is done: the last count, waited for, so that the board holds every report of the shard before
        the driver hears the shard committed (a worker's messages arrive in the order it sent them)."""
        if self.channel is not None:
            import ray

            try:
                ray.get(self._report())
            except ray.exceptions.RayError:  # the board went away with the driver's node: the shard still counts
                pass

    def _report(self):
        self._reported = self.done
        return self.channel.board.report.remote(self.shard, self._reported, self.total, self.worker)


def counter(channel: ProgressChannel | None, shard: str, total: int | Callable[[], int], parts: int = 1
            ) -> SampleCounter:
    """The shard's counter; one that counts without telling anyone when nobody watches (`channel` None). `total`
    may be a function, called only where someone watches (a read the stage need not make otherwise)."""
    if callable(total):
        total = total() if channel is not None else 0
    return SampleCounter(channel, shard, total, parts)


@contextmanager
def watched_shards(observer):
    """Yields the channel the workers report on (None when the observer does not watch within shards: it has no
    `in_progress`), and hands the board's contents to `observer.in_progress` every `observer.poll_seconds` and once
    at the end; the workers report every `observer.progress_every` samples. Ray must be initialised."""
    watch = getattr(observer, "in_progress", None)
    if not callable(watch):
        yield None
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node: a worker node lost mid-run takes nothing of the board with it (soft: where that node is
    # not one Ray can place on, as a Ray Client's machine, anywhere)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    board = ray.remote(num_cpus=0, scheduling_strategy=here)(
        named_for_the_dashboard(ProgressBoard, job_metadata()["job_name"])).remote()
    stop, failed = threading.Event(), []

    def show() -> None:
        try:
            watch(ray.get(board.snapshot.remote()))
        except Exception as err:  # noqa: BLE001 - a dashboard hiccup must not stop the stage
            if not failed:  # said once; the next readings try again quietly
                print(f"progress within shards not shown for now: {type(err).__name__}: {err}")
            failed.append(err)

    def poll() -> None:
        while not stop.wait(getattr(observer, "poll_seconds", POLL_SECONDS)):
            show()

    # the observer runs in the driver's context (a Prefect flow run's, so that what it publishes belongs to that run)
    thread = threading.Thread(target=contextvars.copy_context().run, args=(poll,), name="in-shard progress",
                              daemon=True)
    thread.start()
    try:
        yield ProgressChannel(board, max(int(getattr(observer, "progress_every", 100)), 1))
    finally:
        stop.set()
        thread.join()
        show()
        ray.kill(board)
