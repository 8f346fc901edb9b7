"""Repeated URLs in an input list of any length, found in memory bounded by a setting rather than by the rows.

Consumes  the input's rows, once, in order.
Produces  `Duplicates`: the number of rows, and (row, first row with the same URL) pairs read back in row order.

A row repeats an earlier one when their URLs share a 64-bit blake2b hash; the first occurrence is the lowest row, so
the decision is the same on every rerun. Up to `memory_rows` hashes are found in memory; beyond that they are
spilled into hash buckets on the scratch disk (16 bytes a row), each bucket sorted on its own, and the pairs found
written out by row range, so the driver's memory holds one bucket or one range, never the whole list.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from stages.download.inputs import InputRow

RECORD = np.dtype([("digest", "<u8"), ("row", "<i8")])
PAIR = np.dtype([("row", "<i8"), ("first", "<i8")])
BUCKETS = 256  # spilled hashes per bucket: rows / 256 (1,000M rows: about 4M, 64 MB)


def url_digest(url: str) -> int:
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "little")


def _pairs(records: np.ndarray) -> np.ndarray:
    """(row, first row) for every record whose digest an earlier row had. Records arrive in row order, so a
    stable sort by digest leaves each digest's rows in order and its first one first."""
    records = records[np.argsort(records["digest"], kind="stable")]
    starts = np.ones(len(records), dtype=bool)
    starts[1:] = records["digest"][1:] != records["digest"][:-1]
    first = records["row"][starts][np.cumsum(starts) - 1]
    pairs = np.empty(int((~starts).sum()), dtype=PAIR)
    pairs["row"], pairs["first"] = records["row"][~starts], first[~starts]
    return pairs


class Duplicates:
    """The rows of an input that repeat an earlier row's URL, and how many rows the input has."""

    def __init__(self, rows: Iterable[InputRow], scratch: str | Path, memory_rows: int = 8_000_000):
        self.scratch, self.range_rows = Path(scratch), memory_rows
        self.rows, self.spilled, self.in_memory = 0, False, np.empty(0, dtype=PAIR)
        buffer, used = np.empty(memory_rows, dtype=RECORD), 0
        for row in rows:
            self.rows = row.index + 1
            if not row.url or row.error:
                continue
            buffer[used] = (url_digest(row.url), row.index)
            used += 1
            if used == memory_rows:
                self._spill(buffer[:used])
                used = 0
        if not self.spilled:
            self.in_memory = _pairs(buffer[:used])
            return
        self._spill(buffer[:used])
        del buffer
        for bucket in range(BUCKETS):
            path = self._bucket(bucket)
            if path.is_file():
                found = _pairs(np.fromfile(path, dtype=RECORD))
                path.unlink()
                self._append_by_range(found)

    def _bucket(self, bucket: int) -> Path:
        return self.scratch / f"hashes-{bucket:03d}.bin"

    def _range(self, index: int) -> Path:
        return self.scratch / f"pairs-{index:06d}.bin"

    def _spill(self, records: np.ndarray) -> None:
        self.spilled = True
        self.scratch.mkdir(parents=True, exist_ok=True)
        bucket_of = records["digest"] % BUCKETS
        order = np.argsort(bucket_of, kind="stable")  # each bucket's records stay in row order
        bounds = np.searchsorted(bucket_of[order], np.arange(BUCKETS + 1))
        for bucket in range(BUCKETS):
            if bounds[bucket] < bounds[bucket + 1]:
                with open(self._bucket(bucket), "ab") as f:
                    records[order[bounds[bucket]:bounds[bucket + 1]]].tofile(f)

    def _append_by_range(self, pairs: np.ndarray) -> None:
        ranges = pairs["row"] // self.range_rows
        for index in np.unique(ranges):
            with open(self._range(int(index)), "ab") as f:
                pairs[ranges == index].tofile(f)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(row, first row with its URL), in row order."""
        if not self.spilled:
            chunks = [self.in_memory]
        else:
            chunks = (np.fromfile(path, dtype=PAIR) for index in range(-(-self.rows // self.range_rows))
                      if (path := self._range(index)).is_file())
        for pairs in chunks:
            pairs = pairs[np.argsort(pairs["row"])]
            yield from zip(pairs["row"].tolist(), pairs["first"].tolist())
