"""Datasets and training batches.

`--data` specs:
    digits                    scikit-learn's 8x8 digits (embedded, no files; 1,797 images, 10 classes)
    fashion-mnist[:DIR]       IDX files (default /usr/share/datasets/fashion-mnist)
    cifar10:DIR               torchvision's cifar-10-batches-py folder (or its parent)
    stl10:DIR                 torchvision's stl10_binary folder (or its parent); pretraining uses `unlabeled`
    tiles:PATH[,PATH...]      large images (or folders of them) cut into tiles, background tiles skipped
    slide:PATH[,PATH...][@level=N|@mpp=X]
                              whole-slide images (OpenSlide) at a level or microns per pixel, tiles
                              where there is tissue (`edgeclr[slides]`)
    PATH                      a folder of images, searched recursively; labels from sub-folder names

Every dataset gives uint8 images (H, W, C) at a fixed size for training (`load_batch`) and
decoded PIL images for evaluation (`pil`), which goes through `runtime.preprocess`.
Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import math
import pickle
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from edgeclr.errors import DataError  # noqa: F401  (raised here; defined with the others)
from edgeclr.runtime import GRAY_MODES, IMAGE_SUFFIXES, ImageError, list_images, list_inputs, load_image, resize_center_crop
from edgeclr.runtime.embedder import tile_starts

if TYPE_CHECKING:
    import torch

log = logging.getLogger("edgeclr.data")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
SPLITS = ("pretrain", "train", "test")


# ----------------------------------------------------------------------------------------------
# datasets


@dataclass
class ArrayDataset:
    """Images held in memory (or memory-mapped) as one uint8 array."""

    name: str
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray | None = None  # (N,) int64, or None when unlabeled
    classes: list[str] | None = None
    sources: list[str] = field(default_factory=list)  # files the array was read from

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"{self.name}: expected uint8 (N, H, W, C) images, got {self.images.dtype} {self.images.shape}")
        if len(self.images) == 0:
            raise DataError(f"{self.name}: the dataset is empty")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def pil(self, i: int, min_side: int | None = None) -> Image.Image:
        a = self.images[i]
        return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, "L" if a.shape[-1] == 1 else "RGB")

    def load_batch(self, indices: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        """Returns (B, H, W, C) uint8 and the list of unreadable files (always empty here)."""
        idx = np.asarray(indices)
        if isinstance(self.images, np.memmap):  # sorted reads are much faster on a memmap
            order = np.argsort(idx)
            out = np.empty((len(idx),) + self.images.shape[1:], np.uint8)
            out[order] = self.images[idx[order]]
            return out, []
        return self.images[idx], []

    def fingerprint(self) -> dict:
        return {"dataset": self.name, "count": len(self), "files": [file_entry(p) for p in self.sources]}


class FolderDataset:
    """A folder of image files, decoded lazily; unreadable files are skipped and reported."""

    def __init__(self, name: str, paths: list[Path], root: Path, labels: np.ndarray | None, classes: list[str] | None,
                 channels: int, base_size: int):
        self.name, self.paths, self.root = name, paths, root
        self.labels, self.classes = labels, classes
        self.channels, self.base_size = channels, base_size

    def __len__(self) -> int:
        return len(self.paths)

    def pil(self, i: int, min_side: int | None = None) -> Image.Image:
        """The decoded image; min_side lets a large JPEG decode at a reduced scale (runtime.load_image)."""
        return load_image(self.paths[i], self.channels, min_side)

    def read(self, i: int) -> np.ndarray | None:
        """One image at the training base size, (S, S, C) uint8; None when it cannot be decoded."""
        try:
            im = resize_center_crop(self.pil(i, self.base_size), self.base_size, self.base_size)
        except ImageError as e:
            log.debug("%s", e)
            return None
        a = np.asarray(im, np.uint8)
        return a[..., None] if a.ndim == 2 else a

    def load_batch(self, indices: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        arrays, bad = [], []
        for i in indices:
            a = self.read(int(i))
            if a is None:
                bad.append(str(self.paths[i]))
            else:
                arrays.append(a)
        shape = (0, self.base_size, self.base_size, self.channels)
        return (np.stack(arrays) if arrays else np.zeros(shape, np.uint8)), bad

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for p in self.paths:
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"dataset": self.name, "root": str(self.root), "count": len(self), "listing_sha256": h.hexdigest()}


Dataset = ArrayDataset | FolderDataset


# ----------------------------------------------------------------------------------------------
# helpers


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | Path) -> dict:
    return {"path": str(path), "sha256": sha256_file(path)}


def _require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise DataError(f"{what}: {path} does not exist. {fix}")
    if not path.is_dir():
        raise DataError(f"{what}: {path} is not a folder. {fix}")
    return path


def _split_indices(n: int, labels: np.ndarray | None, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (stratified when labels exist) split -> (train_idx, test_idx), both sorted."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    test = []
    for g in groups:
        g = rng.permutation(g)
        test.append(g[: int(round(len(g) * test_fraction))])
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(n), test), test


# ----------------------------------------------------------------------------------------------
# loaders, one per source


def load_digits(split: str) -> ArrayDataset:
    """scikit-learn's digits: 8x8, 17 grey levels, scaled to uint8. 75/25 stratified split, fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = d.target.astype(np.int64)
    train, test = _split_indices(len(images), labels, 0.25, seed=0)
    idx = test if split == "test" else train
    return ArrayDataset("digits", images[idx], labels[idx], [str(i) for i in range(10)], [])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}. The file is truncated or not gzip; reinstall it.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise DataError(f"{path}: header says {dims} ({math.prod(dims)} bytes) but holds {data.size}: the file is truncated")
    return data.reshape(dims)


