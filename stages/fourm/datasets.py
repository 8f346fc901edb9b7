"""What a pretraining run reads: the data root alone, or a weighted mixture of datasets as 4M-21 was trained
(CC12M with every modality, COYO-700M with 4M-7's, C4's text alone; `pretrain.datasets` or a reference data config).

Consumes  per dataset: a tokenized dataset's aligned shards (stages/fourm/fourm_data.py), or a text corpus: a
          .jsonl (one JSON object per line) or .parquet file, or a folder of them, with a text column (C4's form),
          read as the caption; local or on object storage, streamed.
Produces  masked samples of the model's modalities: each dataset masked with its own modalities, mixture and token
          budgets; in a mixture, each sample's dataset drawn by weight (a dataset that runs out starts again: an
          epoch per dataset), the modalities it lacks empty and fully masked (the reference's empty entries), and
          `DATASET` holding its index (for per-dataset losses). Validation is per dataset.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from core import registry
from core.storage import data_path, open_random, open_read
from stages.fourm.fourm_data import (
    LoaderInputError,
    Masked,
    MaskedSamples,
    collate,
    mixture_from,
    split_shards,
)
from stages.fourm.masking import MaskingSampler, is_sequence
from stages.training import data_loader

DATASET = "__dataset__"  # a mixture's batch entry: {"index": (B,)}, each sample's dataset
TEXT_FILES = (".jsonl", ".parquet")


@dataclass
class DatasetPlan:
    """One dataset as a run reads it: every setting resolved, its shards (or files) split, checked before work."""

    name: str
    kind: str                      # "tokens" or "text"
    root: object                   # a DataPath: its data root, or its text file or folder
    in_domains: list[str]
    out_domains: list[str]
    mixture: list                  # its masking components
    input_tokens: int
    target_tokens: int
    repeats: int
    shuffle_buffer: int
    sample_shuffle_buffer: int
    weight: float
    train: list[str]               # shard names, or text files
    val: list[str]
    val_root: object = None        # where `val` is, when not `root`
    text_column: str = "text"

    @property
    def modalities(self) -> list[str]:
        return list(dict.fromkeys([*self.in_domains, *self.out_domains]))


def _text_files(path, where: str) -> list:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LoaderInputError(f"{where}: no such file or folder {str(path)!r}")
    files = sorted(p for p in path.iterdir() if p.name.endswith(TEXT_FILES))
    if not files:
        raise LoaderInputError(f"{where}: no {' or '.join(TEXT_FILES)} files in {str(path)!r}")
    return files


def _check_text_column(path, column: str, where: str) -> None:
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with open_random(path) as f:
            names = pq.ParquetFile(f).schema_arrow.names
    else:
        with open_read(path) as f:
            line = f.readline(1 << 20)
        try:
            names = list(json.loads(line)) if line.strip() else []
        except (json.JSONDecodeError, TypeError):
            raise LoaderInputError(f"{where}: {str(path)!r} line 1 is not a JSON object") from None
    if column not in names:
        raise LoaderInputError(f"{where}: {str(path)!r} has no {column!r} column (its columns: {names}); set "
                               f"text_column")


def _restricted(components, in_domains: list[str], out_domains: list[str]):
    """A dataset's inputs drawn from its in_domains only, its targets from its out_domains only."""
    for c in components:
        c.input_alphas = {m: a for m, a in c.input_alphas.items() if m in in_domains}
        c.target_alphas = {m: a for m, a in c.target_alphas.items() if m in out_domains}
    return components


