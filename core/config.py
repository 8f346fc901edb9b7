"""One typed configuration for every stage, loaded from a YAML profile plus command-line overrides.

Precedence, lowest first: the defaults below, the profile (`core/profiles/<name>.yaml` or a path),
`--set section.key=value` overrides, then a stage's own flags (`--shard-size` ...). Every layer is
validated before any work starts; an unknown key or a bad value is a `ConfigError` that names the key,
the value and the layer it came from.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core import registry

PROFILES_DIR = Path(__file__).parent / "profiles"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it and its source."""


class Section(BaseModel):
    # Unknown keys are errors and values are validated on assignment too, so a typo never passes silently.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DownloadConfig(Section):
    shard_size: int = Field(1000, ge=1, description="input rows per shard")
    max_side: int = Field(768, ge=16, description="longest side of stored images; smaller images are never upscaled")
    jpeg_quality: int = Field(95, ge=1, le=100)
    processes: int = Field(2, ge=1, description="shards downloaded at once (one Ray task each)")
    threads: int = Field(32, ge=1, description="concurrent downloads inside one shard task")
    timeout: float = Field(10.0, gt=0, description="seconds one socket operation may wait")
    deadline: float = Field(30.0, gt=0, description="seconds one download may take in all, retries included")
    retries: int = Field(2, ge=0, description="extra attempts after a 5xx, a reset or a timeout")
    retry_backoff: float = Field(0.5, ge=0, description="first retry delay in seconds, doubled each retry")
    max_redirects: int = Field(5, ge=0)
    max_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="byte cap on one response body")
    max_pixels: int = Field(50_000_000, ge=1, description="refuse images with more pixels, read from the header")
    max_url_chars: int = Field(4096, ge=16)
    max_caption_chars: int = Field(4096, ge=1)
    allow_private_hosts: bool = Field(False, description="allow hosts on loopback, private or link-local addresses")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="'host' or 'host:port' entries allowed even on private addresses"
    )
    ca_bundle: str | None = Field(None, description="PEM file of CAs to trust for https, instead of the system's")
    respect_opt_out: bool = Field(True, description="skip images whose X-Robots-Tag says noai or noimageai")
    user_agent: str = "4m-data-engine/0.1 (+https://github.com/4m-data-engine; respects X-Robots-Tag noai)"
    url_column: str = "url"
    caption_column: str = "caption"
    duplicate_memory_rows: int = Field(
        8_000_000, ge=1, description="URL hashes the repeated-URL check holds in memory (16 bytes each); a longer "
        "list spills them to the driver's temporary folder ($TMPDIR), 16 bytes a row"
    )


class QualityConfig(Section):
    """The quality stage (between download and label): scores per sample, and the thresholds later stages apply."""
    clip_model: str = Field("ViT-B-32", description="open_clip model name, or a folder in open_clip's layout, "
                                                     "for the image-text score (LAION's: ViT-B/32)")
    clip_pretrained: str | None = Field("openai", description="open_clip pretrained tag for a model name "
                                                              "(LAION scored with OpenAI's weights)")
    aesthetic_model: str | None = Field(
        "data/models/quality/aesthetic", description="folder of the converted LAION aesthetic predictor "
        "(python -m pipeline convert-aesthetic); null: no aesthetic score")
    watermark_model: str | None = Field(
        "data/models/quality/watermark", description="folder of the converted LAION-5B watermark detector "
        "(python -m pipeline convert-watermark); null: no watermark score")
    min_clip_score: float | None = Field(None, ge=-1, le=1, description="keep samples whose image-text cosine is "
                                                                        "at least this (LAION-5B: 0.28 with ViT-B/32)")
    min_aesthetic: float | None = Field(None, ge=0, le=10, description="keep samples whose aesthetic score is at "
                                                                      "least this (LAION-Aesthetics: 5, 6, 6.5)")
    max_watermark: float | None = Field(None, ge=0, le=1, description="keep samples whose watermark probability "
                                                                     "is at most this")
    dedup: float | None = Field(None, ge=0.8, le=1, description="drop a sample whose CLIP image embedding is at "
                                "least this cosine to an earlier sample's (near-duplicate photos: the first is kept); "
                                "0.8 or more, the lowest the near-duplicate table records")
    dedup_cluster_size: int = Field(1000, ge=2, description="samples per k-means cluster of the near-duplicate "
                                                            "search (pairs are compared within a cluster)")
    batch_size: int = Field(32, ge=1, description="images per forward pass")
    device: str = Field("auto", description="auto (cuda when present), cuda, or cpu")
    workers: int | None = Field(None, ge=1, description="scoring replicas (default: one per GPU, or per "
                                                        "cpus_per_worker CPUs, of every node)")
    cpus_per_worker: float = Field(1.0, gt=0)


