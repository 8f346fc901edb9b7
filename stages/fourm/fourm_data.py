"""The 4M loader: the dataset's aligned token shards in, masked batches in the model's layout out.

Consumes  <root>/tok_<m>@224/shard-N.tar  <key>.npy  int16 (n_crops, 196)   one tokenizer's ids per crop
          <root>/crop_settings/shard-N.tar <key>.npy int32 (n_crops, 5)   [top, left, h, w, hflip] in rgb pixels
          <root>/crops_rgb@224/shard-N.tar <key>.npz  each crop of the photo at 224 as a JPEG (rgb@224's pixels;
                                                      a dataset without them: rgb/ decoded whole and cropped)
          <root>/rgb/shard-N.tar <key>.jpg, caption/ <key>.txt, det/ <key>.json   (the photo's size for boxes)
          (the folders hold the same keys in the same order: `align` makes them so; a divergence is an error)
Produces  batches {modality: {tensor, input_mask, target_mask, decoder_attention_mask}} (models/fourm.py)

Per sample: one crop index for every modality (training: a random one of the pre-tokenized crops; validation:
crop 0, the center crop), RGB pixels cut with that crop's settings and normalised with ImageNet's statistics,
boxes scoring at least `det_min_score` moved into the crop and serialized with the text tokenizer's layout, then
`repeats` independent masks of it (each sample read once, masked several times, Table 28). Training shards are
resampled forever through a shuffle buffer; the last `val_shards` shards are held out, read once in order.
Decoding and masking run in DataLoader worker processes, each seeded by (seed, rank, worker).
"""
from __future__ import annotations

import contextlib
import functools
import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from core import registry
from core.storage import open_read, open_tar, read_parquet_schema
from stages.dataset.shards import CROP_PIXELS, CROPS, DatasetLayout
from stages.fourm.masking import Component, MaskingSampler, is_sequence, paper_mixture
from stages.tokenizers import dataset_tokenizers as tokenizers
from stages.tokenizers.tokenizer_data import resized_crop

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZE = 224


class LoaderInputError(ValueError):
    """Missing or unusable input for the 4M loader: names the folder, shard or key."""


def folder_of(modality: str) -> str:
    return registry.domain(modality).folder


def stored_crops(root: str | Path) -> bool:
    """Whether the photo's crops at 224 are stored beside every shard's crop settings (`CROP_PIXELS`, written by
    tokenize): then the loader reads them instead of decoding each whole photo; a dataset tokenized before they
    were written (or a shard without them) is read the old way, whole."""
    layout = DatasetLayout(root)
    settings = {p.name for p in layout.folder(CROPS).glob("shard-*.tar")}
    return bool(settings) and settings <= {p.name for p in layout.folder(CROP_PIXELS).glob("shard-*.tar")}


PHOTO_SIZE = "__photo_size__"  # not a folder: each sample's photo (height, width), from the download's status table


def photo_sizes_recorded(root) -> bool:
    """Whether the download's status tables record each stored photo's size (every downloaded dataset's do)."""
    layout, stage = DatasetLayout(root), registry.photo().stage
    shards = layout.committed_shards(stage)
    return bool(shards) and {"width", "height"} <= set(read_parquet_schema(layout.status_table(stage, shards[0])))


def recorded_photo_sizes(layout: DatasetLayout, shard: str) -> dict[str, tuple[int, int]]:
    """key -> (height, width) of each photo of a shard as the download stored it (its status table)."""
    stage = registry.photo().stage
    if not layout.is_committed(stage, shard):
        raise LoaderInputError(f"{shard}: no committed {stage} status table to read the photos' sizes from")
    table = layout.read_status(stage, shard, ["key", "width", "height"]).to_pydict()
    return {k: (h, w) for k, h, w in zip(table["key"], table["height"], table["width"]) if h is not None}


