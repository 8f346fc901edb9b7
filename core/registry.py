"""The modality registry: every modality defined once, as data, and read by every stage.

A modality is one object (a `Modality` subclass instance) that says
  - its names: `name` is its folder under the data root and its tokenizer's folder; each of its `domains` is one
    way 4M sees it (`tok_depth@224` image tokens, `rgb@224` pixels, `caption` a sequence), written by users
    with or without the `@224` (`tok_depth`);
  - how it is stored in a shard (`extension`, `encode`, `decode`) and which stage writes it (`stage`);
  - its labeler (`labeler`: how to load it, its default weights, its tiny random model, its options);
  - its tokenizer (`tokenizer`: the VQ-VAE's settings at the paper's size; sequences use the text tokenizer);
  - how a crop of it becomes a tokenizer input (`to_tensor`), how it is drawn (`picture`, `tensor_picture`),
    its reconstruction metric and trivial baseline, and its evaluation against pseudo labels.
Outside the definitions, no module branches on a modality's name: stages ask the registry.

The built-in modalities (4M's seven) are defined in `models/modalities.py`. More can be added without editing
the project: a module that calls `register(...)`, named in a profile's `modalities:` list as a dotted module
name (importable on every machine of the cluster) or as a path to a `.py` file. A configuration resolves its
list once, when it loads, into a `ModalitySet`: the modalities its stages list and act on, passed in the
arguments of every worker, which imports the modules on arrival. A name is looked up among every modality the
process has imported (`get`, `domain`): definitions never change once registered.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

BUILTIN = ("models.modalities",)   # imported on first use: the 4M-7 definitions
TEXT = "text"                      # the text tokenizer's folder under <root>/tokenizers: captions and boxes
RESOLUTION = 224                   # the `@224` of 4M's domain names
GRID = RESOLUTION // 16            # image tokens per side: 16-pixel patches of 224 (14-pixel ones give 16)
GRID_TOKENS = GRID ** 2


class RegistryError(ValueError):
    """An unknown modality or domain name, a clash between definitions, or a plugin that cannot be imported."""


@dataclass(frozen=True)
class Domain:
    """One way 4M sees a modality: image tokens, pixels, a sequence of text tokens, or a sequence of vectors."""

    name: str                 # the reference's domain name: tok_depth@224, rgb@224, caption
    modality: "Modality"
    kind: str                 # "tokens", "pixels", "sequence" or "embeddings" (vectors read as they are: T5's)
    folder: str               # where the 4M loader reads it under the data root
    vocab_size: int | None = None
    channels: int | None = None
    max_tokens: int = GRID_TOKENS  # its most tokens: an image's grid, a sequence's ([EOS] included), as the
                                   # reference's `max_tokens`
    grid: int = GRID               # image tokens per side (DINOv2's: 16)
    pooled: bool = False           # tokens of one global vector (a codebook each): as many at any image size,
                                   # positions learned (the reference's `sincos_pos_emb=False`)
    positions: int | None = None   # a sequence's embedding length (the reference's `max_length`): a decoder
                                   # position at or past it reads position 0; None: `max_tokens`

    @property
    def position_limit(self) -> int:
        return self.positions or self.max_tokens

    @property
    def short_name(self) -> str:
        """As users may write it: tok_depth, rgb."""
        return self.name.split("@")[0]

    @property
    def input_only(self) -> bool:
        """Pixels and vectors are read, never predicted: 4M has no vocabulary to predict them in."""
        return self.kind in ("pixels", "embeddings")


@dataclass(frozen=True)
class Labeling:
    """How a modality's labeler is made: `load(path, device, batch_size, **options)` returns a `Labeler`.

    `weights` is the default model (a hub id or folder; None for a labeler without weights), `random_model(size)`
    builds its model with random weights for tests and the demo (or (model, tokenizer), both saved), `options(label_config)` picks its settings."""

    load: Callable[..., Any]
    weights: str | None = None
    random_model: Callable[[str], Any] | None = None
    options: Callable[[Any], dict] = field(default=lambda cfg: {})
    weights_hint: str = "save a model there with save_pretrained"
    check: Callable[[Any], None] | None = None                   # refuses settings that cannot run, before work
    weights_used: Callable[[Any], bool] = field(default=lambda cfg: True)  # False: label.models' entry unused
    reads: tuple[str, ...] = ()   # modalities whose stored labels the labeler reads beside the image, per sample
    reads_if_present: tuple[str, ...] = ()  # the same where the modality's shard is committed (None where not)
    reads_quality: bool = False   # the sample's quality scores (aesthetic, watermark) where the shard is scored


class Modality:
    """The base of every modality: names, storage, labeler. Subclasses add what their family needs."""

    kind = "image"                 # "image" (a map aligned with the photo), "sequence" (text) or "embeddings"
    name: str
    extension: str
    downloaded = False             # stored by the download stage (the photo, its caption); else labelled
    labeler: Labeling | None = None
    tokenizer: dict | None = None  # VQ-VAE settings at the paper's size (Table 3); None: no tokenizer of its own
    labelled_per_crop = False      # a published tokenizer read it made by its labeler on each crop (CLIP features)
    per_crop_options: dict = {}    # the labeler's options for those crops (as the published tokenizer's training)
    label_order = 100              # where it comes in pictures and tables (lower first)
    token_grid = GRID              # its image tokens per side at 224 (DINOv2's 14-pixel patches: 16)
    pooled = False                 # one global vector, its tokens one per codebook (DINOv2's global: 4x4)
    embedding_length = None        # a sequence's embedding length where the reference's differs from its max_tokens
    pretokenized = False           # its 4M sequence is made by tokenize (SAM instances per crop, poses' ids) and
                                   # read from tok_<name>/ (the reference's `pretokenized`)

    # -- names ------------------------------------------------------------------------------------------------
    @property
    def folder(self) -> str:
        return self.name

    @property
    def stage(self) -> str:
        """The stage whose status files record each sample's fate in this modality's folder."""
        return "download" if self.downloaded else f"label_{self.name}"

    @property
    def token_folder(self) -> str:
        """tok_depth@224; a global vector's tokens have no resolution: tok_dinov2_global (the reference's names)."""
        return f"tok_{self.name}" if self.pooled or self.pretokenized else f"tok_{self.name}@{RESOLUTION}"

    @property
    def tokenize_stage(self) -> str:
        return f"tokenize_{self.name}"

    def domains(self) -> list[Domain]:
        if self.tokenizer is None:
            return []
        return [Domain(self.token_folder, self, "tokens", self.token_folder, vocab_size=self.tokenizer["codebook_size"],
                       max_tokens=self.token_grid ** 2, grid=self.token_grid, pooled=self.pooled)]

    # -- storage ----------------------------------------------------------------------------------------------
    def encode(self, label) -> bytes:
        raise NotImplementedError(f"{self.name}: not written by a labeler")

    def decode(self, data: bytes):
        raise NotImplementedError

    def crop_part(self, data: bytes, index: int):
        """What the 4M loader reads of a stored member at crop `index`: the member; one pretokenized per crop
        (SAM instances) gives that crop's part."""
        return data

    def check_label(self, label) -> None:
        """Raise ValueError, saying why, if a decoded label (an imported one: `import-labels`) is not this
        modality's form; the families check shapes and widths."""

    def picture(self, stored, photo):
        """The stored label (decoded) as an RGB picture in [0, 1] for `show`; `photo` is the RGB image."""
        raise NotImplementedError

    def on_input_scale(self, y, x):
        """A tokenizer's reconstruction `y` of inputs `x`, on the inputs' scale to draw beside them (maps whose
        tokenizer reads them standardised override it)."""
        return self.from_reference_output(y)

    def __repr__(self) -> str:
        return f"<modality {self.name}>"


