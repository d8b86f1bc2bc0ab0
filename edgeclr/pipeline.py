"""`edgeclr pipeline`: train -> distill -> compress -> export -> eval -> bench -> report, in one command.

Each stage is the function its own command runs (train.main, distill.main, ...), writing its own
folder of the run directory. OUT/pipeline.json records, per stage, a key (a hash of the stage's
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

from edgeclr import config

log = logging.getLogger("edgeclr.pipeline")

STAGES = ("train", "distill", "compress", "export", "eval", "bench", "report")
# options that change how a stage runs, not what it produces: left out of its key
_NOT_IN_KEY = {"resume", "progress", "device", "devices", "threads", "tensorboard", "out", "teacher", "student", "target", "models"}


def stage_configs(cfg: config.PipelineConfig) -> dict[str, Any]:
    """The config object (or dict) of every stage, from the preset, the file's sections and the
    pipeline's own options."""
    out = Path(cfg.out)
    common = {k: v for k, v in (("device", cfg.device), ("threads", cfg.threads)) if v is not None}
    prog = {} if cfg.progress is None else {"progress": cfg.progress}
    sec = cfg.sections()

    def build(cls, section: str, base: dict | None = None, **fixed):
        values = {**(sec[section] if base is None else base), **fixed}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise config.ConfigError(f"pipeline section '{section}': unknown option(s) {unknown}; valid: {', '.join(sorted(names))}")
        try:
            return cls(**values)
        except TypeError as e:
            raise config.ConfigError(f"pipeline section '{section}': {e}") from e

    exp = dict(sec["export"])
    formats = exp.pop("formats", "onnx,openvino")
    return {
        "train": build(config.TrainConfig, "train", data=cfg.data, out=str(out), **common, **prog),
        "distill": build(config.DistillConfig, "distill", teacher=str(out / "train"), out=str(out), **common, **prog),
        "compress": build(config.CompressConfig, "compress", student=str(out / "distill"), out=str(out), **common, **prog),
        "export": [build(config.ExportConfig, "export", exp, target=str(out / "train"), format=f, out=str(out / "export"),
                         name="teacher")
                   for f in formats.split(",") if f],
        "eval": build(config.EvalConfig, "eval", target=str(out), **common),
        "bench": build(config.BenchConfig, "bench", models=(str(out),), out=str(out / "bench")),
        "report": {"out": str(out)},
    }


def _plain(c) -> Any:
    if isinstance(c, list):
        return [_plain(x) for x in c]
    d = config.to_dict(c) if dataclasses.is_dataclass(c) else dict(c)
    return {k: v for k, v in d.items() if k not in _NOT_IN_KEY}


