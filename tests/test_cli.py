"""The command line as a user runs it: a subprocess joined to the test session's Ray through RAY_ADDRESS."""
import json
import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import webdataset as wds

from stages.dataset.shards import DatasetLayout
from stages.download.download import STAGE
from tests.helpers import large_jpeg


def cli(*args, ray_address=None, extra_env=None, **kw) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(extra_env or {})}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run_cli(*args, ray_address=None, timeout=240) -> subprocess.CompletedProcess:
    proc = cli(*args, ray_address=ray_address)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_bad_configuration_fails_before_any_work(tmp_path):
    """Each refused with exit status 2 and the bad value named, before the stage is even imported (which takes
    seconds: torch, webdataset, Ray), and with nothing written."""
    urls = tmp_path / "urls.tsv"
    urls.write_text("http://127.0.0.1/a.jpg\ta\n")
    out = tmp_path / "data"
    download = ["download", "--input", str(urls), "--output", str(out)]
    cases = [download + ["--set", "download.retrys=3"], download + ["--threads", "0"],
             ["download", "--input", str(tmp_path / "nope.tsv"), "--output", str(out)]]
    code = ("import json, sys; from pipeline.cli import main; "
            "codes = [main(case) for case in json.loads(sys.argv[1])]; "
            "print(codes, 'stages.download.download' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["[2,", "2,", "2]", "False"], result.stdout + result.stderr
    errors = result.stderr.splitlines()
    assert "unknown key 'download.retrys'" in errors[0]
    assert "--threads 0: download.threads = 0" in errors[1]
    assert "nope.tsv" in errors[2] and "no such file" in errors[2]
    assert not out.exists(), "nothing was written"


def test_download_command_writes_shards_and_shows_progress(ray_address, server, tmp_path):
    jpeg = large_jpeg((1024, 768))
    urls = tmp_path / "urls.tsv"
    urls.write_text("".join(f"{server.add(f'{i}.jpg', jpeg)}\tphoto {i}\n" for i in range(5)))
    result = run_cli("download", "--input", str(urls), "--output", str(tmp_path / "data"), "--shard-size", "2",
                     "--max-side", "256", "--allow-private-hosts", ray_address=ray_address)
    assert result.returncode == 0, result.stderr
    assert "download: 100%" in result.stderr and "3/3" in result.stderr
    assert "5 images in" in result.stdout
    table = pq.read_table(tmp_path / "data/_status/download/shard-000000.parquet").to_pylist()
    assert [(r["width"], r["height"]) for r in table] == [(256, 192)] * 2


def test_killed_run_resumes_with_every_row_recorded_once(ray_address, server, tmp_path):
    jpeg = large_jpeg((800, 600))
    for i in range(9):
        server.add(f"{i}.jpg", jpeg)
    urls = [f"{server.base}/file/{i}.jpg" for i in range(9)]
    urls[4] = f"{server.base}/block/4.jpg"  # shard 1 hangs here until the test lets it go
    listing = tmp_path / "urls.tsv"
    listing.write_text("".join(f"{u}\tphoto {i}\n" for i, u in enumerate(urls)))
    root = tmp_path / "data"
    args = ["download", "--input", str(listing), "--output", str(root), "--shard-size", "3", "--processes", "1",
            "--threads", "2", "--allow-private-hosts"]

    proc = cli(*args, ray_address=ray_address, start_new_session=True)
    # With one shard at a time, a request from shard 1 means shard 0 has been committed.
    assert server.arrived.wait(180), "the download never reached shard 1"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    layout = DatasetLayout(root)
    assert layout.committed_shards(STAGE) == ["shard-000000"]
    stamp = layout.stats(STAGE, "shard-000000").stat().st_mtime_ns
    server.release.set()

    result = run_cli(*args, ray_address=ray_address)
    assert result.returncode == 0, result.stderr
    assert layout.committed_shards(STAGE) == ["shard-000000", "shard-000001", "shard-000002"]
    assert layout.stats(STAGE, "shard-000000").stat().st_mtime_ns == stamp, "committed shard was not redone"
    assert [server.count(f"/file/{i}.jpg") for i in range(3)] == [1, 1, 1]
    keys = []
    for shard in layout.committed_shards(STAGE):
        keys += [r["key"] for r in pq.read_table(layout.status_table(STAGE, shard)).to_pylist()]
    assert keys == [f"{i:09d}" for i in range(9)], "every row recorded exactly once, in order"
    for modality in ("rgb", "caption"):
        tars = sorted(str(p) for p in (root / modality).glob("shard-*.tar"))
        assert len(tars) == 3
        assert [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)] == keys


