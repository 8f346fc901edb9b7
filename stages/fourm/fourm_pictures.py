"""Pictures of a 4M run: validation samples, their tokens decoded, and the model's predictions from RGB alone."""
from __future__ import annotations

from pathlib import Path

import torch

from core import registry
from core.pictures import figure_backend, save_figure
from stages.dataset.shards import DatasetLayout
from stages.fourm.fourm_data import pixels_picture
from stages.tokenizers import dataset_tokenizers as tokenizers


@torch.no_grad()
def draw_predictions(root: str | Path, model, batch: dict, out: str | Path, title: str = "") -> Path:
    """RGB, then per image-token modality the tokens' own decoding (the pseudo label as the model sees it) and
    the model's prediction from RGB alone, both decoded by the dataset's tokenizers; one row per sample."""
    plt = figure_backend()
    targets = [m for m in batch if registry.domain(m).kind == "tokens" and tokenizers.has_model(root, m)]
    if not targets:
        raise FileNotFoundError(f"no trained image tokenizer under {DatasetLayout(root).tokenizers_dir} to decode predictions")
    photo = model.cfg.pixels_input
    pixels = batch[photo]["tensor"]
    model.eval()
    predicted = model.predict_from_rgb(pixels, targets)
    columns = [(photo, None, None)] + [(m, "tokens", batch[m]["tensor"]) for m in targets] + \
        [(m, "predicted from rgb", predicted[m]) for m in targets]
    decoded = {}
    for m in targets:
        tokenizer = tokenizers.load(root, m)
        decoded[(m, "tokens")] = tokenizer.decode(batch[m]["tensor"].long())
        decoded[(m, "predicted from rgb")] = tokenizer.decode(predicted[m])
    rows = len(pixels)
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.9 * len(columns), 2.0 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c, (m, kind, _) in enumerate(columns):
            ax = axes[r][c]
            if kind is None:
                image = pixels_picture(pixels[r])
            else:
                image = tokenizers.picture(m, decoded[(m, kind)][r].float())
            ax.imshow(image, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(registry.domain(m).short_name + ("" if kind is None else f"\n{kind}"), fontsize=7)
    fig.suptitle(title or "4M: each modality's tokens decoded, and predicted from RGB alone", fontsize=9)
    return save_figure(fig, out, dpi=70)
