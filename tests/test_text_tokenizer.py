"""The WordPiece vocabulary for captions and boxes: reference layout and a lossless box round trip."""
import random
from pathlib import Path

import pytest

from models.coco import COCO_THINGS
from models.text_tokenizer import (
    BoxTextError,
    boxes_to_text,
    decode_text,
    encode_text,
    load_text_tokenizer,
    text_to_boxes,
    train_text_tokenizer,
)

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CAPTIONS = ["A dog sitting on a couch next to a Baseball bat.", "Hotdog stand in the city at night",
            "two cats and a dog on a red sofa", "a person riding a motorcycle down the road",
            "an astronaut in a white suit holding a flag", "a cup of coffee on a wooden table"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tokenizer.json"
    train_text_tokenizer(CAPTIONS, vocab_size=4500, path=path)
    return load_text_tokenizer(path)  # through the saved file, as the stages load it


def test_vocabulary_has_the_reference_layout_id_for_id_and_flag_for_flag(tokenizer, tmp_path):
    """Ids 0-4283 against the reference's published vocabulary (tests/fixtures/reference/make_text_vocab.py)."""
    import json

    reference = json.loads((FIXTURES / "text_vocab_added_tokens.json").read_text())
    assert len(reference["tokens"]) == 4284
    tokenizer.save(str(tmp_path / "saved.json"))
    added = json.loads((tmp_path / "saved.json").read_text())["added_tokens"]
    ours = [[t["content"], *(t[c] for c in reference["columns"][1:])] for t in added]
    assert [t["id"] for t in added] == list(range(4284))
    mismatched = [(i, o, r) for i, (o, r) in enumerate(zip(ours, reference["tokens"])) if o != r]
    assert not mismatched, f"{len(mismatched)} ids differ from the reference, first {mismatched[:3]}"
    assert [tokenizer.id_to_token(i) for i in range(4284)] == [r[0] for r in reference["tokens"]]
    assert tokenizer.token_to_id("airplane") == 4204 and tokenizer.token_to_id("zebra") == 4283
    assert 4284 < tokenizer.get_vocab_size() <= 4500  # learned pieces after the fixed tokens
    assert all(tokenizer.id_to_token(i) is not None for i in range(tokenizer.get_vocab_size()))


def test_class_names_are_single_tokens_in_captions(tokenizer):
    tokens = tokenizer.encode("A Baseball Bat next to a Hotdog and a dog").tokens
    assert "baseball bat" in tokens and "dog" in tokens
    assert "hotdog" not in tokens or tokenizer.token_to_id("hotdog") >= 4284  # a word, not the class "dog"
    ids = encode_text(tokenizer, "A Baseball Bat")
    assert ids[0] == 2 and ids[-1] == 3 and ids[2] == tokenizer.token_to_id("baseball bat")
    assert decode_text(tokenizer, ids + [0, 0]) == "a baseball bat"


def test_boxes_are_ordered_by_corner_distance():
    text = boxes_to_text([{"boxes": [0.5, 0.5, 0.9, 0.9], "class_name": "dog"},
                          {"boxes": [0.1, 0.0, 0.3, 0.2], "class_name": "baseball bat"}])
    assert text == "v0=100 v1=0 v2=300 v3=200 baseball bat v0=500 v1=500 v2=899 v3=899 dog"


def test_boxes_survive_text_and_ids_within_one_bin(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        instances = []
        for _ in range(rng.randint(0, 6)):
            x0, y0 = rng.random() * 0.8, rng.random() * 0.8
            instances.append({"boxes": [x0, y0, x0 + rng.random() * (1 - x0), y0 + rng.random() * (1 - y0)],
                              "class_name": rng.choice(COCO_THINGS), "score": 0.9})
        ids = encode_text(tokenizer, boxes_to_text(instances))
        assert tokenizer.token_to_id("[UNK]") not in ids
        back = text_to_boxes(decode_text(tokenizer, ids))
        ordered = sorted(instances, key=lambda inst: (inst["boxes"][0] ** 2 + inst["boxes"][1] ** 2))
        assert [b["class_name"] for b in back] == [i["class_name"] for i in ordered]
        for b, i in zip(back, ordered):
            assert all(abs(u - v) <= 1 / 999 for u, v in zip(b["boxes"], i["boxes"]))


def test_malformed_box_text_is_named():
    with pytest.raises(BoxTextError, match="has no class name"):
        text_to_boxes("v0=1 v1=2 v2=3 v3=4")
    with pytest.raises(BoxTextError, match="expected v0= v1= v2= v3= at word 0"):
        text_to_boxes("dog v0=1")


def reference_layout_tokenizer(path: Path, swap: tuple[int, int] | None = None) -> Path:
    """A tokenizer file built as the reference's published one is: its 4284 fixed tokens (the fixture, flags and
    all) at their ids, then a few WordPiece pieces; `swap` exchanges two fixed tokens."""
    import json

    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    rows = json.loads((FIXTURES / "text_vocab_added_tokens.json").read_text())["tokens"]
    if swap:
        rows[swap[0]], rows[swap[1]] = rows[swap[1]], rows[swap[0]]
    pieces = [r[0] for r in rows] + ["a", "photo", "##s", "on", "the"]
    tokenizer = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.add_special_tokens([AddedToken(c, single_word=s, normalized=n, lstrip=ls, rstrip=rs)
                                  for c, _, s, n, ls, rs in rows])
    tokenizer.save(str(path))
    return path


def test_a_published_text_tokenizer_is_installed_as_the_datasets_when_its_fixed_ids_are_the_references(tmp_path):
    """`tokenizer.published.text`: the reference's tokenizer file, which its 4M weights read captions with,
    installed instead of training one; a file whose fixed tokens sit at other ids is refused by token."""
    from core.config import load_config
    from stages.tokenizers.train_tokenizer import TokenizerInputError, run_train_tokenizers

    published = reference_layout_tokenizer(tmp_path / "text_tokenizer_4m_wordpiece_30k.json")
    config = load_config("demo", [f"tokenizer.published={{text: {published}}}"])
    result = run_train_tokenizers(tmp_path / "data", config, ["text"])["text"]
    assert result["converted_from"] == str(published) and result["vocab_size"] == 4289
    installed = tmp_path / "data/tokenizers/text/tokenizer.json"
    assert installed.read_bytes() == published.read_bytes()
    tokenizer = load_text_tokenizer(installed)
    assert encode_text(tokenizer, "v0=12 a cat")[1:4] == [204 + 12, 4289 - 5, 4224]  # coordinate, piece, class
    swapped = reference_layout_tokenizer(tmp_path / "swapped.json", swap=(5, 6))
    with pytest.raises(TokenizerInputError, match=r"'\[S_1\]' has id 6, not 5"):
        run_train_tokenizers(tmp_path / "other", load_config("demo", [f"tokenizer.published={{text: {swapped}}}"]),
                             ["text"])
    assert not (tmp_path / "other/tokenizers/text").exists()
