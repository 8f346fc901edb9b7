"""Pretraining on a weighted mixture of datasets, as 4M-21 was trained: each sample's dataset drawn by weight, each
dataset masked with its own modalities, a text corpus read as captions, the modalities a dataset lacks empty and
fully masked; per-dataset losses, counts and validation; the reference's own data and alphas configs read as they
are; bad settings refused by name before any work."""
import json
import math
import shutil

import pytest
import torch

from core.config import ConfigError, load_config
from models.text_tokenizer import train_text_tokenizer
from models.vqvae import VQVAE, save_tokenizer, tokenizer_config
from stages.fourm.datasets import DATASET, make_loader, plan_datasets
from stages.fourm.fourm_data import LoaderInputError, mixture_from
from stages.fourm.pretrain import model_config, run_dir, run_pretrain
from tests.test_fourm_data import write_dataset

REFERENCE = __import__("pathlib").Path(__file__).parent / "fixtures" / "reference" / "cfgs" / "default" / "4m"
DATA_21 = REFERENCE / "data" / "cc12m+coyo+c4" / "main" / "mix_mod21_all2allmix_rgb2all_capT5bias_C4.yaml"
DATA_7 = REFERENCE / "data" / "cc12m" / "main" / "mix_mod7_all2all_rgb2all_a0.5.yaml"
ALPHAS_7 = REFERENCE / "alphas_mixture" / "main" / "mix_mod7_all2allmix_rgb2all_capbias.yaml"
PLACEHOLDER = "path/to/training/data/[modality1,modality2,modality3]/shard-{00000..9999}.tar"
SEVEN = ["tok_depth@224", "tok_normal@224", "tok_semseg@224", "tok_clip@224"]  # beside rgb, caption, det
WEIGHTS = {"cc12m": 0.6, "coyo": 0.2, "c4": 0.2}
TINY = ["pretrain.size=Ti", "pretrain.model={dim: 32, encoder_depth: 1, decoder_depth: 1, num_heads: 2}",
        "pretrain.batch_size=8", "pretrain.steps=4", "pretrain.warmup_steps=1", "pretrain.log_every=2",
        "pretrain.val_every=4", "pretrain.val_batches=1", "pretrain.checkpoint_every=4", "pretrain.loader_workers=0",
        "pretrain.device=cpu", "pretrain.workers=0", "pretrain.shuffle_buffer=8", "pretrain.input_tokens=32",
        "pretrain.target_tokens=32", "pretrain.val_shards=1"]


