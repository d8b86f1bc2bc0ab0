"""`edgeclr pipeline`: train -> distill -> compress -> export -> eval -> bench -> deploy -> report, in one command.

The stages and their order, outputs and resume rules are edgeclr.stages' table; each stage is the
function its own command runs (train.main, distill.main, ...), writing its own folder of the run
directory. OUT/pipeline.json records, per stage, a key (a hash of the stage's
resolved options and of the keys of the stages before it) and whether it finished:

- a finished stage whose key still matches is skipped;
- an interrupted stage (SIGINT, SIGKILL, a power cut) whose key matches resumes from its checkpoint;
- a stage whose options, inputs (the training images) or upstream stages changed runs again; its old folder is kept under
  OUT/.replaced/ (nothing is deleted).

`--from STAGE` re-runs STAGE and everything after it; `--until STAGE` stops after STAGE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from edgeclr import config, stages
from edgeclr.errors import ConfigError
from edgeclr.lock import hold
from edgeclr.rundir import make_writable_dir, write_json_atomic

log = logging.getLogger("edgeclr.pipeline")

STAGES = stages.NAMES
# options that change how a stage runs, not what it produces: left out of its key
_NOT_IN_KEY = {"resume", "progress", "device", "devices", "threads", "tensorboard", "out", "teacher", "student", "target", "models",
               "run"}
# ... except where they are what the stage measures for: the device's thread count and kind
_IN_KEY = {"bench": {"threads"}, "deploy": {"threads", "target"}}


def stage_main(name: str):
    """The function a stage of the stage table runs, imported when asked for: the CLI's start stays
    torch-free."""
    if name == "train":
        from edgeclr.train import main
    elif name == "distill":
        from edgeclr.distill import main
    elif name == "compress":
        from edgeclr.compress import main
    elif name == "export":
        from edgeclr.export import main
    elif name == "eval":
        from edgeclr.evaluate import main
    elif name == "bench":
        from edgeclr.bench import main
    elif name == "deploy":
        from edgeclr.deploy import main
    elif name == "report":
        from edgeclr.report import write as main
    else:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(STAGES)}")
    return main


def stage_configs(cfg: config.PipelineConfig) -> dict[str, Any]:
    """The config object (or dict) of every stage, from the preset, the file's sections and the
    pipeline's own options."""
    out = Path(cfg.out)
    common = {k: v for k, v in (("device", cfg.device), ("threads", cfg.threads)) if v is not None}
    prog = {} if cfg.progress is None else {"progress": cfg.progress}
    sec = cfg.sections()

    def build(section: str, base: dict | None = None, **fixed):
        values = {**(sec[section] if base is None else base), **fixed}
        return config.from_values(config.stage_config(section), values, f"pipeline section '{section}'")

    exp = dict(sec["export"])
    formats = exp.pop("formats", "onnx,openvino")
    plan = budget_plan(cfg, sec)
    train = build("train", {**plan["train"], **sec["train"]}, data=cfg.data, out=str(out), **common, **prog)
    ladder = config.student_ladder(cfg.students or config.PIPELINE_PRESETS[cfg.preset].get("students", "auto"), sec["distill"],
                                   train)
    per_student = {"fit_minutes": round(plan["distill"]["fit_minutes"] / len(ladder), 3)} if cfg.minutes else {}
    distill = [build("distill", {**per_student, **r.options}, teacher=str(out / "train"), out=str(rung_dir(out, r.name)),
                     **common, **prog) for r in ladder]
    dep = dict(sec["deploy"])
    also = [a for a in str(dep.pop("also", None) or "").split(",") if a]
    also += [str(rung_dir(out, r.name)) for r in ladder if r.name]
    return {
        "train": train,
        "distill": distill,
        "compress": build("compress", {**plan["compress"], **sec["compress"]}, student=str(out / "distill"), out=str(out),
                          **common, **prog),
        "export": [build("export", exp, target=str(out / "train"), format=f, out=str(out / "export"), name="teacher")
                   for f in formats.split(",") if f],
        "eval": build("eval", target=str(out), **common),
        "bench": build("bench", models=(str(out),), out=str(out / "bench")),
        "deploy": build("deploy", {**plan["deploy"], **dep}, run=str(out), out=str(out / "deploy"), also=",".join(also) or None),
        "report": {"out": str(out)},
        "reserve": frozenset(r.name for r in ladder if r.reserve),  # the ladder's reserve rungs (not a stage)
    }


