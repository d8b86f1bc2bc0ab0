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


def test_the_layout_rule_runs_the_onednn_6035_convolutions_in_nchw_whatever_the_input_layout():
    from types import SimpleNamespace

    from edgeclr.models import ModelSpec, create_model

    narrow = create_model(ModelSpec("resnet18", in_chans=1, stem_stride=1, width=8))
    wide = create_model(ModelSpec("resnet18", in_chans=1, stem_stride=1, width=16))
    assert engine.rtus_convs(wide) == []
    hit = engine.rtus_convs(narrow)  # layer2's downsample: 1x1, stride 2, 8 input channels
    assert [(m.in_channels, m.stride) for m in hit] == [(8, (2, 2))]
    cfg = SimpleNamespace(channels_last=True)
    assert engine.set_layout(cfg, wide, torch.device("cpu")) is not None and cfg.channels_last  # wide: channels_last
    assert wide.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    m = engine.set_layout(cfg, narrow, torch.device("cpu"))
    assert not cfg.channels_last  # narrow 1x1 convolutions: the whole model in NCHW (faster there)
    cfg = SimpleNamespace(channels_last=True)
    assert engine.set_layout(cfg, create_model(ModelSpec("resnet18", in_chans=1, stem_stride=1, width=8)),
                             torch.device("cuda")) is not None and cfg.channels_last  # the GPU keeps it (no .to: no GPU here)
    w = hit[0].weight
    assert w.stride() == (8, 1, 1, 1)  # NCHW strides, though a 1x1 weight reads as contiguous in both layouts
    seen = []
    hit[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].stride()))
    x = torch.randn(3, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    m(x).sum().backward()  # the views arrive channels_last: the guarded convolution still gets NCHW
    assert seen and seen[0] == (8 * 32 * 32, 32 * 32, 32, 1)
    assert engine.set_layout(SimpleNamespace(channels_last=True), m, torch.device("cpu")) is m  # idempotent
    assert len(hit[0]._forward_pre_hooks) == 1


def test_the_guarded_convolution_survives_the_shape_that_crashed_compress():
    """oneDNN #6035 in the shape `edgeclr compress` met on 59 stained-tissue tiles (8 input channels,
    stride 2, batch 59, 2 threads): raw channels_last died with SIGSEGV on an AVX-512 Xeon; through
    set_layout it must finish with the exact weight gradient. In a child process: a crash is a failure."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sweep", Path(__file__).parents[1] / "scripts" / "conv_backward_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    todo = [dict(layout="guarded", threads=2, batch=b, cin=8, cout=24, k=1, stride=2, hw=16) for b in (7, 59)]
    assert [r["result"] for r in sweep.sweep(todo)] == ["ok", "ok"]


def test_distilling_a_width_8_resnet_on_two_threads_does_not_crash(tmp_path):
    """oneDNN's AVX-512 channels_last weight gradient of an 8-channel 1x1 convolution aborted this
    exact command with "double free or corruption" (exit 134) on an Intel Xeon."""
    import subprocess
    import sys

    out = tmp_path / "run"
    common = ["--data", "digits", "--stem-stride", "1", "--input-size", "16", "--batch-size", "128", "--epochs", "1",
              "--threads", "2", "--knn-every", "0", "--no-tensorboard", "--out", str(out)]
    for cmd in (["train", "--width", "8", *common], ["distill", "--teacher", str(out), "--model", "resnet18", "--width", "8",
                                                     "--bn-recalibrate", "0", *common[2:]]):
        r = subprocess.run([sys.executable, "-m", "edgeclr", *cmd], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-1500:]
    assert "run in NCHW (oneDNN issue 6035" in r.stderr


def test_the_manifest_and_checkpoint_say_which_precision_ran(tmp_path):
    import json

    from helpers import TINY, run

    from edgeclr import checkpoint

    run(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "r")])
    man = json.loads((tmp_path / "r" / "train" / "manifest.json").read_text())
    ck = checkpoint.load(tmp_path / "r" / "train" / "checkpoints" / "last.pt")
    assert man["precision_ran"] in ("fp32", "bf16") and man["why"]
    assert ck["precision"]["precision_ran"] == man["precision_ran"]


def _tiny_train(out, **kw):
    from edgeclr import config

    kw = {"epochs": 1, **kw}
    return config.TrainConfig(data="digits", width=8, stem_stride=1, input_size=8, batch_size=64, knn_every=0,
                              tensorboard=False, threads=1, out=str(out), **kw)


def test_the_precision_probe_times_the_frozen_forward_of_every_step(monkeypatch):
    """Distillation's step also runs the teacher: the probe's schedule estimate (and bf16's gain)
    counts that forward, so a schedule the student alone would finish in a blink is still probed."""
    import time

    monkeypatch.setattr(engine, "cpu_bf16_units", lambda: "avx512_bf16")
    monkeypatch.setattr(engine, "PROBE_MIN_SECONDS", 1.0)
    model = engine.models.create_model("resnet18", in_chans=1, width=8, stem_stride=1)
    x = torch.randn(4, 1, 8, 8)
    calls = []

    def teacher(v):
        calls.append(torch.is_grad_enabled())
        time.sleep(0.2)
        return v.flatten(1)

    alone = engine.choose_cpu_precision(model, x, 10)
    assert alone["precision_ran"] == "fp32" and "too short" in alone["why"] and not calls
    with_teacher = engine.choose_cpu_precision(model, x, 10, frozen=teacher)
    assert "probe" in with_teacher and with_teacher["probe"]["fp32_step_s"] >= 0.2 and with_teacher["probe"]["bf16_step_s"] >= 0.2
    assert calls and not any(calls)  # every probe step ran it, without gradients


def test_amp_auto_on_a_cpu_probes_bf16_and_a_resumed_run_keeps_what_it_chose(tmp_path, monkeypatch):
    """--amp auto on a CPU: fp32 without bf16 units, or for a schedule too short to pay for the probe;
    otherwise the warmed-up probe's choice, with its figures in the manifest, kept on resume."""
    import json

    from edgeclr import checkpoint, train

    monkeypatch.setattr(engine, "cpu_bf16_units", lambda: None)
    r = engine.choose_cpu_precision(engine.models.create_model("resnet18", in_chans=1, width=8, stem_stride=1),
                                    torch.randn(4, 1, 8, 8), 10 ** 6)
    assert r == {"precision_ran": "fp32", "why": "--amp auto: this CPU has no bf16 units (amx_bf16, avx512_bf16)"}
    monkeypatch.undo()

    train.main(_tiny_train(tmp_path / "short"))  # about a second of fp32 training: not worth a probe
    m = json.loads((tmp_path / "short/train/manifest.json").read_text())
    assert m["precision_ran"] == "fp32" and m["why"].startswith("--amp auto: ")
    if engine.cpu_bf16_units() is None:
        pytest.skip("this CPU has no bf16 units: the probe itself cannot run")

    # a probe that always pays, and a bar that bf16 always clears: the run trains in bf16 and says why
    monkeypatch.setattr(engine, "PROBE_MIN_SECONDS", 0.0)
    monkeypatch.setattr(engine, "BF16_MIN_GAIN", 0.0)
    train.main(_tiny_train(tmp_path / "bf16", epochs=2))
    m = json.loads((tmp_path / "bf16/train/manifest.json").read_text())
    assert m["precision_ran"] == "bf16" and "warmed-up probe" in m["why"]
    assert m["probe"]["fp32_step_s"] > 0 and m["probe"]["bf16_step_s"] > 0 and m["probe"]["batch"] == [128, 1, 8, 8]
    # resumed with a bar bf16 can never clear: the run goes on in the precision it began with
    monkeypatch.setattr(engine, "BF16_MIN_GAIN", 1e9)
    ck = checkpoint.load(tmp_path / "bf16/train/checkpoints/last.pt")
    assert ck["precision"]["precision_ran"] == "bf16"
    train.main(_tiny_train(tmp_path / "bf16", epochs=3, resume=True))
    m = json.loads((tmp_path / "bf16/train/manifest.json").read_text())
    assert m["precision_ran"] == "bf16" and m["why"].endswith("(kept on resume)")


def test_fit_minutes_sizes_the_schedule_from_the_measured_steps(tmp_path):
    """fit_minutes: the first steps are timed, the epochs that fit are kept (at most --epochs) and the
    cosine decay ends there; the manifest says how."""
    import json

    from edgeclr import checkpoint, train

    # a budget far under one epoch: one epoch
    train.main(_tiny_train(tmp_path / "short", epochs=50, fit_minutes=0.001, amp="off"))
    m = json.loads((tmp_path / "short/train/manifest.json").read_text())
    ck = checkpoint.load(tmp_path / "short/train/checkpoints/last.pt")
    assert m["fitted"]["epochs"] == 1 and m["fitted"]["asked_epochs"] == 50 and m["fitted"]["step_s"] > 0
    assert ck["epoch"] == 1 and ck["config"]["epochs"] == 1 and "1 of 50 epochs fit" in m["fitted"]["why"]
    assert m["fitted"]["overrun_s"] > 0 and "overruns its 0.001 min" in m["fitted"]["why"]  # said when fitted, at the start
    # resumed with the same options (--epochs 50): the fitted schedule holds, nothing more is trained
    train.main(_tiny_train(tmp_path / "short", epochs=50, fit_minutes=0.001, amp="off", resume=True))
    assert checkpoint.load(tmp_path / "short/train/checkpoints/last.pt")["global_step"] == ck["global_step"]
    # a budget far over the schedule: --epochs as asked
    train.main(_tiny_train(tmp_path / "long", epochs=2, fit_minutes=60, amp="off"))
    m = json.loads((tmp_path / "long/train/manifest.json").read_text())
    assert m["fitted"]["epochs"] == 2 and checkpoint.load(tmp_path / "long/train/checkpoints/last.pt")["epoch"] == 2
    assert "overrun_s" not in m["fitted"]


def test_a_schedule_rebuilt_mid_run_continues_from_its_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    full = engine.build_scheduler(opt, total_steps=100, warmup_steps=10)
    for _ in range(30):
        opt.step()
        full.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    engine.build_scheduler(opt2, total_steps=100, warmup_steps=10)
    rebuilt = engine.build_scheduler(opt2, total_steps=100, warmup_steps=10, at_step=30)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) and rebuilt.last_epoch == 30
    opt.step(), full.step(), opt2.step(), rebuilt.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
