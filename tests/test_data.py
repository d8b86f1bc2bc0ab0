import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from edgeclr import data
from edgeclr.data import DataError, open_dataset
from edgeclr.runtime import ImageError, load_image


def test_digits_is_embedded_and_split():
    tr, te = open_dataset("digits", "train"), open_dataset("digits", "test")
    assert len(tr) + len(te) == 1797 and len(te) == 450
    assert tr.images.shape[1:] == (8, 8, 1) and tr.images.max() == 255
    assert set(np.unique(te.labels)) == set(range(10))
    assert open_dataset("digits", "pretrain").images.shape == tr.images.shape


def write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 12), ("t10k", 5)]:
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    tr = open_dataset(f"fashion-mnist:{tmp_path}", "pretrain")
    te = open_dataset(f"fashion-mnist:{tmp_path}", "test")
    assert tr.images.shape == (12, 28, 28, 1) and len(te) == 5 and te.labels[3] == 3
    assert tr.classes[9] == "Ankle boot"
    assert tr.fingerprint()["files"][0]["sha256"]


def test_fashion_mnist_missing_and_truncated(tmp_path):
    with pytest.raises(DataError, match="does not exist.*apt-get install dataset-fashion-mnist"):
        open_dataset(f"fashion-mnist:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        open_dataset(f"fashion-mnist:{tmp_path}")
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4))
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(DataError, match="truncated"):
        open_dataset(f"fashion-mnist:{tmp_path}")


def test_cifar10_batches_and_unsafe_pickle(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [1, 2, 3]}, f)
    tr = open_dataset(f"cifar10:{tmp_path}", "train")
    assert tr.images.shape == (15, 32, 32, 3) and list(tr.labels[:3]) == [1, 2, 3]
    # channel planes are unpacked to HWC: pixel (0, 0) of channel 1 is byte 1024
    raw = pickle.load(open(d / "data_batch_1", "rb"))["data"][0]
    assert tr.images[0, 0, 0, 1] == raw[1024]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        open_dataset(f"cifar10:{tmp_path}", "test")
    with pytest.raises(DataError, match="needs its folder"):
        open_dataset("cifar10")


def test_stl10_binary_layout(tmp_path):
    d = tmp_path / "stl10_binary"
    d.mkdir()
    img = np.zeros((2, 3, 96, 96), np.uint8)
    img[0, 0, 5, 10] = 200  # on disk: (N, C, W, H) column-major -> pixel at x=5, y=10
    img.tofile(d / "train_X.bin")
    np.array([1, 10], np.uint8).tofile(d / "train_y.bin")
    img.tofile(d / "unlabeled_X.bin")
    tr = open_dataset(f"stl10:{tmp_path}", "train")
    assert tr.images.shape == (2, 96, 96, 3) and tr.images[0, 10, 5, 0] == 200
    assert list(tr.labels) == [0, 9]
    un = open_dataset(f"stl10:{tmp_path}", "pretrain")
    assert un.labels is None and len(un) == 2
    (d / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DataError, match="truncated"):
        open_dataset(f"stl10:{tmp_path}", "test")


def test_folder_labels_recursive_and_split(image_folder):
    ds = open_dataset(str(image_folder), "pretrain", base_size=20)
    assert len(ds) == 40 and ds.classes == ["class0", "class1"] and ds.channels == 1
    x, bad = ds.load_batch([0, 1, 2])
    assert x.shape == (3, 20, 20, 1) and x.dtype == np.uint8 and not bad
    tr, te = open_dataset(str(image_folder), "train"), open_dataset(str(image_folder), "test")
    assert len(tr) + len(te) == 40 and not set(tr.paths) & set(te.paths)


