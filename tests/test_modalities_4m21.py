"""4M-21's modalities, each one registry entry in `models/modalities_4m21.py`, against the reference's own
transforms (fixtures made by tests/fixtures/reference/make_palette_texts.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

from core import registry
from core.config import load_config
from tests.helpers import photo

FIXTURE = json.loads((Path(__file__).parent / "fixtures/reference/palette_texts.json").read_text())
MODULE = "models.modalities_4m21"


@pytest.fixture
def m21():
    """The module, imported the way a profile imports it (imported directly, it would join every listing)."""
    import importlib

    registry.use([MODULE])
    yield importlib.import_module(MODULE)
    registry.use()


def test_palette_texts_equal_the_references_for_every_size(m21):
    modality, palette_text, text_palette = m21.ColorPalette(), m21.palette_text, m21.text_palette
    for name, stored in FIXTURE["photos"].items():
        texts = FIXTURE["texts"][name]
        assert sorted(texts, key=int) == [str(n) for n in range(1, 8)]
        for size, text in texts.items():
            assert palette_text(stored, int(size)) == text
        data = json.dumps(stored).encode()
        assert modality.to_text(data, None, None, 0.0) == texts["7"]  # without a generator (validation): all 7
        rng = np.random.default_rng(0)
        drawn = [modality.to_text(data, None, None, 0.0, rng=rng) for _ in range(200)]
        assert set(drawn) == set(texts.values())  # training draws a size per load, as the reference does
        assert text_palette(texts["3"]) == stored[0]["3"]


def test_the_labeler_stores_the_references_format_the_same_each_time(m21):
    modality, labeler = m21.ColorPalette(), m21.PaletteLabeler()
    for name, stored in FIXTURE["photos"].items():
        label = labeler.compute(np.asarray(photo(name)))
        assert json.loads(modality.encode(label)) == stored  # the reference read exactly these (fixture)
        assert [len(label[str(n)]) for n in range(1, 8)] == list(range(1, 8))  # a photo has 7 colours to give
        assert all(0 <= v <= 255 and isinstance(v, int) for colours in label.values() for c in colours for v in c)
    flat = labeler.compute(np.full((40, 30, 3), 200, np.uint8))  # one colour: every size gives that one
    assert all(colours == [[200, 200, 200]] for colours in flat.values())


def test_palette_texts_are_whole_tokens_of_the_caption_vocabulary(tmp_path):
    from models.text_tokenizer import load_text_tokenizer, train_text_tokenizer

    train_text_tokenizer(["a photo of a cat"], 4500, tmp_path / "tokenizer.json")
    tokenizer = load_text_tokenizer(tmp_path / "tokenizer.json")
    ids = tokenizer.encode(FIXTURE["texts"]["coffee"]["7"]).ids
    assert len(ids) == 1 + 7 * 3 and tokenizer.token_to_id("[UNK]") not in ids  # + EOS + sentinel: the 23 allowed


def test_a_profile_names_the_4m21_modalities_the_paper_profile_keeps_the_seven(m21):
    try:
        paper = load_config("paper")
        assert "color_palette" not in registry.names() and "color_palette" not in paper.label.labelers
        mine = load_config("paper", ["modalities=[models.modalities_4m21]"])
        assert "color_palette" in registry.names() and "color_palette" in mine.label.labelers
        domain = registry.domain("color_palette")
        assert (domain.kind, domain.folder, domain.vocab_size) == ("sequence", "color_palette", 30000)
        stored = FIXTURE["photos"]["astronaut"]
        picture = registry.get("color_palette").picture(stored, None)
        assert picture.shape == (224, 224, 3) and np.allclose(picture[0, 0], np.array(stored[0]["7"][0]) / 255)
    finally:
        registry.use()
    assert "color_palette" not in registry.names()


@pytest.mark.parametrize("text, colours", [("v1=2 v0=1 v0=2 v0=3 v0=4 v0=5", [[1, 2, 3]]), ("a cat", [])])
def test_a_generated_palette_keeps_whole_colours(m21, text, colours):
    assert m21.ColorPalette().generated(text) == {"colours": colours}


def test_the_loader_draws_a_palette_size_per_training_load_and_reads_all_seven_in_validation(m21):
    import io

    from stages.dataset.shards import CROPS
    from stages.fourm.fourm_data import decode_sample

    registry.use([MODULE])
    crops = io.BytesIO()
    np.save(crops, np.array([[0, 0, 64, 64, 0]]))
    stored = FIXTURE["photos"]["coffee"]
    raw = {CROPS: crops.getvalue(), "color_palette": json.dumps(stored).encode()}
    texts = FIXTURE["texts"]["coffee"]
    assert decode_sample(raw, ["color_palette"], 0, 0.0)["color_palette"] == texts["7"]  # validation: no generator
    rng = np.random.default_rng(0)
    drawn = {decode_sample(raw, ["color_palette"], 0, 0.0, rng)["color_palette"] for _ in range(100)}
    assert drawn == set(texts.values())
