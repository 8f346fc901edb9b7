"""4M's multimodal masking: which tokens of a sample the encoder sees and which the decoder must predict.

Consumes one sample's modalities: image token grids (196 ids), RGB pixels (196 patches), texts (captions,
box sequences) as strings, and vector sequences (T5 caption embeddings, inputs only). Produces, per modality, the model's batch layout (`models/fourm.py`): `tensor`,
`input_mask` and `target_mask` (True = not an input / not a target) and `decoder_attention_mask`.

Per sample (the paper's section 2.3 and appendix C.1):
1. pick a mixture component (uniformly, or by the components' weights);
2. split the input budget over the modalities by a Dirichlet draw with the component's input alphas (floor,
   then the remaining tokens one by one to the argmax of fresh draws), capped by what each modality holds;
3. the same for the target budget with the target alphas, an image's cap lowered by its inputs;
4. images: a random permutation, its first n_in positions inputs and the next n_tgt targets (disjoint);
5. sequences: span masking with sentinels. Each token is kept with a probability drawn per the component's
   keep scheme; masked runs become [S_1], [S_2], ... in the input and `[S_k] span` in the target, which ends with
   one more sentinel. The probability shrinks by 0.9 until the input fits its budget; a target longer than its
   budget is cut to start at a sentinel.
Every draw comes from the generator passed in, so a seeded loader masks the same way after a resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from core import registry

IMAGE_TOKENS = registry.GRID_TOKENS  # 14x14 per 224x224 crop, for token grids and RGB patches alike
SEQUENCE_TOKENS = 256       # the most tokens of any sequence domain's layout ([EOS] included); each has its own
KEEP_DECAY = 0.9
EPS = 1e-9                  # an alpha of 0 never samples the modality
UNITS_KEPT = 64             # texts whose units a sampler keeps (its sample's, masked `repeats` times in a row)


@dataclass
class Component:
    """One Dirichlet of the mixture: alphas per modality (missing = 0), keep schemes for sequences."""
    input_alphas: dict[str, float]
    target_alphas: dict[str, float]
    keep: dict[str, str] = field(default_factory=dict)   # "random" (default), "all" or "binary"
    weight: float = 1.0


def paper_mixture(modalities: list[str]) -> list[Component]:
    """Table 5 and appendix E.4: "RGB->All & All->All", alpha 0.5, half each, over the given modalities (4M's
    names; RGB pixels are an input only; RGB->All puts nearly the whole input budget on them)."""
    domains = [registry.domain(m) for m in modalities]
    pixels = [d.name for d in domains if d.kind == "pixels"]
    targets = {d.name: 0.5 for d in domains if not d.input_only}
    return [Component(input_alphas={m: 1000.0 for m in pixels}, target_alphas=dict(targets)),
            Component(input_alphas={d.name: 0.5 for d in domains}, target_alphas=dict(targets))]


def is_sequence(modality: str) -> bool:
    return registry.domain(modality).kind == "sequence"


def is_embeddings(modality: str) -> bool:
    return registry.domain(modality).kind == "embeddings"


def span_mask(units: list[list[int]], keep: float, sentinels: list[int], rng: np.random.Generator):
    """(input, target): kept units (tokens, or chunks of tokens masked whole) stay in the input; each masked run
    becomes one sentinel there and `sentinel + run` in the target, which ends with the next sentinel."""
    masked = rng.random(len(units)) > keep
    inputs, targets, count, previous = [], [], 0, False
    for unit, is_masked in zip(units, masked):
        if is_masked:
            if not previous:
                count += 1
                inputs.append(sentinels[count])
                targets.append(sentinels[count])
            targets.extend(unit)
        else:
            inputs.extend(unit)
        previous = bool(is_masked)
    targets.append(sentinels[count + 1])
    return inputs, targets


KEEP_SCHEMES = {"random": lambda rng: rng.uniform(0, 1), "all": lambda rng: 1.0,
                "binary": lambda rng: float(rng.integers(2))}


def fitted_span_mask(units: list[list[int]], budget: int, keep_scheme: str, sentinels: list[int],
                     rng: np.random.Generator):
    """`span_mask` with a keep probability drawn by the scheme, shrunk by KEEP_DECAY until the input fits."""
    keep = KEEP_SCHEMES[keep_scheme](rng)
    inputs, targets = span_mask(units, keep, sentinels, rng)
    while len(inputs) > budget:
        keep *= KEEP_DECAY
        inputs, targets = span_mask(units, keep, sentinels, rng)
    return inputs, targets


class MaskingSampler:
    def __init__(self, modalities: list[str], mixture: list[Component], input_tokens: int = 128,
                 target_tokens: int = 128, text_tokenizer=None):
        unknown = sorted({m for c in mixture for m in [*c.input_alphas, *c.target_alphas]} - set(modalities))
        if unknown:
            raise ValueError(f"the masking mixture names modalities {unknown} that are not loaded ({modalities})")
        if any(is_sequence(m) for m in modalities) and text_tokenizer is None:
            raise ValueError("captions and boxes need the text tokenizer")
        self.modalities, self.input_tokens, self.target_tokens = list(modalities), input_tokens, target_tokens
        self.caps = np.array([registry.domain(m).max_tokens for m in modalities])
        self.images = np.array([not is_sequence(m) for m in modalities])
        self.input_only = np.array([registry.domain(m).input_only for m in modalities])
        self.input_alphas = [np.array([max(c.input_alphas.get(m, 0.0), EPS) for m in modalities]) for c in mixture]
        self.target_alphas = [np.array([max(c.target_alphas.get(m, 0.0), EPS) for m in modalities]) for c in mixture]
        self.keep = [c.keep for c in mixture]
        weights = np.array([c.weight for c in mixture], dtype=float)
        self.weights = weights / weights.sum()
        self.tokenizer = text_tokenizer
        self._units: dict = {}
        self.kinds = ["embeddings" if is_embeddings(m) else "sequence" if is_sequence(m) else "image"
                      for m in modalities]
        if text_tokenizer is not None:
            self.sentinels = [text_tokenizer.token_to_id(f"[S_{i}]") for i in range(200)]
            self.sentinel_ids = set(self.sentinels)
            self.pad_id, self.eos_id = text_tokenizer.token_to_id("[PAD]"), text_tokenizer.token_to_id("[EOS]")

    # -- budgets ------------------------------------------------------------------------------------------------
    @staticmethod
    def split(alphas: np.ndarray, total: int, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        budget = np.floor(rng.dirichlet(alphas) * total).astype(int)
        remainder = total - int(budget.sum())
        if remainder:  # one token at a time to the argmax of a fresh draw (drawn at once: the same numbers)
            np.add.at(budget, rng.dirichlet(alphas, size=remainder).argmax(1), 1)
        return np.minimum(budget, caps)

    def budgets(self, component: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        inputs = self.split(self.input_alphas[component], self.input_tokens, self.caps, rng)
        target_caps = np.where(self.input_only, 0, np.where(self.images, self.caps - inputs, self.caps))
        return inputs, self.split(self.target_alphas[component], self.target_tokens, target_caps, rng)

    # -- one modality -------------------------------------------------------------------------------------------
    @staticmethod
    def image(tensor, n_in: int, n_tgt: int, rng: np.random.Generator, tokens: int = IMAGE_TOKENS) -> dict:
        order = rng.permutation(tokens)
        input_mask = np.ones(tokens, bool)
        input_mask[order[:n_in]] = False
        target_mask = np.ones(tokens, bool)
        target_mask[order[n_in:n_in + n_tgt]] = False
        attention = np.zeros(tokens, np.int32)
        if n_tgt:  # the first target opens all of them to each other: bidirectional within the image
            attention[int(np.argmin(target_mask))] = n_tgt
        return {"tensor": tensor, "input_mask": torch.from_numpy(input_mask),
                "target_mask": torch.from_numpy(target_mask), "decoder_attention_mask": torch.from_numpy(attention)}

    def units(self, text: str | list[str], max_tokens: int) -> list[list[int]]:
        """A text's ids + [EOS] as single-token units, cut at `max_tokens`; chunks (a list of texts, 4M-21's
        metadata) as one unit each, [EOS] the last, the chunks that would pass `max_tokens` left out. The last
        texts' units are kept: a sample is masked several times in a row (`repeats`), its texts encoded once."""
        key = (text if isinstance(text, str) else tuple(text), max_tokens)
        if key not in self._units:
            if len(self._units) >= UNITS_KEPT:
                self._units.clear()
            self._units[key] = self._encode_units(text, max_tokens)
        return [list(u) for u in self._units[key]]

    def _encode_units(self, text: str | list[str], max_tokens: int) -> list[list[int]]:
        if isinstance(text, str):
            return [[t] for t in (self.tokenizer.encode(text).ids + [self.eos_id])[:max_tokens]]
        chunks = [e.ids for e in self.tokenizer.encode_batch(list(text))] + [[self.eos_id]]
        ends = np.cumsum([len(c) for c in chunks])
        return [c for c, end in zip(chunks, ends) if end <= max_tokens]

    def sequence(self, text: str | list[str], n_in: int, n_tgt: int, keep_scheme: str, rng: np.random.Generator,
                 max_tokens: int = SEQUENCE_TOKENS) -> dict:
        ids = self.units(text, max_tokens)
        if n_in == 0:
            inputs, targets = span_mask(ids, 0.0, self.sentinels, rng)
            inputs = []
        else:
            inputs, targets = fitted_span_mask(ids, n_in, keep_scheme, self.sentinels, rng)
        if len(targets) > n_tgt:
            targets = self.cut_at_sentinel(targets, n_tgt, rng)
        length = (max_tokens + 1) * 2
        tensor = torch.full((length,), self.pad_id, dtype=torch.int32)
        input_mask, target_mask = torch.ones(length, dtype=torch.bool), torch.ones(length, dtype=torch.bool)
        attention = torch.zeros(length, dtype=torch.int32)
        tensor[:len(inputs)] = torch.tensor(inputs, dtype=torch.int32)
        input_mask[:len(inputs)] = False
        span = slice(n_in, n_in + len(targets))  # targets start at the input budget, as the reference lays them out
        tensor[span] = torch.tensor(targets, dtype=torch.int32)
        target_mask[span] = False
        attention[span] = 1  # causal: each target token opens one more
        return {"tensor": tensor, "input_mask": input_mask, "target_mask": target_mask,
                "decoder_attention_mask": attention}

    @staticmethod
    def embeddings(vectors: torch.Tensor, n_in: int, keep_scheme: str, rng: np.random.Generator,
                   max_tokens: int) -> dict:
        """Vectors (an input only) span-masked as a sequence's tokens are: kept runs stay in order, each masked run
        becomes one zero vector (the reference's sentinel); nothing is a target."""
        count = min(len(vectors), max_tokens)
        units = [[i] for i in range(count)]
        sentinels = [-1 - k for k in range(count + 2)]  # never an index: marks a masked run in the input
        kept = []
        if n_in > 0:
            kept, _ = fitted_span_mask(units, n_in, keep_scheme, sentinels, rng)
        tensor = torch.zeros(max_tokens, vectors.shape[-1], dtype=vectors.dtype)
        for slot, index in enumerate(kept):
            if index >= 0:
                tensor[slot] = vectors[index]
        input_mask = torch.ones(max_tokens, dtype=torch.bool)
        input_mask[:len(kept)] = False
        return {"tensor": tensor, "input_mask": input_mask, "target_mask": torch.ones(max_tokens, dtype=torch.bool),
                "decoder_attention_mask": torch.zeros(max_tokens, dtype=torch.int32)}

    def cut_at_sentinel(self, targets: list[int], budget: int, rng: np.random.Generator) -> list[int]:
        """`budget` tokens from a random sentinel on (not the final one), or the shortest tail that fits."""
        starts = [i for i, t in enumerate(targets) if t in self.sentinel_ids]
        start = starts[int(rng.integers(max(1, len(starts) - 1)))]
        if len(targets) - start >= budget:
            return targets[start:start + budget]
        return targets[next(i for i in starts if len(targets) - i <= budget):]

    # -- a sample -----------------------------------------------------------------------------------------------
    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        """sample: modality -> token grid / pixels (tensors) or text (str). Every modality of the sampler must be
        present; returns modality -> the batch layout."""
        missing = [m for m in self.modalities if m not in sample]
        if missing:
            raise KeyError(f"sample lacks {missing}")
        component = int(rng.choice(len(self.weights), p=self.weights))
        inputs, targets = self.budgets(component, rng)
        out = {}
        for m, kind, n_in, n_tgt, cap in zip(self.modalities, self.kinds, inputs.tolist(), targets.tolist(),
                                             self.caps.tolist()):
            if kind == "embeddings":
                out[m] = self.embeddings(sample[m], n_in, self.keep[component].get(m, "random"), rng, cap)
            elif kind == "sequence":
                out[m] = self.sequence(sample[m], n_in, n_tgt, self.keep[component].get(m, "random"), rng, cap)
            else:
                out[m] = self.image(sample[m], n_in, n_tgt, rng, cap)
        return out
