"""The transfer loader's augmentations: timm's classification transform on faster kernels (the same draws, pixels
within a stated PSNR of timm's own), the dense tasks' image and label moving together, uint8 samples normalised on
the model's device."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from stages.transfer import augment
from stages.transfer.transfer_data import MEAN, STD, TransferDataset, make_transform, model_input
from tests.helpers import photo_tensor


def psnr(a, b) -> float:
    error = ((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean()
    return float("inf") if error == 0 else 10 * np.log10(255 ** 2 / error)


@pytest.fixture(scope="module")
def photos():
    """The test photos at 500x375, ImageNet's typical size."""
    pixels = ((photo_tensor(400) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p).resize((500, 375), Image.Resampling.BICUBIC) for p in pixels]


def seed(n: int) -> None:
    augment.draws.seed(n), np.random.seed(n), torch.default_generator.manual_seed(n)


def draw_states():
    return augment.draws.getstate(), np.random.get_state()[1].tolist(), torch.default_generator.get_state().tolist()


def posterize_as_older_pillows(image, bits, **_):
    from PIL import ImageOps

    return image.point(lambda _: 0) if bits <= 0 else image if bits >= 8 else ImageOps.posterize(image, bits)


SPEC = SimpleNamespace(randaugment="rand-m9-mstd0.5-inc1", crop_scale=(0.08, 1.0))


def test_classification_draws_as_timm_and_its_pixels_stay_within_a_stated_psnr(photos):
    from timm.data import create_transform

    ours = make_transform("classification", True, 224, SPEC)
    stock = create_transform(224, is_training=True, auto_augment=SPEC.randaugment, scale=SPEC.crop_scale,
                             mean=MEAN, interpolation="bicubic", re_prob=0.0, use_prefetcher=True)
    for op in stock.transforms[2].ops:  # timm's posterize at 0 bits raises on Pillow 13 (a test below)
        op.aug_fn = posterize_as_older_pillows if op.aug_fn.__name__ == "posterize" else op.aug_fn
    scores = []
    for n in range(60):
        seed(n)
        expected, after_stock = stock(photos[n % len(photos)]), draw_states()
        seed(n)
        got, after_ours = ours(photos[n % len(photos)]), draw_states()
        assert after_ours == after_stock, f"seed {n}: other random draws than timm's"
        assert got.dtype == torch.uint8 and got.shape == expected.shape == (3, 224, 224)
        scores.append(psnr(got.permute(1, 2, 0), expected.permute(1, 2, 0)))
    # the resize is Pillow's filter (within a grey level); the warps' cubic is OpenCV's (a = -0.75, Pillow -0.5),
    # and a solarize or equalize after a warp can move a pixel across its threshold (the lowest: 28.6 dB)
    assert min(scores) > 25 and np.percentile(scores, 10) > 38 and np.median(scores) > 60, sorted(scores)[:6]


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_each_geometric_operation_warps_as_pillows(photos, name):
    from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP

    image, fill = photos[0].resize((224, 224)), (124, 116, 104)
    fast = augment.array_operation(NAME_TO_OP[name])
    for level in (3.0, 9.0):
        args = LEVEL_TO_ARG[name](level, {"translate_pct": 0.45})
        expected = NAME_TO_OP[name](image, *args, fillcolor=fill, resample=Image.Resampling.BICUBIC)
        got = fast(np.asarray(image), *args, fillcolor=fill, resample=Image.Resampling.BICUBIC)
        assert psnr(got, expected) > 35, (name, level, psnr(got, expected))
    bilinear = dict(fillcolor=fill, resample=Image.Resampling.BILINEAR)  # the filter timm asks for is the one used
    args = LEVEL_TO_ARG[name](9.0, {"translate_pct": 0.45})
    assert psnr(fast(np.asarray(image), *args, **bilinear), NAME_TO_OP[name](image, *args, **bilinear)) > 40


