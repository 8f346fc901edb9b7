"""The modality registry: names, floors, and modalities added from outside the project going through every stage."""
import ast
import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from core import registry
from core.config import ConfigError, load_config
from tests.helpers import make_labelled_input

PROJECT = Path(__file__).resolve().parents[1]
FLOORS = ("pipeline", "stages", "models", "core")  # top to bottom: a floor imports only the floors below it

# String constants equal to a modality's name that are not modalities: the transfer task and NYUv2's folder named
# depth (and its rgb folder), Omnidata's conversion tasks, and the input table's caption column.
NOT_MODALITIES = {
    ("core/config.py", "depth"), ("core/config.py", "caption"), ("stages/download/inputs.py", "caption"),
    ("stages/transfer/transfer.py", "depth"), ("stages/transfer/transfer_data.py", "depth"), ("stages/transfer/transfer_data.py", "rgb"),
    ("models/transfer.py", "depth"), ("pipeline/deployments.py", "depth"), ("pipeline/cli.py", "depth"),
    ("pipeline/cli.py", "normal"), ("models/omnidata.py", "depth"), ("models/omnidata.py", "normal"),
}
DEFINITIONS = {"models/modalities.py", "models/modalities_4m21.py", "models/modalities_4m21_networks.py"}  # the modalities' own definitions (4M-7, 4M-21)


def project_files():
    for floor in FLOORS:
        yield from sorted((PROJECT / floor).rglob("*.py"))


def test_no_module_holds_a_modality_name_outside_the_definitions():
    known = registry.ModalitySet(["models.modalities_4m21", "models.modalities_4m21_networks"])  # 4M-21's too
    names = set(known.names()) | set(known.domain_names()) | {d.short_name for d in known.domains()}
    found = []
    for path in project_files():
        relative = path.relative_to(PROJECT).as_posix()
        if relative in DEFINITIONS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and (relative, node.value) not in NOT_MODALITIES:
                found.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert not found, "modality names outside the registry's definitions:\n" + "\n".join(found)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(project module imported, at module level?) for each import of a file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            continue
        for module in modules:
            if module.split(".")[0] in FLOORS:
                found.append((module, id(node) in top))
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PROJECT).with_suffix("").parts).removesuffix(".__init__")


def test_floors_import_only_downwards_and_without_cycles():
    known = {module_name(p) for p in project_files()}
    upward, graph = [], {}
    for path in project_files():
        name = module_name(path)
        floor = FLOORS.index(name.split(".")[0])
        graph[name] = set()
        for module, _ in imports_of(path):
            if FLOORS.index(module.split(".")[0]) < floor:
                upward.append(f"{name} imports {module}")
            target = module if module in known else module.rsplit(".", 1)[0]
            if target in known and target != name:
                graph[name].add(target)
    assert not upward, "imports from a higher floor:\n" + "\n".join(upward)

    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_registry_converts_the_spellings_and_refuses_unknown_names():
    depth = registry.get("depth")
    assert registry.domain("tok_depth").name == registry.domain("tok_depth@224").name == depth.token_folder
    assert registry.domain_or_modality("tok_depth@224") is depth and registry.of_folder(depth.token_folder)[0] is depth
    assert registry.domain(registry.photo().name).kind == "pixels"  # rgb means the pixels; tok_rgb the tokens
    with pytest.raises(registry.RegistryError, match="unknown modality 'dpeth'"):
        registry.get("dpeth")
    with pytest.raises(ConfigError, match="modalities: cannot import 'no_such_package.luma'"):
        load_config("demo", ["modalities=[no_such_package.luma]"])


