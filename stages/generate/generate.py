"""Generation requests in, generated modalities on disk out: `python -m pipeline generate` and the `generate` flow.

Consumes  a 4M model folder (a pretraining run or a convert-4m output), the dataset's tokenizers folder
          (<root>/tokenizers: text/tokenizer.json and one VQ-VAE per image modality, to turn condition files into
          tokens and generated tokens back into pictures), and requests: command-line flags or a JSONL file, one per
          line, e.g.
              {"name": "bus", "conditions": {"caption": "a red bus on a street"}, "targets": ["tok_clip", "tok_rgb"],
               "scheme": "maskgit", "steps": 8, "cfg": 3.0, "seed": 0, "samples": 4}
          with "schedule" (a chained schedule, inline or a YAML path) in place of targets/scheme/steps, and
          "inpaint": {"tok_rgb": [row0, row1, col0, col1]} to regenerate a region of a given image's 14x14 tokens.
          Condition values: a caption's text; box text (`v0=.. v1=.. v2=.. v3=.. class`) or a JSON file of boxes
          for det; an image file for rgb (pixels) and tok_rgb, tok_depth (16-bit PNG), tok_normal, tok_semseg (class
          ids), tokenized by the dataset's tokenizer; a .npy of 196 ids for any tok_* (-1 = to generate).
Produces  <out>/<request>/sample-<i>/: <modality>.npy (token ids) and <modality>.png (RGB, depth and normals through
          the diffusion decoders, segmentation in the palette, CLIP as principal components, boxes drawn),
          caption.txt / det.txt, grid.png (conditions, then every generated modality), and sample.json last (what
          was written, and what decided it); <out>/results.json. A rerun keeps every sample whose sample.json
          matches its request, seed and model, and generates the rest.

Every request is checked before any work (unknown modality, a condition the model has no embedding for, an
unreadable image, a caption past the sequence budget), naming the value and the request. Requests with the same
conditions, schedule and in-painted regions share batches; each sample draws from its own seed (seed + i), so its
result does not depend on the batch it ran in.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch

from core import registry
from core.files import npy_bytes, write_bytes, write_json
from core.pictures import figure_backend, png_bytes, save_figure
from core.storage import MODEL_FILES, data_path, is_remote, local_copy
from models.fourm import FourM
from models.generate import (
    Sampler,
    Schedule,
    Step,
    embeddings_entry,
    image_entry,
    pixels_entry,
    sequence_entry,
    sequence_rows,
)
from models.text_tokenizer import EOS_ID, decode_text, load_text_tokenizer
from stages.fourm.fourm_data import crop_pixels, pixels_picture
from stages.tokenizers import dataset_tokenizers as tokenizers
from stages.tokenizers.tokenizer_data import center_crop, crop_to_tensor, tokenizer_name

IMAGE_SIZE = 224


class GenerateInputError(ValueError):
    """A request that cannot run: names the request and the value."""


# -- reading requests -----------------------------------------------------------------------------------------------
def resolve(name: str, known: list[str], where: str) -> str:
    """A modality as users write it (`rgb`, `tok_clip`, `caption`) -> the registry's name (`rgb@224`, ...)."""
    try:
        candidate = registry.domain(name).name
    except registry.RegistryError:
        raise GenerateInputError(f"{where}: unknown modality {name!r} (known: {', '.join(known)})"
                                 ) from None
    if candidate not in known:
        raise GenerateInputError(f"{where}: the model has no {candidate!r} (it knows {', '.join(known)})")
    return candidate


def read_requests(path: str | Path) -> list[dict]:
    path = data_path(path)
    if not path.is_file():
        raise GenerateInputError(f"no requests file at {path} (JSONL: one request per line, see the README)")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerateInputError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(request, dict):
            raise GenerateInputError(f"{path}:{number}: a request is a JSON object, not {type(request).__name__}")
        request.setdefault("name", f"{path.stem}-{number:04d}")
        requests.append(request)
    if not requests:
        raise GenerateInputError(f"{path}: no requests")
    return requests