def budget_plan(cfg: config.PipelineConfig, sec: dict) -> dict[str, dict]:
    """--minutes B: {stage: {option: share of B}} by config.BUDGET_SHARES: fit_minutes for the
    training stages, search_minutes for deploy (a stage's own value in the config file wins);
    without --minutes, nothing."""
    if not cfg.minutes:
        return {s: {} for s in config.BUDGET_SHARES}
    return {s: {"search_minutes" if s == "deploy" else "fit_minutes": round(cfg.minutes * share, 3)}
            for s, share in config.BUDGET_SHARES.items()}


def rung_dir(out: Path, name: str) -> Path:
    """Where a student of the ladder is distilled: RUN itself for the distill section's student
    (RUN/distill), RUN/students/NAME (its own distill/) for the others."""
    return out / "students" / name if name else out


# options added after runs were keyed, at the value that means what a run did before they existed: left out
# of the key there, so that an upgraded edgeclr keeps the finished stages of an existing run folder
_SINCE = {"fit_minutes": 0.0}


def _plain(c, stage: str = "") -> Any:
    if isinstance(c, list) and stage == "distill" and len(c) == 1:  # one student: keyed as before the ladder
        return _plain(c[0], stage)
    if isinstance(c, list):
        return [_plain(x, stage) for x in c]
    d = config.to_dict(c) if dataclasses.is_dataclass(c) else dict(c)
    return {k: v for k, v in d.items() if k not in _NOT_IN_KEY - _IN_KEY.get(stage, set()) and (k not in _SINCE or v != _SINCE[k])}


def stage_key(name: str, cfg_obj, upstream: str) -> str:
    blob = json.dumps({"stage": name, "config": _plain(cfg_obj, name), "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def outputs_exist(out: Path, stage: str, st: dict | None = None) -> bool:
    """The files a finished stage leaves (a stage whose files were deleted runs again)."""
    if stage == "eval" and ((st or {}).get("summary") or {}).get("no_labels"):
        return True
    return all((out / f).exists() for f in stages.get(stage).outputs)


def _set_aside(out: Path, stage: str) -> list[str]:
    """Move what a stage wrote to OUT/.replaced/ (nothing is deleted); returns where it went."""
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in stages.get(stage).owned:
        p = out / name
        if p.exists():
            dest = out / ".replaced" / f"{stamp}-{name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), str(dest))
            moved.append(str(dest))
    return moved


class State:
    """OUT/pipeline.json: per stage {key, status: running | done, seconds, summary}; written atomically."""

    def __init__(self, out: Path):
        self.path = out / "pipeline.json"
        self.d = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}, "runs": []}

    def stage(self, name: str) -> dict:
        return self.d["stages"].get(name) or {}

    def set(self, name: str, **kw) -> None:
        self.d["stages"][name] = {**self.stage(name), **kw}
        write_json_atomic(self.d, self.path)

    def save(self) -> None:
        write_json_atomic(self.d, self.path)


# ----------------------------------------------------------------------------------------------
# running one stage: the function its command runs, and a small summary for pipeline.json


def _run_training(name: str, c, resume: bool) -> dict:
    c.resume = resume
    r = stage_main(name)(c)
    if name != "compress" and not r["completed"]:
        raise ConfigError(f"{'training' if name == 'train' else 'distillation'} stopped before its schedule ended "
                          "(--max-minutes): re-run the pipeline to continue")
    if name == "distill":
        return r
    if name == "compress":
        return {k: {m: v for m, v in row.items() if m in ("knn_top1", "retention", "speedup_vs_fp32")}
                for k, row in r["report"].items()}
    return {k: r[k] for k in ("knn_top1", "loss") if k in r}