def test_a_random_filter_choice_draws_as_timms_does(photos):
    from timm.data.auto_augment import NAME_TO_OP

    image, choices = np.asarray(photos[0].resize((64, 64))), (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
    for name, args in (("ShearX", (0.2,)), ("Rotate", (20.0,)), ("Color", (1.4,))):
        augment.draws.seed(3)
        NAME_TO_OP[name](Image.fromarray(image), *args, resample=choices)
        expected = augment.draws.getstate()
        augment.draws.seed(3)
        augment.array_operation(NAME_TO_OP[name])(image, *args, resample=choices)
        assert augment.draws.getstate() == expected, name


def pillow_test_images(photos) -> list:
    """Photos, noise, and the edge cases of Pillow's tables: one grey level, two levels, a narrow range."""
    rng = np.random.default_rng(0)
    two = np.where(rng.random((40, 56, 1)) < 0.3, 17, 200).astype(np.uint8).repeat(3, axis=2)
    narrow = rng.integers(100, 104, (40, 56, 3), dtype=np.uint8)
    return [np.asarray(photos[0].resize((224, 224))), np.asarray(photos[3].resize((97, 61))),
            rng.integers(0, 256, (33, 47, 3), dtype=np.uint8), np.full((20, 30, 3), 77, np.uint8), two, narrow]


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing",
                                  "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness"])
def test_each_colour_operation_gives_pillows_pixels(photos, name):
    from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP

    fast = augment.array_operation(NAME_TO_OP[name])
    for pixels in pillow_test_images(photos):
        for level in (0.0, 1.0, 4.5, 9.0, 10.0):
            args = LEVEL_TO_ARG[name](level, {}) if LEVEL_TO_ARG[name] else ()
            for args in {args, tuple(-a if isinstance(a, float) else a for a in args)}:  # both signs of a factor
                if name.startswith("Posterize") and args[0] <= 0:
                    continue  # Pillow 13 refuses 0 bits (the next test)
                expected = np.asarray(NAME_TO_OP[name](Image.fromarray(pixels), *args))
                got = fast(pixels, *args)
                assert got.dtype == np.uint8 and np.array_equal(got, expected), (name, level, args, pixels.shape)


def test_posterize_to_zero_bits_is_black_where_pillow_13_raises():
    from PIL import ImageOps
    from timm.data.auto_augment import NAME_TO_OP

    image = Image.new("RGB", (8, 8), (200, 100, 50))
    with pytest.raises(ValueError):
        ImageOps.posterize(image, 0)  # what timm's PosterizeIncreasing at magnitude 10 asks of Pillow
    assert augment.array_operation(NAME_TO_OP["Posterize"])(np.asarray(image), 0).max() == 0
    transform = make_transform("classification", True, 32, SimpleNamespace(randaugment="rand-m10-n15-inc1",
                                                                           crop_scale=(0.5, 1.0)))
    for n in range(5):  # all 15 operations each time, posterize among them at 0 bits
        seed(n)
        assert transform(image).shape == (3, 32, 32)


@pytest.mark.parametrize("policy", ["augmix-m5-w2-d1", "original", "3a"])
def test_other_timm_policies_run_their_pil_steps_between_array_steps(photos, policy):
    transform = make_transform("classification", True, 48, SimpleNamespace(randaugment=policy, crop_scale=(0.5, 1)))
    seed(0)
    pixels = transform(np.asarray(photos[0]))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 48, 48)


def test_an_unreadable_image_is_named(tmp_path):
    from stages.transfer.transfer_data import TransferInputError

    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    for train in (True, False):  # OpenCV's decode for training, Pillow's for evaluation
        data = TransferDataset("classification", [(tmp_path / "a.jpg", 0)], train, 32, SPEC, 0)
        with pytest.raises(TransferInputError, match="a.jpg: not a readable image"):
            data[0]


