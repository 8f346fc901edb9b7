"""The text tokenizer shared by captions and boxes: one WordPiece vocabulary (Hugging Face `tokenizers`).

Layout, as the reference implementation's (ids in this order):

    0..3        [PAD] [UNK] [SOS] [EOS]
    4..203      [S_0] .. [S_199]               sentinels for span masking
    204..4203   v0=0..v0=999, v1=.., v2=.., v3=..   one set of 1000 coordinate bins per box corner value
    4204..4283  the 80 COCO class names in alphabetical order, each a single token (even "baseball bat")
    4284..      WordPiece pieces learned from the dataset's captions (30K ids in all in the `paper` profile)

All 4284 fixed tokens are special and single-word, as the reference's: a token matches a whole word only, so
"hotdog" stays a word. Class names are matched after normalization (lowercase), so "Dog" in a caption is the
same token as a box's "dog"; sentinels and coordinates are matched as written. BERT normalizer (lowercase) and
pre-tokenizer, no post-processor, WordPiece decoder.

Boxes serialize as in the paper (Pix2Seq): objects ordered by the distance of (xmin, ymin) to the origin,
each as `v0=xmin v1=ymin v2=xmax v3=ymax class name`, coordinates round(c * 999).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from core.files import write_bytes
from models.coco import COCO_THINGS

CLASS_TOKENS = sorted(COCO_THINGS)  # the reference orders the class names alphabetically: 4204 airplane
CONTROL_TOKENS = ["[PAD]", "[UNK]", "[SOS]", "[EOS]"]
SENTINEL_TOKENS = [f"[S_{i}]" for i in range(200)]
COORD_BINS = 1000
COORD_TOKENS = [f"v{corner}={i}" for corner in range(4) for i in range(COORD_BINS)]
PAD_ID, UNK_ID, SOS_ID, EOS_ID = range(4)


class BoxTextError(ValueError):
    """Box text that does not parse back into boxes."""


def build_trainer(vocab_size: int):
    from tokenizers import AddedToken, trainers

    fixed = ([AddedToken(t, special=True) for t in CONTROL_TOKENS]
             + [AddedToken(t, special=True, single_word=True, normalized=False) for t in SENTINEL_TOKENS + COORD_TOKENS]
             + [AddedToken(t, special=True, single_word=True, normalized=True) for t in CLASS_TOKENS])
    if vocab_size <= len(fixed):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for learned pieces (the fixed tokens take "
                         f"{len(fixed)})")
    return trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=fixed, show_progress=False)


def train_text_tokenizer(captions: Iterable[str], vocab_size: int, path: str | Path | None = None):
    """Fit the WordPiece pieces on captions; save to `path` (tokenizer.json) when given."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(captions, build_trainer(vocab_size))
    if path is not None:  # whole or not at all, on a disk or on object storage
        write_bytes(path, tokenizer.to_str(pretty=True).encode())
    return tokenizer


def fixed_token_problems(tokenizer) -> list[str]:
    """How a tokenizer's fixed tokens differ from the layout above (the reference's), by token: a published
    text tokenizer must give every sentinel, coordinate and class name the id 4M's weights expect."""
    fixed = CONTROL_TOKENS + SENTINEL_TOKENS + COORD_TOKENS + CLASS_TOKENS
    problems = [f"{token!r} has id {tokenizer.token_to_id(token)}, not {i}" for i, token in enumerate(fixed)
                if tokenizer.token_to_id(token) != i]
    return problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])


def load_text_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def boxes_to_text(instances: list[dict]) -> str:
    """The det JSON's instances -> the box sequence (nearest top-left corner first)."""
    def corner_distance(inst):
        x0, y0 = inst["boxes"][:2]
        return math.hypot(x0, y0)

    parts = []
    for inst in sorted(instances, key=corner_distance):
        bins = [min(COORD_BINS - 1, max(0, round(float(c) * (COORD_BINS - 1)))) for c in inst["boxes"]]
        parts.append(" ".join(f"v{corner}={b}" for corner, b in enumerate(bins)) + f" {inst['class_name']}")
    return " ".join(parts)


def text_to_boxes(text: str) -> list[dict]:
    """A box sequence -> instances with normalized coordinates (bin centres: within one bin of the input)."""
    words, instances, i = text.split(), [], 0
    while i < len(words):
        corners = words[i:i + 4]
        if len(corners) < 4 or any(not w.startswith(f"v{c}=") for c, w in enumerate(corners)):
            raise BoxTextError(f"expected v0= v1= v2= v3= at word {i} of {text!r}")
        try:
            coords = [int(w.split("=", 1)[1]) / (COORD_BINS - 1) for w in corners]
        except ValueError:
            raise BoxTextError(f"coordinate token in {corners} of {text!r} is not a bin number") from None
        i += 4
        name = []
        while i < len(words) and not words[i].startswith("v0="):
            name.append(words[i])
            i += 1
        if not name:
            raise BoxTextError(f"box {coords} in {text!r} has no class name")
        instances.append({"boxes": coords, "class_name": " ".join(name)})
    return instances


def encode_text(tokenizer, text: str) -> list[int]:
    """[SOS] pieces [EOS]."""
    return [SOS_ID, *tokenizer.encode(text, add_special_tokens=False).ids, EOS_ID]


def decode_text(tokenizer, ids: Iterable[int]) -> str:
    """Ids -> text; control tokens dropped, sentinels, coordinates and class names kept."""
    kept = [int(i) for i in ids if int(i) not in (PAD_ID, SOS_ID, EOS_ID)]
    return tokenizer.decode(kept, skip_special_tokens=False)
