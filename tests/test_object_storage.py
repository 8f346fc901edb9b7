"""Data roots on object storage: the stages against a real S3 API server on loopback (moto's, see helpers.S3Server),
reached through the standard credential chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""
import io
import os
import signal
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest

from core.storage import StorageError, clean_scratch, data_path, open_data_root
from stages.dataset.shards import DatasetLayout
from stages.download.download import STAGE
from tests.helpers import large_jpeg
from tests.test_cli import cli


def s3_cli(s3, *args, cwd, ray_address=None, scratch=None, **kw):
    env = {**s3.env, **({"FOURM_SCRATCH": str(scratch)} if scratch else {})}
    return cli(*args, ray_address=ray_address, cwd=cwd, extra_env=env, **kw)


def tar_keys(fs, path: str) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
        return [m.name.rsplit(".", 1)[0] for m in tar]


def test_download_to_s3_killed_mid_upload_resumes_with_every_row_once(ray_address, server, s3, tmp_path):
    """`download --output s3://...`: the shards and status files land in the bucket, nothing on the local disk;
    killed while shard 1's photo tar is being uploaded, no object of shard 1 is visible and shard 0 stays
    committed; the rerun redoes shard 1 alone and every row ends recorded exactly once, in order."""
    bucket = s3.make_bucket("killed-download")
    jpeg = large_jpeg((800, 600))
    listing = tmp_path / "urls.tsv"
    listing.write_text("".join(f"{server.add(f'{i}.jpg', jpeg)}\tphoto {i}\n" for i in range(8)))
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    args = ["download", "--input", str(listing), "--output", f"s3://{bucket}/ds", "--shard-size", "3",
            "--processes", "1", "--threads", "2", "--allow-private-hosts"]

    s3.hold(f"/{bucket}/ds/rgb/shard-000001.tar")
    proc = s3_cli(s3, *args, cwd=work, ray_address=ray_address, scratch=scratch, start_new_session=True)
    try:
        assert s3.arrived.wait(180), "the download never uploaded shard 1"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        fs = s3.fs()
        assert sorted(fs.find(f"{bucket}/ds")) == [
            f"{bucket}/ds/_status/download/shard-000000.json", f"{bucket}/ds/_status/download/shard-000000.parquet",
            f"{bucket}/ds/caption/shard-000000.tar", f"{bucket}/ds/rgb/shard-000000.tar"], \
            "shard 0 committed; of shard 1 nothing visible, its upload cut short"
        stamp = fs.info(f"{bucket}/ds/_status/download/shard-000000.json")["LastModified"]

        result = s3_cli(s3, *args, cwd=work, ray_address=ray_address, scratch=scratch)
        out, err = result.communicate(timeout=240)
    finally:
        s3.release.set()
    assert result.returncode == 0, err
    assert f"in s3://{bucket}/ds" in out
    assert list(work.iterdir()) == [], "nothing written to the local working folder"
    layout = DatasetLayout(data_path(f"s3://{bucket}/ds", s3.options))
    assert layout.committed_shards(STAGE) == ["shard-000000", "shard-000001", "shard-000002"]
    assert fs.info(f"{bucket}/ds/_status/download/shard-000000.json")["LastModified"] == stamp, \
        "the committed shard was not redone"
    assert [server.count(f"/file/{i}.jpg") for i in range(3)] == [1, 1, 1]
    keys = []
    for shard in layout.committed_shards(STAGE):
        with layout.status_table(STAGE, shard).open("rb") as f:
            keys += [r["key"] for r in pq.read_table(f).to_pylist() if r["status"] == "ok"]
    assert keys == [f"{i:09d}" for i in range(8)], "every row recorded exactly once, in order"
    for folder in ("rgb", "caption"):
        assert sum((tar_keys(fs, f"{bucket}/ds/{folder}/shard-{i:06d}.tar") for i in range(3)), []) == keys
    # Scratch space: every file was removed once uploaded (or with its writer).
    assert [p for p in (scratch / "fourm-scratch").rglob("*") if p.is_file()] == []


def test_bad_data_roots_are_refused_by_name_before_any_work(s3, tmp_path):
    """A missing bucket, refused credentials, an endpoint that does not answer, an unknown scheme: exit 2 with the
    URL named, before the stage starts, and nothing written anywhere."""
    s3.make_bucket("present")
    listing = tmp_path / "urls.tsv"
    listing.write_text("http://127.0.0.1/a.jpg\ta\n")
    work = tmp_path / "work"
    work.mkdir()
    download = ["download", "--input", str(listing), "--output"]
    wrong_key = {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    cases = [  # (output, extra environment, what the message says)
        ("s3://absent/ds", {}, "no bucket 'absent'"),
        ("s3://present/ds", wrong_key, "credentials were refused"),
        ("s3://present/ds", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "did not answer"),
        ("nosuch://present/ds", {}, "unsupported scheme nosuch://"),
    ]
    for output, extra, message in cases:
        proc = cli(*download, output, cwd=work, extra_env={**s3.env, **extra})
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (output, out, err)
        assert output in err and message in err, (output, err)
        assert "Traceback" not in err
    assert list(work.iterdir()) == []
    assert s3.fs().find("present") == [], "nothing written to the bucket"


def test_a_root_given_in_code_is_checked_the_same_way(s3):
    with pytest.raises(StorageError, match="no bucket 'absent'"):
        open_data_root("s3://absent/x", s3.options, writable=False)


def test_scratch_folders_of_processes_that_are_gone_are_removed(tmp_path):
    """A worker killed mid-upload leaves its shard's files in its scratch folder: the next process to need scratch
    space removes the folders of processes no longer running, and keeps the others'."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    base = tmp_path / "fourm-scratch"
    for pid in (gone.pid, os.getpid()):
        (base / str(pid)).mkdir(parents=True)
        (base / str(pid) / ".bucket~ds~rgb~shard-000001.tar.tmp-0123456789ab").write_bytes(b"half a tar")
    assert clean_scratch(base) == [base / str(gone.pid)]
    assert sorted(p.name for p in base.iterdir()) == [str(os.getpid())]
