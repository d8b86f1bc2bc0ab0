"""Torch-free image loading and preprocessing: the ONE preprocessing path of edgeclr.

Only numpy and PIL are imported here (onnxruntime / openvino are imported inside the functions
that need them), because this module runs on the device. Training-side evaluation
(`edgeclr.evaluate`) calls the same `preprocess` so that torch and the runtime see the same
input tensor for the same image file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# PIL modes that carry no colour: a dataset made only of these is trained with 1 channel.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images -> 8-bit 'L', scaled by the bit depth (not by the content)."""
    a = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) <= 65535):
        a = a.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    elif img.mode == "I":
        a = a.astype(np.float64) / 16843009.0  # 0..2^32-1 -> 0..255
    elif img.mode == "F":
        a = a.astype(np.float64) * (255.0 if np.nanmax(a, initial=0) <= 1.0 else 1.0)
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert a decoded PIL image to 8-bit 'L' (channels=1) or 'RGB' (channels=3).

    Alpha is dropped (as torchvision does); palette images are expanded; 16-bit images are
    scaled by their bit depth.
    """
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    if channels == 3:
        if img.mode == "P":
            img = img.convert("RGBA")
        return img if img.mode == "RGB" else img.convert("RGB")
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def load_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Open, fully decode and orient an image file.

    Args:
        path: image file.
        channels: 1 for 8-bit grayscale ('L'), 3 for 'RGB'.

    Raises:
        ImageError: the file is missing, not an image, corrupt or truncated. Decoding happens
            inside the same try as opening, because a truncated JPEG opens fine and fails only
            when its pixels are read.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # honours the EXIF orientation tag; decodes
            im.load()
            return to_mode(im, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode image {path}: {e}") from e


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
    a = np.asarray(img, dtype=np.float32) / 255.0  # (S, S) or (S, S, 3)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, S, S)
    mean = np.asarray(pp.mean, np.float32)[:, None, None]
    std = np.asarray(pp.std, np.float32)[:, None, None]
    return (a - mean) / std


def preprocess_batch(images: Sequence[Image.Image], pp: Preprocess) -> np.ndarray:
    """List of PIL images -> (B, C, S, S) float32."""
    return np.stack([preprocess(im, pp) for im in images]) if len(images) else np.zeros((0, pp.channels, pp.input_size, pp.input_size), np.float32)
