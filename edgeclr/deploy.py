"""Deployment selection: `edgeclr deploy RUN` measures every candidate on the deployment settings
and ships the fastest one within the accuracy budget.

    build_candidates: the teacher's own exports (always: edgeclr never ships a model slower than
      exporting the teacher), the distilled student, every recovered pruning level
      (compress/checkpoints/step*.pt) and the final pruned student, each as FP32 and INT8 (the
      float-scope variant and, with --quantize-all, everything quantised) per runtime, in
      OUT/candidates/LEVEL/{fp32,int8,int8-all}.{onnx,xml}
    -> score: held-out kNN top-1 and linear probe through edgeclr.runtime (the one scorer,
      edgeclr.heldout); without labels, the top-10 neighbour overlap with the teacher
    -> measure: edgeclr.bench's interleaved worker processes at --threads / --batch, every
      candidate in one run
    -> choose: the fastest candidate within --max-drop of the teacher (or the most accurate one
      under --max-latency-ms); every other candidate gets the reason it lost; the Pareto front
    -> ship: OUT/model.{onnx|xml}, selection.json, selection.md, README.md

Candidates and their scores are kept (keyed by the file's sha256), so a run that was killed
continues where it stopped; the timing always runs again, all candidates together, since only
latencies measured in one run compare. `rerank` (`edgeclr select --bench`) ranks the same
candidates with latencies measured on another machine (a Raspberry Pi).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from edgeclr import checkpoint, config, export, faults
from edgeclr.bench import Config as BenchRun
from edgeclr.bench import machine, ratio_interval, run_bench
from edgeclr.compress import carries_int8_metadata, int8_scope, runtime_embed, scope_nodes, write_int8
from edgeclr.compress.prune import level_checkpoint
from edgeclr.compress.quantize import calibration_inputs
from edgeclr.errors import ConfigError
from edgeclr.formats import EXPORT_FORMATS, format_of
from edgeclr.heldout import OVERLAP_IMAGES, OVERLAP_SAMPLES, HeldOut, agreement, overlap_draws, overlap_sample, public
from edgeclr.loading import load_encoder, stage_checkpoints
from edgeclr.lock import hold
from edgeclr.report import deploy_table
from edgeclr.rundir import make_writable_dir, read_json, write_json_atomic, write_manifest
from edgeclr.runtime import Preprocess

log = logging.getLogger("edgeclr.deploy")

DESCRIBE = {"teacher": "the teacher's own export", "student": "the distilled student", "pruned": "the pruned student"}


@dataclasses.dataclass
class Candidate:
    level: str  # teacher | student | pruned-N (after pruning step N) | pruned (the final level)
    variant: str  # fp32 | int8 (float scope) | int8-all (every supported node quantised)
    path: Path

    @property
    def name(self) -> str:
        return f"{self.level}/{self.variant}{self.path.suffix}"

    @property
    def runtime(self) -> str:
        return format_of(self.path).runtime

    @property
    def base_level(self) -> str:
        """teacher | student | pruned-N | pruned, without the RUNNAME. of another student family."""
        return self.level.rpartition(".")[2]

    def describe(self) -> str:
        b = self.base_level
        base = DESCRIBE.get(b) or f"the student after pruning step {b.split('-')[1]}"
        if "." in self.level:
            base += f" of {self.level.rpartition('.')[0]}"
        prec = {"fp32": "FP32", "int8": "INT8 (first conv and embedding layer in float)", "int8-all": "INT8 (all layers)"}
        return f"{base}, {prec[self.variant]}, {self.runtime}"


# ----------------------------------------------------------------------------------------------
# the candidates


def levels(run: Path, also: tuple[str, ...] = ()) -> dict[str, tuple[Path, Path]]:
    """{level: (run folder, checkpoint)}, teacher first, then the student and its pruning levels, then
    those of every `also` run (another student family distilled from the same teacher), named
    RUNNAME.student, RUNNAME.pruned-1, ..."""
    ck = stage_checkpoints(run)
    if "train" not in ck:
        raise checkpoint.CheckpointError(f"{run} has no teacher checkpoint (train/checkpoints/last.pt): deploy compares "
                                         "every candidate with the teacher's own export; run `edgeclr train` first")
    out = {"teacher": (run, ck["train"])}
    out.update(_student_levels(run, ck, ""))
    teacher_sha = checkpoint.sha256(ck["train"])
    for a in also:
        other = Path(a)
        ock = stage_checkpoints(other) if other.is_dir() else {}
        if "distill" not in ock:
            raise ConfigError(f"--also {other}: no distilled student there (distill/checkpoints/last.pt); pass a run folder "
                              f"written by `edgeclr distill --teacher {run}`")
        sha = (checkpoint.load(ock["distill"]).get("teacher") or {}).get("sha256")
        if sha != teacher_sha:
            raise ConfigError(f"--also {other}: its student was distilled from another teacher (sha256 {str(sha)[:12]}), not "
                              f"{ck['train']} ({teacher_sha[:12]}): candidates are compared against one teacher")
        out.update(_student_levels(other, ock, other.name + "."))
    return out


def _student_levels(run: Path, ck: dict[str, Path], prefix: str) -> dict[str, tuple[Path, Path]]:
    out = {}
    if "distill" in ck:
        out[prefix + "student"] = (run, ck["distill"])
    if "compress" in ck:
        steps = sorted(level_checkpoint(run / "compress", 0).parent.glob("step*.pt"), key=lambda p: int(p.stem[4:]))
        out.update({f"{prefix}pruned-{p.stem[4:]}": (run, p) for p in steps})
        out[prefix + "pruned"] = (run, ck["compress"])
    return out


def _link(src: Path, dest: Path) -> None:
    """src's files (an IR's .bin too) at dest: a hard link where the file system allows, else a copy.
    Each lands under a temporary name and is renamed, the companions before the main file, so a
    killed run never leaves a half-copied file, or a main file without its companions, that a
    re-run would take as built."""
    for s in reversed(format_of(src).files(src)):
        d = dest.with_suffix(s.suffix)
        tmp = d.with_name(f".{d.name}.partial")
        tmp.unlink(missing_ok=True)
        try:
            os.link(s, tmp)
        except OSError:
            shutil.copy2(s, tmp)
        os.replace(tmp, d)


def reusable(run: Path, level: str, cfg: config.DeployConfig) -> dict[str, Path]:
    """{variant + suffix: file} an earlier stage already wrote for this level: the teacher's exports
    (export/) and the pruned student's FP32 and INT8 files (compress/models/, INT8 only when
    compress quantised for the same flavour)."""
    suffixes = [format_of_name(f) for f in cfg.formats.split(",")]
    if level == "teacher":
        files = {"fp32" + s: run / "export" / f"teacher{s}" for s in suffixes}
    elif level == "pruned":
        models = run / "compress" / "models"
        ccfg = config.load_file(run / "compress" / "config.yaml") if (run / "compress" / "config.yaml").is_file() else {}
        variants = ["fp32"] + (["int8"] if ccfg.get("target", "x86") == cfg.int8_flavour and ccfg.get("auto_exclude", True) else [])
        files = {v + s: models / f"{v}{s}" for v in variants for s in suffixes}
    else:
        return {}
    return {k: p for k, p in files.items() if p.is_file()}


def format_of_name(fmt: str) -> str:
    return EXPORT_FORMATS[fmt].suffix


@dataclasses.dataclass
class Builder:
    """Writes the candidate files of each level into OUT/candidates/LEVEL/ (reusing what exists)."""

    cfg: config.DeployConfig
    out: Path
    deadline: float | None
    calib: np.ndarray | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)

    def expected(self, level: str) -> list[str]:
        variants = ["fp32"] + ((["int8"] + (["int8-all"] if self.cfg.quantize_all else [])) if self.cfg.int8 and level != "teacher"
                               else [])
        return [v + format_of_name(f) for f in self.cfg.formats.split(",") for v in variants]

    def build(self, level: str, run: Path, ckpt: Path) -> list[Candidate]:
        folder = self.out / "candidates" / level
        folder.mkdir(parents=True, exist_ok=True)
        for key, src in reusable(run, level.rpartition(".")[2], self.cfg).items():
            if not (folder / key).is_file():
                _link(src, folder / key)
        missing = [k for k in self.expected(level) if not (folder / k).is_file()]
        if missing and level != "teacher" and self.deadline is not None and time.time() > self.deadline:  # the teacher always
            self.skipped += [f"{level}/{k}" for k in missing]
            log.warning("--search-minutes %s ran out: %s not built", self.cfg.search_minutes, ", ".join(f"{level}/{k}" for k in missing))
        elif missing:
            self._write(level, ckpt, folder, missing)
        return [Candidate(level, k.rsplit(".", 1)[0], folder / k) for k in self.expected(level) if (folder / k).is_file()]

    def _write(self, level: str, ckpt: Path, folder: Path, missing: list[str]) -> None:
        """Export and quantise what `missing` lists (through compress's own steps)."""
        model, ck, _ = load_encoder(ckpt, "cpu")
        pp = Preprocess.from_dict(ck["preprocess"])
        scfg = ck.get("config") or {}
        data_spec = scfg.get("data")
        fmts = [f for f in self.cfg.formats.split(",") if any(m.endswith(format_of_name(f)) for m in missing)]
        for fmt in fmts:  # scored later, with every other candidate
            suffix = format_of_name(fmt)
            fp32 = folder / f"fp32{suffix}"
            if not fp32.is_file():
                export.main(config.ExportConfig(target=str(ckpt), format=fmt, out=str(folder), name="fp32", data=data_spec))
            for variant in ("int8", "int8-all"):
                if f"{variant}{suffix}" not in missing:
                    continue
                if self.calib is None:
                    self.calib = calibration_inputs(data_spec, pp, self.cfg.calib_images, self.cfg.seed, scfg)
                scope = int8_scope(model, fp32, folder, self.calib, pp) if variant == "int8" else {}
                write_int8(fp32, folder / f"{variant}{suffix}", self.calib, self.cfg.int8_flavour, scope_nodes(scope),
                           carries_int8_metadata)
        log.info("%s: built %s", level, ", ".join(missing))


# ----------------------------------------------------------------------------------------------
# accuracy


@dataclasses.dataclass
class Quality:
    """The held-out measure every candidate is held to: kNN (labeled data), or the top-10 neighbour
    overlap with the teacher (unlabeled data)."""

    held: HeldOut | None
    images: torch.Tensor | None  # unlabeled: (N, C, S, S) held-out images
    ref: dict
    key: str  # what the scores were computed on (a cached score with another key is recomputed)

    @classmethod
    def open(cls, cfg: config.DeployConfig, teacher_ckpt: Path) -> Quality:
        teacher, tck, _ = load_encoder(teacher_ckpt, "cpu", role="teacher")
        pp = Preprocess.from_dict(tck["preprocess"])
        tcfg = tck.get("config") or {}
        spec = tcfg.get("data")
        key = json.dumps({"data": spec, "eval_images": cfg.eval_images, "seed": cfg.seed, "teacher": checkpoint.sha256(teacher_ckpt),
                          "overlap": [OVERLAP_IMAGES, OVERLAP_SAMPLES]})  # scores cached by an earlier overlap are recomputed
        held = HeldOut.open(spec, pp, tcfg, cfg.seed, cfg.eval_images, cfg.eval_images)
        if held is not None:
            return cls(held, None, held.score(teacher.embed, None, 256), key)
        x = overlap_sample(spec, pp, tcfg, cfg.seed, cfg.eval_images)
        log.warning("%s has no labels: candidates are judged by their top-10 neighbour overlap with the teacher (--min-overlap "
                    "%.2f), not by accuracy; the overlap is a mean over %d seeded sample(s) of %d of %d held-out images",
                    spec, cfg.min_overlap, *overlap_draws(len(x))[::-1], len(x))
        with torch.no_grad():
            ref = {"_q": teacher.embed(x)}
        return cls(None, x, ref, key)

    @property
    def labeled(self) -> bool:
        return self.held is not None

    def teacher_row(self) -> dict:
        return {"knn_top1": self.ref["knn_top1"]} if self.labeled else {"topk_overlap": 1.0}

    def score(self, path: Path) -> dict:
        """The file's held-out figures through the runtime (HeldOut.score's keys against the teacher's,
        with the linear probe); unlabeled: its top-10 neighbour overlap with the teacher."""
        fn = runtime_embed(path)
        if not self.labeled:
            q = fn(self.images)
            return {"topk_overlap": agreement(q, self.ref["_q"])["topk_overlap"]}
        return public(self.held.score(fn, self.ref, 256, linear=True))

    def cached(self, c: Candidate) -> dict:
        """The candidate's scores, from OUT/candidates/LEVEL/VARIANT.score.json when that was computed on
        the same file and held-out images (a killed run continues here)."""
        side = c.path.with_name(c.path.name + ".score.json")
        sha = checkpoint.sha256(c.path)
        if side.is_file():
            try:
                d = json.loads(side.read_text())
                if d.get("sha256") == sha and d.get("key") == self.key:
                    return d["scores"]
            except (ValueError, KeyError):
                pass
        scores = self.score(c.path)
        write_json_atomic({"sha256": sha, "key": self.key, "scores": scores}, side)
        return scores


# ----------------------------------------------------------------------------------------------
# the choice


def measure(cfg: config.DeployConfig, cands: list[Candidate]) -> dict[str, dict]:
    """{candidate name: bench row}: every candidate timed in one interleaved run at the deployment settings."""
    runs = [BenchRun(c.name, str(c.path), format_of(c.path).name + ("-int8" if "int8" in c.variant else ""), cfg.threads, cfg.batch,
                     None, cfg.precision) for c in cands]
    log.info("timing %d candidates at %d thread(s), batch %d, interleaved (%d rounds x %d runs)", len(runs), cfg.threads,
             cfg.batch, cfg.rounds, cfg.runs)
    return {r["label"]: r for r in run_bench(runs, cfg.rounds, cfg.runs, cfg.warmup)}


def candidate_row(c: Candidate, scores: dict, bench_row: dict, teacher: dict) -> dict:
    row = {"name": c.name, "level": c.level, "variant": c.variant, "runtime": c.runtime, "path": str(c.path),
           "description": c.describe(), **scores,
           "p50_ms": bench_row["p50_ms"], "p90_ms": bench_row["p90_ms"], "images_per_s": bench_row["images_per_s"],
           "peak_rss_mb": bench_row.get("peak_rss_mb"), "model_rss_mb": bench_row.get("model_rss_mb"),
           "size_bytes": bench_row["size_bytes"], "macs": bench_row.get("macs"), "precision_ran": bench_row.get("precision_ran"),
           "round_p50_ms": bench_row.get("round_p50_ms")}
    if "knn_top1" in teacher:
        row["drop"] = teacher["knn_top1"] - row["knn_top1"]
    return row


def architecture(ckpt: Path) -> dict:
    """{family, architecture}: what network a level's checkpoint holds, for the tables ("resnet10 w8",
    "mobilenet_v3_small_minimal"; "pruned" where compress removed channels)."""
    ck = checkpoint.load(ckpt)
    spec = ck.get("spec") or {}
    name = str(spec.get("name", "?"))
    text = name + (f" w{spec['width']}" if spec.get("width") and name.startswith("resnet") else "")
    return {"family": config.family(name), "architecture": text + (" pruned" if ck.get("stage") == "compress" else "")}


def within_budget(row: dict, rule: dict) -> bool:
    if "drop" in row:
        return row["drop"] <= rule["max_drop"] + 1e-9
    return row["topk_overlap"] >= rule["min_overlap"]


def choose(rows: list[dict], rule: dict) -> dict | None:
    """Mark every row with `status` and `reason`, the Pareto front with `pareto`; returns the winner.

    rule: {max_drop, min_overlap, max_latency_ms or None, tie_margin}. Without a latency limit:
    among the candidates within the budget, those tied with the fastest (`_tied`: their median
    per-round latency ratio is within 1 + tie_margin, or its bootstrap interval reaches 1) are tied,
    and the most accurate of them ships, then the smaller; a choice that does not flip with timing noise.
    Rows timed elsewhere without rounds (`edgeclr select --bench`) tie only when equal. With
    max_latency_ms: the most accurate under it, ties to the faster."""
    acc = "knn_top1" if any("knn_top1" in r for r in rows) else "topk_overlap"
    for r in rows:  # derived here: an earlier choice's ties (a re-ranked selection.json) do not carry over
        r.pop("tied_with_fastest", None)
        r.pop("vs_fastest", None)
        r["pareto"] = not any(o is not r and o["p50_ms"] <= r["p50_ms"] and o[acc] >= r[acc]
                              and (o["p50_ms"] < r["p50_ms"] or o[acc] > r[acc]) for o in rows)
    lim = rule.get("max_latency_ms")
    if lim:
        ok = [r for r in rows if r["p50_ms"] <= lim]
        win = max(ok, key=lambda r: (r[acc], -r["p50_ms"])) if ok else None
    else:
        ok = [r for r in rows if within_budget(r, rule)]
        win = None
        if ok:
            fastest = min(ok, key=lambda r: (r["p50_ms"], -r[acc]))
            for r in ok:
                r["tied_with_fastest"] = _tied(r, fastest, rule.get("tie_margin", 0.0))
            win = max((r for r in ok if r["tied_with_fastest"]), key=lambda r: (r[acc], -r["size_bytes"], -r["p50_ms"]))
    for r in rows:
        r["status"], r["reason"] = _verdict(r, win, ok, rule, acc)
    return win


def _tied(r: dict, fastest: dict, margin: float) -> bool:
    """Whether r is tied with the fastest: the median of its per-round latency ratio is at most
    1 + margin (practically as fast), or the bootstrap interval of that median reaches 1 (not
    measurably slower). Records the ratio and its interval.

    The median, not the interval's low end, is held to the margin: the low end moves with a single
    slow round, and a candidate 9% slower by its median (interval 1.04-1.16) tied in one demo deploy
    and not in the next two, flipping the shipped file between an INT8 and an FP32 copy of one
    student; the median moved by 0.02 between those runs."""
    if r is fastest:
        return True
    a, b = r.get("round_p50_ms"), fastest.get("round_p50_ms")
    if not a or not b or len(a) != len(b) or len(a) < 3:
        return r["p50_ms"] <= fastest["p50_ms"]
    ratio, lo, hi = ratio_interval(a, b)
    r["vs_fastest"] = {"ratio": ratio, "low": lo, "high": hi, "fastest": fastest["name"]}
    return ratio <= 1.0 + margin or lo <= 1.0


def _verdict(r: dict, win: dict | None, ok: list[dict], rule: dict, acc: str) -> tuple[str, str]:
    unit = "points" if acc == "knn_top1" else ""
    tied = [o for o in ok if o.get("tied_with_fastest")]
    if r is win:
        if rule.get("max_latency_ms"):
            return "selected", f"the most accurate under {rule['max_latency_ms']} ms"
        if len(tied) > 1:
            return "selected", f"the most accurate of the {len(tied)} candidates tied with the fastest (within noise and --tie-margin)"
        return "selected", "the fastest within the budget"
    lim = rule.get("max_latency_ms")
    if lim and r["p50_ms"] > lim:
        return "over latency", f"p50 {r['p50_ms']:.3f} ms > --max-latency-ms {lim}"
    if not lim and r not in ok:
        if "drop" in r:
            return "over budget", f"{r['drop']:.2f} kNN {unit} below the teacher > --max-drop {rule['max_drop']}"
        return "over budget", f"top-10 overlap with the teacher {r['topk_overlap']:.3f} < --min-overlap {rule['min_overlap']}"
    if win is None:
        return "rejected", "no candidate qualifies"
    if lim:
        return "less accurate", f"{r[acc]:.2f} against the selected {win[acc]:.2f}"
    v = r.get("vs_fastest")
    ci = f" (against the fastest: {v['ratio']:.2f}x, 95% interval {v['low']:.2f}-{v['high']:.2f})" if v else ""
    if r.get("tied_with_fastest"):
        why = "less accurate" if r[acc] < win[acc] else "larger"
        if v is None and win.get("vs_fastest"):  # r is the fastest: the selected model's interval against it
            w = win["vs_fastest"]
            return "tied", (f"the fastest, but the selected model is tied with it ({w['ratio']:.2f}x, 95% interval "
                            f"{w['low']:.2f}-{w['high']:.2f}); {why} than the selected model")
        return "tied", f"tied with the fastest (within noise and --tie-margin){ci}; {why} than the selected model"
    return "slower", f"{r['p50_ms']:.3f} ms, {r['p50_ms'] / win['p50_ms']:.2f}x the selected model's {win['p50_ms']:.3f} ms{ci}"


def speed_phrase(ratio: float) -> str:
    """'2.30x faster than', '1.40x slower than' or 'as fast as' (within 2%): a ratio of latencies
    (other / this) never reads as a speed-up when it is one below."""
    if abs(ratio - 1) < 0.02:
        return "as fast as"
    return f"{ratio:.2f}x faster than" if ratio > 1 else f"{1 / ratio:.2f}x slower than"


def teacher_export(rows: list[dict], runtime: str) -> dict | None:
    return next((r for r in rows if r["level"] == "teacher" and r["runtime"] == runtime), None)


def summary(win: dict, rows: list[dict], labeled: bool, latency_source: str) -> str:
    """One line: what was shipped, its accuracy and how its speed compares with the teacher's own
    export in the same runtime (the comparison the numbers were measured for)."""
    t = teacher_export(rows, win["runtime"])
    acc = (f"kNN {win['knn_top1']:.2f}% ({0.0 - win['drop']:+.2f} points against the teacher)" if labeled
           else f"top-10 neighbour overlap with the teacher {win['topk_overlap']:.3f}")
    msg = f"{win['name']} ({win['description']}): {acc}, {win['size_bytes'] / 1e6:.2f} MB, p50 {win['p50_ms']:.3f} ms"
    if t is not None and t is not win:
        msg += (f", {speed_phrase(t['p50_ms'] / win['p50_ms'])} the teacher's own {win['runtime']} export ({t['p50_ms']:.3f} ms, "
                f"{t['size_bytes'] / 1e6:.2f} MB)")
    elif t is win:
        students = [r for r in rows if r.get("level") != "teacher"]
        within = [r for r in students if r.get("status") != "over budget"]
        if students and not within:  # the accuracy budget, not the speed, kept every student out
            key = "knn_top1" if labeled else "topk_overlap"
            best = max(students, key=lambda r: r.get(key, float("-inf")))
            msg += f"; no student met the accuracy budget (the closest, {best['name']}: {best['reason']})"
        elif any(r.get("tied_with_fastest") for r in within):
            msg += "; the students within the budget were not measurably faster than the teacher's own export (tied within noise)"
        else:
            msg += "; no student candidate was both within the budget and faster than exporting the teacher"
    return msg + f" [{latency_source}]"


# ----------------------------------------------------------------------------------------------
# shipping


def ship(out: Path, win: dict) -> list[Path]:
    """The selected model as OUT/model.{onnx|xml} (with its .bin); an earlier selection's files are
    replaced, not mixed with."""
    src = Path(win["path"])
    dest = out / f"model{src.suffix}"
    for old in [out / f"model{s}" for s in (".onnx", ".xml", ".bin")]:
        if old.exists() and old.with_suffix(src.suffix) != dest and old.suffix not in format_of(src).companions:
            old.unlink()
    written = []
    for f in format_of(src).files(src):
        tmp = out / f".model.partial{f.suffix}"
        shutil.copyfile(f, tmp)
        written.append((tmp, dest.with_suffix(f.suffix)))
    for tmp, d in written:
        os.replace(tmp, d)
    return [d for _, d in written]


def write_selection(out: Path, sel: dict) -> None:
    write_json_atomic(sel, out / "selection.json")
    (out / "selection.md").write_text(deploy_table(sel) + "\n")
    win = sel.get("winner")
    if win is None:
        return
    model = f"model{Path(win['path']).suffix}"
    (out / "README.md").write_text(
        f"# Deployed model\n\n`{model}`: {sel['summary']}\n\n"
        f"Chosen by `{sel['rule_text']}` among {len(sel['candidates'])} candidates (selection.json, selection.md).\n\n"
        f"Run it on the device (no torch): `{format_of(model).install}`, then\n"
        f"`edgeclr embed IMAGES --model {model} --out emb.npy --threads {sel['threads']}` and `edgeclr search`.\n")


# ----------------------------------------------------------------------------------------------
# the command


def main(cfg: config.DeployConfig) -> dict:
    """`edgeclr deploy RUN`: build, score and time every candidate, choose, ship; RUN/deploy."""
    t0 = time.time()
    run = Path(cfg.run)
    if not run.is_dir():
        raise ConfigError(f"{run} is not a run folder: pass runs/NAME, written by `edgeclr train` and later stages")
    out = Path(cfg.out) if cfg.out else run / "deploy"
    lv = levels(run, tuple(a for a in (cfg.also or "").split(",") if a))
    with hold(out, "the deploy folder", is_dir=True):
        make_writable_dir(out)
        return _deploy(cfg, run, out, lv, t0)


def _deploy(cfg: config.DeployConfig, run: Path, out: Path, lv: dict[str, Path], t0: float) -> dict:
    builder = Builder(cfg, out, t0 + cfg.search_minutes * 60 if cfg.search_minutes else None)
    quality = Quality.open(cfg, lv["teacher"][1])
    cands, scores = [], {}
    for i, (level, (lrun, ckpt)) in enumerate(lv.items()):
        for c in builder.build(level, lrun, ckpt):
            scores[c.name] = quality.cached(c)
            cands.append(c)
            log.info("%s: %s", c.name, ", ".join(f"{k} {v:.3f}" for k, v in scores[c.name].items()))
        faults.maybe_kill("deploy", i + 1)  # tests: a kill after each level's candidates
    bench = measure(cfg, cands)
    teacher = quality.teacher_row()
    arch = {level: architecture(ckpt) for level, (_, ckpt) in lv.items()}
    rows = [{**candidate_row(c, scores[c.name], bench[c.name], teacher), **arch[c.level]} for c in cands]
    m = machine()
    source = (f"latency measured on {m['cpu']}" + (f", an x86 proxy for a {cfg.target}" if cfg.target != "x86" else ""))
    sel = {"run": str(run), "target": cfg.target, "threads": cfg.threads, "batch": cfg.batch, "precision": cfg.precision,
           "machine": m, "latency_source": source, "labeled": quality.labeled, "teacher": teacher,
           "rule": {"max_drop": cfg.max_drop, "min_overlap": cfg.min_overlap, "max_latency_ms": cfg.max_latency_ms,
                    "tie_margin": cfg.tie_margin},
           "not_built": builder.skipped, "candidates": rows}
    config.save_yaml(cfg, out / "config.yaml")
    result = decide(out, sel)
    result["wall_time_s"] = round(time.time() - t0, 1)
    write_json_atomic(result, out / "selection.json")
    win = result["winner"]
    write_manifest(out, "deploy", inputs={level: {"checkpoint": str(p), "sha256": checkpoint.sha256(p)} for level, (_, p) in lv.items()},
                   spec=None, preprocess=None, embed_dim=None, wall_time_s=time.time() - t0,
                   metrics={k: win[k] for k in ("knn_top1", "drop", "topk_overlap", "p50_ms", "size_bytes") if k in win},
                   artifacts={"selected": win["name"], "files": result["shipped"], "selection": str(out / "selection.json")})
    return {**result, "out": str(out), "table": deploy_table(result)}


def decide(out: Path, sel: dict) -> dict:
    """Choose among sel's candidates by sel's rule, ship the winner, write the selection files."""
    rule = sel["rule"]
    win = choose(sel["candidates"], rule)
    sel["rule_text"] = (f"most accurate with p50 <= {rule['max_latency_ms']} ms" if rule.get("max_latency_ms") else
                        f"fastest within {rule['max_drop']} kNN points of the teacher" if sel["labeled"] else
                        f"fastest with a top-10 neighbour overlap with the teacher >= {rule['min_overlap']}")
    sel["rule_text"] += f", {sel['threads']} thread(s), batch {sel['batch']}"
    sel["winner"] = win
    sel["summary"] = summary(win, sel["candidates"], sel["labeled"], sel["latency_source"]) if win else None
    if win is None:
        write_selection(out, sel)
        raise ConfigError(f"no candidate runs under --max-latency-ms {rule['max_latency_ms']} (the fastest: "
                          f"{min(r['p50_ms'] for r in sel['candidates']):.3f} ms); nothing was shipped. Raise the limit, "
                          f"or see {out / 'selection.md'}")
    sel["shipped"] = [str(p) for p in ship(out, win)]
    write_selection(out, sel)
    log.info("selected %s", sel["summary"])
    return sel


def rerank(cfg: config.SelectConfig) -> dict:
    """`edgeclr select DEPLOY --bench bench.json`: the same candidates, ranked with the latencies of a
    bench.json measured elsewhere (matched by LEVEL/VARIANT file name)."""
    p = Path(cfg.selection)
    path = p / "selection.json" if p.is_dir() else p
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass the folder `edgeclr deploy` wrote (RUN/deploy)")
    sel = read_json(path, "the selection.json `edgeclr deploy` wrote (RUN/deploy)", ("candidates", "threads", "batch", "rule"))
    board = read_json(cfg.bench, "a bench.json written by `edgeclr bench` on the board", ("rows",))
    if not isinstance(board["rows"], list) or not all(isinstance(r, dict) and {"path", "threads", "batch", "p50_ms"} <= set(r)
                                                      for r in board["rows"]):
        raise ConfigError(f"{cfg.bench} is not a bench.json written by `edgeclr bench`: its rows lack path, threads, batch, p50_ms")
    threads, batch = cfg.threads or sel["threads"], cfg.batch or sel["batch"]
    timed = {"/".join(Path(r["path"]).parts[-2:]): r for r in board["rows"] if r["threads"] == threads and r["batch"] == batch}
    rows = []
    for r in sel["candidates"]:
        b = timed.get(r["name"])
        if b is not None:
            rows.append({**r, "p50_ms": b["p50_ms"], "p90_ms": b["p90_ms"], "images_per_s": b["images_per_s"],
                         "peak_rss_mb": b.get("peak_rss_mb"), "model_rss_mb": b.get("model_rss_mb"),
                         "round_p50_ms": b.get("round_p50_ms")})  # the board's rounds decide its ties, not this machine's
    if not rows:
        raise ConfigError(f"{cfg.bench} times none of the candidates at {threads} thread(s), batch {batch}: run `edgeclr bench "
                          f"{path.parent / 'candidates'} --threads {threads}` on the board (keep the LEVEL/VARIANT file names)")
    if not any(r["level"] == "teacher" for r in rows):
        raise ConfigError(f"{cfg.bench} has no row for the teacher's export (candidates/teacher/): every ranking keeps it")
    m = board.get("machine") or {}
    sel.update(candidates=rows, threads=threads, batch=batch, machine=m,
               latency_source=f"latency measured on {m.get('cpu', 'the board')} ({m.get('arch', '?')}), {cfg.bench}",
               not_measured=[r["name"] for r in sel["candidates"] if r["name"] not in {x["name"] for x in rows}])
    sel["rule"] = {**sel["rule"], **{k: v for k, v in (("max_drop", cfg.max_drop), ("max_latency_ms", cfg.max_latency_ms))
                                     if v is not None}}
    with hold(path.parent, "the deploy folder", is_dir=True):
        result = decide(path.parent, sel)
    return {**result, "out": str(path.parent), "table": deploy_table(result)}