def _run_eval(c, resume: bool) -> dict:
    main = stage_main("eval")
    out = Path(c.target)
    if not _labeled(out, c):  # accuracy needs labels; agreement is in compress/report.md, speed in bench
        log.warning("eval: %s has no class labels (sub-folders per class): kNN / linear-probe accuracy and the "
                    "retention table are skipped", c.data or "the training data")
        return {"no_labels": True}
    teacher = main(dataclasses.replace(c, target=str(out / "train"), compare=False))
    final = "compress" if (out / "compress" / "checkpoints" / "last.pt").exists() else "distill"
    student = main(dataclasses.replace(c, target=str(out / final), compare=False, baselines="", linear_probe=False,
                                       label_efficiency=""))
    cmp = main(dataclasses.replace(c, compare=True, label_efficiency=""))
    return {"teacher": {r["key"]: r["knn_top1"] for r in teacher["rows"]},
            "student": student["rows"][0]["knn_top1"], "compare_rows": len(cmp["rows"])}


def meets_budget(metrics: dict, d: config.DeployConfig) -> bool | None:
    """Whether a distilled student is within deploy's accuracy budget (kNN points with labels, the
    top-10 neighbour overlap with the teacher without); None: not measured, or deploy ranks by
    --max-latency-ms instead."""
    if d.max_latency_ms is not None:
        return None
    if metrics.get("knn_top1") is not None and metrics.get("teacher_knn_top1") is not None:
        return bool(metrics["teacher_knn_top1"] - metrics["knn_top1"] <= d.max_drop)
    if metrics.get("topk_overlap") is not None:
        return bool(metrics["topk_overlap"] >= d.min_overlap)
    return None


def _rung_name(c: config.DistillConfig) -> str:
    """A ladder student's name: its folder under RUN/students/, or "distill" for the distill section's own."""
    return Path(c.out).name if Path(c.out).parent.name == "students" else "distill"


def _run_ladder(cs: list, resume: bool, deploy: config.DeployConfig, pool_minutes: float | None = None,
                reserve: frozenset = frozenset()) -> dict:
    """Distil every student of the ladder (config.student_ladder's order). The distill section's own
    student always runs; another rung is skipped when a smaller student of its family already meets
    deploy's budget (it would be slower for nothing). A reserve rung (its name in `reserve`) runs only
    when every student before it was measured and none meets the budget. A finished rung is kept on resume.

    Under --minutes the students' share (`pool_minutes`) is one pool, and a student is secured first: the largest
    rung of the first family (the likeliest to meet the budget) may take all of it, up to its own
    schedule; the others follow smallest first, each fitted to what is left over the students still
    to run, so the time of a skipped student, or of one that took less than its part, goes to the
    next. A student that finds the pool spent is skipped and says so."""
    from edgeclr.rundir import read_manifest

    pool = pool_minutes * 60 if pool_minutes else None
    size = [config.student_size(c.model, c.width) for c in cs]
    order = list(range(len(cs)))
    if pool is not None and len(cs) > 1:
        fam0 = config.family(cs[0].model)
        first = max((i for i in order if config.family(cs[i].model) == fam0 and _rung_name(cs[i]) not in reserve),
                    key=lambda i: size[i])
        order = [first] + [i for i in order if i != first]
        log.info("distill: --minutes: %s first, with as much of the students' %.1f min as its schedule takes: the largest "
                 "%s student is the likeliest to meet the budget", _rung_name(cs[first]), pool / 60, fam0)
    rows, fitted, spent = {}, {}, 0.0
    for n, i in enumerate(order):
        c = cs[i]
        out, name = Path(c.out), _rung_name(c)
        fam = config.family(c.model)
        if name != "distill" and fitted.get(fam, size[i]) < size[i]:
            log.info("distill: %s skipped: a smaller %s student already meets the budget", name, fam)
            rows[i] = {"student": name, "family": fam, "skipped": f"a smaller {fam} student meets the budget"}
            continue
        if name in reserve and (fitted or not any(r.get("meets_budget") is False for r in rows.values())):
            why = ("a student before it meets the budget" if fitted else
                   "no student before it was measured against the budget")
            log.info("distill: %s (the reserve) skipped: %s", name, why)
            rows[i] = {"student": name, "family": fam, "reserve": True, "skipped": why}
            continue
        if name in reserve:
            log.info("distill: no student meets deploy's budget: distilling the reserve, %s", name)
        man = read_manifest(out / "distill") if resume else {}
        t0 = time.time()
        if pool is not None and not man.get("completed"):
            share = (pool - spent) / (1 if n == 0 else len(order) - n)
            if share < MIN_RUNG_SECONDS and name != "distill":
                why = f"the students' share of --minutes is spent ({spent / 60:.1f} of {pool / 60:.1f} min)"
                log.info("distill: %s skipped: %s", name, why)
                rows[i] = {"student": name, "family": fam, "skipped": why}
                continue
            c = dataclasses.replace(c, fit_minutes=round(max(share, MIN_RUNG_SECONDS) / 60, 3))
        if man.get("completed"):
            m, seconds = dict(man.get("metrics") or {}), man.get("wall_time_s")
            log.info("distill: %s finished earlier, kept", name)
        else:
            m = _run_training("distill", c, resume and _has_checkpoint(out / "distill"))
            seconds = time.time() - t0
            man = read_manifest(out / "distill")
        spent += seconds or 0.0
        ok = meets_budget(m, deploy)
        if ok:
            fitted[fam] = min(fitted.get(fam, size[i]), size[i])
        rows[i] = {"student": name, "family": fam, "model": c.model, "width": c.width, "seconds": round(seconds or 0, 1),
                   **({"reserve": True} if name in reserve else {}),
                   "parameters": man.get("parameters"),
                   "meets_budget": ok, **{k: m[k] for k in ("knn_top1", "teacher_knn_top1", "retention", "topk_overlap")
                                          if m.get(k) is not None}}
    rows = [rows[i] for i in sorted(rows)]  # the ladder's order, as the report lists it
    first = next(r for r in rows if r["student"] == "distill")
    return {**{k: first[k] for k in ("knn_top1", "teacher_knn_top1", "retention", "topk_overlap") if k in first},
            "ladder": rows}


