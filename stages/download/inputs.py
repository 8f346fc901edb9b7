"""Reading a URL list as a stream of rows: CC12M's TSV (`url<TAB>caption`, no header), parquet or CSV.

Every input row comes out exactly once, in order, with its row number; a malformed row comes out with an
`error` instead of being dropped, so the download stage can record its fate. Memory stays bounded whatever
the file holds (CC12M is 2.6 GB; a single absurd line is read in chunks and skipped).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.storage import data_path, is_remote, open_random, open_read


class InputError(ValueError):
    """The URL list as a whole cannot be read (missing file, missing column, unknown format)."""


@dataclass(frozen=True)
class InputRow:
    index: int
    url: str | None
    caption: str | None
    error: str | None = None

    @property
    def key(self) -> str:
        return row_key(self.index)


def row_key(index: int) -> str:
    # The row number: stable across reruns of the same list, sortable, and free of dots.
    return f"{index:09d}"


def input_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt", ".tab"):
        return "tsv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise InputError(f"input {str(path)!r}: unknown format {suffix!r} (expected .tsv, .parquet or .csv)")


def _readable(path, random_access: bool = False):
    """What pyarrow's readers take: the local path, or the object opened (read in order, or anywhere)."""
    if not is_remote(path):
        return path
    return open_random(path) if random_access else open_read(path)


def _check_fields(index: int, url: str | None, caption: str | None, max_url: int, max_caption: int) -> InputRow:
    where = f"row {index}"
    if url is None or not url.strip():
        return InputRow(index, None, caption, f"{where}: empty url")
    url = url.strip()
    if len(url) > max_url:
        return InputRow(index, None, None, f"{where}: url of {len(url)} characters exceeds max_url_chars={max_url}")
    if caption is not None and len(caption) > max_caption:
        return InputRow(
            index, url, None, f"{where}: caption of {len(caption)} characters exceeds max_caption_chars={max_caption}"
        )
    return InputRow(index, url, caption)


def _read_tsv(path: Path, max_url: int, max_caption: int) -> Iterator[InputRow]:
    # A line longer than both limits together (plus slack) is malformed whatever it holds: read it in
    # bounded pieces and skip to its end rather than loading it.
    limit = max_url + max_caption + 64
    with open_read(path) as f:
        index = 0
        while line := f.readline(limit):
            if not line.endswith(b"\n") and len(line) >= limit:
                size = len(line)
                while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
                    size += len(more)
                size += len(more)
                yield InputRow(index, None, None, f"row {index}: line of {size} bytes is longer than any valid row")
                index += 1
                continue
            raw = line.rstrip(b"\r\n")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield InputRow(index, None, None, f"row {index}: not valid UTF-8 at byte {err.start} ({raw[:60]!r})")
                index += 1
                continue
            if "\t" not in text:
                yield InputRow(index, None, None, f"row {index}: no tab between url and caption ({text[:80]!r})")
            else:
                url, caption = text.split("\t", 1)
                yield _check_fields(index, url, caption, max_url, max_caption)
            index += 1


def _decode_cell(value: bytes | str | None, index: int, column: str) -> tuple[str | None, str | None]:
    if value is None or isinstance(value, str):
        return value, None
    try:
        return value.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"row {index}: column {column!r} is not valid UTF-8 at byte {err.start}"


def _rows_from_batches(batches, url_col: str, caption_col: str, max_url: int, max_caption: int) -> Iterator[InputRow]:
    index = 0
    for batch in batches:
        urls = batch.column(url_col).to_pylist()
        captions = batch.column(caption_col).to_pylist() if caption_col in batch.schema.names else [None] * len(urls)
        for raw_url, raw_caption in zip(urls, captions):
            url, url_err = _decode_cell(raw_url, index, url_col)
            caption, cap_err = _decode_cell(raw_caption, index, caption_col)
            if url_err or cap_err:
                yield InputRow(index, None, None, url_err or cap_err)
            else:
                yield _check_fields(index, url, caption, max_url, max_caption)
            index += 1


def _require_columns(path: Path, names: list[str], url_col: str) -> None:
    if url_col not in names:
        raise InputError(f"input {str(path)!r}: no column {url_col!r} (columns: {', '.join(names)})")


def read_rows(
    path: str | Path,
    url_column: str = "url",
    caption_column: str = "caption",
    max_url_chars: int = 4096,
    max_caption_chars: int = 4096,
) -> Iterator[InputRow]:
    path = data_path(path)  # a local file, or an object (s3://bucket/cc12m.tsv)
    if not path.is_file():
        raise InputError(f"input {str(path)!r}: no such file")
    fmt = input_format(path)
    if fmt == "tsv":
        return _read_tsv(path, max_url_chars, max_caption_chars)
    if fmt == "parquet":
        pf = pq.ParquetFile(_readable(path, random_access=True))
        names = pf.schema_arrow.names
        _require_columns(path, names, url_column)
        columns = [c for c in (url_column, caption_column) if c in names]
        batches = pf.iter_batches(batch_size=4096, columns=columns)
    else:
        with open_read(path) as f:
            header = f.readline().decode("utf-8", errors="replace").strip()
        names = [n.strip().strip('"') for n in header.split(",")]
        _require_columns(path, names, url_column)
        columns = [c for c in (url_column, caption_column) if c in names]
        # Read cells as bytes so one bad byte sequence becomes one bad row, not a failed file.
        batches = pacsv.open_csv(
            _readable(path),
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns, column_types={c: pa.binary() for c in columns}
            ),
        )
    return _rows_from_batches(batches, url_column, caption_column, max_url_chars, max_caption_chars)