def schedule_of(raw: dict, where: str) -> Schedule:
    """The request's chained schedule: its `schedule` (a mapping or a YAML file), or one step per target."""
    import yaml

    if raw.get("schedule") is not None:
        data = raw["schedule"]
        if isinstance(data, str):
            if not Path(data).is_file():
                raise GenerateInputError(f"{where}: no schedule file {data!r}")
            data = yaml.safe_load(Path(data).read_text())
        try:
            return Schedule.from_dict(data)
        except (TypeError, ValueError) as err:
            raise GenerateInputError(f"{where}: {err}") from None
    targets = raw.get("targets")
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    if not targets:
        raise GenerateInputError(f"{where}: no targets (give `targets` or a `schedule`)")
    steps = []
    for target in targets:
        try:
            sequence = registry.domain(target).kind == "sequence"
        except registry.RegistryError:
            sequence = False  # named by the request check, against the model
        settings = {k: raw[k] for k in ("steps", "temperature", "temperature_schedule", "token_schedule", "cfg",
                                        "guidance", "top_k", "top_p") if raw.get(k) is not None}
        try:
            steps.append(Step(target, "autoregressive" if sequence else raw.get("scheme", "maskgit"), **settings))
        except (TypeError, ValueError) as err:
            raise GenerateInputError(f"{where}: {err}") from None
    return Schedule(steps, bool(raw.get("grow_conditioning", False)))


@dataclasses.dataclass
class Request:
    name: str
    conditions: dict          # modality -> value (text, a file path)
    schedule: Schedule
    seed: int = 0
    samples: int = 1
    inpaint: dict = dataclasses.field(default_factory=dict)   # modality -> (row0, row1, col0, col1)

    def signature(self) -> str:
        """Requests that may share a batch: the same kinds of conditions, schedule and regions."""
        ids_files = sorted(str(v) for v in self.conditions.values() if str(v).endswith(".npy"))  # own unknowns
        return json.dumps([sorted(self.conditions), self.schedule.to_dict(), sorted(self.inpaint.items()), ids_files])


