"""edgeclr bench: a tiny model in seconds, honest fields, the precision and threads that ran, clear errors."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_checkpoint, run

from edgeclr import bench


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    make_checkpoint(d / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    run(["export", str(d / "run"), "--check-images", "4"])
    run(["export", str(d / "run"), "--format", "openvino", "--check-images", "4"])
    return d


FAST = ["--rounds", "2", "--runs", "5", "--warmup", "0.1"]


def test_bench_times_every_format_of_a_run_with_honest_fields(exported, tmp_path):
    out = tmp_path / "b"
    r = run(["bench", str(exported / "run"), "--threads", "1,2", "--batch", "1,4", *FAST, "--out", str(out)])
    res = json.loads((out / "bench.json").read_text())
    rows = res["rows"]
    assert {(x["format"], x["threads"], x["batch"]) for x in rows} == {
        (f, t, b) for f in ("torch", "onnx", "openvino") for t in (1, 2) for b in (1, 4)}
    for x in rows:
        for k in ("p50_ms", "p90_ms", "p99_ms", "images_per_s", "peak_rss_mb", "size_bytes", "macs", "params", "efficiency"):
            assert x[k] > 0, (k, x)
        assert x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"] and x["runs"] == 10
        assert x["threads_setting"] == x["threads"]  # what the runtime reports it runs with
        assert x["images_per_s"] == pytest.approx(x["batch"] / x["p50_ms"] * 1000)
    ov = [x for x in rows if x["format"] == "openvino"]
    assert all(x["precision_ran"] == "f32" for x in ov)  # pinned: this CPU would pick bf16 unasked
    for x in rows:  # OpenVINO's own request latency: inside each timed call, so never above the call's p50
        if x["format"] == "openvino":
            assert 0 < x["runtime_p50_ms"] <= x["p50_ms"] and x["call_overhead_ms"] == pytest.approx(x["p50_ms"] - x["runtime_p50_ms"])
        else:
            assert "runtime_p50_ms" not in x
    macs = {x["macs"] for x in rows}
    assert len(macs) == 1  # torch and the exported files count the same network
    base = [x for x in rows if x["format"] == "torch"]
    assert all(x["speedup_vs_baseline"] == pytest.approx(1.0) for x in base)
    assert res["baseline"].endswith(":torch") and res["matmul_peak_macs_per_s"]["1"] > 0
    assert (out / "bench.md").exists() and (out / "bench.png").exists() and "| run/train | torch |" in r.output


def test_bf16_is_reported_when_asked(exported, tmp_path):
    run(["bench", str(exported / "run" / "export" / "model.xml"), "--precision", "bf16", *FAST, "--out", str(tmp_path)])
    row = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    assert row["precision_ran"] in ("bf16", "f32")  # bf16 where the CPU runs it; never reported as asked if not
    import openvino as ov

    # what the CPU plugin executes, read from its runtime graph: an AVX-512 CPU without native BF16
    # (AVX512_VNNI only) still runs some layers in bf16, so the capability list is not the test
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(exported / "run" / "export" / "model.xml")), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "bf16"})
    ran = {op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
           if "runtimePrecision" in op.get_rt_info()}
    assert (row["precision_ran"] == "bf16") == ("bf16" in ran)


def test_an_int8_openvino_model_reports_the_layers_that_ran_in_8_bits(exported, tmp_path):
    import numpy as np

    from edgeclr.compress import quantize

    i8 = tmp_path / "int8.xml"
    calib = np.random.default_rng(0).normal(size=(16, 1, 16, 16)).astype(np.float32)
    quantize.quantize_openvino(exported / "run" / "export" / "model.xml", i8, calib, [])
    run(["bench", str(exported / "run" / "export" / "model.xml"), str(i8), *FAST, "--out", str(tmp_path / "b")])
    rows = {x["format"]: x for x in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]}
    assert rows["openvino"]["precision_ran"] == "f32"  # the hint pinned for FP32; the INT8 IR's layers ran in 8 bits
    low, total = map(int, rows["openvino-int8"]["precision_ran"].split("(")[1].split(" ")[0].split("/"))
    assert rows["openvino-int8"]["precision_ran"].startswith("int8 (") and 0 < low <= total


def test_wrong_files_and_missing_runtimes_are_clear_errors(exported, tmp_path, monkeypatch):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    r = run(["bench", str(txt), *FAST], ok=False)
    assert r.exit_code == 2 and "not a model file" in r.output
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    r = run(["bench", str(bad), *FAST], ok=False)
    assert r.exit_code == 2 and "not a model the runtime can read" in r.output
    r = run(["bench", str(tmp_path / "nope.onnx"), *FAST], ok=False)
    assert r.exit_code == 2 and "does not exist" in r.output
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(bench.BenchError, match=r"pip install 'edgeclr\[openvino\]'"):
        bench.classify(exported / "run" / "export" / "model.xml")
    # the run's OpenVINO files are not opened when only onnx is asked for
    r = run(["bench", str(exported / "run"), "--formats", "onnx", "--baseline", "nothing", *FAST, "--out", str(tmp_path)], ok=False)
    assert r.exit_code == 2 and "--baseline nothing" in r.output


def test_torchvision_references_run_unmodified_in_torch_eager(tmp_path):
    out = tmp_path / "tv"
    run(["bench", "torchvision:resnet18", "--formats", "torch", "--input-size", "32", *FAST, "--out", str(out)])
    row = json.loads((out / "bench.json").read_text())["rows"][0]
    import torchvision

    from edgeclr.models import count_macs

    ref = torchvision.models.resnet18()
    assert row["label"] == "torchvision:resnet18" and row["format"] == "torch" and row["p50_ms"] > 0
    assert row["params"] == sum(p.numel() for p in ref.parameters())  # the classifier too: unmodified
    assert row["macs"] == count_macs(ref, (3, 32, 32)) > 0
    r = run(["bench", "torchvision:resnet_eighteen", "--formats", "torch", *FAST, "--out", str(out)], ok=False)
    assert r.exit_code == 2 and "torchvision has no model 'resnet_eighteen'" in r.output
    r = run(["bench", "torchvision:resnet18", "--formats", "onnx", *FAST, "--out", str(out)], ok=False)
    assert r.exit_code == 2 and "add torch to --formats" in r.output


def test_benchmark_app_cross_check_runs_on_an_exported_model(exported, tmp_path):
    """The harness of benchmarks/bench_vs_benchmark_app.py (its recorded run is the 20% comparison):
    benchmark_app takes the settings, and edgeclr's compiled model is the configuration it is
    compared with (LATENCY hint = 1 stream, f32, the threads asked)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_vs_benchmark_app as cross

    xml = exported / "run" / "export" / "model.xml"
    theirs = cross.benchmark_app(xml, 1, 1, tmp_path / "rep")
    mine = cross.ours(xml, "openvino", 1, 2, 5)
    assert theirs["median_ms"] > 0 and theirs["iterations"] > 0 and "-infer_precision f32" in theirs["command"]
    assert mine["p50_ms"] >= mine["runtime_p50_ms"] > 0 and mine["precision_ran"] == "f32" and mine["threads_setting"] == 1
    assert mine["performance_hint"] == "LATENCY" and mine["streams"] == 1


