import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.download.download import plan_shards
from stages.download.duplicates import Duplicates
from stages.download.inputs import InputError, InputRow, read_rows, row_key


def test_tsv_rows_keep_their_number_and_malformed_rows_are_values(tmp_path):
    path = tmp_path / "list.tsv"
    path.write_bytes(
        b"http://a.example/1.jpg\ta cat\n"
        b"no tab here\n"
        b"\tan empty url\n"
        b"http://a.example/\xff\xfe.jpg\tbad bytes\n"
        + b"http://a.example/" + b"x" * 50_000 + b"\tlong url\n"
        + b"http://a.example/2.jpg\t" + b"w" * 5000 + b"\n"
        b"http://a.example/3.jpg\tcaption with\ttab inside\r\n"
        b"http://a.example/4.jpg\tlast line without newline"
    )
    rows = list(read_rows(path, max_url_chars=4096, max_caption_chars=4096))
    assert [r.index for r in rows] == list(range(8))
    assert rows[0].url == "http://a.example/1.jpg" and rows[0].caption == "a cat" and rows[0].error is None
    assert "no tab" in rows[1].error and "'no tab here'" in rows[1].error
    assert rows[2].error == "row 2: empty url"
    assert "row 3: not valid UTF-8 at byte 17" in rows[3].error
    assert "row 4: line of" in rows[4].error  # longer than url + caption limits: read in pieces, skipped
    assert rows[5].error == "row 5: caption of 5000 characters exceeds max_caption_chars=4096"
    assert rows[6].caption == "caption with\ttab inside"
    assert rows[7].caption == "last line without newline"


def test_keys_are_stable_sortable_and_dot_free():
    keys = [row_key(i) for i in (0, 7, 12_400_000)]
    assert keys == sorted(keys) and all("." not in k for k in keys)
    assert row_key(7) == "000000007"


def test_parquet_and_csv_with_named_columns(tmp_path):
    table = pa.table({"caption": ["one", None, "three"], "url": ["http://x/1", "http://x/2", None]})
    pq.write_table(table, tmp_path / "l.parquet")
    rows = list(read_rows(tmp_path / "l.parquet"))
    assert [(r.url, r.caption) for r in rows[:2]] == [("http://x/1", "one"), ("http://x/2", None)]
    assert rows[2].error == "row 2: empty url"

    (tmp_path / "l.csv").write_bytes(b'url,caption\nhttp://x/1,"a, quoted"\nhttp://x/\xff,bad\n')
    rows = list(read_rows(tmp_path / "l.csv"))
    assert rows[0].caption == "a, quoted"
    assert "row 1: column 'url' is not valid UTF-8" in rows[1].error


def test_missing_column_and_unknown_format_are_clear_errors(tmp_path):
    pq.write_table(pa.table({"link": ["http://x/1"]}), tmp_path / "l.parquet")
    with pytest.raises(InputError, match=r"no column 'url' \(columns: link\)"):
        read_rows(tmp_path / "l.parquet")
    (tmp_path / "l.json").write_text("{}")
    with pytest.raises(InputError, match="unknown format '.json'"):
        read_rows(tmp_path / "l.json")
    with pytest.raises(InputError, match="no such file"):
        read_rows(tmp_path / "absent.tsv")


def test_repeated_urls_found_alike_in_memory_and_spilled_to_disk(tmp_path):
    """The first occurrence of each URL is kept, the later ones point at it; spilling the hashes to disk (a list
    longer than duplicate_memory_rows) finds the same pairs, in row order, and leaves no hash bucket behind."""
    import random

    rng = random.Random(0)
    rows = [InputRow(i, f"http://x.example/{rng.randrange(300)}.jpg", None) for i in range(1000)]
    rows[5] = InputRow(5, None, None, "row 5: empty url")  # errors are never anyone's duplicate
    first: dict[str, int] = {}
    expected = [(r.index, first.setdefault(r.url, r.index)) for r in rows if r.url]
    expected = [(row, of) for row, of in expected if row != of]
    in_memory = Duplicates(iter(rows), tmp_path / "memory")
    spilled = Duplicates(iter(rows), tmp_path / "disk", memory_rows=64)
    assert not in_memory.spilled and spilled.spilled and in_memory.rows == spilled.rows == 1000
    assert list(in_memory) == list(spilled) == expected
    assert not list((tmp_path / "disk").glob("hashes-*"))
    tasks = list(plan_shards(iter(rows), 128, spilled))
    assert [t.index for t in tasks] == list(range(8))
    marked = {row: key for t in tasks for row, key in t.duplicate_of.items()}
    assert marked == {row: row_key(of) for row, of in expected}
