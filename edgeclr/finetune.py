"""`edgeclr finetune`: few-label classification (--task classify) and segmentation (--task
segment) on any stage's encoder, and the label-efficiency curve of `edgeclr eval --label-efficiency`.

    draw_labeled -> ClassifierNet(encoder, standardise, linear head)
      linear: logistic regression on frozen, clean features (the linear probe, its C cross-validated
              on the labelled images), copied into the head
      frozen: the head trained on augmented views through the frozen encoder
      full:   linear probe first, then encoder and head trained together (LP-FT, Kumar et al. 2022),
              the encoder at --backbone-lr-ratio of the head's learning rate
    -> early stopping on held-out labelled images -> test accuracy -> checkpoint, export, INT8

The labelled images are a stratified draw of the labeled train split (--labels-per-class N or
--labels-fraction F); with >= 20 per class, --val-fraction of each class is held out for early
stopping (never trained on); below that every label trains and the schedule runs to its end (on
Fashion-MNIST-like data at 10 per class, holding 2 per class out cost more than early stopping saved). Test accuracy is on the
whole test split. BatchNorm: with few labelled images (--bn auto: fewer than 2,000) the encoder's
running statistics stay as pretraining left them and only its affine parameters train: batch
statistics of a few dozen images are noise.

Segmentation: data.load_masked cuts IMAGES + MASKS into tiles at the images' own resolution (the
encoder's input size); --tiles N of them train (a validation share held out from 20 on), the test
tiles are --test-data / --test-masks (another image: the honest split) or --test-fraction of the
pool. models.SegmenterNet: the encoder's last stages dilated to --output-stride, a DeepLabV3 (ASPP)
or LR-ASPP head (--seg-head; LR-ASPP on MobileNets by default), bilinear upsampling. SegTuner is
the same Tuner: tile and mask flipped and turned together, mild colour jitter, cross-entropy that
ignores unlabelled pixels (255), early stopping on mIoU.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import edgeclr
from edgeclr import checkpoint, config, data, faults, report, tasks
from edgeclr.augment import SimCLRAugment, get_preset, hed_jitter, preset_for, view_generator
from edgeclr.engine import build_scheduler, exit_for_signal, prepare_stage_dir, resolve_device, set_layout
from edgeclr.errors import CheckpointError, ConfigError, DataError, NonFiniteLoss
from edgeclr.heldout import batchnorms, eval_inputs, fit_linear, linear_probe
from edgeclr.loading import find_checkpoint, load_encoder, open_like_run
from edgeclr.lock import hold
from edgeclr.models import ClassifierNet, Encoder, SegmenterNet, create_model, seg_head_for
from edgeclr.rundir import MetricsLog, write_json_atomic, write_manifest
from edgeclr.runtime import Preprocess

log = logging.getLogger("edgeclr.finetune")

VAL_FROM = 20  # labelled images per class from which a validation split is held out
BN_FROZEN_BELOW = 2000  # --bn auto: labelled training images under which BatchNorm statistics stay frozen


# ----------------------------------------------------------------------------------------------
# the labelled images


def draw_labeled(labels: np.ndarray, per_class: int | None = None, fraction: float | None = None, seed: int = 0,
                 val_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified draw of the labeled images: (train indices, validation indices), sorted.

    per_class images of every class (or `fraction` of each class, at least 1); with >= VAL_FROM per
    class, floor(val_fraction * n) of each class go to validation instead of training.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = per_class if per_class else max(1, int(round(fraction * len(idx))))
        if n > len(idx):
            raise DataError(f"class {c} has {len(idx)} labeled image(s), fewer than the {n} asked for: lower "
                            "--labels-per-class (or label more images of that class)")
        pick = rng.permutation(idx)[:n]
        n_val = int(val_fraction * n) if n >= VAL_FROM else 0
        val.append(pick[:n_val])
        train.append(pick[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val)).astype(np.int64)


def normalized(x01: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """Pixels scaled to [0, 1], (N, C, H, W) -> the model input: minus mean, over std (runtime.normalize in torch)."""
    return (x01 - torch.tensor(pp.mean).view(1, -1, 1, 1)) / torch.tensor(pp.std).view(1, -1, 1, 1)


def to_uint8(x: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """Preprocessed inputs (N, C, S, S) back to uint8 pixels, the augmentation's input."""
    mean = torch.tensor(pp.mean).view(1, -1, 1, 1)
    std = torch.tensor(pp.std).view(1, -1, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def finetune_augment(run_cfg: dict, pp: Preprocess) -> SimCLRAugment:
    """Supervised views: the pretraining preset's flips and rotations, milder crops and colour
    jitter, no blur and no grayscale (a class must survive its view)."""
    base = get_preset(run_cfg.get("augment") or preset_for(pp.channels, pp.input_size))
    aug = replace(base, crop_scale=(0.5, 1.0), jitter_strength=min(base.jitter_strength, 0.4), jitter_p=0.5, gray_p=0.0,
                  blur_p=0.0, stain_jitter=min(base.stain_jitter, 0.03))
    return SimCLRAugment(aug, pp.input_size, pp.mean, pp.std)


# ----------------------------------------------------------------------------------------------
# the model


def linear_head(clf, num_classes: int) -> dict:
    """A fitted fit_linear pipeline as ClassifierNet head state (mean, std, weight (K, D), bias (K,))."""
    scaler, lr = clf[0], clf[-1]
    d = len(scaler.mean_)
    w, b = np.zeros((num_classes, d)), np.zeros(num_classes)
    coef, icpt = lr.coef_, lr.intercept_
    if len(lr.classes_) == 2 and coef.shape[0] == 1:  # binary: sigmoid(w.x + b) = softmax([0, w.x + b])[1]
        coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], icpt])
    for row, c in enumerate(lr.classes_):
        w[int(c)], b[int(c)] = coef[row], icpt[row]
    b[[c for c in range(num_classes) if c not in set(int(k) for k in lr.classes_)]] = -1e4  # never-seen classes
    f = torch.float32
    return {"mean": torch.as_tensor(scaler.mean_, dtype=f), "std": torch.as_tensor(np.maximum(scaler.scale_, 1e-8), dtype=f),
            "weight": torch.as_tensor(w, dtype=f), "bias": torch.as_tensor(b, dtype=f)}


