"""The download stage end to end on a real Ray, against a misbehaving server on 127.0.0.1."""
import io
import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from core.config import load_config
from stages.download.download import STAGE, run_download
from stages.dataset.shards import DatasetLayout
from tests.helpers import encode, exif_rotated_jpeg, large_jpeg, photo, png_bomb_header


def stage_config(tmp_path, *extra):
    # the misbehaving server listens on 127.0.0.1: allowed by name, as a user would
    return load_config("demo", [f"data_root={tmp_path / 'data'}", "download.allow_private_hosts=true",
                                "download.shard_size=4", "download.threads=4",
                                "download.timeout=1", "download.deadline=3", "download.retry_backoff=0.01",
                                "download.max_bytes=4000000", *extra])


def statuses(root) -> dict[str, dict]:
    layout = DatasetLayout(root)
    rows = []
    for shard in layout.committed_shards(STAGE):
        rows += pq.read_table(layout.status_table(STAGE, shard)).to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "every input row is recorded exactly once"
    return {r["key"]: r for r in rows}


def read_modality(root, modality):
    urls = sorted(str(p) for p in (root / modality).glob("shard-*.tar"))
    return [(s["__key__"], s) for s in wds.WebDataset(urls, shardshuffle=False)]


@pytest.fixture
def bad_input_list(server, tmp_path):
    """A URL list with one row per kind of trouble, and what each row must end as."""
    jpeg = large_jpeg((1600, 1200))
    rotated, _ = exif_rotated_jpeg()
    server.add("chain-target", jpeg)
    cases = [
        (server.add("big.jpg", jpeg), "photo of an astronaut", "ok"),
        (f"{server.base}/status/404", "gone", "http_error"),
        (f"{server.base}/status/410", "gone for good", "http_error"),
        (f"{server.base}/flaky/1/big.jpg", "5xx then fine", "ok"),
        (f"{server.base}/reset/1/big.jpg", "reset then fine", "ok"),
        (f"{server.base}/drip", "slow drip", "timeout"),
        (f"{server.base}/endless", "endless body", "too_large"),
        (server.add("page.jpg", b"<!DOCTYPE html><html>no</html>", "image/jpeg"), "html as jpeg", "not_an_image"),
        (server.add("half.jpg", jpeg[: len(jpeg) // 2]), "truncated", "decode_error"),
        (server.add("bomb.png", png_bomb_header(9000, 9000), "image/png"), "bomb", "too_many_pixels"),
        (server.add("cmyk.jpg", encode(photo("coffee").convert("CMYK"))), "cmyk", "ok"),
        (server.add("gray.png", encode(photo("camera").convert("L"), "PNG"), "image/png"), "gray", "ok"),
        (server.add("rgba.png", encode(photo("chelsea").convert("RGBA"), "PNG"), "image/png"), "alpha", "ok"),
        (server.add("rot.jpg", rotated), "rotated", "ok"),
        (f"{server.base}/loop/A", "loop", "redirect_error"),
        (f"{server.base}/chain/9", "too many redirects", "redirect_error"),
        ("ftp://127.0.0.1/a.jpg", "ftp", "unsupported_scheme"),
        ("http://169.254.169.254/latest/meta-data", "metadata service", "private_host"),
        (server.add("optout.jpg", jpeg, X_Robots_Tag="noai"), "opted out", "opted_out"),
        (server.add("big.jpg", jpeg), "the same url again", "duplicate"),
    ]
    lines = [f"{url}\t{caption}" for url, caption, _ in cases]
    lines += ["no tab in this row", "\tempty url", "http://x.example/" + "y" * 20000 + "\tlong"]
    expected = [status for _, _, status in cases] + ["invalid_row"] * 3
    path = tmp_path / "urls.tsv"
    path.write_bytes("\n".join(lines).encode() + b"\nhttp://x.example/\xff.jpg\tnot utf-8\n")
    expected.append("invalid_row")
    return path, expected


def test_every_row_ends_as_exactly_one_status_row(ray_address, server, bad_input_list, tmp_path):
    path, expected = bad_input_list
    # Private hosts are refused here except this server, trusted by host and port.
    config = stage_config(tmp_path, "download.allow_private_hosts=false",
                          f"download.allowed_hosts=['127.0.0.1:{server.server_address[1]}']")
    summary = run_download(path, config.data_root, config)
    root = tmp_path / "data"
    records = statuses(root)
    got = [records[f"{i:09d}"]["status"] for i in range(len(expected))]
    assert got == expected
    assert summary.shards_total == summary.shards_done == 6 and not summary.failed_shards
    for r in records.values():
        assert (r["status"] == "ok") == (r["error"] is None), r
    dup = records["000000019"]
    assert dup["duplicate_of"] == "000000000" and server.count("/file/big.jpg") == 1
    ok = records["000000000"]
    assert (ok["width"], ok["height"], ok["original_width"], ok["original_height"]) == (768, 576, 1600, 1200)
    assert ok["http_status"] == 200 and len(ok["sha256"]) == 64 and ok["bytes"] > 0
    assert records["000000001"]["http_status"] == 404
    assert "not valid UTF-8" in records["000000023"]["error"]


def test_shards_are_aligned_and_readable_by_webdataset(ray_address, server, bad_input_list, tmp_path):
    path, expected = bad_input_list
    config = stage_config(tmp_path)
    run_download(path, config.data_root, config)
    root = tmp_path / "data"
    rgb, captions = read_modality(root, "rgb"), read_modality(root, "caption")
    ok_keys = [f"{i:09d}" for i, s in enumerate(expected) if s == "ok"]
    assert [k for k, _ in rgb] == [k for k, _ in captions] == ok_keys
    assert sorted(p.name for p in (root / "rgb").iterdir()) == sorted(p.name for p in (root / "caption").iterdir())
    for key, sample in rgb:
        im = Image.open(io.BytesIO(sample["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 768
    assert dict(captions)["000000000"]["txt"] == b"photo of an astronaut"
    stats = json.loads((root / "_status/download/shard-000000.json").read_text())
    assert stats["rows"] == 4 and stats["ok"] == 2 and stats["status_counts"]["http_error"] == 2
    assert not list(root.rglob("*.tmp-*")), "no temporary file is left behind"


def test_rerun_skips_committed_shards_and_redoes_interrupted_ones(ray_address, server, tmp_path):
    jpeg = large_jpeg((800, 600))
    urls = [server.add(f"{i}.jpg", jpeg) for i in range(10)]
    path = tmp_path / "urls.tsv"
    path.write_text("".join(f"{u}\tphoto {i}\n" for i, u in enumerate(urls)))
    config = stage_config(tmp_path)
    root = tmp_path / "data"
    first = run_download(path, config.data_root, config)
    assert first.shards_done == 3 and first.images == 10
    layout = DatasetLayout(root)
    marker = layout.stats(STAGE, "shard-000000")
    stamp = marker.stat().st_mtime_ns

    # Shard 1 as a kill would leave it: tar and table written, commit marker not yet, a temporary file around.
    layout.stats(STAGE, "shard-000001").unlink()
    (root / "rgb" / ".shard-000001.tar.tmp-deadbeef").write_bytes(b"partial")

    second = run_download(path, config.data_root, config)
    assert (second.shards_done, second.shards_skipped) == (1, 2)
    assert second.images == 10, "skipped shards still count in the summary"
    assert marker.stat().st_mtime_ns == stamp
    assert [server.count(f"/file/{i}.jpg") for i in range(10)] == [1] * 4 + [2] * 4 + [1] * 2
    assert not (root / "rgb" / ".shard-000001.tar.tmp-deadbeef").exists()
    assert len(statuses(root)) == 10


def test_retry_failed_fetches_the_retryable_failures_again_and_later_stages_redo_their_shard(ray_address, server,
                                                                                               tmp_path, capsys):
    """`failures` lists every failed row with its URL and whether it may pass on another try; `download
    --retry-failed` fetches those again (a 503 that has since recovered; not a 404), publishes the shard anew in key
    order, and withdraws the later stages' commit of that shard only, so the next label run labels the photo."""
    from pipeline.cli import main as cli
    from stages.download.inputs import InputError
    from stages.label.label import run_label
    from tests.helpers import UNSCORED

    jpeg = large_jpeg((320, 240))
    urls = [server.add("a.jpg", jpeg), f"{server.base}/flaky/1/b.jpg", f"{server.base}/status/404",
            server.add("c.jpg", jpeg), server.add("d.jpg", jpeg)]
    server.add("b.jpg", jpeg)
    listed = tmp_path / "urls.tsv"
    listed.write_text("".join(f"{url}\tphoto {i}\n" for i, url in enumerate(urls)))
    config = stage_config(tmp_path, "download.retries=0", *UNSCORED)
    root = tmp_path / "data"
    run_download(listed, root, config)
    run_label(root, config, ["canny_edge"])
    layout = DatasetLayout(root)
    assert [s["status"] for s in statuses(root).values()] == ["ok", "http_error", "http_error", "ok", "ok"]

    assert cli(["failures", "--data", str(root), "--stage", "download"]) == 0
    printed = capsys.readouterr().out
    assert "000000001" in printed and "HTTP 503" in printed and "000000002" in printed
    assert cli(["failures", "--data", str(root), "--out", str(tmp_path / "failures.csv")]) == 0
    import csv

    failed = list(csv.DictReader((tmp_path / "failures.csv").open()))
    assert [(r["key"], r["retryable"]) for r in failed] == [("000000001", "yes"), ("000000002", "no")]
    assert failed[0]["url"] == urls[1] and failed[1]["status"] == "http_error"

    assert cli(["failures", "--data", str(root), "--stage", "label_nosuch"]) == 2  # named, with the stages there
    assert "--stage label_nosuch: no such status folder" in capsys.readouterr().err
    other = tmp_path / "other.tsv"  # not the list the dataset came from: refused before any shard is touched
    other.write_text(listed.read_text().replace(urls[1], f"{server.base}/flaky/1/elsewhere.jpg"))
    with pytest.raises(InputError, match=r"row 1 of .*other.tsv is .*elsewhere.jpg.*recorded"):
        run_download(other, root, config, retry_failed=True)
    assert layout.is_committed("label_canny_edge", "shard-000000")
    second = layout.read_stats("label_canny_edge", "shard-000001")
    summary = run_download(listed, root, config, retry_failed=True)
    assert summary.shards_done == 1 and summary.shards_skipped == 1  # only the shard with a retryable failure
    after = statuses(root)
    assert after["000000001"]["status"] == "ok" and after["000000002"]["status"] == "http_error"
    assert [k for k, _ in read_modality(root, "rgb")] == ["000000000", "000000001", "000000003", "000000004"]
    assert not layout.is_committed("label_canny_edge", "shard-000000")  # withdrawn: its photos changed
    assert layout.read_stats("label_canny_edge", "shard-000001") == second  # untouched
    labelled = run_label(root, config, ["canny_edge"])
    assert labelled.shards_done == 1 and labelled.status_counts["canny_edge"]["ok"] == 4
    assert "000000001" in layout.read_status("label_canny_edge", "shard-000000")["key"].to_pylist()
    assert run_download(listed, root, config, retry_failed=True).shards_done == 0  # a 404 is not tried again