# -- the registry -------------------------------------------------------------------------------------------------
# Every modality a process has imported stays resolvable by name (definitions are added by imports, never changed);
# which of them a configuration works with is its `ModalitySet`, passed to whatever needs the list: one
# configuration's modalities never become another's defaults, and a worker needs nothing but its arguments.
_modalities: dict[str, Modality] = {}
_origin: dict[str, str] = {}        # modality name -> the module spec whose import registered it
_loaded: set[str] = set()
_importing: list[str] = []
_lock = threading.RLock()
DIRECT = "(registered directly)"     # a modality registered outside a module import: in every set
_generation = 0                      # bumped by each registration, so a set's cached listings follow it


def register(modality: Modality) -> Modality:
    """Add a modality; a second definition of the same name is an error unless it is the same object."""
    with _lock:
        known = _modalities.get(modality.name)
        if known is not None and known is not modality and type(known) is not type(modality):
            raise RegistryError(f"modality {modality.name!r} is defined twice ({type(known).__module__} and "
                                f"{type(modality).__module__})")
        names = {d.name for m in _modalities.values() if m.name != modality.name for d in m.domains()}
        clash = [d.name for d in modality.domains() if d.name in names]
        if clash:
            raise RegistryError(f"modality {modality.name!r}: domains {clash} belong to another modality")
        _modalities[modality.name] = modality
        _origin[modality.name] = _importing[-1] if _importing else DIRECT
        global _generation
        _generation += 1
    return modality


def _import(spec: str):
    """A dotted module name, or a path to a .py file (imported under a name derived from its path)."""
    if spec.endswith(".py"):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise RegistryError(f"modalities: no file {spec!r}")
        name = f"fourm_modality_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as err:
        raise RegistryError(f"modalities: cannot import {spec!r} ({err}); a module must be importable on every "
                            f"machine (installed, or on PYTHONPATH), or be named by its .py path") from None


