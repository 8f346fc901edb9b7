"""`make bench-planning`: the download driver's planning of a URL list of --rows rows (LAION-2B has 2,000M): time and
peak memory of reading the list twice (the repeated-URL pass, then cutting it into shards), nothing downloaded.

The list is a TSV written on the fly to --work (unique URLs; --duplicates of them repeated), read back by the
stage's own reader (stages.download.inputs.read_rows), checked by its own repeated-URL pass (Duplicates, spilling to
--work beyond --memory-rows) and planned by its own planner (plan_shards); each shard
task is dropped once planned, as the driver hands it to a Ray task. Peak memory is the process's maximum resident
set (getrusage), measured in a fresh process per size.

Run: python bench/bench_planning.py [--rows 100000000] [--shard-size 1000] [--duplicates 0.02]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def write_list(path: Path, rows: int, duplicates: float) -> None:
    """A TSV of `rows` rows, 80-byte URLs and 60-byte captions (CC12M's medians are about that), written in blocks."""
    every = int(1 / duplicates) if duplicates else 0
    with open(path, "w") as out:
        for start in range(0, rows, 100_000):
            block = []
            for i in range(start, min(rows, start + 100_000)):
                n = i - 1 if every and i % every == 0 and i else i  # a repeat of the row before it
                block.append(f"https://images.example.com/photos/{n:012d}/a-photo-of-something-{n % 997:04d}.jpg"
                             f"\ta photo of something number {n} on a table next to a window\n")
            out.write("".join(block))


def plan(path: Path, shard_size: int, memory_rows: int) -> dict:
    import tempfile

    from stages.download.download import plan_shards
    from stages.download.duplicates import Duplicates
    from stages.download.inputs import read_rows

    started, shards, rows, duplicates = time.perf_counter(), 0, 0, 0
    with tempfile.TemporaryDirectory(prefix="bench-planning-", dir=path.parent) as scratch:
        found = Duplicates(read_rows(path), scratch, memory_rows)
        checked = time.perf_counter()
        for task in plan_shards(read_rows(path), shard_size, found):
            shards, rows, duplicates = shards + 1, rows + len(task.rows), duplicates + len(task.duplicate_of)
    return {"rows": rows, "shards": shards, "duplicates": duplicates, "spilled": found.spilled,
            "check_seconds": round(checked - started, 1), "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--duplicates", type=float, default=0.02, help="share of rows repeating the row before")
    parser.add_argument("--memory-rows", type=int, default=8_000_000, help="download.duplicate_memory_rows")
    parser.add_argument("--work", default=str(HERE / "_work" / "planning"))
    parser.add_argument("--plan-only", help=argparse.SUPPRESS)  # the child process: plan this list
    args = parser.parse_args()
    if args.plan_only:
        print(json.dumps(plan(Path(args.plan_only), args.shard_size, args.memory_rows)))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in sorted({args.rows // 10, args.rows}):
        path = work / f"urls-{rows}.tsv"
        if not path.is_file():
            write_list(path, rows, args.duplicates)
        child = subprocess.run([sys.executable, __file__, "--plan-only", str(path), "--shard-size",
                                str(args.shard_size), "--memory-rows", str(args.memory_rows)], capture_output=True, text=True, check=True)
        result = json.loads(child.stdout)
        results.append(result)
        print(f"{result['rows']:,} rows -> {result['shards']:,} shards ({result['duplicates']:,} duplicates, hashes "
              f"{'spilled to disk' if result['spilled'] else 'in memory'}): {result['seconds']} s (the repeated-URL "
              f"pass {result['check_seconds']} s), peak {result['peak_rss_gib']} GiB")
    large = results[-1]
    print(f"at 1,000M rows: {large['seconds'] * 1e9 / large['rows'] / 3600:.1f} h of one core, memory bounded by "
          f"--memory-rows (16 bytes each) and one hash bucket (rows / 256 x 16 bytes: about 60 MiB)")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