@torch.no_grad()
def embed_all(fn, x: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0)


def accuracy(net: ClassifierNet, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 512) -> float:
    pred = torch.from_numpy(outputs(net, x, device, batch_size, net.logits)).argmax(1)
    return 100.0 * float((pred == y).float().mean())


@torch.no_grad()
def outputs(net, x: torch.Tensor, device, batch_size: int = 128, fn=None) -> np.ndarray:
    """net in eval mode over inputs x, as numpy: what the exported model returns (net.forward: class
    probabilities), or fn's output (e.g. net.logits)."""
    was = net.training
    net.eval()
    try:
        return embed_all(fn or net, x, device, batch_size).numpy()
    finally:
        net.train(was)


# ----------------------------------------------------------------------------------------------
# training


@dataclasses.dataclass
class Recipe:
    """How one classifier is trained (the fields of FinetuneConfig that shape training)."""

    mode: str = "full"  # linear | frozen | full
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    eval_every: int = 25
    patience: int = 4
    bn: str = "auto"  # auto | frozen | train
    augment: bool = True
    seed: int = 0
    max_minutes: float = 0.0


class Tuner:
    """One fine-tuning run's state: the net, optimiser, schedule, step, best weights; a checkpoint
    dict of all of it (resume continues the same schedule) and the SIGTERM / SIGINT stop. A task
    other than classification overrides batch, loss and val_score (SegTuner)."""

    VAL_KEY = "val_top1"  # the validation figure early stopping keeps the best of

    def __init__(self, net: ClassifierNet, recipe: Recipe, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
                 pp: Preprocess, run_cfg: dict, device):
        self.net, self.r, self.device = set_layout(recipe, net.to(device), device), recipe, device  # NCHW: the recipe has no channels_last
        self.x_raw, self.y, self.xv, self.yv = to_uint8(x, pp), y, xv, yv
        self.augment = finetune_augment(run_cfg, pp) if recipe.augment else None
        self.pp = pp
        self.bn_frozen = recipe.bn == "frozen" or (recipe.bn == "auto" and len(y) < BN_FROZEN_BELOW)
        full = recipe.mode == "full"
        net.encoder.requires_grad_(full)
        groups = [{"params": list(net.head.parameters()), "lr": recipe.lr, "weight_decay": recipe.weight_decay}]
        if full:
            enc = [p for p in net.encoder.parameters() if p.requires_grad]
            decay = [p for p in enc if p.ndim > 1]
            groups += [{"params": decay, "lr": recipe.lr * recipe.backbone_lr_ratio, "weight_decay": recipe.weight_decay},
                       {"params": [p for p in enc if p.ndim <= 1], "lr": recipe.lr * recipe.backbone_lr_ratio, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups)
        self.sched = build_scheduler(self.opt, recipe.steps, max(1, recipe.steps // 20))
        self.step, self.best_acc, self.best_step, self.bad_evals = 0, -1.0, 0, 0
        self.best = copy.deepcopy(net.state_dict())
        self.history: list[dict] = []
        self.stop_signal: int | None = None

    def state(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "step": self.step, "best": self.best, "best_acc": self.best_acc, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "history": list(self.history), "rng": checkpoint.rng_state()}

    def restore(self, s: dict) -> None:
        self.net.load_state_dict(s["net"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.step, self.best, self.best_acc = s["step"], s["best"], s["best_acc"]
        self.best_step, self.bad_evals, self.history = s["best_step"], s["bad_evals"], list(s["history"])
        checkpoint.set_rng_state(s.get("rng") or {})

    def train_mode(self) -> None:
        self.net.train()
        if self.r.mode != "full":
            self.net.encoder.eval()  # frozen: the encoder is a fixed feature extractor
        elif self.bn_frozen:
            for m in batchnorms(self.net.encoder):
                m.eval()  # running statistics stay; the affine parameters still train

    def draw(self) -> tuple[np.random.Generator, torch.Tensor]:
        """This step's generator and the indices of its batch of labelled images."""
        g = np.random.default_rng([self.r.seed, self.step])
        return g, torch.as_tensor(g.choice(len(self.y), min(self.r.batch_size, len(self.y)), replace=False))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, idx = self.draw()
        if self.augment is None:
            xb = normalized(self.x_raw[idx].float() / 255, self.pp)
        else:
            xb = self.augment(self.x_raw[idx], view_generator(self.r.seed, 0, self.step, 0))
        return xb.to(self.device), self.y[idx].to(self.device)

    def run(self, metrics: MetricsLog | None = None, save=None, stage: str = "finetune") -> bool:
        """Train to the end of the schedule, early stopping or a signal; the best-validation weights
        are loaded at the end. Returns whether it finished (False: stopped by a signal or the clock)."""
        r = self.r
        if r.mode == "linear" or r.steps == 0:
            return True
        deadline = time.time() + 60 * r.max_minutes if r.max_minutes else None
        if self.step == 0 and len(self.yv) and not self.history:
            self.evaluate(metrics)  # the linear-probe start is a candidate: fine-tuning must beat it on validation
        done = self.bad_evals >= r.patience
        self.train_mode()
        while self.step < r.steps and not done:
            xb, yb = self.batch()
            loss = self.loss(xb, yb)
            loss = faults.poison_loss(loss, stage, self.step, 0)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"the fine-tuning loss became {loss.item()} at step {self.step}; nothing past the last "
                                    f"checkpoint was written. Lower --lr (now {r.lr}) or --backbone-lr-ratio, then --resume")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.step += 1
            if metrics is not None and (self.step % 10 == 0 or self.step == r.steps):
                metrics.log({"loss": float(loss.detach()), "lr": self.opt.param_groups[0]["lr"]}, None, self.step)
            if self.step % r.eval_every == 0 or self.step == r.steps:
                done = self.evaluate(metrics)
                self.train_mode()
                if save is not None:
                    save()
            faults.maybe_kill(stage, self.step, 0)
            if self.stop_signal is not None or (deadline is not None and time.time() > deadline):
                if save is not None:
                    save()
                return False
        self.net.load_state_dict(self.best)
        return True

    def loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net.logits(xb), yb, label_smoothing=self.r.label_smoothing)

    def val_score(self) -> float:
        return accuracy(self.net, self.xv, self.yv, self.device)

    def evaluate(self, metrics) -> bool:
        """Validation accuracy now; keeps the best weights; True when patience ran out."""
        if not len(self.yv):  # no validation images: the last step's weights are the result
            self.best, self.best_step = copy.deepcopy(self.net.state_dict()), self.step
            return False
        acc = self.val_score()
        self.history.append({"step": self.step, self.VAL_KEY: acc})
        if metrics is not None:
            metrics.log({self.VAL_KEY: acc}, None, self.step)
        if acc >= self.best_acc:  # a tie goes to the later, longer-trained weights
            self.best_acc, self.best_step, self.bad_evals = acc, self.step, 0
            self.best = copy.deepcopy(self.net.state_dict())
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.r.patience


def build_classifier(encoder: Encoder, x: torch.Tensor, y: torch.Tensor, num_classes: int, recipe: Recipe, device) -> ClassifierNet:
    """ClassifierNet with the linear probe of the clean labelled images as its head (every mode starts there)."""
    net = ClassifierNet(encoder, num_classes).to(device)
    encoder.eval()
    f = embed_all(encoder.embed, x, device).numpy()
    clf = fit_linear(f, y.numpy(), recipe.seed)
    log.info("linear probe: %s", clf.probe_c)
    net.load_head(linear_head(clf, num_classes))
    net.probe = {"c": float(clf[-1].C), "how": clf.probe_c}  # result.json's `probe`: the head every mode starts from
    return net


def train_classifier(encoder: Encoder, x, y, xv, yv, num_classes: int, recipe: Recipe, pp: Preprocess, run_cfg: dict,
                     device) -> tuple[ClassifierNet, Tuner]:
    """A classifier trained without checkpoints (the label-efficiency curve's runs)."""
    net = build_classifier(encoder, x, y, num_classes, recipe, device)
    tuner = Tuner(net, recipe, x, y, xv, yv, pp, run_cfg, device)
    tuner.run()
    return tuner.net.eval(), tuner


# ----------------------------------------------------------------------------------------------
# the label-efficiency curve (`edgeclr eval --label-efficiency`)



def random_encoder(spec, sck: dict, device, seed: int) -> Encoder:
    """The source's architecture (its pruning plan included) with random weights: the baseline."""
    torch.manual_seed(seed)
    return (_random_like(sck, device) if sck.get("pruning") else create_model(spec)).to(device)


def curve_draw(y_bank: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One draw of the few-label curve: (train, validation, every drawn index); kNN and the probe
    use every drawn label, fine-tuning holds the validation share out."""
    tr, va = draw_labeled(y_bank, per_class=per_class, seed=seed, val_fraction=0.2)
    return tr, va, np.sort(np.concatenate([tr, va]))


def label_efficiency(encoder: Encoder, sck: dict, pp: Preprocess, held, feats: dict, levels: list[int], draws: int,
                     finetune_steps: int, run_cfg: dict, device, seed: int = 0) -> dict:
    """Accuracy on the whole query split against labelled images per class, over `draws` stratified
    draws of the bank (seeds seed .. seed+draws-1): kNN and the linear probe on each of `feats`
    ({key: (name, bank features, query features)}), and, with finetune_steps, full fine-tuning
    (the `edgeclr finetune` recipe) from the encoder and from random weights."""
    from edgeclr.heldout import knn_accuracy

    y_bank, y_query = held.bank_y.numpy(), held.query_y.numpy()
    counts = np.bincount(y_bank)
    short = [n for n in levels if n > counts[counts > 0].min()]
    if short:
        raise DataError(f"--label-efficiency {','.join(map(str, short))}: the smallest class has {counts[counts > 0].min()} "
                        "labelled bank images; give levels up to that")
    cells: dict[tuple[str, str], dict[int, list[float]]] = {}
    names = {key: name for key, (name, _, _) in feats.items()}
    t0 = time.time()
    for n in levels:
        for d in range(draws):
            s = seed + d
            tr, va, every = curve_draw(y_bank, n, s)
            for key, (_, fb, fq) in feats.items():
                acc_knn = knn_accuracy(fb[every], held.bank_y[every], fq, held.query_y, held.k, held.t)
                acc_lin = linear_probe(fb[every].numpy(), y_bank[every], fq.numpy(), y_query, s)
                cells.setdefault(("knn", key), {}).setdefault(n, []).append(acc_knn)
                cells.setdefault(("linear", key), {}).setdefault(n, []).append(acc_lin)
            for init in (("model", "random") if finetune_steps else ()):
                enc = copy.deepcopy(encoder) if init == "model" else random_encoder(encoder.spec, sck, device, s)
                recipe = Recipe(mode="full", steps=finetune_steps, seed=s)
                net, _ = train_classifier(enc, held.bank_x[tr], held.bank_y[tr], held.bank_x[va], held.bank_y[va],
                                          held.num_classes, recipe, pp, run_cfg, device)
                cells.setdefault(("finetune", init), {}).setdefault(n, []).append(accuracy(net, held.query_x, held.query_y, device))
                names.setdefault(init, f"{sck['spec']['name']} random init")
        log.info("label efficiency: %d per class done (%.0f s)", n, time.time() - t0)
    rows = [{"method": m, "features": key, "name": names[key],
             "points": [{"per_class": n, "mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for n, v in sorted(pts.items())]}
            for (m, key), pts in cells.items()]
    return {"levels": list(levels), "draws": draws, "finetune_steps": finetune_steps, "bank_images": int(len(y_bank)),
            "query_images": int(len(y_query)), "knn_k": held.k, "knn_t": held.t, "rows": rows, "wall_time_s": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------------------------
# `edgeclr finetune`


def source_checkpoint(cfg) -> Path:
    """The encoder to start from: a checkpoint file, a stage folder's, or a run folder's --stage
    checkpoint (loading.find_checkpoint's rule, with --stage as the role)."""
    try:
        return find_checkpoint(cfg.source, None if cfg.stage == "model" else cfg.stage)  # a role of loading.ROLES
    except CheckpointError as e:
        raise CheckpointError(f"{e} (--stage teacher|student|pruned|model picks a run folder's encoder)") from None


def labeled_splits(data_spec: str, pp: Preprocess, run_cfg: dict, seed: int):
    train = open_like_run(data_spec, "train", pp.resize_size, run_cfg, seed)
    test = open_like_run(data_spec, "test", pp.resize_size, run_cfg, seed)
    if not (data.has_labels(train) and data.has_labels(test)):
        raise DataError(f"{data_spec} has no class labels: fine-tuning a classifier needs labelled images (a folder with a "
                        "sub-folder per class, or a labelled dataset via --data)")
    return train, test


def class_names(ds, num_classes: int) -> list[str]:
    names = getattr(ds, "classes", None)
    return [str(c) for c in names] if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def main(cfg) -> dict:
    """`edgeclr finetune`: train, test, checkpoint and export one few-label classifier."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    src = source_checkpoint(cfg)
    encoder, sck, src = load_encoder(src, device)
    if sck["stage"] == "finetune":
        raise ConfigError(f"{src} is already a fine-tuned classifier: fine-tune from its source run instead")
    pp = Preprocess.from_dict(sck["preprocess"])
    run_cfg = sck.get("config") or {}
    data_spec = cfg.data or run_cfg.get("data")
    if not data_spec:
        raise ConfigError(f"{src} does not record its dataset: pass --data")
    out_dir = Path(cfg.out) if cfg.out else checkpoint.run_dir_of(src) / ("label_efficiency" if cfg.label_efficiency else "finetune")
    with hold(out_dir, "the fine-tuning folder", is_dir=True):
        return _finetune(cfg, encoder, sck, src, pp, run_cfg, data_spec, out_dir, device, t0)


@dataclasses.dataclass
class Job:
    """The task-specific part of one fine-tuning run: the labelled, validation and test inputs
    (normalised, (N, C, S, S)) with their labels (classes (N,) or masks (N, S, S)), the draw
    (checked on --resume), the class names and the exported file's name."""

    task: str
    x: torch.Tensor
    y: torch.Tensor
    xv: torch.Tensor
    yv: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor
    draw: dict
    classes: list[str]
    name: str
    calib: np.ndarray | None = None  # INT8 calibration inputs (None: from the dataset, as compress does)


def classify_job(cfg, data_spec: str, pp: Preprocess, run_cfg: dict) -> Job:
    """A classifier's labelled draw, its validation share and the test split."""
    train_ds, test_ds = labeled_splits(data_spec, pp, run_cfg, cfg.seed)
    k = int(max(train_ds.labels.max(), test_ds.labels.max())) + 1
    tr_idx, va_idx = draw_labeled(train_ds.labels, cfg.labels_per_class, cfg.labels_fraction, cfg.seed,
                                  0.0 if cfg.mode == "linear" else cfg.val_fraction)  # the probe has nothing to stop early
    x, kept = eval_inputs(train_ds, pp, tr_idx)
    xv, kept_v = eval_inputs(train_ds, pp, va_idx) if len(va_idx) else (torch.zeros(0, *x.shape[1:]), va_idx)
    xt, kept_t = eval_inputs(test_ds, pp, _subsample(len(test_ds), cfg.max_test, cfg.seed))
    return Job("classify", x, torch.as_tensor(train_ds.labels[kept]), xv, torch.as_tensor(train_ds.labels[kept_v]), xt,
               torch.as_tensor(test_ds.labels[kept_t]), {"train": tr_idx.tolist(), "val": va_idx.tolist()},
               class_names(train_ds, k), "classifier")


def recipe_of(cfg, **changes) -> Recipe:
    """The Recipe of a FinetuneConfig (its fields that shape training), with `changes`."""
    return Recipe(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Recipe)}, **changes})


def build_tuner(job: Job, encoder: Encoder, recipe: Recipe, pp: Preprocess, run_cfg: dict, device, cfg) -> Tuner:
    if job.task == "segment":
        net = SegmenterNet(encoder, len(job.classes), cfg.output_stride, seg_head_for(encoder.spec.name, cfg.seg_head)).to(device)
        log.info("segmenter: %s, %s head at output stride %d (%.2fM head parameters)", encoder.spec.name, net.head_name,
                 net.output_stride, sum(p.numel() for p in net.head.parameters()) / 1e6)
        return SegTuner(net, recipe, job.x, job.y, job.xv, job.yv, pp, run_cfg, device)
    net = build_classifier(encoder, job.x, job.y, len(job.classes), recipe, device)
    return Tuner(net, recipe, job.x, job.y, job.xv, job.yv, pp, run_cfg, device)


def segment_curve(cfg, encoder: Encoder, sck: dict, pp: Preprocess, run_cfg: dict, out_dir: Path, device, t0: float) -> dict:
    """`finetune --task segment --label-efficiency 4,16,0`: test mIoU against the number of
    labelled tiles, over --draws draws each, for the encoder frozen and fully fine-tuned and for full
    fine-tuning from random weights (the recipe of `edgeclr finetune` each time, no checkpoints);
    OUT/label_efficiency.{json,md,png} and OUT/report.{md,html}."""
    pool, train_pool, xt_raw, yt_raw = segment_pool(cfg, pp)
    levels = cfg.tile_levels()
    short = [n for n in levels if n > len(train_pool) or (n == 0 and len(train_pool) < 2)]
    if short or len(train_pool) < 2:
        raise DataError(f"--label-efficiency {cfg.label_efficiency}: {len(train_pool)} labelled tile(s) of {pp.input_size} px "
                        "to train on; give counts up to that (0 = all)")
    if (out_dir / "label_efficiency.json").exists():
        raise ConfigError(f"{out_dir} already holds a label-efficiency curve: choose another --out (nothing was overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    xt, yt = tiles_tensor(xt_raw, pp), yt_raw.astype(np.int64)
    head = seg_head_for(encoder.spec.name, cfg.seg_head)
    name = sck["spec"]["name"]
    names = {"model": f"{name} ({sck['stage']})", "random": f"{name} random init"}
    arms = (("frozen", "model"), ("finetune", "model"), ("finetune", "random"))
    cells: dict[tuple[str, str], dict[int, list[float]]] = {}
    used: dict[int, int] = {}
    for n in levels:
        for d in range(cfg.draws):
            s = cfg.seed + d
            tr, va = draw_tiles(len(train_pool), n, s, cfg.val_fraction)
            tr, va = train_pool[tr], train_pool[va]
            used[n] = len(tr) + len(va)
            (x, y), (xv, yv) = labelled_tiles(pool, tr, pp), labelled_tiles(pool, va, pp)
            for method, init in arms:
                enc = copy.deepcopy(encoder) if init == "model" else random_encoder(encoder.spec, sck, device, s)
                recipe = recipe_of(cfg, mode="frozen" if method == "frozen" else "full", seed=s)
                torch.manual_seed(s)
                net = SegmenterNet(enc, len(pool.classes), cfg.output_stride, head).to(device)
                tuner = SegTuner(net, recipe, x, y, xv, yv, pp, run_cfg, device)
                tuner.run()
                miou = tasks.TASKS["segment"].score(outputs(tuner.net.eval(), xt, device), yt)["miou"]
                cells.setdefault((method, init), {}).setdefault(n, []).append(miou)
        log.info("label efficiency: %s labelled tiles done (%.0f s)", n or "all", time.time() - t0)
    le = {"task": "segment", "unit": "tiles", "levels": levels, "level_counts": [used[n] for n in levels], "draws": cfg.draws,
          "finetune_steps": cfg.steps, "bank_images": int(len(train_pool)), "query_images": int(len(yt)), "seg_head": head,
          "rows": [{"method": m, "features": key, "name": names[key],
                    "points": [{"level": n, "mean": float(np.mean(v)), "std": float(np.std(v)), "values": v}
                               for n, v in sorted(pts.items(), key=lambda kv: levels.index(kv[0]))]}
                   for (m, key), pts in cells.items()],
          "wall_time_s": round(time.time() - t0, 1)}
    report.write_label_efficiency(le, out_dir)
    paths = report.write(out_dir, report.segmenter_blocks(out_dir))
    return {"stage_dir": str(out_dir), "label_efficiency": str(out_dir / "label_efficiency.json"), "report": paths["md"],
            "table": (out_dir / "label_efficiency.md").read_text().rstrip("\n"), "verdict": report.label_efficiency_verdict(le),
            "completed": True}


def _finetune(cfg, encoder, sck, src, pp, run_cfg, data_spec, out_dir, device, t0) -> dict:
    if cfg.task == "segment" and cfg.label_efficiency:
        return segment_curve(cfg, encoder, sck, pp, run_cfg, out_dir, device, t0)
    job = segment_job(cfg, pp) if cfg.task == "segment" else classify_job(cfg, data_spec, pp, run_cfg)  # before anything is written
    if cfg.init == "random":
        encoder = random_encoder(encoder.spec, sck, device, cfg.seed)
    elif cfg.init != "pretrained":  # a weights file: refused before anything is written
        encoder = encoder_from_file(cfg.init, encoder.spec, sck, device, cfg.seed)
    resume_from = prepare_stage_dir(out_dir, cfg.resume)
    recipe = recipe_of(cfg)
    log.info("%s: %d labelled training %s (%d classes), %d for validation, %d test; mode %s, init %s", data_spec, len(job.y),
             "tiles" if job.task == "segment" else "images", len(job.classes), len(job.yv), len(job.yt), cfg.mode, cfg.init)
    tuner = build_tuner(job, encoder, recipe, pp, run_cfg, device, cfg)
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    if resume_from is not None:
        ck, _ = checkpoint.load_for_resume(resume_from)
        if ck.get("draw") != job.draw or ck.get("source", {}).get("sha256") != checkpoint.sha256(src) or ck.get("task") != job.task:
            raise checkpoint.CheckpointError(f"cannot resume {ckpt_path}: it was fine-tuned from other labelled images, another "
                                             "encoder or for another task; use the same --labels-per-class/--tiles/--seed/"
                                             "source, or another --out")
        tuner.restore(ck["tuner"])

    def ckpt_dict(final: bool) -> dict:
        n = tuner.net
        return {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "stage": "finetune",
                "task": job.task, "edgeclr_version": edgeclr.__version__, "model": n.encoder.state_dict(),
                "spec": n.encoder.spec.to_dict(), "preprocess": pp.to_dict(), "pruning": sck.get("pruning"),
                "head": n.head_state(), "classes": job.classes, **n.checkpoint_extras(),
                "config": {**run_cfg, "data": data_spec, "finetune": config.to_dict(cfg)},
                "source": {"path": str(src), "sha256": checkpoint.sha256(src), "stage": sck["stage"], "init": cfg.init},
                "draw": job.draw, "tuner": None if final else tuner.state(), "completed": final, "step": tuner.step, "epoch": 0}

    def save():
        checkpoint.save(ckpt_dict(False), ckpt_path)

    metrics = MetricsLog(out_dir / "metrics.csv", "finetune")
    old = {s: signal.signal(s, lambda signum, frame: setattr(tuner, "stop_signal", signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        finished = tuner.run(metrics, save)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        metrics.close()
    if not finished:
        log.warning("stopped at step %d with a checkpoint: --resume continues", tuner.step)
        exit_for_signal(tuner.stop_signal)
        return {"stage_dir": str(out_dir), "checkpoint": str(ckpt_path), "completed": False, "step": tuner.step}
    net = tuner.net.eval()
    probs = outputs(net, job.xt, device)
    score = tasks.TASKS[job.task].score(probs, job.yt.numpy())
    result = {"task": job.task, **{f"test_{k_}": v for k_, v in score.items()},
              tuner.VAL_KEY: tuner.best_acc if len(job.yv) else None, "best_step": tuner.best_step, "steps_run": tuner.step,
              "train_images": len(job.y), "val_images": len(job.yv), "test_images": len(job.yt), "classes": job.classes,
              "mode": cfg.mode, "init": cfg.init, "source_stage": sck["stage"], "bn_frozen": tuner.bn_frozen,
              **({"probe": net.probe} if hasattr(net, "probe") else {}),
              **({"seg_head": net.head_name, "output_stride": net.output_stride} if job.task == "segment" else {})}
    checkpoint.save(ckpt_dict(True), ckpt_path)
    log.info("test %s (%d labelled, mode %s)", tasks.describe_score(result), len(job.y), cfg.mode)
    if job.task == "segment":
        overlay_sheet(job.xt, job.yt.numpy(), probs.argmax(1), pp, np.asarray(ckpt_dict(True)["palette"], np.uint8),
                      job.classes).save(out_dir / "overlays.png")
    artifacts = export_model(cfg, ckpt_path, out_dir, data_spec, pp, run_cfg, job)
    result["artifacts"] = artifacts
    write_json_atomic(result, out_dir / "result.json")
    if job.task == "segment":
        log.info("report: %s", report.write(out_dir, report.segmenter_blocks(out_dir))["md"])
    write_manifest(out_dir, "finetune", inputs={"source": str(src), "source_sha256": checkpoint.sha256(src), "data": data_spec},
                   spec=sck["spec"], preprocess=pp.to_dict(), embed_dim=encoder.embed_dim,
                   metrics={k_: v for k_, v in result.items() if isinstance(v, (int, float)) and v is not None},
                   wall_time_s=time.time() - t0, artifacts={"checkpoint": str(ckpt_path), **{k_: a["path"] for k_, a in artifacts.items()}})
    return {"stage_dir": str(out_dir), "checkpoint": str(ckpt_path), "completed": True, **result}


def _subsample(n: int, max_n: int, seed: int) -> np.ndarray | None:
    return np.sort(np.random.default_rng(seed).choice(n, max_n, replace=False)) if max_n and n > max_n else None


def encoder_from_file(path: str, spec, sck: dict, device, seed: int) -> Encoder:
    """The source's architecture with the weights of a state dict the user has (torchvision's
    names, e.g. ImageNet weights: the baseline that cannot be downloaded here): every tensor whose
    name and shape fit is loaded, the rest (a replaced stem, the classifier) stays random.

    Raises:
        ConfigError: not a state dict torch loads with weights_only=True, or one of another
            architecture (under half of the backbone's tensors fit).
    """
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and EOF errors of a file that is not a safe state dict)
        raise ConfigError(f"--init {path}: not a state dict that loads with weights_only=True ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:150]}); give a torchvision state dict (.pth) or pretrained | random") from e
    for key in ("state_dict", "model"):  # a training checkpoint that wraps its weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--init {path}: holds a {type(sd).__name__}, not a dict of tensors (a state dict)")
    encoder = random_encoder(spec, sck, device, seed)
    target = encoder.backbone.state_dict()
    names = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    fit = {k: v for k, v in names.items() if k in target and tuple(target[k].shape) == tuple(v.shape)}
    if len(fit) < len(target) / 2:
        raise ConfigError(f"--init {path}: {len(fit)} of the {len(target)} tensors of the source's backbone "
                          f"({sck['spec']['name']}) fit it: these are weights of another architecture or width")
    encoder.backbone.load_state_dict(fit, strict=False)
    log.info("--init %s: %d of %d backbone tensors loaded; %d kept random (%s)", path, len(fit), len(target), len(target) - len(fit),
             ", ".join(sorted(set(target) - set(fit)))[:200] or "none")
    return encoder


def _random_like(sck: dict, device) -> Encoder:
    """A random-init encoder with a pruned checkpoint's channel plan (the same architecture)."""
    from edgeclr.models import ModelSpec, apply_pruning

    m = create_model(ModelSpec.from_dict(sck["spec"]))
    apply_pruning(m, sck["pruning"], sck["preprocess"])
    return m.to(device)


HEAD_OPS = {"Gemm", "MatMul", "Softmax", "SoftMax", "Sub", "Subtract", "Div", "Divide", "Add"}


def head_nodes(path: Path) -> list[str]:
    """Names of the nodes after the encoder's global pooling in an exported classifier (the
    standardisation, the linear head, the softmax): what INT8 leaves in float."""
    if path.suffix == ".onnx":
        import onnx

        nodes = [(n.op_type, n.name) for n in onnx.load(str(path)).graph.node]
    else:
        from edgeclr.runtime import openvino_core

        nodes = [(op.get_type_name(), op.get_friendly_name()) for op in openvino_core().read_model(str(path)).get_ordered_ops()]
    pool = max((i for i, (t, _) in enumerate(nodes) if t in ("GlobalAveragePool", "ReduceMean", "AvgPool", "ReduceMean")), default=-1)
    return [name for t, name in nodes[pool + 1:] if t in HEAD_OPS]


def export_model(cfg, ckpt_path: Path, out_dir: Path, data_spec: str, pp: Preprocess, run_cfg: dict, job: Job) -> dict[str, dict]:
    """NAME.onnx / .xml (FP32, parity-checked by export), and with --int8 their INT8 models through
    compress's quantisers; each file's test score through the runtime and the task's scorer."""
    from edgeclr import export
    from edgeclr.compress.quantize import calibration_inputs, write_int8
    from edgeclr.runtime import open_model

    task = tasks.TASKS[job.task]

    def test_score(path: Path) -> dict:
        got = open_model(path, threads=0, precision="f32").run_arrays(job.xt.numpy(), 64)
        return {f"test_{k}": v for k, v in task.score(got, job.yt.numpy()).items()}

    parity_data = data_spec  # real images at the tile size: a segmenter's images cut into tiles (slides are already)
    if job.task == "segment" and not str(data_spec).startswith("slide:"):
        parity_data = f"tiles:{data_spec}"
    out: dict[str, dict] = {}
    calib = job.calib
    for fmt in [f for f in cfg.formats.split(",") if f]:
        e = export.main(config.ExportConfig(target=str(ckpt_path), format=fmt, out=str(out_dir / "export"), name=job.name,
                                            data=parity_data))
        p = Path(e["path"])
        out[f"{fmt}-fp32"] = {"path": str(p), **test_score(p), "parity": e["parity"]}
        if not cfg.int8:
            continue
        if calib is None:
            calib = calibration_inputs(data_spec, pp, cfg.calib_images, cfg.seed, run_cfg)
        q = p.with_name(f"{job.name}-int8{p.suffix}")
        head = head_nodes(p) if job.task == "classify" else []  # a classifier's head stays in float: a few hundred MACs
        write_int8(p, q, calib, cfg.int8_target, head)
        out[f"{fmt}-int8"] = {"path": str(q), **test_score(q)}
    for k_, a in out.items():
        log.info("%s: %s, test %s", k_, a["path"], tasks.describe_score(a))
    return out


# ----------------------------------------------------------------------------------------------
# segmentation: tiles with masks, SegTuner


def tiles_tensor(t: np.ndarray, pp: Preprocess) -> torch.Tensor:
    """(N, S, S, C) uint8 tiles -> (N, C, S, S) float32, normalised as the runtime does."""
    return normalized(torch.from_numpy(np.ascontiguousarray(t)).permute(0, 3, 1, 2).float() / 255, pp)


def labelled_tiles(pool: data.MaskedTiles, idx: np.ndarray, pp: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """(model inputs (N, C, S, S), masks (N, S, S) int64) of the pool's tiles at positions idx."""
    return tiles_tensor(pool.images[idx], pp), torch.from_numpy(pool.masks[idx].astype(np.int64))


def draw_tiles(n: int, count: int, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions of `count` tiles drawn from n (0 = all); from VAL_FROM drawn
    tiles on, val_fraction of them validate."""
    idx = np.random.default_rng(seed).permutation(n)[: count or n]
    nv = int(round(len(idx) * val_fraction)) if len(idx) >= VAL_FROM else 0
    return np.sort(idx[nv:]), np.sort(idx[:nv])


def segment_pool(cfg, pp: Preprocess) -> tuple[data.MaskedTiles, np.ndarray, np.ndarray, np.ndarray]:
    """(every labelled tile, the positions of those that may train, test tiles, test masks): the
    test tiles are --test-data's, or --test-fraction of the pool (seeded)."""
    s = pp.input_size
    pool = data.load_masked(cfg.data, cfg.masks, s, s, pp.channels, cfg.classes)
    if cfg.test_data:
        test = data.load_masked(cfg.test_data, cfg.test_masks, s, s, pp.channels, classes=pool.classes)
        train_pool, xt, yt = np.arange(len(pool.masks)), test.images, test.masks
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(pool.masks))
        nt = max(1, int(round(len(order) * cfg.test_fraction)))
        test_idx = np.sort(order[:nt])
        train_pool, xt, yt = np.sort(order[nt:]), pool.images[test_idx], pool.masks[test_idx]
    return pool, train_pool, xt, yt


def segment_job(cfg, pp: Preprocess) -> Job:
    """A segmenter's labelled tiles: the train / validation draw, the test tiles, calibration tiles."""
    s = pp.input_size
    pool, train_pool, xt, yt = segment_pool(cfg, pp)
    if len(train_pool) < 2 or cfg.tiles > len(train_pool):
        raise DataError(f"{cfg.data}: {len(train_pool)} labelled tile(s) of {s} px to train on (--tiles {cfg.tiles or 'all'}); "
                        "a segmenter needs >= 2: larger or more images, --test-data for the test tiles, or fewer --tiles")
    tr, va = draw_tiles(len(train_pool), cfg.tiles, cfg.seed, cfg.val_fraction)
    tr, va = train_pool[tr], train_pool[va]
    calib = np.random.default_rng(cfg.seed).permutation(len(pool.masks))[:cfg.calib_images]
    return Job("segment", *labelled_tiles(pool, tr, pp), *labelled_tiles(pool, va, pp), tiles_tensor(xt, pp),
               torch.from_numpy(yt.astype(np.int64)), {"train": tr.tolist(), "val": va.tolist()}, pool.classes, "segmenter",
               tiles_tensor(pool.images[np.sort(calib)], pp).numpy())


def overlay_sheet(x: torch.Tensor, truth: np.ndarray, pred: np.ndarray, pp: Preprocess, palette: np.ndarray,
                  classes: list[str], n: int = 6) -> Image.Image:
    """Up to n test tiles, the most labelled (non-background) first, each as image | truth |
    prediction with the class colours blended in (unlabelled pixels left as they are), and a
    colour key: what a pathologist looks at before trusting an mIoU."""
    from PIL import ImageDraw

    from edgeclr.runtime.embedder import overlay

    fg = ((truth > 0) & (truth < len(classes))).reshape(len(truth), -1).sum(1)
    pick = np.argsort(-fg, kind="stable")[:n]
    tiles = to_uint8(x[torch.as_tensor(pick)], pp).permute(0, 2, 3, 1).numpy()
    s = x.shape[-1]
    z = max(1, 96 // s)  # small tiles drawn larger, pixels kept sharp
    side, gap, head = s * z, 4, 16
    key_rows = -(-len(classes) // 4)
    sheet = Image.new("RGB", (3 * side + 4 * gap, head + len(pick) * (side + gap) + gap + 14 * key_rows), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(("image", "truth", "prediction")):
        draw.text((gap + c * (side + gap), 2), title, fill="black")
    for r, (i, tile) in enumerate(zip(pick, tiles)):
        y = head + r * (side + gap)
        for c, im in enumerate((Image.fromarray(tile[:, :, 0] if tile.shape[2] == 1 else tile).convert("RGB"),
                                overlay(tile, truth[i], palette), overlay(tile, pred[i], palette))):
            sheet.paste(im.resize((side, side), Image.NEAREST), (gap + c * (side + gap), y))
    y0 = head + len(pick) * (side + gap) + gap
    for k, name in enumerate(classes):
        cx, cy = gap + (k % 4) * ((3 * side) // 4), y0 + 14 * (k // 4)
        draw.rectangle((cx, cy + 2, cx + 9, cy + 11), fill=tuple(int(v) for v in palette[k]), outline="black")
        draw.text((cx + 13, cy), name[:18], fill="black")
    return sheet


class SegTuner(Tuner):
    """Tuner for a SegmenterNet: tiles and masks flipped and turned together, mild contrast,
    brightness and tint jitter (and HED stain jitter when the run pretrained with it), a loss that
    ignores unlabelled pixels, validation mIoU."""

    VAL_KEY = "val_miou"

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g, idx = self.draw()
        bs = len(idx)
        xb, yb = self.x_raw[idx].float() / 255, self.y[idx]  # (B, C, S, S) in [0, 1], (B, S, S)
        if self.r.augment:
            k = int(g.integers(4))
            xb, yb = torch.rot90(xb, k, (2, 3)), torch.rot90(yb, k, (1, 2))
            if g.random() < 0.5:
                xb, yb = xb.flip(3), yb.flip(2)
            scale = torch.from_numpy(g.uniform(0.85, 1.15, (bs, 1, 1, 1))).float()
            shift = torch.from_numpy(g.uniform(-0.06, 0.06, (bs, xb.shape[1], 1, 1))).float()
            mean = xb.mean((1, 2, 3), keepdim=True)
            xb = ((xb - mean) * scale + mean + shift).clamp(0, 1)
            sigma = self.augment.cfg.stain_jitter if self.augment is not None else 0.0  # the run's histology preset
            if sigma and xb.shape[1] == 3:
                xb = hed_jitter(xb, torch.Generator().manual_seed(int(g.integers(1 << 31))), sigma)
        return normalized(xb, self.pp).contiguous().to(self.device), yb.contiguous().to(self.device)

    def loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net.logits(xb), yb, ignore_index=data.IGNORE)

    def val_score(self) -> float:
        return tasks.TASKS["segment"].score(outputs(self.net, self.xv, self.device), self.yv.numpy())["miou"]
