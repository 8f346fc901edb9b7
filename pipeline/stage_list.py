"""The stages, in order, defined once: what each consumes and produces, its command, its Prefect flow, and the
status folders it records its shards' fates in.

The command line takes its stage commands' descriptions from here, the Prefect flows run `cc12m-pipeline` in this
order (each stage's runner with its artifacts is registered against its name in `flows.py`), the demo runs its
steps in this order, and `status` lists the status folders in this order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from core import registry


@dataclass(frozen=True)
class Stage:
    name: str                         # the Prefect flow, task and deployment name
    command: str                      # python -m pipeline <command>
    consumes: str
    produces: str
    records: Callable[[str], bool]    # whether a folder under <root>/_status is this stage's
    in_pipeline: bool = True          # part of cc12m-pipeline (URLs to a pretrained 4M)

    @property
    def summary(self) -> str:
        return f"{self.consumes} -> {self.produces}"


# A status folder is recognised among every modality the process imported (the dataset's recorded modules, read
# with its status): which stage records into a folder is a name lookup, not a listing to act on.
def _labelled(folder: str) -> bool:  # by a labeler here, or imported from an external tool's files
    return folder in {m.stage for m in registry.loaded().modalities() if not m.downloaded}


def _tokenized(folder: str) -> bool:
    from stages.dataset.align import STAGE as ALIGN  # here: webdataset imports torch, which `up` need not wait for
    from stages.dataset.shards import CROPS

    return folder in {CROPS, ALIGN} | {m.tokenize_stage for m in registry.loaded().tokenized()}


def _none(folder: str) -> bool:
    return False


STAGES: tuple[Stage, ...] = (
    Stage("download", "download", "a URL list (url<TAB>caption TSV, parquet or CSV)", "rgb/ and caption/ shards",
          lambda folder: folder == registry.photo().stage),
    Stage("quality", "quality", "rgb/ and caption/ shards", "quality/ score tables (CLIP score, aesthetic, watermark, "
          "embedding)", lambda folder: folder == "quality"),
    Stage("pseudo-label", "label", "rgb/ shards", "a shard folder per labelled modality", _labelled),
    Stage("train-tokenizers", "train-tokenizer", "the modality folders", "tokenizers/<modality>/", _none),
    Stage("tokenize", "tokenize", "the modality folders and tokenizers",
          "crop_settings/ and tok_<modality>@224/ shards, aligned", _tokenized),
    Stage("pretrain", "pretrain", "the token shards", "pretrain/ (a 4M model)", _none),
    Stage("evaluate", "evaluate", "a 4M model and the held-out shards", "<model>/evaluation/", _none,
          in_pipeline=False),
    Stage("transfer", "transfer", "a 4M model and a labelled dataset", "<model>/transfer-<task>/", _none,
          in_pipeline=False),
    Stage("generate", "generate", "a 4M model, the tokenizers and requests", "samples", _none, in_pipeline=False),
)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r} (known: {', '.join(s.name for s in STAGES)})")


def pipeline_stages() -> list[Stage]:
    return [s for s in STAGES if s.in_pipeline]


def status_rank(folder: str) -> int:
    """A status folder's place: the index of the stage that records into it (unknown ones last)."""
    return next((i for i, s in enumerate(STAGES) if s.records(folder)), len(STAGES))
