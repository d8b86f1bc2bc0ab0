"""edgeclr deploy / select: candidates from every level, one interleaved timing, the fastest within
the budget shipped, reasons for every other candidate, resume, re-ranking with a board's bench.json."""

import json
import os

import pytest
from helpers import TINY, run

from edgeclr import bench, config, deploy
from edgeclr.errors import ConfigError
from edgeclr.runtime import Embedder

pytest.importorskip("torch_pruning")

STUDENT = ["--model", "resnet18", "--width", "8", "--epochs", "3", "--batch-size", "64", "--knn-every", "0",
           "--no-tensorboard", "--threads", "1"]
COMPRESS = ["--target-macs", "0.5", "--prune-steps", "2", "--recover-epochs", "1", "--threads", "1", "--no-tensorboard",
            "--latency-runs", "3", "--eval-images", "300", "--calib-images", "64"]
FAST = ["--rounds", "2", "--runs", "5", "--warmup", "0.05", "--eval-images", "300", "--calib-images", "64"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dep") / "run"
    run(["train", *TINY, "--epochs", "3", "--out", str(out)])
    run(["distill", "--teacher", str(out), *STUDENT])
    run(["compress", str(out), *COMPRESS])
    run(["export", str(out / "train"), "--format", "onnx", "--out", str(out / "export"), "--name", "teacher"])
    return out


def test_every_level_is_a_candidate_and_the_fastest_within_the_budget_ships(tiny_run):
    r = run(["deploy", str(tiny_run), "--scoped-only", *FAST])
    d = tiny_run / "deploy"
    sel = json.loads((d / "selection.json").read_text())
    names = {c["name"] for c in sel["candidates"]}
    # the teacher's own exports in both runtimes (export/teacher.onnx reused, the IR built), the student,
    # the level after pruning step 1 (compress/checkpoints/step1.pt) and the final pruned model
    assert {"teacher/fp32.onnx", "teacher/fp32.xml"} <= names
    for level in ("student", "pruned-1", "pruned"):
        assert {f"{level}/{v}{s}" for v in ("fp32", "int8") for s in (".onnx", ".xml")} <= names, names
    assert os.path.samefile(d / "candidates" / "teacher" / "fp32.onnx", tiny_run / "export" / "teacher.onnx")
    win = sel["winner"]
    teacher_knn = sel["teacher"]["knn_top1"]
    within = [c for c in sel["candidates"] if teacher_knn - c["knn_top1"] <= 1.5 + 1e-9]
    assert win["p50_ms"] == min(c["p50_ms"] for c in within)  # the fastest within the budget, as measured
    assert win["p50_ms"] <= deploy.teacher_export(sel["candidates"], win["runtime"])["p50_ms"]
    for c in sel["candidates"]:
        assert c["status"] in ("selected", "slower", "over budget") and c["reason"]
        if c["status"] == "slower":
            assert c["p50_ms"] >= win["p50_ms"] and "x the selected model's" in c["reason"]
        if c["status"] == "over budget":
            assert teacher_knn - c["knn_top1"] > 1.5 and "--max-drop 1.5" in c["reason"]
        assert c["linear_top1"] > 0 and c["size_bytes"] > 0 and c["model_rss_mb"] > 0
    shipped = d / f"model{os.path.splitext(win['path'])[1]}"
    assert shipped.is_file() and Embedder.load(shipped).meta.embedding_dim > 0
    assert "selected:" in r.output and (d / "README.md").read_text().count("edgeclr embed") == 1
    assert "| `teacher/fp32.onnx` |" in (d / "selection.md").read_text()


def test_a_rerun_reuses_the_built_candidates_and_their_scores_and_times_again(tiny_run):
    d = tiny_run / "deploy"
    if not (d / "selection.json").exists():
        run(["deploy", str(tiny_run), "--scoped-only", *FAST])
    f = d / "candidates" / "student" / "int8.onnx"
    before = f.stat().st_mtime_ns, f.with_name("int8.onnx.score.json").stat().st_mtime_ns
    first = json.loads((d / "selection.json").read_text())
    run(["deploy", str(tiny_run), "--scoped-only", *FAST])
    again = json.loads((d / "selection.json").read_text())
    assert (f.stat().st_mtime_ns, f.with_name("int8.onnx.score.json").stat().st_mtime_ns) == before
    by = {c["name"]: c for c in again["candidates"]}
    assert all(by[c["name"]]["knn_top1"] == c["knn_top1"] for c in first["candidates"])
    assert [c["p50_ms"] for c in again["candidates"]] != [c["p50_ms"] for c in first["candidates"]]  # timed again


def test_a_latency_limit_nothing_meets_ships_nothing_and_says_so(tiny_run, tmp_path):
    out = tmp_path / "dep"
    r = run(["deploy", str(tiny_run), "--out", str(out), "--runtimes", "onnxruntime", "--fp32-only", "--max-latency-ms",
             "0.000001", *FAST], ok=False)
    assert r.exit_code == 2 and "no candidate runs under --max-latency-ms" in r.output and "nothing was shipped" in r.output
    sel = json.loads((out / "selection.json").read_text())
    assert sel["winner"] is None and all(c["status"] == "over latency" for c in sel["candidates"])
    assert not list(out.glob("model.*"))


def test_a_pi_target_builds_s8_onnxruntime_candidates_and_select_reranks_with_the_boards_bench(tiny_run, tmp_path):
    out = tmp_path / "pi"
    run(["deploy", str(tiny_run), "--out", str(out), "--target", "pi5", "--scoped-only", *FAST])
    sel = json.loads((out / "selection.json").read_text())
    assert {c["runtime"] for c in sel["candidates"]} == {"onnxruntime"}
    assert "x86 proxy for a pi5" in sel["latency_source"]
    import onnx

    def zero_point_types(path):
        return {i.data_type for i in onnx.load(str(path)).graph.initializer if i.name.endswith("_zero_point")}

    u8, s8 = onnx.TensorProto.UINT8, onnx.TensorProto.INT8
    assert u8 in zero_point_types(tiny_run / "compress" / "models" / "int8.onnx")  # x86: u8 activations
    pi = zero_point_types(out / "candidates" / "pruned" / "int8.onnx")
    assert s8 in pi and u8 not in pi  # ARM: s8 activations, so compress's x86 file was not reused
    # the board's bench.json (here measured on this machine): the same LEVEL/VARIANT files
    run(["bench", str(out / "candidates"), "--formats", "onnx,onnx-int8", "--rounds", "1", "--runs", "3", "--warmup", "0",
         "--out", str(tmp_path / "board")])
    r = run(["select", str(out), "--bench", str(tmp_path / "board" / "bench.json")])
    again = json.loads((out / "selection.json").read_text())
    assert str(tmp_path / "board" / "bench.json") in again["latency_source"] and "selected:" in r.output
    board = {"/".join(row["path"].split("/")[-2:]): row["p50_ms"] for row in
             json.loads((tmp_path / "board" / "bench.json").read_text())["rows"]}
    assert again["winner"]["p50_ms"] == board[again["winner"]["name"]]
    r = run(["select", str(out), "--bench", str(tmp_path / "nothing.json")], ok=False)
    assert r.exit_code == 2 and "nothing.json does not exist: give a bench.json written by `edgeclr bench`" in r.output


def test_a_search_budget_that_ran_out_still_measures_the_teacher(tiny_run, tmp_path):
    out = tmp_path / "budget"
    run(["deploy", str(tiny_run), "--out", str(out), "--runtimes", "onnxruntime", "--search-minutes", "0.00001", *FAST])
    sel = json.loads((out / "selection.json").read_text())
    built = {c["name"] for c in sel["candidates"]}
    assert "teacher/fp32.onnx" in built and "pruned/fp32.onnx" in built  # reused files cost nothing
    assert "student/fp32.onnx" in sel["not_built"] and "student/fp32.onnx" not in built


def rows(*specs):
    return [{"name": n, "level": n.split("/")[0], "variant": n.split("/")[1].split(".")[0], "runtime": "onnxruntime",
             "knn_top1": k, "drop": 90.0 - k, "p50_ms": ms, "size_bytes": 1, "description": n} for n, k, ms in specs]


def test_where_int8_does_not_pay_fp32_ships_and_the_int8_model_is_told_why():
    rs = rows(("teacher/fp32.onnx", 90.0, 0.40), ("pruned/fp32.onnx", 89.5, 0.10), ("pruned/int8.onnx", 89.6, 0.16))
    win = deploy.choose(rs, {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": None})
    assert win["name"] == "pruned/fp32.onnx"
    int8 = rs[2]
    assert int8["status"] == "slower" and int8["reason"].startswith("0.160 ms, 1.60x the selected model's 0.100 ms")
    assert [r["pareto"] for r in rs] == [True, True, True]


def test_the_teachers_export_ships_when_no_student_is_both_within_budget_and_faster():
    rs = rows(("teacher/fp32.onnx", 90.0, 0.20), ("student/fp32.onnx", 89.9, 0.25), ("pruned/int8.onnx", 85.0, 0.05))
    win = deploy.choose(rs, {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": None})
    assert win["name"] == "teacher/fp32.onnx"
    assert rs[2]["status"] == "over budget" and "5.00 kNN points below the teacher" in rs[2]["reason"]
    text = deploy.summary(win, rs, True, "measured here")
    assert "no student candidate was both within the budget and faster" in text and "faster than the teacher" not in text
    # no student within the accuracy budget, and the teacher's two exports tied: the budget is named, not speed
    rs = rows(("teacher/fp32.onnx", 90.0, 0.20), ("teacher/fp32.xml", 90.0, 0.20), ("student/fp32.onnx", 88.0, 0.05),
              ("pruned/int8.onnx", 85.0, 0.04))
    win = deploy.choose(rs, {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": None})
    text = deploy.summary(win, rs, True, "measured here")
    assert "not measurably faster" not in text and "no student met the accuracy budget" in text
    assert "(the closest, student/fp32.onnx: 2.00 kNN points below the teacher > --max-drop 1.5)" in text
    # a latency limit: the most accurate under it
    rs = rows(("teacher/fp32.onnx", 90.0, 0.20), ("student/fp32.onnx", 89.9, 0.25), ("pruned/int8.onnx", 85.0, 0.05))
    win = deploy.choose(rs, {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": 0.22})
    assert win["name"] == "teacher/fp32.onnx" and rs[1]["status"] == "over latency"


def test_a_slower_model_is_never_called_faster():
    assert deploy.speed_phrase(0.8) == "1.25x slower than"
    assert deploy.speed_phrase(2.0) == "2.00x faster than"
    assert deploy.speed_phrase(1.01) == "as fast as"
    rs = rows(("teacher/fp32.onnx", 90.0, 0.10), ("pruned/fp32.onnx", 89.5, 0.12))
    text = deploy.summary(rs[1], rs, True, "measured here")
    assert "1.20x slower than the teacher's own onnxruntime export" in text


def test_deploy_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="OpenVINO's ARM plugin"):
        config.DeployConfig(run="x", target="pi5", runtimes="onnxruntime,openvino")
    with pytest.raises(ConfigError, match="calib_images must be >= 32"):
        config.DeployConfig(run="x", calib_images=4)
    assert config.DeployConfig(run="x", target="pi4").formats == "onnx"
    r = run(["deploy", str(tmp_path / "nope")], ok=False)
    assert r.exit_code == 2 and "is not a run folder" in r.output
    (tmp_path / "empty").mkdir()
    r = run(["deploy", str(tmp_path / "empty")], ok=False)
    assert r.exit_code == 2 and "has no teacher checkpoint" in r.output


def test_another_student_family_distilled_from_the_same_teacher_joins_the_candidates(tiny_run, tmp_path):
    other = tmp_path / "mnv3"
    run(["distill", "--teacher", str(tiny_run), "--out", str(other), "--model", "mobilenet_v3_small_minimal", "--epochs", "1",
         "--batch-size", "64", "--knn-every", "0", "--no-tensorboard", "--threads", "1"])
    out = tmp_path / "dep"
    run(["deploy", str(tiny_run), "--also", str(other), "--out", str(out), "--runtimes", "onnxruntime", "--scoped-only", *FAST])
    sel = json.loads((out / "selection.json").read_text())
    by = {c["name"]: c for c in sel["candidates"]}
    assert {"mnv3.student/fp32.onnx", "mnv3.student/int8.onnx", "student/fp32.onnx", "teacher/fp32.onnx"} <= set(by)
    assert by["mnv3.student/fp32.onnx"]["description"].startswith("the distilled student of mnv3, FP32")
    # a student of another teacher is refused before anything is built
    stranger = tmp_path / "stranger"
    run(["train", *TINY, "--epochs", "1", "--seed", "1", "--out", str(stranger)])
    run(["distill", "--teacher", str(stranger), *STUDENT[:4], "--epochs", "1", "--knn-every", "0", "--no-tensorboard",
         "--threads", "1"])
    r = run(["deploy", str(tiny_run), "--also", str(stranger), "--out", str(tmp_path / "no")], ok=False)
    assert r.exit_code == 2 and "distilled from another teacher" in r.output and not (tmp_path / "no").exists()


def test_deploy_killed_while_building_candidates_finishes_on_a_rerun(tiny_run, tmp_path):
    """SIGKILL (no cleanup) after the first level's candidates are built; the re-run reuses what is
    whole, builds the rest, and ships from the same candidates as a run that was never killed."""
    import subprocess
    import sys

    out = tmp_path / "killed"
    args = ["deploy", str(tiny_run), "--out", str(out), "--runtimes", "openvino", "--fp32-only", *FAST]
    p = subprocess.run([sys.executable, "-m", "edgeclr", *args], env={**os.environ, "EDGECLR_FAULT": "kill:stage=deploy:step=1"},
                       capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-500:]
    assert not (out / "selection.json").exists() and (out / "candidates" / "teacher" / "fp32.xml").is_file()
    run(args)
    sel = json.loads((out / "selection.json").read_text())
    names = {c["name"] for c in sel["candidates"]}
    assert {"teacher/fp32.xml", "student/fp32.xml", "pruned/fp32.xml"} <= names and sel["winner"] is not None
    assert not list(out.rglob("*.partial*"))
    for c in sel["candidates"]:  # every file, IR and its .bin, whole: it loads and runs
        Embedder.load(out / "candidates" / c["name"])


def timed(rs, rounds):
    for r, p50s in zip(rs, rounds):
        r["round_p50_ms"] = p50s
    return rs


def test_candidates_tied_within_noise_ship_the_most_accurate_and_the_choice_does_not_flip():
    rule = {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": None}
    noisy = [0.100, 0.104, 0.097, 0.103, 0.099]  # the two INT8 models' rounds interleave: neither is separably faster
    for swap in (False, True):  # whichever is a hair faster in this run's medians, the same one ships
        a, b = (noisy, [x * 1.01 for x in noisy[::-1]]) if not swap else ([x * 1.01 for x in noisy[::-1]], noisy)
        rs = timed(rows(("teacher/fp32.onnx", 90.0, 0.40), ("pruned/int8.onnx", 88.9, 0.0995 if swap else 0.0990),
                        ("student/int8.onnx", 89.6, 0.0990 if swap else 0.0995), ("pruned/fp32.onnx", 89.0, 0.16)),
                   [[0.40] * 5, a, b, [0.16, 0.161, 0.159, 0.162, 0.158]])
        win = deploy.choose(rs, rule)
        assert win["name"] == "student/int8.onnx" and "most accurate of the 2 candidates tied with the fastest" in win["reason"]
        other = rs[1]
        assert other["status"] == "tied" and "less accurate" in other["reason"] and "95% interval" in other["reason"]
        assert rs[3]["status"] == "slower" and rs[3]["vs_fastest"]["low"] > 1.4  # separable: not tied
    assert bench.ratio_interval([2.0] * 5, [1.0] * 5) == (2.0, 2.0, 2.0)
    # a margin of practical equivalence: 3% slower in every round is separable, yet tied under --tie-margin 0.05
    rs = timed(rows(("pruned/int8.onnx", 89.0, 0.100), ("student/int8.onnx", 89.6, 0.103)),
               [[0.100, 0.101, 0.099, 0.100, 0.102], [0.103, 0.104, 0.102, 0.103, 0.105]])
    assert deploy.choose(rs, {**rule, "tie_margin": 0.0})["name"] == "pruned/int8.onnx"
    assert deploy.choose(rs, {**rule, "tie_margin": 0.05})["name"] == "student/int8.onnx"


def test_a_candidate_slower_by_its_median_is_not_tied_by_the_low_end_of_its_interval():
    """The rounds of a demo deploy (Intel Xeon, 1 thread): the INT8 copy of the shipped student was
    1.09x slower by its median ratio, with an interval down to 1.04. Held to the interval's low end it
    tied under the 5% margin and, as accurate and smaller, shipped, where two other deploys of the
    same files shipped the FP32 copy; held to the median, the faster file ships every time."""
    rule = {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": None, "tie_margin": 0.05}
    fp32 = [0.0453, 0.0418, 0.0388, 0.042, 0.0414, 0.0402, 0.0392, 0.0413, 0.0412, 0.0418]
    int8 = [0.043, 0.0433, 0.0461, 0.064, 0.0432, 0.0434, 0.0457, 0.0458, 0.0428, 0.046]
    rs = timed(rows(("teacher/fp32.onnx", 92.89, 0.204), ("w8/fp32.onnx", 94.89, 0.0415), ("w8/int8.onnx", 94.89, 0.0455)),
               [[0.204] * 10, fp32, int8])
    rs[2]["size_bytes"] = rs[1]["size_bytes"] // 2
    ratio, lo, _ = bench.ratio_interval(int8, fp32)
    assert ratio > 1.08 and lo < 1.05  # the case: tied by the low end, not by the median
    assert deploy.choose(rs, rule)["name"] == "w8/fp32.onnx" and rs[2]["status"] == "slower"


def test_without_rounds_a_board_bench_ties_only_equal_latencies():
    rs = rows(("teacher/fp32.onnx", 90.0, 0.40), ("pruned/int8.onnx", 89.0, 0.10), ("student/int8.onnx", 89.6, 0.11))
    win = deploy.choose(rs, {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": None})
    assert win["name"] == "pruned/int8.onnx" and win["reason"] == "the fastest within the budget"
    assert rs[2]["status"] == "slower"


def test_a_student_tied_with_the_teachers_export_is_not_called_faster():
    rs = timed(rows(("teacher/fp32.onnx", 90.0, 0.100), ("student/int8.onnx", 89.6, 0.099)),
               [[0.100, 0.098, 0.103, 0.099, 0.101], [0.101, 0.097, 0.102, 0.098, 0.099]])
    win = deploy.choose(rs, {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": None})
    assert win["name"] == "teacher/fp32.onnx"
    assert "not measurably faster than the teacher's own export (tied within noise)" in deploy.summary(win, rs, True, "here")


def test_a_reranked_selection_decides_its_ties_afresh():
    rule = {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": None, "tie_margin": 0.05}
    rs = timed(rows(("pruned/int8.onnx", 89.0, 0.100), ("student/int8.onnx", 89.6, 0.101)),
               [[0.100, 0.101, 0.099, 0.100, 0.102], [0.101, 0.100, 0.100, 0.101, 0.102]])
    assert deploy.choose(rs, rule)["name"] == "student/int8.onnx" and "vs_fastest" in rs[1]
    # the board's bench (no rounds): the student is 1.5x slower there, and this machine's interval is not kept
    rs[1].update(p50_ms=0.150, round_p50_ms=None)
    rs[0]["round_p50_ms"] = None
    assert deploy.choose(rs, rule)["name"] == "pruned/int8.onnx"
    assert "vs_fastest" not in rs[1] and rs[1]["status"] == "slower" and "interval" not in rs[1]["reason"]