MODALITIES = "modalities"  # the validation context's key for the configuration's ModalitySet


class ModalitySection(Section):
    """A section that names modalities: its defaults and checks are those of the modality set of the configuration
    it belongs to (passed down when the configuration is read; the built-ins for a section made alone), which it
    keeps for later assignments."""

    _modality_set: registry.ModalitySet | None = PrivateAttr(default=None)

    @property
    def modality_set(self) -> registry.ModalitySet:
        return self._modality_set or registry.ModalitySet()

    @staticmethod
    def _set_of(info: ValidationInfo) -> registry.ModalitySet:
        return (info.context or {}).get(MODALITIES) or registry.ModalitySet()

    @classmethod
    def modality_defaults(cls, modalities: registry.ModalitySet) -> dict:
        """The settings whose defaults are the set's modalities."""
        return {}

    @model_validator(mode="before")
    @classmethod
    def _modality_defaults(cls, values, info: ValidationInfo):
        if isinstance(values, dict):
            values = {**cls.modality_defaults(cls._set_of(info)), **values}
        return values

    @model_validator(mode="after")
    def _keep_modality_set(self, info: ValidationInfo):
        if (info.context or {}).get(MODALITIES):
            self._modality_set = info.context[MODALITIES]
        return self

    def __setattr__(self, name, value):
        if name in type(self).model_fields:  # checked against this section's own set, not the built-ins
            self.__pydantic_validator__.validate_assignment(self, name, value,
                                                            context={MODALITIES: self.modality_set})
        else:
            super().__setattr__(name, value)


def _labelled(info: ValidationInfo) -> list[str]:
    return [m.name for m in ModalitySection._set_of(info).labelled()]


def _known(value, known: list[str], what: str, prefix: str = ""):
    unknown = [name for name in value if name not in known]
    if unknown:
        raise ValueError(f"{prefix}unknown {what} {unknown} (known: {', '.join(known)})")
    return value


