"""edgeclr bench: a tiny model in seconds, honest fields, the precision and threads that ran, clear errors."""

import json
import sys

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
    macs = {x["macs"] for x in rows}
    assert len(macs) == 1  # torch and the exported files count the same network
    base = [x for x in rows if x["format"] == "torch"]
    assert all(x["speedup_vs_baseline"] == pytest.approx(1.0) for x in base)
    assert res["baseline"].endswith(":torch") and res["matmul_peak_macs_per_s"]["1"] > 0
    assert (out / "bench.md").exists() and (out / "bench.png").exists() and "| run/train | torch |" in r.output


def test_bf16_is_reported_when_asked(exported, tmp_path):
    run(["bench", str(exported / "run" / "export" / "model.xml"), "--precision", "bf16", *FAST, "--out", str(tmp_path)])
    row = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    assert row["precision_ran"] in ("bf16", "f32")  # bf16 where the CPU has it; never reported as asked if not
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert (row["precision_ran"] == "bf16") == ("BF16" in caps)


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
