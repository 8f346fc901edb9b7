"""Do the tokenizers reconstruct? Each tokenizer (the published architecture at the tiny size), trained briefly on
real photos (or maps made from them) at 64x64, must beat what a tokenizer that learned nothing scores, by a clear
margin, in its own space (depth standardised, class ids shifted by one); the diffusion decoders decode from pure
noise (zero terminal SNR: their first DDIM step sees no signal at all), so they must have learned to decode their
tokens, not merely to denoise."""
import pytest
import torch

from core import registry
from models.vqvae import (
    VQVAE,
    baseline_metric,
    dead_code_threshold,
    diffusion_scheduler,
    reconstruction_metric,
    tokenizer_config,
)
from stages.tokenizers.dataset_tokenizers import decode_tokens
from tests.helpers import fit_tokenizer, photo_tensor, quality_targets

SIZE = 64  # 4x4 tokens per image: small enough for the suite, large enough to need the tokens


def trained(modality: str, steps: int, lr: float = 0.003, batch: int = 4):
    """The tokenizer after `steps` steps of `batch`, its inputs (preprocessed), and its reconstructions decoded from
    noise."""
    torch.manual_seed(0)
    spec = registry.get(modality)
    data = spec.reference_input(quality_targets(modality, photo_tensor(SIZE)))
    model = VQVAE(tokenizer_config(modality, "tiny", image_size=SIZE, codebook_size=64,
                                   threshold_ema_dead_code=dead_code_threshold(4, (SIZE // 16) ** 2, 64),
                                   **({"n_channels": data.shape[1]} if modality == "clip" else {})))
    fit_tokenizer(model, data, steps, lr, batch=batch, loss=spec.tokenizer["loss"], flip=not spec.flip_negates_x)
    ids = model.tokenize(data).flatten(1)
    return model, data, decode_tokens(model, ids, list(range(len(ids))))


@pytest.mark.parametrize("steps", [2, 10, 50, 100, 250, 1000])
def test_every_schedule_ends_at_zero_signal_and_sampling_starts_there(steps):
    cfg = tokenizer_config("rgb", "tiny", num_train_timesteps=steps)
    assert float(diffusion_scheduler(cfg, "ddpm").alphas_cumprod[-1]) < 1e-6
    sampler = diffusion_scheduler(cfg, "ddim")
    sampler.set_timesteps(min(steps, 5))
    assert int(sampler.timesteps[0]) == steps - 1  # DDIM's first step is the last training timestep


def test_the_paper_schedule_is_table_3s_rescaled_to_zero_terminal_snr():
    sampler = diffusion_scheduler(tokenizer_config("rgb", "paper"), "ddim")
    assert sampler.config.beta_start == 1e-4 and sampler.config.beta_end == 0.02
    assert sampler.config.beta_schedule == "linear" and sampler.config.rescale_betas_zero_snr
    sampler.set_timesteps(25)
    assert len(sampler.timesteps) == 25 and int(sampler.timesteps[0]) == 999


def test_the_rgb_decoder_decodes_photos():
    _, photos, decoded = trained("rgb", 400)
    psnr, mean_colour = reconstruction_metric("rgb", decoded, photos)[1], baseline_metric("rgb", photos)
    assert psnr >= mean_colour + 4  # seeded: 19.6 dB against 13.7 (250 steps: 17.6, 1000: 24.3)


def test_the_depth_decoder_decodes_maps_with_structure():
    # batches of 8: a step costs 1.2x one of 4 on 2 cores, and 450 of them end where 750 of 4 did
    _, depth, decoded = trained("depth", 450, batch=8)
    l1, constant = reconstruction_metric("depth", decoded, depth)[1], baseline_metric("depth", depth)
    assert constant > 0.3  # standardised maps, far from constant
    assert l1 <= constant / 2  # seeded: 0.263 against 0.58 (batches of 4: 500 steps 0.29, 750 0.258, 1000 0.24)


def test_the_normal_decoder_decodes_maps_with_structure():
    _, normals, decoded = trained("normal", 300)
    angle, constant = reconstruction_metric("normal", decoded, normals)[1], baseline_metric("normal", normals)
    assert constant > 20  # degrees from each map's mean normal
    assert angle <= constant / 2  # seeded: 9.6 against 27 (1000 steps: 1.7)


def test_the_segmentation_decoder_recovers_the_classes():
    model, labels, decoded = trained("semseg", 1000)
    miou = reconstruction_metric("semseg", decoded, labels)[1]
    majority = baseline_metric("semseg", labels, model.cfg.n_labels)
    assert miou >= 0.75 and miou >= majority + 0.4  # seeded: 0.77 against 0.31 (1200 steps: 0.80)


def test_the_clip_decoder_recovers_the_feature_maps():
    _, features, decoded = trained("clip", 1000)
    cosine = reconstruction_metric("clip", decoded, features)[1]
    mean_feature = baseline_metric("clip", features)
    assert cosine >= 0.9 and cosine >= mean_feature + 0.2  # seeded: 0.944 against 0.66 (800 steps: 0.929, 1500: 0.96)


def test_baselines_score_what_a_constant_prediction_scores():
    photos = photo_tensor(32)
    assert baseline_metric("rgb", torch.full_like(photos, 0.25)) > 90  # a constant image: its mean is exact
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :8] = 1  # a quarter of class 1: the majority (0) scores IoU 3/4 for class 0 and 0 for class 1
    assert baseline_metric("semseg", labels, 4) == pytest.approx(0.375)
    normals = quality_targets("normal", photos)
    assert baseline_metric("normal", normals) > 0  # a map with relief is not its mean