def test_the_training_decode_gives_pillows_pixels(photos, tmp_path):
    from stages.transfer.transfer_data import _rgb, _rgb_pixels

    grey = photos[0].convert("L")
    for name, image in (("rgb.jpg", photos[0]), ("grey.jpg", grey), ("rgba.png", photos[1].convert("RGBA")),
                        ("palette.png", photos[2].convert("P"))):
        image.save(tmp_path / name)
        assert np.array_equal(_rgb_pixels(tmp_path / name), np.asarray(_rgb(tmp_path / name))), name
    photos[0].convert("CMYK").save(tmp_path / "cmyk.jpg")
    difference = np.abs(_rgb_pixels(tmp_path / "cmyk.jpg").astype(int) - np.asarray(_rgb(tmp_path / "cmyk.jpg")))
    assert difference.max() <= 1  # OpenCV's CMYK conversion rounds where Pillow's truncates


def test_samples_are_uint8_and_the_device_normalises_them_as_torchvision_did(photos, tmp_path):
    from torchvision.transforms import v2

    image = photos[1]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    before = v2.Normalize(MEAN, STD)(v2.ToDtype(torch.float32, scale=True)(pixels))
    assert torch.allclose(model_input(pixels[None])[0], before, atol=1e-6)

    image.save(tmp_path / "a.jpg")
    Image.fromarray(np.full((375, 500), 3, np.uint8)).save(tmp_path / "a.png")
    settings = SimpleNamespace(**vars(SPEC), scale_jitter=(0.5, 1.5), classes=150, depth_scale=1000.0)
    for task, sample in (("classification", (tmp_path / "a.jpg", 0)), ("segmentation", (tmp_path / "a.jpg",
                                                                                         tmp_path / "a.png"))):
        for train in (True, False):
            pixels, _ = TransferDataset(task, [sample], train, 64, settings, 0)[0]
            assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64), (task, train)


def test_dense_colour_jitter_draws_as_torchvisions_with_pillows_pixels_and_opencvs_hue(photos):
    """torchvision's ColorJitter on the PIL photo against ours on its array: the same torch draws; the same pixels
    without the hue; with it (OpenCV's HSV rounding, not Pillow's) within a stated PSNR."""
    from torchvision.transforms import v2

    scores = []
    for n in range(24):
        image = photos[n % len(photos)]
        for hue in (None, 0.1):
            torch.manual_seed(n)
            expected, after = np.asarray(v2.ColorJitter(0.4, 0.4, 0.4, hue)(image)), torch.get_rng_state()
            torch.manual_seed(n)
            got = augment.ColorJitter(0.4, 0.4, 0.4, hue)(np.asarray(image))
            assert torch.equal(torch.get_rng_state(), after), n
            if hue is None:
                assert np.array_equal(got, expected), n
            else:
                scores.append(psnr(got, expected))
    assert min(scores) > 40 and np.median(scores) > 45, sorted(scores)[:4]