# -- two modalities from outside the project, through every stage --------------------------------------------------
LUMA = '''
"""The image's brightness: a dense map labelled by a few lines of numpy, tokenized like depth."""
import numpy as np

from core.registry import Labeling, register
from models.labelers import ComputedLabeler
from models.modality_kinds import DenseModality


class LumaLabeler(ComputedLabeler):
    def compute(self, image):
        return image.astype(np.float32).mean(-1) / 255.0


class Luma(DenseModality):
    name, label_order, scale = "luma", 50, 65535.0
    labeler = Labeling(load=LumaLabeler)
    tokenizer = dict(in_channels=1, codebook_size=64, decoder="vit", loss="smooth_l1")


register(Luma())
'''
TONE = '''
"""A word for the image's tone: a sequence modality, read by 4M as text."""
from core.registry import Labeling, register
from models.labelers import ComputedLabeler
from models.modality_kinds import SequenceModality


class ToneLabeler(ComputedLabeler):
    def compute(self, image):
        return ("a bright" if image.mean() > 110 else "a dark") + " picture"


class Tone(SequenceModality):
    name, label_order = "tone", 60
    labeler = Labeling(load=ToneLabeler)


register(Tone())
'''
SETTINGS = ["tokenizer.batch_size=2", "tokenizer.epochs=4", "tokenizer.warmup_epochs=1", "tokenizer.checkpoint_every=4",
            "tokenizer.log_every=2", "tokenizer.eval_every=100", "tokenizer.eval_samples=2", "tokenizer.n_crops=2",
            "tokenizer.loader_workers=0", "label.chunk_size=2", "label.batch_size=2",
            "tokenizer.workers=1",  # on a Ray Train worker (the demo's own are in process): it imports the modules
            "pretrain.modalities=[rgb@224, tok_luma@224, caption, tone]", "pretrain.size=Ti",
            "pretrain.model={dim: 32, encoder_depth: 1, decoder_depth: 1, num_heads: 2}", "pretrain.batch_size=2",
            "pretrain.steps=4", "pretrain.warmup_steps=1", "pretrain.log_every=2", "pretrain.val_every=4",
            "pretrain.checkpoint_every=4", "pretrain.loader_workers=0", "pretrain.input_tokens=32",
            "pretrain.target_tokens=32", "pretrain.shuffle_buffer=4"]


@pytest.fixture(scope="module")
def plugin_profile(tmp_path_factory):
    """A profile outside the project naming two modality modules beside it (the demo's settings otherwise)."""
    folder = tmp_path_factory.mktemp("my_modalities")
    (folder / "luma.py").write_text(textwrap.dedent(LUMA))
    (folder / "tone.py").write_text(textwrap.dedent(TONE))
    profile = yaml.safe_load((PROJECT / "core" / "profiles" / "demo.yaml").read_text())
    profile["modalities"] = ["luma.py", "tone.py"]
    profile["quality"].update(min_clip_score=None, dedup=None)  # its datasets are not scored
    (folder / "mine.yaml").write_text(yaml.safe_dump(profile))
    return folder / "mine.yaml"


def test_a_configuration_works_with_its_own_modalities_only(plugin_profile):
    """Modalities a profile named earlier in the process are left out of another configuration's defaults."""
    mine = load_config(str(plugin_profile))
    assert "luma" in mine.label.labelers and "tok_luma@224" in mine.pretrain.modalities
    demo = load_config("demo")
    assert "luma" not in demo.label.labelers and "tok_luma@224" not in demo.pretrain.modalities
    assert "luma" not in demo.modality_set.names() and registry.get("luma").name == "luma"  # still found by name


def test_a_modality_set_travels_by_its_module_names_and_imports_them_where_it_arrives(plugin_profile):
    """What a worker on another machine gets: a section of the configuration, pickled; unpickled in a process
    that never loaded the profile, it lists the profile's modalities and checks assignments against them."""
    from pydantic import ValidationError

    mine = load_config(str(plugin_profile))
    mine.pretrain.modalities = ["rgb@224", "tok_luma@224"]  # checked against its own set, not the built-ins
    with pytest.raises(ValidationError, match="tok_luma"):
        load_config("demo").pretrain.modalities = ["rgb@224", "tok_luma@224"]
    script = ("import pickle, sys; label = pickle.load(sys.stdin.buffer); label.labelers = ['luma', 'tone']; "
              "print(' '.join(label.modality_set.names()))")
    arrived = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(mine.label), cwd=PROJECT,
                             capture_output=True)
    assert arrived.returncode == 0, arrived.stderr.decode()
    assert {"luma", "tone", "depth"} <= set(arrived.stdout.decode().split())


