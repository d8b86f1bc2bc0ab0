import pytest
import torch

from edgeclr.models import ModelSpec, count_params, create_model, list_models


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_chans", [1, 3])
def test_every_registered_model_shapes(name, in_chans):
    stride = 1
    m = create_model(ModelSpec(name, in_chans=in_chans, stem_stride=stride, head_out=32,
                               width=16 if name.startswith("resnet") else None)).eval()
    x = torch.randn(2, in_chans, 32, 32)
    f, e, p = m.features(x), m.embed(x), m.project(x)
    assert f.shape == (2, m.feature_dim) and e.shape == (2, m.embed_dim) and p.shape == (2, 32)
    assert torch.equal(m(x), e)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="resnet18.*mobilenet|mobilenet.*resnet18"):
        create_model("resnet19")


def test_bad_stem_and_width():
    with pytest.raises(ValueError, match="stem_stride"):
        create_model("resnet18", stem_stride=3)
    with pytest.raises(ValueError, match="stem_stride"):
        create_model("mobilenet_v2", stem_stride=4)
    with pytest.raises(ValueError, match="width"):
        create_model("resnet18", width=12)


def test_width_scales_resnet_and_spec_roundtrip():
    full, half = create_model("resnet18"), create_model("resnet18", width=32)
    assert full.feature_dim == 512 and half.feature_dim == 256
    assert 3.5 < count_params(full.backbone) / count_params(half.backbone) < 4.5
    assert create_model("resnet50", width=16).feature_dim == 16 * 8 * 4
    spec = ModelSpec("resnet18", in_chans=1, stem_stride=2, width=32, embed_dim=64)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    m = create_model(spec)
    assert m.embed(torch.randn(2, 1, 28, 28)).shape == (2, 64)


def test_same_seed_same_weights():
    torch.manual_seed(0)
    a = create_model("resnet18", width=16)
    torch.manual_seed(0)
    b = create_model("resnet18", width=16)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_last_stride_one_keeps_layer3_resolution_and_the_weights(name):
    a = create_model(name, in_chans=1, stem_stride=2, width=16)
    b = create_model(name, in_chans=1, stem_stride=2, width=16, last_stride=1)
    sizes = {}
    for key, m in (("a", a), ("b", b)):
        m.backbone.layer3.register_forward_hook(lambda mod, i, o, k=key: sizes.__setitem__(k + "3", o.shape[-1]))
        m.backbone.layer4.register_forward_hook(lambda mod, i, o, k=key: sizes.__setitem__(k + "4", o.shape[-1]))
        m(torch.randn(1, 1, 28, 28))
    assert sizes["a3"] == sizes["b3"] == sizes["b4"] == 4 and sizes["a4"] == 2
    assert count_params(a) == count_params(b)  # same layers, only the stride differs
    with pytest.raises(ValueError, match="last_stride"):
        create_model(name, last_stride=3)


def test_minimal_mobilenet_v3_has_no_squeeze_excitation_or_hard_activations():
    from torchvision.ops.misc import SqueezeExcitation

    m = create_model("mobilenet_v3_small_minimal", in_chans=1, stem_stride=1)
    kinds = {type(x) for x in m.modules()}
    assert SqueezeExcitation not in kinds and torch.nn.Hardswish not in kinds and torch.nn.Hardsigmoid not in kinds
    assert count_params(m) < count_params(create_model("mobilenet_v3_small", in_chans=1, stem_stride=1))