def test_dense_geometry_on_tensors_stays_within_a_grey_level_of_pillows(photos):
    """The paired geometry on the photo as a uint8 tensor (torch's resize) against the same transforms on the PIL
    photo (Pillow's): the same draws, the same labels, pixels within one grey level."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    geometry = [v2.ScaleJitter((128, 128), scale_range=(0.1, 2.0), antialias=True),
                v2.RandomCrop(128, pad_if_needed=True, fill={tv_tensors.Mask: 255, "others": 0}),
                v2.RandomHorizontalFlip()]
    ours = augment.DenseTraining(v2.Compose(geometry), augment.ColorJitter())  # no colour change
    pillows = v2.Compose([*geometry, v2.ColorJitter(), v2.PILToTensor()])
    label = tv_tensors.Mask(torch.arange(375 * 500, dtype=torch.int64).view(375, 500) % 151)
    for n in range(12):
        torch.manual_seed(n)
        expected, expected_label = pillows(photos[n % len(photos)], label)
        after = torch.get_rng_state()
        torch.manual_seed(n)
        got, got_label = ours(np.array(photos[n % len(photos)]), label)
        assert torch.equal(torch.get_rng_state(), after) and torch.equal(got_label, expected_label), n
        assert got.dtype == torch.uint8 and (got.int() - expected.int()).abs().max() <= 1, n


def test_segmentation_image_and_label_move_together(tmp_path):
    """Left half red with class 1, right half blue with class 2: after jitter, crop, flip and colour jitter every
    labelled pixel away from the edge still has its class's colour."""
    image = np.zeros((300, 400, 3), np.uint8)
    image[:, :200] = (220, 30, 30)
    image[:, 200:] = (30, 30, 220)
    label = np.ones((300, 400), np.uint8)
    label[:, 200:] = 2
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(label).save(tmp_path / "l.png")
    settings = SimpleNamespace(scale_jitter=(0.5, 2.0), classes=150)
    data = TransferDataset("segmentation", [(tmp_path / "a.png", tmp_path / "l.png")], True, 128, settings, 0)
    flipped = 0
    for n in range(12):
        pixels, target = data[(n, 0)]
        pixels = pixels.int()
        redder = pixels[0] > pixels[2]
        inner = target.clone()  # away from the red-blue edge, where interpolation mixes the two
        edge = (target[:, 1:] != target[:, :-1]).nonzero()
        for col in edge[:, 1].unique():
            inner[:, max(0, col - 3):col + 5] = -1
        assert torch.equal(redder[inner == 0], torch.ones_like(redder[inner == 0])), n  # class 1 (id 0): red
        assert not redder[inner == 1].any(), n
        flipped += bool((target[:, 0] == 1).any())  # blue on the left: the pair was flipped together
    assert 0 < flipped < 12


def test_annotations_stay_uint8_through_the_augmentations_and_reach_the_loss_as_int64(tmp_path):
    from models.metrics import IGNORE
    from stages.transfer.transfer_data import model_target, read_annotation

    raw = np.array([[0, 1, 2], [150, 7, 0]], np.uint8)
    Image.fromarray(raw).save(tmp_path / "l.png")
    ids = read_annotation(tmp_path / "l.png", (2, 3), 150)
    assert ids.dtype == np.uint8 and ids.tolist() == [[IGNORE, 0, 1], [149, 6, IGNORE]]
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((40, 50), 3, np.uint8)).save(tmp_path / "l.png")
    settings = SimpleNamespace(scale_jitter=(0.5, 2.0), classes=150)
    data = TransferDataset("segmentation", [(tmp_path / "a.png", tmp_path / "l.png")], True, 64, settings, 0)
    _, target = data[(0, 0)]
    assert target.dtype == torch.uint8 and set(target.unique().tolist()) <= {2, IGNORE}  # padding is ignored
    assert model_target(target).dtype == torch.int64 and torch.equal(model_target(target), target.long())


def test_a_samples_draws_are_its_threads_own_when_another_thread_draws_from_random(photos, tmp_path):
    """Another thread drawing from `random` between a sample's seeding and its RandAugment draws (as websockets'
    keepalive pings do in Prefect's event-loop thread) leaves the sample as it was."""
    import threading

    photos[2].save(tmp_path / "a.jpg")
    data = TransferDataset("classification", [(tmp_path / "a.jpg", 0)], True, 64, SPEC, 0)
    expected = [data[(n, 0)][0] for n in range(4)]

    def another_thread_draws(image):
        before = random.getstate()
        thread = threading.Thread(target=lambda: [random.getrandbits(32) for _ in range(4)])
        thread.start(), thread.join()
        assert random.getstate() != before  # it did draw from the process's generator
        return image

    data.transform.transforms.insert(1, another_thread_draws)  # after the crop, before RandAugment
    assert all(torch.equal(data[(n, 0)][0], expected[n]) for n in range(4))