def loader_folders(modalities: list[str], root: str | Path | None = None) -> list[str]:
    """The folders a sample of these modalities is read from: theirs, the crops, and where a modality needs the
    photo's size (boxes are moved into the crop) the photo, or its size alone (`PHOTO_SIZE`) where the photo's pixels
    are not read from it and the download recorded the sizes; the photo's pixels from its stored 224 crops where the
    dataset under `root` has them."""
    photo = registry.photo().folder
    needs_photo = any(getattr(registry.domain(m).modality, "needs_photo", False) for m in modalities)
    own = {folder_of(m) for m in modalities}
    folders = own | {CROPS}
    if root is not None and photo in own and stored_crops(root):
        folders = (folders - {photo}) | {CROP_PIXELS}
    if needs_photo and photo not in folders:
        # the size alone: a row of a table instead of a photo of a few hundred kB per sample, half the bytes a
        # sample with stored crops reads (what streaming from object storage pays for)
        folders |= {PHOTO_SIZE} if root is not None and photo_sizes_recorded(root) else {photo}
    return sorted(folders)


def split_shards(root: str | Path, modalities: list[str], val_shards: int) -> tuple[list[str], list[str]]:
    """(train, validation) shards: those every folder holds with samples in them, the last `val_shards` held out."""
    layout, per_folder = DatasetLayout(root), {}
    for folder in loader_folders(modalities, root):
        per_folder[folder] = set(layout.committed_shards(registry.photo().stage)) if folder == PHOTO_SIZE else \
            {p.stem for p in layout.folder(folder).glob("shard-*.tar")}
        if not per_folder[folder]:
            raise LoaderInputError(f"no shards in {layout.folder(folder)} (run the stage that writes {folder!r})")
    shards = [s for s in sorted(set.intersection(*per_folder.values())) if not _empty(layout.tar(CROPS, s))]
    if len(shards) <= val_shards:
        raise LoaderInputError(f"{len(shards)} shards under {layout.root} and pretrain.val_shards={val_shards}: "
                               f"nothing would be left to train on")
    return shards[:len(shards) - val_shards], shards[len(shards) - val_shards:]


def _empty(path: Path) -> bool:
    """A shard every sample of which failed upstream: its tar has no member (one header read)."""
    with open_tar(path) as tar:
        return tar.next() is None


def mixture_from(setting, modalities: list[str]) -> list[Component]:
    """The configured mixture: the paper's over the loaded modalities (a dataset without boxes, say), a list of
    components, or a reference alphas config's Dirichlets."""
    if setting == "paper":
        return paper_mixture(modalities)
    if isinstance(setting, str) and setting.endswith((".yaml", ".yml")):  # a reference alphas config
        from core.reference_config import read_alphas_config

        return [Component(**c) for c in read_alphas_config(setting, modalities)]
    if isinstance(setting, str):
        raise ValueError(f"pretrain.mixture={setting!r}: expected 'paper', a list of components or the path of an "
                         f"alphas config (.yaml)")
    return [Component(**c) for c in setting]


# -- reading one shard of every folder, in step -------------------------------------------------------------------
BLOCK = 512


