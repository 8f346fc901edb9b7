"""Do the tokenizers reconstruct? Each decoder, trained briefly on real photos (or maps made from them) at 64x64,
must beat what a tokenizer that learned nothing scores, by a clear margin; the diffusion decoders must decode
from pure noise about as well as from the true image noised to the sampler's first timestep (a decoder that
only learned to denoise scores far lower from noise: the bug these checks were written for)."""
import pytest
import torch

from models.vqvae import (VQVAE, baseline_metric, noise_schedule, reconstruction_metric, tokenizer_config)
from tests.helpers import fit_tokenizer, photo_tensor, quality_targets

SIZE = 64  # 4x4 tokens per image: small enough for the suite, large enough to need the tokens


def trained(modality: str, steps: int, lr: float = 0.003):
    torch.manual_seed(0)
    data = quality_targets(modality, photo_tensor(SIZE))
    model = VQVAE(tokenizer_config(modality, "tiny", image_size=SIZE, codebook_size=64,
                                   **({"in_channels": data.shape[1]} if modality == "clip" else {})))
    return fit_tokenizer(model, data, steps, lr), data


def from_noise_and_from_noised_truth(model, data):
    ids = model.tokenize(data)
    generator = torch.Generator().manual_seed(1)
    from_noise = model.detokenize(ids, generator=generator)
    a = model.decoder.alpha_bar[model.decoder.first_timestep()]
    start = a.sqrt() * data + (1 - a).sqrt() * torch.randn(data.shape, generator=generator)
    return from_noise, model.detokenize(ids, start=start)


@pytest.mark.parametrize("steps", [2, 10, 50, 100, 250, 1000])
def test_every_schedule_ends_at_zero_signal_and_sampling_starts_there(steps):
    from models.vqvae import Diffusion

    assert float(torch.prod(1 - noise_schedule(steps))) <= 1e-3
    decoder = Diffusion(tokenizer_config("rgb", "tiny", diffusion_steps=steps, sample_steps=min(steps, 5)))
    assert float(decoder.alpha_bar[-1]) <= 1e-3
    assert decoder.first_timestep() == steps - 1  # DDIM's first step is the last training timestep


def test_the_paper_schedule_is_table_3s():
    from models.vqvae import Diffusion

    betas = noise_schedule(1000)
    assert torch.allclose(betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    decoder = Diffusion(tokenizer_config("rgb", "paper", unet_channels=8, unet_mults=(1,), unet_blocks=1,
                                         unet_attention_levels=0))
    decoder.sampler.set_timesteps(25)
    assert len(decoder.sampler.timesteps) == 25 and decoder.first_timestep() == 999


def test_a_schedule_that_cannot_reach_zero_signal_is_refused():
    with pytest.raises(ValueError, match="diffusion_steps=1"):
        noise_schedule(1)


def test_the_rgb_decoder_decodes_photos_from_noise():
    model, photos = trained("rgb", 1000)
    from_noise, from_truth = from_noise_and_from_noised_truth(model, photos)
    psnr = reconstruction_metric("rgb", from_noise, photos)[1]
    mean_colour = baseline_metric("rgb", photos)
    # seeded: 21.7 dB against 13.7 for the mean-colour image. With the unscaled schedule (alpha_bar 0.36 at
    # the last of 100 steps) the same run scored 10.7 dB from noise and 22.2 from the noised photos.
    assert psnr >= mean_colour + 5
    assert abs(psnr - reconstruction_metric("rgb", from_truth, photos)[1]) <= 2


def test_the_depth_decoder_decodes_maps_with_structure():
    model, depth = trained("depth", 800)
    from_noise, from_truth = from_noise_and_from_noised_truth(model, depth)
    l1, constant = reconstruction_metric("depth", from_noise, depth)[1], baseline_metric("depth", depth)
    assert constant > 0.1  # the maps are not constant
    assert l1 <= constant / 2  # seeded: 0.016 against 0.12 (unscaled schedule: 0.16 from noise)
    assert abs(l1 - reconstruction_metric("depth", from_truth, depth)[1]) <= 0.02


def test_the_normal_decoder_decodes_maps_with_structure():
    model, normals = trained("normal", 1000)
    from_noise, from_truth = from_noise_and_from_noised_truth(model, normals)
    angle, constant = reconstruction_metric("normal", from_noise, normals)[1], baseline_metric("normal", normals)
    assert constant > 20  # degrees from each map's mean normal
    assert angle <= constant / 2  # seeded: 5.6 against 27 (800 steps: 10); unscaled schedule: 30
    assert abs(angle - reconstruction_metric("normal", from_truth, normals)[1]) <= 3


def test_the_segmentation_decoder_recovers_the_classes():
    model, labels = trained("semseg", 1000)
    miou = reconstruction_metric("semseg", model.detokenize(model.tokenize(labels)), labels)[1]
    majority = baseline_metric("semseg", labels, model.cfg.in_channels)
    assert miou >= 0.75 and miou >= majority + 0.4  # seeded: 0.80 against 0.31 (1200 steps: 0.87)


def test_the_clip_decoder_recovers_the_feature_maps():
    model, features = trained("clip", 1500)
    cosine = reconstruction_metric("clip", model.detokenize(model.tokenize(features)), features)[1]
    mean_feature = baseline_metric("clip", features)
    assert cosine >= 0.9 and cosine >= mean_feature + 0.2  # seeded: 0.96 against 0.66


def test_baselines_score_what_a_constant_prediction_scores():
    photos = photo_tensor(32)
    assert baseline_metric("rgb", torch.full_like(photos, 0.25)) > 90  # a constant image: its mean is exact
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :8] = 1  # a quarter of class 1: the majority (0) scores IoU 3/4 for class 0 and 0 for class 1
    assert baseline_metric("semseg", labels, 4) == pytest.approx(0.375)
    normals = quality_targets("normal", photos)
    assert baseline_metric("normal", normals) > 0  # a map with relief is not its mean
