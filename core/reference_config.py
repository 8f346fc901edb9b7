"""apple/ml-4m's pretraining data configs, read as they are, into `pretrain.datasets` entries.

Consumes  a data config (`cfgs/default/4m/data/.../*.yaml`): `train.datasets.<name>` (type, in_domains/out_domains
          joined by hyphens, input_alphas/target_alphas or an `alphas_config`, num_input_tokens/num_target_tokens,
          data_path with `[folder,folder]` and a brace range of shards, wds_n_repeats, wds_shuffle_buffer_*,
          main_augment_domain ...), `train.weights`, `val.datasets.<name>.data_path`;
          an alphas config (`cfgs/default/4m/alphas_mixture/...`): per modality its alphas for each Dirichlet
          (and `keep` for sequences), under `alphas_mixture` beside `sampling_weights` when those are given.
Produces  dicts of PretrainDatasetConfig's fields; mixture components ({input_alphas, target_alphas, keep, weight}).

A field is mapped to ours or refused by name: a setting this loader cannot honour is an error, never ignored.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from braceexpand import braceexpand

from core import registry

KINDS = {"multimodal": "tokens", "huggingface": "text"}
SAME_AS_OURS = {  # fields whose only value we implement: the reference's defaults
    "use_wds": True, "aligned_captions": True, "tok_train_aug": True,
    "min_input_tokens": None, "min_target_tokens": None, "modality_name_map": None}
RENAMED = {"num_input_tokens": "input_tokens", "num_target_tokens": "target_tokens", "wds_n_repeats": "repeats",
           "wds_shuffle_buffer_repeat": "shuffle_buffer", "wds_shuffle_buffer_tar": "sample_shuffle_buffer",
           "shuffle_buffer_load": "shuffle_buffer"}
READ_HERE = {"type", "in_domains", "out_domains", "input_alphas", "target_alphas", "alphas_config", "data_path",
             "main_augment_domain"}


def _load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{what}: no file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {str(path)!r}: not YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r}: expected a mapping, got {type(data).__name__}")
    return data


def _refuse_unknown(data: dict, known: set, where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: {unknown} not supported (read: {', '.join(sorted(known))})")


def resolved(path: str, config: Path, where: str) -> str:
    """A path the reference writes relative to its repository root: as given, else under the config's folders."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return str(candidate.resolve())
    for folder in config.resolve().parents:
        if (folder / candidate).exists():
            return str(folder / candidate)
    raise ValueError(f"{where} = {path!r}: no such file (looked from the working directory and from each folder "
                     f"above {config})")


def _alphas(text, domains: list[str], where: str) -> dict[str, float]:
    """`"1.0"` (every domain) or `"0.5-1.0-..."` (one per domain, in the reference's sorted domain order)."""
    values = [float(a) for a in str(text).split("-")]
    if len(values) == 1:
        values = values * len(domains)
    if len(values) != len(domains):
        raise ValueError(f"{where} = {text!r}: {len(values)} alphas for {len(domains)} domains {domains}")
    return dict(zip(sorted(domains), values))


def _data_path(text: str, where: str) -> tuple[str, list[str] | None, list[str]]:
    """(root, shard names or None for all, folders named) of `root/[a,b]/shard-{0..9}.tar`, or of a plain root."""
    match = re.fullmatch(r"(.*?)/?\[([^\]]*)\]/(.+)", text)
    if not match:
        return text.rstrip("/"), None, []
    root, folders, pattern = match.groups()
    shards = [Path(name).name.removesuffix(".tar") for name in braceexpand(pattern)]
    return root, shards, [f.strip() for f in folders.split(",") if f.strip()]


def read_data_config(path: str | Path) -> list[dict]:
    """Every training dataset of the config, with its weight and validation root."""
    path = Path(path).expanduser()
    data = _load(path, "pretrain.data_config")
    _refuse_unknown(data, {"train", "val"}, f"{path}")
    train = data.get("train") or {}
    _refuse_unknown(train, {"datasets", "weights"}, f"{path}: train")
    datasets = train.get("datasets") or {}
    if not datasets:
        raise ValueError(f"{path}: train.datasets is empty")
    weights = train.get("weights") or [1.0] * len(datasets)
    if len(weights) != len(datasets):
        raise ValueError(f"{path}: train.weights {weights} for {len(datasets)} datasets {list(datasets)}")
    validation = (data.get("val") or {}).get("datasets") or {}
    _refuse_unknown(validation, set(datasets), f"{path}: val.datasets")
    return [_dataset(name, entry or {}, float(weight), validation.get(name) or {}, path)
            for (name, entry), weight in zip(datasets.items(), weights)]