MIN_RUNG_SECONDS = 15.0  # --minutes: a ladder student is not started on less of the students' share than this

RUNNERS = {  # (the stage's config, resume, every stage's config and given_minutes under --minutes) -> a summary for pipeline.json
    "train": lambda c, resume, _: _run_training("train", c, resume),
    "distill": lambda c, resume, cs: _run_ladder(c, resume, cs["deploy"], cs.get("given_minutes"), cs.get("reserve", frozenset())),
    "compress": lambda c, resume, _: _run_training("compress", compress_target(c), resume),
    "export": lambda c, resume, _: {Path(e["path"]).name: e["parity"] for e in map(stage_main("export"), c)},
    "eval": lambda c, resume, _: _run_eval(c, resume),
    "bench": lambda c, resume, _: {"configurations": len(stage_main("bench")(c)["rows"])},
    "deploy": lambda c, resume, _: _deploy_summary(stage_main("deploy")(_distilled_also(c))),
    "report": lambda c, resume, _: {k: v for k, v in stage_main("report")(Path(c["out"])).items() if k in ("html", "md")},
}


def compress_target(c: config.CompressConfig) -> config.CompressConfig:
    """compress's config for the student it should prune: the smallest student of the ladder (by
    parameters) that met deploy's budget at the end of its distillation, pruning being the way to a
    faster model within the budget; the distill section's own student when none met it, or when the
    run has no ladder (pipeline.json's distill summary). A config naming another student is kept."""
    out = Path(c.out)
    if Path(c.student) != out / "distill":
        return c
    st = json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").is_file() else {}
    ladder = ((st.get("stages") or {}).get("distill") or {}).get("summary", {}).get("ladder") or []
    met = [r for r in ladder if r.get("meets_budget") and r.get("parameters")]
    if not met:
        return c
    best = min(met, key=lambda r: (r["parameters"], r["student"] != "distill"))
    if best["student"] == "distill":
        return c
    log.info("compress: prunes students/%s (%.2fM parameters), the smallest student within deploy's budget", best["student"],
             best["parameters"] / 1e6)
    return dataclasses.replace(c, student=str(rung_dir(out, best["student"]) / "distill"))


