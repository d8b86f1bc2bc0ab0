import math

import pytest
import torch
import torch.nn.functional as F

from edgeclr.losses import nt_xent


def slow_reference(z1, z2, t):
    """The paper's eq. (1), one anchor at a time: views 2k and 2k+1 are positives."""
    z = []
    for a, b in zip(z1, z2):
        z += [F.normalize(a, dim=0), F.normalize(b, dim=0)]
    n = len(z)
    total = 0.0
    for i in range(n):
        j = i + 1 if i % 2 == 0 else i - 1
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(num / den)
    return total / n


def test_worked_example_from_the_issue():
    z1 = torch.tensor([[0.6, 0.2, -0.7, 0.3], [-0.2, 0.8, 0.4, 0.4]])  # A1, B1
    z2 = torch.tensor([[0.5, 0.3, -0.8, 0.1], [-0.3, 0.7, 0.5, 0.4]])  # A2, B2
    assert round(nt_xent(z1, z2, 0.5).item(), 4) == 0.1734
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(0.17344, abs=5e-5)


@pytest.mark.parametrize("b,t", [(2, 0.5), (5, 0.1), (16, 0.05), (3, 1.0)])
def test_matches_slow_reference(b, t):
    g = torch.Generator().manual_seed(b)
    z1, z2 = torch.randn(b, 8, generator=g), torch.randn(b, 8, generator=g)
    assert nt_xent(z1, z2, t).item() == pytest.approx(slow_reference(z1, z2, t), rel=1e-5)


def test_closed_form_orthogonal():
    # positives identical, all other pairs orthogonal: loss = log(1 + (2B - 2) exp(-1/t))
    for b, t in [(2, 0.5), (4, 0.2)]:
        z = torch.eye(b)
        expected = math.log(1 + (2 * b - 2) * math.exp(-1 / t))
        assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_closed_form_all_equal():
    # every view the same vector: the positive is one of 2B-1 equal logits -> log(2B - 1)
    z = torch.ones(6, 4)
    assert nt_xent(z, z, 0.1).item() == pytest.approx(math.log(11), rel=1e-6)


def test_stable_at_low_temperature_and_bf16():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    ref = nt_xent(z1, z2, 0.05)
    assert torch.isfinite(ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.05)
    assert lb.dtype == torch.float32 and torch.isfinite(lb)
    assert lb.item() == pytest.approx(ref.item(), rel=2e-2)


def test_gradient_flows_and_is_finite():
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    nt_xent(z1, z2, 0.05).backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_rejects_batch_of_one_and_bad_shapes():
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="must both be"):
        nt_xent(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(3, 4), torch.randn(3, 4), 0.0)