def stage_key(name: str, cfg_obj, upstream: str) -> str:
    blob = json.dumps({"stage": name, "config": _plain(cfg_obj), "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def outputs_exist(out: Path, stage: str, st: dict | None = None) -> bool:
    """The files a finished stage leaves (a stage whose files were deleted runs again)."""
    if stage == "eval" and ((st or {}).get("summary") or {}).get("no_labels"):
        return True
    need = {"train": ["train/manifest.json", "train/checkpoints/last.pt"],
            "distill": ["distill/manifest.json", "distill/checkpoints/last.pt"],
            "compress": ["compress/manifest.json", "compress/report.json"],
            "export": ["export/manifest.json"], "eval": ["compare.json", "train/eval.json"],
            "bench": ["bench/bench.json"], "report": ["report.html", "report.md"]}[stage]
    return all((out / f).exists() for f in need)


# folders (or files) a stage writes: moved to OUT/.replaced/ when the stage runs again from scratch
_OWNED = {"train": ["train"], "distill": ["distill"], "compress": ["compress"], "export": ["export"],
          "eval": ["compare.json", "compare.md"], "bench": ["bench"], "report": []}


def _set_aside(out: Path, stage: str) -> list[str]:
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in _OWNED[stage]:
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
        from edgeclr.rundir import write_json_atomic

        self.d["stages"][name] = {**self.stage(name), **kw}
        write_json_atomic(self.d, self.path)

    def save(self) -> None:
        from edgeclr.rundir import write_json_atomic

        write_json_atomic(self.d, self.path)


def _run_stage(name: str, c, resume: bool) -> dict:
    """Run one stage (the same function as its command); returns a small summary for pipeline.json."""
    if name == "train":
        from edgeclr import train

        c.resume = resume
        r = train.main(c)
        if not r["completed"]:
            raise config.ConfigError("training stopped before its schedule ended (--max-minutes): re-run the pipeline to continue")
        return {k: r[k] for k in ("knn_top1", "loss") if k in r}
    if name == "distill":
        from edgeclr import distill

        c.resume = resume
        r = distill.main(c)
        if not r["completed"]:
            raise config.ConfigError("distillation stopped before its schedule ended (--max-minutes): re-run the pipeline to continue")
        return {k: r[k] for k in ("knn_top1", "teacher_knn_top1", "retention") if k in r}
    if name == "compress":
        from edgeclr import compress

        c.resume = resume
        r = compress.main(c)
        return {k: {m: v for m, v in row.items() if m in ("knn_top1", "retention", "speedup_vs_fp32")}
                for k, row in r["report"].items()}
    if name == "export":
        from edgeclr import export

        return {Path(e["path"]).name: e["parity"] for e in (export.main(x) for x in c)}
    if name == "eval":
        from edgeclr import evaluate

        out = Path(c.target)
        if not _labeled(out, c):  # accuracy needs labels; agreement is in compress/report.md, speed in bench
            log.warning("eval: %s has no class labels (sub-folders per class): kNN / linear-probe accuracy and the "
                        "retention table are skipped", c.data or "the training data")
            return {"no_labels": True}
        teacher = evaluate.main(dataclasses.replace(c, target=str(out / "train"), compare=False))
        final = "compress" if (out / "compress" / "checkpoints" / "last.pt").exists() else "distill"
        student = evaluate.main(dataclasses.replace(c, target=str(out / final), compare=False, baselines="",
                                                    linear_probe=False))
        cmp = evaluate.main(dataclasses.replace(c, compare=True))
        return {"teacher": {r["key"]: r["knn_top1"] for r in teacher["rows"]},
                "student": student["rows"][0]["knn_top1"], "compare_rows": len(cmp["rows"])}
    if name == "bench":
        from edgeclr import bench

        r = bench.main(c)
        return {"configurations": len(r["rows"])}
    if name == "report":
        from edgeclr import report

        r = report.write(Path(c["out"]))
        return {"html": r["html"], "md": r["md"]}
    raise ValueError(name)


def main(cfg: config.PipelineConfig) -> dict:
    """Run the pipeline's stages in order, skipping finished ones; returns {stage: what happened}."""
    out = Path(cfg.out)
    from edgeclr.rundir import make_writable_dir

    make_writable_dir(out)
    configs = stage_configs(cfg)
    first = STAGES.index(cfg.from_stage) if cfg.from_stage else 0
    last = STAGES.index(cfg.until) if cfg.until else len(STAGES) - 1
    if first > last:
        raise config.ConfigError(f"--from {cfg.from_stage} comes after --until {cfg.until}; stages run in the order {', '.join(STAGES)}")
    state = State(out)
    state.d["preset"], state.d["data"] = cfg.preset, cfg.data
    state.d["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(["edgeclr"] + sys.argv[1:])
                            if Path(sys.argv[0]).name in ("edgeclr", "__main__.py") else None,
                            "config": config.to_dict(cfg)})
    state.save()
    (out / "pipeline.yaml").write_text(config.dump_yaml(cfg.resolved_dict()))

    done: dict[str, str] = {}
    upstream = ""
    for i, name in enumerate(STAGES[:last + 1]):
        if name == "train":  # the images are an input too: new or changed files make a new teacher
            upstream = json.dumps(data_fingerprint(configs["train"]), sort_keys=True)
        key = stage_key(name, configs[name], upstream)
        st = state.stage(name)
        if i < first:  # before --from: must have finished; it is an input, not re-run
            if st.get("status") != "done" or not outputs_exist(out, name, st):
                raise config.ConfigError(f"--from {cfg.from_stage}: the {name} stage of {out} has not finished; "
                                         f"run the pipeline without --from first")
            upstream = st["key"]
            done[name] = "skipped"
            continue
        forced = cfg.from_stage is not None and i >= first
        if not forced and st.get("key") == key and st.get("status") == "done" and outputs_exist(out, name, st):
            log.info("%s: finished earlier with the same options, skipped", name)
            done[name] = "skipped"
            upstream = key
            continue
        resume = (not forced and st.get("key") == key and st.get("status") == "running"
                  and name in ("train", "distill", "compress") and _resumable(out, name))
        if not resume:
            moved = _set_aside(out, name)
            if moved:
                log.warning("%s: %s; the previous output is kept in %s", name,
                            "re-run from --from" if forced else "its options or inputs changed" if st.get("key") != key
                            else "it was interrupted before a checkpoint", ", ".join(moved))
        log.info("%s: %s", name, "resuming" if resume else "running")
        state.set(name, key=key, status="running", started=time.time(), resumed=resume)
        t0 = time.time()
        summary = _run_stage(name, configs[name], resume)
        state.set(name, status="done", seconds=round(time.time() - t0, 1), summary=summary)
        done[name] = "resumed" if resume else "ran"
        upstream = key
    return {"out": str(out), "stages": done, "report": str(out / "report.html") if "report" in done else None}


def _labeled(out: Path, c: config.EvalConfig) -> bool:
    from edgeclr import checkpoint, data
    from edgeclr.evaluate import labeled_splits
    from edgeclr.runtime import Preprocess

    ck = checkpoint.load(checkpoint.find(out / "train"))
    tcfg = ck.get("config") or {}
    (test,) = labeled_splits(c.data or tcfg["data"], Preprocess.from_dict(ck["preprocess"]), tcfg, c.seed, ("test",))
    return data.has_labels(test)


def data_fingerprint(c: config.TrainConfig) -> dict:
    """The training images' identity (file hashes, or a folder listing with sizes and times)."""
    from edgeclr.train import open_pretrain

    return open_pretrain(c).fingerprint()


def _resumable(out: Path, name: str) -> bool:
    ck = out / name / "checkpoints"
    return (ck / "last.pt").exists() or (ck / "last.prev.pt").exists() or (name == "compress" and (ck / "prune.pt").exists())
