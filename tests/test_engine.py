"""The training engine shared by train, distill and compress's recovery: device, schedule, NaN handling."""

import math

import pytest
import torch

from edgeclr import engine
from edgeclr.errors import ConfigError


def test_a_cuda_device_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available on this machine; use --device cpu"):
        engine.resolve_device("cuda")
    assert engine.resolve_device("auto").type == "cpu"


def test_the_schedule_warms_up_linearly_then_follows_a_cosine_to_its_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = engine.build_scheduler(opt, total_steps=100, warmup_steps=10, min_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0 and max(lrs) == pytest.approx(1.0, abs=0.11)
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)), abs=0.02)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # no increase after the warm-up


def test_weight_decay_skips_norms_and_biases():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    decay, no_decay = engine.param_groups(m, 1e-4)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_exit_for_signal_maps_sigterm_to_143_and_sigint_to_keyboardinterrupt():
    import signal

    engine.exit_for_signal(None)
    with pytest.raises(SystemExit) as e:
        engine.exit_for_signal(signal.SIGTERM)
    assert e.value.code == 143
    with pytest.raises(KeyboardInterrupt):
        engine.exit_for_signal(signal.SIGINT)