def write_corpus(folder, texts_per_file=6, files=2, column="text"):
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        lines = [json.dumps({column: f"a story number {f} {i} about a dog", "url": "x"}) for i in range(texts_per_file)]
        (folder / f"c4-{f:05d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two tokenized datasets (the second read for tok_rgb and captions only) and a text corpus of two files; the
    first holds the run's tokenizers, and the four other 4M-7 token folders (for the reference's 4M-7 config)."""
    base = tmp_path_factory.mktemp("mixture")
    cc12m, coyo = base / "cc12m", base / "coyo"
    write_dataset(cc12m)
    write_dataset(coyo)
    for folder in SEVEN:
        shutil.copytree(cc12m / "tok_rgb@224", cc12m / folder)
    train_text_tokenizer(["a photo number", "a cat and a dog", "a story about"], 4400,
                         cc12m / "tokenizers/text/tokenizer.json")
    for m in ["rgb", "depth", "normal", "semseg", "clip"]:
        save_tokenizer(VQVAE(tokenizer_config(m, "tiny", codebook_size=64)), cc12m / "tokenizers" / m)
    return {"cc12m": cc12m, "coyo": coyo, "c4": write_corpus(base / "c4")}


def mixture(roots, *extra, **weights):
    w = {**WEIGHTS, **weights}
    datasets = (f"pretrain.datasets=[{{name: cc12m, root: '{roots['cc12m']}', weight: {w['cc12m']}}}, "
                f"{{name: coyo, root: '{roots['coyo']}', in_domains: [tok_rgb@224, caption], weight: {w['coyo']}}}, "
                f"{{name: c4, type: text, root: '{roots['c4']}', weight: {w['c4']}}}]")
    return load_config("paper", ["pretrain.modalities=[rgb@224, tok_rgb@224, caption, det]", *TINY, datasets, *extra])


def test_each_sample_comes_from_a_dataset_drawn_by_weight_with_its_own_modalities(roots):
    config = mixture(roots)
    tokenizer = train_text_tokenizer(["a photo number", "a cat and a dog", "a story about"], 4400)
    counts, n = torch.zeros(3), 0
    loader = make_loader(roots["cc12m"], config, tokenizer, split="train", batch_size=50, workers=0)
    for batch, _ in zip(loader, range(60)):
        index = batch[DATASET]["index"]
        counts += torch.bincount(index, minlength=3)
        n += len(index)
        present = {m: ~(d["input_mask"] & d["target_mask"]).all(1) for m, d in batch.items() if m != DATASET}
        assert not present["det"][index == 1].any() and not present["rgb@224"][index == 1].any()  # coyo: none
        assert not (present["tok_rgb@224"] | present["det"] | present["rgb@224"])[index == 2].any()  # c4: text only
        assert present["caption"][index == 2].all() and present["tok_rgb@224"][index == 1].any()
        assert present["det"][index == 0].any()
        texts = [tokenizer.decode(t[~m].tolist()) for t, m in zip(batch["caption"]["tensor"][index == 2],
                                                                   batch["caption"]["input_mask"][index == 2])]
        assert all("photo" not in t for t in texts)  # the corpus's texts, not a photo's caption
    # Each count is binomial: within 4.5 standard deviations of n x weight (a false alarm about once in 150,000)
    for count, weight in zip(counts.tolist(), WEIGHTS.values()):
        assert abs(count - n * weight) <= 4.5 * math.sqrt(n * weight * (1 - weight)), (counts, n)
    only_text = mixture(roots, cc12m=0.0, coyo=0.0, c4=1.0)
    batch = next(iter(make_loader(roots["cc12m"], only_text, tokenizer, split="train", batch_size=8, workers=0)))
    assert batch[DATASET]["index"].tolist() == [2] * 8  # a weight of 0: never drawn


def test_a_mixture_pretrains_a_tiny_4m_with_per_dataset_losses_counts_and_validation(roots):
    config = mixture(roots, "pretrain.log_every=1")
    shutil.rmtree(run_dir(roots["cc12m"]), ignore_errors=True)
    assert model_config(roots["cc12m"], config).domains_in == ["rgb@224", "tok_rgb@224", "caption", "det"]
    summary = run_pretrain(roots["cc12m"], config)
    log = [json.loads(line) for line in (run_dir(roots["cc12m"]) / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2, 3, 4] and summary["steps"] == 4
    last = log[-1]
    assert last["samples.cc12m"] + last["samples.coyo"] + last["samples.c4"] == 4 * 8  # every sample counted once
    assert {"loss.cc12m.tok_rgb@224", "loss.c4.caption"} <= {k for line in log for k in line}
    assert not any(k.startswith(("loss.coyo.det", "loss.c4.tok_rgb")) for line in log for k in line)  # not theirs
    assert {"val_loss.cc12m.tok_rgb@224", "val_loss.cc12m.det", "val_loss.coyo.tok_rgb@224",
            "val_loss.c4.caption"} <= set(last)  # each dataset's held-out shard or file, with its own modalities
    assert "val_loss.coyo.det" not in last and "val_loss.c4.tok_rgb@224" not in last


def test_bad_mixture_settings_are_refused_by_dataset_and_setting_before_any_work(roots, tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain.datasets\[coyo\].in_domains: unknown modalities \['tok_nope'\]"):
        load_config("paper", ["pretrain.datasets=[{name: coyo, in_domains: [tok_nope]}]"])
    with pytest.raises(ConfigError, match=r"pretrain.datasets.0.weight"):
        load_config("paper", ["pretrain.datasets=[{name: a, weight: -1}]"])
    with pytest.raises(ConfigError, match="all zero"):
        load_config("paper", ["pretrain.datasets=[{name: a, weight: 0}, {name: b, weight: 0}]"])
    with pytest.raises(LoaderInputError, match=r"pretrain.datasets\[c4\].root: no such file or folder"):
        plan_datasets(roots["cc12m"], mixture({**roots, "c4": tmp_path / "missing"}))
    corpus = write_corpus(tmp_path / "bodies", column="body")
    with pytest.raises(LoaderInputError, match=r"pretrain.datasets\[c4\]: .*c4-00000.jsonl' has no 'text' column"):
        plan_datasets(roots["cc12m"], mixture({**roots, "c4": corpus}))
    named = load_config("paper", [f"pretrain.datasets=[{{name: c4, type: text, root: '{corpus}', text_column: body}}]"])
    assert plan_datasets(roots["cc12m"], named)[0].text_column == "body"  # its own column, named
    reference, published = tmp_path / "data.yaml", substituted(DATA_7.read_text(), **{"cfgs/default/4m": REFERENCE})
    reference.write_text(published.replace("use_wds: True", "use_wds: False"))
    with pytest.raises(ConfigError, match=r"train.datasets.cc12m.use_wds = False: only True is supported"):
        load_config("paper", [f"pretrain.data_config={reference}"])
    reference.write_text(published.replace("use_wds: True", "use_wds: True\n      my_own_field: 3"))
    with pytest.raises(ConfigError, match=r"train.datasets.cc12m: \['my_own_field'\] not supported"):
        load_config("paper", [f"pretrain.data_config={reference}"])
    reference.write_text(published)  # as published: its placeholder folders name no modality
    with pytest.raises(ConfigError, match=r"folders \['modality1', 'modality2', 'modality3'\] hold none"):
        load_config("paper", [f"pretrain.data_config={reference}"])


def substituted(text: str, **paths) -> str:
    """A reference data config with this machine's paths in place of its placeholders."""
    for placeholder, path in paths.items():
        text = text.replace(placeholder, str(path))
    return text


