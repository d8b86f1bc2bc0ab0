"""`edgeclr pipeline`: every stage in one command; skip, resume, re-run on changed options; the report."""

import base64
import dataclasses
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run
from PIL import Image

from edgeclr import config, pipeline

ROOT = Path(__file__).resolve().parent.parent

# every stage, as small as it gets: one epoch each, ONNX only, a few timed runs
FAST = dict(
    preset="demo",
    students="none",  # the distill section's student alone; the ladder is tested where it says so
    train=dict(width=8, epochs=1, batch_size=128, knn_every=1, threads=1, tensorboard=False),
    distill=dict(epochs=2, knn_every=0, ckpt_every=3, threads=1, tensorboard=False),
    compress=dict(recover_epochs=1, calib_images=32, latency_runs=3, eval_images=300, formats="onnx", tensorboard=False),
    export=dict(formats="onnx", check_images=4),
    eval=dict(latency_runs=3, linear_probe=False, max_train=300, baselines="pixels,random", tsne=True, label_efficiency="1,3",
              draws=2, finetune_steps=5),
    bench=dict(rounds=1, runs=3, warmup=0.05, formats="onnx,onnx-int8"),
    deploy=dict(runtimes="onnxruntime", quantize_all=False, rounds=1, runs=3, warmup=0.05, calib_images=32, eval_images=300),
)


def write_cfg(path, **changes):
    d = json.loads(json.dumps(FAST))
    for section, kv in changes.items():
        if isinstance(d.get(section), dict):
            d[section].update(kv)
        else:
            d[section] = kv
    path.write_text(yaml.safe_dump(d))
    return path


def spawn(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "edgeclr", "pipeline", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*args) -> str:
    p = spawn(*args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def stages_line(out: str) -> dict:
    line = next(ln for ln in out.splitlines() if ln.startswith("stages: "))
    return dict(s.strip().split(" ") for s in line[len("stages: "):].split(","))


def wait_until(cond, proc, timeout=300):
    t = time.time()
    while not cond():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.01)