def test_a_missing_benchmark_app_names_the_package_that_installs_it(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_vs_benchmark_app as cross

    monkeypatch.setattr(cross.shutil, "which", lambda name: None)
    monkeypatch.setattr(cross.sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(SystemExit, match=r"benchmark_app not found .*pip install 'edgeclr\[openvino\]'"):
        cross.benchmark_app(tmp_path / "model.xml", 1, 1, tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_a_worker_slow_to_exit_is_killed_and_the_timings_are_kept(exported, monkeypatch):
    """On a starved machine a worker took over 30 s to exit after `quit`: the finished run raised
    TimeoutExpired from close() and lost every row."""
    import subprocess

    real = subprocess.Popen.wait
    slow = []

    def wait(self, timeout=None):
        if timeout is not None and not slow:  # the first polite wait times out
            slow.append(self.args)
            raise subprocess.TimeoutExpired(self.args, timeout)
        return real(self, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", wait)
    cfg = bench.Config("m", str(exported / "run" / "export" / "model.onnx"), "onnx", 1, 1)
    rows = bench.run_bench([cfg], 1, 3, 0.0)
    assert slow and rows[0]["runs"] == 3 and rows[0]["p50_ms"] > 0


def test_run_all_refuses_an_unknown_skip_before_running_anything(tmp_path):
    """A misspelt --skip (\"teachr\") used to re-run the hour-long teacher step it meant to reuse."""
    import subprocess

    script = Path(__file__).parents[1] / "benchmarks" / "run_all.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "all"), "--skip", "teachr,distill"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--skip teachr: no such step; steps: teacher, distill" in r.stderr
    assert not (tmp_path / "all").exists() and "+ " not in r.stdout  # no step started
    (tmp_path / "all" / "compress").mkdir(parents=True)  # a finished compress run, not skipped: refused up front
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "all"), "--skip", "teacher,distill"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and f"already there: compress ({tmp_path / 'all' / 'compress'})" in r.stderr
    assert "--skip compress" in r.stderr and "+ " not in r.stdout


def test_embed_memory_takes_a_student_runs_newest_stage(tmp_path):
    """benchmarks/embed_memory.py --run (run_all's memory step) failed with an AttributeError: it
    asked edgeclr.checkpoint for the stage names that edgeclr.rundir holds."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import embed_memory

    run_dir = tmp_path / "run"
    make_checkpoint(run_dir / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    make_checkpoint(run_dir / "distill" / "checkpoints" / "last.pt", "resnet18", stage="distill", width=8)
    assert embed_memory.model_checkpoint(str(run_dir), tmp_path) == run_dir / "distill" / "checkpoints" / "last.pt"
    made = embed_memory.model_checkpoint(None, tmp_path / "w")
    assert made.is_file() and made.parent.parent.name == "train"


def test_the_timed_loop_does_nothing_between_calls_but_read_the_clock(exported, monkeypatch, capsys):
    """The worker listed /proc/self/task after every timed call to count threads, work that
    benchmark_app's loop does not do (it changed a 0.5-ms model's next inference by a median
    0.98-1.43x over two runs: benchmarks/results/bench_between_calls/latest.md). It counts once per chunk of runs now,
    and still reports the threads alive."""
    import dataclasses
    import io

    real, calls = bench._threads_running, []
    monkeypatch.setattr(bench, "_threads_running", lambda: calls.append(1) or real())
    cfg = bench.Config("m", str(exported / "run" / "export" / "model.xml"), "openvino", 1, 1)
    monkeypatch.setattr(sys, "stdin", io.StringIO("run 20\nrun 20\nstats\nquit\n"))
    bench.worker(json.dumps(dataclasses.asdict(cfg)))
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "ready" in out[0] and len(out[1]["times"]) == len(out[1]["runtime_times"]) == 20 and len(out[2]["times"]) == 20
    assert len(calls) == 2  # once per 'run' command, not once per call
    assert out[3]["threads_in_process"] >= 1


def test_a_record_names_dirty_code_but_not_the_records_a_run_writes(tmp_path):
    """git describe --dirty marked every record of a run_all.py run "-dirty" once its first step
    had written its table into benchmarks/results/."""
    import subprocess

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from _common import git_state

    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *a], check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("old\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    head = git_state(tmp_path)
    assert head and not head.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("new figures\n")
    assert git_state(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path) == head + "-dirty"
    assert git_state(tmp_path / "nowhere") == ""


def test_the_lightly_baseline_trains_and_scores_with_edgeclrs_knn(monkeypatch):
    """benchmarks/fashion_mnist_teacher.py --lightly (issue 37's comparison): lightly's SimCLR example
    trains a few steps on real images and its backbone is scored with edgeclr's kNN and probe."""
    pytest.importorskip("lightly", reason="lightly is in the dev extra: pip install -e '.[dev]'")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import fashion_mnist_teacher as fmt

    from edgeclr import data

    train, test = data.load_digits("train"), data.load_digits("test")
    lines = []
    monkeypatch.setattr(fmt, "LOG_EVERY", 5)
    r = fmt.lightly_baseline(train, test, budget_min=5, workers=0, batch_size=128, max_steps=12, log=lines.append)
    assert r["steps"] == 12 and r["epochs_done"] == 1 and r["dim"] == 512 and r["parameters"] > 11e6
    assert "SimCLRTransform(input_size=8)" in r["recipe"] and "batch 128" in r["recipe"]
    assert lines and "loss" in lines[0] and np.isfinite(r["final_loss"])
    # a briefly trained ResNet-18 on 8-px digits is still far above chance (10 classes)
    assert 30 < r["knn_top1"] <= 100 and 30 < r["linear_top1"] <= 100
