"""Any-to-any generation with a 4M model: any subset of modalities in, any other out, one after another.

Image modalities are decoded in a few parallel steps, sequences (captions, boxes) token by token:
    MaskGIT   every still-unknown position is predicted; the most confident `n` of them are kept
    ROAR      `n` unknown positions drawn at random are predicted, and all of them kept
    left-to-right (`autoregressive`)  from the sequence's first sentinel [S_1] until its final one, with a key-value
              cache; the spans are then put back where the input's sentinels stand (in-painting of captions)
A chained schedule (`Schedule`) is an ordered list of `Step`s, one per target; each finished target becomes an
input of the next. Classifier-free guidance mixes a conditional and an unconditional prediction, u + w (c - u),
where the unconditional pass hides the guided conditions (an image entirely; a sequence down to [S_1]); multimodal
guidance weighs each condition on its own, u + sum_i w_i (c_i - u), negative weights allowed. All passes of a
step share one forward (they are stacked along the batch), and so do the samples of a batch.

The state a sampler works on is the model's batch layout (see models/fourm.py), per modality:
    image tokens    tensor (B, 196) ids, input_mask (B, 196), True = not known yet
    RGB pixels      tensor (B, 3, 224, 224), input_mask (B, 196) all False
    sequences       tensor (B, L) ids, right-padded, input_mask (B, L), True = padding
    embeddings      tensor (B, L, C) vectors (T5's), an input only, zero-padded to the domain's most tokens
Randomness comes from one generator per sample, so a sample's result depends on its seed alone, not on the other
samples of its batch or on the number of guidance passes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from core import registry

CAPTION_TOKENS = 256  # a caption's most tokens, [EOS] included (the reference's)

SCHEMES = ("maskgit", "roar", "autoregressive")


# --- schedules: how many tokens each step keeps, and at which temperature ------------------------------------------
def cosine_tokens(steps: int, total: int) -> list[int]:
    """The reference's "cosine" schedule: s_i = (1 + cos(pi i / steps)) / 2, n_i = round(total (s_i - s_i+1)), the
    last step the remainder. Few tokens first and last, most in the middle."""
    s = [0.5 * (1 + math.cos(math.pi * i / steps)) for i in range(steps)]
    counts = [round(total * (a - b)) for a, b in zip(s[:-1], s[1:])]
    counts.append(total - sum(counts))
    if counts[-1] < 0:  # rounding overshot (tiny totals): cumulative rounding keeps every count >= 0
        edges = [round(total * (1 - v)) for v in s] + [total]
        counts = [b - a for a, b in zip(edges[:-1], edges[1:])]
    return counts


def linear_tokens(steps: int, total: int) -> list[int]:
    """Equal chunks, the larger ones first; steps beyond `total` dropped."""
    edges = np.linspace(0, total, steps + 1).astype(int)
    counts = sorted(np.diff(edges).tolist(), reverse=True)
    while counts and counts[-1] == 0:
        counts.pop()
    return counts


def temperatures(name: str, start: float, counts: list[int]) -> list[float]:
    """Per step: `constant`; `linear`, start times the share of tokens still unknown before the step; or
    `onex:<min>:<power>`, a 1/x^power decay from start to min (the reference's shapes)."""
    total = sum(counts)
    done = np.cumsum(counts) / max(total, 1)
    if name == "constant":
        return [float(start)] * len(counts)
    if name == "linear":
        return np.concatenate([[start], start * (1 - done)[:-1]]).clip(min=1e-9).tolist()
    if name.startswith("onex:"):
        low, power = (float(v) for v in name.split(":")[1:])
        x = np.linspace(1, 100, num=max(total, 1))
        y = 1 / x ** power
        y = (y - y.min()) / max(y.max() - y.min(), 1e-12)
        return [float(max(low + (start - low) * (1 - d) * y[i], 1e-9)) for i, d in enumerate(done)]
    raise ValueError(f"unknown temperature schedule {name!r} (constant, linear or onex:<min>:<power>)")


def sequence_limit(target: str) -> int:
    """The most tokens a sequence target generates after [S_1]: its domain's length less [EOS] (SAM instances 289,
    poses 274, captions 255; a name the registry does not know: a caption's)."""
    try:
        return registry.domain(target).max_tokens - 1
    except registry.RegistryError:
        return CAPTION_TOKENS - 1


@dataclass
class Step:
    """One target of a chained schedule."""
    target: str
    scheme: str = "maskgit"                 # maskgit | roar (image tokens); autoregressive (captions, boxes)
    steps: int = 8                          # decoding steps (image schemes)
    token_schedule: str = "cosine"          # cosine | linear (MaskGIT); ROAR always decodes equal chunks
    temperature: float = 1.0
    temperature_schedule: str = "constant"  # constant | linear | onex:<min>:<power> (image schemes)
    cfg: float = 1.0                        # classifier-free guidance over the guided conditions; 1 = none
    guidance: dict = field(default_factory=dict)  # multimodal guidance: {condition: weight}, replaces cfg
    top_k: float = 0                        # keep the k most likely tokens (a fraction < 1: of the vocabulary)
    top_p: float = 0.0                      # keep the most likely tokens up to this probability mass
    max_tokens: int | None = None           # sequences: at most this many tokens after [S_1] (None: the domain's)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"{self.target}: unknown scheme {self.scheme!r} (one of {', '.join(SCHEMES)})")
        if int(self.steps) < 1:
            raise ValueError(f"{self.target}: steps must be at least 1, not {self.steps}")
        if self.token_schedule not in ("cosine", "linear"):
            raise ValueError(f"{self.target}: unknown token schedule {self.token_schedule!r} (cosine or linear)")
        temperatures(self.temperature_schedule, self.temperature, [1])  # a bad name fails here, not mid-run
        most = sequence_limit(self.target)
        if self.max_tokens is None:
            self.max_tokens = most
        if not 1 <= int(self.max_tokens) <= most:
            raise ValueError(f"{self.target}: max_tokens must lie in [1, {most}], not {self.max_tokens}")
        if not 0 <= float(self.top_p) <= 1 or float(self.top_k) < 0:
            raise ValueError(f"{self.target}: top_p must lie in [0, 1] and top_k be >= 0 (got {self.top_p}, "
                             f"{self.top_k})")

    def plan(self, total: int) -> list[tuple[int, float]]:
        """(tokens kept, temperature) per decoding step of an image target with `total` unknown tokens; steps that
        would keep no token are dropped."""
        counts = (cosine_tokens if self.scheme == "maskgit" and self.token_schedule == "cosine" else linear_tokens)(
            int(self.steps), total)
        temps = temperatures(self.temperature_schedule, self.temperature, counts)
        return [(n, t) for n, t in zip(counts, temps) if n > 0]


@dataclass
class Schedule:
    steps: list[Step]
    grow_conditioning: bool = False   # each finished target joins the conditions that guidance hides

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
            raise ValueError("a schedule needs `steps:`, a non-empty list of {target, scheme, ...}")
        known = set(Step.__dataclass_fields__)
        steps = []
        for i, entry in enumerate(data["steps"]):
            unknown = sorted(set(entry) - known) if isinstance(entry, dict) else ["(not a mapping)"]
            if unknown or "target" not in entry:
                raise ValueError(f"schedule step {i}: unknown keys {unknown} or no target (keys: {sorted(known)})")
            steps.append(Step(**entry))
        extra = sorted(set(data) - {"steps", "grow_conditioning"})
        if extra:
            raise ValueError(f"schedule: unknown keys {extra} (steps, grow_conditioning)")
        return cls(steps, bool(data.get("grow_conditioning", False)))

    def to_dict(self) -> dict:
        return asdict(self)


# --- sampling ------------------------------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, top_k: float = 0, top_p: float = 0.0) -> torch.Tensor:
    """Logits outside the top k (a fraction < 1 of the vocabulary) or the top-p nucleus set to -inf; the most
    likely token always stays."""
    vocab = logits.shape[-1]
    if top_k:
        k = min(vocab, max(1, int(top_k * vocab) if top_k < 1 else int(top_k)))
        logits = logits.masked_fill(logits < logits.topk(k, dim=-1).values[..., -1:], float("-inf"))
    if top_p:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        beyond = (probs.cumsum(-1) - probs) > top_p  # the mass before a token already exceeds p
        drop = beyond.scatter(-1, order, beyond)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: torch.Tensor, temperature: float, top_k: float, top_p: float,
         uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probability of each drawn id) from logits (..., V) and one uniform number per position (...): the
    inverse of the filtered distribution's CDF, so each sample's draw depends on its own generator only.
    Temperature 0 takes the most likely token, its probability as the confidence."""
    logits = filter_logits(logits.float(), top_k, top_p)
    if temperature < 1e-9:
        probs = logits.softmax(-1)
        ids = probs.argmax(-1)
    else:
        probs = (logits / temperature).softmax(-1)
        cdf = probs.cumsum(-1)
        ids = torch.searchsorted(cdf, (uniform.to(cdf) * cdf[..., -1])[..., None], right=True)[..., 0]
        ids = ids.clamp(max=logits.shape[-1] - 1)
    return ids, probs.gather(-1, ids[..., None])[..., 0]


def guide(logits: torch.Tensor, weights: list[float] | None) -> torch.Tensor:
    """logits (P, ...) of the passes: without weights one pass, as is; with them, pass 0 is the unconditional one
    and pass i the i-th condition: u + sum_i w_i (c_i - u)."""
    if not weights:
        return logits[0]
    u = logits[0]
    return u + sum(w * (c - u) for w, c in zip(weights, logits[1:]))


def merge_spans(inputs: list[int], predicted: list[int], sentinels: set[int]) -> list[int]:
    """The input with each sentinel replaced by the span that follows the same sentinel in the prediction."""
    spans, current = {}, None
    for token in predicted:
        if token in sentinels:
            current = token
            spans.setdefault(token, [])
        elif current is not None:
            spans[current].append(token)
    merged = []
    for token in inputs:
        if token in sentinels:
            merged.extend(spans.get(token, []))
        else:
            merged.append(token)
    return merged


# --- the state ---------------------------------------------------------------------------------------------------
def image_entry(ids: torch.Tensor, known: torch.Tensor) -> dict:
    return {"tensor": ids.long(), "input_mask": ~known.bool()}


def pixels_entry(pixels: torch.Tensor, grid: int) -> dict:
    return {"tensor": pixels, "input_mask": torch.zeros(len(pixels), grid * grid, dtype=torch.bool,
                                                         device=pixels.device)}


def sequence_entry(rows: list[list[int]], pad_id: int = 0, device=None) -> dict:
    length = max(1, max(len(r) for r in rows))
    tensor = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    mask = torch.ones(len(rows), length, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        tensor[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = False
    return {"tensor": tensor, "input_mask": mask}


def embeddings_entry(rows: list[torch.Tensor], length: int, device=None) -> dict:
    """Vector sequences (L_i, C), right-padded with zeros to `length`: every pass and sample the same length."""
    tensor = torch.zeros(len(rows), length, rows[0].shape[-1], device=device)
    mask = torch.ones(len(rows), length, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        tensor[i, :len(row)] = row.to(device)
        mask[i, :len(row)] = False
    return {"tensor": tensor, "input_mask": mask}


def sequence_rows(entry: dict) -> list[list[int]]:
    return [row[~mask].tolist() for row, mask in zip(entry["tensor"], entry["input_mask"])]


def _stack(states: list[dict], pad_id: int) -> dict:
    """The passes' states as one batch (sequences padded to the longest)."""
    out = {}
    for m in states[0]:
        tensors, masks = [s[m]["tensor"] for s in states], [s[m]["input_mask"] for s in states]
        if registry.domain(m).kind == "sequence":
            length = max(t.shape[1] for t in tensors)
            tensors = [F.pad(t, (0, length - t.shape[1]), value=pad_id) for t in tensors]
            masks = [F.pad(k, (0, length - k.shape[1]), value=True) for k in masks]
        out[m] = {"tensor": torch.cat(tensors), "input_mask": torch.cat(masks)}
    return out


