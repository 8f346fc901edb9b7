"""What the command line prints while stages run: a progress bar per stage, and the summaries after."""
from __future__ import annotations

import sys
from pathlib import Path


class ShardProgress:
    """A progress bar over shards that also shows images kept, failures and those the quality filters dropped, and
    how far the workers are in the shards they are on (`stages.progress`: every 100 samples, read every 2 s)."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None
        self.ok = self.failed = self.filtered = 0
        self.postfix: dict = {}
        self.ended: set[str] = set()  # committed or failed: no longer in progress
        self.made: list[dict] = []  # this run's shards, for the per-node lines on a cluster

    def start(self, total_shards: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_shards, desc=self.desc, unit="shard", dynamic_ncols=True)

    def __call__(self, name: str, stats: dict, skipped: bool) -> None:
        filtered = sum(stats.get("filtered_by", {}).values())  # dropped by a threshold: not a failure
        self.ok += stats["ok"]
        self.failed += stats["rows"] - stats["ok"] - filtered
        self.filtered += filtered
        postfix = {"images": self.ok, "failed": self.failed, **({"filtered": self.filtered} if self.filtered else {})}
        if not skipped and stats.get("device_wait_share") is not None:  # the label stage: which side bounds it
            postfix |= {"gpu_wait": f"{stats['device_wait_share']:.0%}", "decode_wait": f"{stats['decode_wait_share']:.0%}"}
        self.postfix = postfix
        self.ended.add(name)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        if not skipped:
            self.made.append(stats)

    def failed(self, shard: str, error: str) -> None:
        self.ended.add(shard)  # said at the end, with the other failed shards

    def in_progress(self, shards: dict[str, dict]) -> None:
        running = {s: c for s, c in shards.items() if s not in self.ended}
        if self.bar is not None and running:
            now = ", ".join(f"{s[-6:]} {c['done']}/{c['total']}" for s, c in sorted(running.items())[:3])
            self.bar.set_postfix({**self.postfix, "in progress": now})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        print_nodes(self.desc, self.made)


def print_nodes(stage: str, done: list[dict]) -> None:
    """Where several nodes made a stage's shards (their stats): each node's share, and whether it is still there."""
    from core.ray_runtime import live_nodes
    from pipeline.status import node_shares

    rows = node_shares(done, live_nodes())
    if len(rows) < 2:
        return
    print(f"{stage} per node:")
    for row in rows:
        rate = f", {row['samples_per_s']:.2f} samples/s" if row["samples_per_s"] else ""
        now = {"alive": ", alive", "gone": ", gone from the cluster"}.get(row["now"], "")
        print(f"  {row['node']}: {row['shards']} shards, {row['samples']} samples{rate}{now}")


def print_summary(summary, root: str | Path) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in summary.status_counts.most_common())
    print(f"{summary.shards_done} shards downloaded, {summary.shards_skipped} already committed; "
          f"{summary.images} images in {root} ({counts}) in {summary.seconds:.1f} s")
    for name, err in summary.failed_shards.items():
        print(f"shard {name} failed and will be redone on the next run: {err}", file=sys.stderr)


def print_alignment(dropped: int, unaligned: dict[str, str], root) -> None:
    from stages.dataset.shards import DatasetLayout

    layout = DatasetLayout(root)
    print(f"aligned: every loader folder holds the same keys in every shard; {dropped} samples that failed somewhere "
          f"are dropped from all of them (reasons in {layout.status_dir('align')}/, members kept in "
          f"{layout.dropped_dir}/)" if not unaligned else
          f"{len(unaligned)} shards not aligned yet; {dropped} samples dropped so far")
    for reason in unaligned.values():
        print(f"  {reason}", file=sys.stderr)
