"""Operations: `make up`, a pipeline stopped mid-run and resumed by `prefect deployment run`, `make down`, against
real services (one test: the end-to-end flow is the suite's second-longest run after the demo)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stages.dataset.shards import DatasetLayout

SMALL = ["modalities=[]",  # 4M's seven only: the demo's 4M-21 ones have their own tests
         "tokenizer.modalities=[text, clip]", "tokenizer.epochs=2", "tokenizer.batch_size=2",
         "pretrain.modalities=[rgb@224, tok_clip@224, caption, det]", "pretrain.steps=4", "pretrain.log_every=2",
         "pretrain.val_every=4", "pretrain.checkpoint_every=2", "pretrain.loader_workers=0"]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_files(root: Path, folders, pattern: str = "shard-*") -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every committed shard file and commit marker: unchanged means not redone."""
    files = {}
    for folder in folders:
        for path in sorted((root / folder).glob(pattern)):
            files[str(path.relative_to(root))] = (path.stat().st_ino, path.stat().st_mtime_ns)
    return files


FOLDERS_BEFORE_THE_STOP = ["rgb", "caption", "depth", "normal", "semseg", "det", "clip", "_status/download",
                           "_status/label_clip"]


@pytest.mark.timeout(1200)
def test_up_stop_and_resume_the_pipeline_deployment_down(tmp_path):
    """The README's loop on real services: make up; the end-to-end flow killed while it trains a tokenizer;
    prefect deployment run cc12m-pipeline/demo --watch resumes it without redoing a committed shard; make down."""
    env = {**os.environ, "PIPELINE_SERVICES_DIR": str(tmp_path / "services"), "PREFECT_PORT": str(free_port()),
           "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port()), "TENSORBOARD_PORT": str(free_port()),
           "RAY_CLIENT_PORT": str(free_port()), "TENSORBOARD_LOGDIR": str(tmp_path / "data")}
    env.pop("RAY_ADDRESS", None)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1200)"], start_new_session=True)
    try:
        up = subprocess.run([sys.executable, "-m", "pipeline", "up"], env=env, capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, up.stderr
        token_file = tmp_path / "services" / "ray_auth_token"
        assert f"Ray dashboard:  http://127.0.0.1:{env['RAY_DASHBOARD_PORT']} (sign in: paste the token in " \
               f"{token_file} into its page)" in up.stdout
        assert f"Prefect UI:     http://127.0.0.1:{env['PREFECT_PORT']}" in up.stdout
        tensorboard = f"http://127.0.0.1:{env['TENSORBOARD_PORT']}"
        assert f"TensorBoard:    {tensorboard} ({tmp_path / 'data'})" in up.stdout
        records = json.loads((tmp_path / "services/services.json").read_text())
        assert set(records) == {"prefect-server", "ray-head", "tensorboard", "deployments"}
        # the head's Ray Client server listens where asked (not on 10001, where another head's may), and up waited
        socket.create_connection(("127.0.0.1", int(env["RAY_CLIENT_PORT"])), timeout=10).close()
        again = subprocess.run([sys.executable, "-m", "pipeline", "up"], env=env, capture_output=True, text=True,
                               timeout=120)
        assert again.stdout.count("already running") == 4  # idempotent: nothing started twice
        assert json.loads((tmp_path / "services/services.json").read_text()) == records
        client = {**env, **{line.split("=", 1)[0][len("export "):]: line.split("=", 1)[1]
                            for line in up.stdout.splitlines() if line.startswith("export ")}}

        data = tmp_path / "data"
        before = stop_the_pipeline_while_it_trains_a_tokenizer(data, client)
        text_tokenizer = shard_files(data, ["tokenizers/text"], "*")
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "cc12m-pipeline/demo", "--watch",
                              "--param", f"data={data}", "--param", f"overrides={json.dumps(SMALL)}"],
                             env=client, capture_output=True, text=True, timeout=700)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
        # resumed: download and labels skipped (their shards untouched), the text tokenizer kept, clip trained
        # download and labels not redone; only the rgb and caption shard that alignment rewrote without the two
        # photos the demo's quality filters dropped (after the stop: tokenize aligns)
        realigned = {f"{folder}/{shard}.tar" for shard in DatasetLayout(data).committed_shards("align")
                     if DatasetLayout(data).read_stats("align", shard)["status_counts"].get("dropped")
                     for folder in ("rgb", "caption")}
        assert realigned == {"rgb/shard-000001.tar", "caption/shard-000001.tar"}
        after = shard_files(data, FOLDERS_BEFORE_THE_STOP)
        assert {k: v for k, v in after.items() if k not in realigned} == \
            {k: v for k, v in before.items() if k not in realigned}, "committed shards were not redone"
        assert shard_files(data, ["tokenizers/text"], "*") == text_tokenizer
        assert (data / "tokenizers/clip/train.json").is_file()
        assert len(list((data / "tok_clip@224").glob("shard-*.tar"))) == 3
        assert (data / "tokenizers/text/tokenizer.json").is_file()
        assert (data / "pretrain/model.safetensors").is_file() and (data / "pretrain/predictions.png").is_file()
        pretrained = json.loads((data / "pretrain/train.json").read_text())
        assert pretrained["steps"] == 4 and pretrained["final"]["step"] == 4 and pretrained["final"]["loss"] > 0
        status = subprocess.run([sys.executable, "-m", "pipeline", "status", "--data", str(data)], env=env,
                                capture_output=True, text=True, timeout=60)
        assert "tokenize_clip" in status.stdout and "3/3" in status.stdout and "trained" in status.stdout
        # TensorBoard, started by `up` on the data folder, serves every training run's curves and pictures
        scalars = tensorboard_answer(f"{tensorboard}/data/plugin/scalars/tags", "pretrain/tensorboard")
        assert {"loss", "loss/caption", "samples_per_s"} <= set(scalars["pretrain/tensorboard"])
        assert "loss" in scalars["tokenizers/clip/tensorboard"]
        images = tensorboard_answer(f"{tensorboard}/data/plugin/images/tags", "tokenizers/clip/tensorboard")
        assert "pictures/reconstructions" in images["tokenizers/clip/tensorboard"]
        # The Ray dashboard: closed to a browser without the token, and with it, it names the pipeline's job (the
        # Prefect flow run), its actors and its tasks (the shard)
        dashboard = f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=10)
        token = token_file.read_text().strip()
        jobs = dashboard_answer(f"{dashboard}/api/jobs/", token)
        assert any(j["metadata"].get("job_name", "").startswith("cc12m-pipeline / ") for j in jobs), jobs
        actors = dashboard_answer(f"{dashboard}/api/v0/actors?limit=1000&detail=1", token)["data"]["result"]["result"]
        assert any(a["repr_name"].startswith("TokenizeWorker (cc12m-pipeline / ") for a in actors)
        tasks = dashboard_answer(f"{dashboard}/api/v0/tasks?limit=10000", token)["data"]["result"]["result"]
        assert {"tokenize shard-000000", "tokenize shard-000002"} <= {t["name"] for t in tasks}
        services = subprocess.run([sys.executable, "-m", "pipeline", "services"], env=env, capture_output=True,
                                  text=True, timeout=60)
        assert services.stdout.count("running (pid") == 4
    finally:
        down = subprocess.run([sys.executable, "-m", "pipeline", "down"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0 and down.stdout.count("stopped (pid") == 4, down.stdout + down.stderr
    # Ray's head signalled first and alone, so its drain could reach the GCS (signalled together with its children,
    # it waited 30 s for a GCS already gone), and drained for `down`'s few seconds, not Ray's 30
    head_log = Path(records["ray-head"]["log"]).read_text()
    assert "Draining for up to 5.0 seconds" in head_log and "Failed to mark the local node as draining" not in head_log
    for record in records.values():
        assert not Path(f"/proc/{record['pid']}").exists() or \
            b"pipeline" not in Path(f"/proc/{record['pid']}/cmdline").read_bytes()
    assert bystander.poll() is None, "down stops only what up started"
    bystander.kill()
    bystander.wait()
    after = subprocess.run([sys.executable, "-m", "pipeline", "services"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert after.stdout.count("stopped") == 4
    with pytest.raises(OSError):  # down stopped TensorBoard too
        urllib.request.urlopen(tensorboard, timeout=5)


def dashboard_answer(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def tensorboard_answer(url: str, run: str, seconds: float = 60) -> dict:
    """TensorBoard's JSON at `url` once it lists `run` (it re-reads its log folder every few seconds)."""
    deadline = time.monotonic() + seconds
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        if run in answer or time.monotonic() > deadline:
            return answer
        time.sleep(1)  # TensorBoard's next reload of its folder; not a synchronisation with our own code


def stop_the_pipeline_while_it_trains_a_tokenizer(data: Path, client: dict) -> dict:
    """Run the end-to-end flow against the services and kill it (driver, Ray workers and all) while its clip
    tokenizer trains; returns the committed shards' (inode, mtime) at that moment."""
    clip = data / "tokenizers" / "clip"
    clip.mkdir(parents=True)
    os.mkfifo(clip / "metrics.jsonl")  # the training worker blocks here at its first log line
    code = ("from pipeline.flows import cc12m_pipeline_flow as f; import sys, json; "
            "f(input='demo', profile='demo', data=sys.argv[1], overrides=json.loads(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(data), json.dumps(SMALL)], env=client,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(clip / "metrics.jsonl", "rb"):
        # Opened: download and labels are committed, the clip tokenizer is training. Stop everything now.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    layout = DatasetLayout(data)
    assert len(layout.committed_shards("download")) == 3 and len(layout.committed_shards("label_clip")) == 3
    assert not (clip / "train.json").exists() and not layout.committed_shards("tokenize_clip")
    assert (data / "tokenizers/text/tokenizer.json").is_file()  # trained before clip: kept on the rerun
    (clip / "metrics.jsonl").unlink()
    return shard_files(data, FOLDERS_BEFORE_THE_STOP)
