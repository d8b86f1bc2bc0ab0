"""The one preprocessing path: decoded image -> normalised model input, and `Preprocess`, the
settings that travel with every checkpoint and exported model. Torch-free; `edgeclr.evaluate`
calls the same `preprocess`, so torch and the runtime see the same input for the same file."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from edgeclr.runtime.images import check_aspect, to_mode


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input; travels with every checkpoint and exported model."""

    input_size: int  # side of the square model input, in pixels
    resize_size: int  # shorter side is resized to this before the centre crop (>= input_size)
    mean: tuple[float, ...]  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, ...]  # per-channel std divided by after the mean
    channels: int = 3  # 1 (grayscale 'L') or 3 ('RGB')
    interpolation: str = "bilinear"  # PIL resampling filter used by the resize
    layout: str = "NCHW"  # layout of the model input

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")
        if self.resize_size < self.input_size:
            raise ValueError(f"resize_size {self.resize_size} < input_size {self.input_size}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def at_size(self, size: int) -> "Preprocess":
        """The same preprocessing for a `size`-px model input, keeping the ratio of resize to crop."""
        ratio = self.resize_size / self.input_size
        return dataclasses.replace(self, input_size=size, resize_size=max(size, round(size * ratio)))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        d["mean"], d["std"] = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        return cls(**d)


_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_center_crop(img: Image.Image, resize_size: int, crop: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize the shorter side to `resize_size` (aspect kept), then take the centre crop x crop.

    Sizes and offsets follow torchvision's Resize(int) + CenterCrop on PIL images exactly (long
    side truncated, offsets rounded), so a torchvision eval transform gives the same pixels.
    """
    w, h = img.size
    check_aspect((w, h), "an image")  # load_image refuses these files before decoding; this guards in-memory images
    if min(w, h) != resize_size:
        if w <= h:
            w, h = resize_size, int(resize_size * h / w)
        else:
            w, h = int(resize_size * w / h), resize_size
        img = img.resize((max(w, crop), max(h, crop)), _FILTERS[interpolation])
        w, h = img.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def preprocess(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Decoded PIL image -> model input. Returns (C, S, S) float32, normalised."""
    img = resize_center_crop(to_mode(img, pp.channels), pp.resize_size, pp.input_size, pp.interpolation)
    return normalize(np.asarray(img), pp)


def normalize(a: np.ndarray, pp: Preprocess) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 pixels -> (C, H, W) float32 scaled to [0, 1], minus mean, over std
    (what `preprocess` does after its resize and crop; a segmenter's tiles at their own resolution)."""
    a = np.asarray(a, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
    mean = np.asarray(pp.mean, np.float32)[:, None, None]
    std = np.asarray(pp.std, np.float32)[:, None, None]
    return (a - mean) / std


def preprocess_batch(images: Sequence[Image.Image], pp: Preprocess) -> np.ndarray:
    """List of PIL images -> (B, C, S, S) float32."""
    return np.stack([preprocess(im, pp) for im in images]) if len(images) else np.zeros((0, pp.channels, pp.input_size, pp.input_size), np.float32)
