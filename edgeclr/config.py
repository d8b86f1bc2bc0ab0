"""Stage configs: one dataclass per stage, one help line per field (it is also the CLI's --help).

Precedence, lowest first: field defaults < dataset preset < --config FILE (YAML or TOML) <
command-line options. Fields left at None are filled from the preset of the dataset in
`__post_init__`; the resolved config is saved as `config.yaml` in the stage's run folder.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from edgeclr import stages
from edgeclr.errors import ConfigError  # noqa: F401  (raised here; defined with the others)
from edgeclr.formats import EXPORT_FORMATS


def opt(default: Any, help: str, choices: tuple | None = None, cli: bool = True, off: str | None = None, path: bool = False):
    """A config field with its help line (and allowed values, checked in __post_init__; for a
    bool, `off` names the negative flag, e.g. "static-batch" for --dynamic-batch). `path`: the value
    names an input file or folder (the CLI's bad-input sweep, tests/faults/test_bad_inputs.py, feeds it
    missing, empty, garbage and wrong-kind paths)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli, "off": off, "path": path})


def data_kind(spec: str) -> str:
    kind = spec.partition(":")[0]
    if kind == "slide":  # tiles of whole-slide images: the tiles preset
        return "tiles"
    return kind if kind in ("digits", "fashion-mnist", "cifar10", "stl10", "tiles") else "folder"


# Per-dataset defaults for fields left at None. These are the recipes that the benchmarks
# measured (benchmarks/results/); the comment says what each is for.
DATA_PRESETS: dict[str, dict[str, Any]] = {
    # 1,797 8x8 images: 40 s on 2 CPU cores, 92.9% kNN (the first preset, width 32 x 30 epochs, took 9 min for 92.2%)
    "digits": dict(model="resnet18", width=16, stem_stride=1, input_size=16, batch_size=128, epochs=15,
                   optimizer="adamw", lr=2e-3, weight_decay=1e-4, temperature=0.2, augment="small-gray",
                   crop_scale=(0.4, 1.0)),
    # 60k 28x28 grayscale images; recipe from benchmarks/fashion_mnist_teacher.py, 86.89% kNN in 60 min on 2 cores
    # (teacher_sweep.py: a last stage at layer3's resolution, temperature 0.1, crops from 0.2, jitter 1.0 and lr 4e-3
    # each helped)
    "fashion-mnist": dict(model="resnet18", width=16, stem_stride=2, last_stride=1, input_size=28, batch_size=256,
                          epochs=32, optimizer="adamw", lr=4e-3, weight_decay=1e-4, temperature=0.1, augment="small-gray",
                          crop_scale=(0.2, 1.0), jitter=1.0),
    "cifar10": dict(model="resnet18", stem_stride=1, input_size=32, batch_size=256, epochs=200, optimizer="sgd",
                    lr=0.3, weight_decay=5e-4, temperature=0.2, augment="small-rgb"),
    "stl10": dict(model="resnet18", stem_stride=2, input_size=96, batch_size=256, epochs=100, optimizer="sgd",
                  lr=0.3, weight_decay=5e-4, temperature=0.2, augment="rgb"),
    "tiles": dict(model="resnet18", stem_stride=4, input_size=64, batch_size=128, epochs=50, optimizer="sgd",
                  lr=0.3, weight_decay=1e-4, temperature=0.2, augment="histo"),
    "folder": dict(model="resnet18", stem_stride=4, input_size=96, batch_size=128, epochs=50, optimizer="sgd",
                   lr=0.3, weight_decay=1e-4, temperature=0.2, augment=None),
}