class LabelConfig(ModalitySection):
    labelers: list[str] = Field(default_factory=list, description="which labels to make (default: every "
                                                                  "modality of the profile with a labeler)")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="hub id or local folder per labeler (default: each modality's own, models/modalities.py)")
    device: str = Field("auto", description="auto (cuda when present), cuda, or cpu")
    batch_size: int = Field(16, ge=1, description="images per forward pass")
    batch_sizes: dict[str, int] = Field(
        default_factory=dict, description="per-labeler batch sizes overriding batch_size (the models differ "
                                          "in memory per image: DPT at 768 pixels, CLIP at 224)")
    chunk_size: int = Field(128, ge=1, description="images decoded together, one chunk ahead of the models")
    batch_window: int = Field(
        256, ge=1, description="images that may wait for a full batch of their model input size; bounds the "
                               "decoded images held and how far the ordered label writers lag")
    decode_threads: int = Field(4, ge=1)
    workers: int | None = Field(None, ge=1, description="model replicas; None: one per GPU of the cluster, else "
                                                       "one per cpus_per_worker CPUs of each node")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs a replica reserves when there is no GPU (each "
                                                          "replica loads every labeler)")
    det_min_score: float = Field(0.6, ge=0, le=1)
    det_backend: Literal["auto", "transformers", "detectron2"] = Field(
        "auto", description="boxes from detectron2 (ViTDet) or transformers (label.models.det); auto: detectron2 "
                            "when it is importable and det_detectron2_config is set")
    det_detectron2_config: str | None = Field(
        None, description="detectron2 LazyConfig file, e.g. <detectron2 source>/projects/ViTDet/configs/COCO/"
                          "cascade_mask_rcnn_vitdet_h_75ep.py")
    det_detectron2_weights: str | None = Field(None, description="its weights: a model_final_*.pkl path or URL")
    options: dict[str, dict] = Field(
        default_factory=dict, description="per-labeler settings over its entry's own (its Labeling.options), e.g. "
                                          "{sam_instance: {points_per_side: 16}}")
    semseg_short_side: int = Field(384, ge=32)
    clip_short_side: int = Field(224, ge=16)

    @classmethod
    def modality_defaults(cls, modalities: registry.ModalitySet) -> dict:
        return {"labelers": [m.name for m in modalities.labelled()],
                "models": {m.name: m.labeler.weights for m in modalities.labelled() if m.labeler.weights}}

    @field_validator("labelers")
    @classmethod
    def _known_labelers(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            raise ValueError(f"no labelers (known: {', '.join(_labelled(info))})")
        return _known(value, _labelled(info), "labelers")

    @field_validator("batch_sizes")
    @classmethod
    def _known_batch_sizes(cls, value: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        _known(value, _labelled(info), "labelers", prefix="batch sizes for ")
        small = {name: size for name, size in value.items() if size < 1}
        if small:
            raise ValueError(f"batch sizes must be at least 1, got {small}")
        return value

    @field_validator("options")
    @classmethod
    def _known_options(cls, value: dict[str, dict], info: ValidationInfo) -> dict[str, dict]:
        return _known(value, _labelled(info), "labelers", prefix="options for ")

    def batch_size_of(self, labeler: str) -> int:
        return self.batch_sizes.get(labeler, self.batch_size)

    def options_of(self, labeler: str) -> dict:
        """The labeler's settings: its entry's, then this section's `options` for it."""
        return {**registry.get(labeler).labeler.options(self), **self.options.get(labeler, {})}

    def resolved_det_backend(self) -> str:
        """The detector backend this run uses: `auto` picks detectron2 only when it can run.

        Checked when a stage starts rather than per configuration layer, so `--set` may name the backend
        and its files in any order.
        """
        if self.det_backend == "detectron2" and not (self.det_detectron2_config and self.det_detectron2_weights):
            raise ConfigError(f"label.det_backend = 'detectron2' needs label.det_detectron2_config "
                              f"(now {self.det_detectron2_config!r}) and label.det_detectron2_weights "
                              f"(now {self.det_detectron2_weights!r})")
        if self.det_backend != "auto":
            return self.det_backend
        ready = self.det_detectron2_config and self.det_detectron2_weights and importlib.util.find_spec("detectron2")
        return "detectron2" if ready else "transformers"


IN_PROCESS_WORKERS = ("data-parallel Ray Train workers; None: one per GPU, else one; 0: one trainer in the calling "
                      "process (Ray Train's local mode: no worker group to start, no restarts)")


class TokenizerStageConfig(ModalitySection):
    size: Literal["tiny", "paper"] = Field("paper", description="model sizes: the paper's (ViT-B) or tiny")
    modalities: list[str] = Field(default_factory=list,
                                  description="tokenizers to train and use: text and every tokenized modality")
    codebook_sizes: dict[str, int] = Field(default_factory=dict, description="override Table 3's codebook sizes")
    published: dict[str, str] = Field(default_factory=dict,
                                      description="modality -> a published tokenizer (hub id, folder or .safetensors; "
                                                  "text: the reference's tokenizer JSON) installed by "
                                                  "train-tokenizer instead of training one")
    vocab_size: int = Field(30000, ge=4400, description="text vocabulary (captions and boxes)")
    batch_size: int = Field(640, ge=1, description="global batch size (Table 3: 640, CLIP 1024)")
    epochs: float = Field(15, gt=0)
    epochs_by_modality: dict[str, float] = Field(default_factory=dict,
                                                 description="epochs for the named tokenizers, instead of `epochs`")
    warmup_epochs: float = Field(1, ge=0)
    base_lr: float = Field(5e-5, gt=0, description="learning rate per 256 samples")
    weight_decay: float = Field(0.05, ge=0)
    workers: int | None = Field(None, ge=0, description=IN_PROCESS_WORKERS)
    cpus_per_worker: float = Field(1.0, gt=0)
    loader_workers: int = Field(6, ge=0, description="DataLoader processes decoding and cropping samples per training "
                                                     "worker (at most one per shard it reads; 0: in the trainer)")
    max_failures: int = Field(3, ge=0, description="times Ray Train restarts lost workers (from the last checkpoint)")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (resume point)")
    log_every: int = Field(50, ge=1, description="steps between logged metrics")
    eval_every: int = Field(1000, ge=1, description="steps between reconstruction metrics and pictures")
    eval_samples: int = Field(8, ge=1)
    seed: int = 0
    # pre-tokenization
    n_crops: int = Field(4, ge=1, description="crops per sample: the center crop, then random-resized crops")
    crop_scale: tuple[float, float] = Field((0.8, 1.0), description="area range of the random pre-tokenization crops "
                                                                    "(training uses each tokenizer's own, Table 3)")
    store_crops: bool = Field(True, description="store each crop of the photo at 224 (crops_rgb@224/, about 80% of "
                                                "rgb/'s size at 4 crops) so the 4M loader decodes 224 pixels, not "
                                                "the whole photo (3.5x its rate per core); off: photos read whole")
    tokenize_batch_size: int = Field(64, ge=1, description="crops per encoder batch")
    decode_threads: int = Field(4, ge=1, description="threads decoding and cropping samples for the encoder")
    device: str = Field("auto", description="auto (cuda when present), cuda, or cpu")

    @classmethod
    def modality_defaults(cls, modalities: registry.ModalitySet) -> dict:
        return {"modalities": modalities.tokenizer_names()}

    @field_validator("published")
    @classmethod
    def _known_published(cls, value, info: ValidationInfo):
        return _known(value, cls._set_of(info).tokenizer_names(), "published tokenizer modalities")

    @field_validator("modalities", "epochs_by_modality")
    @classmethod
    def _known_modalities(cls, value, info: ValidationInfo):
        _known(value, cls._set_of(info).tokenizer_names(), "modalities")
        if isinstance(value, dict) and any(epochs <= 0 for epochs in value.values()):
            raise ValueError(f"epochs must be positive: {value}")
        return value


class PretrainDatasetConfig(Section):
    """One dataset of a pretraining mixture (4M-21 mixes CC12M, COYO-700M and C4): where it is, what 4M reads of it
    and how it is masked; a setting left out is the `pretrain` section's."""

    name: str = Field(description="how its losses and counts are named in the logs")
    root: str | None = Field(None, description="its data root (a folder or an object-storage URL); None: the run's "
                                               "own; a text corpus: a .jsonl/.parquet file, or a folder of them")
    type: Literal["tokens", "text"] = Field("tokens", description="tokens: a tokenized dataset of this project's "
                                                                  "layout; text: a text-only corpus (C4's form)")
    text_column: str = Field("text", description="a text corpus's column of texts, read as the caption")
    shards: list[str] | None = Field(None, description="its training shards (names); None: all but the held-out")
    val_root: str | None = Field(None, description="a separate validation dataset; None: its own last shards")
    in_domains: list[str] | None = Field(None, description="its input modalities; None: pretrain.modalities "
                                                           "(a text corpus: the caption)")
    out_domains: list[str] | None = Field(None, description="its target modalities; None: as in_domains")
    mixture: str | list[dict] | None = Field(None, description="'paper', a list of components, or the path of a "
                                                               "reference alphas config (.yaml); None: pretrain's")
    input_tokens: int | None = Field(None, ge=1)
    target_tokens: int | None = Field(None, ge=1)
    repeats: int | None = Field(None, ge=1)
    shuffle_buffer: int | None = Field(None, ge=1, description="masked samples in its shuffle buffer")
    sample_shuffle_buffer: int = Field(0, ge=0, description="samples shuffled as read, before the repeats (the "
                                                            "reference's wds_shuffle_buffer_tar); 0: none")
    weight: float = Field(1.0, ge=0, description="its share of the samples, relative to the others'")

    @field_validator("in_domains", "out_domains", mode="before")
    @classmethod
    def _hyphenated(cls, value):
        return value.split("-") if isinstance(value, str) else value  # the reference's `a-b-c`


class PretrainConfig(ModalitySection):
    size: Literal["Ti", "S", "B", "L", "XL"] = Field("B", description="4M size (Table 4)")
    modalities: list[str] = Field(default_factory=list,
                                  description="modalities loaded and masked, as 4M names them (default: every "
                                              "registered one; rgb@224 is pixels, an input only)")
    input_tokens: int = Field(128, ge=1, description="encoder tokens per sample (Table 5)")
    target_tokens: int = Field(128, ge=1, description="decoder tokens per sample (Table 5)")
    mixture: str | list[dict] = Field("paper", description="'paper' (RGB->All & All->All, alpha 0.5), or a list of "
                                                           "{input_alphas, target_alphas, keep, weight}")
    repeats: int = Field(4, ge=1, description="masks drawn per sample read (Table 28)")
    val_shards: int = Field(1, ge=0, description="the last shards, held out for validation and never trained on")
    det_min_score: float = Field(0.6, ge=0, le=1, description="boxes below this score are left out of the sequence")
    shuffle_buffer: int = Field(1000, ge=1, description="masked samples in the shuffle buffer")
    batch_size: int = Field(8192, ge=1, description="global batch (Table 5)")
    loader_workers: int = Field(8, ge=0, description="DataLoader worker processes per training worker")
    model: dict = Field(default_factory=dict, description="overrides of the size's settings (dim, encoder_depth, "
                                                          "decoder_depth, num_heads, ...)")
    steps: int = Field(239_120, ge=1, description="optimizer steps (500B tokens at batch 8192, 256 tokens each)")
    warmup_steps: int = Field(4_769, ge=0, description="linear warmup (10B tokens), then cosine decay to 0")
    base_lr: float = Field(1e-4, gt=0, description="learning rate per 256 samples (Table 5)")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(None, gt=0, description="gradient norm clip (Table 5: XL only, 3.0)")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward: less "
                                                              "memory for L/XL, about a third more compute")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: every worker holds the whole model; fsdp: "
                                                             "parameters, gradients and optimizer state sharded "
                                                             "across workers (4M-XL)")
    compile: bool = Field(False, description="torch.compile the model (GPUs; the first steps pay the compilation)")
    workers: int | None = Field(None, ge=0, description=IN_PROCESS_WORKERS)
    cpus_per_worker: float = Field(1.0, gt=0)
    device: str = Field("auto", description="auto (cuda when present), cuda, or cpu")
    log_every: int = Field(50, ge=1)
    val_every: int = Field(2000, ge=1, description="steps between validation losses")
    val_batches: int = Field(20, ge=1, description="validation batches averaged per evaluation")
    checkpoint_every: int = Field(1000, ge=1)
    max_failures: int = Field(3, ge=0, description="times Ray Train restarts lost workers (from the last checkpoint)")
    seed: int = 0
    datasets: list[PretrainDatasetConfig] = Field(
        default_factory=list, description="a weighted mixture of datasets (4M-21's CC12M + COYO + C4); empty: the "
                                          "data root alone, with the settings above")
    data_config: str | None = Field(None, description="an apple/ml-4m data config (train.datasets, weights, val) "
                                                      "read as `datasets`")

    @classmethod
    def modality_defaults(cls, modalities: registry.ModalitySet) -> dict:
        return {"modalities": modalities.domain_names()}

    @model_validator(mode="before")
    @classmethod
    def _reference_data_config(cls, values):
        if isinstance(values, dict) and values.get("data_config"):
            if values.get("datasets"):
                raise ValueError("pretrain.data_config and pretrain.datasets: give one of them")
            from core.reference_config import read_data_config

            values = {**values, "datasets": read_data_config(values["data_config"])}
        return values

    @model_validator(mode="after")
    def _datasets_known(self, info: ValidationInfo):
        known = ((info.context or {}).get(MODALITIES) or self.modality_set).domain_names()
        names = [d.name for d in self.datasets]
        if not all(names) or any("." in n for n in names):
            raise ValueError(f"pretrain.datasets: names {names} must be non-empty, without dots (they name logs)")
        if len(set(names)) != len(names):
            raise ValueError(f"pretrain.datasets: names {names} repeat")
        if self.datasets and not sum(d.weight for d in self.datasets) > 0:
            raise ValueError(f"pretrain.datasets: weights {[d.weight for d in self.datasets]} are all zero")
        for d in self.datasets:
            for key in ("in_domains", "out_domains"):
                unknown = [m for m in getattr(d, key) or [] if m not in known]
                if unknown:
                    raise ValueError(f"pretrain.datasets[{d.name}].{key}: unknown modalities {unknown} (known: "
                                     f"{', '.join(known)})")
        return self

    def dataset_entries(self) -> list[PretrainDatasetConfig]:
        """The datasets a run reads, every setting filled: the configured mixture, or the data root alone."""
        if not self.datasets:
            return [PretrainDatasetConfig(name="", in_domains=list(self.modalities), out_domains=list(self.modalities),
                                          mixture=self.mixture, input_tokens=self.input_tokens,
                                          target_tokens=self.target_tokens, repeats=self.repeats,
                                          shuffle_buffer=self.shuffle_buffer)]
        caption = [d.name for d in self.modality_set.domains() if d.kind == "sequence" and d.modality.downloaded]
        filled = []
        for d in self.datasets:
            inputs = d.in_domains or (caption[:1] if d.type == "text" else list(self.modalities))
            filled.append(d.model_copy(update={
                "in_domains": inputs, "out_domains": d.out_domains or list(inputs),
                "mixture": d.mixture if d.mixture is not None else self.mixture,
                "input_tokens": d.input_tokens or self.input_tokens, "target_tokens": d.target_tokens or self.target_tokens,
                "repeats": d.repeats or self.repeats, "shuffle_buffer": d.shuffle_buffer or self.shuffle_buffer}))
        return filled

    def model_domains(self) -> tuple[list[str], list[str]]:
        """(inputs, targets) of the model: every dataset's, in the registry's order; pixels and vectors are never
        targets."""
        entries, order = self.dataset_entries(), self.modality_set.domains()
        inputs = {m for d in entries for m in d.in_domains}
        outputs = {m for d in entries for m in d.out_domains}
        return ([x.name for x in order if x.name in inputs],
                [x.name for x in order if x.name in outputs and not x.input_only])

    @field_validator("modalities")
    @classmethod
    def _known_4m_modalities(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return _known(value, cls._set_of(info).domain_names(), "modalities")


class TransferTaskConfig(Section):
    image_size: int = Field(224, ge=16, description="training and validation resolution (a multiple of 16)")
    epochs: float = Field(50, gt=0)
    warmup_epochs: float = Field(2, ge=0)
    batch_size: int = Field(4096, ge=1, description="global batch")
    base_lr: float = Field(1e-4, gt=0, description="learning rate per 256 samples")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float = Field(0.75, gt=0, le=1, description="each block's lr x this per block above it (L: 0.85)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth of the last block (L: 0.2)")
    # classification (Table 6)
    randaugment: str | None = Field("rand-m9-mstd0.5", description="timm's RandAugment spec; None: off")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random-resized crop area range")
    mixup: float = Field(0.1, ge=0)
    cutmix: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    linear_probe: bool = Field(False, description="freeze the backbone: train the head alone")
    # dense tasks (Tables 8 and 9)
    classes: int = Field(150, ge=1, description="segmentation classes (ADE20K: 150; annotation id c is class c-1)")
    scale_jitter: tuple[float, float] = Field((0.1, 2.0), description="large-scale jitter range (segmentation)")
    depth_scale: float = Field(1000.0, gt=0, description="depth PNG value per metre (NYUv2's millimetres: 1000)")
    eval_every: int = Field(1000, ge=1, description="steps between validation scores")
    loader_workers: int = Field(8, ge=0, description="DataLoader processes per training worker")


TRANSFER_DEFAULTS = {  # what differs from TransferTaskConfig's (Table 6, 4M-B on ImageNet-1K) per task
    "classification": {},
    "segmentation": dict(  # Table 8: ADE20K at 512^2, lr 2e-4 at batch 64
        image_size=512, epochs=64, warmup_epochs=1, batch_size=64, base_lr=8e-4, randaugment=None, mixup=0.0,
        cutmix=0.0, label_smoothing=0.0),
    "depth": dict(  # Table 9: NYUv2 at 256^2, lr 1e-4 at batch 128, 1000 epochs
        image_size=256, epochs=1000, warmup_epochs=100, batch_size=128, base_lr=2e-4, weight_decay=1e-4,
        randaugment=None, mixup=0.0, cutmix=0.0, label_smoothing=0.0),
}


class TransferConfig(Section):
    classification: TransferTaskConfig = Field(default_factory=TransferTaskConfig)
    segmentation: TransferTaskConfig = Field(
        default_factory=lambda: TransferTaskConfig(**TRANSFER_DEFAULTS["segmentation"]))
    depth: TransferTaskConfig = Field(default_factory=lambda: TransferTaskConfig(**TRANSFER_DEFAULTS["depth"]))
    workers: int | None = Field(None, ge=0, description=IN_PROCESS_WORKERS)
    cpus_per_worker: float = Field(1.0, gt=0)
    device: str = Field("auto", description="auto (cuda when present), cuda, or cpu")
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    max_failures: int = Field(3, ge=0)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _settings_over_the_tasks_defaults(cls, values):
        # `transfer.depth.epochs=10` changes one setting: the rest stay the depth task's, not classification's
        if isinstance(values, dict):
            values = dict(values)
            for task, defaults in TRANSFER_DEFAULTS.items():
                if isinstance(values.get(task), dict):
                    values[task] = {**defaults, **values[task]}
        return values


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray (RAY_ADDRESS wins)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray; None lets Ray count them")
    object_store_memory: int | None = Field(None, ge=78_643_200)
    resource_wait_s: float = Field(600.0, gt=0, description="seconds a training run waits for its workers' "
                                                            "resources (at its start, or to restart after a lost "
                                                            "node), then fails naming them")


class WandbConfig(Section):
    """Weights & Biases logging of every training run, beside metrics.jsonl and TensorBoard (which stay)."""

    mode: Literal["off", "offline", "online"] = Field(
        "off", description="off; offline: runs written under each run's folder (wandb/), sent later with "
                           "`wandb sync`; online: sent as they run (needs `wandb login` or WANDB_API_KEY)")
    project: str = Field("4m-data-engine", description="the W&B project every run goes to")
    entity: str | None = Field(None, description="the W&B team or user; None: the logged-in user's default")


class DashboardsConfig(Section):
    """How often what a running stage shows in Prefect moves (its progress bar, shards and workers tables)."""

    progress_every: int = Field(100, ge=1, description="a worker reports how far it is in a shard every this many "
                                                       "samples (and at its start and end)")
    poll_seconds: float = Field(2.0, gt=0, description="seconds between two readings of the workers' reports: the "
                                                       "progress bar is at most this old")
    table_seconds: float = Field(10.0, ge=0, description="seconds at least between two versions of the shards and "
                                                         "workers tables, made as shards commit (Prefect keeps each "
                                                         "version: at most one per shard)")
    running_table_seconds: float = Field(300.0, ge=0, description="seconds between two versions of those tables "
                                                                  "while no shard commits (the shards in progress, "
                                                                  "what each worker is on)")


class Config(Section):
    profile: str = "default"
    modalities: list[str] = Field(default_factory=list, description="modules defining more modalities (dotted "
                                                                    "names or .py paths), imported before the rest "
                                                                    "is read; see docs/architecture.md")
    data_root: str = Field("data/cc12m", description="the dataset's folder, or an object-storage URL "
                                                     "(s3://bucket/prefix, gs://bucket/prefix, any fsspec URL)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of an object-storage data root beyond its own credential "
                                          "chain, e.g. {endpoint_url: http://minio:9000} or {profile: lab}")
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    label: LabelConfig = Field(default_factory=dict, validate_default=True)  # made with the set
    tokenizer: TokenizerStageConfig = Field(default_factory=dict, validate_default=True)  # made with the set
    pretrain: PretrainConfig = Field(default_factory=dict, validate_default=True)  # made with the set
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    dashboards: DashboardsConfig = Field(default_factory=DashboardsConfig)

    @property
    def root(self):
        """The data root as a path object (core.storage): a Path, or a UPath carrying `storage_options`."""
        from core.storage import data_path

        return data_path(self.data_root, self.storage_options)

    def __init__(self, /, **data):
        self.__pydantic_validator__.validate_python(data, self_instance=self, context=_modality_context(data))

    @classmethod
    def model_validate(cls, obj, **kwargs):
        kwargs["context"] = kwargs.get("context") or _modality_context(obj)
        return super().model_validate(obj, **kwargs)

    @functools.cached_property
    def modality_set(self) -> registry.ModalitySet:
        """The modalities this configuration works with: the built-ins and its `modalities` modules'."""
        return registry.ModalitySet(self.modalities)


def _modality_context(data) -> dict:
    """Validation context: the set of the modules the configuration names, which its sections' defaults and
    checks are made from."""
    specs = data.get("modalities") if isinstance(data, dict) else None
    return {MODALITIES: registry.ModalitySet(specs if isinstance(specs, list) else ())}


def _profile_path(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        return path
    return PROFILES_DIR / f"{profile}.yaml"


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r}")
        elif isinstance(e.get("input"), dict) and e["type"] == "value_error":  # a section's check: its message
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: {key} = {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _validate(data: dict, source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`download.threads=16` -> (["download", "threads"], 16); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty key component in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value {raw!r} is not valid YAML ({err})") from None
    return path, value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _use_modalities(data: dict, base: Path, source: str) -> None:
    """Import the modules a layer names under `modalities:` (a .py path relative to its profile's folder), so
    the sections' defaults and checks see their modalities; the paths are kept absolute for the workers."""
    specs = data.get("modalities") or []
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ConfigError(f"{source}: modalities = {specs!r}: expected a list of module names or .py paths")
    resolved = [str((base / s).resolve()) if s.endswith(".py") and not Path(s).is_absolute() else s for s in specs]
    try:
        registry.ModalitySet(resolved)  # imported now: a module that cannot be is named with its profile
    except registry.RegistryError as err:
        raise ConfigError(f"{source}: {err}") from None
    data["modalities"] = resolved


DEFAULT_PROFILE = "paper"  # the real settings; the demo's apply only where the demo is named


def _read_profile(profile: str, within: tuple[Path, ...] = ()) -> tuple[dict, Path]:
    """A profile's settings, over those of the profile it `extends:` (a profile name, or a .yaml path relative
    to its own folder), if any."""
    path = _profile_path(profile)
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"profile {profile!r}: no file {path} (known profiles: {', '.join(known)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"profile {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"profile {path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data, path
    if not isinstance(base, str):
        raise ConfigError(f"profile {path}: extends = {base!r}: expected a profile name or a .yaml path")
    if path.resolve() in within:
        raise ConfigError(f"profile {path}: extends itself through {' -> '.join(str(p) for p in within)}")
    base_data, _ = _read_profile(str(path.parent / base) if base.endswith((".yaml", ".yml")) else base,
                                 (*within, path.resolve()))
    base_data.pop("profile", None)
    return _deep_merge(base_data, data), path


def load_config(
    profile: str = DEFAULT_PROFILE,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> Config:
    """Build the configuration: profile, then `--set` overrides, then stage flags ({"download.threads": 8}).

    Each layer is validated on its own so an error names the layer that brought the bad value.
    """
    data, path = _read_profile(profile)
    data.setdefault("profile", path.stem)
    _use_modalities(data, path.parent, f"profile {path}")
    _validate(data, f"profile {path}")

    for text in overrides or []:
        key_path, value = parse_override(text)
        data = _deep_merge(data, _nest(key_path, value))
        _use_modalities(data, Path.cwd(), f"--set {text}")
        _validate(data, f"--set {text}")

    for key, value in (flags or {}).items():
        if value is None:
            continue
        data = _deep_merge(data, _nest(key.split("."), value))
        _validate(data, f"--{key.split('.')[-1].replace('_', '-')} {value!r}")

    return _validate(data, "configuration")
