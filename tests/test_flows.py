"""The Prefect side against a real (temporary) Prefect API server."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import UNSCORED, large_jpeg


def url_list(server, tmp_path, n=5):
    jpeg = large_jpeg((900, 700))
    lines = [f"{server.add(f'{i}.jpg', jpeg)}\tphoto {i}" for i in range(n)] + [f"{server.base}/status/404\tgone"]
    path = tmp_path / "urls.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def allow(server) -> str:
    """The test server's host:port let through the private-address guard, by name."""
    return f"download.allowed_hosts=['127.0.0.1:{server.server_address[1]}']"



@pytest.fixture(scope="module")
def served(prefect_api, ray_address):
    """`python -m pipeline serve` against the test's Prefect API, the deployments registered up front; one server
    for the module's deployment runs (it takes seconds to start)."""
    from pipeline.deployments import deployments

    for deployment in deployments():  # registered up front; `serve` upserts the same ones and polls for runs
        deployment.apply()
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "RAY_ADDRESS": ray_address, "HF_HUB_OFFLINE": "1",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    serve = subprocess.Popen([sys.executable, "-m", "pipeline", "serve"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield
    serve.terminate()
    serve.wait(timeout=60)


def test_download_flow_publishes_progress_table_and_summary(prefect_api, ray_address, server, tmp_path):
    from prefect.artifacts import Artifact

    from pipeline.flows import download_flow

    result = download_flow(input=str(url_list(server, tmp_path)), output=str(tmp_path / "data"), profile="demo",
                           overrides=["download.shard_size=2", allow(server)])
    assert result["status_counts"] == {"ok": 5, "http_error": 1} and result["shards_done"] == 3
    progress = Artifact.get("download-progress")
    assert progress.type == "progress" and float(progress.data) == 100.0
    table = Artifact.get("download-shards")
    rows = json.loads(table.data)
    assert [r["shard"] for r in rows] == ["shard-000000", "shard-000001", "shard-000002"]
    assert sum(r["ok"] for r in rows) == 5 and rows[2]["failed"] == 1
    assert all(r["node"].startswith(socket.gethostname() + "/") for r in rows)  # the machine and Ray node
    summary = Artifact.get("download-summary")
    assert "images/s" in summary.data and "| http_error | 1 |" in summary.data
    assert "**5** of 6 input rows ok" in summary.data and "![throughput](data:image/jpeg;base64," in summary.data
    # each worker process: its shards, images, images/s while it worked, its busy share, its failures
    workers = re.findall(r"^\| (\S+ pid \d+) \| (\d+) \| (\d+) \| [\d.]+ \| \d+% \| (\d*) \|$", summary.data, re.M)
    assert sum(int(n) for _, n, _, _ in workers) == 3 and sum(int(i) for _, _, i, _ in workers) == 5
    assert sum(int(f or 0) for *_, f in workers) == 1
    failures = Artifact.get("download-failures")  # each failed row, and how to get them all and retry them
    rows = [(r["key"], r["status"], r["retryable"]) for r in json.loads(failures.data)]
    assert rows == [("000000005", "http_error", "no")]
    assert "python -m pipeline failures --data" in failures.description and "--retry-failed" in failures.description


def polled(read, holds, seconds: float = 60):
    """`read()` once `holds(value)`, or the last value after `seconds`: Prefect's API answers what the flow
    published, and its log handler ships lines in batches every few seconds."""
    deadline = time.monotonic() + seconds
    while True:
        value = read()
        if holds(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)  # the next read of the API; the flow is held by the test server, not by this wait


def test_a_running_stage_shows_each_committed_shard_while_it_runs(prefect_api, ray_address, server, tmp_path):
    """Read through Prefect's API while the download holds its second shard (its last URL kept waiting by the test
    server): the progress bar, its rate and time left, the shards table and the flow run's log already show the
    committed first shard, and the second one's worker has said how far it is within its shard (1 of 2 rows: it
    reports every sample here); the workers table shows both workers, one of them on that shard. Then the held URL
    is let go and the run completes."""
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from pipeline.flows import download_flow

    jpeg = large_jpeg((300, 200))
    rows = [server.add(f"{i}.jpg", jpeg) for i in range(3)] + [f"{server.base}/block/3.jpg"]
    server.files["3.jpg"] = (jpeg, "image/jpeg", {})
    urls = tmp_path / "urls.tsv"
    urls.write_text("".join(f"{url}\tphoto {i}\n" for i, url in enumerate(rows)))
    result = {}
    run = threading.Thread(target=lambda: result.update(download_flow(
        input=str(urls), output=str(tmp_path / "data"), profile="demo",
        overrides=["download.shard_size=2", "download.timeout=300", "download.deadline=300", allow(server),
                   "dashboards.progress_every=1", "dashboards.table_seconds=0",
                   "dashboards.running_table_seconds=0"])))
    run.start()
    try:
        assert server.arrived.wait(120), "the second shard never asked for its held URL"
        progress = polled(lambda: Artifact.get("download-progress"), lambda a: a and a.data and float(a.data) == 75.0)
        assert float(progress.data) == 75.0  # one shard committed, and half of the other
        assert re.fullmatch(r"download: 1 of 2 shards \(1 in progress: shard-000001 1 of 2\), [\d.]+ images/s, "
                            r"about \d+ s left", progress.description), progress.description
        table = polled(lambda: json.loads(Artifact.get("download-shards").data), lambda rows: len(rows) == 2)
        assert [(r["shard"], r["ok"], r["state"]) for r in table] == [("shard-000001", "", "running: 1 of 2"),
                                                                      ("shard-000000", 2, "done")]
        workers_artifact = Artifact.get("download-workers")  # published between commits, by the flow run still
        assert workers_artifact.flow_run_id == progress.flow_run_id
        workers = json.loads(workers_artifact.data)
        assert sorted((w["shards"], w["images"], w["now"]) for w in workers) == [(0, 1, "shard-000001: 1 of 2"),
                                                                                (1, 2, "")], workers
        assert all(re.fullmatch(r"\S+ pid \d+", w["worker"]) for w in workers)

        def log_lines():
            with get_client(sync_client=True) as client:
                return [log.message for log in client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[progress.flow_run_id])))]
        lines = polled(log_lines, lambda found: any("shard-000000 committed" in line for line in found))
        assert any(line.startswith("download: shard-000000 committed (2 of 2 ok on ") for line in lines), lines
        assert not any("shard-000001 committed" in line for line in lines)
    finally:
        server.release.set()
        run.join(300)
    assert result["shards_done"] == 2 and float(Artifact.get("download-progress").data) == 100.0