def test_modalities_defined_outside_the_project_go_through_every_stage(ray_address, plugin_profile, tmp_path):
    from stages.generate.generate import run_generation
    from stages.label.label import run_label
    from stages.fourm.pretrain import run_dir, run_pretrain
    from stages.tokenizers.tokenize import run_tokenize
    from stages.tokenizers.train_tokenizer import run_train_tokenizers
    from stages.dataset.verify import verify_dataset

    config = load_config(str(plugin_profile), SETTINGS)
    assert {"luma", "tone"} <= set(config.label.labelers) and "luma" in config.tokenizer.modalities
    root = tmp_path / "data"
    make_labelled_input(root)  # two shards of photos with captions; one image does not decode

    run_label(root, config, ["luma", "tone"])
    assert sorted(p.name for p in (root / "luma").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    stats = json.loads((root / "_status" / "label_tone" / "shard-000001.json").read_text())
    assert stats["status_counts"] == {"decode_error": 1, "ok": 1}  # key 3 does not decode

    trained = run_train_tokenizers(root, config, ["text", "luma"])
    assert trained["luma"]["steps"] > 0 and (root / "tokenizers" / "luma" / "reconstructions.png").is_file()
    assert (root / "tokenizers" / "luma" / "ray").is_dir()  # trained by a Ray Train worker: its run state
    vocabulary = json.loads((root / "tokenizers" / "text" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "bright" in vocabulary and "dark" in vocabulary  # the tone texts went into the text tokenizer

    summary = run_tokenize(root, config, ["luma"])
    assert summary.shards_done == 2 and summary.status_counts["luma"]["ok"] == 4
    assert (root / "tok_luma@224" / "shard-000001.tar").is_file()
    assert json.loads((root / "_status/modalities.json").read_text()) == {"modules": config.modalities}
    problems, checked = verify_dataset(root)
    assert not problems and checked["folders"] >= 5  # rgb, caption, luma, tone, crops, tokens: all aligned
    # a new process given no profile: the dataset says which modules its modalities need (not found, its
    # folders' members would be problems)
    verified = subprocess.run([sys.executable, "-m", "pipeline", "verify", "--data", str(root)], cwd=PROJECT,
                              capture_output=True, text=True)
    assert verified.returncode == 0 and f"x {checked['folders']} folders" in verified.stdout, verified.stdout

    result = run_pretrain(root, config)
    assert {"loss.tok_luma@224", "loss.tone"} <= set(result["final"])
    assert Path(result["predictions"]).is_file()  # luma predicted from RGB, decoded by its tokenizer

    out = tmp_path / "generated"
    request = {"name": "toy", "conditions": {"caption": "a photo of a rocket"}, "targets": ["tok_luma", "tone"],
               "steps": 2}
    run_generation([request], run_dir(root), root / "tokenizers", out, device="cpu")
    sample = out / "toy" / "sample-0"
    assert np.load(sample / "luma.npy").shape == (14, 14) and (sample / "luma.png").is_file()
    assert (sample / "tone.txt").read_text().strip() != "" or (sample / "tone.npy").is_file()


# -- the files the stages write keep the umask's permissions -------------------------------------------------------
def test_atomic_writes_give_files_the_umasks_permissions(tmp_path):
    import torch

    from core.files import save_safetensors, write_json
    from core.pictures import figure_backend, save_figure
    from models.vqvae import VQVAE, save_tokenizer, tokenizer_config
    from stages.dataset.shards import DatasetLayout, ShardWriter
    from stages.training import write_checkpoint

    previous = os.umask(0o022)
    try:
        save_tokenizer(VQVAE(tokenizer_config("depth", "tiny")), tmp_path / "tokenizer")
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "weights.safetensors")
        write_checkpoint(tmp_path / "checkpoint", {"w": torch.zeros(2)}, {}, 1, {})
        write_json(tmp_path / "results.json", {"ok": True})
        plt = figure_backend()
        save_figure(plt.figure(), tmp_path / "picture.png", dpi=20)
        import pyarrow as pa

        with ShardWriter(DatasetLayout(tmp_path / "data"), "download", "shard-000000", ["rgb"]) as writer:
            writer.write("000000000", {"rgb": ("jpg", b"bytes")})
            writer.commit(pa.table({"key": ["000000000"], "status": ["ok"]}), {"rows": 1})
    finally:
        os.umask(previous)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 10
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {"0o644"}, modes
    folders = {oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.rglob("*") if p.is_dir()}
    assert folders == {"0o755"}


def test_readme_names_only_commands_and_targets_that_exist():
    import re

    from pipeline.cli import build_parser

    readme = (PROJECT / "README.md").read_text()
    makefile = (PROJECT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.M))
    named = {t for t in re.findall(r"\bmake ([a-z][a-z0-9-]*)", readme) if not t.endswith("-")}  # not bench-*
    assert named and not named - targets, f"README names make targets that do not exist: {named - targets}"
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    used = set(re.findall(r"python -m pipeline ([a-z][a-z0-9-]*)", readme))
    assert used and not used - commands, f"README names commands that do not exist: {used - commands}"


PATCH14 = '''
from core.registry import register
from models.modality_kinds import FeatureMapModality


class Patch14(FeatureMapModality):
    """A feature map of 14-pixel patches (DINOv2's): 16x16 tokens at 224."""

    name, label_order, token_grid = "patch14", 50, 16
    tokenizer = dict(in_channels=8, codebook_size=32, decoder="vit", loss="smooth_l1", patch_size=1)


register(Patch14())
'''


def test_an_image_modality_with_its_own_token_grid_is_masked_modelled_generated_and_verified(tmp_path):
    """4M-21's DINOv2 and ImageBind tokens are 16x16 at 224 (14-pixel patches), their global tokens 4x4: a grid
    is the modality's, not the model's."""
    import torch

    from models.fourm import FourM, FourMConfig
    from models.generate import Sampler, Schedule, Step
    from stages.dataset.verify import _check_member as check_member
    from stages.fourm.masking import Component, MaskingSampler

    (tmp_path / "patch14.py").write_text(PATCH14)
    registry.ModalitySet([str(tmp_path / "patch14.py")])
    domain = registry.domain("tok_patch14")
    assert (domain.name, domain.grid, domain.max_tokens) == ("tok_patch14@224", 16, 256)
    names = ["rgb@224", "tok_patch14@224"]
    sampler = MaskingSampler(names, [Component(dict.fromkeys(names, 1.0), {"tok_patch14@224": 1.0})], 64, 64)
    assert sampler.caps.tolist() == [196, 256]
    rng = np.random.default_rng(0)
    samples = [sampler({"rgb@224": torch.zeros(3, 224, 224), "tok_patch14@224": torch.randint(32, (256,))}, rng)
               for _ in range(2)]
    batch = {m: {k: torch.stack([s[m][k] for s in samples]) for k in samples[0][m]} for m in names}
    assert batch["tok_patch14@224"]["input_mask"].shape == (2, 256)
    torch.manual_seed(0)
    model = FourM(FourMConfig(domains_in=names, domains_out=["tok_patch14@224"], dim=64, encoder_depth=1,
                              decoder_depth=1, num_heads=4, modality_modules=[str(tmp_path / "patch14.py")]))
    assert model.decoder_embeddings["tok_patch14@224"].pos_emb.shape[-2] == 256
    loss, _ = model(batch, 64, 64)
    assert torch.isfinite(loss)
    assert model.predict_from_rgb(torch.zeros(2, 3, 224, 224), ["tok_patch14@224"])["tok_patch14@224"].shape == (2, 256)
    state = {"rgb@224": batch["rgb@224"]}
    Sampler(model).generate(state, Schedule([Step("tok_patch14@224", "maskgit", 4)]), ["rgb@224"], [0, 1])
    assert state["tok_patch14@224"]["tensor"].shape == (2, 256) and not state["tok_patch14@224"]["input_mask"].any()
    good, bad = np.zeros((2, 256), np.int16), np.zeros((2, 196), np.int16)
    assert check_member("tok_patch14@224", "k.npy", npy(good), 32)[0] is None
    assert "expected int16 (n_crops, 256)" in check_member("tok_patch14@224", "k.npy", npy(bad), 32)[0]


def npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