def plan_datasets(root, config) -> list[DatasetPlan]:
    """The run's datasets (`pretrain.datasets`, or the data root alone), each checked: its root there, its shards
    or text files and their text column, its masking mixture; an error names the dataset and the setting."""
    cfg, plans = config.pretrain, []
    for entry in cfg.dataset_entries():
        where = f"pretrain.datasets[{entry.name}]" if entry.name else "pretrain"
        own = data_path(entry.root, config.storage_options) if entry.root else data_path(str(root),
                                                                                          config.storage_options)
        if entry.root and not own.exists():
            raise LoaderInputError(f"{where}.root: no such file or folder {entry.root!r}")
        val_root = data_path(entry.val_root, config.storage_options) if entry.val_root else None
        if val_root is not None and not val_root.exists():
            raise LoaderInputError(f"{where}.val_root: no such file or folder {entry.val_root!r}")
        modalities = list(dict.fromkeys([*entry.in_domains, *entry.out_domains]))
        if entry.type == "text":
            files = _text_files(own, f"{where}.root")
            _check_text_column(files[0], entry.text_column, where)
            if val_root is not None:
                train, val = files, _text_files(val_root, f"{where}.val_root")
            else:  # the last files held out, when there are more than that
                held = cfg.val_shards if len(files) > cfg.val_shards else 0
                train, val = files[:len(files) - held], files[len(files) - held:]
        else:
            try:
                if val_root is not None:
                    train, _ = split_shards(own, modalities, 0)
                    val, _ = split_shards(val_root, modalities, 0)
                else:
                    train, val = split_shards(own, modalities, cfg.val_shards)
            except LoaderInputError as err:
                raise LoaderInputError(f"{where}: {err}" if entry.name else str(err)) from None
            if entry.shards is not None:
                train = [s for s in train if s in set(entry.shards)]
                if not train:
                    raise LoaderInputError(f"{where}.shards: none of {entry.shards[:3]}... among its shards under "
                                           f"{own}")
        try:
            mixture = _restricted(mixture_from(entry.mixture, modalities), entry.in_domains, entry.out_domains)
        except (ValueError, TypeError) as err:
            raise LoaderInputError(f"{where}.mixture: {err}") from None
        plans.append(DatasetPlan(entry.name, entry.type, own, entry.in_domains, entry.out_domains, mixture,
                                 entry.input_tokens, entry.target_tokens, entry.repeats, entry.shuffle_buffer,
                                 entry.sample_shuffle_buffer, entry.weight, [str(x) for x in train],
                                 [str(x) for x in val], val_root, entry.text_column))
    return plans


# -- text corpora ---------------------------------------------------------------------------------------------------
class TextSamples(Masked):
    """Masked samples of a text corpus: each text the caption, span-masked as a caption is; training resamples
    its files forever, validation reads each once."""

    def __init__(self, files: list[str], column: str, caption: str, sampler: MaskingSampler, *, storage_options,
                 train: bool, repeats: int, shuffle_buffer: int, seed, rank: int = 0, sample_shuffle_buffer: int = 0):
        super().__init__(sampler, train=train, repeats=repeats, shuffle_buffer=shuffle_buffer, seed=seed, rank=rank,
                         sample_shuffle_buffer=sample_shuffle_buffer)
        self.files, self.column, self.caption, self.storage_options = files, column, caption, storage_options

    def samples(self, rng: np.random.Generator, worker: int, workers: int) -> Iterator[dict]:
        if not self.train:
            order = iter(self.files[worker::workers])
        else:
            order = (self.files[int(rng.integers(len(self.files)))] for _ in iter(int, 1))  # forever
        for name in order:
            for text in texts_of(data_path(name, self.storage_options), self.column):
                if text:
                    yield {self.caption: text}


def texts_of(path, column: str) -> Iterator[str]:
    """A text file's texts, streamed: a parquet file a row group at a time, a JSON-lines file a line at a time."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with open_random(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=[column], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))
        return
    with open_read(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[column]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LoaderInputError(f"{path} line {number}: not a JSON object with a {column!r} text") from None


# -- the mixture ----------------------------------------------------------------------------------------------------
def empty_entry(modality: str) -> dict:
    """A modality a sample's dataset lacks, in the batch layout: nothing visible, nothing to predict."""
    d = registry.domain(modality)
    if d.kind == "pixels":
        tensor, length = torch.zeros(d.channels or 3, d.grid * 16, d.grid * 16), d.max_tokens
    elif d.kind == "embeddings":
        tensor, length = torch.zeros(d.max_tokens, d.channels), d.max_tokens
    elif d.kind == "sequence":
        length = (d.max_tokens + 1) * 2
        tensor = torch.zeros(length, dtype=torch.int32)
    else:
        tensor, length = torch.zeros(d.max_tokens, dtype=torch.long), d.max_tokens
    return {"tensor": tensor, "input_mask": torch.ones(length, dtype=torch.bool),
            "target_mask": torch.ones(length, dtype=torch.bool),
            "decoder_attention_mask": torch.zeros(length, dtype=torch.int32)}


