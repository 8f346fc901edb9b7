"""Data roots on object storage: the stages against a real S3 API server on loopback (moto's, see helpers.S3Server),
reached through the standard credential chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
import torch

from core.storage import StorageError, clean_scratch, data_path, open_data_root, read_parquet
from stages.dataset.shards import DatasetLayout
from stages.download.download import STAGE
from tests.helpers import UNSCORED, large_jpeg
from tests.test_cli import cli


def s3_cli(s3, *args, cwd, ray_address=None, scratch=None, **kw):
    env = {**s3.env, **({"FOURM_SCRATCH": str(scratch)} if scratch else {})}
    return cli(*args, ray_address=ray_address, cwd=cwd, extra_env=env, **kw)


def kill_mid_upload(s3, fragment: str, start) -> None:
    """Start a command (`start()`: a Popen in a session of its own) and kill it, its whole process group, while the
    server holds its upload of the object whose path holds `fragment`. The caller releases the server after."""
    s3.hold(fragment)
    proc = start()
    assert s3.arrived.wait(240), f"no upload of {fragment} came"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


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

    try:
        kill_mid_upload(s3, f"/{bucket}/ds/rgb/shard-000001.tar", lambda: s3_cli(
            s3, *args, cwd=work, ray_address=ray_address, scratch=scratch, start_new_session=True))
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
    # written with the bucket's default ACL: its owner's, nobody else's (nothing public)
    grants = fs.call_s3("get_object_acl", Bucket=bucket, Key="ds/rgb/shard-000000.tar")["Grants"]
    assert [g["Permission"] for g in grants] == ["FULL_CONTROL"] and "URI" not in grants[0]["Grantee"], grants
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
    cases = [  # (command, data root, extra environment, what the message says)
        (download, "s3://absent/ds", {}, "no bucket 'absent'"),
        (download, "s3://present/ds", wrong_key, "credentials were refused"),
        (download, "s3://present/ds", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "did not answer"),
        (download, "nosuch://present/ds", {}, "unsupported scheme nosuch://"),
        (["label", "--profile", "demo", "--data"], "s3://present/ds", wrong_key, "credentials were refused"),
        (["status", "--data"], "s3://absent/ds", {}, "no bucket 'absent'"),
    ]
    for command, root, extra, message in cases:
        proc = cli(*command, root, cwd=work, extra_env={**s3.env, **extra})
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (command, root, out, err)
        assert root in err and message in err, (command, root, err)
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


def bucket_tars(fs, folder: str) -> dict[str, list[tuple[str, bytes]]]:
    """Every tar under a folder of the bucket: shard -> its members' (name, bytes)."""
    found = {}
    for path in sorted(fs.glob(f"{folder}/shard-*.tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
            found[path.rsplit("/", 1)[1]] = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    return found


def test_label_on_s3_killed_mid_upload_ends_as_an_uninterrupted_run(ray_address, tiny_models, s3, tmp_path):
    """`label --data s3://...` killed while shard 1's depth labels are being uploaded: nothing of shard 1 visible
    for depth, shard 0 committed; the rerun labels shard 1 alone, and the bucket ends holding what an uninterrupted
    run writes, member for member."""
    from tests.helpers import make_labelled_input

    bucket = s3.make_bucket("killed-label")
    fs = s3.fs()
    for prefix in ("killed", "straight"):
        make_labelled_input(data_path(f"s3://{bucket}/{prefix}", s3.options), corrupt_key=None)
    work = tmp_path / "work"
    work.mkdir()

    def label(prefix: str, **kw):
        return cli("label", "--data", f"s3://{bucket}/{prefix}", "--profile", "demo", "--labelers", "depth,semseg",
                   "--set", f"label.models={tiny_models}", "--set", "label.workers=1",
                   *(arg for s in UNSCORED for arg in ("--set", s)), ray_address=ray_address,
                   cwd=work, extra_env=s3.env, **kw)

    try:
        kill_mid_upload(s3, f"/{bucket}/killed/depth/shard-000001.tar", lambda: label("killed", start_new_session=True))
        assert list(bucket_tars(fs, f"{bucket}/killed/depth")) == ["shard-000000.tar"], "no partial object"
        assert [p.rsplit("/", 1)[1] for p in fs.glob(f"{bucket}/killed/_status/label_depth/*.json")] == \
            ["shard-000000.json"]
        rerun = label("killed")
        out, err = rerun.communicate(timeout=300)
    finally:
        s3.release.set()
    assert rerun.returncode == 0, err
    assert "1 shards labelled, 1 already committed" in out
    straight = label("straight")
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    for name in ("depth", "semseg"):
        killed = bucket_tars(fs, f"{bucket}/killed/{name}")
        assert list(killed) == ["shard-000000.tar", "shard-000001.tar"]
        assert [m.split(".")[0] for ms in killed.values() for m, _ in ms] == [f"{i:09d}" for i in range(5)]
        assert killed == bucket_tars(fs, f"{bucket}/straight/{name}"), f"{name}: as an uninterrupted run wrote it"
        keys = [r["key"] for s in ("shard-000000", "shard-000001")
                for r in read_parquet(data_path(f"s3://{bucket}/killed/_status/label_{name}/{s}.parquet",
                                                s3.options)).to_pylist()]
        assert keys == [f"{i:09d}" for i in range(5)], "every sample recorded exactly once"
    assert list(work.iterdir()) == []


def test_pretraining_on_s3_killed_mid_checkpoint_upload_resumes_to_the_same_weights(ray_address, s3, tmp_path):
    """`pretrain --data s3://...` killed while its second checkpoint is being uploaded: the store keeps the first,
    complete, named by checkpoint.json; the rerun resumes from it (its local copy's later checkpoint, never
    published, is dropped) and ends with the weights of an uninterrupted run (on a Ray Train worker)."""
    from safetensors.torch import load_file

    from tests.test_pretrain import SETTINGS, dataset

    local = dataset(tmp_path / "local")
    bucket = s3.make_bucket("killed-pretrain")
    fs = s3.fs()
    for prefix in ("killed", "straight"):
        fs.put(str(local), f"{bucket}/{prefix}", recursive=True)
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    def pretrain(prefix: str, workers: int = 0, **kw):
        env = {**s3.env, "FOURM_SCRATCH": str(scratch)}
        settings = [x for s in [*SETTINGS, f"pretrain.workers={workers}"] for x in ("--set", s)]
        return cli("pretrain", "--data", f"s3://{bucket}/{prefix}", *settings, ray_address=ray_address, cwd=work,
                   extra_env=env, **kw)

    run = f"{bucket}/killed/pretrain"
    try:
        kill_mid_upload(s3, f"/{run}/checkpoint-000000004/model.safetensors",
                        lambda: pretrain("killed", start_new_session=True))
        assert json.loads(fs.cat_file(f"{run}/checkpoint.json"))["step"] == 2
        assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{run}/checkpoint-000000002")) == \
            ["model.safetensors", "optimizer.safetensors", "state.json"]
        assert not fs.exists(f"{run}/checkpoint-000000004/model.safetensors"), "no partial object"
        assert not fs.exists(f"{run}/train.json") and not fs.exists(f"{run}/model.safetensors")
        rerun = pretrain("killed")
        out, err = rerun.communicate(timeout=300)
    finally:
        s3.release.set()
    assert rerun.returncode == 0, err
    straight = pretrain("straight", workers=1)  # on a Ray Train worker, its run state on the store too
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    weights = {}
    for prefix in ("killed", "straight"):
        path = tmp_path / f"{prefix}.safetensors"
        fs.get_file(f"{bucket}/{prefix}/pretrain/model.safetensors", str(path))
        weights[prefix] = load_file(path)
    assert weights["killed"].keys() == weights["straight"].keys()
    assert all(torch.equal(weights["killed"][k], weights["straight"][k]) for k in weights["killed"])
    steps = [json.loads(line)["step"] for line in fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    assert steps[:2] == [1, 2] and steps[-1] == 6
    assert [p.rsplit("/", 1)[1] for p in fs.glob(f"{run}/checkpoint-*")] == ["checkpoint-000000006"]
    assert fs.find(f"{bucket}/straight/pretrain/ray"), "Ray Train's run state beside the run, on the store"
    assert "Found credentials" not in err and "Found endpoint" not in err, "no botocore notices on the console"
    assert list(work.iterdir()) == []


def test_a_published_tokenizer_is_installed_into_a_bucket_whole(s3, monkeypatch, capsys):
    """`convert-tokenizer --data s3://...`: the tokenizer's files land in the bucket, train.json (what marks it
    installed) among them; a second install is refused by name, as on a disk."""
    from pathlib import Path

    from pipeline.cli import main

    bucket = s3.make_bucket("published")
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    published = Path(__file__).parent / "fixtures" / "reference" / "tokenizers" / "rgb"
    args = ["convert-tokenizer", "--checkpoint", str(published), "--modality", "rgb", "--data", f"s3://{bucket}/ds"]
    assert main(args) == 0
    assert sorted(p.rsplit("/", 1)[1] for p in s3.fs().find(f"{bucket}/ds/tokenizers/rgb")) == \
        ["config.json", "model.safetensors", "train.json"]
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a tokenizer" in capsys.readouterr().err


def test_retry_failed_republishes_a_shard_whole_on_object_storage(ray_address, server, s3, tmp_path):
    """`download --retry-failed` on an s3:// root: the shard whose 503 has since recovered is fetched again and
    published anew, whole objects in key order, after the later stages' commit of that shard is withdrawn; the
    other shard and its later commits are left as they were."""
    from core.config import load_config
    from core.files import write_json
    from stages.download.download import run_download

    bucket = s3.make_bucket("retry")
    jpeg = large_jpeg((320, 240))
    urls = [server.add("a.jpg", jpeg), f"{server.base}/flaky/1/b.jpg", server.add("c.jpg", jpeg)]
    server.add("b.jpg", jpeg)
    listed = tmp_path / "urls.tsv"
    listed.write_text("".join(f"{url}\tphoto {i}\n" for i, url in enumerate(urls)))
    config = load_config("demo", ["download.allow_private_hosts=true", "download.shard_size=2", "download.retries=0",
                                  f"storage_options={json.dumps(s3.options)}", *UNSCORED])
    layout = DatasetLayout(data_path(f"s3://{bucket}/ds", s3.options))
    run_download(listed, layout.root, config)
    for shard in ("shard-000000", "shard-000001"):  # a later stage's commits, as the label stage leaves them
        write_json(layout.stats("label_canny_edge", shard), {"rows": 2, "ok": 2, "status_counts": {"ok": 2}})
    fs = s3.fs()
    kept = fs.info(f"{bucket}/ds/_status/download/shard-000001.json")["LastModified"]

    summary = run_download(listed, layout.root, config, retry_failed=True)
    assert (summary.shards_done, summary.shards_skipped) == (1, 1)
    status = read_parquet(layout.status_table(STAGE, "shard-000000")).to_pylist()
    assert [(r["key"], r["status"]) for r in status] == [("000000000", "ok"), ("000000001", "ok")]
    assert tar_keys(fs, f"{bucket}/ds/rgb/shard-000000.tar") == ["000000000", "000000001"]
    assert not layout.is_committed("label_canny_edge", "shard-000000")  # withdrawn: the next label run redoes it
    assert layout.is_committed("label_canny_edge", "shard-000001")
    assert fs.info(f"{bucket}/ds/_status/download/shard-000001.json")["LastModified"] == kept
    assert not [p for p in fs.find(f"{bucket}/ds") if ".tmp" in p], "only whole objects"
