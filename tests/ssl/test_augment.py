"""Batched augmentations: seeded, per-image, correct geometry and colour operations."""

import pytest
import torch

from mkdt.errors import MkdtError
from mkdt.ssl import AugmentConfig, BatchAugment
from torchvision.transforms.v2 import functional as TF

from mkdt.ssl.augment import (JITTER, adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, gaussian_blur,
                              hsv_to_rgb, rgb_to_hsv, sample_crop_boxes)

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
NOTHING = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def images(n=16, c=3, side=12, seed=0):
    return torch.randint(0, 256, (n, c, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(x):
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_views_different_seed_different():
    aug = BatchAugment(AugmentConfig(), MEAN, STD)
    x = images()
    assert torch.equal(aug(x, gen(1)), aug(x, gen(1)))
    assert not torch.equal(aug(x, gen(1)), aug(x, gen(2)))


def test_parameters_differ_per_image():
    aug = BatchAugment(AugmentConfig(), MEAN, STD)
    x = images(1).repeat(32, 1, 1, 1)  # one image, 32 copies
    out = aug(x, gen(0))
    distinct = {tuple(v.flatten()[:50].tolist()) for v in out}
    assert len(distinct) > 16


def test_identity_config_only_normalises():
    x = images()
    out = BatchAugment(NOTHING, MEAN, STD)(x, gen(0))
    assert torch.allclose(out, normalised(x), atol=1e-5)


def test_flip_mirrors_every_image():
    x = images()
    cfg = AugmentConfig(**{**NOTHING.__dict__, "flip_p": 1.0})
    out = BatchAugment(cfg, MEAN, STD)(x, gen(0))
    assert torch.allclose(out, normalised(x).flip(-1), atol=1e-5)


def test_crop_boxes_obey_scale_and_bounds():
    boxes = sample_crop_boxes(2000, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), gen(3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.15 and area.max() <= 1.0  # rounding of the sides allows a little slack
    assert area.std() > 0.1  # really random


def test_grayscale_probability_one_gives_equal_channels():
    cfg = AugmentConfig(**{**NOTHING.__dict__, "grayscale_p": 1.0})
    out = BatchAugment(cfg, (0.5,) * 3, (0.25,) * 3)(images(), gen(0))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


TORCHVISION = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
               "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


@pytest.mark.parametrize("channels", [3, 1])
def test_each_jitter_operation_equals_torchvision_per_image(channels):
    x = torch.rand(12, channels, 9, 9, generator=gen(4))
    x[0] = 0.5  # grey
    x[1, :, :3] = 1.0  # saturated corners: clamping and hue ties
    factors = {"brightness": torch.linspace(0.6, 1.4, 12), "contrast": torch.linspace(0.0, 1.4, 12),
               "saturation": torch.linspace(0.0, 2.0, 12), "hue": torch.linspace(-0.5, 0.5, 12)}
    ours = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
            "hue": adjust_hue}
    for key, op in ours.items():
        batched = op(x, factors[key])
        for i in range(len(x)):
            expected = TORCHVISION[key](x[i], float(factors[key][i]))
            assert torch.allclose(batched[i], expected, atol=2e-6), (key, i)


def test_hsv_round_trip_is_exact_enough_and_grey_has_no_hue():
    x = torch.rand(8, 3, 6, 6, generator=gen(5))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6)
    grey = rgb_to_hsv(torch.full((1, 3, 2, 2), 0.4))
    assert torch.equal(grey[:, 0], torch.zeros(1, 2, 2)) and torch.equal(grey[:, 1], torch.zeros(1, 2, 2))


def test_the_batched_jitter_equals_torchvision_in_each_images_order():
    cfg = AugmentConfig(**{**NOTHING.__dict__, "jitter_p": 0.8})
    aug = BatchAugment(cfg, MEAN, STD)
    x = images(n=40).float() / 255
    params = aug.sample(len(x), 12, 12, gen(6))
    assert {tuple(p) for p in params["order"].tolist()} != {(0, 1, 2, 3)}  # orders really vary
    out = aug.apply(x, params)
    for i in range(len(x)):
        expected = x[i]
        if params["jitter"][i]:
            for k in params["order"][i].tolist():
                key = JITTER[k][0]
                expected = TORCHVISION[key](expected, float(params[key][i]))
        assert torch.allclose(out[i], expected, atol=3e-6), i
    assert 0 < int(params["jitter"].sum()) < len(x)  # both kinds of image were compared


def test_jitter_is_differentiable_for_mtt_ssl_views():
    x = torch.rand(6, 3, 8, 8, generator=gen(7)).requires_grad_()
    aug = BatchAugment(AugmentConfig(jitter_p=1.0), MEAN, STD)
    aug.apply(x, aug.sample(6, 8, 8, gen(8))).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_jitter_changes_colours_and_blur_keeps_flat_images():
    cfg = AugmentConfig(**{**NOTHING.__dict__, "jitter_p": 1.0})
    x = images()
    assert not torch.allclose(BatchAugment(cfg, MEAN, STD)(x, gen(0)), normalised(x), atol=1e-3)
    flat = torch.full((3, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 1.0, 2.0])), flat, atol=1e-6)


def test_single_channel_and_options():
    x = images(c=1)
    cfg = AugmentConfig(blur_p=0.5, solarize_p=0.5)
    out = BatchAugment(cfg, (0.5,), (0.25,))(x, gen(0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_config_is_an_error():
    with pytest.raises(MkdtError, match="crop_scale"):
        BatchAugment(AugmentConfig(crop_scale=(0.5, 0.2)), MEAN, STD)
    with pytest.raises(MkdtError, match="jitter_p"):
        BatchAugment(AugmentConfig(jitter_p=1.5), MEAN, STD)
