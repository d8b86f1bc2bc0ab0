"""Segmentation from few labelled tiles on real H&E: SimCLR initialisation against random
initialisation, frozen against full fine-tuning, at 4, 16 and all labelled tiles, mean and spread
over seeds; the INT8 export against its FP32; edge students (a narrow ResNet with DeepLabV3, a
MobileNet with LR-ASPP and with DeepLabV3) distilled from the teacher, FP32 and INT8, timed with the
teacher's segmenter in one bench run; a transfer check on a hand-annotated fluorescence image.

    pip install --no-deps histolytics==0.3.0 stardist==0.9.2   # the data (their own dependencies conflict)
    pip install pyarrow shapely                                # to read and rasterise the stromal field's polygons
    python benchmarks/segment_he.py --out runs/bench-seg

Data (histolytics 0.3.0; its labels look model-made, not hand-drawn):
- train: `hgsc_nest.jpg` (1500x1500 H&E) with its nucleus type mask (0 background, 1 connective,
  2 inflammatory, 3 neoplastic);
- test: the other field, `hgsc_stromal_he.jpg`, with its 423 nucleus polygons rasterised to the same classes;
- pretraining: both fields as unlabeled 64-px tiles (`edgeclr train --data tiles:...`; the test
  field's pixels are seen without labels, as a lab's unlabeled slides would be);
- transfer: stardist's `img2d.tif` (512x512 fluorescence, 125 hand-annotated nuclei), nucleus
  against background (any nucleus class counts).

Every figure comes from the commands a user runs (`edgeclr train`, `edgeclr finetune --task
segment`, `edgeclr bench`, and the runtime's Segmenter). Writes
benchmarks/results/segment_he/latest.{json,md} (TAG.{json,md} with --tag TAG).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, record_path, run  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from edgeclr import data  # noqa: E402
from edgeclr.runtime import Segmenter  # noqa: E402
from edgeclr.tasks import confusion, iou_scores  # noqa: E402

CLASSES = ["background", "connective", "inflammatory", "neoplastic"]
ARMS = [("random", "full"), ("pretrained", "frozen"), ("pretrained", "full")]


def package_data(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"needs {name}: pip install --no-deps {name}")
    return Path(spec.submodule_search_locations[0]) / "data"


def rasterise(parquet: Path, shape: tuple[int, int]) -> np.ndarray:
    """The stromal field's nucleus polygons (WKB + class_name) as a label map."""
    import pyarrow.parquet as pq
    import shapely
    from skimage.draw import polygon

    t = pq.read_table(parquet)
    mask = np.zeros(shape, np.uint8)
    for wkb, name in zip(t.column("geometry").to_pylist(), t.column("class_name").to_pylist()):
        geom = shapely.from_wkb(wkb)
        for g in getattr(geom, "geoms", [geom]):
            x, y = np.asarray(g.exterior.coords).T
            rr, cc = polygon(y, x, shape)
            mask[rr, cc] = CLASSES.index(name)
    return mask


