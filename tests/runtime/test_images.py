"""edgeclr.runtime.images: decoding image files, named errors for bad ones."""

import os

import numpy as np
import pytest
from PIL import Image

from edgeclr.runtime import ImageError, load_image


def test_bad_files_are_named_errors(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(good)
    raw = good.read_bytes()
    cases = {"zero.jpg": b"", "text.jpg": b"hello, not an image", "cut.jpg": raw[: raw.index(b"\xff\xda") + 30],
             "garbage.png": b"\x89PNG\r\n\x1a\n" + os.urandom(200)}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_huge_image_is_refused_not_decoded(tmp_path):
    big = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(big)  # 196 Mpixel, a few kB on disk: a decompression bomb
    assert big.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match="bomb.png"):
        load_image(big)


def test_grayscale_16bit_rgba_palette_and_exif_inputs(tmp_path):
    a16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png", 3).mode == "RGB"
    assert abs(np.asarray(load_image(tmp_path / "g16.png", 1)).max() - round(a16.max() / 257)) <= 1
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    assert np.asarray(load_image(tmp_path / "rgba.png", 3))[0, 0].tolist() == [255, 0, 0]
    Image.new("P", (10, 10), 3).save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png", 1).mode == "L"
    im = Image.new("L", (20, 10), 0)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg", 1).size == (10, 20)
