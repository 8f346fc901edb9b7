import json
import os
import re
import subprocess
import sys

import pytest

from core.storage import data_path, read_parquet

SHORT_TOKENIZER_RUNS = {"rgb": 30, "normal": 30, "semseg": 10, "canny_edge": 20}


@pytest.mark.timeout(1500)  # about 2 minutes alone, 4 beside other tests; room for a loaded machine
def test_demo_on_object_storage_downloads_labels_tokenizes_and_verifies_the_bundled_photos(ray_address, s3,
                                                                                           tmp_path):
    """`make demo` with DATA=s3://...: every stage, from the download to the generations, reads and writes the
    bucket on the loopback S3 server through the standard credential chain; nothing lands in the local folder."""
    bucket = s3.make_bucket("demo-chain")
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    env = {**os.environ, **s3.env, "RAY_ADDRESS": ray_address, "FOURM_SCRATCH": str(scratch)}
    models = {n: str(tmp_path / "models" / n) for n in ("depth", "normal", "semseg", "det", "clip")}
    # The demo's own tokenizer budgets (rgb 600 steps, normals 300, segmentation 50, Canny edges 100) make the
    # pictures a user wants and take over 3 of the demo's minutes; here each runs a few steps, as the path is what
    # this test checks (test_tokenizer_quality checks that each tokenizer learns).
    short = [f"tokenizer.epochs_by_modality.{name}={steps}" for name, steps in SHORT_TOKENIZER_RUNS.items()]
    quality = [f"quality.{setting}={tmp_path / 'models' / 'quality' / folder}" for setting, folder in
               (("clip_model", "image_text"), ("aesthetic_model", "aesthetic"), ("watermark_model", "watermark"))]
    result = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--output", f"s3://{bucket}/demo",
                             "--set", f"label.models={models}", *(x for o in short + quality for x in ("--set", o))],
                            env=env, cwd=work, capture_output=True, text=True, timeout=1450)
    assert result.returncode == 0, result.stderr
    assert list(work.iterdir()) == [], "nothing written to the local working folder"
    assert [p for p in (scratch / "fourm-scratch").glob("[0-9]*/*")] == [], "no upload left in scratch space"
    demo = data_path(f"s3://{bucket}/demo", s3.options)
    tables = sorted(demo.glob("_status/download/shard-*.parquet"), key=str)
    rows = [row for table in tables for row in read_parquet(table).to_pylist()]
    statuses = [r["status"] for r in sorted(rows, key=lambda r: r["key"])]
    assert statuses == ["ok"] * 9 + ["http_error", "not_an_image", "duplicate", "invalid_row"]
    assert "9 images in" in result.stdout and "rgb/shard-*.tar" in result.stdout
    assert len(list((demo / "rgb").glob("shard-*.tar"))) == 3
    for name in models:  # labelled with random-weight models saved where the profile says
        assert len(list((demo / name).glob("shard-*.tar"))) == 3
        assert (tmp_path / "models" / name / "config.json").is_file()
        assert f"{name:7} ok 7, filtered 2" in result.stdout
    assert len(list((demo / "show").glob("*.png"))) == 7
    # every photo scored before labelling (tiny networks of the real classes, the CLIP fitted to the photos' own
    # captions): the motorcycle listed with the cat's caption and the rocket's re-encoded copy are dropped, and why
    scores = [row for table in sorted(demo.glob("quality/shard-*.parquet"), key=str)
              for row in read_parquet(table, ["key", "clip_score", "aesthetic", "watermark"]).to_pylist()]
    assert len(scores) == 9 and all(r["aesthetic"] is not None and 0 <= r["watermark"] <= 1 for r in scores)
    assert re.search(r"^000000007 .* dropped: clip_score 0\.\d+ < quality\.min_clip_score 0\.8$", result.stdout, re.M)
    assert re.search(r"^000000008 .* dropped: near duplicate of 000000003 \(cosine 1\.000 >= quality\.dedup 0\.95\)$",
                     result.stdout, re.M)
    assert len(re.findall(r"^0000000\d\d .*  kept$", result.stdout, re.M)) == 7
    labelled = [row for table in sorted(demo.glob("_status/label_clip/shard-*.parquet"), key=str)
                for row in read_parquet(table, ["key", "status"]).to_pylist()]
    assert [r["key"] for r in labelled if r["status"] == "filtered"] == ["000000007", "000000008"]
    assert re.search(r"label: 100%.*images=7, failed=0, filtered=2", result.stderr)  # dropped, not failed
    from stages.tokenizers.tokenizer_data import read_members

    metadata = [json.loads(data) for tar in sorted(demo.glob("metadata/shard-*.tar"), key=str)
                for _, data in read_members(tar, "json")]
    assert len(metadata) == 7 and all({"watermark_score", "aesthetic_score"} <= set(m) for m in metadata)
    # and 4M-21's weight-free modalities, which the demo profile names
    for name in ("canny_edge", "color_palette", "metadata"):
        assert len(list((demo / name).glob("shard-*.tar"))) == 3 and f"{name} ok 7" in result.stdout

    # tiny tokenizers trained, every sample tokenized, the dataset verified, reconstructions drawn
    assert (demo / "tokenizers/text/tokenizer.json").is_file()
    for name in ("rgb", "depth", "normal", "semseg", "clip", "canny_edge"):
        assert len(list((demo / f"tok_{name}@224").glob("shard-*.tar"))) == 3
        assert (demo / "tokenizers" / name / "reconstructions.png").is_file()
    assert len(list((demo / "crop_settings").glob("shard-*.tar"))) == 3
    assert "0 problems" in result.stdout and "reconstructions (inputs above" in result.stdout
    rgb = json.loads((demo / "tokenizers/rgb/train.json").read_text())["final"]
    assert rgb["step"] == SHORT_TOKENIZER_RUNS["rgb"]
    assert f"psnr_db {rgb['psnr_db']:.4g} (mean-colour image: {rgb['psnr_db_baseline']:.4g})" in result.stdout
    # a tiny 4M pretrained on the demo tokens, its predictions from RGB drawn
    pretrained = json.loads((demo / "pretrain/train.json").read_text())
    assert pretrained["final"]["step"] == 60 and pretrained["final"]["loss"] < pretrained["first"]["loss"]
    final = pretrained["final"]  # a mixture: the photos' dataset and a caption-only text file on the store
    assert {f"val_loss.photos.tok_{m}@224" for m in ("rgb", "depth", "normal", "semseg", "clip")} <= set(final)
    assert {"val_loss.photos.color_palette", "val_loss.photos.tok_canny_edge@224", "val_loss.photos.metadata"} <= set(final)
    assert final["samples.photos"] + final["samples.captions"] == 60 * 8 and final["samples.captions"] > 0
    assert f"captions: {final['samples.captions']} samples seen" in result.stdout
    assert (demo / "corpus/captions.jsonl").is_file()
    saved = json.loads((demo / "pretrain/config.json").read_text())
    assert saved["modality_modules"] == ["models.modalities_4m21"]  # loading the model imports the module
    assert (demo / "pretrain/predictions.png").is_file() and "predictions from RGB alone" in result.stdout
    # its checkpoint on the store: one complete checkpoint, named by the pointer written after it
    assert json.loads((demo / "pretrain/checkpoint.json").read_text())["step"] == 60
    assert [p.name for p in (demo / "pretrain").glob("checkpoint-*")] == ["checkpoint-000000060"]
    # and scored out of the box against the held-out shard's pseudo labels
    evaluation = json.loads((demo / "pretrain/evaluation/results.json").read_text())
    assert set(evaluation["scores"]) == {"depth", "normal", "semseg"} and evaluation["samples"] >= 1
    assert "out of the box, from RGB alone" in result.stdout and "mean_angle_deg" in result.stdout
    # and its encoder fine-tuned on colour classes through the transfer command's path
    transfer = json.loads((demo / "pretrain/transfer-classification/results.json").read_text())
    assert transfer["metrics"]["top1"] >= 50 and "classification transfer: top1" in result.stdout  # chance: 25
    # and generating every modality from one caption and from one photo, the pictures' paths printed
    generated = json.loads((demo / "pretrain/generations/results.json").read_text())["requests"]
    assert [r["name"] for r in generated] == ["from-caption", "from-photo"]
    from_caption, from_photo = (r["samples"][0] for r in generated)
    made_21 = {"canny_edge", "color_palette", "metadata"}  # the demo's 4M-21 modalities too
    assert {"clip", "rgb", "depth", "normal", "semseg", "det", *made_21} <= set(from_caption)
    assert {"caption", "det", "clip", "rgb", "depth", "normal", "semseg", *made_21} <= set(from_photo)
    for sample in (from_caption, from_photo):
        assert data_path(sample["grid"], s3.options).is_file() and sample["grid"] in result.stdout
    assert (demo / "generate/requests.jsonl").is_file()
    clip = json.loads((demo / "tokenizers/clip/train.json").read_text())["final"]
    assert clip["cosine"] > clip["cosine_baseline"]  # the random CLIP's maps do vary, unlike depth and normals

    # only our own progress, results and errors: none of Ray's internal notices
    output = result.stdout + result.stderr
    for noise in ("core_worker.cc", "PreemptionWatcher", "TrainController", "authentication_token_setup",
                  "Setting up process group", "Started training worker group", "Traceback"):
        assert noise not in output, noise
    assert "[rgb] step" in output and "[4M] step" in output  # the trainers' own progress lines come through
    # the private-address guard held: the demo server's own host:port was the one let through
    download = json.loads((demo / "_status/download/shard-000000.json").read_text())
    settings = download["provenance"]["config"]
    assert settings["allow_private_hosts"] is False and len(settings["allowed_hosts"]) == 1
    assert settings["allowed_hosts"][0].startswith("127.0.0.1:")
    # provenance: every label and token shard says what made it, and the demo's labels say they are random
    for name in models:
        made = json.loads((demo / "_status" / f"label_{name}" / "shard-000000.json").read_text())
        assert made["provenance"]["models"][name]["random_weights"] is True
    tokens = json.loads((demo / "_status/tokenize_rgb/shard-000000.json").read_text())["provenance"]
    assert len(tokens["models"]["rgb"]["weights_sha256"]) == 64 and tokens["config"]["n_crops"] == 2

    # `status` reads the same bucket: every stage's shards, the tokenizers and the 4M run
    status = subprocess.run([sys.executable, "-m", "pipeline", "status", "--data", f"s3://{bucket}/demo"], env=env,
                            cwd=work, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^tokenize_rgb\s+3/3\s+7\s", status.stdout, re.M), status.stdout
    assert re.search(r"^rgb\s+trained \(30 steps\)", status.stdout, re.M) and "60/60" in status.stdout
    verify = subprocess.run([sys.executable, "-m", "pipeline", "verify", "--data", f"s3://{bucket}/demo"], env=env,
                            cwd=work, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and "x 18 folders" in verify.stdout and ": OK" in verify.stdout, verify.stdout
