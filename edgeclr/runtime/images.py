"""Image files -> decoded PIL images: suffixes, mode conversion, the size and aspect limits, and
the listing of image files under folders. Torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edgeclr.errors import ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# PIL modes that carry no colour: a dataset made only of these is trained with 1 channel.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


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


# Longest side / shortest side accepted. Resizing the shorter side up to the model's resize size
# multiplies the pixels by that ratio before the centre crop: a 465-byte TIFF declaring 9 x 9,633,804
# pixels (under PIL's bomb limit) took 1.3 GB to embed at 16 px (scripts/fuzz_images.py found it).
# Panoramas stay far below 64:1; a centre crop would keep under 2% of such an image anyway.
MAX_ASPECT = 64

def check_aspect(size: tuple[int, int], what: str) -> None:
    """Raise ImageError for a (width, height) with a zero side or beyond MAX_ASPECT:1; `what` names the image."""
    w, h = size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"cannot decode {what}: {w}x{h} pixels, an aspect ratio beyond {MAX_ASPECT}:1 (refused: its "
                         "centre crop would be a sliver of it, and resizing it costs memory out of proportion)")


def load_image(path: str | Path, channels: int = 3, min_side: int | None = None) -> Image.Image:
    """Open, fully decode and orient an image file.

    Args:
        path: image file.
        channels: 1 for 8-bit grayscale ('L'), 3 for 'RGB'.
        min_side: the smallest shorter side the caller needs (the resize size). A JPEG at least
            twice as large is decoded at a reduced DCT scale (1/2 .. 1/8) that still keeps both
            sides >= min_side, so a 24-Mpixel photo never becomes a 72 MB array. Evaluation and
            the runtime pass the same value, so both see the same pixels. Any format beyond
            PIL's decompression-bomb limit (MAX_IMAGE_PIXELS) is refused, and so is an aspect
            ratio beyond MAX_ASPECT:1, both from the header, before decoding.

    Raises:
        ImageError: the file is missing, not an image, corrupt, truncated, too large or too thin.
            Decoding happens inside the same try as opening, because a truncated JPEG opens fine
            and fails only when its pixels are read.
    """
    import warnings

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse those too, before decoding
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_aspect(im.size, f"image {path}")  # from the header, before decoding
                if min_side and im.format == "JPEG" and min(im.size) >= 2 * min_side:
                    im.draft(im.mode, (min_side, min_side))
                im = ImageOps.exif_transpose(im)  # honours the EXIF orientation tag; decodes
                im.load()
                return to_mode(im, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"cannot decode image {path}: {e} (images above {Image.MAX_IMAGE_PIXELS} pixels are refused)") from e
    except (ImageError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        # PIL's pure-Python parsers raise almost anything on malformed input: OSError, SyntaxError,
        # ValueError, EOFError, struct.error, IndexError, ZeroDivisionError, and TypeError from a
        # TIFF whose strip offset tag holds bytes (scripts/fuzz_images.py found these; the inputs are
        # in tests/faults/test_image_inputs.py). Every one is a bad file, named, never a crash.
        raise ImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def list_images(root: Path, extra_suffixes: Sequence[str] = ()) -> list[Path]:
    """Image files (and files with `extra_suffixes`) under a folder, recursively, sorted."""
    keep = IMAGE_SUFFIXES + tuple(extra_suffixes)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in keep)


def list_inputs(inputs: Sequence[str | Path], extra_suffixes: Sequence[str] = ()) -> list[Path]:
    """Files named directly, plus image files (and files with `extra_suffixes`) found recursively in
    named folders (sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += list_images(p, extra_suffixes)
        elif p.is_file():
            out.append(p)
        else:
            raise ImageError(f"{p} does not exist: give image files or folders of images")
    if not out:
        raise ImageError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return out


def none_readable(errors: list[str]) -> ImageError:
    """The error of a run whose every input image was unreadable (embed and predict write nothing then)."""
    return ImageError(f"none of the {len(errors)} input file(s) could be read as an image (first: {errors[0]}); "
                      "give image files or folders of images")