@dataclass
class TrainConfig:
    """`edgeclr train`: SimCLR pretraining of an encoder on unlabeled images."""

    data: str = opt("digits", "dataset: digits | fashion-mnist[:DIR] | cifar10:DIR | stl10:DIR | tiles:IMAGE[,IMAGE] | "
                              "slide:FILE[,FILE][@level=N|@mpp=X] | a folder of images", path=True)
    out: str = opt("runs/default", "run folder; this stage writes into OUT/train")
    model: str | None = opt(None, "registry name of the encoder (resnet18, resnet34, resnet50, mobilenet_*)")
    width: int | None = opt(None, "ResNet base width (64 = the paper's ResNet; smaller is faster on a CPU)")
    last_stride: int | None = opt(None, "ResNet last-stage stride: 2 = the paper's, 1 = keep layer3's resolution (small images)")
    stem_stride: int | None = opt(None, "stride of the stem: 4 = ImageNet stem, 2 = 3x3 conv + max-pool, 1 = CIFAR stem")
    input_size: int | None = opt(None, "side of the square training and evaluation input, in pixels")
    head_hidden: int | None = opt(None, "projection head hidden width (default: feature width)")
    head_out: int = opt(128, "projection head output width")
    epochs: int | None = opt(None, "passes over the data")
    batch_size: int | None = opt(None, "images per step (2 views each): the global batch, split evenly over the processes")
    optimizer: str | None = opt(None, "sgd (momentum, nesterov) | lars | adamw", ("sgd", "lars", "adamw"))
    lr: float | None = opt(None, "peak learning rate at batch 256 (scaled by batch_size/256 with lr_scaling=linear)")
    lr_scaling: str = opt("linear", "how the lr follows the (global) batch size: linear (lr x B/256) | sqrt "
                                    "(lr x sqrt(B/256)) | none", ("linear", "sqrt", "none"))
    weight_decay: float | None = opt(None, "weight decay (not applied to norms and biases)")
    momentum: float = opt(0.9, "SGD / LARS momentum")
    warmup_epochs: float = opt(1.0, "linear warm-up length before the cosine decay, in epochs")
    min_lr_ratio: float = opt(0.0, "final lr of the cosine decay, as a fraction of the peak")
    temperature: float | None = opt(None, "NT-Xent temperature")
    augment: str | None = opt(None, "augmentation preset: small-gray | small-rgb | rgb | gray | histo (default from data)")
    crop_scale: tuple[float, float] | None = opt(None, "random resized crop area range, e.g. 0.3 1.0")
    jitter: float | None = opt(None, "colour-jitter strength s (SimCLR: brightness, contrast, saturation 0.8s, hue 0.2s; "
                                     "default: the augment preset's)")
    blur: float | None = opt(None, "probability of a Gaussian blur of each view (default: the augment preset's; 0 on images <= 32 px)")
    grad_clip: float = opt(0.0, "clip the gradient norm to this value (0 = off)")
    nonfinite: str = opt("stop", "a NaN/Inf loss: stop (no checkpoint written past the last good one) | skip (no update "
                                 "for that step; stops after 10 in a row)", ("stop", "skip"))
    amp: str = opt("auto", "mixed precision: auto (bf16 on CUDA; on a CPU with bf16 units, bf16 where a warmed-up probe measures "
                           "it >= 1.2x faster than fp32, else fp32) | bf16 | fp16 | off", ("auto", "bf16", "fp16", "off"))
    channels_last: bool = opt(True, "use the channels_last memory format (faster convolutions on CPU and GPU)")
    compile: bool = opt(False, "torch.compile the encoder")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    devices: int = opt(1, "processes on this machine: N > 1 starts this command under torchrun (one per GPU; on CPU, "
                          "N gloo processes); for several machines run torchrun yourself (README)")
    sync_bn: bool = opt(False, "SyncBatchNorm across the GPUs of a torchrun run (CUDA only)")
    threads: int = opt(0, "CPU threads for torch (0 = all cores, shared among the processes of this machine)")
    num_workers: int = opt(2, "DataLoader processes decoding image files (folders only; in-memory data needs none)")
    seed: int = opt(0, "seed of the data order, augmentations and initialisation")
    ckpt_every: int = opt(200, "write a checkpoint every N steps (and at every epoch end); 0 = epoch ends only")
    log_every: int = opt(20, "log metrics every N steps")
    knn_every: int = opt(5, "kNN monitor on the labeled split every N epochs, and at the end (0 = off)")
    knn_k: int = opt(20, "kNN neighbours")
    knn_t: float = opt(0.1, "kNN temperature of the similarity weights")
    knn_max_bank: int = opt(10000, "at most this many labeled images in the monitor's bank (and 1/5 as queries)")
    tensorboard: bool = opt(True, "write TensorBoard scalars into OUT/train/tb")
    progress: bool | None = opt(None, "progress bar (default: only when stderr is a terminal)")
    resume: bool = opt(False, "continue from OUT/train/checkpoints/last.pt")
    max_minutes: float = opt(0.0, "stop (with a checkpoint) after this many minutes of training; 0 = no limit")
    fit_minutes: float = opt(0.0, "fit the schedule to about this many minutes of training: after the first steps, as many "
                                  "epochs as their measured time allows (at most --epochs), the cosine decay ending there; "
                                  "0 = --epochs as given")
    tile_size: int = opt(64, "tiles: side of a tile cut from the large image(s)")
    tile_stride: int = opt(64, "tiles: step between tiles")
    tile_min_foreground: float = opt(0.5, "tiles: skip tiles with less foreground (non-background) than this")

    def __post_init__(self):
        self.fill({**DATA_PRESETS[data_kind(self.data)], **self.folder_defaults()})
        self.validate()

    def folder_defaults(self) -> dict[str, Any]:
        """A folder of images left at the default input size trains at its images' own size
        (data.folder_input_size: the median shorter side, 16-96 px, never upsampled), with the stem
        the presets use at that size (4 from 64 px, 2 from 28 px, else 1); {} otherwise."""
        if data_kind(self.data) != "folder" or self.input_size is not None:
            return {}
        from edgeclr.data import folder_input_size

        fitted = folder_input_size(str(self.data))
        if fitted is None:
            return {}
        side = fitted[0]
        return {"input_size": side, "stem_stride": 4 if side >= 64 else 2 if side >= 28 else 1}

    def fill(self, defaults: dict[str, Any]) -> None:
        """Set the fields still at None from `defaults`."""
        for k, v in defaults.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.crop_scale is None:
            self.crop_scale = (0.2, 1.0)
        self.crop_scale = tuple(float(v) for v in self.crop_scale)

    def validate(self) -> None:
        check_choices(self)
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2: NT-Xent contrasts each image with the others in its batch "
                              f"(got {self.batch_size})")
        for name in ("epochs", "input_size", "lr", "temperature", "head_out"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.grad_clip < 0 or self.fit_minutes < 0:
            raise ConfigError("weight_decay, warmup_epochs, grad_clip and fit_minutes must be >= 0")
        if self.blur is not None and not 0 <= self.blur <= 1:
            raise ConfigError(f"blur is a probability: 0 <= blur <= 1, got {self.blur}")
        if self.jitter is not None and self.jitter < 0:
            raise ConfigError(f"jitter must be >= 0, got {self.jitter}")
        if self.devices < 1:
            raise ConfigError(f"devices must be >= 1, got {self.devices}")

    @property
    def scaled_lr(self) -> float:
        r = self.batch_size / 256
        return self.lr * {"linear": r, "sqrt": r ** 0.5, "none": 1.0}[self.lr_scaling]


# Distillation defaults for fields that are not taken from the teacher's training config.
# lr 4e-3: on Fashion-MNIST (benchmarks/results/distill_fashion_mnist/) and digits it beat 2e-3 by 1-3.5 kNN points.
DISTILL_DEFAULTS: dict[str, Any] = dict(optimizer="adamw", lr=4e-3, weight_decay=1e-4)
# the teacher's architecture in a data preset, never the student's: a MobileNet student takes no width or last stride
ARCHITECTURE = ("model", "width", "stem_stride", "last_stride", "input_size")
# Taken from the teacher's training config when left at None: same data, schedule and views.
FROM_TEACHER = ("data", "epochs", "batch_size", "augment", "crop_scale", "jitter", "blur", "tile_size", "tile_stride",
                "tile_min_foreground")


@dataclass
class DistillConfig(TrainConfig):
    """`edgeclr distill`: a frozen SimCLR teacher's embeddings -> a small student.

    Every TrainConfig field keeps its meaning; fields left at None come from the teacher's
    training config (data, epochs, batch size, augmentations) or DISTILL_DEFAULTS. `resolve`
    fills them once the teacher is loaded.
    """

    data: str | None = opt(None, "dataset (default: the teacher's); same forms as `edgeclr train --data`", path=True)
    out: str | None = opt(None, "run folder; this stage writes into OUT/distill (default: the teacher's run folder)")
    model: str | None = opt("mobilenet_v3_small", "student: registry name (mobilenet_v3_small, mobilenet_v3_large, mobilenet_v2, ...)")
    stem_stride: int | None = opt(None, "student stem stride: the architecture's (MobileNet 2, ResNet 4) by default, 1 for images under 64 px")
    input_size: int | None = opt(None, "must equal the teacher's input size (default: the teacher's)")
    # 0.02, not SEED's 0.1: a sharper target over the queue keeps the teacher's nearest neighbours, at 60 epochs on the
    # H&E tiles top-10 overlap 0.502 against 0.445 (benchmarks/results/deploy_selection/he-t002-xeon-amx.md), on digits kNN
    # 95.56 against 92.44%, on Fashion-MNIST (2 epochs) 83.40 against 82.60%
    temperature: float | None = opt(0.02, "relational (SEED) loss: student softmax temperature")
    width: int | None = opt(None, "ResNet student (--model resnet18): base width (default 64); MobileNet students: not allowed")
    last_stride: int | None = opt(None, "ResNet student: last-stage stride (default 2; 1 keeps layer3's resolution)")
    head_hidden: int | None = opt(None, "", cli=False)
    head_out: int = opt(128, "", cli=False)
    devices: int = opt(1, "", cli=False)  # distillation runs in one process
    sync_bn: bool = opt(False, "", cli=False)
    teacher: str = opt("", "teacher: a `edgeclr train` checkpoint, stage folder or run folder", path=True)
    embed_dim: int | None = opt(None, "student embedding width (default: the teacher's; a linear adapter maps it to the teacher's when different)")
    cosine_weight: float = opt(1.0, "weight of the cosine regression of student onto teacher embeddings")
    relational_weight: float = opt(1.0, "weight of the relational (SEED) loss: KL between similarity distributions over a queue")
    teacher_temperature: float = opt(0.02, "relational loss: teacher softmax temperature (equal to the student's, the "
                                          "relational optimum is the cosine loss's: the teacher's own embedding)")
    queue_size: int = opt(4096, "relational loss: teacher embeddings kept as the instance set")
    bn_recalibrate: int = opt(2048, "after training, re-estimate the student's BatchNorm statistics on this many clean "
                                    "(evaluation-transform) training images; 0 = keep the running averages of the "
                                    "augmented views")
    cache_teacher: bool = opt(False, "embed every training image once with the teacher (clean view) and distil onto those "
                                     "cached targets: the teacher runs once instead of every step")

    def __post_init__(self):  # checked once the teacher is known: see resolve()
        pass

    def resolve(self, teacher_cfg: dict, teacher_input_size: int) -> "DistillConfig":
        """Fill None fields from the teacher's training config, then DISTILL_DEFAULTS; validate."""
        if not self.teacher:
            raise ConfigError("--teacher is required: a checkpoint or run folder written by `edgeclr train`")
        if self.input_size not in (None, teacher_input_size):
            raise ConfigError(f"--input-size {self.input_size} differs from the teacher's input size {teacher_input_size}: "
                              "the student is taught on the teacher's inputs; drop --input-size")
        self.input_size = teacher_input_size
        self.fill({k: teacher_cfg[k] for k in FROM_TEACHER if teacher_cfg.get(k) is not None})
        self.fill(DISTILL_DEFAULTS)
        # a teacher whose config lacks a field (written by hand or by an older edgeclr): the data's preset
        self.fill({k: v for k, v in DATA_PRESETS[data_kind(self.data or teacher_cfg.get("data") or "")].items()
                   if k not in ARCHITECTURE})
        resnet = str(self.model).startswith("resnet")
        if self.stem_stride is None:
            self.stem_stride = 1 if self.input_size < 64 else 4 if resnet else 2  # the architecture's
        self.validate()
        if self.cosine_weight < 0 or self.relational_weight < 0 or self.cosine_weight + self.relational_weight == 0:
            raise ConfigError("cosine_weight and relational_weight must be >= 0 and not both 0")
        if self.teacher_temperature <= 0 or self.queue_size < 0 or (self.embed_dim is not None and self.embed_dim < 1):
            raise ConfigError("teacher_temperature must be > 0, queue_size >= 0 and embed_dim >= 1")
        if self.bn_recalibrate < 0:
            raise ConfigError(f"bn_recalibrate is a number of images (0 = off), got {self.bn_recalibrate}")
        if (self.width is not None or self.last_stride is not None) and not resnet:
            raise ConfigError(f"--width and --last-stride shape a ResNet student; {self.model} has neither: drop them "
                              "or pass --model resnet18")
        return self


@dataclass
class EvalConfig:
    """`edgeclr eval`: kNN and linear-probe accuracy of embeddings, with baselines."""

    target: str = opt("", "checkpoint file, stage folder or run folder (its most downstream model) to evaluate", cli=False)
    data: str | None = opt(None, "labeled dataset (default: the one the checkpoint was trained on)", path=True)
    baselines: str = opt("random,pixels", "comma list of baselines: random (same spec, random init), pixels; '' for none")
    knn_k: int = opt(20, "kNN neighbours")
    knn_t: float = opt(0.1, "kNN temperature of the similarity weights")
    linear_probe: bool = opt(True, "fit a logistic regression on frozen features")
    tsne: bool = opt(True, "write a t-SNE plot (PNG) of the test embeddings")
    max_train: int = opt(0, "use at most this many labeled training images (0 = all)")
    batch_size: int = opt(256, "images per forward pass")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    threads: int = opt(0, "CPU threads for torch (0 = all cores)")
    seed: int = opt(0, "seed of subsampling, the random-init baseline and t-SNE")
    compare: bool = opt(False, "TARGET is a run folder: the retention table of every stage and artifact in it (teacher, "
                               "student, pruned, exported FP32 and INT8) against the teacher")
    latency_runs: int = opt(30, "--compare: timed batch-1 runs per model for the 1-thread latency")
    label_efficiency: str = opt("", "comma list of labelled images per class, e.g. 1,5,10,100: kNN, linear probe and full "
                                    "fine-tuning of the model against random init and raw pixels, over --draws draws")
    draws: int = opt(3, "--label-efficiency: draws of the labelled images per point (mean and spread)")
    finetune_steps: int = opt(300, "--label-efficiency: steps of each full fine-tuning (0 = kNN and linear only)")

    def levels(self) -> list[int]:
        """--label-efficiency as sorted distinct integers."""
        return sorted({int(v) for v in filter(None, self.label_efficiency.split(","))})

    def __post_init__(self):
        check_choices(self)
        try:
            levels = self.levels()
        except ValueError:
            levels = [0]
        if any(v < 1 for v in levels) or self.draws < 1 or self.finetune_steps < 0:
            raise ConfigError(f"label_efficiency is a comma list of positive integers (got {self.label_efficiency!r}); "
                              "draws >= 1, finetune_steps >= 0")
        bad = [b for b in filter(None, self.baselines.split(",")) if b not in ("random", "pixels")]
        if bad:
            raise ConfigError(f"unknown baseline(s) {bad}; valid: random, pixels")
        if self.knn_k < 1 or self.knn_t <= 0:
            raise ConfigError(f"knn_k must be >= 1 and knn_t > 0, got {self.knn_k}, {self.knn_t}")


@dataclass
class FinetuneConfig:
    """`edgeclr finetune`: a few-label classifier or segmenter on a pretrained (or random-init) encoder."""

    source: str = opt("", "run folder, stage folder or checkpoint whose encoder is fine-tuned", cli=False)
    task: str = opt("classify", "classify (a softmax classifier over the dataset's classes) | segment (DeepLabV3 on --data "
                                "images labelled by --masks)", ("classify", "segment"))
    stage: str = opt("teacher", "which encoder of a run folder: teacher | student | pruned | model (its most downstream)",
                     ("teacher", "student", "pruned", "model"))
    data: str | None = opt(None, "labelled dataset (default: the source's); segment: the images (a folder or files)", path=True)
    masks: str | None = opt(None, "segment: folder of label maps (PNG / TIFF of class ids, 0 = background, 255 = unlabelled) "
                                  "or GeoJSON polygons in pixels (QuPath's export) with the images' file stems", path=True)
    classes: str | None = opt(None, "segment: class names, one per line, line 1 = id 0 (default: MASKS/classes.txt; "
                                    "polygons: background + their class names)", path=True)
    test_data: str | None = opt(None, "segment: test images (another image or slide; default: --test-fraction of the tiles)",
                                path=True)
    test_masks: str | None = opt(None, "segment: the test images' label maps", path=True)
    test_fraction: float = opt(0.25, "segment without --test-data: this share of the tiles is held out for the test")
    tiles: int = opt(0, "segment: labelled training tiles drawn (0 = every tile of the images; the tile is the encoder's "
                        "input size)")
    seg_head: str = opt("auto", "segment: deeplabv3 (ASPP) | lraspp (LR-ASPP, the edge head) | auto (lraspp on a MobileNet, "
                                "deeplabv3 on a ResNet)", ("auto", "deeplabv3", "lraspp"))
    label_efficiency: str = opt("", "segment: instead of one segmenter, the curve over these labelled tile counts (comma list, "
                                    "0 = all), e.g. 4,16,0: frozen and full fine-tuning of the encoder against full fine-tuning "
                                    "from random weights, --draws draws each; no checkpoint or export")
    draws: int = opt(3, "--label-efficiency: draws of the labelled tiles per count (mean and spread)")
    output_stride: int | None = opt(None, "segment: output stride of the encoder's feature maps, its last stages dilated to "
                                          "reach it (default: 8 for deeplabv3, 16 for lraspp)", (8, 16))
    out: str | None = opt(None, "folder to write into (default: RUN/finetune; with --label-efficiency, RUN/label_efficiency)")
    labels_per_class: int | None = opt(None, "labelled images drawn per class (default 10 unless --labels-fraction)")
    labels_fraction: float | None = opt(None, "instead: this fraction of each class's labelled images")
    val_fraction: float = opt(0.2, "held out of each class's draw for early stopping (with >= 20 per class; below, every label trains)")
    mode: str = opt("full", "linear (logistic regression on frozen features) | frozen (head trained on augmented views) | "
                            "full (linear probe, then encoder and head together)", ("linear", "frozen", "full"))
    init: str = opt("pretrained", "pretrained (the source's weights) | random (the same architecture and recipe from random "
                                  "weights: the baseline) | FILE (a torchvision state dict you have, e.g. ImageNet weights; "
                                  "the tensors that fit the source's architecture)")
    steps: int = opt(300, "optimiser steps (frozen and full)")
    batch_size: int = opt(64, "labelled images per step (at most all of them)")
    lr: float = opt(1e-3, "AdamW learning rate of the head")
    backbone_lr_ratio: float = opt(0.1, "full: the encoder's learning rate as a fraction of the head's")
    weight_decay: float = opt(1e-4, "AdamW weight decay (not on norms and biases of the encoder)")
    label_smoothing: float = opt(0.1, "cross-entropy label smoothing")
    eval_every: int = opt(25, "validation accuracy every N steps (early stopping keeps the best)")
    patience: int = opt(4, "stop after this many validations without improvement")
    bn: str = opt("auto", "BatchNorm statistics while fine-tuning: auto (frozen below 2,000 labelled images) | frozen | train",
                  ("auto", "frozen", "train"))
    augment: bool = opt(True, "augmented views of the labelled images (crops, flips, mild colour jitter)")
    max_test: int = opt(0, "test on at most this many test images (0 = the whole test split)")
    formats: str = opt("onnx", "exports of the classifier: comma list of onnx, openvino ('' for none)")
    int8: bool = opt(False, "also quantise each export to INT8 (compress's quantisers, calibrated on the data)")
    int8_target: str = opt("x86", "INT8 flavour: x86 (u8 activations) | arm (s8, onnxruntime on aarch64)", ("x86", "arm"))
    calib_images: int = opt(300, "INT8 calibration images")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    threads: int = opt(0, "CPU threads for torch (0 = all cores)")
    seed: int = opt(0, "seed of the draw of labelled images, the views and the head")
    resume: bool = opt(False, "continue an interrupted run from OUT/checkpoints/last.pt")
    max_minutes: float = opt(0.0, "stop (with a checkpoint) after this many minutes; 0 = no limit")

    def __post_init__(self):
        check_choices(self)
        if self.labels_per_class is not None and self.labels_fraction is not None:
            raise ConfigError("give --labels-per-class or --labels-fraction, not both")
        if self.labels_fraction is not None and not 0 < self.labels_fraction <= 1:
            raise ConfigError(f"labels_fraction is in (0, 1], got {self.labels_fraction}")
        if self.labels_fraction is None and self.labels_per_class is None:
            self.labels_per_class = 10
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ConfigError(f"labels_per_class must be >= 1, got {self.labels_per_class}")
        if not 0 <= self.val_fraction < 1 or self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.eval_every < 1:
            raise ConfigError("val_fraction is in [0, 1); steps >= 0, batch_size >= 1, lr > 0 and eval_every >= 1")
        if self.patience < 1 or not 0 <= self.label_smoothing < 1 or self.backbone_lr_ratio < 0:
            raise ConfigError("patience >= 1, label_smoothing in [0, 1) and backbone_lr_ratio >= 0 are required")
        check_runtime_formats(self.formats, allow_none=True)
        if self.int8:
            check_calib_images(self.calib_images)
        if self.init not in ("pretrained", "random") and not Path(self.init).is_file():
            raise ConfigError(f"--init {self.init}: give pretrained, random, or a weights file that exists")
        seg_only = [f"--{k.replace('_', '-')}" for k in ("masks", "classes", "test_data", "test_masks") if getattr(self, k)]
        if self.task != "segment" and seg_only:
            raise ConfigError(f"{', '.join(seg_only)} belong to --task segment")
        if self.task == "segment":
            if not self.data or not self.masks:
                raise ConfigError("--task segment needs --data IMAGES and --masks DIR (label maps with the images' file stems)")
            if bool(self.test_data) != bool(self.test_masks):
                raise ConfigError("give --test-data and --test-masks together")
            if self.mode == "linear":
                raise ConfigError("--task segment trains its head: --mode frozen or full")
            if self.tiles < 0 or not 0 < self.test_fraction < 1:
                raise ConfigError("tiles >= 0 and test_fraction in (0, 1) are required")
            try:
                levels = self.tile_levels()
            except ValueError:
                levels = [-1]
            if any(v < 0 for v in levels) or self.draws < 1:
                raise ConfigError(f"--label-efficiency is a comma list of labelled tile counts >= 0 (0 = all), got "
                                  f"{self.label_efficiency!r}; --draws >= 1")
        elif self.label_efficiency:
            raise ConfigError("--label-efficiency here is for --task segment; a classifier's curve is `edgeclr eval RUN "
                              "--label-efficiency 1,5,10`")

    def tile_levels(self) -> list[int]:
        """--label-efficiency as distinct tile counts, ascending, 0 (all) last."""
        vals = {int(v) for v in filter(None, self.label_efficiency.split(","))}
        return sorted(vals - {0}) + ([0] if 0 in vals else [])


@dataclass
class ExportConfig:
    """`edgeclr export`: the encoder as a self-describing ONNX / OpenVINO / TorchScript file."""

    target: str = opt("", "checkpoint file, stage folder or run folder (its most downstream stage)", cli=False)
    format: str = opt("onnx", "onnx | openvino | torchscript (edgeclr/export.py, EXPORT_FORMATS)", ("onnx", "openvino", "torchscript"))
    out: str | None = opt(None, "folder to write into (default: RUN/export beside the checkpoint's stage)")
    name: str = opt("model", "file stem: NAME.onnx, NAME.xml + NAME.bin, NAME.pt")
    input_size: int | None = opt(None, "input side in pixels (default: the training input size)")
    dynamic_batch: bool = opt(True, "a dynamic batch dimension (--static-batch: fixed batch 1)", off="static-batch")
    opset: int = opt(17, "ONNX opset (13-17)")
    normalize: bool = opt(True, "L2-normalise the embedding inside the model")
    data: str | None = opt(None, "images for the parity check (default: the checkpoint's dataset)", path=True)
    check_images: int = opt(32, "real images in the parity check against torch")
    min_cosine: float = opt(0.9999, "the parity check fails below this per-image cosine to torch")

    def __post_init__(self):
        check_choices(self)
        if self.input_size is not None and self.input_size < 8:
            raise ConfigError(f"input_size must be >= 8, got {self.input_size}")
        if self.check_images < 1:
            raise ConfigError("check_images must be >= 1: every export is checked against torch")


@dataclass
class CompressConfig:
    """`edgeclr compress`: prune + recover a distilled student, export it, quantise to INT8, report."""

    MIN_CALIB: ClassVar[int] = 32

    student: str = opt("", "distilled student: checkpoint, stage folder or run folder", cli=False)
    out: str | None = opt(None, "run folder; writes OUT/compress (default: the student's run folder)")
    teacher: str | None = opt(None, "teacher for recovery and the report (default: the one the student was distilled from)", path=True)
    data: str | None = opt(None, "data for recovery and evaluation (default: the student's)", path=True)
    prune_ratio: float | None = opt(None, "fraction of channels to remove (0 = no pruning); parameters shrink ~1-(1-r)^2")
    target_macs: float | None = opt(None, "prune until MACs are this fraction of the student's (default 0.5 unless --prune-ratio)")
    prune_steps: int = opt(2, "iterative pruning steps, each followed by recovery")
    global_pruning: bool = opt(False, "rank channels across layers (default: the same ratio in every layer)")
    recover_epochs: int = opt(2, "distillation epochs from the teacher after each pruning step (0 = none)")
    recover_lr: float | None = opt(None, "recovery learning rate (default: the student's)")
    formats: str = opt("onnx,openvino", "exports to write and quantise: comma list of onnx, openvino")
    int8: bool = opt(True, "quantise each export to INT8 (--fp32-only: export the pruned model only)", off="fp32-only")
    target: str = opt("x86", "INT8 flavour: x86 (u8 activations, s8 weights) | arm (s8/s8, for onnxruntime on aarch64)",
                      ("x86", "arm"))
    auto_exclude: bool = opt(True, "leave the first conv, the embedding layer and squeeze-excitation blocks in float "
                                   "(--quantize-all: quantise every supported node)", off="quantize-all")
    calib_data: str | None = opt(None, "images for INT8 calibration (default: the student's data)", path=True)
    calib_images: int = opt(300, "calibration images")
    max_drop: float | None = opt(None, "refuse an artifact whose kNN accuracy is more than this many points below the FP32 student's")
    eval_images: int = opt(10000, "labeled bank / query images for the retention report (at most)")
    latency_runs: int = opt(50, "timed batch-1 runs per model for the 1-thread latency")
    device: str = opt("auto", "device for pruning and recovery: auto | cpu | cuda")
    threads: int = opt(0, "torch CPU threads (0 = default)")
    seed: int = opt(0, "random seed")
    max_minutes: float = opt(0.0, "stop the recovery after this many minutes with a checkpoint (--resume continues); 0 = no limit")
    fit_minutes: float = opt(0.0, "fit the recoveries to about this many minutes in all (an equal part per pruning step, at most "
                                  "--recover-epochs each, from their measured step time); 0 = --recover-epochs as given")
    resume: bool = opt(False, "continue an interrupted compress run from OUT/compress/checkpoints")
    progress: bool | None = opt(None, "progress bar (default: when stderr is a terminal)")
    tensorboard: bool = opt(True, "TensorBoard scalars for the recovery")

    def __post_init__(self):
        check_choices(self)
        if self.prune_ratio is not None and not 0 <= self.prune_ratio < 1:
            raise ConfigError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise ConfigError(f"target_macs is a fraction of the student's MACs in (0, 1], got {self.target_macs}")
        if self.prune_ratio is not None and self.target_macs is not None:
            raise ConfigError("give --prune-ratio or --target-macs, not both")
        if self.prune_ratio is None and self.target_macs is None:
            self.target_macs = 0.5
        if self.prune_steps < 1 or self.recover_epochs < 0 or self.latency_runs < 1 or self.eval_images < 10:
            raise ConfigError("prune_steps >= 1, recover_epochs >= 0, latency_runs >= 1 and eval_images >= 10 are required")
        check_calib_images(self.calib_images)
        check_runtime_formats(self.formats, allow_none=False)

    @property
    def pruning(self) -> bool:
        return bool(self.prune_ratio) or self.target_macs is not None and self.target_macs < 1


@dataclass
class DeployConfig:
    """`edgeclr deploy`: every candidate measured on the deployment settings; the fastest within the budget is shipped."""

    run: str = opt("", "run folder (runs/NAME) with a teacher, and usually a distilled and a compressed student", cli=False)
    out: str | None = opt(None, "folder for the selection and the shipped model (default: RUN/deploy)")
    also: str | None = opt(None, "comma list of other run folders whose students were distilled from RUN's teacher (another "
                                 "student family, e.g. a MobileNet beside a narrow ResNet): their levels join the candidates",
                                 path=True)
    max_drop: float = opt(1.5, "accuracy budget: kNN top-1 points a candidate may lose against the teacher")
    max_latency_ms: float | None = opt(None, "instead of the fastest within --max-drop: the most accurate candidate whose p50 "
                                             "latency is at most this")
    target: str = opt("x86", "where the model runs: x86 (this machine's kind) | pi4 | pi5 (onnxruntime s8 INT8 only; the "
                             "latencies measured here are x86 proxies: re-rank with `edgeclr select --bench`)", ("x86", "pi4", "pi5"))
    runtimes: str | None = opt(None, "comma list of onnxruntime, openvino (default: both on x86, onnxruntime on a Pi)")
    threads: int = opt(1, "inference threads on the device")
    batch: int = opt(1, "images per inference call on the device")
    precision: str = opt("f32", "OpenVINO inference precision of every OpenVINO candidate: f32 | bf16", ("f32", "bf16"))
    int8: bool = opt(True, "INT8 candidates beside the FP32 ones (--fp32-only: none)", off="fp32-only")
    quantize_all: bool = opt(True, "also an INT8 variant of every model with nothing left in float (--scoped-only: only the "
                                   "float-scope variant, first conv, embedding layer and squeeze-excitation in float)",
                             off="scoped-only")
    calib_images: int = opt(300, "INT8 calibration images (fewer are used, with a warning, when the data has fewer)")
    eval_images: int = opt(10000, "labeled bank / query images for the held-out accuracy (at most)")
    # the highest overlap of a real model losing more than 1.5 kNN points: digits 0.564, Fashion-MNIST 0.554, H&E tissue
    # classes 0.410 (benchmarks/results/overlap_rule/*-n200.md, the overlap at 200 images as heldout.agreement computes it)
    min_overlap: float = opt(0.57, "unlabeled data: the budget is a top-10 neighbour overlap with the teacher of at least this "
                                   "(mean over seeded samples of 200 images)")
    search_minutes: float = opt(0.0, "stop building new candidates after this many minutes (those built are measured); 0 = no limit")
    tie_margin: float = opt(0.05, "candidates at most this fraction slower than the fastest (the median of their per-round "
                                  "latency ratio), or not measurably slower at all (its bootstrap interval reaches 1), are tied: "
                                  "the most accurate, then the smallest, ships")
    rounds: int = opt(10, "interleaved timing rounds over all candidates (the tie rule compares candidates round by round)")
    runs: int = opt(10, "timed runs per candidate per round")
    warmup: float = opt(0.5, "warm-up seconds per candidate")
    seed: int = opt(0, "seed of the held-out sample and the calibration images")

    def __post_init__(self):
        check_choices(self)
        if self.max_drop < 0 or (self.max_latency_ms is not None and self.max_latency_ms <= 0):
            raise ConfigError("max_drop must be >= 0 and max_latency_ms > 0")
        if self.threads < 1 or self.batch < 1 or self.rounds < 1 or self.runs < 1 or self.warmup < 0:
            raise ConfigError("threads, batch, rounds and runs must be >= 1, warmup >= 0")
        check_calib_images(self.calib_images)
        if not 0 <= self.tie_margin < 1:
            raise ConfigError(f"--tie-margin is a fraction in [0, 1), got {self.tie_margin}")
        if not 0 <= self.min_overlap <= 1 or self.search_minutes < 0 or self.eval_images < 10:
            raise ConfigError("min_overlap is in [0, 1], search_minutes >= 0, eval_images >= 10")
        pi = self.target != "x86"
        self.runtimes = self.runtimes or ("onnxruntime" if pi else "onnxruntime,openvino")
        bad = [r for r in self.runtimes.split(",") if r not in ("onnxruntime", "openvino")]
        if bad or not self.runtimes.strip(","):
            raise ConfigError(f"runtimes: comma list of onnxruntime, openvino; got {self.runtimes!r}")
        if pi and "openvino" in self.runtimes:
            raise ConfigError(f"--target {self.target}: OpenVINO's ARM plugin runs INT8 models in fp16; a Pi runs "
                              "onnxruntime: drop openvino from --runtimes")

    @property
    def formats(self) -> str:
        """The export formats of the runtimes (the export-format table's runtime column): onnx, openvino."""
        by_runtime = {f.runtime: name for name, f in EXPORT_FORMATS.items()}
        return ",".join(by_runtime[r] for r in self.runtimes.split(",") if r)

    @property
    def int8_flavour(self) -> str:
        """compress's --target: u8 activations on x86, s8 on ARM."""
        return "x86" if self.target == "x86" else "arm"


@dataclass
class SelectConfig:
    """`edgeclr select`: re-rank a deployment selection with latencies measured elsewhere (on the board)."""

    selection: str = opt("", "RUN/deploy (or its selection.json) written by `edgeclr deploy`", cli=False)
    bench: str = opt("", "bench.json from `edgeclr bench CANDIDATES --profile pi5` run on the board", path=True)
    max_drop: float | None = opt(None, "accuracy budget in kNN points (default: the selection's)")
    max_latency_ms: float | None = opt(None, "the most accurate candidate under this p50 latency instead")
    threads: int | None = opt(None, "the board's thread count to rank at (default: the selection's)")
    batch: int | None = opt(None, "batch size to rank at (default: the selection's)")

    def __post_init__(self):
        if not self.bench:
            raise ConfigError("--bench is required: bench.json written by `edgeclr bench` on the board")


@dataclass
class BenchConfig:
    """`edgeclr bench`: latency, throughput, memory, size and efficiency of models, per format."""

    models: tuple = opt((), "exported models (.onnx, .xml), checkpoints (.pt), run folders, or torchvision:NAME "
                            "(an unmodified torchvision network in torch eager, e.g. torchvision:resnet18)", cli=False)
    formats: str | None = opt(None, "comma list of torch, onnx, onnx-int8, openvino, openvino-int8 (default: all found, or the profile's)")
    threads: str | None = opt(None, "comma list of thread counts, e.g. 1,2,4 (default: 1, or the profile's)")
    batch: str | None = opt(None, "comma list of batch sizes, e.g. 1,8,32 (default: 1, or the profile's)")
    input_size: int | None = opt(None, "torch models: input side in pixels (exported models run at their own size)")
    profile: str | None = opt(None, "device profile: pi4 | pi5 (1 and 4 threads, batch 1, onnxruntime) | x86", ("pi4", "pi5", "x86"))
    precision: str = opt("f32", "OpenVINO inference precision: f32 | bf16 (this CPU would run FP32 models in bf16 unasked)",
                         ("f32", "bf16"))
    baseline: str | None = opt(None, "configuration the speed-ups are against, LABEL[:FORMAT] (default: the teacher in torch eager)")
    rounds: int = opt(5, "interleaved rounds (A B A B ...)")
    runs: int = opt(20, "timed runs per configuration per round")
    warmup: float = opt(1.0, "warm-up seconds per configuration")
    out: str = opt("bench", "folder for bench.json, bench.md and bench.png")

    def __post_init__(self):
        check_choices(self)
        if self.rounds < 1 or self.runs < 1 or self.warmup < 0:
            raise ConfigError("rounds and runs must be >= 1 and warmup >= 0")
        for name in ("threads", "batch"):
            v = getattr(self, name)
            if v and not all(x.strip().isdigit() and int(x) > 0 for x in v.split(",")):
                raise ConfigError(f"--{name} is a comma list of positive integers, got {v!r}")


@dataclass
class RuntimeFilesConfig:
    """What the torch-free commands that run an exported model over image files share."""

    inputs: tuple = opt((), "image files and folders (searched recursively)", cli=False)
    batch_size: int = opt(32, "images per inference call")
    threads: int = opt(0, "inference threads (0 = the runtime's default)")
    on_error: str = opt("skip", "an unreadable image: skip (reported) | raise", ("skip", "raise"))
    precision: str = opt("f32", "OpenVINO inference precision: f32 | bf16 | f16 | default", ("f32", "bf16", "f16", "default"))

    def check(self, what: str) -> None:
        check_choices(self)
        if not self.model:
            raise ConfigError(f"--model is required: {what}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class EmbedConfig(RuntimeFilesConfig):
    """`edgeclr embed`: image files -> embeddings with an exported model (torch-free)."""

    model: str = opt("", "exported model: .onnx (onnxruntime) or .xml (OpenVINO)", path=True)
    out: str = opt("embeddings.npy", "output .npy (N, D) float32; ids (file paths) go to OUT.ids.txt (--engine ray: a folder "
                                     "of Parquet shards)")
    progress: bool | None = opt(None, "progress bar (default: only when stderr is a terminal)")
    engine: str = opt("local", "local (this process) | ray (a pool of Ray actors; edgeclr[ray])", ("local", "ray"))
    address: str | None = opt(None, "--engine ray: a running cluster's address (HOST:PORT); default: a private Ray on 127.0.0.1")
    workers: int = opt(2, "--engine ray: actors, each loading the model once")
    shard_size: int = opt(1000, "--engine ray: images per Parquet shard (the unit a re-run skips)")

    def __post_init__(self):
        self.check("an exported .onnx or .xml file (edgeclr export)")
        if self.workers < 1 or self.shard_size < 1:
            raise ConfigError("workers and shard_size must be >= 1")
        if self.engine == "ray" and self.out.endswith(".npy"):
            self.out = self.out[:-len(".npy")]  # the default OUT as a folder of shards
        if self.engine != "ray" and self.address:
            raise ConfigError("--address belongs to --engine ray")


@dataclass
class PredictConfig(RuntimeFilesConfig):
    """`edgeclr predict`: image files -> class predictions with an exported classifier (torch-free)."""

    model: str = opt("", "exported classifier: .onnx (onnxruntime) or .xml (OpenVINO) from `edgeclr finetune`", path=True)
    out: str = opt("predictions.csv", "output: .csv (path, top1, p_top1, top2, p_top2, ...) or .json")
    top_k: int = opt(1, "classes per image, most probable first")

    def __post_init__(self):
        self.check("an exported classifier (.onnx or .xml) from `edgeclr finetune`")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class SegmentConfig(RuntimeFilesConfig):
    """`edgeclr segment`: image files of any size -> label maps with an exported segmenter (torch-free)."""

    model: str = opt("", "exported segmenter: .onnx (onnxruntime) or .xml (OpenVINO) from `edgeclr finetune --task segment`",
                     path=True)
    out: str = opt("segments", "output folder: STEM.png label maps, STEM.overlay.png, classes.txt, segments.csv")
    overlay: bool = opt(True, "also write each image with the class colours blended in", off="no-overlay")
    overlap: int | None = opt(None, "pixels shared by neighbouring tiles (default: a quarter of the tile)")
    level: int | None = opt(None, "whole-slide inputs: the pyramid level to segment (default: the finest within 64 Mpixels)")
    mpp: float | None = opt(None, "whole-slide inputs: instead, the level closest to these microns per pixel")

    def __post_init__(self):
        self.check("an exported segmenter (.onnx or .xml) from `edgeclr finetune --task segment`")
        if self.overlap is not None and self.overlap < 0:
            raise ConfigError(f"overlap must be >= 0, got {self.overlap}")


@dataclass
class SearchConfig:
    """`edgeclr search`: nearest gallery images (and kNN class) of query images or embeddings."""

    queries: tuple = opt((), "query image files or folders", cli=False)
    gallery: str = opt("", "gallery: OUT.npy from `edgeclr embed` (with OUT.ids.txt) or an index .npz", path=True)
    model: str | None = opt(None, "exported model to embed query images with", path=True)
    query_embeddings: str | None = opt(None, "query embeddings (.npy) instead of images")
    labels: str | None = opt(None, "gallery labels: 'folder' (parent folder of each gallery file) or a text file, one per row", path=True)
    k: int = opt(5, "neighbours to return")
    knn_k: int = opt(20, "neighbours voting in kNN classification")
    knn_t: float = opt(0.1, "kNN temperature of the similarity weights")
    save_index: str | None = opt(None, "also save the gallery as an index .npz (pickle-free)")
    backend: str = opt("numpy", "search: numpy (exact) | usearch (approximate HNSW, pip install usearch)", ("numpy", "usearch"))
    json: bool = opt(False, "print JSON lines instead of a table")
    threads: int = opt(0, "inference threads (0 = the runtime's default)")

    def __post_init__(self):
        check_choices(self)
        if not self.gallery:
            raise ConfigError("--gallery is required: embeddings from `edgeclr embed` or an index .npz")
        if bool(self.queries) == bool(self.query_embeddings):
            raise ConfigError("give query images (with --model) or --query-embeddings, not both or neither")
        if self.queries and not self.model:
            raise ConfigError("query images need --model (the exported model the gallery was embedded with)")
        if self.k < 1 or self.knn_k < 1 or self.knn_t <= 0:
            raise ConfigError("k and knn_k must be >= 1, knn_t > 0")


# `edgeclr pipeline` presets: a section of stage options per stage (each stage's own presets
# fill what is left unset, e.g. the dataset recipe of `edgeclr train`).
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    # the embedded digits, minutes on 2 CPU cores: shows every stage, not representation quality
    "demo": dict(data="digits",
                 train=dict(knn_every=5),  # the digits preset of `edgeclr train` (DATA_PRESETS)
                 # milder crops than the teacher's (0.4): 90.89 vs 89.78 kNN on digits at lr 4e-3 (30 epochs);
                 # 60 epochs: 92.44 (benchmarks/results/demo_preset_sweep/latest.md). The student is a ResNet-10
                 # at the teacher's width: at 16 px latency follows the number of layers, and MobileNetV3-Small's
                 # squeeze-excitation blocks made it slower than the teacher's own export (0.25 vs 0.20 ms in
                 # onnxruntime, 1 thread) where ResNet-10 runs 0.07 ms (benchmarks/results/deploy_selection/)
                 distill=dict(model="resnet10", width=16, epochs=60, knn_every=20, crop_scale=(0.7, 1.0)),
                 # two pruning steps to 50% of the MACs, 20 recovery epochs each: both levels are deployment candidates
                 compress=dict(target_macs=0.5, prune_steps=2, recover_epochs=20, latency_runs=30),
                 export=dict(formats="onnx,openvino"),
                 # the few-label curve: 3 draws at 1, 5 and 10 labels per class, 100 fine-tuning steps each (1 min)
                 eval=dict(latency_runs=30, label_efficiency="1,5,10", finetune_steps=100),
                 bench=dict(rounds=3, runs=20, warmup=0.5)),
    # the CPU benchmark (benchmarks/fashion_mnist_teacher.py's teacher recipe, about an hour to train);
    # its student is a ResNet-18 at base width 16 (half the teacher's MACs: layer4 strided): on this
    # AVX2 CPU its pruned OpenVINO INT8 model runs >= 1.5x its FP32 one where MobileNetV3-Small's
    # ran 1.1-1.4x (benchmarks/results/compress_fashion_mnist/resnet18-w16.md)
    "fashion-mnist": dict(data="fashion-mnist", train=dict(),
                          distill=dict(model="resnet18", width=16, stem_stride=2, epochs=8, crop_scale=(0.5, 1.0)),
                          compress=dict(eval_images=10000),
                          export=dict(formats="onnx,openvino"), eval=dict(label_efficiency="1,5,10,100"), bench=dict()),
    # a real-size GPU run: STL-10's unlabeled split at 96 px, ResNet-50 teacher, bf16 autocast
    "gpu": dict(data="stl10:data/stl10",
                train=dict(model="resnet50", input_size=96, stem_stride=2, batch_size=512, epochs=200, optimizer="lars",
                           lr=0.3, weight_decay=1e-6, temperature=0.2, amp="bf16", num_workers=8),
                distill=dict(model="mobilenet_v3_large", epochs=100, amp="bf16"),
                compress=dict(recover_epochs=5, calib_images=1000),
                export=dict(formats="onnx,openvino"), eval=dict(label_efficiency="1,5,10,100"), bench=dict(threads="1,4")),
}
PIPELINE_SECTIONS = stages.SECTIONS


def stage_config(name: str) -> type | None:
    """The config class of a stage of the stage table (None: the stage takes no options)."""
    cls = stages.get(name).config
    return globals()[cls] if cls else None


def _section(help: str):
    return field(default_factory=dict, metadata={"help": help, "choices": None, "cli": False, "off": None})


@dataclass
class PipelineConfig:
    """`edgeclr pipeline`: every stage in order, skipping finished ones (edgeclr/pipeline.py)."""

    preset: str = opt("demo", "demo (embedded digits, minutes) | fashion-mnist (the CPU benchmark) | gpu (STL-10, ResNet-50)",
                      tuple(PIPELINE_PRESETS))
    data: str | None = opt(None, "dataset, as `edgeclr train --data`", path=True)
    out: str | None = opt(None, "run folder; the preset's is runs/PRESET")
    from_stage: str | None = opt(None, "re-run this stage and every later one", stages.NAMES, cli=False)
    until: str | None = opt(None, "stop after this stage", stages.NAMES, cli=False)
    device: str | None = opt(None, "device for every torch stage: auto | cpu | cuda | cuda:N (the preset's, else auto)")
    threads: int | None = opt(None, "CPU threads for torch in every stage (0 = all cores; the preset's, else 0)")
    progress: bool | None = opt(None, "progress bars (default: when stderr is a terminal)")
    minutes: float | None = opt(None, "a wall-clock budget for the whole run, in minutes: the teacher's schedule is fitted to "
                                      "45% of it, the students' to 25% (an equal part each), compress's recoveries to 10%, each "
                                      "from its measured step time; deploy builds candidates for 10%; the rest is left for "
                                      "export, eval, bench and deploy's timing")
    students: str | None = opt(None, "the student ladder distilled beside the distill section's student, every rung a deploy "
                                     "candidate: auto (two ResNet-10 widths from the teacher's, MobileNetV3 Small, and Large "
                                     "from 64 px) | none | a comma list of MODEL[@WIDTH] (the preset's, else auto)")
    train: dict = _section("`edgeclr train` options")
    distill: dict = _section("`edgeclr distill` options")
    compress: dict = _section("`edgeclr compress` options")
    export: dict = _section("`edgeclr export` options, plus formats: a comma list of onnx, openvino (teacher exports)")
    eval: dict = _section("`edgeclr eval` options")
    bench: dict = _section("`edgeclr bench` options")
    deploy: dict = _section("`edgeclr deploy` options")

    def __post_init__(self):
        check_choices(self)
        p = PIPELINE_PRESETS[self.preset]
        self.data = self.data or p["data"]
        self.out = self.out or f"runs/{self.preset}"
        for name in PIPELINE_SECTIONS:
            v = getattr(self, name)
            if not isinstance(v, dict):
                raise ConfigError(f"pipeline section '{name}' must be a mapping of option: value, got {v!r}")
            setattr(self, name, {k.replace("-", "_"): x for k, x in v.items()})

        ladder_spec(self.students or p.get("students", "auto"))  # a malformed list fails here, before anything runs
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError(f"--minutes is a wall-clock budget in minutes, > 0; got {self.minutes}")

    def sections(self) -> dict[str, dict]:
        """Each stage's options: the preset's, overridden by the file's."""
        p = PIPELINE_PRESETS[self.preset]
        return {n: {**p.get(n, {}), **getattr(self, n)} for n in PIPELINE_SECTIONS}

    def resolved_dict(self) -> dict:
        d = to_dict(self)
        d.update(self.sections())
        return d


# `edgeclr pipeline --minutes B`: the share of B that each training stage's schedule is fitted to
# (fit_minutes) and deploy builds candidates for (search_minutes); the rest (export, eval, bench,
# deploy's timing, the report, loading and evaluation inside the training stages) runs as configured.
# The teacher gets the largest share: the students can only be as good as it is.
BUDGET_SHARES = {"train": 0.45, "distill": 0.25, "compress": 0.10, "deploy": 0.10}  # deploy: building its candidates


@dataclass(frozen=True)
class Rung:
    """One student of the pipeline's ladder: its folder name, family, size order and distill options."""

    name: str  # RUN/students/NAME (the distill section's own student: "" and RUN/distill)
    family: str  # resnet | mobilenet
    size: int  # order within the family, smallest first
    options: dict  # the distill section's options with this student's architecture
    reserve: bool = False  # distilled only when no student before it meets deploy's budget (pipeline._run_ladder)


MOBILENET_SIZES = ("mobilenet_v3_small_minimal", "mobilenet_v3_large_minimal", "mobilenet_v3_small", "mobilenet_v2",
                   "mobilenet_v3_large")


def ladder_spec(spec: str) -> list[tuple[str, int | None]] | str:
    """'auto' | 'none' | [(model, width or None), ...] from `--students`; a ConfigError names a malformed
    entry (the model names are checked against the registry by the pipeline's preflight)."""
    spec = str(spec).strip()
    if spec in ("auto", "none", ""):
        return spec or "none"
    out = []
    for item in spec.split(","):
        model, _, width = item.strip().partition("@")
        if not model:
            raise ConfigError(f"--students {spec!r}: an empty entry; a comma list of MODEL[@WIDTH], or auto | none")
        if width and (not width.isdigit() or int(width) < 8 or int(width) % 8 or not model.startswith("resnet")):
            raise ConfigError(f"--students: {item.strip()!r}: @WIDTH is a ResNet base width, a multiple of 8 (MobileNets have "
                              "none)")
        out.append((model, int(width) if width else None))
    return out


def family(model: str) -> str:
    return "resnet" if model.startswith("resnet") else "mobilenet"


def student_size(model: str, width: int | None) -> int:
    """A student's order within its family, smallest first (ResNets by depth x width squared)."""
    if family(model) == "mobilenet":
        return MOBILENET_SIZES.index(model) if model in MOBILENET_SIZES else len(MOBILENET_SIZES)
    depth = int("".join(c for c in model if c.isdigit()) or 18)
    return depth * (width or 64) ** 2


def student_ladder(spec: str, primary: dict, teacher: "TrainConfig") -> list[Rung]:
    """The students the pipeline distils, in the order they run: the distill section's own student
    (always; RUN/distill) and the ladder's others, by family, smallest first. `auto`: ResNet-10 at a
    quarter and at half the teacher's width (at least 8; a teacher of width 16 or less: half and its
    own), MobileNetV3-Small, and MobileNetV3-Large
    from 64 px inputs (below that MobileNets lose to a ResNet-10 of the same accuracy:
    docs/architecture.md); a rung equal to the section's student is that student. Last, a reserve:
    ResNet-10 at three quarters of the teacher's width (a multiple of 8, wider than the half), distilled
    only when no student before it meets deploy's budget (on a wide teacher and little data the half
    width can fall short of the rule, and the teacher's own export is the only other choice)."""
    parsed = ladder_spec(spec)
    first = (primary.get("model") or DistillConfig.model, primary.get("width"))
    if parsed == "none":
        pairs = []
    elif parsed == "auto":
        w = teacher.width or 64
        widths = sorted({max(8, w // 32 * 8), max(8, w // 16 * 8)})  # a quarter and a half, multiples of 8
        pairs = [("resnet10", v) for v in (widths if len(widths) > 1 else widths + [w] if w > widths[0] else widths)]
        pairs += [("mobilenet_v3_small_minimal", None)] + ([("mobilenet_v3_large_minimal", None)]
                                                           if teacher.input_size >= 64 else [])
    else:
        pairs = parsed
    w = teacher.width or 64
    spare = w * 3 // 32 * 8  # three quarters of the teacher's width, a multiple of 8
    reserve = ("resnet10", spare) if parsed == "auto" and max(8, w // 16 * 8) < spare < w else None

    size = student_size
    rungs = [Rung("", family(first[0]), size(*first), dict(primary))]
    for model, width in dict.fromkeys(pairs):
        if (model, width) == first or (family(model) == family(first[0]) == "mobilenet" and model == first[0]):
            continue
        opts = {k: v for k, v in primary.items() if k not in ARCHITECTURE or family(model) == family(first[0])}
        opts.update(model=model, width=width)
        if family(model) == "mobilenet":
            opts.pop("width"), opts.pop("last_stride", None)
        rungs.append(Rung(model + (f"-w{width}" if width else ""), family(model), size(model, width), opts))
    rungs = sorted(rungs, key=lambda r: (r.family != rungs[0].family, r.family, r.size))
    if reserve and reserve != first and all((r.options.get("model"), r.options.get("width")) != reserve for r in rungs):
        opts = {k: v for k, v in primary.items() if k not in ARCHITECTURE or family(first[0]) == "resnet"}
        rungs.append(Rung(f"resnet10-w{spare}", "resnet", size(*reserve), {**opts, "model": "resnet10", "width": spare},
                          reserve=True))
    return rungs


def check_calib_images(n: int) -> None:
    """compress's and deploy's --calib-images: at least CompressConfig.MIN_CALIB."""
    if n < CompressConfig.MIN_CALIB:
        raise ConfigError(f"calib_images must be >= {CompressConfig.MIN_CALIB} for a usable INT8 calibration, got {n}")


def check_runtime_formats(formats: str, allow_none: bool) -> None:
    """compress's and finetune's --formats: a comma list of onnx, openvino ('' only where allow_none)."""
    bad = [f for f in formats.split(",") if f and f not in ("onnx", "openvino")]
    if bad or not (allow_none or formats.strip(",")):
        raise ConfigError(f"formats: comma list of onnx, openvino; got {formats!r}")


def check_choices(cfg) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        v = getattr(cfg, f.name)
        if choices and v is not None and v not in choices:
            raise ConfigError(f"{f.name}={v!r} is not one of {', '.join(choices)}")


CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


def load_file(path: str | Path) -> dict:
    """Read a YAML (.yaml/.yml, or JSON) or TOML (.toml) config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist" if not p.exists() else f"config file {p} is a folder, not a file")
    if p.suffix.lower() not in CONFIG_SUFFIXES:
        raise ConfigError(f"config file {p}: a config is YAML (.yaml, .yml), JSON (.json) or TOML (.toml), "
                          f"not {p.suffix or 'a file without a suffix'}")
    try:
        text = p.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not text (UTF-8): {e.reason} at byte {e.start}") from e
    try:
        d = tomllib.loads(text) if p.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse config file {p}: {' '.join(str(e).split())}") from e
    if d is None:
        raise ConfigError(f"config file {p} is empty: write option: value lines in it, or leave out --config")
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value, not a {type(d).__name__}")
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def build(cls, file: str | Path | None = None, **overrides):
    """cls from defaults < file < overrides (overrides that are None are ignored)."""
    values = load_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_values(cls, values)


def from_values(cls, values: dict, context: str = ""):
    """cls(**values), with unknown or ill-typed options as a ConfigError; `context` names where the
    values came from (e.g. "pipeline section 'train'")."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{context}: unknown option(s) {unknown}" if context else f"unknown option(s) {unknown} for {cls.__name__}"
        raise ConfigError(f"{where}; valid: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{context}: {e}" if context else str(e)) from e


def to_dict(cfg) -> dict:
    """Plain (YAML/JSON/weights_only-safe) dict of a config."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def dump_yaml(d: dict) -> str:
    return yaml.safe_dump(d, sort_keys=False)


def save_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(to_dict(cfg)))