def _members(path: Path, stream=None) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of each file member of the tar at `path` (open as `stream`, or opened here), streamed (a shard
    is never loaded whole). The headers are read here, not by tarfile (whose parser took a third of a loader's
    time): POSIX ustar blocks, checksummed, with the pax and GNU long-name records that Python's tarfile and GNU tar
    write before a member."""
    if stream is None:
        with open_read(path) as own:
            yield from _members(path, own)
        return
    long_name = None
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or header.count(0) == BLOCK:  # the end-of-archive blocks
            return
        stored = header[148:156].split(b"\0", 1)[0].strip()
        if not stored or int(stored, 8) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise LoaderInputError(f"{path}: a corrupt tar header at byte {stream.tell() - BLOCK}")
        if header[124] & 0x80:
            raise LoaderInputError(f"{path}: a member over 8 GB")
        size, kind = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8), header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise LoaderInputError(f"{path}: cut short inside a member at byte {stream.tell()}")
        stream.seek(-size % BLOCK, 1)
        if kind == b"x":  # pax: a longer name (path=) than the header holds
            for record in data.decode("utf-8", "replace").split("\n"):
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
        elif kind == b"L":  # GNU long name
            long_name = data.split(b"\0", 1)[0].decode()
        elif kind in (b"0", b"\0", b"7"):
            name, prefix = (header[:100].split(b"\0", 1)[0].decode(),
                            header[345:500].split(b"\0", 1)[0].decode())
            name = long_name or (f"{prefix}/{name}" if prefix else name)
            long_name = None
            yield name.split(".", 1)[0], data
        else:  # a directory, a link: nothing to read
            long_name = None


def shard_samples(root: str | Path, shard: str, folders: list[str]) -> Iterator[dict]:
    """{"__key__", "__shard__", folder: bytes} for each sample, the folders read side by side."""
    layout = DatasetLayout(root)
    sizes = recorded_photo_sizes(layout, shard) if PHOTO_SIZE in folders else None
    folders = [f for f in folders if f != PHOTO_SIZE]
    paths = [layout.tar(folder, shard) for folder in folders]
    with contextlib.ExitStack() as opened:
        # every folder's tar opened before any is read: on object storage their downloads start side by side
        files = [opened.enter_context(open_read(path)) for path in paths]
        streams = [_members(path, file) for path, file in zip(paths, files)]
        for members in itertools.zip_longest(*streams, fillvalue=("(ended)", b"")):
            keys = {key for key, _ in members}
            if len(keys) != 1:  # a key missing in one folder, or one folder ending first
                named = ", ".join(f"{f}={k}" for f, (k, _) in zip(folders, members))
                raise LoaderInputError(f"{shard}: folders out of step ({named}); run `python -m pipeline align`")
            key = members[0][0]
            sample = {"__key__": key, "__shard__": shard, **{f: data for f, (_, data) in zip(folders, members)}}
            if sizes is not None:
                if key not in sizes:
                    raise LoaderInputError(f"{shard}/{key}: the {registry.photo().stage} status table records no "
                                           f"photo size for it")
                sample[PHOTO_SIZE] = sizes[key]
            yield sample


def pixels_picture(pixels: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised pixels (3, H, W) -> a picture (H, W, 3) in [0, 1] to draw."""
    return (pixels.float().cpu().permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN).clip(0, 1)


# -- decoding one sample at one crop ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple, bool]:
    import ast

    fields = ast.literal_eval(header.decode("latin1"))
    return np.dtype(fields["descr"]), tuple(fields["shape"]), bool(fields["fortran_order"])


def npy_array(data: bytes) -> np.ndarray:
    """A `.npy` member as an array (read-only, over the member's bytes). Every token file of a dataset has the same
    header, so its parse (a Python literal: half of np.load's time on a 400-byte file) is done once."""
    if data[:6] != b"\x93NUMPY":
        raise LoaderInputError("a .npy member without numpy's magic")
    width = 2 if data[6] == 1 else 4
    start = 8 + width + int.from_bytes(data[8:8 + width], "little")
    dtype, shape, fortran = _npy_header(data[8 + width:start])
    if dtype.hasobject:
        raise LoaderInputError("a .npy member of Python objects (pickled) is not read")
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=start)
    return array.reshape(shape, order="F" if fortran else "C")


def crop_pixels(jpeg: bytes, crop) -> torch.Tensor:
    """The crop of the stored image, resized to 224x224, flipped if asked, ImageNet-normalised (3, 224, 224)."""
    import cv2

    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise LoaderInputError(f"{registry.photo().folder}: not a decodable image")
    return normalised(resized_crop(image, crop), int(crop[4]))  # resized in BGR: channels never mix


def stored_crop_pixels(member: bytes, index: int, crop) -> torch.Tensor:
    """Crop `index` of a `CROP_PIXELS` member (its 224 JPEG), flipped if asked, ImageNet-normalised."""
    import cv2

    with np.load(io.BytesIO(member)) as crops:
        jpeg = crops[str(index)]
    image = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    if image is None:
        raise LoaderInputError(f"{CROP_PIXELS}: crop {index} is not a decodable image")
    return normalised(image, int(crop[4]))