def prepare(out: Path) -> dict[str, Path]:
    src = package_data("histolytics")
    paths = {}
    for part, img_name, mask in (
            ("train", "hgsc_nest.jpg", lambda shape: np.load(src / "hgsc_nest_type_mask.npz")["nuc_raster"].astype(np.uint8)),
            ("test", "hgsc_stromal_he.jpg", lambda shape: rasterise(src / "hgsc_stromal_cells.parquet", shape))):
        img = Image.open(src / img_name).convert("RGB")
        for sub in ("images", "masks"):
            (out / "data" / part / sub).mkdir(parents=True, exist_ok=True)
        img.save(out / "data" / part / "images" / "field.png")
        Image.fromarray(mask(img.size[::-1]), "L").save(out / "data" / part / "masks" / "field.png")
        paths[part] = out / "data" / part
    (paths["train"] / "masks" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    paths["pretrain"] = f"tiles:{src / 'hgsc_nest.jpg'},{src / 'hgsc_stromal_he.jpg'}"
    return paths


def transfer(model: Path, invert: bool = False) -> dict:
    """Nucleus-vs-background IoU on stardist's hand-annotated fluorescence image (as 8-bit RGB;
    inverted: dark nuclei on a light ground, as in brightfield)."""
    import tifffile

    d = package_data("stardist")
    img = tifffile.imread(d / "images" / "img2d.tif").astype(np.float64)
    truth = (tifffile.imread(d / "images" / "mask2d.tif") > 0).astype(np.uint8)
    lo, hi = np.percentile(img, (1, 99.8))
    gray = (255 * np.clip((img - lo) / (hi - lo), 0, 1)).astype(np.uint8)
    rgb = np.repeat((255 - gray if invert else gray)[:, :, None], 3, 2)
    pred = (Segmenter.load(model).segment_image(rgb) > 0).astype(np.uint8)
    return {"nucleus_iou": iou_scores(confusion(pred, truth, 2))["iou"][1], "predicted_nucleus_share": float(pred.mean()),
            "true_nucleus_share": float(truth.mean())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-seg")
    ap.add_argument("--width", default="32", help="the teacher's ResNet-18 base width")
    ap.add_argument("--pretrain-epochs", default="30")
    ap.add_argument("--pretrain-min", type=float, default=10.0, help="training stops with a checkpoint after this")
    ap.add_argument("--levels", default="4,16,0", help="labelled training tiles (0 = every tile of the training field)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", default="200")
    ap.add_argument("--batch-size", default="16")
    ap.add_argument("--lr", default="3e-3")
    ap.add_argument("--students", default="resnet10:16,mobilenet_v3_small_minimal",
                    help="edge students distilled from the teacher, NAME[:WIDTH] each ('' to skip); a ResNet gets the "
                         "DeepLabV3 head, a MobileNet both LR-ASPP and DeepLabV3")
    ap.add_argument("--distill-epochs", default="60")
    ap.add_argument("--tag", default="", help="name of the record [latest]")
    a = ap.parse_args()

    exe = [sys.executable, "-m", "edgeclr"]
    out = Path(a.out)
    t0 = time.time()
    paths = prepare(out)
    times = {}
    if not (out / "train" / "checkpoints" / "last.pt").exists():
        times["pretrain_s"] = run(exe + ["train", "--data", paths["pretrain"], "--out", str(out), "--width", a.width,
                                         "--epochs", a.pretrain_epochs, "--max-minutes", str(a.pretrain_min), "--knn-every", "0"])
    common = ["--task", "segment", "--data", str(paths["train"] / "images"), "--masks", str(paths["train"] / "masks"),
              "--test-data", str(paths["test"] / "images"), "--test-masks", str(paths["test"] / "masks"), "--steps", a.steps,
              "--batch-size", a.batch_size, "--lr", a.lr]
    levels, seeds = [int(v) for v in a.levels.split(",")], [int(s) for s in a.seeds.split(",")]
    cells: dict[str, dict[str, list]] = {}
    for init, mode in ARMS:
        for level in levels:
            for s in seeds:
                d = out / "seg" / f"{init}-{mode}-t{level}-s{s}"
                full_int8 = (init, mode, level, s) == ("pretrained", "full", 0, seeds[0])
                fmts = ["--formats", "onnx", "--int8"] if full_int8 else ["--formats", ""]
                if not (d / "result.json").exists():
                    times[d.name] = run(exe + ["finetune", str(out), *common, "--tiles", str(level), "--seed", str(s), "--mode", mode,
                                               "--init", init, *fmts, "--out", str(d)])
                r = json.loads((d / "result.json").read_text())
                cell = cells.setdefault(f"{init} {mode}", {}).setdefault(str(level), [])
                cell.append({"miou": r["test_miou"], "iou": r["test_iou"], "train_tiles": r["train_images"]})

    ref = out / "seg" / f"pretrained-full-t0-s{seeds[0]}"
    res = json.loads((ref / "result.json").read_text())
    fp32, int8 = Path(res["artifacts"]["onnx-fp32"]["path"]), Path(res["artifacts"]["onnx-int8"]["path"])
    students = [arm for st in filter(None, a.students.split(",")) for arm in student_arms(a, st, exe, out, common, seeds[0])]
    files = [fp32, int8] + [Path(st[k]) for st in students for k in ("fp32_path", "int8_path")]
    run(exe + ["bench", *map(str, files), "--threads", "1", "--batch", "1", "--out", str(out / "bench")])
    bench = json.loads((out / "bench" / "bench.json").read_text())
    lat = {"/".join(Path(r["path"]).parts[-3:]): r["p50_ms"] for r in bench["rows"]}
    rnd = out / "seg" / f"random-full-t0-s{seeds[0]}"
    if not (rnd / "export" / "segmenter.onnx").exists():
        run(exe + ["export", str(rnd), "--name", "segmenter", "--data", f"tiles:{paths['train'] / 'images'}", "--out", str(rnd / "export")])
    tr = {f"{name}{', inverted' if inv else ''}": transfer(m, inv) for inv in (False, True)
          for name, m in (("SimCLR full, all tiles", fp32), ("random init full, all tiles", rnd / "export" / "segmenter.onnx"))}

    y = data.load_masked(paths["test"] / "images", paths["test"] / "masks", 64, 64, 3, classes=CLASSES).masks
    baseline = {"all_background_miou": iou_scores(confusion(np.zeros_like(y), y, 4))["miou"],
                "test_class_shares": (np.bincount(y.ravel(), minlength=4) / y.size).round(5).tolist()}
    reused = sum(len(c) for by in cells.values() for c in by.values()) - sum(1 for k in times if k != "pretrain_s")
    rec = {"benchmark": "segment_he", "machine": machine(), "reused_runs": reused, "command": shlex.join([sys.executable] + sys.argv), "baseline": baseline,
           "pretrain": json.loads((out / "train" / "manifest.json").read_text()).get("model_spec"),
           "cells": cells, "int8": {"fp32_miou": res["artifacts"]["onnx-fp32"]["test_miou"],
                                    "int8_miou": res["artifacts"]["onnx-int8"]["test_miou"], "latency_ms_1_thread": lat},
           "students": students, "transfer": tr, "times_s": times, "wall_time_min": round((time.time() - t0) / 60, 1)}
    record_path("segment_he", a.tag, "json").write_text(json.dumps(rec, indent=1) + "\n")
    write_md(rec, a, levels)


def student_arms(a, student: str, exe: list[str], out: Path, common: list[str], seed: int) -> list[dict]:
    """An edge student (NAME[:WIDTH]): distilled from the teacher on the same unlabeled tiles into
    OUT/students/NAME, then fine-tuned into a segmenter the same way (full, every labelled tile) with
    each head its family takes, FP32 and INT8."""
    name, _, width = student.partition(":")
    run_dir = out / "students" / (name + (f"-w{width}" if width else ""))
    if not (run_dir / "distill" / "checkpoints" / "last.pt").exists():
        run(exe + ["distill", "--teacher", str(out), "--out", str(run_dir), "--model", name, *(["--width", width] if width else []),
                   "--epochs", a.distill_epochs, "--knn-every", "0"])
    spec = json.loads((run_dir / "distill" / "manifest.json").read_text()).get("model_spec")
    arms = []
    for head in ("deeplabv3",) if name.startswith("resnet") else ("lraspp", "deeplabv3"):
        d = out / "seg" / f"student-{run_dir.name}-{head}-full-t0-s{seed}"
        if not (d / "result.json").exists():
            run(exe + ["finetune", str(run_dir), "--stage", "student", *common, "--seed", str(seed), "--mode", "full",
                       "--seg-head", head, "--formats", "onnx", "--int8", "--out", str(d)])
        r = json.loads((d / "result.json").read_text())
        ck = torch.load(d / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        arms.append({"spec": spec, "head": head, "output_stride": r.get("output_stride"), "miou": r["test_miou"],
                     "head_params": sum(v.numel() for v in ck["head"].values() if v.is_floating_point()),
                     "fp32_miou": r["artifacts"]["onnx-fp32"]["test_miou"], "int8_miou": r["artifacts"]["onnx-int8"]["test_miou"],
                     "fp32_path": r["artifacts"]["onnx-fp32"]["path"], "int8_path": r["artifacts"]["onnx-int8"]["path"]})
    return arms


def write_md(rec: dict, a, levels: list[int]) -> None:
    mc = rec["machine"]
    head = "| arm | " + " | ".join(f"{lv or 'all'} tiles" for lv in levels) + " |"
    lines = [f"# Segmentation from few labels on H&E ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, torch {mc.get('torch')}; code {mc.get('git')}.",
             f"Command: `{rec['command']}` ({rec['wall_time_min']} min"
             + (f"; {rec['reused_runs']} fine-tuning runs, and the pretraining if not timed below, were reused from an earlier "
                "invocation of the same command in the same OUT" if rec.get("reused_runs") else "") + ").",
             ("Times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in rec["times_s"].items()) + ".") if rec["times_s"] else "", "",
             "Fine-tuned on tiles of `hgsc_nest.jpg`, tested on every tile of the other field, `hgsc_stromal_he.jpg` "
             "(histolytics 0.3.0; model-made labels). Test mIoU % over the classes present, mean ± spread over seeds "
             f"{a.seeds} (the draw of labelled tiles, the head's init). Predicting background everywhere scores "
             f"{rec['baseline']['all_background_miou']:.2f}% (the test field's pixels: "
             + ", ".join(f"{c} {100 * v:.2f}%" for c, v in zip(CLASSES, rec["baseline"]["test_class_shares"])) + "):", "",
             head, "|---|" + "---|" * len(levels)]
    for arm, by in rec["cells"].items():
        vals = [by.get(str(lv), []) for lv in levels]
        lines.append(f"| {arm} | " + " | ".join(f"{np.mean([v['miou'] for v in c]):.2f} ± {np.std([v['miou'] for v in c]):.2f}"
                                               if c else "" for c in vals) + " |")
    i8 = rec["int8"]
    lines += ["", "Per-class IoU % (SimCLR full, all tiles, first seed): "
              + ", ".join(f"{c} {v}" for c, v in zip(CLASSES, rec["cells"]["pretrained full"][str(levels[-1])][0]["iou"])), "",
              f"INT8 (onnxruntime QDQ) of the teacher's segmenter (SimCLR full, all tiles): mIoU {i8['int8_miou']:.2f}% "
              f"against FP32 {i8['fp32_miou']:.2f}%.", ""]
    for st in rec.get("students", []):
        lines += [f"Edge student {st['spec']['name']}" + (f" w{st['spec']['width']}" if st["spec"].get("width") else "")
                  + f" with the {st['head']} head (output stride {st['output_stride']}, {st['head_params'] / 1e6:.2f}M head "
                  f"parameters), distilled from the teacher on the same unlabeled tiles, fine-tuned the same way (full, all "
                  f"tiles): mIoU FP32 {st['fp32_miou']:.2f}%, INT8 {st['int8_miou']:.2f}% ({st['int8_miou'] - st['fp32_miou']:+.2f} "
                  "points).", ""]
    lines += ["p50 latency per 64-px tile, 1 thread, batch 1, one interleaved `edgeclr bench` run: "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in i8["latency_ms_1_thread"].items()), "",
              "Transfer to stardist's hand-annotated fluorescence nuclei (nucleus vs background IoU %): "
              + "; ".join(f"{k}: {v['nucleus_iou']}" for k, v in rec["transfer"].items())]
    record_path("segment_he", a.tag, "md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
