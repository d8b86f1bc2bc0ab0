"""Fault campaign, the long part of the reliability suite (issue 9; the fast part is tests/faults/).

For every stage that trains (train, distill, compress's recovery) and for the whole pipeline,
inject faults at many steps through the EDGECLR_FAULT hook (edgeclr/faults.py) in real
processes: SIGKILL (a power cut), SIGTERM (a preemption), SIGINT (Ctrl-C), a NaN loss; then run
the same command again (with --resume where the stage takes it) and check:

- survived: the re-run completes (exit 0);
- nothing half-written: no temp files, every checkpoint loads, the manifest parses;
- no data lost: the final weights equal an uninterrupted run's (train, distill: exact resume,
  tolerance 1e-6), a NaN never reaches a checkpoint, the pipeline's report and exports exist
  and load.

Overlapping runs (edgeclr.lock): a second command writing the same output while the first runs
must refuse at once (exit 2, naming the holder) and change nothing; the first must finish with the
same result as if alone; and once the first is SIGKILLed, the second must run (no stale lock).

    python benchmarks/fault_campaign.py                 # every family, ~35 min on 2 cores
    python benchmarks/fault_campaign.py --quick         # a few points per stage
    python benchmarks/fault_campaign.py --only overlap  # one family: faults | overlap

Writes benchmarks/results/fault_campaign/latest.{json,md}: counts injected / survived / lost.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, record_path  # noqa: E402

from edgeclr import checkpoint  # noqa: E402

HERE = Path(__file__).parent
TAG = ""
TRAIN = ["--data", "digits", "--width", "8", "--stem-stride", "1", "--input-size", "16", "--batch-size", "64", "--epochs", "3",
         "--knn-every", "0", "--no-tensorboard", "--threads", "1", "--warmup-epochs", "0.5", "--ckpt-every", "5", "--no-progress"]
DISTILL = ["--epochs", "2", "--batch-size", "64", "--knn-every", "0", "--no-tensorboard", "--threads", "1", "--ckpt-every", "4",
           "--bn-recalibrate", "0", "--no-progress"]
PIPELINE = dict(preset="demo",
                train=dict(width=8, epochs=1, batch_size=128, knn_every=0, threads=1, tensorboard=False),
                distill=dict(epochs=2, knn_every=0, ckpt_every=3, threads=1, tensorboard=False),
                compress=dict(recover_epochs=1, calib_images=32, latency_runs=3, eval_images=300, formats="onnx",
                              tensorboard=False),
                export=dict(formats="onnx", check_images=4),
                eval=dict(latency_runs=3, linear_probe=False, max_train=300, baselines="pixels", tsne=False),
                bench=dict(rounds=1, runs=3, warmup=0.05, formats="onnx"))


def edgeclr(args, fault: str | None = None, timeout=900):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("EDGECLR_FAULT", None)
    if fault:
        env["EDGECLR_FAULT"] = fault
    p = subprocess.run([sys.executable, "-m", "edgeclr", *args], capture_output=True, text=True, env=env, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def intact(stage_dir: Path) -> list[str]:
    """Problems with what a stage left on disk: temp files, unreadable checkpoints or manifest."""
    bad = []
    for p in stage_dir.rglob("*"):
        if p.name.endswith(".tmp") or p.name.startswith(".last.pt."):
            bad.append(f"temp file left: {p}")
        if p.suffix == ".pt" and p.parent.name == "checkpoints":
            try:
                ck = checkpoint.load(p)
                if not all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()):
                    bad.append(f"non-finite weights in {p}")
            except checkpoint.CheckpointError as e:
                bad.append(str(e)[:200])
    m = stage_dir / "manifest.json"
    if m.exists():
        try:
            json.loads(m.read_text())
        except ValueError:
            bad.append(f"corrupt {m}")
    return bad


def same_weights(a: Path, b: Path, key="model", atol=1e-6) -> bool:
    wa, wb = checkpoint.load(a)[key], checkpoint.load(b)[key]
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k].float(), wb[k].float(), atol=atol, rtol=0) for k in wa)


def stage_case(cmd: list[str], stage: str, out: Path, ref: Path | None, fault: str, expect_rc: set[int]) -> dict:
    """Inject `fault` into `cmd --out out`, then re-run (resume when a checkpoint exists), then check."""
    t0 = time.time()
    rc1, log1 = edgeclr([*cmd, "--out", str(out)], fault)
    sdir = out / stage
    problems = [f"first run exit {rc1}, expected {sorted(expect_rc)}: {log1[-300:]}"] if rc1 not in expect_rc else []
    problems += intact(sdir) if sdir.exists() else []
    ck_dir = sdir / "checkpoints"
    resume = ck_dir.exists() and any(ck_dir.glob("*.pt"))  # last.pt, last.prev.pt, or compress's prune.pt (work in progress)
    rc2, log2 = edgeclr([*cmd, "--out", str(out)] + (["--resume"] if resume else []))
    survived = rc2 == 0
    if not survived:
        problems.append(f"re-run exit {rc2}: {log2[-300:]}")
    else:
        problems += intact(sdir)
        if ref is not None and not same_weights(ref / stage / "checkpoints" / "last.pt", ck_dir / "last.pt"):
            problems.append("final weights differ from the uninterrupted run")
    return {"stage": stage, "fault": fault, "first_exit": rc1, "resumed": resume, "survived": survived,
            "lost": bool(survived and problems), "problems": problems, "seconds": round(time.time() - t0, 1)}


def skip_case(cmd: list[str], stage: str, out: Path, fault: str) -> dict:
    """A non-finite batch or loss under --nonfinite skip: the run completes in one go, the step is
    skipped (counted once), and nothing non-finite reaches a checkpoint (weights, BN statistics, queue)."""
    t0 = time.time()
    rc, log = edgeclr([*cmd, "--nonfinite", "skip", "--out", str(out)], fault)
    survived = rc == 0
    problems = [] if survived else [f"exit {rc}: {log[-300:]}"]
    if survived:
        problems += intact(out / stage)
        ck = checkpoint.load(out / stage / "checkpoints" / "last.pt")
        if ck.get("nonfinite_skipped") != 1:
            problems.append(f"skipped steps recorded: {ck.get('nonfinite_skipped')}, expected 1")
        if "queue" in ck and not torch.isfinite(ck["queue"]["buf"]).all():
            problems.append("non-finite teacher embeddings in the distillation queue")
    return {"stage": stage, "fault": fault + " (--nonfinite skip)", "first_exit": rc, "resumed": False, "survived": survived,
            "lost": bool(survived and problems), "problems": problems, "seconds": round(time.time() - t0, 1)}


def pipeline_case(root: Path, fault: str) -> dict:
    t0 = time.time()
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(PIPELINE))
    out = root / "run"
    rc1, log1 = edgeclr(["pipeline", "--config", str(cfg), "--out", str(out)], fault)
    problems = [] if rc1 != 0 else ["the fault did not fire (first run finished)"]
    rc2, log2 = edgeclr(["pipeline", "--config", str(cfg), "--out", str(out)])
    survived = rc2 == 0
    if survived:
        for s in ("train", "distill", "compress"):
            problems += intact(out / s)
        state = json.loads((out / "pipeline.json").read_text())
        if not all(v["status"] == "done" for v in state["stages"].values()):
            problems.append(f"stages not done: {state['stages']}")
        for f in ("report.md", "report.html", "compare.md"):
            if not (out / f).exists():
                problems.append(f"missing {f}")
        import onnx

        for f in (out / "compress").glob("*.onnx"):
            try:
                onnx.checker.check_model(onnx.load(str(f)))
            except Exception as e:  # noqa: BLE001
                problems.append(f"{f}: {e}")
    else:
        problems.append(f"re-run exit {rc2}: {log2[-300:]}")
    return {"stage": "pipeline", "fault": fault, "first_exit": rc1, "resumed": True, "survived": survived,
            "lost": bool(survived and problems), "problems": problems, "seconds": round(time.time() - t0, 1)}


def _wait(path: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    t = time.time()
    while not path.exists():
        if proc.poll() is not None or time.time() - t > timeout:
            return False
        time.sleep(0.01)
    return True


def _snapshot(folder: Path) -> dict:
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*") if f.is_file()}


def overlap_case(cmd: list[str], stage: str, out: Path, started: Path, check, kill_first: bool) -> dict:
    """Run `cmd` (A); once `started` exists, run the same command again (B, with --resume where A left a
    checkpoint). Without kill_first: B must exit 2 naming A, change nothing, and A must finish intact
    (`check(out) -> problems`). With kill_first: A is SIGKILLed first, and B must then run to the end."""
    t0 = time.time()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    a = subprocess.Popen([sys.executable, "-m", "edgeclr", *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    problems = [] if _wait(started, a) else [f"{started} never appeared (first run exit {a.poll()})"]
    resume = ["--resume"] if stage in ("train", "distill") else []
    if kill_first:
        a.kill()
        a.wait()
        rc2, log2 = edgeclr([*cmd, *resume])
        if rc2 != 0:
            problems.append(f"after a SIGKILL of the first run, the second exited {rc2}: {log2[-300:]}")
        rc1 = -9
    else:
        a.send_signal(19)  # SIGSTOP: the folder holds still while the second is refused
        before = _snapshot(out)
        rc2, log2 = edgeclr([*cmd, *resume])
        if _snapshot(out) != before:
            problems.append("the refused run changed the output")
        a.send_signal(18)  # SIGCONT
        rc1 = a.wait(timeout=900)
        if rc2 != 2 or f"pid {a.pid}" not in log2 or "being written by another edgeclr process" not in log2:
            problems.append(f"second run: exit {rc2}, expected 2 naming pid {a.pid}: {log2[-300:]}")
        if rc1 != 0:
            problems.append(f"the first run exited {rc1}: {a.stdout.read()[-300:]}")
    survived = (rc2 == 0) if kill_first else (rc1 == 0)
    if survived:
        problems += check(out)
    return {"stage": stage, "fault": "overlap" + (" after kill" if kill_first else ""), "first_exit": rc1, "resumed": kill_first,
            "survived": survived, "lost": bool(survived and problems), "problems": problems, "seconds": round(time.time() - t0, 1)}


def overlap_family(root: Path, ref: Path, quick: bool) -> list[dict]:
    """Two writers of one output: train, distill, compress, pipeline and embed."""
    cases = []

    def weights_check(stage):
        def check(out):
            bad = intact(out / stage)
            if not bad and not same_weights(ref / stage / "checkpoints" / "last.pt", out / stage / "checkpoints" / "last.pt"):
                bad.append("final weights differ from the uninterrupted run")
            return bad
        return check

    for kill in (False, True):
        out = root / f"overlap-train-{kill}"
        cases.append(overlap_case(["train", *TRAIN, "--out", str(out)], "train", out, out / "train/checkpoints/last.pt",
                                  weights_check("train"), kill))
        out = root / f"overlap-distill-{kill}"
        cases.append(overlap_case(["distill", "--teacher", str(ref), *DISTILL, "--out", str(out)], "distill", out,
                                  out / "distill/checkpoints/last.pt", weights_check("distill"), kill))
    out = root / "overlap-compress"
    cases.append(overlap_case(["compress", str(ref / "distill"), "--recover-epochs", "1", "--formats", "onnx", "--calib-images", "32",
                               "--latency-runs", "3", "--eval-images", "300", "--no-progress", "--no-tensorboard", "--out", str(out)],
                              "compress", out, out / "compress/checkpoints/prune.pt",
                              lambda o: intact(o / "compress") + ([] if (o / "compress/models/int8.onnx").exists() else ["no INT8 model"]),
                              False))
    proot = root / "overlap-pipeline"
    proot.mkdir(parents=True, exist_ok=True)
    cfg = proot / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(PIPELINE))

    def pipeline_check(out):
        state = json.loads((out / "pipeline.json").read_text())
        bad = [] if all(v["status"] == "done" for v in state["stages"].values()) else [f"stages not done: {state['stages']}"]
        return bad + [f"missing {f}" for f in ("report.md", "report.html", "compare.md") if not (out / f).exists()]

    for kill in ([False] if quick else [False, True]):
        out = proot / f"run-{kill}"
        cases.append(overlap_case(["pipeline", "--config", str(cfg), "--out", str(out)], "pipeline", out, out / "train/checkpoints/last.pt",
                                  pipeline_check, kill))
    rc, log = edgeclr(["export", str(ref / "train"), "--out", str(root / "model"), "--check-images", "4"])
    assert rc == 0, log
    imgs = root / "images"
    imgs.mkdir(exist_ok=True)
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(600):
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(imgs / f"{i:03d}.png")

    def embed_check(out):
        ids = (out / "emb.ids.txt").read_text().splitlines()
        return [] if len(ids) == len(set(ids)) == 600 and np.load(out / "emb.npy").shape[0] == 600 else [f"{len(ids)} ids, {len(set(ids))} unique"]

    for kill in (False, True):
        out = root / f"overlap-embed-{kill}"
        out.mkdir(exist_ok=True)
        cases.append(overlap_case(["embed", str(imgs), "--model", str(root / "model" / "model.onnx"), "--out", str(out / "emb.npy"),
                                   "--batch-size", "4"], "embed", out, out / "emb.partial.ids.txt", embed_check, kill))
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default="", help="folder for the runs (default: a temp folder)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random fault points")
    ap.add_argument("--only", choices=("faults", "overlap"), help="one family of cases")
    a = ap.parse_args()
    global TAG
    TAG = a.only or ""  # one family's record beside the whole campaign's (latest)
    root = Path(a.work or tempfile.mkdtemp(prefix="edgeclr-faults-"))
    cases = []

    def record(case: dict) -> None:  # printed and written as it comes: a campaign cut short keeps its counts
        cases.append(case)
        print(json.dumps(case), flush=True)
        write_results(cases)

    # uninterrupted references
    ref = root / "ref"
    rc, log = edgeclr(["train", *TRAIN, "--out", str(ref)])
    assert rc == 0, log
    rc, log = edgeclr(["distill", "--teacher", str(ref), *DISTILL, "--out", str(ref)])
    assert rc == 0, log
    steps = checkpoint.load(ref / "train" / "checkpoints" / "last.pt")["global_step"]  # 66
    dsteps = checkpoint.load(ref / "distill" / "checkpoints" / "last.pt")["global_step"]  # 44
    if a.only != "faults":
        for case in overlap_family(root, ref, a.quick):
            record(case)
    if a.only == "overlap":
        write_results(cases, final=True)
        return

    # boundary points (first step, a checkpoint step and the one after it, an epoch end) plus random ones
    rng = np.random.default_rng(a.seed)

    def points(boundary, total, k):
        extra = rng.choice(np.setdiff1d(np.arange(1, total), boundary), k, replace=False)
        return sorted({int(p) for p in boundary} | {int(p) for p in extra})

    train_points = points([1, 5, 22], steps, 2 if a.quick else 9)
    distill_points = points([1, 4, 22], dsteps, 1 if a.quick else 5)
    for i, s in enumerate(train_points):
        for kind, rcs in (("kill", {-9}), ("term", {143}), ("int", {130})):
            if a.quick and kind != "kill" and i % 2:
                continue
            record(stage_case(["train", *TRAIN], "train", root / f"train-{kind}-{s}", ref, f"{kind}:stage=train:step={s}", rcs))
        if not a.quick or i % 2 == 0:
            record(stage_case(["train", *TRAIN], "train", root / f"train-nan-{s}", ref, f"nan_loss:stage=train:step={s}", {2}))
    for s in distill_points:
        for kind, rcs in (("kill", {-9}), ("term", {143})):
            out = root / f"distill-{kind}-{s}"
            cmd = ["distill", "--teacher", str(ref), *DISTILL]
            record(stage_case(cmd, "distill", out, ref, f"{kind}:stage=distill:step={s}", rcs))
    # a NaN / Inf image in the batch or an Inf loss, skipped (--nonfinite skip) rather than stopping
    for stage, s in ([("train", 7), ("distill", 5)] if a.quick else [("train", 3), ("train", 30), ("distill", 5), ("distill", 30)]):
        for kind in ("nan_batch", "inf_batch", "inf_loss"):
            cmd = ["train", *TRAIN] if stage == "train" else ["distill", "--teacher", str(ref), *DISTILL]
            record(skip_case(cmd, stage, root / f"{stage}-skip-{kind}-{s}", f"{kind}:stage={stage}:step={s}"))
    comp_points = [3] if a.quick else [1, 5, 10]
    for s in comp_points:  # the recovery after pruning (its trainer's stage is "compress")
        out = root / f"compress-kill-{s}"
        cmd = ["compress", str(ref / "distill"), "--recover-epochs", "1", "--formats", "onnx", "--calib-images", "32",
               "--latency-runs", "3", "--eval-images", "300", "--no-progress", "--no-tensorboard"]
        record(stage_case(cmd, "compress", out, None, f"kill:stage=compress:step={s}", {-9}))
    for stage, s in ([("train", 5), ("distill", 6)] if a.quick else [("train", 3), ("train", 10), ("distill", 2), ("distill", 11),
                                                                    ("compress", 4)]):
        for kind in ("kill", "int"):
            record(pipeline_case(root / f"pipeline-{stage}-{kind}-{s}", f"{kind}:stage={stage}:step={s}"))

    write_results(cases, final=True)


def write_results(cases: list[dict], final: bool = False) -> None:
    """benchmarks/results/fault_campaign/latest.{json,md}; written after every case, so that a campaign cut
    short still leaves its counts (marked unfinished)."""
    injected, survived = len(cases), sum(c["survived"] for c in cases)
    lost = sum(c["lost"] for c in cases)
    m = machine()
    cmd = "python benchmarks/fault_campaign.py " + shlex.join(sys.argv[1:])
    result = {"machine": m, "command": cmd, "finished": final, "injected": injected, "survived": survived,
              "lost_or_corrupt": lost, "cases": cases}
    record_path("fault_campaign", TAG, ext="json").write_text(json.dumps(result, indent=2) + "\n")
    by = {}
    for c in cases:
        kind = c["fault"].split(":")[0] + (" (skip)" if "--nonfinite skip" in c["fault"] else "")  # "overlap", "overlap after kill"
        k = (c["stage"], kind)
        b = by.setdefault(k, [0, 0, 0])
        b[0] += 1
        b[1] += c["survived"]
        b[2] += c["lost"]
    lines = ["# Fault campaign" + ("" if final else " (unfinished: still running or cut short)"), "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {m['cpu']} ({m['cores']} cores).", "",
             "```", cmd, "```", "",
             "Each fault is injected in a real process at a chosen global step (EDGECLR_FAULT), then the same command",
             "runs again (with --resume when a checkpoint exists). Survived = the re-run finishes; lost = anything",
             "half-written, unreadable, non-finite, or final weights different from an uninterrupted run (tolerance 1e-6;",
             "train and distill), or a pipeline missing its report, comparison or a valid ONNX export.", "",
             "| stage | fault | injected | survived | lost or corrupt |", "|---|---|---|---|---|"]
    for (stage, kind), (n, s, lo) in by.items():
        lines.append(f"| {stage} | {kind} | {n} | {s} | {lo} |")
    lines += ["", f"**Total: {injected} faults injected, {survived} survived, {lost} with lost or corrupt data.**"]
    bad = [c for c in cases if not c["survived"] or c["lost"]]
    if bad:
        lines += ["", "Failures:", ""] + [f"- {c['stage']} {c['fault']}: {'; '.join(c['problems'])[:300]}" for c in bad]
    record_path("fault_campaign", TAG).write_text("\n".join(lines) + "\n")
    if final:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