class Sampler:
    """Runs a `Schedule` on a batch of states with a `FourM`. `sentinels`: the text tokenizer's ids of [S_0],
    [S_1], ... (needed for sequences); `cache=False` recomputes the whole decoder for every token, as the
    reference does (kept to check the cache against)."""

    def __init__(self, model, sentinels: list[int] | None = None, pad_id: int = 0, cache: bool = True):
        self.model, self.sentinels, self.pad_id, self.cache = model, sentinels or [], pad_id, cache
        self.sentinel_set = set(self.sentinels)
        self.device = next(model.parameters()).device

    # -- public ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, state: dict, schedule: Schedule, conditions: list[str], seeds: list[int],
                 observer=None) -> dict:
        """Decode every step's target into `state` (changed in place and returned). `conditions`: the modalities
        guidance hides in its unconditional pass. `observer(target, kept (B, n) positions or None, state)` is called
        after each decoding step (progress bars, tests)."""
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        guided = [m for m in conditions if m in state]
        for step in schedule.steps:
            if step.target not in self.model.decoder_embeddings:
                raise ValueError(f"the model cannot generate {step.target!r} (it predicts "
                                 f"{', '.join(self.model.decoder_embeddings)})")
            weights = self._weights(step, guided, state)
            if registry.domain(step.target).kind == "sequence":
                self._sequence(state, step, guided, weights, generators)
                if observer:
                    observer(step.target, None, state)
            else:
                self._image(state, step, guided, weights, generators, observer)
            if schedule.grow_conditioning and step.target not in guided:
                guided.append(step.target)
        return state

    def unknown_tokens(self, state: dict, target: str) -> int:
        """How many tokens of an image target remain to decode; the same for every sample, or an error."""
        counts = state[target]["input_mask"].sum(1).unique()
        if len(counts) != 1:
            raise ValueError(f"{target}: the samples of a batch must leave the same number of tokens to generate "
                             f"(got {sorted(counts.tolist())}); batch them apart")
        return int(counts[0])

    # -- guidance -------------------------------------------------------------------------------------------------
    def _weights(self, step: Step, guided: list[str], state: dict) -> dict | None:
        """{condition or '*': weight}: '*' hides all guided conditions at once (classifier-free guidance)."""
        if step.guidance:
            missing = [m for m in step.guidance if m not in state or m == step.target]
            if missing:
                raise ValueError(f"{step.target}: guidance names {missing}, which are not conditions at this step "
                                 f"(conditions: {[m for m in state if m != step.target]})")
            return {m: float(w) for m, w in step.guidance.items()}
        hidden = [m for m in guided if m != step.target]
        if float(step.cfg) == 1.0 or not hidden:
            return None
        return {"*": float(step.cfg)}

    def _passes(self, state: dict, target: str, guided: list[str], weights: dict | None) -> list[dict]:
        """The states of the forward passes: [state] without guidance; else [unconditional, one per weight]."""
        if weights is None:
            return [state]
        hide = set(weights) if "*" not in weights else set(guided)
        hide.discard(target)
        unconditional = {m: self._emptied(m, d) if m in hide else d for m, d in state.items()}
        passes = [unconditional]
        for m in weights:
            if m == "*":
                passes.append(state)
            else:  # condition m alone (with what no guidance hides)
                passes.append({k: d if k == m or k not in hide else unconditional[k] for k, d in state.items()})
        return passes

    def _emptied(self, modality: str, entry: dict) -> dict:
        if registry.domain(modality).kind == "sequence":
            return sequence_entry([[self.sentinels[1]]] * len(entry["tensor"]), self.pad_id, self.device)
        return {"tensor": entry["tensor"], "input_mask": torch.ones_like(entry["input_mask"])}

    def _encode(self, passes: list[dict]):
        batch = _stack(passes, self.pad_id)
        visible = sum((~d["input_mask"]).sum(1) for m, d in batch.items() if m in self.model.encoder_embeddings)
        count = max(1, int(visible.max()))  # at least one slot: a pass that hides everything attends to padding
        with self._autocast():
            return self.model.encode(batch, count)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _uniform(self, generators, n: int) -> torch.Tensor:
        return torch.stack([torch.rand(n, generator=g) for g in generators]).to(self.device)

    # -- image targets --------------------------------------------------------------------------------------------
    def image_logits(self, passes: list[dict], target: str, positions: torch.Tensor,
                     weights: dict | None) -> torch.Tensor:
        """Guided logits (B, n, V) of the image target at `positions` (B, n), the queries attending to each
        other only (no other target is decoded at the same time)."""
        context, cross = self._encode(passes)
        embedding = self.model.decoder_embeddings[target]
        b, n = positions.shape
        p = len(passes)
        queries = (self.model.mask_token + embedding.pos_emb[0][positions] + embedding.mod_emb).repeat(p, 1, 1)
        self_mask = torch.zeros(p * b, n, n, dtype=torch.bool, device=self.device)
        with self._autocast():
            logits = embedding.to_logits(self.model.decode(queries, context, self_mask, cross)).float()
        return guide(logits.reshape(p, b, n, -1), list(weights.values()) if weights else None)

    def _image(self, state, step: Step, guided, weights, generators, observer) -> None:
        target = step.target
        if target not in state:
            size = self.model.cfg.grid_of(target) ** 2
            zeros = torch.zeros(len(generators), size, dtype=torch.long, device=self.device)
            state[target] = image_entry(zeros, zeros.bool())
        if step.scheme == "autoregressive":
            raise ValueError(f"{target}: image tokens are decoded with maskgit or roar, not autoregressive")
        for count, temperature in step.plan(self.unknown_tokens(state, target)):
            entry = state[target]
            unknown = entry["input_mask"]
            if step.scheme == "maskgit":  # every unknown position, in raster order
                order = torch.sort((~unknown).to(torch.uint8), dim=1, stable=True).indices
                positions = order[:, :int(unknown[0].sum())]
            else:  # roar: `count` unknown positions at random
                scores = self._uniform(generators, unknown.shape[1]).masked_fill(~unknown, 2.0)
                positions = scores.argsort(1)[:, :count]
            logits = self.image_logits(self._passes(state, target, guided, weights), target, positions, weights)
            ids, confidence = draw(logits, temperature, step.top_k, step.top_p,
                                   self._uniform(generators, positions.shape[1]))
            keep = confidence.topk(count, dim=1).indices if step.scheme == "maskgit" else \
                torch.arange(count, device=self.device).expand(len(ids), -1)
            kept = positions.gather(1, keep)
            entry["tensor"] = entry["tensor"].scatter(1, kept, ids.gather(1, keep))
            entry["input_mask"] = unknown.scatter(1, kept, False)
            if observer:
                observer(target, kept, state)

    # -- sequence targets -----------------------------------------------------------------------------------------
    def _sequence(self, state, step: Step, guided, weights, generators) -> None:
        target, b = step.target, len(generators)
        if step.scheme != "autoregressive":
            raise ValueError(f"{target}: captions and boxes are decoded left to right (scheme autoregressive), "
                             f"not {step.scheme}")
        if len(self.sentinels) < 3:
            raise ValueError(f"{target}: generating a sequence needs the text tokenizer's sentinel ids")
        if target not in state:
            state[target] = sequence_entry([[self.sentinels[1]]] * b, self.pad_id, self.device)
        inputs = sequence_rows(state[target])
        holes = [sum(t in self.sentinel_set for t in row) for row in inputs]
        if min(holes) == 0:
            raise ValueError(f"{target}: a given sequence has no sentinel to fill ([S_1] marks a gap)")
        final = torch.tensor([self.sentinels[k + 1] for k in holes], device=self.device)
        predicted = self.decode_sequence(self._passes(state, target, guided, weights), target, weights, step,
                                         generators, final)
        merged = []
        for row, tokens, end in zip(inputs, predicted.tolist(), final.tolist()):
            tokens = tokens[:tokens.index(end) + 1] if end in tokens else tokens
            merged.append(merge_spans(row, tokens, self.sentinel_set)[:registry.domain(target).max_tokens])
        state[target] = sequence_entry(merged, self.pad_id, self.device)

    def decode_sequence(self, passes, target: str, weights, step: Step, generators, final: torch.Tensor):
        """(B, T) tokens from [S_1] until each sample's final sentinel (then padding), `step.max_tokens` at most."""
        context, cross = self._encode(passes)
        embedding = self.model.decoder_embeddings[target]
        p, b = len(passes), len(generators)
        tokens = torch.full((b, 1), self.sentinels[1], dtype=torch.long, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        caches = [{} for _ in self.model.decoder] if self.cache else None
        # every sample draws all its numbers up front: how many the batch's longest sequence would use must not
        # change what a sample's generator gives the steps after this one
        uniform = self._uniform(generators, int(step.max_tokens))
        for t in range(int(step.max_tokens)):
            if self.cache:  # only the newest token; the earlier ones' keys and values are cached
                y = embedding.token_emb(tokens[:, -1:]) + embedding.pos_emb[0][t:t + 1] + embedding.mod_emb
                self_mask = torch.zeros(p * b, 1, t + 1, dtype=torch.bool, device=self.device)
            else:
                y = embedding.token_emb(tokens) + embedding.pos_emb[0][:t + 1] + embedding.mod_emb
                self_mask = torch.ones(t + 1, t + 1, dtype=torch.bool, device=self.device).triu(1).expand(p * b, -1, -1)
            with self._autocast():
                out = self.model.decode(y.repeat(p, 1, 1), context, self_mask, cross, caches)
                logits = embedding.to_logits(out[:, -1]).float()
            logits = guide(logits.reshape(p, b, -1), list(weights.values()) if weights else None)
            new, _ = draw(logits, step.temperature, step.top_k, step.top_p, uniform[:, t])
            new = new.masked_fill(done, self.pad_id)
            tokens = torch.cat([tokens, new[:, None]], 1)
            done |= new == final
            if bool(done.all()):
                break
        return tokens