def test_the_reference_4m7_data_config_pretrains_as_it_reads(roots, tmp_path):
    """apple/ml-4m's 4M-7 data config, its data path pointed at a dataset here: every field mapped to ours."""
    folders = "[rgb,caption,det,tok_rgb@224,tok_depth@224,tok_semseg@224,tok_normal@224,tok_clip@224,crop_settings]"
    reference = tmp_path / "mix_mod7.yaml"
    reference.write_text(substituted(DATA_7.read_text(), **{
        PLACEHOLDER: f"{roots['cc12m']}/{folders}/shard-{{000000..000001}}.tar",
        "path/to/val/data": roots["cc12m"], "cfgs/default/4m": REFERENCE}))
    config = load_config("paper", [*TINY, f"pretrain.data_config={reference}"])
    (entry,) = config.pretrain.dataset_entries()
    assert (entry.name, entry.type, entry.weight, entry.repeats, entry.shuffle_buffer,
            entry.sample_shuffle_buffer) == ("cc12m", "tokens", 1.0, 4, 1000, 1000)
    assert entry.in_domains == ["rgb@224", "tok_rgb@224", "tok_depth@224", "tok_semseg@224", "tok_normal@224",
                                "tok_clip@224", "caption", "det"] and entry.out_domains == entry.in_domains[1:]
    assert entry.shards == ["shard-000000", "shard-000001"] and entry.root == str(roots["cc12m"])
    components = mixture_from(entry.mixture, entry.in_domains)  # RGB->All and All->All, alpha 0.5
    assert [c.input_alphas["rgb@224"] for c in components] == [1000.0, 0.5]
    assert [c.target_alphas["tok_clip@224"] for c in components] == [0.5, 0.5]
    config = load_config("paper", [*TINY, f"pretrain.data_config={reference}", "pretrain.shuffle_buffer=8"])
    config.pretrain.datasets[0].shuffle_buffer, config.pretrain.datasets[0].sample_shuffle_buffer = 8, 4
    shutil.rmtree(run_dir(roots["cc12m"]), ignore_errors=True)
    summary = run_pretrain(roots["cc12m"], config)
    assert {"loss.tok_depth@224", "loss.tok_clip@224", "loss.caption", "val_loss.cc12m.det"} <= set(summary["final"])
    shutil.rmtree(run_dir(roots["cc12m"]))


