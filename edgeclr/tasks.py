"""The task table: what each kind of model edgeclr trains is on every link of the chain. Torch-free
at import (the torch side of each entry imports torch when it is called).

    task      exported module (torch)            output         parity check (export)                  held-out figure (--max-drop)
    embed     encoder.embed (+ L2 norm)          embeddings     min cosine to torch >= --min-cosine    kNN top-1 points
    classify  encoder -> standardise -> linear   probabilities  max |p - p_torch| <= 1e-4              top-1 points
              -> softmax (models.ClassifierNet)
    segment   feature maps -> a SEG_HEADS head   probabilities  per-pixel argmax agreement >= 0.999    mIoU points
              (DeepLabV3, LR-ASPP) -> upsampling (N, K, H, W)   and max |p - p_torch| <= 1e-3
              -> softmax
              (models.SegmenterNet)

A checkpoint or an exported file without a `task` is an embedding model (everything written
before tasks existed). `edgeclr export` builds the module, names its output and checks parity
from the entry alone; the runtime opens a file with the entry's front end (`runtime.open_model`).

Adding a task touches four things: its entry here (`register`), its head (the torch module that
`module` returns), its scorer (`score`), and its runtime front end (a subclass of
`runtime.Embedder` that sets TASK, OUTPUT and USE, and `meta_problems` when its output is not
(N, embedding_dim)). `tests/test_tasks.py` adds one that way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from edgeclr.errors import CheckpointError
from edgeclr.runtime import Classifier, Embedder, Segmenter


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    front_end: type  # the runtime class that runs the task's files (a subclass of runtime.Embedder)
    # (encoder, checkpoint, normalize) -> (torch module that export writes, extra metadata fields)
    module: Callable[[object, dict, bool], tuple[object, dict]]
    # (torch's output, the exported file's output) on the same real images -> figures
    parity: Callable[[np.ndarray, np.ndarray], dict]
    # (figures, --min-cosine) -> why the export fails its parity check, or None when it passes
    parity_failure: Callable[[dict, float], str | None]
    # (outputs on labelled held-out images, their labels, bank) -> {metric: value}; bank = (outputs, labels)
    # of the labelled train split, for tasks scored against one (embeddings: kNN)
    score: Callable[..., dict]
    metric: str  # the held-out figure deploy's and compress's --max-drop is measured in (points of it)

    @property
    def output_name(self) -> str:
        return self.front_end.OUTPUT


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add (or replace) a task; its front end must be registered with the runtime (a subclass of
    runtime.Embedder defining TASK = task.name)."""
    if getattr(task.front_end, "TASK", None) != task.name:
        raise ValueError(f"task {task.name!r}: its front end {task.front_end.__name__} sets TASK = "
                         f"{getattr(task.front_end, 'TASK', None)!r}")
    TASKS[task.name] = task
    return task


def of_checkpoint(ckpt: dict, source: str = "the checkpoint") -> Task:
    """The task a checkpoint holds (no `task`: an embedding model)."""
    name = ckpt.get("task") or "embed"
    if name not in TASKS:
        raise CheckpointError(f"{source} holds a {name!r} model; this edgeclr knows the tasks {', '.join(TASKS)}: "
                              "use the edgeclr version that wrote it")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------
# parity checks and scorers (numpy)


def cosine_parity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Per-image cosine (min, mean) and max absolute difference between two (N, D) outputs."""
    a = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    b = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "max_abs_diff": float(np.abs(ref - got).max())}


def _cosine_failure(check: dict, min_cosine: float) -> str | None:
    if check["min_cosine"] < min_cosine:
        return f"min cosine to torch {check['min_cosine']:.6f} < {min_cosine} (max abs diff {check['max_abs_diff']:.3g})"
    return None


PROB_TOLERANCE = 1e-4  # max |p - p_torch| of an FP32 classifier export


def _probability_failure(check: dict, min_cosine: float) -> str | None:
    if check["max_abs_diff"] > PROB_TOLERANCE:
        return f"max |p - p_torch| {check['max_abs_diff']:.3g} > {PROB_TOLERANCE}"
    return None


def top1(outputs: np.ndarray, labels: np.ndarray, bank=None) -> dict[str, float]:
    """Top-1 accuracy (%) of class scores (N, K) against labels (N,)."""
    return {"top1": 100.0 * float((np.asarray(outputs).argmax(1) == np.asarray(labels)).mean())}


def knn_top1(outputs: np.ndarray, labels: np.ndarray, bank=None) -> dict[str, float]:
    """Top-1 (%) of embeddings (N, D) by the runtime's weighted cosine kNN (k=20, T=0.1, as
    evaluation's) against bank = (bank embeddings, their labels)."""
    from edgeclr.runtime import Index

    if bank is None:
        raise ValueError("an embedding is scored by kNN against a labelled bank: pass bank=(embeddings, labels)")
    pred = Index(bank[0], labels=np.asarray(bank[1])).classify(outputs)
    return {"knn_top1": 100.0 * float((np.asarray(pred).astype(str) == np.asarray(labels).astype(str)).mean())}  # Index keeps names