def test_private_addresses_are_refused_with_no_profile_and_with_the_demo_profile(ray_address, server, tmp_path):
    urls = tmp_path / "urls.tsv"
    urls.write_text(f"{server.add('a.jpg', large_jpeg((320, 240)))}\tloopback\nhttp://169.254.169.254/latest\tmetadata\n")
    for profile in ([], ["--profile", "demo"]):
        out = tmp_path / f"data{len(profile)}"
        result = run_cli("download", "--input", str(urls), "--output", str(out), *profile, ray_address=ray_address)
        assert result.returncode == 0, result.stderr
        rows = pq.read_table(out / "_status/download/shard-000000.parquet").to_pylist()
        assert [r["status"] for r in rows] == ["private_host", "private_host"], (profile, rows)
        assert server.count("/file/a.jpg") == 0


def test_label_with_no_profile_uses_the_real_models_and_fails_at_once_without_them(tmp_path):
    from tests.helpers import make_labelled_input

    make_labelled_input(tmp_path / "data")
    result = run_cli("label", "--data", str(tmp_path / "data"))
    assert result.returncode == 2
    assert "label.models.depth = 'models/omnidata/depth': no such folder" in result.stderr
    assert "python -m pipeline convert-omnidata" in result.stderr
    assert not (tmp_path / "data" / "depth").exists() and not (tmp_path / "data/_status/label_depth").exists()


def test_the_command_line_imports_only_the_stage_it_runs():
    """Parsing the command line imports no stage, Prefect, hub library or torch (the modalities' model code, 3 s
    that `up`, `down` and `services` need not wait for): each command imports its own stage."""
    code = ("import sys; from pipeline.cli import build_parser; build_parser().parse_args(['status', '--data', '.']); "
            "print(sorted(m for m in ('prefect', 'timm', 'open_clip', 'stages.fourm.pretrain', 'stages.label.label', "
            "'stages.transfer.transfer', 'pipeline.demo', 'pipeline.flows', 'torch', 'transformers') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    # the help still names the registry's modalities, read when it is shown
    for command, listed in (("label", "depth,normal,semseg,clip,det"), ("train-tokenizer", "text, rgb, depth")):
        shown = subprocess.run([sys.executable, "-m", "pipeline", command, "--help"], capture_output=True, text=True,
                               timeout=120, check=False)
        assert listed in " ".join(shown.stdout.split()), shown.stdout


def test_every_converter_names_the_bad_file_and_what_is_wrong(tmp_path, capsys):
    """A cut-short config.json and a corrupt model.safetensors, given to each converter: exit 2, the file named
    with what is wrong with it, no traceback (before: a bare 'Expecting value: line 2 column 1', or a safetensors
    traceback and exit 1)."""
    from pipeline.cli import main

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text('{"dec_type": "cnn",\n')
    (cut / "model.safetensors").write_bytes(b"")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"dec_type": "cnn", "domains_in": ["rgb@224"]}')
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    ckpt = tmp_path / "omnidata_dpt_depth_v2.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 cut short")
    out = tmp_path / "out"
    cases = [  # (arguments, the file the message must name, what it must say)
        (["convert-tokenizer", "--checkpoint", str(cut), "--modality", "rgb", "--out", str(out)],
         cut / "config.json", "not valid JSON"),
        (["convert-tokenizer", "--checkpoint", str(corrupt), "--modality", "rgb", "--out", str(out)],
         corrupt / "model.safetensors", "not a readable safetensors file"),
        (["convert-4m", "--checkpoint", str(cut), "--out", str(out)], cut / "config.json", "not valid JSON"),
        (["convert-4m", "--checkpoint", str(corrupt), "--out", str(out)],
         corrupt / "model.safetensors", "not a readable safetensors file"),
        (["convert-omnidata", "--checkpoint", str(ckpt), "--task", "depth", "--out", str(out)], ckpt,
         "cannot read checkpoint"),
    ]
    for args, named, says in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert str(named) in err and says in err, (args, err)
        assert "Traceback" not in err
    assert not out.exists(), "nothing written"
