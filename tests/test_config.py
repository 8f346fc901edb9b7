import pytest

from core.config import ConfigError, load_config


def test_profiles_load_with_their_settings():
    demo, paper = load_config("demo"), load_config("paper")
    assert demo.profile == "demo" and paper.profile == "paper"
    assert paper.download.shard_size == 1000 and paper.download.max_side == 768
    assert paper.download.jpeg_quality == 95 and not paper.download.allow_private_hosts
    assert demo.download.shard_size < paper.download.shard_size


def test_overrides_and_flags_apply_in_order():
    cfg = load_config("paper", ["download.threads=7", "download.timeout=2.5"], {"download.threads": 9})
    assert cfg.download.threads == 9  # a stage flag wins over --set
    assert cfg.download.timeout == 2.5
    assert load_config("paper", ["download.allowed_hosts=[a.example, 'b.example:8080']"]).download.allowed_hosts == [
        "a.example", "b.example:8080"]


def test_unknown_key_is_named_with_its_source():
    with pytest.raises(ConfigError, match=r"--set download\.thread=3: unknown key 'download\.thread'"):
        load_config("demo", ["download.thread=3"])


def test_bad_value_is_named_with_its_source():
    with pytest.raises(ConfigError, match=r"download\.shard_size = 'many'"):
        load_config("demo", ["download.shard_size=many"])
    with pytest.raises(ConfigError, match=r"--processes 0: download\.processes = 0"):
        load_config("demo", [], {"download.processes": 0})


def test_bad_profile_file_is_named(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("download:\n  max_sid: 512\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown key 'download\.max_sid'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="profile 'nope'.*known profiles: demo, paper"):
        load_config("nope")


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("demo", ["download.threads"])


def test_detector_backend_is_chosen_by_configuration():
    half = load_config("demo", ["label.det_backend=detectron2", "label.det_detectron2_config=vitdet_h.py"])
    with pytest.raises(ConfigError, match=r"needs .*det_detectron2_weights \(now None\)"):
        half.label.resolved_det_backend()
    with pytest.raises(ConfigError, match=r"label\.det_backend = 'vitdet'"):
        load_config("demo", ["label.det_backend=vitdet"])
    assert load_config("demo", ["label.det_backend=transformers"]).label.resolved_det_backend() == "transformers"
    # auto without detectron2's files stays on the transformers detector, wherever detectron2 is installed
    assert load_config("demo").label.resolved_det_backend() == "transformers"


def test_labelers_take_their_own_batch_sizes():
    cfg = load_config("demo", ["label.batch_size=4", "label.batch_sizes={clip: 32, semseg: 8}"]).label
    assert [cfg.batch_size_of(n) for n in ("depth", "semseg", "clip")] == [4, 8, 32]
    with pytest.raises(ConfigError, match=r"batch sizes for unknown labelers \['dpeth'\]"):
        load_config("demo", ["label.batch_sizes={dpeth: 8}"])
    with pytest.raises(ConfigError, match=r"at least 1, got \{'clip': 0\}"):
        load_config("demo", ["label.batch_sizes={clip: 0}"])


def test_no_profile_means_the_paper_settings_and_the_demo_only_where_named():
    from pipeline.cli import build_parser

    default, paper = load_config(), load_config("paper")
    assert default.profile == "paper" and default.model_dump() == paper.model_dump()
    assert default.data_root == "data/cc12m" and not default.download.allow_private_hosts
    assert default.label.models["semseg"] == "facebook/mask2former-swin-base-coco-panoptic"
    parser = build_parser()
    for command in (["download", "--input", "x.tsv"], ["label"], ["train-tokenizer"], ["tokenize"]):
        assert parser.parse_args(command).profile == "paper", command
    assert parser.parse_args(["demo"]).profile == "demo"
    # the demo profile keeps the private-address guard: only its own server is let through, at run time
    demo = load_config("demo")
    assert not demo.download.allow_private_hosts and demo.download.allowed_hosts == []


def test_the_paper21_profile_is_the_paper_profile_with_4m21_s_modalities(tmp_path):

    paper, paper21 = load_config("paper"), load_config("paper21")
    assert paper21.profile == "paper21"
    assert paper21.modalities == ["models.modalities_4m21", "models.modalities_4m21_networks"]
    assert {"canny_edge", "color_palette", "metadata"} <= set(paper21.label.labelers)
    assert {"tok_canny_edge@224", "color_palette", "metadata"} <= set(paper21.pretrain.modalities)
    assert paper21.download == paper.download and paper21.pretrain.steps == paper.pretrain.steps
    assert paper21.label.models == {**paper.label.models, "dinov2": "facebook/dinov2-base",  # the rest: paper's
                                    "dinov2_global": "facebook/dinov2-base", "t5_caption": "google/t5-v1_1-xxl",
                                    "sam_instance": "facebook/sam-vit-huge"}
    assert {"tok_dinov2@224", "tok_dinov2_global", "t5_caption", "tok_sam_edge@224", "sam_instance"} <= set(paper21.pretrain.modalities)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\ndata_root: x\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("extends: demo\ndownload: {threads: 3}\n")
    mine = load_config(str(tmp_path / "c.yaml"))
    assert mine.profile == "c" and mine.download.threads == 3 and mine.download.shard_size == 5  # the rest: demo's