def load_fashion_mnist(root: str | None, split: str) -> ArrayDataset:
    d = _require_dir(Path(root or FASHION_MNIST_DIR), "fashion-mnist",
                     "Point --data fashion-mnist:DIR at the folder with the IDX files, or on Debian run "
                     "`apt-get install dataset-fashion-mnist`.")
    prefix = "t10k" if split == "test" else "train"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [d / f"{prefix}-{kind}.gz", d / f"{prefix}-{kind}"]
        found = next((c for c in cands if c.exists()), None)
        if found is None:
            raise DataError(f"fashion-mnist: neither {cands[0].name} nor {cands[1].name} is in {d}")
        files.append(found)
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"fashion-mnist: images {images.shape} and labels {labels.shape} in {d} do not match")
    return ArrayDataset("fashion-mnist", images[..., None], labels.astype(np.int64), FASHION_MNIST_CLASSES, [str(f) for f in files])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles; allow only the numpy globals they need, nothing executable."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def load_cifar10(root: str, split: str) -> ArrayDataset:
    fix = "Give the folder torchvision creates: cifar10:DIR with DIR/cifar-10-batches-py/data_batch_1 ... test_batch."
    d = _require_dir(Path(root), "cifar10", fix)
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    images, labels = [], []
    for n in names:
        p = d / n
        if not p.exists():
            raise DataError(f"cifar10: {p} is missing. {fix}")
        try:
            with open(p, "rb") as f:
                entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
            images.append(np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(entry.get("labels", entry.get("fine_labels")), np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"cifar10: {p} is not a readable CIFAR-10 batch ({e}). {fix}") from e
    return ArrayDataset("cifar10", np.concatenate(images), np.concatenate(labels), CIFAR10_CLASSES, [str(d / n) for n in names])


def load_stl10(root: str, split: str) -> ArrayDataset:
    fix = "Give the folder torchvision creates: stl10:DIR with DIR/stl10_binary/{train,test,unlabeled}_X.bin."
    d = _require_dir(Path(root), "stl10", fix)
    if (d / "stl10_binary").is_dir():
        d = d / "stl10_binary"
    part = {"pretrain": "unlabeled", "train": "train", "test": "test"}[split]
    xp = d / f"{part}_X.bin"
    if not xp.exists():
        raise DataError(f"stl10: {xp} is missing. {fix}")
    n_bytes = 3 * 96 * 96
    if xp.stat().st_size % n_bytes:
        raise DataError(f"stl10: {xp} is {xp.stat().st_size} bytes, not a multiple of {n_bytes}: truncated")
    raw = np.memmap(xp, np.uint8, "r").reshape(-1, 3, 96, 96)
    # stored column-major per channel (as torchvision reads it): (N, C, W, H) -> (N, H, W, C)
    images = raw.transpose(0, 3, 2, 1)
    if part == "unlabeled":
        images = np.ascontiguousarray(images) if len(images) <= 20000 else np.asarray(images)
        return ArrayDataset("stl10", images, None, STL10_CLASSES, [str(xp)])
    yp = d / f"{part}_y.bin"
    if not yp.exists():
        raise DataError(f"stl10: {yp} is missing. {fix}")
    labels = np.fromfile(yp, np.uint8).astype(np.int64) - 1  # 1..10 on disk
    if len(labels) != len(images):
        raise DataError(f"stl10: {len(labels)} labels in {yp} but {len(images)} images in {xp}")
    return ArrayDataset("stl10", np.ascontiguousarray(images), labels, STL10_CLASSES, [str(xp), str(yp)])


def _readable(paths: list[Path]) -> tuple[list[Path], list[str], list[str]]:
    """Header check of every file (cheap: no pixel decode). Returns (good, their modes, bad)."""
    good, modes, bad = [], [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                modes.append(im.mode)
            good.append(p)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            bad.append(str(p))
    return good, modes, bad


def _own_split(d: Path) -> dict[str, Path] | None:
    """A folder's sub-folders by lower-case name when it brings its own split (train/ and test/ or
    val/); None when it does not."""
    sub = {c.name.lower(): c for c in d.iterdir() if c.is_dir()}
    return sub if "train" in sub and ("test" in sub or "val" in sub) else None


FOLDER_SIZE_RANGE = (16, 96)  # a folder's default input side: its images' own, within this range (config.TrainConfig)


@functools.lru_cache(maxsize=16)
def folder_input_size(root: str, sample: int = 200) -> tuple[int, str] | None:
    """The default input side for a folder of images: the median shorter side of up to `sample` of
    its images (headers only, spread over the sorted listing), rounded down to a multiple of 8 and
    kept within FOLDER_SIZE_RANGE, so that small images are not upsampled (a 32-px image at 96 px
    costs 9x the compute for no information) and large ones are cut to what a CPU trains in a
    budget; (side, the reason), logged once. None: no readable image (loading says why)."""
    d = Path(root).expanduser()
    if not d.is_dir():
        return None
    sub = _own_split(d)
    if sub:
        d = sub["train"]
    paths = list_images(d)
    step = max(1, len(paths) // sample)
    sides = []
    for p in paths[::step][:sample]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue
    if not sides:
        return None
    median = int(np.median(sides))
    lo, hi = FOLDER_SIZE_RANGE
    side = min(hi, max(lo, median // 8 * 8))
    why = (f"input size {side} px: the median shorter side of {len(sides)} of the {len(paths)} images is {median} px"
           + (f", cut to {hi} px (a CPU's training budget)" if median > hi else f", raised to the {lo}-px floor" if median < lo
              else ", not upsampled"))
    log.info("%s: %s", d, why)
    return side, why


def load_folder(root: str, split: str, base_size: int, channels: int | None = None, seed: int = 0) -> FolderDataset:
    d = _require_dir(Path(root).expanduser(), "image folder", "Check the --data path.")
    sub = _own_split(d)
    if sub:  # the folder brings its own split
        pick = sub["train"] if split in ("pretrain", "train") else sub.get("test", sub.get("val"))
        return load_folder(str(pick), "pretrain", base_size, channels, seed)
    paths = list_images(d)
    if not paths:
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {d}. Check the --data path.")
    paths, modes, bad = _readable(paths)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) under {d}, e.g. {bad[0]}")
    if not paths:
        raise DataError(f"none of the {len(bad)} image files under {d} could be read (e.g. {bad[0]}): "
                        "they are corrupt or not images.")
    if channels is None:  # grayscale only if every file is grayscale
        channels = 1 if all(m in GRAY_MODES for m in modes) else 3
    rel = [p.relative_to(d) for p in paths]
    labels = classes = None
    if all(len(r.parts) >= 2 for r in rel):
        classes = sorted({r.parts[0] for r in rel})
        if len(classes) >= 2:
            index = {c: i for i, c in enumerate(classes)}
            labels = np.array([index[r.parts[0]] for r in rel], np.int64)
        else:
            classes = None
    if split != "pretrain" and labels is not None:  # eval on a fixed stratified 80/20 split
        train, test = _split_indices(len(paths), labels, 0.2, seed)
        keep = test if split == "test" else train
        paths, labels = [paths[i] for i in keep], labels[keep]
    return FolderDataset(f"folder:{d}", paths, d, labels, classes, channels, base_size)


def cut_tiles(image: np.ndarray, size: int, stride: int, min_foreground: float = 0.5,
              background_level: int = 220) -> tuple[np.ndarray, np.ndarray]:
    """Cut (H, W, 3) uint8 into size x size tiles every `stride` pixels.

    A pixel is foreground when it is darker than `background_level` or coloured (max-min > 20);
    tiles with less than `min_foreground` foreground, or almost uniform (std < 2), are skipped.
    Returns tiles (N, size, size, 3) and their top-left corners (N, 2) as (y, x).
    """
    h, w = image.shape[:2]
    tiles, corners = [], []
    for y in range(0, h - size + 1, stride):
        for x in range(0, w - size + 1, stride):
            t = image[y:y + size, x:x + size]
            luma = t.mean(axis=2)
            fg = (luma < background_level) | (t.max(axis=2).astype(np.int16) - t.min(axis=2) > 20)
            if fg.mean() >= min_foreground and t.std() >= 2:
                tiles.append(t)
                corners.append((y, x))
    if not tiles:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 2), np.int64)
    return np.stack(tiles), np.asarray(corners, np.int64)


_TILES_SAID: set[tuple] = set()


def load_tiles(spec: str, tile_size: int, tile_stride: int, min_foreground: float, max_side: int) -> ArrayDataset:
    try:
        files = list_inputs([Path(part).expanduser() for part in filter(None, spec.split(","))])
    except ImageError as e:  # a path that does not exist, or no image files
        raise DataError(f"tiles: {e} (give an image file, a comma-separated list, or a folder)") from e
    if tile_size < 8 or tile_stride < 1:
        raise DataError(f"tiles: tile size {tile_size} / stride {tile_stride} too small")
    all_tiles = []
    for f in files:
        img = np.asarray(load_image(f, 3))
        if min(img.shape[:2]) < tile_size:
            raise DataError(f"tiles: {f} is {img.shape[1]}x{img.shape[0]}, smaller than the tile size {tile_size}")
        t, _ = cut_tiles(img, tile_size, tile_stride, min_foreground)
        said = (str(f), len(t), tile_size)  # every stage opens the data again: say it once per process
        log.log(logging.DEBUG if said in _TILES_SAID else logging.INFO, "tiles: %s -> %d tiles of %d px", *said)
        _TILES_SAID.add(said)
        all_tiles.append(t)
    tiles = np.concatenate(all_tiles)
    if len(tiles) == 0:
        raise DataError(f"tiles: every tile of {spec} was background (foreground < {min_foreground}); "
                        "lower --tile-min-foreground or check the image")
    if tile_size > max_side:  # keep memory and the training crop honest: downscale with antialiasing once
        tiles = np.stack([np.asarray(Image.fromarray(t).resize((max_side, max_side), Image.BILINEAR)) for t in tiles])
    return ArrayDataset(f"tiles:{spec}", tiles, None, None, [str(f) for f in files])


def parse_slide_spec(arg: str) -> tuple[list[str], int | None, float | None]:
    """"A.svs,B.svs@mpp=1.0" -> (files, level, mpp)."""
    files, _, opt = arg.partition("@")
    level = mpp = None
    if opt:
        key, _, val = opt.partition("=")
        try:
            if key == "level":
                level = int(val)
            elif key == "mpp":
                mpp = float(val)
            else:
                raise ValueError(key)
        except ValueError as e:
            raise DataError(f"slide:{arg}: after @ give level=N or mpp=X (microns per pixel), not {opt!r}") from e
    return [f for f in files.split(",") if f], level, mpp


def load_slides(arg: str, tile_size: int, tile_stride: int, min_tissue: float, max_side: int, seed: int = 0) -> ArrayDataset:
    """Tissue tiles of whole-slide images (runtime.slides), downscaled to max_side like tiles:."""
    from edgeclr.runtime.slides import slide_tiles

    files, level, mpp = parse_slide_spec(arg)
    if not files:
        raise DataError("slide: give one or more whole-slide files, e.g. slide:a.svs,b.svs@mpp=1.0")
    parts = []
    for f in files:
        try:
            t, _ = slide_tiles(Path(f).expanduser(), tile_size, tile_stride, level, mpp, min_tissue, seed=seed)
        except ImageError as e:
            raise DataError(str(e)) from e
        log.info("slide: %s -> %d tissue tiles of %d px", f, len(t), tile_size)
        parts.append(t)
    tiles = np.concatenate(parts)
    if not len(tiles):
        raise DataError(f"slide:{arg}: no tile has tissue (>= {min_tissue} of its area): lower --tile-min-foreground, "
                        "or choose another level")
    if tile_size > max_side:
        tiles = np.stack([np.asarray(Image.fromarray(t).resize((max_side, max_side), Image.BILINEAR)) for t in tiles])
    return ArrayDataset(f"slide:{arg}", tiles, None, None, files)


def open_dataset(spec: str, split: str = "pretrain", *, base_size: int = 40, tile_size: int = 64,
                 tile_stride: int = 64, tile_min_foreground: float = 0.5, seed: int = 0) -> Dataset:
    """Open the dataset named by a `--data` spec (see the module docstring).

    Args:
        split: "pretrain" (the unlabeled training set), "train" (labeled bank for kNN / probe) or "test".
        base_size: folder images are resized + centre-cropped to this square for training.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        return load_digits(split)
    if kind == "fashion-mnist":
        return load_fashion_mnist(arg or None, split)
    if kind in ("cifar10", "stl10"):
        if not arg:
            raise DataError(f"{kind} needs its folder: --data {kind}:DIR (nothing is downloaded)")
        return load_cifar10(arg, split) if kind == "cifar10" else load_stl10(arg, split)
    if kind == "tiles":
        return load_tiles(arg, tile_size, tile_stride, tile_min_foreground, max_side=max(base_size, 8))
    if kind == "slide":
        return load_slides(arg, tile_size, tile_stride, tile_min_foreground, max(base_size, 8), seed)
    if Path(spec).expanduser().exists():
        return load_folder(spec, split, base_size, seed=seed)
    raise DataError(f"--data {spec!r}: not a folder that exists, nor one of digits, fashion-mnist[:DIR], "
                    "cifar10:DIR, stl10:DIR, tiles:IMAGE, slide:FILE")


def has_labels(ds: Dataset) -> bool:
    return ds.labels is not None and len(np.unique(ds.labels)) >= 2


def channel_stats(ds: Dataset, n: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] over up to n evenly spaced images."""
    idx = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(np.int64))
    x, _ = ds.load_batch(idx)
    if len(x) == 0:
        raise DataError(f"{ds.name}: no readable image among the {len(idx)} sampled for normalisation statistics")
    x = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(x.std(0), 1e-3)
    return tuple(round(float(v), 4) for v in x.mean(0)), tuple(round(float(v), 4) for v in std)


# ----------------------------------------------------------------------------------------------
# training batches: a pure function of (seed, epoch, step), so a resumed run sees the same batches


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The index batches of one epoch. A trailing batch of one image is dropped (NT-Xent needs >= 2)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < 2:
        batches.pop()
    return batches


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Steps per epoch; with `world` ranks, every rank takes the same number of steps."""
    full, rest = divmod(n, batch_size)
    return full + (1 if _keep_last(rest, world) else 0)


def _keep_last(rest: int, world: int) -> bool:
    return rest >= 2 and rest // world >= 1


def shard_batches(batches: list[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """Rank `rank`'s part of each global batch: contiguous equal slices, len(b) // world images each.

    Every rank gets the same number of batches of the same sizes (an all-gather needs equal
    shapes, and a rank with one step more would hang the others); a short last batch loses at
    most world - 1 images, and is dropped when it cannot give each rank an image.
    """
    if world == 1:
        return batches
    out = []
    for b in batches:
        share = len(b) // world
        if share == 0 or share * world < 2:
            continue
        out.append(b[rank * share:(rank + 1) * share])
    return out


class _BatchSet:
    """Map-style view of a list of index batches for DataLoader workers (one item = one batch)."""

    def __init__(self, ds: Dataset, batches: list[np.ndarray]):
        self.ds, self.batches = ds, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.ds.load_batch(self.batches[i])


def iterate_batches(ds: Dataset, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                    num_workers: int = 0, rank: int = 0,
                    world: int = 1) -> Iterator[tuple[int, "torch.Tensor", list[str], np.ndarray]]:
    """Yield (step, uint8 images (B, C, H, W), unreadable files, dataset indices of the B images) for
    one epoch from `start_step` on. With `world` ranks, `batch_size` is the global batch and
    this rank gets its shard of each (shard_batches): the epoch's order does not depend on the
    number of ranks, so a run resumes with another world size at the same position."""
    import torch

    batches = shard_batches(epoch_batches(len(ds), batch_size, seed, epoch), rank, world)[start_step:]
    if isinstance(ds, FolderDataset) and num_workers > 0:
        loader = torch.utils.data.DataLoader(_BatchSet(ds, batches), batch_size=None, shuffle=False,
                                             num_workers=num_workers, persistent_workers=False, prefetch_factor=4)
        source = iter(loader)
    else:
        source = (ds.load_batch(b) for b in batches)
    for step, (b, (x, bad)) in enumerate(zip(batches, source), start=start_step):
        x = torch.as_tensor(np.asarray(x)).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
        if bad:  # only folders have unreadable files
            skip = set(bad)
            b = np.asarray([i for i in b if str(ds.paths[i]) not in skip], np.int64)
        yield step, x, bad, b


# ----------------------------------------------------------------------------------------------
# images with masks (segmentation): IMAGES/x.png + MASKS/x.png, cut into tiles together

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".geojson")
POLYGON_SUFFIXES = (".geojson",)  # polygons in the image's pixel coordinates (QuPath's export), rasterised on load
IGNORE = 255  # a mask value that no loss or score counts (unlabelled pixels)


@dataclass
class MaskedTiles:
    """Tiles of images and of their label maps, cut at the images' own resolution."""

    images: np.ndarray  # (N, S, S, C) uint8
    masks: np.ndarray  # (N, S, S) uint8 class ids (IGNORE: unlabelled)
    source: np.ndarray  # (N,) index into `files` of the image each tile comes from
    files: list[str]  # the image files, in order
    classes: list[str]  # class names, index = class id (0 = background)
    corners: np.ndarray | None = None  # (N, 2) each tile's top-left (y, x) in its image (a slide's level)


def read_mask(path: Path) -> np.ndarray:
    """A label map (PNG / TIFF of class ids, or a palette PNG's indices) -> (H, W) int64."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                raise DataError(f"mask {path} is a colour image ({im.mode}): a mask is one channel of class ids "
                                "(0 = background, 1..K-1, 255 = unlabelled), e.g. an 8-bit grayscale or palette PNG")
            a = np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # PIL raises several types on corrupt or truncated files
        raise DataError(f"mask {path} cannot be read ({type(e).__name__}: {e})") from e
    if a.ndim != 2:
        raise DataError(f"mask {path} has shape {a.shape}: a mask is one channel of class ids")
    return a.astype(np.int64)


def read_polygons(path: Path) -> list[tuple[str | None, list]]:
    """A GeoJSON file's features as (class name or None, polygons), each polygon a list of rings
    (exterior first, then holes) of (x, y) pixel coordinates. The class name is QuPath's
    `properties.classification.name` (or a `classification` / `class_name` / `class` string)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"mask {path} is not readable GeoJSON ({type(e).__name__}: {e})") from e
    feats = doc if isinstance(doc, list) else doc.get("features", [doc]) if isinstance(doc, dict) else None
    if feats is None:
        raise DataError(f"mask {path} is not a GeoJSON FeatureCollection, Feature or list of Features")
    out = []
    for i, f in enumerate(feats):
        geom = f.get("geometry") if isinstance(f, dict) else None
        if not isinstance(geom, dict) or geom.get("type") not in ("Polygon", "MultiPolygon"):
            kind = geom.get("type") if isinstance(geom, dict) else type(geom).__name__
            raise DataError(f"mask {path}: feature {i} is a {kind}, not a Polygon or MultiPolygon: a polygon mask labels areas")
        props = f.get("properties") or {}
        c = props.get("classification")
        name = (c.get("name") if isinstance(c, dict) else c) or props.get("class_name") or props.get("class")
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        out.append((None if name is None else str(name), polys))
    return out