def _dataset(name: str, entry: dict, weight: float, validation: dict, path: Path) -> dict:
    where = f"{path}: train.datasets.{name}"
    _refuse_unknown(entry, READ_HERE | set(SAME_AS_OURS) | set(RENAMED), where)
    kind = entry.get("type", "multimodal")
    if kind not in KINDS:
        raise ValueError(f"{where}.type = {kind!r}: supported {sorted(KINDS)}")
    for key, value in SAME_AS_OURS.items():
        if key in entry and entry[key] != value:
            raise ValueError(f"{where}.{key} = {entry[key]!r}: only {value!r} is supported")
    pixels = [d.name for d in registry.photo().domains() if d.kind == "pixels"]
    if entry.get("main_augment_domain") not in (None, *pixels):
        raise ValueError(f"{where}.main_augment_domain = {entry['main_augment_domain']!r}: only {pixels} (the "
                         f"photo every label and crop is aligned with)")
    if "in_domains" not in entry:
        raise ValueError(f"{where}: in_domains missing")
    inputs = str(entry["in_domains"]).split("-")
    outputs = str(entry.get("out_domains") or entry["in_domains"]).split("-")
    out = {"name": name, "type": KINDS[kind], "weight": weight, "in_domains": inputs, "out_domains": outputs}
    for theirs, ours in RENAMED.items():
        if entry.get(theirs) is not None:
            out[ours] = int(entry[theirs])
    if entry.get("alphas_config"):
        out["mixture"] = resolved(entry["alphas_config"], path, f"{where}.alphas_config")
    elif entry.get("input_alphas") is not None or entry.get("target_alphas") is not None:
        domains = sorted(set(inputs) | set(outputs))
        out["mixture"] = [{"input_alphas": _alphas(entry.get("input_alphas") or 0, inputs, f"{where}.input_alphas"),
                           "target_alphas": _alphas(entry.get("target_alphas") or 0, outputs,
                                                    f"{where}.target_alphas")}]
        out["mixture"][0]["input_alphas"] = {m: out["mixture"][0]["input_alphas"].get(m, 0.0) for m in domains}
    else:
        raise ValueError(f"{where}: neither alphas_config nor input_alphas/target_alphas")
    if not entry.get("data_path"):
        raise ValueError(f"{where}.data_path missing")
    root, shards, folders = _data_path(str(entry["data_path"]), f"{where}.data_path")
    out["root"] = root
    if shards is not None:
        out["shards"] = shards
    known_folders = {registry.domain(m).folder for m in inputs + outputs if m in _names()}
    extra = [f for f in folders if f not in known_folders | {"crop_settings", registry.photo().folder}]
    if extra:
        raise ValueError(f"{where}.data_path: folders {extra} hold none of its domains ({sorted(known_folders)})")
    _refuse_unknown(validation, {"data_path"}, f"{path}: val.datasets.{name}")
    if validation.get("data_path"):
        out["val_root"] = _data_path(str(validation["data_path"]), f"{path}: val.datasets.{name}.data_path")[0]
    return out


def _names() -> set[str]:
    return set(registry.loaded().domain_names())


def read_alphas_config(path: str | Path, domains: list[str]) -> list[dict]:
    """The Dirichlet components of an alphas config for a dataset's domains (the others in it are left out, as the
    reference leaves them); every domain must be there."""
    path = Path(path)
    data = _load(path, "alphas config")
    weights = data.get("sampling_weights")
    table = data.get("alphas_mixture") if weights is not None else data
    if not isinstance(table, dict):
        raise ValueError(f"alphas config {path}: sampling_weights without an alphas_mixture table")
    missing = [m for m in domains if m not in table]
    if missing:
        raise ValueError(f"alphas config {path}: no alphas for {missing}")
    count = len(table[domains[0]]["input_alphas"])
    for m in domains:
        _refuse_unknown(table[m], {"input_alphas", "target_alphas", "keep"}, f"alphas config {path}: {m}")
        lengths = {len(table[m]["input_alphas"]), len(table[m]["target_alphas"]), len(table[m].get("keep") or [0] * count)}
        if lengths != {count}:
            raise ValueError(f"alphas config {path}: {m} has alphas for {sorted(lengths)} Dirichlets, the others {count}")
    if weights is not None and len(weights) != count:
        raise ValueError(f"alphas config {path}: sampling_weights {weights} for {count} Dirichlets")
    return [{"input_alphas": {m: float(table[m]["input_alphas"][i]) for m in domains},
             "target_alphas": {m: float(table[m]["target_alphas"][i]) for m in domains},
             "keep": {m: table[m]["keep"][i] for m in domains if table[m].get("keep")},
             "weight": float(weights[i]) if weights is not None else 1.0} for i in range(count)]