def _deploy_summary(r: dict) -> dict:
    w = r["winner"]
    return {"selected": w["name"], "p50_ms": w["p50_ms"], **{k: w[k] for k in ("knn_top1", "drop", "topk_overlap") if k in w},
            "candidates": len(r["candidates"])}


def _distilled_also(c: config.DeployConfig) -> config.DeployConfig:
    """deploy's --also: the ladder's students that were distilled (a skipped one has no checkpoint) and
    met the budget at the end of their distillation (the INT8 files of one that missed it could only
    lose more; the distill section's student in RUN/distill is a candidate whatever it scored)."""
    from edgeclr.rundir import read_manifest

    def wanted(a: str) -> bool:
        if Path(a).parent.name != "students":
            return True
        man = read_manifest(Path(a) / "distill")
        return (Path(a) / "distill/checkpoints/last.pt").exists() and meets_budget(man.get("metrics") or {}, c) is not False

    return dataclasses.replace(c, also=",".join(a for a in (c.also or "").split(",") if a and wanted(a)) or None)


def _run_stage(name: str, c, resume: bool, configs: dict) -> dict:
    """Run one stage (the same function as its command); returns a small summary for pipeline.json."""
    return RUNNERS[name](c, resume, configs)


# ----------------------------------------------------------------------------------------------


def _start(cfg: config.PipelineConfig, out: Path) -> State:
    """pipeline.json with this run appended, and pipeline.yaml (the resolved options)."""
    state = State(out)
    state.d["preset"], state.d["data"] = cfg.preset, cfg.data
    state.d["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(["edgeclr"] + sys.argv[1:])
                            if Path(sys.argv[0]).name in ("edgeclr", "__main__.py") else None,
                            "config": config.to_dict(cfg)})
    state.save()
    (out / "pipeline.yaml").write_text(config.dump_yaml(cfg.resolved_dict()))
    return state


def _decide(cfg, out: Path, name: str, i: int, first: int, key: str, st: dict) -> str:
    """What to do with stage i: "input" (before --from), "skip" (finished, same key), "resume" or "run"."""
    if i < first:  # before --from: must have finished; it is an input, not re-run
        if st.get("status") != "done" or not outputs_exist(out, name, st):
            raise ConfigError(f"--from {cfg.from_stage}: the {name} stage of {out} has not finished; "
                              f"run the pipeline without --from first")
        return "input"
    forced = cfg.from_stage is not None
    if not forced and st.get("key") == key and st.get("status") == "done" and outputs_exist(out, name, st):
        return "skip"
    if (not forced and st.get("key") == key and st.get("status") == "running" and stages.get(name).resumable
            and _resumable(out, name)):
        return "resume"
    moved = _set_aside(out, name)
    if moved:
        log.warning("%s: %s; the previous output is kept in %s", name,
                    "re-run from --from" if forced else "its options or inputs changed" if st.get("key") != key
                    else "it was interrupted before a checkpoint", ", ".join(moved))
    return "run"


def main(cfg: config.PipelineConfig) -> dict:
    """Run the pipeline's stages in order, skipping finished ones; returns {stage: what happened}.

    OUT is locked for the whole run (edgeclr.lock): a second pipeline, or any command writing into
    OUT, refuses at once; the stages inside take the same lock again."""
    out = Path(cfg.out)
    configs = stage_configs(cfg)
    first = STAGES.index(cfg.from_stage) if cfg.from_stage else 0
    last = STAGES.index(cfg.until) if cfg.until else len(STAGES) - 1
    if first > last:
        raise ConfigError(f"--from {cfg.from_stage} comes after --until {cfg.until}; stages run in the order {', '.join(STAGES)}")
    with hold(out, "the pipeline's run folder", is_dir=True):
        make_writable_dir(out)
        if first == 0:
            preflight(configs, STAGES[:last + 1])
        return _run(cfg, out, configs, first, last)