class Resources:
    """The model and the tokenizers a batch needs, loaded once."""

    def __init__(self, model_dir, tokenizers_dir, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model_dir, self.tokenizers_dir = data_path(model_dir), data_path(tokenizers_dir)
        try:
            self.model = FourM.from_pretrained(local_copy(self.model_dir, MODEL_FILES), device=self.device).eval()
        except FileNotFoundError as err:
            raise GenerateInputError(str(err)) from None
        self._tokenizers, self._text = {}, None

    @property
    def inputs(self) -> list[str]:
        return list(self.model.cfg.domains_in)

    @property
    def outputs(self) -> list[str]:
        return list(self.model.cfg.domains_out)

    @property
    def text_path(self) -> Path:
        return self.tokenizers_dir / registry.TEXT / "tokenizer.json"

    def folder(self, modality: str) -> Path:
        return self.tokenizers_dir / tokenizer_name(modality)

    def tokenizer(self, modality: str):
        if modality not in self._tokenizers:
            self._tokenizers[modality] = tokenizers.load_folder(local_copy(self.folder(modality), MODEL_FILES),
                                                                modality, self.device)
        return self._tokenizers[modality]

    @property
    def text(self):
        if self._text is None:
            self._text = load_text_tokenizer(local_copy(self.text_path.parent, ("tokenizer.json",)) / "tokenizer.json")
        return self._text

    def sampler(self, cache: bool = True) -> Sampler:
        sentinels = [self.text.token_to_id(f"[S_{i}]") for i in range(200)] if self.needs_text else None
        return Sampler(self.model, sentinels, pad_id=0, cache=cache)

    @property
    def needs_text(self) -> bool:
        return any(registry.domain(m).kind == "sequence" for m in [*self.inputs, *self.outputs])


REQUEST_KEYS = {"name", "conditions", "targets", "schedule", "scheme", "steps", "temperature", "temperature_schedule",
                "token_schedule", "cfg", "guidance", "top_k", "top_p", "seed", "samples", "inpaint",
                "grow_conditioning"}


def _require(path: Path, what: str, where: str) -> None:
    if not path.is_file():
        raise GenerateInputError(f"{where}: {what} needs {path}, which does not exist (train the tokenizer first)")


def parse_request(raw: dict, resources: Resources) -> Request:
    """A request checked against the model and the tokenizers; every condition read once to prove it reads."""
    name = str(raw.get("name", "request"))
    where = f"request {name!r}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise GenerateInputError(f"{where}: a name may hold letters, digits, '.', '_' and '-' only")
    unknown = sorted(set(raw) - REQUEST_KEYS)
    if unknown:
        raise GenerateInputError(f"{where}: unknown keys {unknown} (known: {', '.join(sorted(REQUEST_KEYS))})")
    conditions = {resolve(m, resources.inputs, f"{where}, condition {m!r}"): v
                  for m, v in (raw.get("conditions") or {}).items()}
    schedule = schedule_of(raw, where)
    steps = [dataclasses.replace(s, target=resolve(s.target, resources.outputs, f"{where}, target {s.target!r}"),
                                 guidance={resolve(m, resources.inputs, f"{where}, guidance {m!r}"): w
                                           for m, w in s.guidance.items()}) for s in schedule.steps]
    schedule = Schedule(steps, schedule.grow_conditioning)
    inpaint = {}
    for m, region in (raw.get("inpaint") or {}).items():
        modality = resolve(m, resources.inputs, f"{where}, inpaint {m!r}")
        if modality not in conditions or registry.domain(modality).kind != "tokens":
            raise GenerateInputError(f"{where}: inpaint {m!r} needs the same image modality as a condition")
        grid = resources.model.cfg.grid_of(modality)
        if (not isinstance(region, (list, tuple)) or len(region) != 4
                or not (0 <= region[0] < region[1] <= grid and 0 <= region[2] < region[3] <= grid)):
            raise GenerateInputError(f"{where}: inpaint region {region!r} for {m!r} must be [row0, row1, col0, col1] "
                                     f"within the {grid}x{grid} token grid")
        inpaint[modality] = tuple(int(v) for v in region)
        if modality not in [s.target for s in schedule.steps]:
            schedule.steps.append(Step(modality, "maskgit", schedule.steps[0].steps if schedule.steps else 8))
    for step in schedule.steps:
        given = conditions.get(step.target)
        if given is not None and step.target not in inpaint and registry.domain(step.target).kind == "tokens" \
                and not str(given).endswith(".npy"):
            raise GenerateInputError(f"{where}: {step.target} is both a full condition and a target (give an "
                                     f"inpaint region, or ids with -1 where to generate)")
        if registry.domain(step.target).kind == "sequence" and given is not None and "[S_" not in str(given):
            raise GenerateInputError(f"{where}: {step.target} is both a full condition and a target (mark the gaps "
                                     f"to fill with [S_1], [S_2], ...)")
        available = set(conditions) | {s.target for s in schedule.steps[:schedule.steps.index(step)]}
        strange = sorted(set(step.guidance) - (available - {step.target}))
        if strange:
            raise GenerateInputError(f"{where}: guidance for {step.target} names {strange}, which are not "
                                     f"conditions at that step (the conditions and earlier targets are)")
        if registry.domain(step.target).kind == "tokens":
            _require(resources.folder(step.target) / "model.safetensors", f"drawing {step.target}", where)
    try:
        seed, samples = int(raw.get("seed", 0)), int(raw.get("samples", 1))
    except (TypeError, ValueError):
        raise GenerateInputError(f"{where}: seed and samples must be integers") from None
    if samples < 1:
        raise GenerateInputError(f"{where}: samples must be at least 1, not {samples}")
    request = Request(name, conditions, schedule, seed, samples, inpaint)
    if resources.needs_text:
        _require(resources.text_path, "captions and boxes", where)
    for modality, value in conditions.items():
        condition_entry(modality, value, resources, where, inpaint.get(modality))
    return request


# -- conditions as the model's inputs -------------------------------------------------------------------------------
def read_image(path: str, where: str, flags=None) -> np.ndarray:
    import cv2

    if not Path(str(path)).is_file():
        raise GenerateInputError(f"{where}: no image file {path!r}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED if flags is None else flags)
    if image is None:
        raise GenerateInputError(f"{where}: {path!r} is not an image OpenCV can read")
    return image


def photo_pixels(path: str, where: str) -> torch.Tensor:
    """An image file -> its centre square at 224, ImageNet-normalised (3, 224, 224), as the loader feeds rgb@224."""
    import cv2

    image = read_image(path, where, cv2.IMREAD_COLOR)
    return crop_pixels(cv2.imencode(".png", image)[1].tobytes(), center_crop(*image.shape[:2]))


def text_ids(modality: str, value: str, resources: Resources, where: str) -> list[int]:
    """A caption (sentinels such as [S_1] mark gaps to fill) or boxes (text or a JSON file) -> ids + [EOS]."""
    try:
        text = registry.domain(modality).modality.condition_text(str(value))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GenerateInputError(f"{where}: {modality} file {value!r}: {err}") from None
    ids = resources.text.encode(text).ids + [EOS_ID]
    most = registry.domain(modality).max_tokens
    if len(ids) > most:
        raise GenerateInputError(f"{where}: {modality} {text[:40]!r}... is {len(ids)} tokens with [EOS]; the model "
                                 f"reads at most {most}")
    return ids


def embedding_vectors(modality: str, value: str, where: str) -> torch.Tensor:
    """(L, C) vectors from a file in the stored form (.npz, as the labeler writes it) or a .npy of (L, C)."""
    spec = registry.domain(modality)
    try:
        if str(value).endswith(".npz"):
            vectors = spec.modality.decode(Path(value).read_bytes())
        elif str(value).endswith(".npy"):
            vectors = np.load(value)
        else:
            raise ValueError("expected a .npz (as the labeler stores it) or a .npy of vectors")
    except (OSError, ValueError, KeyError) as err:
        raise GenerateInputError(f"{where}: {modality} vectors {value!r}: {err}") from None
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != spec.channels or not 0 < len(vectors) <= spec.max_tokens:
        raise GenerateInputError(f"{where}: {modality} {value!r} holds an array of shape {vectors.shape}; the model "
                                 f"reads 1 to {spec.max_tokens} vectors of {spec.channels}")
    return torch.from_numpy(vectors)


def token_ids(modality: str, value: str, resources: Resources, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (196,), known (196,)) of an image modality from a .npy of ids (-1 = unknown) or an image file."""
    n = resources.model.cfg.grid_of(modality) ** 2
    vocab = resources.model.cfg.vocab(modality)
    if str(value).endswith(".npy"):
        try:
            ids = np.load(value).astype(np.int64).reshape(-1)
        except (OSError, ValueError) as err:
            raise GenerateInputError(f"{where}: {modality} ids {value!r}: {err}") from None
        if ids.size != n or ids.max() >= vocab or ids.min() < -1:
            raise GenerateInputError(f"{where}: {value!r} must hold {n} ids in [0, {vocab}) or -1 (to generate)")
        ids = torch.from_numpy(ids)
        return ids.clamp(min=0), ids >= 0
    spec = registry.domain(modality).modality
    if not spec.condition_from_image:
        raise GenerateInputError(f"{where}: a {spec.name} condition is given as a .npy of token ids, not {value!r}")
    _require(resources.folder(modality) / "model.safetensors", f"the {modality} condition", where)
    image = np.ascontiguousarray(spec.from_image_file(read_image(value, where)))
    x = crop_to_tensor(spec.name, image, center_crop(*image.shape[:2]), image.shape[:2])
    with torch.no_grad():
        ids = resources.tokenizer(modality).encode(x[None].to(resources.device))[0].cpu()
    return ids, torch.ones(n, dtype=torch.bool)


def condition_entry(modality: str, value, resources: Resources, where: str, region=None):
    """One sample's condition: pixels, (ids, known), a list of ids, or vectors."""
    kind = registry.domain(modality).kind
    if kind == "pixels":
        return photo_pixels(value, where)
    if kind == "sequence":
        return text_ids(modality, value, resources, where)
    if kind == "embeddings":
        return embedding_vectors(modality, value, where)
    ids, known = token_ids(modality, value, resources, where)
    if region is not None:
        grid = resources.model.cfg.grid_of(modality)
        r0, r1, c0, c1 = region
        hole = torch.zeros(grid, grid, dtype=torch.bool)
        hole[r0:r1, c0:c1] = True
        known = known & ~hole.reshape(-1)
    return ids, known


def initial_state(items: list[tuple[Request, int]], resources: Resources) -> dict:
    """The batch's state: each (request, sample) pair's conditions in the model's layout."""
    state, device = {}, resources.device
    for modality in items[0][0].conditions:
        read = {}  # a request's samples share its conditions: each file read (and tokenized) once
        for r, _ in items:
            if r.name not in read:
                read[r.name] = condition_entry(modality, r.conditions[modality], resources, f"request {r.name!r}",
                                               r.inpaint.get(modality))
        entries = [read[r.name] for r, _ in items]
        kind = registry.domain(modality).kind
        if kind == "pixels":
            state[modality] = pixels_entry(torch.stack(entries).to(device), resources.model.cfg.grid)
        elif kind == "sequence":
            state[modality] = sequence_entry(entries, 0, device)
        elif kind == "embeddings":
            state[modality] = embeddings_entry(entries, registry.domain(modality).max_tokens, device)
        else:
            state[modality] = image_entry(torch.stack([e[0] for e in entries]).to(device),
                                          torch.stack([e[1] for e in entries]).to(device))
    return state


# -- running and writing --------------------------------------------------------------------------------------------
def batches(items: list[tuple[Request, int]], batch_size: int) -> list[list[tuple[Request, int]]]:
    """(request, sample) pairs grouped by what lets them share a forward, in chunks of batch_size."""
    groups: dict[str, list] = {}
    for request, i in items:
        groups.setdefault(request.signature(), []).append((request, i))
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def weights_identity(model_dir) -> list:
    weights = data_path(model_dir) / "model.safetensors"
    if is_remote(weights):
        info = weights.fs.info(weights.path)
        return [str(weights), info["size"], str(info.get("ETag") or info.get("LastModified"))]
    stat = weights.stat()
    return [str(weights.resolve()), stat.st_size, stat.st_mtime_ns]


def sample_identity(request: Request, i: int, weights: list) -> str:
    """What decides a sample's files: the request's settings, its seed and the model's weights file."""
    return json.dumps([request.signature(), request.conditions, request.seed + i, weights])


def run_generation(raw_requests: list[dict], model_dir, tokenizers_dir, out, batch_size: int = 16,
                   device: str | None = None, progress: bool = False) -> dict:
    """Check every request, generate in batches, write each sample's files; returns the results. A sample whose
    files a previous run finished with the same settings, seed and model is kept, not generated again."""
    from tqdm import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    resources = Resources(model_dir, tokenizers_dir, device)
    requests = [parse_request(raw, resources) for raw in raw_requests]
    names = [r.name for r in requests]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise GenerateInputError(f"request names must be unique: {repeated} repeat")
    out, weights = data_path(out), weights_identity(model_dir)
    samples, pending = {}, []
    for request in requests:
        for i in range(request.samples):
            marker = out / request.name / f"sample-{i}" / "sample.json"
            record = json.loads(marker.read_text()) if marker.is_file() else {}
            if record.get("identity") == sample_identity(request, i, weights):
                samples[request.name, i] = record["files"]
            else:
                pending.append((request, i))
    reused = len(samples)
    sampler = resources.sampler()
    bar = tqdm(total=len(pending), desc="generate", unit="sample", disable=not progress)
    for items in batches(pending, batch_size):
        state = initial_state(items, resources)
        seeds = [r.seed + i for r, i in items]
        schedule = items[0][0].schedule
        sampler.generate(state, schedule, list(items[0][0].conditions), seeds)
        pictures = {step.target: pictures_of(step.target, state[step.target]["tensor"], seeds, resources)
                    for step in schedule.steps if registry.domain(step.target).kind == "tokens"}
        for row, (request, i) in enumerate(items):
            files = write_sample(out / request.name / f"sample-{i}", request, state, row, seeds[row], resources,
                                 {m: p[row] for m, p in pictures.items()})
            record = {"identity": sample_identity(request, i, weights), "files": files}
            # written last: a sample with its sample.json is done
            write_json(out / request.name / f"sample-{i}" / "sample.json", record, indent=None)
            samples[request.name, i] = files
        bar.update(len(items))
    bar.close()
    results = {"model": str(model_dir), "tokenizers": str(tokenizers_dir), "out": str(out),
               "generated": len(pending), "reused": reused,
               "requests": [{"name": r.name, "conditions": r.conditions, "seed": r.seed,
                             "schedule": r.schedule.to_dict(), "inpaint": r.inpaint,
                             "samples": [samples[r.name, i] for i in range(r.samples)]} for r in requests]}
    write_json(out / "results.json", results)
    return results


def pictures_of(modality: str, ids: torch.Tensor, seeds: list[int], resources: Resources) -> list[np.ndarray]:
    """A batch's generated image tokens (B, 196) -> pictures (H, W, 3) in [0, 1], through the dataset's tokenizer
    in one pass (a diffusion decoder starts each sample from noise seeded by the sample's seed)."""
    return resources.tokenizer(modality).pictures(ids, seeds)


def write_sample(folder: Path, request: Request, state: dict, row: int, seed: int, resources: Resources,
                 pictures: dict) -> dict:
    """One sample's generated tokens, pictures and texts, and its grid; returns what was written."""
    written, panels, texts = {}, [], {}
    for modality, value in request.conditions.items():
        if registry.domain(modality).kind == "pixels":
            panels.append((f"{modality} (given)", pixels_picture(state[modality]["tensor"][row])))
        elif registry.domain(modality).kind == "sequence" and modality not in [s.target for s in request.schedule.steps]:
            texts[f"{modality} (given)"] = str(value)
        elif registry.domain(modality).kind == "embeddings":
            count = int((~state[modality]["input_mask"][row]).sum())
            texts[f"{modality} (given)"] = f"{count} vectors from {Path(str(value)).name}"
    extras = {}  # what a generated sequence means beyond its text (boxes), drawn after the pictures
    for step in request.schedule.steps:
        m = step.target
        name = tokenizer_name(m)
        entry = state[m]
        if registry.domain(m).kind == "sequence":
            ids = sequence_rows({k: v[row:row + 1] for k, v in entry.items()})[0]
            text = decode_text(resources.text, ids)
            write_bytes(folder / f"{name}.txt", (text + "\n").encode())
            write_bytes(folder / f"{name}.npy", npy_bytes(np.array(ids, np.int64)))
            written[name] = {"tokens": str(folder / f"{name}.npy"), "text": text}
            texts[name] = text
            meaning = registry.domain(m).modality.generated(text)
            if meaning:
                written[name].update(meaning)
                extras[m] = meaning
            continue
        ids = entry["tensor"][row].cpu()
        write_bytes(folder / f"{name}.npy", npy_bytes(ids.numpy().reshape(resources.model.cfg.grid_of(m), -1)))
        picture = pictures[m]
        write_bytes(folder / f"{name}.png", png_bytes(picture))
        written[name] = {"tokens": str(folder / f"{name}.npy"), "picture": str(folder / f"{name}.png")}
        panels.append((name, picture))
    photo = registry.photo()
    base = next((p for n, p in panels if n == photo.name), None)  # the generated photo, else the given one
    if base is None:
        base = next((p for n, p in panels if n.startswith(f"{photo.name}@")), None)
    for m, meaning in extras.items():
        name = tokenizer_name(m)
        picture = registry.domain(m).modality.generated_picture(meaning, base)
        if picture is not None:
            write_bytes(folder / f"{name}.png", png_bytes(picture))
            written[name]["picture"] = str(folder / f"{name}.png")
            found = any(len(v) for v in meaning.values())
            panels.append((name if found else f"{name} (no {', '.join(meaning)})", picture))
    title = f"{request.name} sample {seed - request.seed} (seed {seed})"
    written["grid"] = str(draw_grid(folder / "grid.png", panels, texts, title))
    return written


def draw_grid(path: Path, panels: list[tuple[str, np.ndarray]], texts: dict[str, str], title: str) -> Path:
    """One row: the given pictures, then each generated one, then the texts (given and generated)."""
    import textwrap

    plt = figure_backend()
    columns = len(panels) + (1 if texts else 0)
    fig, axes = plt.subplots(1, max(1, columns), figsize=(2.3 * max(1, columns) + (1.2 if texts else 0), 2.8),
                             squeeze=False)
    for ax, (name, picture) in zip(axes[0], panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=8)
    if texts:
        body = "\n".join(textwrap.fill(f"{k}: {textwrap.shorten(v, 200, placeholder=' ...') or '(empty)'}", 34)
                         for k, v in texts.items())
        axes[0][-1].text(0, 1, body, fontsize=6.5, va="top", family="monospace", transform=axes[0][-1].transAxes)
    for ax in axes[0]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=80)
