import pytest
import torch

from edgeclr.augment import PRESETS, AugmentConfig, SimCLRAugment, _crop_boxes, get_preset, preset_for, view_generator


def batch(c=3, n=8, s=32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("c", [1, 3])
def test_presets_shapes_and_range(name, c):
    aug = SimCLRAugment(get_preset(name), 24, [0.5] * c, [0.25] * c)
    v = aug(batch(c), view_generator(0, 0, 0, 0))
    assert v.shape == (8, c, 24, 24) and v.dtype == torch.float32
    raw = v * 0.25 + 0.5
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_views_are_a_function_of_seed_epoch_step_view():
    aug = SimCLRAugment(get_preset("rgb"), 32, [0.5] * 3, [0.25] * 3)
    x = batch()
    a, b = aug(x, view_generator(1, 2, 3, 0)), aug(x, view_generator(1, 2, 3, 0))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, view_generator(1, 2, 3, 1)))
    assert not torch.equal(a, aug(x, view_generator(1, 2, 4, 0)))


def test_identity_crop_reproduces_image():
    # full-image crop, no flip, no jitter: the view equals the input
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, jitter_p=0.0, gray_p=0.0)
    x = batch(3, 4, 16)
    v = SimCLRAugment(cfg, 16, [0, 0, 0], [1, 1, 1])(x, view_generator(0, 0, 0, 0))
    assert torch.allclose(v, x.float() / 255, atol=1e-5)


def test_hflip_and_rot90_are_exact():
    x = batch(1, 1, 8)
    flip = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, jitter_p=0.0, gray_p=0.0)
    v = SimCLRAugment(flip, 8, [0], [1])(x, view_generator(0, 0, 0, 0))
    assert torch.allclose(v, x.float().flip(-1) / 255, atol=1e-5)
    rot = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, rot90=True, jitter_p=0.0, gray_p=0.0)
    v = SimCLRAugment(rot, 8, [0], [1])(x.repeat(16, 1, 1, 1), view_generator(0, 0, 0, 0))
    rots = [torch.rot90(x[0].float() / 255, k, (1, 2)) for k in range(4)]
    for img in v:
        assert any(torch.allclose(img, r, atol=1e-5) for r in rots)


def test_crop_boxes_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    box = _crop_boxes(g, 5000, 28, 28, (0.3, 1.0), (3 / 4, 4 / 3))
    area = box[:, 2] * box[:, 3] / (28 * 28)
    assert area.min() >= 0.3 - 1e-4 and area.max() <= 1 + 1e-4
    assert (box[:, 2] <= 28 + 1e-4).all() and (box[:, 3] <= 28 + 1e-4).all()
    assert (box[:, 0] - box[:, 2] / 2 >= -1e-4).all() and (box[:, 0] + box[:, 2] / 2 <= 28 + 1e-4).all()


def test_grayscale_preset_leaves_single_channel_alone_and_jitter_changes_values():
    aug = SimCLRAugment(get_preset("small-gray"), 28, [0.5], [0.5])
    x = batch(1, 64, 28)
    v = aug(x, view_generator(0, 0, 0, 0))
    per_image_mean = (v * 0.5 + 0.5).mean((1, 2, 3))
    assert per_image_mean.std() > 0  # brightness/contrast/crops differ per image


def test_preset_choice():
    assert preset_for(1, 28) == "small-gray" and preset_for(3, 32) == "small-rgb"
    assert preset_for(3, 96) == "rgb" and PRESETS["rgb"].blur_p > 0 and PRESETS["small-rgb"].blur_p == 0
    assert not PRESETS["small-gray"].hue_saturation
    assert PRESETS["histo"].rot90 and PRESETS["histo"].stain_jitter > 0
    with pytest.raises(ValueError, match="valid"):
        get_preset("nope")