def polygon_class_names(features: list[list]) -> list[str]:
    """background + the class names of GeoJSON masks' features (read_polygons of each), sorted
    (QuPath's Ignore* class is unlabelled, not a class)."""
    names = {n for fs in features for n, _ in fs if n is not None and not _ignored(n)}
    return ["background"] + sorted(names or {"object"})


def _ignored(name: str) -> bool:
    return name.rstrip("*").lower() == "ignore"


def rasterise_polygons(path: Path, shape: tuple[int, int], classes: list[str], downsample: float = 1.0,
                       features: list | None = None) -> np.ndarray:
    """A GeoJSON mask drawn as an (H, W) int64 label map: 0 outside every polygon, each feature's
    class id inside it (a hole keeps what lies under it; later features on top), 255 for QuPath's
    Ignore* class. Parts outside the image are clipped. `downsample`: the image is a slide level
    this many times coarser than the polygons' level-0 coordinates. `features`: read_polygons(path),
    when the caller has read it."""
    from PIL import ImageDraw

    ids = {n: i for i, n in enumerate(classes)}
    out = np.zeros(shape, np.int64)
    features, drawn = read_polygons(path) if features is None else features, 0
    for i, (name, polys) in enumerate(features):
        if name is None and len(classes) != 2:
            raise DataError(f"mask {path}: feature {i} has no class name (properties.classification.name or class_name), "
                            f"and there are {len(classes)} classes: name it, or use two classes")
        cid = IGNORE if name is not None and _ignored(name) else 1 if name is None else ids.get(name)
        if cid is None:
            raise DataError(f"mask {path}: feature {i}'s class {name!r} is not one of the classes {classes}: "
                            "fix the class names (--classes / MASKS/classes.txt) or the annotation")
        for rings in polys:
            try:
                rings = [np.asarray([(float(p[0]), float(p[1])) for p in ring], np.float64) / downsample for ring in rings]
            except (TypeError, ValueError, IndexError) as e:
                raise DataError(f"mask {path}: feature {i} has malformed coordinates ({e})") from e
            if not rings or len(rings[0]) < 3:
                continue
            x0, y0 = np.floor(rings[0].min(0)).astype(int)
            x1, y1 = np.ceil(rings[0].max(0)).astype(int) + 1
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, shape[1]), min(y1, shape[0])
            if cx0 >= cx1 or cy0 >= cy1:
                continue  # wholly outside the image
            layer = Image.new("1", (x1 - x0, y1 - y0), 0)  # the polygon in its own box: holes cut out of it alone
            draw = ImageDraw.Draw(layer)
            for j, ring in enumerate(rings):
                if len(ring) >= 3:
                    draw.polygon([(x - x0, y - y0) for x, y in ring], fill=0 if j else 1)
            inside = np.asarray(layer)[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            out[cy0:cy1, cx0:cx1][inside] = cid
            drawn += 1
    if features and not drawn:
        raise DataError(f"mask {path}: none of its {len(features)} polygon(s) lies inside its {shape[1]}x{shape[0]} image: "
                        "coordinates of another image, or of another level of a slide?")
    return out


def read_class_names(masks_dir: Path, num_ids: int, classes_file: str | None = None) -> list[str]:
    """Class names from --classes FILE or MASKS/classes.txt (one per line, line i = id i), else
    background, class1, class2, ..."""
    f = Path(classes_file) if classes_file else masks_dir / "classes.txt"
    if f.is_file():
        names = [line.strip() for line in f.read_text().splitlines() if line.strip()]
        if len(names) < 2:
            raise DataError(f"{f}: give >= 2 class names, one per line (line 1 = id 0, the background)")
        return names
    if classes_file:
        raise DataError(f"--classes {classes_file} does not exist")
    return ["background"] + [f"class{i}" for i in range(1, max(num_ids, 2))]


def mask_pairs(images: str | Path | list[Path], masks: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs: every image of IMAGES (a folder or file, or a list of files) with the
    file of the same stem in MASKS."""
    masks = Path(masks).expanduser()
    _require_dir(masks, "--masks", "give the folder of label maps (same file stems as the images)")
    try:
        files = images if isinstance(images, list) else list_inputs([Path(images).expanduser()])
    except ImageError as e:
        raise DataError(f"--data {images}: {e}") from e
    by_stem = {p.stem: p for p in sorted(masks.iterdir()) if p.suffix.lower() in MASK_SUFFIXES}
    missing = [f.name for f in files if f.stem not in by_stem]
    if missing:
        raise DataError(f"{len(missing)} image(s) have no mask in {masks} (same stem, {'/'.join(MASK_SUFFIXES)}): "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [(f, by_stem[f.stem]) for f in files]


def load_masked(images: str | Path, masks: str | Path, tile_size: int, stride: int, channels: int = 3,
                classes_file: str | None = None, classes: list[str] | None = None) -> MaskedTiles:
    """Images and their masks cut into tile_size tiles every `stride` px (the last row and column
    of tiles end at the border); tiles whose pixels are all unlabelled are left out. A mask is a
    label map (MASK_SUFFIXES) or GeoJSON polygons in the image's pixels (rasterise_polygons).
    IMAGES may be `slide:A.svs[,B][@level=N|@mpp=X]`: each slide's level is read whole
    (runtime.slides.read_level), its polygons scaled from level 0, its label map (if a raster) the
    level's size, and only tiles at least half tissue are kept. The
    class names are `classes` when given (a test set takes its training set's), else
    read_class_names', else (polygons) background + the polygons' class names, sorted.

    Raises:
        DataError: a missing folder, an image without a mask, a mask whose size differs from its
            image, a class id outside the class list, an unreadable file, an image smaller than a tile.
    """
    slides = str(images).startswith("slide:")
    if slides:  # whole-slide images at a level: their polygons are in level-0 pixels, as QuPath writes them
        files, level, mpp = parse_slide_spec(str(images)[len("slide:"):])
        pairs = mask_pairs([Path(f).expanduser() for f in files], masks)
    else:
        pairs = mask_pairs(images, masks)
    polygons = {m: read_polygons(m) for _, m in pairs if m.suffix.lower() in POLYGON_SUFFIXES}  # each file read once
    if polygons and classes is None:  # polygons name their classes: the ids follow from the class list
        named = classes_file or (Path(masks).expanduser() / "classes.txt").is_file()
        classes = read_class_names(Path(masks).expanduser(), 2, classes_file) if named else polygon_class_names(list(polygons.values()))
    loaded, top = [], 0
    for img_path, mask_path in pairs:
        tissue, down = None, 1.0
        try:
            if slides:
                from edgeclr.runtime.slides import read_level

                level_img, tissue, _, down = read_level(img_path, level, mpp)
                img = np.asarray(level_img.convert("L") if channels == 1 else level_img)
            else:
                img = np.asarray(load_image(img_path, channels))
        except ImageError as e:
            raise DataError(str(e)) from e
        m = (rasterise_polygons(mask_path, img.shape[:2], classes, down, polygons[mask_path]) if mask_path in polygons
             else read_mask(mask_path))
        if m.shape != img.shape[:2]:
            raise DataError(f"mask {mask_path} is {m.shape[1]}x{m.shape[0]}, its image {img_path} "
                            f"{img.shape[1]}x{img.shape[0]}: a mask labels every pixel of its image")
        if min(m.shape) < tile_size:
            raise DataError(f"{img_path} is {m.shape[1]}x{m.shape[0]}, smaller than the tile size {tile_size}")
        if m.min() < 0:
            raise DataError(f"mask {mask_path} holds negative class ids")
        top = max(top, int(m[m != IGNORE].max(initial=0)))
        loaded.append((img, m, tissue))
    classes = classes or read_class_names(Path(masks).expanduser(), top + 1, classes_file)
    out_img, out_mask, out_src, out_yx = [], [], [], []
    for i, ((img, m, tissue), (_, mask_path)) in enumerate(zip(loaded, pairs)):
        bad = np.unique(m[(m != IGNORE) & (m >= len(classes))])
        if len(bad):
            raise DataError(f"mask {mask_path} holds class ids {bad[:8].tolist()} outside the {len(classes)} classes "
                            f"{classes}: fix the mask or the class names (255 = unlabelled)")
        img = img if img.ndim == 3 else img[:, :, None]
        h, w = m.shape
        for y in tile_starts(h, tile_size, tile_size - stride):  # the runtime's grid: the last tile ends at the border
            for x in tile_starts(w, tile_size, tile_size - stride):
                t = m[y:y + tile_size, x:x + tile_size]
                if tissue is not None and tissue[y:y + tile_size, x:x + tile_size].mean() < 0.5:
                    continue  # a slide's glass: `segment` calls it background without the model
                if (t != IGNORE).any():
                    out_img.append(img[y:y + tile_size, x:x + tile_size])
                    out_mask.append(t.astype(np.uint8))
                    out_src.append(i)
                    out_yx.append((y, x))
    if not out_img:
        raise DataError(f"{images}: no tile of {tile_size} px with labelled pixels" + (" on tissue" if slides else ""))
    return MaskedTiles(np.stack(out_img), np.stack(out_mask), np.asarray(out_src, np.int64), [str(p) for p, _ in pairs],
                       classes, np.asarray(out_yx, np.int64))
