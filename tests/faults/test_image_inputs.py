"""Property-based tests (hypothesis) of the runtime's image loading and preprocessing: random
bytes, truncated files of every format, huge declared dimensions, every PIL mode. The runtime
either returns a valid image or raises ImageError naming the file; nothing else escapes, and
nothing is allocated for a declared size it refuses. scripts/fuzz_images.py is the
coverage-guided (atheris) counterpart."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeclr.runtime import ImageError, Preprocess, load_image, preprocess

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"]
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F"]


def _valid(img: Image.Image, channels: int) -> bool:
    return img.mode == ("L" if channels == 1 else "RGB") and img.size[0] >= 1 and img.size[1] >= 1


def _check(path: Path, channels: int) -> None:
    try:
        img = load_image(path, channels)
    except ImageError as e:
        assert str(path) in str(e)  # the message names the bad file
        return
    assert _valid(img, channels)


def _encoded(fmt: str, w: int, h: int, seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


@FAST
@given(data=st.binary(min_size=0, max_size=2048), channels=st.sampled_from([1, 3]))
def test_random_bytes_never_escape_as_anything_but_image_error(tmp_path, data, channels):
    p = tmp_path / "x.jpg"
    p.write_bytes(data)
    _check(p, channels)


@FAST
@given(fmt=st.sampled_from(FORMATS), w=st.integers(1, 40), h=st.integers(1, 40), seed=st.integers(0, 2**16),
       cut=st.floats(0.0, 1.0), flip=st.integers(0, 4095), channels=st.sampled_from([1, 3]))
def test_truncated_or_damaged_files_of_every_format(tmp_path, fmt, w, h, seed, cut, flip, channels):
    raw = bytearray(_encoded(fmt, w, h, seed))
    if flip % 2:
        raw[flip % len(raw)] ^= 0xA5  # one damaged byte
    p = tmp_path / f"x.{fmt.lower()}"
    p.write_bytes(bytes(raw[: max(0, int(len(raw) * cut))]))
    _check(p, channels)


@FAST
@given(mode=st.sampled_from(MODES), w=st.integers(1, 30), h=st.integers(1, 30), channels=st.sampled_from([1, 3]),
       size=st.sampled_from([8, 16, 32]), fmt=st.sampled_from(["TIFF", "PNG"]))
def test_every_mode_becomes_a_finite_model_input(tmp_path, mode, w, h, channels, size, fmt):
    img = Image.new(mode, (w, h))
    p = tmp_path / f"x.{fmt.lower()}"
    try:
        img.save(p, fmt)
    except (OSError, KeyError, ValueError):
        assume(False)  # PIL cannot write this mode in this format: draw another example
    loaded = load_image(p, channels)
    assert _valid(loaded, channels)
    x = preprocess(loaded, Preprocess(size, size, (0.5,) * channels, (0.25,) * channels, channels))
    assert x.shape == (channels, size, size) and x.dtype == np.float32 and np.isfinite(x).all()


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w,h", [(100_000, 100_000), (10_000, 10_000), (2**31 - 1, 1), (65_535, 65_535)])
def test_huge_declared_dimensions_are_refused_before_decoding(tmp_path, w, h):
    import resource
    import time

    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(w, h))  # 100 bytes that claim up to 40 GB of pixels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    with pytest.raises(ImageError, match=str(p.name)):
        load_image(p, 3)
    assert time.time() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing of that size was allocated


# inputs that scripts/fuzz_images.py (atheris) found escaping load_image as something other than ImageError
FUZZ_FINDINGS = {
    # a TIFF whose StripOffsets tag holds bytes: PIL's loader raised TypeError from seek() (2026-12-01)
    "tiff-bytes-strip-offset.tif": "SUkqAAgAAAAKAAABBAABAAAACQAAAAEBBAABAAAADAAAAAIBAwAAhgADBgAAAAMBAwABAABAAQAAAAYDAwABAAAAAQAAABEBBwABAAAAjAAA"
                                   "AH+E/////7AeC9eAr2k5tLz//////////////////////////////////////////////////7T//////////////////x3vnCCIBkx3"
                                   "mFvRpTis",
}


@pytest.mark.parametrize("name", sorted(FUZZ_FINDINGS))
@pytest.mark.parametrize("channels", [1, 3])
def test_inputs_the_fuzzer_found_are_image_errors(tmp_path, name, channels):
    import base64

    path = tmp_path / name
    path.write_bytes(base64.b64decode(FUZZ_FINDINGS[name]))
    with pytest.raises(ImageError, match="cannot decode image .*" + name):
        load_image(path, channels)


# a 465-byte TIFF that declares 9 x 9,633,804 RGB pixels (scripts/fuzz_images.py, 2026-12-01: out of memory)
THIN_TIFF = (
    "SUkqAAgAAAAKAAABBAABAAAACQAAAAEBBAABAAAADACTAAIBAwADAAAAhgAAAAMBAwABAAAAAQAAAAYBAwABAAAAAgAAABEBBAABAAAAjAAAAB"
    "UBAwABAAAAAwAAABYBBAABAAAADAAAABcAAAQBAABEAQEAABwBAwABAAAAAQAAAAAAAEAIAAgACABfgsLZz+sPoyHX2YL4vRBFuOjNTqk9fQod"
    "8EITtic7BDtR3ix4ejLQThxApnlZqul/su2AcXtMm0WagvhfScC6v3/coecBK4vtv1btjwfoYO9MNwBHTcfb0LCQvqtoeLMA8PXmZL/Yftsfle"
    "eNcxCZCHnTz8MHs8q6pie52EnE9ywOf9sWOkv53C55qAXZM52KOBKVFCDruUzx1iZ7zzo1bAyjOmc99T8HaMpeAWAH0R+o6x4CqQquq7vijoY6"
    "Nq6lMWbeQfDgiZ1lGpnDM7E4Yhr1/nV9Jkn/P8UTzlYGGPstcShh861/rz7GOfPGf4SmvKUe14ALPrCvaTm0vFqQY7o7CuA+r5UiFQQzlLl1s7"
    "g7anHY8Z59hhhOG2D1AmxPGA1HbMG0X3xDswS4hnm145KmrBLSeR3vnCAGiEx3mFvRpTis"
)


def test_a_thin_image_is_refused_from_its_header_before_any_allocation(tmp_path):
    """A 465-byte TIFF declaring 9 x 9,633,804 pixels passed PIL's bomb limit, decoded to 260 MB and
    took 1.3 GB to preprocess at 16 px (the resize up-scales its short side); the fuzzer's 2 GB limit
    stopped it. Aspect ratios beyond MAX_ASPECT:1 are now refused from the header, files and in-memory images alike."""
    import base64
    import resource

    from edgeclr.runtime import MAX_ASPECT, resize_center_crop

    path = tmp_path / "thin.tif"
    path.write_bytes(base64.b64decode(THIN_TIFF))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match=r"thin.tif: 9x9633804 pixels, an aspect ratio beyond 64:1"):
        load_image(path, 1)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: nothing near 260 MB was decoded
    with pytest.raises(ImageError, match="aspect ratio"):
        resize_center_crop(Image.new("L", (2, 2 * MAX_ASPECT + 2)), 16, 16)
    ok = resize_center_crop(Image.new("L", (10, 10 * MAX_ASPECT)), 16, 16)  # at the limit: fine
    assert ok.size == (16, 16)