SCALE, SHIFT = 1 / (255 * IMAGENET_STD), -IMAGENET_MEAN / IMAGENET_STD  # (x / 255 - mean) / std, per channel


def normalised(bgr: np.ndarray, flip: int) -> torch.Tensor:
    """224x224 BGR pixels -> RGB (3, 224, 224), mirrored if asked, ImageNet-normalised: channel planes scaled one
    by one (10x faster than the interleaved array's arithmetic and transpose; equal within float rounding)."""
    import cv2

    planes = cv2.split(cv2.flip(bgr, 1) if flip else bgr)[::-1]  # R, G, B
    out = np.empty((3, *bgr.shape[:2]), np.float32)
    for channel, plane in enumerate(planes):
        np.multiply(plane, SCALE[channel], out=out[channel], dtype=np.float32)
        out[channel] += SHIFT[channel]
    return torch.from_numpy(out)


def image_size_of(jpeg: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        return im.height, im.width


def decode_sample(raw: dict, modalities: list[str], crop_index: int, min_score: float,
                  rng: np.random.Generator | None = None) -> dict:
    """Raw members -> {modality: token grid (196,) long, pixels (3, 224, 224), vectors (L, C), or text}; scored items of a
    sequence (boxes) below `min_score` are left out; a sequence that varies per load (a palette's size) draws
    from `rng` (training), or reads whole without it."""
    crops = npy_array(raw[CROPS])
    crop = crops[crop_index % len(crops)]
    out = {}
    for m in modalities:
        domain = registry.domain(m)
        data = raw.get(domain.folder)
        if domain.kind == "pixels" and CROP_PIXELS in raw:
            out[m] = stored_crop_pixels(raw[CROP_PIXELS], crop_index % len(crops), crop)
        elif domain.kind == "pixels":
            out[m] = crop_pixels(data, crop)
        elif domain.kind == "embeddings":
            out[m] = domain.modality.to_embeddings(data)
        elif domain.kind == "sequence":
            size = (raw[PHOTO_SIZE] if PHOTO_SIZE in raw else image_size_of(raw[registry.photo().folder])) \
                if domain.modality.needs_photo else None
            part = domain.modality.crop_part(data, crop_index % len(crops))
            out[m] = domain.modality.to_text(part, crop, size, min_score, rng=rng)
        else:
            tokens = npy_array(data)
            if tokens.shape[0] != len(crops):
                raise LoaderInputError(f"{raw['__shard__']}/{raw['__key__']}: {m} holds {tokens.shape[0]} crops, "
                                       f"crop_settings {len(crops)}")
            out[m] = torch.from_numpy(tokens[crop_index % len(crops)].astype(np.int64))
    return out


def collate(samples: list[dict]) -> dict:
    return {m: {k: torch.stack([s[m][k] for s in samples]) for k in samples[0][m]} for m in samples[0]}


# -- the pipeline -------------------------------------------------------------------------------------------------
class Masked(torch.utils.data.IterableDataset):
    """Masked samples of one split of one dataset: each sample read (`samples`, per worker) is shuffled in a
    buffer of `sample_shuffle_buffer` (0: none), masked `repeats` times with fresh masks, and the masked copies
    shuffled in a buffer of `shuffle_buffer` (training); validation reads once, in order, masked once."""

    def __init__(self, sampler: MaskingSampler, *, train: bool, repeats: int, shuffle_buffer: int, seed,
                 rank: int = 0, sample_shuffle_buffer: int = 0):
        super().__init__()
        self.sampler, self.train, self.repeats, self.shuffle_buffer = sampler, train, repeats, shuffle_buffer
        self.seed, self.rank, self.sample_shuffle_buffer = seed, rank, sample_shuffle_buffer

    def samples(self, rng: np.random.Generator, worker: int, workers: int) -> Iterator[dict]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([*np.atleast_1d(self.seed).tolist(), self.rank, worker])
        samples = self.samples(rng, worker, workers)
        if self.train and self.sample_shuffle_buffer > 1:
            samples = shuffled(samples, self.sample_shuffle_buffer, rng)
        if not self.train:
            for sample in samples:
                yield self.sampler(sample, rng)
            return
        pool: list[dict] = []  # the shuffle buffer, inline: a generator per stage cost 2% of a sample
        for sample in samples:
            for _ in range(self.repeats):
                pool.append(self.sampler(sample, rng))  # fresh masks; the decoded sample is shared, never changed
                if len(pool) >= self.shuffle_buffer:
                    yield pool.pop(int(rng.integers(len(pool))))
        while pool:
            yield pool.pop(int(rng.integers(len(pool))))


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """The items through a shuffle buffer of `size`: each taken at random once the buffer is full."""
    pool: list = []
    for item in items:
        pool.append(item)
        if len(pool) >= size:
            yield pool.pop(int(rng.integers(len(pool))))
    while pool:
        yield pool.pop(int(rng.integers(len(pool))))


class MaskedSamples(Masked):
    """Masked samples of a tokenized dataset's shards: training resamples its shards forever, validation reads each
    shard once."""

    def __init__(self, root, shards: list[str], modalities: list[str], sampler: MaskingSampler, *, train: bool,
                 repeats: int, min_score: float, shuffle_buffer: int, seed, rank: int = 0,
                 sample_shuffle_buffer: int = 0):
        super().__init__(sampler, train=train, repeats=repeats, shuffle_buffer=shuffle_buffer, seed=seed, rank=rank,
                         sample_shuffle_buffer=sample_shuffle_buffer)
        self.root, self.shards, self.modalities, self.min_score = root, shards, modalities, min_score

    def _shard_order(self, rng: np.random.Generator, worker: int, workers: int) -> Iterator[str]:
        if not self.train:
            yield from self.shards[worker::workers]
            return
        while True:  # resampled: every worker draws shards with replacement, forever
            yield self.shards[int(rng.integers(len(self.shards)))]

    def samples(self, rng: np.random.Generator, worker: int, workers: int) -> Iterator[dict]:
        folders = loader_folders(self.modalities, self.root)
        for shard in self._shard_order(rng, worker, workers):
            for raw in shard_samples(self.root, shard, folders):
                crop_index = int(rng.integers(1 << 30)) if self.train else 0
                yield decode_sample(raw, self.modalities, crop_index, self.min_score, rng if self.train else None)


# -- inspection ---------------------------------------------------------------------------------------------------
def text_tokenizer_of(root: str | Path):
    path = tokenizers.text_path(root)
    if not path.is_file():
        raise LoaderInputError(f"no text tokenizer at {path}: run `python -m pipeline train-tokenizer --modality "
                               f"{registry.TEXT}`")
    return tokenizers.load_text(root)


def inspect_masking(root, config, samples: int) -> tuple[dict, dict]:
    """Mean input and target tokens per modality over `samples` masked training samples (read in the
    process, no workers), and the first masked sample, for `inspect-masking`."""
    cfg = config.pretrain
    tokenizer = text_tokenizer_of(root) if any(is_sequence(m) for m in cfg.modalities) else None
    train, _ = split_shards(root, cfg.modalities, cfg.val_shards)
    sampler = MaskingSampler(cfg.modalities, mixture_from(cfg.mixture, cfg.modalities), cfg.input_tokens,
                             cfg.target_tokens, tokenizer)
    stream = MaskedSamples(root, train, cfg.modalities, sampler, train=True, repeats=cfg.repeats,
                           min_score=cfg.det_min_score, shuffle_buffer=1, seed=cfg.seed)
    totals = {m: {"input": 0, "target": 0} for m in cfg.modalities}
    first = None
    for _, sample in zip(range(samples), stream):
        first = first or sample
        for m, d in sample.items():
            totals[m]["input"] += int((~d["input_mask"]).sum())
            totals[m]["target"] += int((~d["target_mask"]).sum())
    means = {m: {part: count / samples for part, count in parts.items()} for m, parts in totals.items()}
    return means, first