def test_a_2000_shard_run_keeps_its_artifacts_bounded(prefect_api):
    """The shards table of a 2,000-shard run holds the last shards, the slowest and those with failures, not all
    of them: published to Prefect, it stays under 16 KB and the summary under 2 KB, whatever the number of shards."""
    from prefect.artifacts import Artifact

    from pipeline.reporting import StageReporter

    reporter = StageReporter("scale-stage")
    reporter.start(2000)
    for i in range(2000):  # 200 worker processes, each taking 10 shards of 30 s one after the other
        failed = 3 if i % 250 == 7 else 0
        seconds = 1000.0 if i == 1234 else 30.0
        reporter.record(f"shard-{i:06d}", {"rows": 1000, "ok": 1000 - failed, "seconds": seconds,
                                            "status_counts": {"ok": 1000 - failed, **({"http_error": failed} if failed
                                                                                     else {})},
                                            "images_per_s": 33.3, "node": f"vm/{i % 25:08x}", "worker": 1000 + i % 200,
                                            "started_at": 30.0 * (i // 200), "finished_at": 30.0 * (i // 200) + seconds},
                        False)
    summary = reporter.finish()
    table = Artifact.get("scale-stage-shards")
    shown = [r["shard"] for r in json.loads(table.data)]
    assert len(shown) <= 45 and len(table.data) < 16_000
    workers = Artifact.get("scale-stage-workers")  # the slowest 50 of the 200
    assert len(json.loads(workers.data)) == 50 and len(workers.data) < 8_000
    assert "the 50 slowest of 200" in workers.description
    # the summary: totals, failures, the slowest workers and one picture of images/s over the run
    assert len(summary) < 100_000 and summary.count("![throughput](data:image/jpeg;base64,") == 1
    assert "the 50 slowest of 200 worker processes" in summary
    assert shown[-20:] == [f"shard-{i:06d}" for i in range(1980, 2000)]  # the last to finish
    assert "shard-001234" in shown  # the slowest
    assert {f"shard-{i:06d}" for i in range(7, 2000, 250)} <= set(shown)  # every one with failures
    assert "every shard: `python -m pipeline status`" in table.description
    assert "**1999976** of 2000000 input rows ok" in summary and "| http_error | 24 |" in summary


def test_download_flow_writes_to_object_storage_with_the_profiles_storage_options(prefect_api, ray_address, server,
                                                                                  s3, tmp_path):
    """A flow given an s3:// root and the store's endpoint and keys as `storage_options` (not in the environment):
    the options travel with the root to the Ray workers, the shards land in the bucket, the tables read them."""
    from prefect.artifacts import Artifact

    from pipeline.flows import download_flow

    bucket = s3.make_bucket("flow-download")
    result = download_flow(input=str(url_list(server, tmp_path)), output=f"s3://{bucket}/ds", profile="demo",
                           overrides=["download.shard_size=2", allow(server), f"storage_options={json.dumps(s3.options)}"])
    assert result["status_counts"] == {"ok": 5, "http_error": 1} and result["data_root"] == f"s3://{bucket}/ds"
    assert len(s3.fs().glob(f"{bucket}/ds/rgb/shard-*.tar")) == 3
    assert len(s3.fs().glob(f"{bucket}/ds/_status/download/shard-*.json")) == 3
    rows = json.loads(Artifact.get("download-stages").data)
    assert [(r["stage"], r["shards"], r["ok"]) for r in rows] == [("download", "3/3", 5)]


def test_download_flow_rejects_bad_configuration_before_work(prefect_api, tmp_path):
    from core.config import ConfigError
    from pipeline.flows import download_flow

    with pytest.raises(ConfigError, match="unknown key 'download.shard_sise'"):
        download_flow(input=str(tmp_path / "x.tsv"), output=str(tmp_path / "data"), profile="demo",
                      overrides=["download.shard_sise=2"])
    assert not (tmp_path / "data").exists()


def test_deployments_cc12m_run_the_paper_profile_and_demo_ones_the_demo():
    from pipeline.deployments import deployments

    made = {f"{d.flow_name}/{d.name}": d.parameters for d in deployments()}
    flows = {"download", "quality", "pseudo-label", "train-tokenizers", "tokenize", "pretrain", "evaluate",
             "cc12m-pipeline"}
    transfers = {"transfer/imagenet1k", "transfer/ade20k", "transfer/nyuv2"}
    generate = {"generate/cc12m", "generate/demo"}
    stages = {f"{f}/{n}" for f in flows for n in ("cc12m", "demo")}
    assert set(made) == stages | transfers | {"transfer/demo"} | generate
    for name in ("cc12m", "demo"):
        assert made[f"generate/{name}"] == {"requests": f"data/{name}/generate/requests.jsonl",
                                            "model": f"data/{name}/pretrain", "tokenizers": f"data/{name}/tokenizers",
                                            "out": f"data/{name}/pretrain/generations"}
    assert {made[t]["task"] for t in transfers} == {"classification", "segmentation", "depth"}
    assert all(made[t]["profile"] == "paper" and made[t]["model"] == "data/cc12m/pretrain" for t in transfers)
    assert made["transfer/demo"]["profile"] == "demo" and made["transfer/demo"]["model"] == "data/demo/pretrain"
    for flow in flows:
        assert made[f"{flow}/cc12m"]["profile"] == "paper" and made[f"{flow}/demo"]["profile"] == "demo"
        assert "data/cc12m" in made[f"{flow}/cc12m"].values() and "data/demo" in made[f"{flow}/demo"].values()
    assert made["cc12m-pipeline/cc12m"]["input"] == "data/cc12m.tsv" and made["cc12m-pipeline/demo"]["input"] == "demo"


def run_artifacts(flow_run_id, key: str) -> list:
    """Every version of an artifact that a flow run published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def labelled(served, tiny_models, tmp_path_factory):
    """`prefect deployment run pseudo-label/demo` served, on two shards with one corrupt image: the run and its
    labelled dataset, which the next tests read (show) or copy (the tokenizer flows)."""
    from prefect.deployments import run_deployment

    from tests.helpers import make_labelled_input

    data = tmp_path_factory.mktemp("labelled") / "data"
    make_labelled_input(data)
    run = run_deployment("pseudo-label/demo", timeout=400, poll_interval=1, parameters={
        "data": str(data), "overrides": [f"label.models={tiny_models}", *UNSCORED], "pictures": 2})
    return run, data


def test_pseudo_label_deployment_runs_when_served(labelled):
    """`prefect deployment run pseudo-label/demo`: labels, per-labeler progress and sample pictures."""
    from prefect.artifacts import Artifact

    run, data = labelled
    assert run.state.is_completed(), run.state
    for name in ("depth", "normal", "semseg", "det", "clip", "color_palette"):  # the demo's 4M-21 palette too
        assert sorted(p.name for p in (data / name).glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
        assert float(Artifact.get(f"pseudo-label-{name.replace('_', '-')}-progress").data) == 100.0
    pictures = Artifact.get("pseudo-label-samples").data
    assert pictures.count("data:image/jpeg;base64,") == 2 and len(pictures) < 2 * 150_000  # thumbnails
    # the first labelled shard's pictures came while the run went on, before its summary; then the end's
    versions = run_artifacts(run.id, "pseudo-label-samples") + run_artifacts(run.id, "pseudo-label-summary")
    assert [a.key for a in sorted(versions, key=lambda a: a.created)] == [
        "pseudo-label-samples", "pseudo-label-summary", "pseudo-label-samples"]
    assert "| depth:decode_error | 1 |" in Artifact.get("pseudo-label-summary").data
    failed = json.loads(Artifact.get("pseudo-label-failures").data)
    assert {r["stage"] for r in failed} >= {"label_depth"} and all(r["status"] == "decode_error" for r in failed)
    shards = json.loads(Artifact.get("pseudo-label-shards").data)
    assert [r["shard"] for r in shards] == ["shard-000000", "shard-000001"]
    assert all(0 <= r["waiting for device"] <= 1 and 0 <= r["waiting for decode"] <= 1 for r in shards)
    assert all(r["images/batch"].startswith("depth ") for r in shards)


def test_quality_deployment_scores_when_served(served, tmp_path):
    """`prefect deployment run quality/demo`: every photo scored by the demo's tiny networks (saved where the
    overrides say), the shards table and the summary published, the failure by reason."""
    from prefect.artifacts import Artifact
    from prefect.deployments import run_deployment

    from tests.helpers import make_labelled_input

    data = tmp_path / "data"
    make_labelled_input(data)
    models = [f"quality.{setting}={tmp_path / 'quality' / folder}" for setting, folder in
              (("clip_model", "image_text"), ("aesthetic_model", "aesthetic"), ("watermark_model", "watermark"))]
    run = run_deployment("quality/demo", timeout=400, poll_interval=1, parameters={"data": str(data),
                                                                                   "overrides": [*models, *UNSCORED]})
    assert run.state.is_completed(), run.state
    assert sorted(p.name for p in (data / "quality").glob("shard-*.parquet")) == ["shard-000000.parquet",
                                                                                 "shard-000001.parquet"]
    assert (data / "quality" / "near_duplicates.parquet").is_file()  # every shard scored: compared
    assert "| decode_error | 1 |" in Artifact.get("quality-summary").data
    assert [r["shard"] for r in json.loads(Artifact.get("quality-shards").data)] == ["shard-000000", "shard-000001"]
    scores = Artifact.get("quality-scores").data
    assert "Thresholds: none set" in scores and scores.count("data:image/jpeg;base64,") == 1


def test_show_draws_a_labelled_sample(labelled, tmp_path):
    from PIL import Image

    from pipeline.cli import main

    data = labelled[1]
    out = tmp_path / "sample.png"
    assert main(["show", "--data", str(data), "--key", "000000002", "--out", str(out)]) == 0
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.width > 5 * picture.height  # six panels side by side
    assert main(["show", "--data", str(data), "--key", "000000003", "--out", str(out)]) == 2


def clip_labels_only(labelled: Path, data: Path) -> Path:
    """A copy of the labelled dataset with only its clip labels (the other labelers never ran there)."""
    kept = {"rgb", "caption", "clip", "_status", "download", "label_clip"}
    shutil.copytree(labelled, data, ignore=lambda folder, names: [
        n for n in names if Path(folder) in (labelled, labelled / "_status") and n not in kept])
    return data


def test_tokenizer_flows_publish_results_pictures_and_token_rates(labelled, tmp_path):
    from prefect.artifacts import Artifact

    from pipeline.flows import tokenize_flow, train_tokenizers_flow

    data = clip_labels_only(labelled[1], tmp_path / "data")
    overrides = ["tokenizer.epochs=2", "tokenizer.batch_size=2", *UNSCORED]
    result = train_tokenizers_flow(data=str(data), profile="demo", modalities=["text", "clip"], overrides=overrides)
    assert set(result["tokenizers"]) == {"text", "clip"}
    rows = json.loads(Artifact.get("train-tokenizers-results").data)
    assert [r["tokenizer"] for r in rows] == ["text", "clip"] and "codes_used" in rows[1]
    # the metric beside what a tokenizer that learned nothing scores
    assert rows[1]["metric"] == "cosine" and rows[1]["baseline is"] == "mean feature"
    assert -1 <= rows[1]["value"] <= 1 and -1 <= rows[1]["baseline"] <= 1
    assert float(Artifact.get("train-tokenizers-progress").data) == 100.0
    assert Artifact.get("train-tokenizers-reconstructions").data.count("data:image/jpeg;base64,") == 1

    result = tokenize_flow(data=str(data), profile="demo", overrides=overrides)
    assert result["shards_done"] == 2 and result["status_counts"]["clip"] == {"ok": 4, "decode_error": 1}
    assert "tokens/s** written" in Artifact.get("tokenize-summary").data
    assert sum(r["tokens"] for r in json.loads(Artifact.get("tokenize-shards").data)) == result["tokens"] > 0


def test_stage_tasks_retry_infrastructure_failures_but_not_bad_configuration(prefect_api):
    import ray.exceptions
    from prefect import flow, task

    from core.config import ConfigError, load_config
    from pipeline.flows import ShardsFailed, retry_on_infrastructure

    calls = {"lost": 0, "config": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_on_infrastructure)
    def loses_a_worker_once():
        calls["lost"] += 1
        if calls["lost"] == 1:
            raise ray.exceptions.WorkerCrashedError()
        if calls["lost"] == 2:
            raise ShardsFailed("pseudo-label: 1 shards failed")
        return "done"

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_on_infrastructure)
    def badly_configured():
        calls["config"] += 1
        load_config("demo", ["label.batch_size=0"])

    @flow
    def pipeline_like():
        outcome = loses_a_worker_once()
        with pytest.raises(ConfigError):
            badly_configured()
        return outcome

    assert pipeline_like() == "done"
    assert calls == {"lost": 3, "config": 1}


def test_a_run_with_nothing_to_do_says_so_instead_of_a_rate(prefect_api):
    from pipeline.reporting import StageReporter

    stats = {"rows": 4, "ok": 4, "status_counts": {"ok": 4}, "images_per_s": 2.0, "seconds": 2.0}
    idle = StageReporter("idle-stage")
    idle.start(2)
    for shard in ("shard-000000", "shard-000001"):
        idle(shard, stats, True)
    summary = idle.finish()
    assert "**nothing to do**: all 2 shards were already committed" in summary and "images/s" not in summary

    busy = StageReporter("busy-stage")
    busy.start(3)
    busy("shard-000000", stats, True)
    busy("shard-000001", stats, False)
    busy.in_progress({"shard-000002": {"done": 1, "total": 4, "worker": "vm/1 pid 7", "since": time.time()}})
    busy.failed("shard-000002", "RayTaskError: out of memory")  # out of the shards in progress, counted apart
    assert re.fullmatch(r"busy-stage: 2 of 3 shards, 1 failed \(redone on the next run\), [\d.]+ images/s, "
                        r"about 0 s left", busy.progress_line())
    summary = busy.finish()
    assert "images/s** in this run (1 shards done, 1 already committed)" in summary

    # samples the quality thresholds dropped are counted apart, never as failures (label's "depth:filtered")
    filtering = StageReporter("filtering-stage")
    filtering.start(1)
    filtering("shard-000000", {"rows": 5, "ok": 3, "status_counts": {"ok": 3, "depth:filtered": 2},
                               "filtered_by": {"min_clip_score": 2}, "labelers": {}, "seconds": 1.0}, False)
    summary = filtering.finish()
    assert "**3** of 5 input rows ok, 2 dropped by the quality filters" in summary and "filtered |" not in summary
    assert "| none | 0 |" in summary


def test_pretrain_flow_publishes_progress_losses_and_pictures(prefect_api, ray_address, tmp_path):
    from prefect.artifacts import Artifact

    from pipeline.flows import pretrain_flow
    from tests.test_pretrain import SETTINGS, dataset

    data = dataset(tmp_path / "data")
    result = pretrain_flow(data=str(data), profile="paper", overrides=[*SETTINGS, "pretrain.workers=0"])  # in process
    assert result["steps"] == 6 and result["final"]["step"] == 6
    assert float(Artifact.get("pretrain-progress").data) == 100.0
    rows = json.loads(Artifact.get("pretrain-losses").data)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and "loss.tok_rgb@224" in rows[0]
    assert "val_loss.caption" in rows[2]
    assert Artifact.get("pretrain-pictures").data.count("data:image/jpeg;base64,") == 2  # losses, predictions


def test_transfer_and_evaluate_flows_publish_scores_beside_their_references(prefect_api, ray_address, tmp_path):
    from prefect.artifacts import Artifact

    from pipeline.flows import evaluate_flow, transfer_flow
    from tests.test_transfer import SETTINGS, TASK, classification_folders, tiny_fourm

    train, val = classification_folders(tmp_path / "colours")
    settings = json.dumps({**TASK, "epochs": 2, "randaugment": None, "mixup": 0.0, "cutmix": 0.0})
    results = transfer_flow(task="classification", train=str(train), val=str(val),
                            model=str(tiny_fourm(tmp_path / "fourm")), profile="demo",
                            overrides=[*SETTINGS, f"transfer.classification={settings}"])
    rows = json.loads(Artifact.get("transfer-results").data)
    top1 = next(r for r in rows if r["metric"] == "top1")
    assert top1["ours"] == round(results["metrics"]["top1"], 3) and top1["paper 4M-B"] == 84.5
    assert next(r for r in rows if r["metric"] == "top5")["paper 4M-B"] is None
    assert Artifact.get("transfer-curves").data.count("data:image/jpeg;base64,") == 1

    from tests.test_evaluate import evaluation_dataset

    root, _ = evaluation_dataset(tmp_path / "evaluate")
    evaluate_flow(data=str(root), model=str(root / "model"), samples=2, profile="paper",
                  overrides=["pretrain.modalities=[rgb@224, tok_rgb@224, caption, det]", "pretrain.val_batches=1",
                             "pretrain.input_tokens=32", "pretrain.target_tokens=32"])
    scores = json.loads(Artifact.get("evaluate-scores").data)
    assert {(r["modality"], r["metric"]) for r in scores} >= {("depth", "delta1"), ("depth", "standardised_l1"),
                                                               ("tok_rgb@224", "masked validation loss")}
    assert Artifact.get("evaluate-pictures").data.count("data:image/jpeg;base64,") == 1


def test_generate_deployment_runs_when_served(served, tmp_path):
    """`prefect deployment run generate/demo`: a JSONL file of requests, every sample's files and a pictures
    artifact."""
    from prefect.artifacts import Artifact
    from prefect.deployments import run_deployment

    from tests.test_generate import generation_assets

    assets = generation_assets(tmp_path)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"name": "from-caption", "conditions": {"caption": "a red bus on a street"},
         "targets": ["tok_clip", "tok_rgb"], "steps": 3, "cfg": 2.0, "samples": 2},
        {"name": "from-photo", "conditions": {"rgb": str(assets / "photo.jpg")}, "targets": ["caption", "tok_depth"],
         "steps": 3}]) + "\n")
    run = run_deployment("generate/demo", timeout=300, poll_interval=1, parameters={
        "requests": str(requests), "model": str(assets / "model"), "tokenizers": str(assets / "tokenizers"),
        "out": str(tmp_path / "out")})
    assert run.state.is_completed(), run.state
    grids = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").glob("*/*/grid.png"))
    assert grids == ["from-caption/sample-0/grid.png", "from-caption/sample-1/grid.png",
                     "from-photo/sample-0/grid.png"]
    assert (tmp_path / "out/from-photo/sample-0/caption.txt").is_file()
    assert Artifact.get("generate-pictures").data.count("data:image/jpeg;base64,") == 3
    rows = json.loads(Artifact.get("generate-samples").data)
    assert [(r["request"], r["sample"]) for r in rows] == [("from-caption", 0), ("from-caption", 1), ("from-photo", 0)]


def test_the_summary_has_a_table_per_node_where_several_made_shards():
    from pipeline.status import node_shares

    done = [{"ok": 4, "started_at": 0.0, "finished_at": 2.0, "node": "gpu-1/a1b2c3d4"},
            {"ok": 2, "started_at": 1.0, "finished_at": 3.0, "node": "gpu-2/e5f6a7b8"},
            {"ok": 3, "started_at": 2.0, "finished_at": 3.0, "node": "gpu-1/a1b2c3d4"}]
    assert node_shares(done, {"gpu-1/a1b2c3d4"}) == [
        {"node": "gpu-1/a1b2c3d4", "shards": 2, "samples": 7, "samples_per_s": 2.33, "now": "alive"},
        {"node": "gpu-2/e5f6a7b8", "shards": 1, "samples": 2, "samples_per_s": 1.0, "now": "gone"}]
    assert node_shares(done)[0]["now"] is None  # off Ray: whether a node is alive is not known
    from pipeline.reporting import node_table

    assert node_table(done)[1] == "| node | shards | samples | samples/s | now |" and len(node_table(done)) == 5
    assert node_table(done[:1]) == []  # one machine: no table