def _screenshot_script():
    spec = importlib.util.spec_from_file_location("report_screenshot", ROOT / "scripts" / "report_screenshot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pipeline_killed_mid_stage_resumes_skips_and_reports(tmp_path):
    # a ladder of two more ResNet-10s, smallest first; with no overlap asked for, the narrowest meets the
    # budget at once and the next one is skipped, while the distill section's student always runs
    ladder = dict(students="resnet10@24,resnet10@8", deploy=dict(min_overlap=0.0))
    cfg = write_cfg(tmp_path / "p.yaml", **ladder)
    out = tmp_path / "run"
    state = out / "pipeline.json"
    # 1. SIGKILL once the distillation has written a mid-run checkpoint
    p = spawn("--config", cfg, "--out", out)
    wait_until(lambda: (out / "distill/checkpoints/last.pt").exists(), p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = json.loads(state.read_text())["stages"]
    assert st["train"]["status"] == "done" and st["distill"]["status"] == "running"
    train_ckpt = out / "train/checkpoints/last.pt"
    mtime = train_ckpt.stat().st_mtime_ns

    # 2. the same command finishes the run: train is not redone, distillation resumes
    s = stages_line(finish("--config", cfg, "--out", out))
    assert s["train"] == "skipped" and s["distill"] == "resumed"
    assert all(s[k] == "ran" for k in ("compress", "export", "eval", "bench", "deploy", "report"))
    assert train_ckpt.stat().st_mtime_ns == mtime
    st = json.loads(state.read_text())["stages"]
    assert all(st[k]["status"] == "done" for k in pipeline.STAGES)
    man = json.loads((out / "distill/manifest.json").read_text())
    assert man["completed"] and man["inputs"]["resumed_from"]
    # the ladder: the narrowest student (finished before the kill) was kept, the next one skipped
    rungs = {r["student"]: r for r in st["distill"]["summary"]["ladder"]}
    assert list(rungs) == ["resnet10-w8", "distill", "resnet10-w24"]
    assert rungs["resnet10-w8"]["meets_budget"] is True and 0 <= rungs["resnet10-w8"]["topk_overlap"] <= 1
    assert "meets the budget" in rungs["resnet10-w24"]["skipped"] and not (out / "students/resnet10-w24").exists()
    assert not json.loads((out / "students/resnet10-w8/distill/manifest.json").read_text())["inputs"]["resumed_from"]
    sel = json.loads((out / "deploy/selection.json").read_text())
    nets = {c["name"]: c["architecture"] for c in sel["candidates"]}
    assert nets["resnet10-w8.student/fp32.onnx"] == "resnet10 w8" and nets["student/fp32.onnx"] == "resnet10 w16"
    # compress pruned the smallest student within the budget (every one is, with no overlap asked for)
    assert nets["pruned/fp32.onnx"] == "resnet10 w8 pruned" and not any("w24" in n for n in nets)
    assert json.loads((out / "compress/manifest.json").read_text())["inputs"]["student"].endswith("students/resnet10-w8/distill/checkpoints/last.pt")

    # the report: markdown and a self-contained HTML whose every image is a decodable PNG
    html = (out / "report.html").read_text()
    imgs = re.findall(r"<img [^>]*src='data:image/png;base64,([^']+)'", html)
    assert len(imgs) >= 4 and html.count("<img") == len(imgs)
    for b in imgs:
        im = Image.open(io.BytesIO(base64.b64decode(b)))
        im.verify()
        assert min(im.size) > 50
    md = (out / "report.md").read_text()
    for text in ("Teacher against the baselines", "raw pixels", "random init", "Retention across stages", "## Students",
                 "| `students/resnet10-w8/` | resnet | resnet10 w8 |", "skipped: a smaller resnet student meets the budget",
                 "compress/models/int8.onnx", "Pruning of `students/resnet10-w8/` (the smallest student within the budget)",
                 "Deployment", "onnxruntime", ". Deployed ", "the teacher's own",
                 "Few labels", "| full fine-tuning |", "3 / class"):
        assert text in md, text
    for f in re.findall(r"\]\((report_files/[^)]+)\)", md):
        assert (out / f).is_file()
    # one latency measurement for the retention table; a file's speed-up is against the teacher's export in its runtime
    cmp = {r["model"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert cmp["compress/models/int8.onnx"]["speedup_reference"] == "export/teacher.onnx"
    assert cmp["student"]["speedup_reference"] == "teacher" and cmp["teacher"]["speedup_vs_teacher"] == 1.0
    shot = _screenshot_script()
    assert shot.check_images(html) == len(imgs)
    if shot.chromium():  # headless Chromium renders it (apt-get install chromium; CI images may lack it)
        png = shot.screenshot(out / "report.html", tmp_path / "report.png", 1000, 2500)
        assert Image.open(png).size == (1000, 2500)

    # 3. nothing changed: nothing runs
    assert set(stages_line(finish("--config", cfg, "--out", out)).values()) == {"skipped"}

    # 4. a changed bench option re-runs bench and the stages after it; the old bench folder is kept aside
    s = stages_line(finish("--config", write_cfg(tmp_path / "p2.yaml", bench=dict(runs=4), **ladder), "--out", out))
    assert [k for k, v in s.items() if v != "skipped"] == ["bench", "deploy", "report"]
    kept = list((out / ".replaced").glob("*-bench/bench.json"))
    assert len(kept) == 1
    rows = json.loads((out / "bench/bench.json").read_text())["rows"]
    assert json.loads((out / "bench/bench.json").read_text())["runs_per_round"] == 4
    assert not any(".replaced" in r["path"] for r in rows), "set-aside files must not be benchmarked"
    assert not any("/deploy/" in r["path"] for r in rows), "deploy's candidates are timed by deploy, not by every bench"

    # 5. --from re-runs a stage and the ones after it, --until stops
    s = stages_line(finish("--config", write_cfg(tmp_path / "p2.yaml", bench=dict(runs=4), **ladder), "--out", out,
                           "--from", "bench", "--until", "bench"))
    assert s == {**{k: "skipped" for k in pipeline.STAGES[:5]}, "bench": "ran"}


def test_sigint_during_training_then_rerun_resumes(tmp_path):
    cfg = write_cfg(tmp_path / "p.yaml", train=dict(epochs=3, ckpt_every=2))
    out = tmp_path / "run"
    p = spawn("--config", cfg, "--out", out, "--until", "train")
    wait_until(lambda: (out / "train/checkpoints/last.pt").exists(), p)
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 130 and "re-run the same command" in text
    assert json.loads((out / "pipeline.json").read_text())["stages"]["train"]["status"] == "running"
    s = stages_line(finish("--config", cfg, "--out", out, "--until", "train"))
    assert s == {"train": "resumed"}
    assert json.loads((out / "train/manifest.json").read_text())["completed"]


def test_a_pipeline_or_a_stage_started_while_another_pipeline_holds_the_folder_refuses(tmp_path):
    cfg = write_cfg(tmp_path / "p.yaml", train=dict(epochs=50, ckpt_every=2))
    out = tmp_path / "run"
    p = spawn("--config", cfg, "--out", out, "--until", "train")
    wait_until(lambda: (out / "train/checkpoints/last.pt").exists(), p)
    try:
        for argv in (["pipeline", "--config", cfg, "--out", out], ["export", out / "train"], ["bench", out, "--out", out / "bench"]):
            r = subprocess.run([sys.executable, "-m", "edgeclr", *map(str, argv)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, (argv, r.stderr)
            assert f"pid {p.pid}" in r.stderr and "edgeclr pipeline" in r.stderr, r.stderr
        assert not (out / "export").exists() and not (out / "bench").exists()
    finally:
        p.kill()
        p.wait()
    assert json.loads((out / "pipeline.json").read_text())["stages"]["train"]["status"] == "running"  # nothing else wrote it


def test_sigterm_during_training_then_changed_options_start_over(tmp_path):
    out = tmp_path / "run"
    p = spawn("--config", write_cfg(tmp_path / "p.yaml", train=dict(epochs=30, ckpt_every=2)), "--out", out, "--until", "train")
    wait_until(lambda: (out / "train/checkpoints/last.pt").exists(), p)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert p.returncode == 143
    # a shorter schedule is another config: the interrupted run is set aside (kept), not resumed
    s = stages_line(finish("--config", write_cfg(tmp_path / "p.yaml", train=dict(epochs=1)), "--out", out, "--until", "train"))
    assert s == {"train": "ran"}
    kept = list((out / ".replaced").iterdir())
    assert len(kept) == 1 and (kept[0] / "checkpoints/last.pt").exists()


def test_pipeline_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"widht": 8}}))
    r = run(["pipeline", "--config", str(bad), "--out", str(tmp_path / "r")], ok=False)
    assert r.exit_code == 2 and "section 'train'" in r.output and "widht" in r.output
    bad.write_text(yaml.safe_dump({"train": [1, 2]}))
    r = run(["pipeline", "--config", str(bad), "--out", str(tmp_path / "r")], ok=False)
    assert r.exit_code == 2 and "mapping" in r.output
    r = run(["pipeline", "--out", str(tmp_path / "r"), "--from", "bench", "--until", "train"], ok=False)
    assert r.exit_code == 2 and "comes after" in r.output
    r = run(["pipeline", "--out", str(tmp_path / "r2"), "--from", "distill"], ok=False)
    assert r.exit_code == 2 and "has not finished" in r.output
    r = run(["pipeline", "--preset", "nope"], ok=False)
    assert r.exit_code == 2


def test_stage_keys_chain_and_ignore_runtime_options():
    a = config.PipelineConfig(out="/tmp/x")
    b = config.PipelineConfig(out="/tmp/x", train={"epochs": 3})
    c = config.PipelineConfig(out="/tmp/x", device="cpu", threads=1)

    def keys(cfg):
        cs, up, out = pipeline.stage_configs(cfg), "", []
        for n in pipeline.STAGES:
            up = pipeline.stage_key(n, cs[n], up)
            out.append(up)
        return out

    ka, kb, kc = keys(a), keys(b), keys(c)
    assert all(x != y for x, y in zip(ka, kb)), "a teacher option changes every downstream key"
    assert ka == kc, "device and threads do not change what a stage produces"
    assert config.PipelineConfig().out == "runs/demo" and config.PipelineConfig(preset="fashion-mnist").data == "fashion-mnist"


def test_an_option_added_later_keeps_the_keys_of_finished_runs_at_its_old_behaviour():
    """An upgrade must not re-run an existing run folder's finished stages: a new option at the value
    that means what edgeclr did before it existed is left out of the stage's key, and a ladder of one
    student is keyed as the single student was."""
    import dataclasses

    cs = pipeline.stage_configs(config.PipelineConfig(out="/tmp/x", students="none"))
    before = config.to_dict(cs["train"])
    before.pop("fit_minutes")
    assert pipeline.stage_key("train", cs["train"], "") == pipeline.stage_key("train", before, "")
    assert pipeline.stage_key("train", dataclasses.replace(cs["train"], fit_minutes=3.0), "") != \
        pipeline.stage_key("train", cs["train"], "")
    (student,) = cs["distill"]
    assert pipeline.stage_key("distill", cs["distill"], "u") == pipeline.stage_key("distill", student, "u")


@pytest.mark.parametrize("preset", sorted(config.PIPELINE_PRESETS))
def test_every_preset_builds_its_stage_configs(preset, tmp_path):
    cs = pipeline.stage_configs(config.PipelineConfig(preset=preset, out=str(tmp_path)))
    assert cs["train"].data == config.PIPELINE_PRESETS[preset]["data"]
    first = next(c for c in cs["distill"] if c.out == str(tmp_path))  # the distill section's student, in RUN/distill
    assert all(c.teacher.endswith("train") for c in cs["distill"]) and cs["compress"].student.endswith("distill")
    assert {config.family(c.model) for c in cs["distill"]} == {"resnet", "mobilenet"}, "the auto ladder has both families"
    also = cs["deploy"].also.split(",")
    assert sorted(also) == sorted(c.out for c in cs["distill"] if c is not first) and all("/students/" in a for a in also)
    if preset == "fashion-mnist":  # the x86 benchmark student: dense convolutions that gain from INT8 (issue 6)
        assert (first.model, first.width, first.stem_stride) == ("resnet18", 16, 2)


def test_the_auto_ladder_follows_the_teacher_width_and_the_input_size(tmp_path):
    """Two ResNet-10 widths relative to the teacher's, MobileNetV3-Small, and Large from 64 px; the
    distill section's student always runs; each family smallest first; other families lose their
    ResNet-only options."""
    def ladder(data, spec="auto", **primary):
        return [(r.name, r.options.get("model"), r.options.get("width"), r.options.get("last_stride"))
                for r in config.student_ladder(spec, primary, config.TrainConfig(data=data))]

    # H&E tiles: a ResNet-18 of width 64 at 64 px; the reserve, ResNet-10 at three quarters of it, last
    assert ladder("tiles:x.png", model="resnet10", width=16) == [
        ("", "resnet10", 16, None), ("resnet10-w32", "resnet10", 32, None),
        ("mobilenet_v3_small_minimal", "mobilenet_v3_small_minimal", None, None),
        ("mobilenet_v3_large_minimal", "mobilenet_v3_large_minimal", None, None), ("resnet10-w48", "resnet10", 48, None)]
    assert [r.reserve for r in config.student_ladder("auto", {"model": "resnet10", "width": 16},
                                                     config.TrainConfig(data="tiles:x.png"))] == [False] * 4 + [True]
    assert ladder("tiles:x.png", "resnet10@32", model="resnet10", width=16)[-1][0] == "resnet10-w32", "a named list: no reserve"
    # Fashion-MNIST: a width-16 teacher at 28 px, whose own student is a ResNet-18 w16 with last stride 1
    assert ladder("fashion-mnist", model="resnet18", width=16, last_stride=1) == [
        ("resnet10-w8", "resnet10", 8, 1), ("resnet10-w16", "resnet10", 16, 1), ("", "resnet18", 16, 1),
        ("mobilenet_v3_small_minimal", "mobilenet_v3_small_minimal", None, None)]
    assert ladder("digits", "none", model="resnet10", width=16) == [("", "resnet10", 16, None)]
    assert ladder("digits", "mobilenet_v2,resnet10@8", model="resnet10", width=16) == [
        ("resnet10-w8", "resnet10", 8, None), ("", "resnet10", 16, None), ("mobilenet_v2", "mobilenet_v2", None, None)]
    for bad, why in (("resnet10@x", "@WIDTH"), ("mobilenet_v2@8", "@WIDTH"), ("resnet10@4", "multiple of 8"),
                     ("resnet10,,", "empty entry")):
        with pytest.raises(config.ConfigError, match=why):
            config.PipelineConfig(students=bad)
    r = run(["pipeline", "--students", "resnet99", "--out", str(tmp_path / "run")], ok=False)
    assert r.exit_code == 2 and "resnet99 is not a model" in r.output and not (tmp_path / "run" / "train").exists()


def test_new_training_images_change_the_train_key(tmp_path):
    import numpy as np

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(d / f"{i}.png")
    cfg = config.PipelineConfig(data=str(d), out=str(tmp_path / "run"), train={"input_size": 16})
    before = pipeline.data_fingerprint(pipeline.stage_configs(cfg)["train"])
    assert before == pipeline.data_fingerprint(pipeline.stage_configs(cfg)["train"])
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(d / "new.png")
    assert pipeline.data_fingerprint(pipeline.stage_configs(cfg)["train"]) != before


def test_under_minutes_a_stage_gets_its_share_of_the_time_left_and_the_ladder_one_pool():
    """--minutes: a stage's share is of the time still left when it starts (what the teacher did not
    use goes on); within the distill stage the students' share is one pool, and a student that finds it
    spent is skipped and says why."""
    cs = pipeline.stage_configs(config.PipelineConfig(out="/tmp/x", minutes=10))
    c, given = pipeline.passed_on("train", cs["train"], 600)
    assert given == 4.5 and c.fit_minutes == 4.5 and cs["train"].fit_minutes == 4.5
    _, on_plan = pipeline.passed_on("distill", cs["distill"], 330)  # the teacher took its 4.5 minutes
    assert on_plan == 2.5
    ds, early = pipeline.passed_on("distill", cs["distill"], 480)  # the teacher took 2 of its 4.5
    assert early == round(8 * 0.25 / 0.55, 3) and sum(x.fit_minutes for x in ds) == pytest.approx(early, abs=0.01)
    dep, _ = pipeline.passed_on("deploy", cs["deploy"], 120)
    assert dep.search_minutes == round(2 * 0.10 / 0.20, 3)


def test_the_ladder_spends_one_pool_under_minutes(tmp_path, monkeypatch):
    """Under --minutes the largest student of the first family runs first and may take the whole
    students' share; the others follow, each fitted to what is left over the students still to run;
    once the pool is spent a later one is skipped with the reason (the distill section's own student
    always runs). The summary keeps the ladder's order."""
    cs = pipeline.stage_configs(config.PipelineConfig(out=str(tmp_path), minutes=6,
                                                      students="resnet10@24,mobilenet_v3_small_minimal"))
    ds, pool = pipeline.passed_on("distill", cs["distill"], 6 * 60 * 0.55)
    assert pool == 1.5 and [pipeline._rung_name(c) for c in ds] == ["distill", "resnet10-w24", "mobilenet_v3_small_minimal"]
    given, clock = [], [1000.0]

    def fake_training(name, c, resume):
        given.append((pipeline._rung_name(c), c.fit_minutes))
        clock[0] += 60 * c.fit_minutes * (0.5 if len(given) == 1 else 1.6)  # the first takes half its part, the next overruns
        return {"topk_overlap": 0.1}

    monkeypatch.setattr(pipeline, "_run_training", fake_training)
    monkeypatch.setattr(pipeline.time, "time", lambda: clock[0])
    rows = pipeline._run_ladder(ds, False, cs["deploy"], pool)["ladder"]
    assert given == [("resnet10-w24", 1.5), ("distill", 0.375)]  # all 90 s offered, 45 taken; then 45 s over two
    assert [r["student"] for r in rows] == ["distill", "resnet10-w24", "mobilenet_v3_small_minimal"]
    assert "spent" in rows[2]["skipped"] and rows[0]["meets_budget"] is False


def test_the_reserve_student_runs_only_when_no_student_meets_the_budget(tmp_path, monkeypatch):
    """The auto ladder's reserve (a wider ResNet-10) is distilled only when every student before it was
    measured and none met deploy's budget; it is never the first under --minutes; the summary and the
    report's Students table name it."""
    from edgeclr import report

    cs = pipeline.stage_configs(config.PipelineConfig(out=str(tmp_path), data="tiles:x.png"))
    assert cs["reserve"] == {"resnet10-w48"} and pipeline._rung_name(cs["distill"][-1]) == "resnet10-w48"
    given, overlaps = [], {}

    def fake_training(name, c, resume):
        given.append(pipeline._rung_name(c))
        return {"topk_overlap": overlaps.get(pipeline._rung_name(c), 0.4)}

    monkeypatch.setattr(pipeline, "_run_training", fake_training)
    for met, ran in (({}, True), ({"mobilenet_v3_small_minimal": 0.6}, False)):
        given.clear()
        overlaps.clear()
        overlaps.update(met)
        rows = pipeline._run_ladder(cs["distill"], False, cs["deploy"], None, cs["reserve"])["ladder"]
        assert ("resnet10-w48" in given) is ran and rows[-1]["reserve"] and rows[-1]["student"] == "resnet10-w48"
        assert ("skipped" in rows[-1]) is not ran
        if not ran:
            assert rows[-1]["skipped"] == "a student before it meets the budget"
    table = report.students_table(rows, labeled=False)
    assert "`students/resnet10-w48/` (reserve)" in table and "skipped: a student before it meets the budget" in table
    # deploy ranks by latency: nothing to meet, the reserve does not run
    given.clear()
    dep = dataclasses.replace(cs["deploy"], max_latency_ms=1.0)
    rows = pipeline._run_ladder(cs["distill"], False, dep, None, cs["reserve"])["ladder"]
    assert "resnet10-w48" not in given and "measured against the budget" in rows[-1]["skipped"]
    # under --minutes the half-width student is secured first, not the reserve
    monkeypatch.setattr(pipeline, "_run_training", lambda name, c, resume: given.append(pipeline._rung_name(c)) or {})
    given.clear()
    pipeline._run_ladder(cs["distill"], False, cs["deploy"], 2.0, cs["reserve"])
    assert given[0] == "resnet10-w32"


def test_compress_prunes_the_smallest_student_within_the_budget(tmp_path):
    """From pipeline.json's ladder: the smallest student (by parameters) that met deploy's budget;
    the distill section's student when none did, or when the config names another student."""
    cfg = pipeline.stage_configs(config.PipelineConfig(out=str(tmp_path)))["compress"]

    def ladder(*rows):
        (tmp_path / "pipeline.json").write_text(json.dumps({"stages": {"distill": {"summary": {"ladder": [
            {"student": n, "meets_budget": ok, "parameters": p} for n, ok, p in rows]}}}}))
        return Path(pipeline.compress_target(cfg).student)

    assert ladder(("resnet10-w8", True, 1e5), ("distill", True, 4e5), ("mobilenet_v3_small_minimal", True, 7e5)) == \
        tmp_path / "students" / "resnet10-w8" / "distill"
    assert ladder(("resnet10-w8", False, 1e5), ("distill", True, 4e5), ("resnet10-w32", True, 1.4e6)) == tmp_path / "distill"
    assert ladder(("distill", False, 4e5), ("resnet10-w32", True, 1.4e6)) == tmp_path / "students" / "resnet10-w32" / "distill"
    assert ladder(("distill", False, 4e5), ("resnet10-w32", False, 1.4e6)) == tmp_path / "distill"  # none met: as before
    (tmp_path / "pipeline.json").unlink()
    assert Path(pipeline.compress_target(cfg).student) == tmp_path / "distill"
    named = dataclasses.replace(cfg, student=str(tmp_path / "mine"))
    assert pipeline.compress_target(named) is named


def test_unlabeled_folder_runs_every_stage(tmp_path):
    """The common case: a folder of unlabeled tiles (here cut from scikit-image's stained tissue image)."""
    skdata = pytest.importorskip("skimage.data")
    img = skdata.immunohistochemistry()  # (512, 512, 3) uint8
    d = tmp_path / "tiles"
    d.mkdir()
    for i in range(0, 512 - 32, 48):
        for j in range(0, 512 - 32, 48):
            Image.fromarray(img[i:i + 32, j:j + 32]).save(d / f"t{i}_{j}.png")
    cfg = write_cfg(tmp_path / "p.yaml", train=dict(input_size=16, stem_stride=1, batch_size=32),
                    distill=dict(batch_size=32), deploy=dict(search_minutes=0.1))
    out = tmp_path / "run"
    text = finish("--config", cfg, "--data", d, "--out", out, "--minutes", 2)
    assert set(stages_line(text).values()) == {"ran"}
    state = json.loads((out / "pipeline.json").read_text())
    st = state["stages"]
    assert st["eval"]["summary"] == {"no_labels": True}
    # --minutes 2: each training stage's schedule fitted to its share, and the report says how the time went
    # deploy's own search_minutes (0.1) wins over its share, in the plan and in the run
    assert state["budget"]["plan_minutes"] == {"train": 0.9, "distill": 0.5, "compress": 0.2, "deploy": 0.1, "rest": 0.3}
    assert 0 < state["budget"]["took_minutes"] and "--minutes 2: the teacher's schedule is fitted to 0.9 min" in text
    fitted = json.loads((out / "train/manifest.json").read_text())["fitted"]
    assert 50 <= fitted["budget_s"] <= 54 and fitted["epochs"] == 1 and fitted["step_s"] > 0
    # the teacher took seconds of its 0.9 minutes: the rest went on to the later stages, each its share of what was left
    given = state["budget"]["given_minutes"]
    assert given["distill"] > 0.6 and given["compress"] > 0.2
    # a stage's own value in the config file wins over its share
    assert "deploy" not in given and yaml.safe_load((out / "deploy/config.yaml").read_text())["search_minutes"] == 0.1
    assert json.loads((out / "distill/manifest.json").read_text())["fitted"]["budget_s"] == pytest.approx(60 * given["distill"], abs=0.1)
    assert "Budget (--minutes 2); the run took" in (out / "report.md").read_text()
    assert (out / "compress/models/int8.onnx").exists() and (out / "report.html").exists()
    sel = json.loads((out / "deploy/selection.json").read_text())
    assert not sel["labeled"] and f"top-10 neighbour overlap with the teacher >= {config.DeployConfig().min_overlap}" in sel["rule_text"]
    assert "Deployment" in (out / "report.md").read_text() and list((out / "deploy").glob("model.*"))
    assert set(stages_line(finish("--config", cfg, "--data", d, "--out", out, "--minutes", 2)).values()) == {"skipped"}


def test_a_stained_tissue_image_as_tiles_runs_to_the_end_calibrating_on_the_tiles_it_has(tmp_path):
    """`--data tiles:IMAGE` on a 512x512 stained-tissue image: 59 tiles, fewer than the 300
    calibration images asked for; INT8 calibrates on what there is instead of stopping after training.
    At the demo's 64 px and student, on 2 threads, the first pruning step leaves a strided 1x1
    convolution with 8 input channels and the recovery trains it on batches of 59: oneDNN issue 6035
    killed compress here with "double free or corruption" on an AVX-512 Xeon until edgeclr.engine.set_layout."""
    skdata = pytest.importorskip("skimage.data")
    image = tmp_path / "ihc.png"
    Image.fromarray(skdata.immunohistochemistry()).save(image)
    cfg = write_cfg(tmp_path / "p.yaml", train=dict(batch_size=64), distill=dict(batch_size=64),
                    compress=dict(calib_images=300, threads=2), deploy=dict(calib_images=300))
    out = tmp_path / "run"
    text = finish("--config", cfg, "--data", f"tiles:{image}", "--out", out)
    assert set(stages_line(text).values()) == {"ran"}
    assert "strided 1x1 convolution(s) with fewer than 16 input channels run in NCHW" in text  # the shape that crashed
    assert "INT8 calibration on the 59 readable image(s)" in text
    sel = json.loads((out / "deploy/selection.json").read_text())
    assert sel["winner"] and any(c["variant"] == "int8" for c in sel["candidates"])
    assert text.count("-> 59 tiles") <= 1, "the tiling line is logged once per run, not per stage"


def test_too_few_images_for_int8_fail_before_training(tmp_path):
    d = tmp_path / "few"
    d.mkdir()
    for i in range(10):
        Image.new("L", (16, 16), 20 * i).save(d / f"{i}.png")
    r = run(["pipeline", "--config", str(write_cfg(tmp_path / "p.yaml")), "--data", str(d), "--out", str(tmp_path / "run")],
            ok=False)
    assert r.exit_code == 2 and "has 10 training image(s); INT8 calibration in compress and deploy needs at least 32" in r.output
    assert "nothing was trained" in r.output and not (tmp_path / "run" / "train").exists()


def test_the_label_efficiency_levels_fit_the_smallest_labelled_class_before_training(image_folder, tmp_path, caplog):
    cfg = config.build(config.PipelineConfig, None, data=str(image_folder), out=str(tmp_path / "run"),
                       eval={"label_efficiency": "1,5,10,100"})
    configs = pipeline.stage_configs(cfg)
    pipeline.preflight(configs, pipeline.STAGES)
    from edgeclr.loading import open_like_run

    tc = configs["train"]
    ds = open_like_run(tc.data, "train", tc.input_size, vars(tc), tc.seed)
    smallest = int(np.bincount(ds.labels).min())
    assert configs["eval"].levels() == [n for n in (1, 5, 10, 100) if n <= smallest] and 1 <= smallest < 100
    assert "the smallest class" in caplog.text and "(asked: 1,5,10,100)" in caplog.text
    # unlabeled images: no curve
    d = tmp_path / "flat"
    d.mkdir()
    for i in range(8):
        Image.fromarray(np.full((12, 12), i * 20, np.uint8)).save(d / f"{i}.png")
    configs = pipeline.stage_configs(config.build(config.PipelineConfig, None, data=str(d), out=str(tmp_path / "r2"),
                                                  compress={"int8": False}, deploy={"int8": False}))
    assert pipeline._fit_label_levels(configs["eval"], configs["train"]).label_efficiency == ""


@pytest.mark.parametrize("fault,signame", [("abort", "SIGABRT"), ("segv", "SIGSEGV")])
def test_a_native_crash_in_a_stage_is_one_line_naming_stage_signal_and_resume(tmp_path, fault, signame):
    """What glibc's "double free or corruption" abort or a kernel's segfault does to a stage: no
    Python error handling runs, yet the user reads which stage died, from what, and how to go on."""
    cfg, out = write_cfg(tmp_path / "p.yaml"), tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore", EDGECLR_FAULT=f"{fault}:stage=distill:step=4")
    p = subprocess.run([sys.executable, "-m", "edgeclr", "pipeline", "--config", str(cfg), "--out", str(out), "--until",
                        "distill"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -getattr(signal, signame)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert lines == [f"error: edgeclr pipeline: the distill stage died from {signame} (a crash inside a native library, not a "
                     f"Python error; traceback: {out / 'crash.log'}). {out} keeps every finished step and the last checkpoint: "
                     "re-run the same command to resume distill"], p.stderr[-2000:]
    assert "Fatal Python error" in (out / "crash.log").read_text() and "Fatal Python error" not in p.stderr
    s = stages_line(finish("--config", cfg, "--out", out, "--until", "distill"))
    assert s == {"train": "skipped", "distill": "resumed"}


def test_deploy_builds_the_ladder_students_that_met_the_budget(tmp_path):
    """A ladder student that missed deploy's budget at the end of its distillation is not built for
    deploy (its INT8 files could only lose more); one that was skipped has no folder."""
    rungs = {}
    for name, overlap in (("narrow", 0.3), ("wide", 0.7), ("skipped", None)):
        d = tmp_path / "students" / name
        rungs[name] = str(d)
        if overlap is not None:
            (d / "distill/checkpoints").mkdir(parents=True)
            (d / "distill/checkpoints/last.pt").write_bytes(b"")
            (d / "distill/manifest.json").write_text(json.dumps({"metrics": {"topk_overlap": overlap}}))
    c = config.DeployConfig(run=str(tmp_path), also=",".join(rungs.values()), min_overlap=0.5)
    assert pipeline._distilled_also(c).also == rungs["wide"]
    assert pipeline._distilled_also(dataclasses.replace(c, min_overlap=0.2)).also == f"{rungs['narrow']},{rungs['wide']}"