def preflight(configs: dict, names: tuple[str, ...]) -> None:
    """Every later stage's data requirement, checked before training starts (a stage that would fail
    on the data must not cost the stages before it): INT8 calibration needs
    CompressConfig.MIN_CALIB images of the training data; the label-efficiency curve of eval keeps
    the levels (labelled images per class) that the smallest class of the labelled data can give."""
    from edgeclr.loading import open_pretrain
    from edgeclr.models import list_models

    unknown = [c.model for c in configs["distill"] if c.model not in list_models()]
    if "distill" in names and unknown:
        raise ConfigError(f"students: {', '.join(unknown)} is not a model; models: {', '.join(list_models())}")
    if "eval" in names and configs["eval"].label_efficiency:
        configs["eval"] = _fit_label_levels(configs["eval"], configs["train"])
    n = len(open_pretrain(configs["train"]))
    floor = config.CompressConfig.MIN_CALIB
    int8 = [s for s in ("compress", "deploy") if s in names and configs[s].int8]
    if int8 and n < floor:
        raise ConfigError(f"{configs['train'].data} has {n} training image(s); INT8 calibration in {' and '.join(int8)} needs at "
                          f"least {floor}: add images, or export FP32 only (pipeline sections "
                          f"{', '.join(f'{s}: {{int8: false}}' for s in int8)}); nothing was trained")


def _fit_label_levels(c: config.EvalConfig, tc: config.TrainConfig) -> config.EvalConfig:
    """The eval config with --label-efficiency levels above the smallest labelled class dropped (a
    warning says which); unlabeled data: the curve is off."""
    import numpy as np

    from edgeclr import data
    from edgeclr.loading import open_like_run

    ds = open_like_run(c.data or tc.data, "train", tc.input_size, vars(tc), tc.seed)
    if not data.has_labels(ds):
        return dataclasses.replace(c, label_efficiency="")
    smallest = int(np.bincount(ds.labels)[np.unique(ds.labels)].min())
    keep = [n for n in c.levels() if n <= smallest]
    if len(keep) < len(c.levels()):
        log.warning("eval: the smallest class of %s has %d labelled images: the label-efficiency curve runs at %s per class "
                    "(asked: %s)", c.data or tc.data, smallest, ",".join(map(str, keep)) or "no level", c.label_efficiency)
    return dataclasses.replace(c, label_efficiency=",".join(map(str, keep)))


def _budget(cfg: config.PipelineConfig, configs: dict) -> dict | None:
    """--minutes: the plan in minutes per stage (what pipeline.json and the report compare with)."""
    if not cfg.minutes:
        return None
    plan = {"train": configs["train"].fit_minutes, "distill": round(sum(c.fit_minutes for c in configs["distill"]), 3),
            "compress": configs["compress"].fit_minutes, "deploy": configs["deploy"].search_minutes}
    rest = round(cfg.minutes - sum(plan.values()), 3)
    log.info("--minutes %g: the teacher's schedule is fitted to %.1f min, %d student(s) to %.1f min each, the recoveries to "
             "%.1f min, deploy builds candidates for %.1f min; %.1f min are left for loading, evaluation, export, bench, "
             "deploy's timing and the report (each training stage fits its epochs to its share from its measured step time; "
             "each share is of the time still left when the stage starts, so what a stage leaves unused goes to the later ones)",
             cfg.minutes, plan["train"], len(configs["distill"]), plan["distill"] / len(configs["distill"]), plan["compress"],
             plan["deploy"], rest)
    return {"minutes": cfg.minutes, "plan_minutes": {**plan, "rest": rest}, "shares": config.BUDGET_SHARES}


