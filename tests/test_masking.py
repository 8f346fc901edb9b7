"""The masking sampler: the reference sampler's statistics (fixture made by running apple/ml-4m's UnifiedMasking,
tests/fixtures/reference/make_masking_stats.py), disjoint inputs and targets, budgets, and span masking that a
merge through the sentinels undoes."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.text_tokenizer import boxes_to_text, train_text_tokenizer
from stages.fourm.masking import Component, MaskingSampler, paper_mixture, span_mask

FIXTURE = json.loads((Path(__file__).parent / "fixtures/reference/masking_stats.json").read_text())
MODALITIES = list(FIXTURE["mixture"])


@pytest.fixture(scope="module")
def tokenizer():
    corpus = FIXTURE["captions"] + [boxes_to_text(b) for b in FIXTURE["boxes"]]
    tokenizer = train_text_tokenizer(corpus * 3, 4400)
    # the counts depend on each text's length in tokens (piece ids may be numbered otherwise: training breaks ties
    # between equally frequent pieces in no fixed order)
    assert [len(tokenizer.encode(t).ids) for t in corpus] == [len(ids) for ids in FIXTURE["ids"]]
    return tokenizer


def sample(i: int) -> dict:
    out = {m: torch.zeros(196, dtype=torch.long) for m in MODALITIES}
    out["caption"] = FIXTURE["captions"][i % len(FIXTURE["captions"])]
    out["det"] = boxes_to_text(FIXTURE["boxes"][i % len(FIXTURE["boxes"])])
    return out


def token_counts(sampler, fixture: dict, names: list[str]) -> dict:
    """Per modality the input and target token counts of the fixture's seeded draws: zero token grids, its captions
    and boxes in turn (as the reference's sampler was drawn by the fixture's script)."""
    rng, counts = np.random.default_rng(0), {m: {"input": [], "target": []} for m in names}
    for i in range(fixture["samples"]):
        drawn = {m: torch.zeros(196, dtype=torch.long) for m in names}
        drawn["caption"] = fixture["captions"][i % len(fixture["captions"])]
        drawn["det"] = boxes_to_text(fixture["boxes"][i % len(fixture["boxes"])])
        for m, d in sampler(drawn, rng).items():
            counts[m]["input"].append(int((~d["input_mask"]).sum()))
            counts[m]["target"].append(int((~d["target_mask"]).sum()))
    return counts


def assert_means_match(counts: dict, fixture: dict) -> None:
    """Each modality's mean input and target counts within four standard errors of the reference sampler's."""
    n = fixture["samples"]
    for m, parts in counts.items():
        for part, values in parts.items():
            ours, reference = np.array(values), fixture["stats"][m][part]
            spread = math.sqrt(reference["std"] ** 2 / n + ours.std() ** 2 / n)
            assert abs(ours.mean() - reference["mean"]) <= 4 * spread + 1e-9, (m, part, ours.mean(), reference)


def test_mean_token_counts_equal_the_reference_samplers(tokenizer):
    sampler = MaskingSampler(MODALITIES, paper_mixture(MODALITIES), 128, 128, tokenizer)
    counts = token_counts(sampler, FIXTURE, MODALITIES)
    assert_means_match(counts, FIXTURE)
    # and what the mixture means: half the samples see RGB pixels alone, pixels are never a target
    assert np.mean(counts["rgb@224"]["input"]) == pytest.approx(128 / 2 + 128 / 16, abs=4)
    assert sum(counts["rgb@224"]["target"]) == 0


def test_inputs_and_targets_are_disjoint_and_within_budget(tokenizer):
    sampler = MaskingSampler(MODALITIES, paper_mixture(MODALITIES), 128, 128, tokenizer)
    rng = np.random.default_rng(1)
    for i in range(200):
        out = sampler(sample(i), rng)
        total_in = sum(int((~d["input_mask"]).sum()) for d in out.values())
        assert total_in <= 128
        for m, d in out.items():
            if m in ("caption", "det"):
                continue
            assert not (~d["input_mask"] & ~d["target_mask"]).any()  # never the same position twice
            targets = int((~d["target_mask"]).sum())
            assert int(d["decoder_attention_mask"].sum()) == targets
            if targets:
                assert int(d["decoder_attention_mask"][int(np.argmin(d["target_mask"].numpy()))]) == targets


def test_span_masking_round_trips_through_the_sentinels(tokenizer):
    sentinels = [tokenizer.token_to_id(f"[S_{i}]") for i in range(200)]
    ids = tokenizer.encode(FIXTURE["captions"][1]).ids + [3]
    rng = np.random.default_rng(2)
    for keep in (0.0, 0.3, 0.7, 1.0):
        inputs, targets = span_mask([[t] for t in ids], keep, sentinels, rng)
        spans, current = {}, None
        for t in targets:
            if t in sentinels:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        merged = [x for t in inputs for x in (spans[t] if t in sentinels else [t])]
        assert merged == ids and targets[0] == sentinels[1] and targets[-1] in sentinels


def test_a_long_caption_fits_its_budgets(tokenizer):
    sampler = MaskingSampler(["caption"], [Component({"caption": 1.0}, {"caption": 1.0})], 12, 10, tokenizer)
    rng = np.random.default_rng(3)
    sentinels = set(sampler.sentinels)
    for _ in range(50):
        d = sampler({"caption": FIXTURE["captions"][3]}, rng)["caption"]
        inputs, targets = d["tensor"][~d["input_mask"]], d["tensor"][~d["target_mask"]]
        assert len(inputs) <= 12 and len(targets) <= 10
        assert int(targets[0]) in sentinels  # a cut target starts at a sentinel
        assert d["tensor"].shape == (514,)


def test_a_mixture_naming_a_modality_not_loaded_is_refused(tokenizer):
    with pytest.raises(ValueError, match="tok_lidar"):
        MaskingSampler(["caption"], [Component({"tok_lidar@224": 1.0}, {"caption": 1.0})], 8, 8, tokenizer)


def test_the_budget_remainder_drawn_at_once_is_the_one_token_at_a_time_draw():
    """The rounding remainder goes one token at a time to the argmax of a fresh Dirichlet draw (the reference's
    loop); drawing those at once takes the same numbers from the generator, so budgets and every later draw of a
    seeded run are unchanged."""
    def one_at_a_time(alphas, total, caps, rng):
        budget = np.floor(rng.dirichlet(alphas) * total).astype(int)
        for _ in range(total - int(budget.sum())):
            budget[int(np.argmax(rng.dirichlet(alphas)))] += 1
        return np.minimum(budget, caps)

    caps = np.array([196, 196, 256, 23, 196, 40, 196])
    for seed in range(200):
        alphas = np.random.default_rng(seed).choice([1e-9, 0.05, 0.2, 0.5, 1.0, 5.0], size=7)
        a, b = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 1])
        assert np.array_equal(MaskingSampler.split(alphas, 128, caps, a), one_at_a_time(alphas, 128, caps, b))
        assert a.random() == b.random()