def test_folder_without_subfolders_is_unlabeled(tmp_path):
    for i in range(3):
        Image.new("RGB", (10, 12), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    ds = open_dataset(str(tmp_path))
    assert ds.labels is None and ds.channels == 3 and not data.has_labels(ds)


def test_empty_folder_wrong_path_no_readable_images(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        open_dataset(str(tmp_path))
    with pytest.raises(DataError, match="not a folder that exists"):
        open_dataset(str(tmp_path / "typo"))
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 2 image files"):
        open_dataset(str(tmp_path))


def test_corrupt_and_truncated_images_are_skipped_and_counted(image_folder):
    good = next(image_folder.rglob("*.jpg"))
    data_ = good.read_bytes()
    sos = data_.index(b"\xff\xda")  # start of scan: keep the headers, cut the pixel data
    (image_folder / "class0" / "truncated.jpg").write_bytes(data_[: sos + 20])  # opens, fails on decode
    (image_folder / "class1" / "garbage.png").write_bytes(b"\x89PNG garbage")  # fails at open
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = open_dataset(str(image_folder), "pretrain", base_size=16)
    assert len(ds) == 41  # the truncated one passes the header check ...
    i = [str(p) for p in ds.paths].index(str(image_folder / "class0" / "truncated.jpg"))
    x, bad = ds.load_batch([i, 0, 1])  # ... and is dropped when decoded
    assert len(x) == 2 and bad == [str(ds.paths[i])]
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(ds.paths[i])


def test_image_modes_and_exif(tmp_path):
    a16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    im = load_image(tmp_path / "g16.png", 1)
    assert im.mode == "L" and np.asarray(im).max() == round(a16.max() / 257)
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png", 3).getpixel((0, 0)) == (10, 20, 30)
    Image.new("P", (8, 8), 3).save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png", 3).mode == "RGB"
    # EXIF orientation 6 (rotate 90 CW to display): a 20x10 stored image is shown as 10x20
    img = Image.new("RGB", (20, 10))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (10, 20)


def test_tiles_from_a_real_stained_tissue_image(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    ihc = skimage_data.immunohistochemistry()  # (512, 512, 3)
    big = np.full((512, 768, 3), 255, np.uint8)  # plus a blank (background) band on the right
    big[:, :512] = ihc
    Image.fromarray(big).save(tmp_path / "slide.png")
    ds = open_dataset(f"tiles:{tmp_path / 'slide.png'}", base_size=40, tile_size=64, tile_stride=64)
    n_tissue = (512 // 64) ** 2
    assert 0 < len(ds) <= n_tissue  # none of the 32 blank tiles
    assert ds.images.shape[1:] == (40, 40, 3) and ds.labels is None
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(f"tiles:{tmp_path / 'nope.png'}")
    with pytest.raises(DataError, match="background"):
        Image.new("RGB", (128, 128), (255, 255, 255)).save(tmp_path / "blank.png")
        open_dataset(f"tiles:{tmp_path / 'blank.png'}")


def test_epoch_batches_cover_the_data_and_drop_a_trailing_single():
    b = data.epoch_batches(10, 3, seed=0, epoch=0)  # 3 + 3 + 3 + 1 -> the 1 is dropped
    assert [len(x) for x in b] == [3, 3, 3] and data.steps_per_epoch(10, 3) == 3
    b = data.epoch_batches(11, 3, seed=0, epoch=0)
    assert [len(x) for x in b] == [3, 3, 3, 2] and sorted(np.concatenate(b)) == list(range(11))
    assert all((x == y).all() for x, y in zip(b, data.epoch_batches(11, 3, 0, 0)))
    assert not all((x == y).all() for x, y in zip(b, data.epoch_batches(11, 3, 0, 1)))


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        open_dataset("digits", "val")


def test_worker_processes_give_the_same_batches(image_folder):
    (image_folder / "class0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.warns(UserWarning):
        ds = open_dataset(str(image_folder), "pretrain", base_size=12)
    serial = list(data.iterate_batches(ds, 8, seed=3, epoch=1, start_step=1, num_workers=0))
    parallel = list(data.iterate_batches(ds, 8, seed=3, epoch=1, start_step=1, num_workers=2))
    assert [s for s, *_ in serial] == [s for s, *_ in parallel] == list(range(1, 5))
    for (_, a, bad_a, idx_a), (_, b, bad_b, idx_b) in zip(serial, parallel):
        assert a.dtype == b.dtype == torch.uint8 and a.shape[1:] == (1, 12, 12) and torch.equal(a, b)
        assert bad_a == bad_b and len(idx_a) == len(a) and (idx_a == idx_b).all()
        for i, img in zip(idx_a, a):  # the indices say which image each row is
            assert torch.equal(img.permute(1, 2, 0), torch.as_tensor(ds.read(int(i))))


def test_a_folder_trains_at_its_images_own_size_unless_told(image_folder, tmp_path):
    """A folder left at the default input size trains at the median shorter side of its images
    (never upsampled, at most 96 px, at least 16), with the stem the presets use at that size; an
    unreadable file does not count; --input-size wins; an empty folder keeps the preset (its loading
    error comes later, as before)."""
    from skimage import data as skdata

    from edgeclr import config

    c = config.TrainConfig(data=str(image_folder))  # 32-px digits in class folders
    assert (c.input_size, c.stem_stride) == (32, 2)
    assert "not upsampled" in data.folder_input_size(str(image_folder))[1]
    big = tmp_path / "photos"
    big.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skdata, name)()).save(big / f"{name}.jpg")
    (big / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    c = config.TrainConfig(data=str(big))
    assert (c.input_size, c.stem_stride) == (96, 4) and "cut to 96 px" in data.folder_input_size(str(big))[1]
    assert "3 of the 4 images" in data.folder_input_size(str(big))[1]
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.fromarray(skdata.camera()[:8, :8]).save(tiny / "a.png")
    assert config.TrainConfig(data=str(tiny)).input_size == 16
    assert config.TrainConfig(data=str(image_folder), input_size=48).input_size == 48
    empty = tmp_path / "empty"
    empty.mkdir()
    assert data.folder_input_size(str(empty)) is None and config.TrainConfig(data=str(empty)).input_size == 96