def passed_on(name: str, c, left_s: float) -> tuple[Any, float]:
    """--minutes: stage `name`'s config with its share of the time still left (its share over the
    shares of the stages after it and the rest), so that what an earlier stage did not use goes to
    the later ones rather than to nothing; (the config, its minutes)."""
    shares = list(config.BUDGET_SHARES)
    later = sum(config.BUDGET_SHARES[s] for s in shares[shares.index(name):]) + (1 - sum(config.BUDGET_SHARES.values()))
    minutes = max(0.0, left_s / 60) * config.BUDGET_SHARES[name] / later
    if name == "distill":  # the ladder's pool: an equal part each (_run_ladder passes on within it)
        return [dataclasses.replace(x, fit_minutes=round(minutes / len(c), 3)) for x in c], round(minutes, 3)
    return dataclasses.replace(c, **{"search_minutes" if name == "deploy" else "fit_minutes": round(minutes, 3)}), round(minutes, 3)


def _run(cfg: config.PipelineConfig, out: Path, configs: dict, first: int, last: int) -> dict:
    state = _start(cfg, out)
    budget = _budget(cfg, configs)
    t_run = time.time()
    if budget:
        state.d["budget"] = {**budget, "started": t_run}
        state.save()
    done: dict[str, str] = {}
    upstream = ""
    for i, name in enumerate(STAGES[:last + 1]):
        if name == "train":  # the images are an input too: new or changed files make a new teacher
            upstream = json.dumps(data_fingerprint(configs["train"]), sort_keys=True)
        key = stage_key(name, configs[name], upstream)
        st = state.stage(name)
        action = _decide(cfg, out, name, i, first, key, st)
        if action in ("input", "skip"):
            if action == "skip":
                log.info("%s: finished earlier with the same options, skipped", name)
            upstream = st["key"] if action == "input" else key
            done[name] = "skipped"
            continue
        resume = action == "resume"
        log.info("%s: %s", name, "resuming" if resume else "running")
        state.set(name, key=key, status="running", started=time.time(), resumed=resume)
        t0 = time.time()
        c, given = configs[name], None
        own = "search_minutes" if name == "deploy" else "fit_minutes"
        if budget and name in config.BUDGET_SHARES and own not in cfg.sections()[name]:  # the section's own value wins
            # after the key: a resumed stage keeps its key, and its checkpoint its schedule
            c, given = passed_on(name, c, cfg.minutes * 60 - (t0 - t_run))
            state.d["budget"].setdefault("given_minutes", {})[name] = given
        summary = _run_stage(name, c, resume, {**configs, name: c, "given_minutes": given})
        state.set(name, status="done", seconds=round(time.time() - t0, 1), summary=summary)
        done[name] = "resumed" if resume else "ran"
        upstream = key
    if budget:
        took = (time.time() - t_run) / 60
        state.d["budget"]["took_minutes"] = round(took, 2)
        state.save()
        (log.info if took <= cfg.minutes else log.warning)("the run took %.1f min of its %g-minute budget", took, cfg.minutes)
    return {"out": str(out), "stages": done, "report": str(out / "report.html") if "report" in done else None}


def _labeled(out: Path, c) -> bool:
    from edgeclr import checkpoint, data
    from edgeclr.loading import open_like_run
    from edgeclr.runtime import Preprocess

    ck = checkpoint.load(checkpoint.find(out / "train"))
    tcfg = ck.get("config") or {}
    test = open_like_run(c.data or tcfg["data"], "test", Preprocess.from_dict(ck["preprocess"]).resize_size, tcfg, c.seed)
    return data.has_labels(test)


def data_fingerprint(c: config.TrainConfig) -> dict:
    """The training images' identity (file hashes, or a folder listing with sizes and times)."""
    from edgeclr.loading import open_pretrain

    return open_pretrain(c).fingerprint()


def _has_checkpoint(stage_dir: Path) -> bool:
    """A training stage's folder holds a checkpoint to resume from (the last one, or the one before it)."""
    ck = stage_dir / "checkpoints"
    return (ck / "last.pt").exists() or (ck / "last.prev.pt").exists()


def _resumable(out: Path, name: str) -> bool:
    if name == "deploy":  # built candidates and their scores are kept; the timing runs again
        return (out / "deploy" / "candidates").is_dir()
    return _has_checkpoint(out / name) or (name == "compress" and (out / name / "checkpoints" / "prune.pt").exists())
