"""The convolution shapes compress produces, through a training step under edgeclr's layout rule
(edgeclr.engine.set_layout), each in a child process: a native crash is a failed case, not a dead test
runner. Widths 3-64 (pruning leaves multiples of 8, stems and narrow models less), 1x1 strided and not,
3x3 at the narrow widths, batch sizes 1-256 with odd and prime ones (59 tiles), 1 and 2 threads. About
46 s on 2 cores (Intel Xeon): `pytest -m slow tests/test_kernel_sweep.py`."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep", Path(__file__).parents[1] / "scripts" / "conv_backward_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_shape_trains_under_the_layout_rule_with_the_exact_weight_gradient():
    sweep = _sweep()
    res = sweep.sweep(sweep.cases())
    assert len(res) > 800
    bad = [r for r in res if r["result"] != "ok"]
    assert bad == []


def test_the_sweep_sees_a_crash_as_a_result():
    """The harness itself: a case whose process dies is reported as a crash, and the cases after it still run."""
    sweep = _sweep()
    ok = dict(layout="nchw", threads=1, batch=2, cin=8, cout=8, k=1, stride=1, hw=4)
    res = sweep.sweep([ok, dict(ok, k=0), ok])  # kernel size 0: torch raises in the child, which exits 1
    assert [r["result"] for r in res] == ["ok", "crash exit 1", "ok"]