def test_the_reference_4m21_data_config_reads_into_three_datasets_with_their_mixtures(roots, tmp_path):
    """4M-21's CC12M + COYO-700M + C4 at 0.6/0.2/0.2 with its 7-Dirichlet mixture (the COYO entry's alphas config,
    absent from the reference's repository, replaced by the 4M-7 one of the same family)."""
    reference = tmp_path / "mix_mod21.yaml"
    reference.write_text(substituted(DATA_21.read_text(), **{
        PLACEHOLDER: f"{roots['cc12m']}/[rgb,caption,det,tok_rgb@224,crop_settings]/shard-{{000000..000001}}.tar",
        "/path/to/c4/en": roots["c4"], "path/to/val/data": roots["coyo"],
        "cfgs/bolt/pretrain/4m/alphas_mixture/all2allmix-oldmod_rgb2all_capbias_v0.yaml": ALPHAS_7,
        "cfgs/default/4m": REFERENCE}))
    config = load_config("paper", ["modalities=[models.modalities_4m21, models.modalities_4m21_networks, "
                                   "models.modalities_4m21_external]", f"pretrain.data_config={reference}"])
    entries = {e.name: e for e in config.pretrain.dataset_entries()}
    assert {n: (e.type, e.weight) for n, e in entries.items()} == {
        "cc12m": ("tokens", 0.6), "coyo700m": ("tokens", 0.2), "c4": ("text", 0.2)}
    assert len(entries["cc12m"].in_domains) == 19 and "t5_caption" not in entries["cc12m"].out_domains
    assert entries["c4"].in_domains == ["caption"] and entries["c4"].root == str(roots["c4"])
    assert (entries["cc12m"].input_tokens, entries["coyo700m"].repeats, entries["c4"].shuffle_buffer) == (256, 1, 1000)
    cc12m = mixture_from(entries["cc12m"].mixture, entries["cc12m"].in_domains)
    assert [c.weight for c in cc12m] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert cc12m[5].keep["caption"] == "all" and cc12m[6].keep["t5_caption"] == "all"
    assert [c.input_alphas["rgb@224"] for c in cc12m] == [0.01, 0.1, 1.0, 10.0, 1000.0, 0.05, 0.05]
    inputs, outputs = config.pretrain.model_domains()
    assert "t5_caption" in inputs and "t5_caption" not in outputs and "rgb@224" not in outputs


def test_the_4m21_mixtures_token_counts_equal_the_reference_samplers():
    """4M-21's 7-Dirichlet mixture read from the reference's own alphas config, on a dataset of the 4M-7
    modalities at 256/256 tokens: per-modality mean input and target counts over 4000 seeded samples equal those of
    the reference's `UnifiedMasking` given the same config (fixture: make_mixture_masking_stats.py), within four
    standard errors; each Dirichlet is drawn with the config's sampling weight."""
    from models.text_tokenizer import boxes_to_text
    from stages.fourm.masking import MaskingSampler
    from tests.test_masking import assert_means_match, token_counts

    fixture = json.loads((REFERENCE.parents[2] / "mixture_masking_stats.json").read_text())
    corpus = fixture["captions"] + [boxes_to_text(b) for b in fixture["boxes"]]
    tokenizer = train_text_tokenizer(corpus * 3, 4400)
    assert [len(tokenizer.encode(t).ids) for t in corpus] == fixture["lengths"]
    domains = fixture["domains"]
    components = mixture_from(str(REFERENCE.parents[2] / fixture["alphas_config"]), domains)
    sampler = MaskingSampler(domains, components, fixture["input_tokens"], fixture["target_tokens"], tokenizer)
    assert sampler.weights.tolist() == pytest.approx([1 / 6] * 5 + [1 / 12] * 2)  # its sampling_weights
    assert [c.keep.get("caption") for c in components] == ["random"] * 5 + ["all", "random"]
    assert_means_match(token_counts(sampler, fixture, domains), fixture)
