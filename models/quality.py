"""The quality filters' networks: CLIP image-text scores (open_clip), the LAION aesthetic predictor and the LAION-5B
watermark classifier, each loaded from a local folder, and the conversions of the published weights into one.

- CLIP: open_clip's own model names and pretrained tags (`ViT-B-32` / `openai`, downloaded by open_clip), or a
  folder in open_clip's layout (`open_clip_config.json` + `open_clip_model.safetensors`, read as `local-dir:`).
- Aesthetic: the improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor): an MLP on
  L2-normalised CLIP ViT-L/14 image embeddings, published as a `.pth` state dict (`layers.{0,2,4,6,7}`).
- Watermark: LAION-5B-WatermarkDetection's timm EfficientNet-B3a (timm's `efficientnet_b3` now, the same layout) with
  a three-layer head, published as a `.pt` state dict; its watermark probability is the softmax's first class over
  a 256x256 ImageNet-normalised image.

The converted folders hold `config.json` (what the network is and which CLIP it reads) and `model.safetensors`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

AESTHETIC, WATERMARK = "laion-aesthetic-mlp", "laion-watermark"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
WATERMARK_SIDE = 256
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class QualityWeightsError(ValueError):
    """A quality model's folder or published file is missing, unreadable or of another layout."""


# -- CLIP ---------------------------------------------------------------------------------------------------------
def clip_name(model: str) -> str:
    """open_clip's name for a setting: a folder becomes `local-dir:<folder>`; a built-in name stays as it is."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "open_clip_config.json").is_file():
            raise QualityWeightsError(f"CLIP model folder {model!r} holds no open_clip_config.json (open_clip's layout)")
        return f"local-dir:{folder.resolve()}"
    if model.startswith(("/", "./", "~")) or model.endswith(("/", ".json")):
        raise QualityWeightsError(f"CLIP model {model!r}: no such folder")
    return model


def load_clip(model: str, pretrained: str | None, device: str):
    """(model, image preprocessing, tokenizer) of open_clip, in eval mode on `device`."""
    import open_clip

    name = clip_name(model)
    if not name.startswith("local-dir:") and name not in open_clip.list_models():
        raise QualityWeightsError(f"CLIP model {model!r}: neither a folder nor one of open_clip's model names")
    clip, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=None if name.startswith("local-dir:") else pretrained, device=device)
    return clip.eval(), preprocess, open_clip.get_tokenizer(name)


def save_clip(clip, model_cfg: dict, folder: str | Path) -> Path:
    """An open_clip model in the layout `local-dir:` reads (as open_clip's hub copies are laid out)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}, indent=1))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


# -- the aesthetic predictor --------------------------------------------------------------------------------------
class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's layout: linear layers with dropout between, no activation (as published),
    on an L2-normalised CLIP image embedding; about 1 (poor) to 10 (beautiful)."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


# -- the watermark classifier -------------------------------------------------------------------------------------
class WatermarkClassifier(nn.Module):
    """LAION-5B's watermark detector: a timm EfficientNet whose classifier is replaced by three linear layers to
    two classes (watermark, clear)."""

    def __init__(self, backbone: str = "efficientnet_b3"):
        import timm

        super().__init__()
        self.model = timm.create_model(backbone, pretrained=False, num_classes=2)
        self.model.classifier = nn.Sequential(
            nn.Linear(self.model.num_features, 625), nn.ReLU(), nn.Dropout(0.3), nn.Linear(625, 256), nn.ReLU(),
            nn.Linear(256, 2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Watermark probabilities of (N, 3, 256, 256) ImageNet-normalised images."""
        return self.model(images).softmax(dim=-1)[:, 0]


# -- folders ------------------------------------------------------------------------------------------------------
def save_quality_model(model: nn.Module, folder: str | Path, config: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    return folder


def _build(config: dict) -> nn.Module:
    if config.get("kind") == AESTHETIC:
        return AestheticMLP(int(config["input_dim"]))
    if config.get("kind") == WATERMARK:
        return WatermarkClassifier(config["backbone"])
    raise QualityWeightsError(f"config kind {config.get('kind')!r}: expected {AESTHETIC!r} or {WATERMARK!r}")


def read_quality_config(folder: str | Path, kind: str, setting: str) -> dict:
    """A converted folder's config, checked to be of `kind`; the error names the setting that pointed at it."""
    path = Path(folder).expanduser() / CONFIG
    if not path.is_file():
        raise QualityWeightsError(f"{setting} = {str(folder)!r}: no {CONFIG} there (convert the published weights with "
                                  f"`python -m pipeline convert-{kind.removeprefix('laion-').split('-')[0]}`, or set "
                                  f"{setting}=null to score without it)")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise QualityWeightsError(f"{setting}: {path} is not JSON ({err})") from None
    if config.get("kind") != kind:
        raise QualityWeightsError(f"{setting}: {path} is a {config.get('kind')!r} model, not {kind!r}")
    return config


def load_quality_model(folder: str | Path, kind: str, setting: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A converted aesthetic or watermark model (eval mode) and its config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_quality_config(folder, kind, setting)
    model = _build(config)
    try:
        state = load_file(Path(folder).expanduser() / WEIGHTS)
    except (OSError, SafetensorError) as err:
        raise QualityWeightsError(f"{setting}: {Path(folder) / WEIGHTS} cannot be read ({err})") from None
    _load_strict(model, state, f"{setting}: {Path(folder) / WEIGHTS}")
    return model.eval().to(device), config


def _load_strict(model: nn.Module, state: dict, where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 ", ".join(f"{k} {tuple(state[k].shape)} where {tuple(expected[k].shape)} is expected"
                           for k in wrong[:3])]
        raise QualityWeightsError(f"{where}: not the layout of {type(model).__name__}: "
                                  + "; ".join(p for p in parts if p))
    model.load_state_dict(state)


# -- the published files ------------------------------------------------------------------------------------------
def _read_published(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise QualityWeightsError(f"{str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which and why
        raise QualityWeightsError(f"{path}: not a readable PyTorch state dict ({type(err).__name__}: {err})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QualityWeightsError(f"{path}: not a state dict of tensors")
    return state


def convert_aesthetic(path: str | Path, folder: str | Path, clip_model: str = "ViT-L-14",
                      clip_pretrained: str | None = "openai") -> Path:
    """The published aesthetic predictor (`sac+logos+ava1-l14-linearMSE.pth`) as a folder; its CLIP is named with it
    (the embeddings it was trained on: ViT-L/14, OpenAI's weights)."""
    state = _read_published(path)
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 2:
        raise QualityWeightsError(f"{path}: no layers.0.weight matrix (not the aesthetic predictor's layout)")
    model = AestheticMLP(first.shape[1])
    _load_strict(model, state, str(path))
    return save_quality_model(model, folder, {"kind": AESTHETIC, "input_dim": first.shape[1], "source": str(path),
                                              "clip_model": clip_model, "clip_pretrained": clip_pretrained})


def convert_watermark(path: str | Path, folder: str | Path, backbone: str = "efficientnet_b3") -> Path:
    """The published watermark detector (`watermark_model_v1.pt`) as a folder."""
    state = _read_published(path)
    model = WatermarkClassifier(backbone)
    _load_strict(model.model, state, str(path))
    return save_quality_model(model, folder, {"kind": WATERMARK, "backbone": backbone, "source": str(path),
                                              "side": WATERMARK_SIDE})


# -- random weights of the real classes (the demo, the tests, benchmarks without the downloads) ----------------------
RANDOM_MODELS = ("image_text", "aesthetic", "watermark")  # the folders save_random_quality_models writes
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 32,
                                             "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def save_random_quality_models(folder: str | Path, size: str = "tiny", seed: int = 0) -> dict[str, str]:
    """A CLIP (open_clip's CLIP class), an aesthetic MLP reading that CLIP's embeddings and a watermark EfficientNet,
    with random weights, under folder/{image_text,aesthetic,watermark} (kept where already there). `tiny`: a 2-layer CLIP
    and timm's test EfficientNet; `paper`: ViT-B/32, the aesthetic MLP on 768-d embeddings (its CLIP, ViT-L/14, is
    not made: a random one would only be slow) and EfficientNet-B3."""
    import open_clip

    from models.weights import mark_random_weights

    if size not in ("tiny", "paper"):
        raise ValueError(f"size {size!r}: expected 'tiny' or 'paper'")
    folder = Path(folder)
    paths = {name: folder / name for name in RANDOM_MODELS}
    torch.manual_seed(seed)
    model_cfg = TINY_CLIP if size == "tiny" else open_clip.get_model_config("ViT-B-32")
    if not (paths["image_text"] / "open_clip_config.json").is_file():
        save_clip(open_clip.CLIP(**model_cfg), model_cfg, paths["image_text"])
        mark_random_weights(paths["image_text"], model="open_clip CLIP", size=size, seed=seed)
    if not (paths["aesthetic"] / CONFIG).is_file():
        dim = model_cfg["embed_dim"] if size == "tiny" else 768
        save_quality_model(AestheticMLP(dim), paths["aesthetic"], {
            "kind": AESTHETIC, "input_dim": dim, "source": "random",
            "clip_model": str(paths["image_text"].resolve()) if size == "tiny" else "ViT-L-14",
            "clip_pretrained": None if size == "tiny" else "openai"})
        mark_random_weights(paths["aesthetic"], model="aesthetic", size=size, seed=seed)
    if not (paths["watermark"] / CONFIG).is_file():
        backbone = "test_efficientnet" if size == "tiny" else "efficientnet_b3"
        save_quality_model(WatermarkClassifier(backbone), paths["watermark"],
                           {"kind": WATERMARK, "backbone": backbone, "source": "random", "side": WATERMARK_SIDE})
        mark_random_weights(paths["watermark"], model="watermark", size=size, seed=seed)
    return {name: str(path) for name, path in paths.items()}