class MixedSamples(torch.utils.data.IterableDataset):
    """Each sample from a dataset drawn by weight (per DataLoader worker, seeded), filled to every modality."""

    def __init__(self, parts: list[Masked], weights: list[float], modalities: list[str], seed: int, rank: int = 0):
        super().__init__()
        self.parts, self.modalities, self.seed, self.rank = parts, modalities, seed, rank
        self.probabilities = np.array(weights, dtype=float) / sum(weights)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.rank, info.id if info else 0, len(self.parts)])
        streams = [iter(part) for part in self.parts]
        empty = {m: empty_entry(m) for m in self.modalities}
        marks = [{"index": torch.tensor(i)} for i in range(len(self.parts))]
        while True:
            for index in rng.choice(len(self.parts), size=1024, p=self.probabilities).tolist():  # drawn in blocks:
                try:                                                     # one draw at a time cost 5% of a sample
                    sample = next(streams[index])
                except StopIteration:  # an epoch of it read: it starts again
                    streams[index] = iter(self.parts[index])
                    sample = next(streams[index])
                yield {**{m: empty[m] for m in self.modalities if m not in sample}, **sample, DATASET: marks[index]}


def _part(plan: DatasetPlan, index: int, config, tokenizer, split: str, rank: int) -> Masked:
    cfg = config.pretrain
    sampler = MaskingSampler(plan.modalities, plan.mixture, plan.input_tokens, plan.target_tokens,
                             tokenizer if any(is_sequence(m) for m in plan.modalities) else None)
    train = split == "train"
    settings = dict(train=train, repeats=plan.repeats, shuffle_buffer=plan.shuffle_buffer, rank=rank,
                    seed=cfg.seed if index == 0 else [cfg.seed, index], sample_shuffle_buffer=plan.sample_shuffle_buffer)
    if plan.kind == "text":
        return TextSamples(plan.train if train else plan.val, plan.text_column, plan.in_domains[0], sampler,
                           storage_options=config.storage_options, **settings)
    root = plan.root if train or plan.val_root is None else plan.val_root
    return MaskedSamples(root, plan.train if train else plan.val, plan.modalities, sampler,
                         min_score=cfg.det_min_score, **settings)


def model_modalities(plans: list[DatasetPlan]) -> list[str]:
    """Every dataset's modalities, in the registry's order."""
    wanted = {m for p in plans for m in p.modalities}
    return [d.name for d in registry.loaded().domains() if d.name in wanted]


def make_loader(root, config, tokenizer, *, split: str, batch_size: int, rank: int = 0,
                workers: int | None = None, plans: list[DatasetPlan] | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader of masked batches, decoding and masking in worker processes: 'train' (the mixture, when
    there are several datasets), or 'val' (the first dataset's; `val_loaders` gives each dataset's)."""
    plans = plans or plan_datasets(root, config)
    workers = config.pretrain.loader_workers if workers is None else workers
    if split == "train" and len(plans) > 1:
        parts = [_part(p, i, config, tokenizer, split, rank) for i, p in enumerate(plans)]
        dataset = MixedSamples(parts, [p.weight for p in plans], model_modalities(plans), config.pretrain.seed, rank)
    else:
        plan = next((p for p in plans if p.kind == "tokens" and (split == "train" or p.val)), plans[0])
        dataset = _part(plan, 0, config, tokenizer, split, rank)
    return data_loader(dataset, workers, batch_size=batch_size, collate_fn=collate, persistent_workers=workers > 0,
                       drop_last=split == "train")


def val_loaders(root, config, tokenizer, *, batch_size: int, workers: int | None = None,
                plans: list[DatasetPlan] | None = None) -> dict[str, torch.utils.data.DataLoader]:
    """Each dataset's validation loader, by name (the data root alone: ""); a dataset with nothing held out has
    none."""
    plans = plans or plan_datasets(root, config)
    workers = config.pretrain.loader_workers if workers is None else workers
    out = {}
    for i, plan in enumerate(plans):
        if plan.val:
            out[plan.name] = data_loader(_part(plan, i, config, tokenizer, "val", 0), min(workers, len(plan.val)),
                                         batch_size=batch_size, collate_fn=collate,
                                         persistent_workers=min(workers, len(plan.val)) > 0)
    return out

