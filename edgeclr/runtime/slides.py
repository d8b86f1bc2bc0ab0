"""Whole-slide images (pyramidal .svs / .ndpi / .mrxs / .scn / tiled TIFF) through OpenSlide:
a level chosen by index or by microns per pixel, tissue found on a thumbnail, tiles read where
there is tissue. Torch-free; openslide is imported inside the functions (`edgeclr[slides]`).

    tiles, corners = slide_tiles("s.svs", size=64, mpp=1.0)   # (N, 64, 64, 3) uint8 tissue tiles
    image, tissue, lv, down = read_level("s.svs", level=2)   # a whole level, for `edgeclr segment` and slide masks

Tissue detection follows the field's tools (CLAM, histolab): the saturation channel of a
thumbnail, median-blurred, thresholded by Otsu's method (tissue is coloured, glass is not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from edgeclr.errors import ImageError

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
THUMB_SIDE = 1024  # tissue is found on a thumbnail of at most this side
MAX_LEVEL_PIXELS = 64_000_000  # read_level refuses a level larger than this (ask for a coarser one)


def _openslide():
    try:
        import openslide
    except ImportError as e:  # the C library ships as the openslide-bin wheel
        raise ImageError("whole-slide images need OpenSlide: pip install 'edgeclr[slides]' "
                         "(openslide-python and openslide-bin)") from e
    return openslide


def is_slide(path: str | Path) -> bool:
    """A whole-slide file: a slide suffix, or a TIFF that OpenSlide reads as a pyramid (more than one level)."""
    p = Path(path)
    if p.suffix.lower() in SLIDE_SUFFIXES:
        return True
    if p.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        import openslide
    except ImportError:
        return False
    try:
        if not openslide.OpenSlide.detect_format(str(p)):
            return False
        with openslide.OpenSlide(str(p)) as s:
            return s.level_count > 1
    except Exception:  # noqa: BLE001  (a corrupt TIFF is not a slide; load_image reports it)
        return False


def open_slide(path: str | Path):
    """An OpenSlide handle, or ImageError naming the problem and the fix."""
    openslide = _openslide()
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"slide {p} does not exist")
    try:
        return openslide.OpenSlide(str(p))
    except Exception as e:  # noqa: BLE001  (OpenSlideUnsupportedFormatError, OpenSlideError, OSError)
        raise ImageError(f"{p} is not a whole-slide image OpenSlide can read ({type(e).__name__}: {str(e)[:200]}): give a "
                         "pyramidal .svs / .ndpi / .mrxs / .scn or tiled TIFF, or use tiles:IMAGE for an ordinary image") from e


def choose_level(slide, level: int | None = None, mpp: float | None = None, name: str = "the slide") -> int:
    """The level to read: `level` as given, or the one whose microns per pixel is closest to `mpp`
    (needs the slide's own mpp), or 0."""
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise ImageError(f"{name} has levels 0..{slide.level_count - 1}, not {level}")
        return level
    if mpp is None:
        return 0
    base = slide.properties.get("openslide.mpp-x")
    if not base:
        raise ImageError(f"{name} does not record its microns per pixel (openslide.mpp-x): choose a level with @level=N instead")
    have = float(base) * np.asarray(slide.level_downsamples, np.float64)
    return int(np.argmin(np.abs(np.log(have / mpp))))


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the one that maximises the between-class variance."""
    hist = np.bincount(values.ravel().astype(np.int64), minlength=256).astype(np.float64)
    w = np.cumsum(hist)
    mu = np.cumsum(hist * np.arange(256))
    total, mu_t = w[-1], mu[-1]
    w0, w1 = w[:-1], total - w[:-1]
    between = np.where((w0 > 0) & (w1 > 0), (mu_t * w0 / total - mu[:-1]) ** 2 / np.maximum(w0 * w1, 1e-12) * total, 0)
    return float(np.argmax(between))


def tissue_mask(slide) -> tuple[np.ndarray, float]:
    """(boolean tissue mask of a thumbnail, the thumbnail's downsample from level 0)."""
    w, h = slide.dimensions
    scale = max(w, h) / THUMB_SIDE if max(w, h) > THUMB_SIDE else 1.0
    thumb = slide.get_thumbnail((max(1, round(w / scale)), max(1, round(h / scale)))).convert("RGB")
    sat = np.asarray(thumb.convert("HSV").filter(ImageFilter.MedianFilter(7)))[:, :, 1]
    t = otsu(sat)
    mask = sat > max(t, 8)  # CLAM's floor: glass is never "tissue" however uniform the slide
    return mask, w / thumb.size[0]


def _tissue_share(mask: np.ndarray, thumb_down: float, x0: int, y0: int, side0: float) -> float:
    """The share of tissue of a level-0 square (x0, y0, side0) on the thumbnail mask."""
    a = int(x0 / thumb_down)
    b = int(y0 / thumb_down)
    n = max(1, int(round(side0 / thumb_down)))
    sub = mask[b:b + n, a:a + n]
    return float(sub.mean()) if sub.size else 0.0


def slide_tiles(path: str | Path, size: int, stride: int | None = None, level: int | None = None, mpp: float | None = None,
                min_tissue: float = 0.5, max_tiles: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tissue tiles of a slide at the chosen level: (N, size, size, 3) uint8 and their level-0
    corners (N, 2) as (y, x). Tiles with less than `min_tissue` tissue are skipped; beyond
    `max_tiles`, an even random subset (seeded) is kept."""
    stride = stride or size
    with open_slide(path) as s:
        lv = choose_level(s, level, mpp, str(path))
        down = float(s.level_downsamples[lv])
        lw, lh = s.level_dimensions[lv]
        if min(lw, lh) < size:
            raise ImageError(f"{path}: level {lv} is {lw}x{lh}, smaller than a {size}-px tile: choose a finer level")
        mask, tdown = tissue_mask(s)
        corners = [(y, x) for y in range(0, lh - size + 1, stride) for x in range(0, lw - size + 1, stride)
                   if _tissue_share(mask, tdown, x * down, y * down, size * down) >= min_tissue]
        if len(corners) > max_tiles:
            keep = np.sort(np.random.default_rng(seed).choice(len(corners), max_tiles, replace=False))
            corners = [corners[i] for i in keep]
        tiles = [np.asarray(s.read_region((int(x * down), int(y * down)), lv, (size, size)).convert("RGB")) for y, x in corners]
    if not tiles:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 2), np.int64)
    return np.stack(tiles), (np.asarray(corners, np.float64) * down).astype(np.int64)


def read_level(path: str | Path, level: int | None = None, mpp: float | None = None) -> tuple[Image.Image, np.ndarray, int, float]:
    """(a whole level as an RGB image, its tissue mask at the same size, the level read, its
    downsample from level 0). The default level is the finest one within MAX_LEVEL_PIXELS."""
    with open_slide(path) as s:
        if level is None and mpp is None:
            level = next((i for i, (w, h) in enumerate(s.level_dimensions) if w * h <= MAX_LEVEL_PIXELS), s.level_count - 1)
        lv = choose_level(s, level, mpp, str(path))
        w, h = s.level_dimensions[lv]
        if w * h > MAX_LEVEL_PIXELS:
            raise ImageError(f"{path}: level {lv} is {w}x{h} pixels, more than {MAX_LEVEL_PIXELS:,} read at once: choose a "
                             f"coarser level (0..{s.level_count - 1})")
        img = s.read_region((0, 0), lv, (w, h)).convert("RGB")
        mask, _ = tissue_mask(s)
        down = float(s.level_downsamples[lv])
    tissue = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    return img, tissue, lv, down