def confusion(pred: np.ndarray, target: np.ndarray, k: int, ignore: int = 255) -> np.ndarray:
    """(k, k) pixel counts: row = true class, column = predicted; `ignore` pixels left out."""
    keep = target != ignore
    t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def iou_scores(conf: np.ndarray) -> dict:
    """Per-class IoU and Dice (%) from a confusion matrix, and their means over the classes that
    occur (in the truth or the prediction): {"miou", "mdice", "iou": [...], "dice": [...], "pixel_acc"}."""
    tp = np.diag(conf).astype(np.float64)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    present = (tp + fp + fn) > 0
    iou = np.where(present, tp / np.maximum(tp + fp + fn, 1), np.nan)
    dice = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return {"miou": 100.0 * float(np.nanmean(iou)), "mdice": 100.0 * float(np.nanmean(dice)),
            "pixel_acc": 100.0 * float(tp.sum() / max(conf.sum(), 1)),
            "iou": [None if np.isnan(v) else round(100.0 * float(v), 3) for v in iou],
            "dice": [None if np.isnan(v) else round(100.0 * float(v), 3) for v in dice]}


def miou(outputs: np.ndarray, labels: np.ndarray, bank=None) -> dict:
    """mIoU, mean Dice and per-class IoU / Dice (%) of class probabilities (N, K, H, W) against
    label maps (N, H, W) (255 = unlabelled)."""
    outputs = np.asarray(outputs)
    return iou_scores(confusion(outputs.argmax(1), np.asarray(labels), outputs.shape[1]))


def pixel_parity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Per-pixel agreement of the argmax class and max |p - p_torch| of two (N, K, H, W) outputs."""
    return {"pixel_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "max_abs_diff": float(np.abs(ref - got).max())}


PIXEL_AGREEMENT = 0.999  # an FP32 segmenter export: at least this share of pixels keeps torch's class


def _pixel_failure(check: dict, min_cosine: float) -> str | None:
    if check["pixel_agreement"] < PIXEL_AGREEMENT or check["max_abs_diff"] > 1e-3:
        return (f"per-pixel agreement with torch {check['pixel_agreement']:.5f} (needs >= {PIXEL_AGREEMENT}), "
                f"max |p - p_torch| {check['max_abs_diff']:.3g} (needs <= 1e-3)")
    return None




def describe_score(r: dict) -> str:
    """A fine-tuning result's (or one of its files') test figure in words: "accuracy 81.20%" or
    "mIoU 61.30% (Dice 72.10%)"."""
    if "test_miou" in r:
        return f"mIoU {r['test_miou']:.2f}% (Dice {r['test_mdice']:.2f}%)"
    return f"accuracy {r['test_top1']:.2f}%"


# ----------------------------------------------------------------------------------------------
# the torch side (imported when called)


def _embedding_module(encoder, ckpt: dict, normalize: bool):
    from edgeclr.models import EmbeddingModel

    return EmbeddingModel(encoder, normalize).eval(), {"normalized": normalize}


def _classifier_module(encoder, ckpt: dict, normalize: bool):
    from edgeclr.models import classifier_from_checkpoint

    return classifier_from_checkpoint(ckpt), {"classes": list(ckpt["classes"]), "normalized": False}


def _segmenter_module(encoder, ckpt: dict, normalize: bool):
    from edgeclr.models import segmenter_from_checkpoint

    return segmenter_from_checkpoint(ckpt), {"classes": list(ckpt["classes"]), "palette": ckpt.get("palette"), "normalized": False}


register(Task("embed", Embedder, _embedding_module, cosine_parity, _cosine_failure, knn_top1, "knn_top1"))
register(Task("classify", Classifier, _classifier_module, cosine_parity, _probability_failure, top1, "top1"))
register(Task("segment", Segmenter, _segmenter_module, pixel_parity, _pixel_failure, miou, "miou"))
