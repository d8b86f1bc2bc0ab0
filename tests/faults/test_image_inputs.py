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