def _ensure(specs: Iterable[str]) -> None:
    with _lock:
        for spec in (*BUILTIN, *specs):
            if spec not in _loaded:
                _importing.append(spec)
                try:
                    _import(spec)
                finally:
                    _importing.pop()
                _loaded.add(spec)


def _plugins(modules: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for m in modules if m not in BUILTIN))


@dataclass(frozen=True)
class ModalitySet:
    """The modalities one configuration works with: the built-ins and those its `modules` define (dotted names
    or .py paths). Immutable; made once when a configuration or a saved model is read, and passed on: pickled
    by its module names, it imports them wherever it arrives (a Ray task, actor or Train worker)."""

    modules: tuple[str, ...] = ()
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "modules", _plugins(self.modules))
        _ensure(self.modules)

    def __reduce__(self):
        return ModalitySet, (self.modules,)

    def _listed(self, key: str, build: Callable[[], list]) -> list:
        cached = self._cache.get(key)
        if cached is None or cached[0] != _generation:  # the loader asks per sample: built once per registration
            cached = self._cache[key] = (_generation, build())
        return list(cached[1])

    def modalities(self) -> list[Modality]:
        def build():
            specs = {*BUILTIN, *self.modules, DIRECT}
            with _lock:
                return sorted((m for m in _modalities.values() if _origin[m.name] in specs),
                              key=lambda m: (m.label_order, m.name))
        return self._listed("modalities", build)

    def names(self) -> list[str]:
        return [m.name for m in self.modalities()]

    def labelled(self) -> list[Modality]:
        """Modalities a labeler writes."""
        return [m for m in self.modalities() if m.labeler is not None]

    def tokenized(self) -> list[Modality]:
        """Modalities with a tokenizer of their own (a VQ-VAE)."""
        return [m for m in self.modalities() if m.tokenizer is not None]

    def sequences(self) -> list[Modality]:
        return [m for m in self.modalities() if m.kind == "sequence"]

    def tokenizer_names(self) -> list[str]:
        """The tokenizers a dataset has: the text tokenizer, then one per tokenized modality."""
        return [TEXT, *(m.name for m in self.tokenized())]

    def domains(self) -> list[Domain]:
        return self._listed("domains", lambda: [d for m in self.modalities() for d in m.domains()])

    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains()]

    def domain(self, name: str) -> Domain:
        """One of this set's domains by its name as the reference writes it (tok_depth@224) or as users may."""
        for d in self.domains():
            if name in (d.name, d.short_name):
                return d
        raise RegistryError(f"unknown modality {name!r} (known: {', '.join(self.domain_names())})")


_everything: list = []  # [(generation, the set of every imported modality)], remade after a registration


def loaded() -> ModalitySet:
    """Every modality this process has imported: for looking a name up, never for a listing a stage acts on."""
    _ensure(())
    with _lock:
        if not _everything or _everything[0][0] != _generation:
            _everything[:] = [(_generation, ModalitySet(tuple(sorted(_loaded))))]
        return _everything[0][1]


def get(name: str) -> Modality:
    _ensure(())
    if name not in _modalities:
        raise RegistryError(f"unknown modality {name!r} (known: {', '.join(sorted(_modalities))})")
    return _modalities[name]


def photo() -> Modality:
    """The downloaded image every label is made from and aligned with."""
    _ensure(())
    found = [m for m in _modalities.values() if m.downloaded and m.kind == "image"]
    if len(found) != 1:
        raise RegistryError(f"expected one downloaded image modality, found {[m.name for m in found]}")
    return found[0]


def caption() -> Modality:
    """The downloaded text: a sample's caption, downloaded with its photo."""
    _ensure(())
    found = [m for m in _modalities.values() if m.downloaded and m.kind == "sequence"]
    if len(found) != 1:
        raise RegistryError(f"expected one downloaded text modality, found {[m.name for m in found]}")
    return found[0]


def domain(name: str) -> Domain:
    """A domain of any imported modality by its name as the reference writes it (tok_depth@224) or as users may
    (tok_depth); domain names are unique across every definition."""
    return loaded().domain(name)


def of_folder(folder: str) -> tuple[Modality, Domain | None]:
    """The modality (and domain, for token folders) a folder under the data root holds."""
    for m in loaded().modalities():
        if folder == m.folder:
            return m, None
        for d in m.domains():
            if folder == d.folder:
                return m, d
    raise RegistryError(f"folder {folder!r} holds no registered modality")


def is_token_folder(folder: str) -> bool:
    """Whether a folder under the data root holds a tokenizer's ids (tok_<name>@224)."""
    try:
        return of_folder(folder)[1] is not None
    except RegistryError:
        return False


def domain_or_modality(name: str) -> Modality:
    """The modality a name means: its own name (depth) or one of its 4M domains (tok_depth@224, tok_depth)."""
    _ensure(())
    if name in _modalities:
        return _modalities[name]
    return domain(name).modality
