"""Segmentation: images with masks cut into tiles, `edgeclr finetune --task segment` (DeepLabV3 on
the encoder), its export through the task table and `edgeclr segment` in the torch-free runtime."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import digit_fields, make_checkpoint, run
from PIL import Image

from edgeclr import checkpoint, data, tasks
from edgeclr.errors import DataError, ModelError
from edgeclr.models import (
    SEG_HEADS,
    ModelSpec,
    SegmenterNet,
    block_shapes,
    create_model,
    dilate,
    feature_maps,
    output_stride,
    seg_head_for,
    segmenter_from_checkpoint,
)
from edgeclr.runtime import Classifier, Segmenter, normalize, open_model
from edgeclr.runtime.embedder import tile_starts

SEG = ["--task", "segment", "--steps", "30", "--batch-size", "8", "--eval-every", "10", "--threads", "1"]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """A run with a teacher checkpoint (16 px, 1 channel), fields of digits with masks, and a
    segmenter fine-tuned on one field and tested on the other."""
    d = tmp_path_factory.mktemp("seg")
    make_checkpoint(d / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    fields = digit_fields(d / "fields", fields=2)
    (d / "train" / "images").mkdir(parents=True)
    (d / "train" / "masks").mkdir(parents=True)
    for sub in ("images", "masks"):
        (fields / sub / "field0.png").rename(d / "train" / sub / "field0.png")
    (fields / "masks" / "classes.txt").rename(d / "train" / "masks" / "classes.txt")
    r = run(["finetune", str(d / "run"), *SEG, "--data", str(d / "train" / "images"), "--masks", str(d / "train" / "masks"),
             "--test-data", str(fields / "images"), "--test-masks", str(fields / "masks"), "--formats", "onnx,openvino", "--int8",
             "--calib-images", "32", "--out", str(d / "seg")])
    return d, r


def test_finetune_segment_trains_tests_exports_and_the_files_score_like_the_checkpoint(segmenter):
    d, r = segmenter
    res = json.loads((d / "seg" / "result.json").read_text())
    assert res["task"] == "segment" and res["classes"][:2] == ["background", "digit 0"] and len(res["classes"]) == 11
    assert res["train_images"] + res["val_images"] == 36 and res["test_images"] == 36  # 96 px fields, 16 px tiles
    assert len(res["test_iou"]) == 11 and 0 <= res["test_miou"] <= 100 and res["test_pixel_acc"] > 50
    fp32 = res["artifacts"]["onnx-fp32"]
    assert fp32["parity"]["pixel_agreement"] >= 0.999 and abs(fp32["test_miou"] - res["test_miou"]) <= 0.1
    assert abs(res["artifacts"]["openvino-fp32"]["test_miou"] - res["test_miou"]) <= 0.1
    assert "onnx-int8" in res["artifacts"] and "openvino-int8" in res["artifacts"]
    assert "test mIoU" in r.output and "on 36 tiles" in r.output
    meta = json.loads((d / "seg" / "export" / "metadata.json").read_text())["segmenter.onnx"]
    assert meta["task"] == "segment" and len(meta["palette"]) == 11 and meta["classes"][10] == "digit 9"


def test_finetune_segment_writes_overlays_and_a_report(segmenter):
    d, _ = segmenter
    sheet = Image.open(d / "seg" / "overlays.png")
    assert sheet.mode == "RGB" and sheet.size[0] == 3 * 96 + 4 * 4 and sheet.size[1] > 6 * 96  # 6 tiles, 16 px drawn at 96
    md = (d / "seg" / "report.md").read_text()
    assert "Test mIoU" in md and "| digit 9 |" in md and "segmenter-int8.onnx" in md and "report_files/overlays.png" in md
    assert (d / "seg" / "report_files" / "overlays.png").is_file() and "<img" in (d / "seg" / "report.html").read_text()


def test_segment_label_efficiency_curve_against_random_init(tmp_path):
    make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    root = digit_fields(tmp_path / "f", fields=2)
    args = ["finetune", str(tmp_path / "run"), "--task", "segment", "--data", str(root / "images"), "--masks", str(root / "masks"),
            "--steps", "6", "--batch-size", "8", "--eval-every", "3", "--threads", "1", "--draws", "2"]
    r = run([*args, "--label-efficiency", "0,4"])
    le = json.loads((tmp_path / "run" / "label_efficiency" / "label_efficiency.json").read_text())
    assert le["levels"] == [4, 0] and le["level_counts"][0] == 4 and le["level_counts"][1] == le["bank_images"] == 54  # 72 tiles - 18 test
    assert {(row["method"], row["features"]) for row in le["rows"]} == {("frozen", "model"), ("finetune", "model"), ("finetune", "random")}
    for row in le["rows"]:
        assert [p["level"] for p in row["points"]] == [4, 0] and all(len(p["values"]) == 2 for p in row["points"])
        assert all(0 <= v <= 100 for p in row["points"] for v in p["values"])
    assert "| 4 tiles | all 54 tiles |" in r.output and "Best of each: at 4 tiles" in r.output
    md = (tmp_path / "run" / "label_efficiency" / "report.md").read_text()
    assert "Label efficiency" in md and (tmp_path / "run" / "label_efficiency" / "label_efficiency.png").stat().st_size > 1000
    assert not (tmp_path / "run" / "label_efficiency" / "checkpoints").exists()
    r = run([*args, "--label-efficiency", "4"], ok=False)
    assert r.exit_code == 2 and "already holds a label-efficiency curve" in r.output
    r = run([*args, "--label-efficiency", "500", "--out", str(tmp_path / "o")], ok=False)
    assert r.exit_code == 2 and "54 labelled tile(s) of 16 px" in r.output
    r = run(["finetune", str(tmp_path / "run"), "--label-efficiency", "4"], ok=False)
    assert r.exit_code == 2 and "edgeclr eval RUN --label-efficiency" in r.output


def test_segment_command_tiles_any_image_size_and_matches_torch_on_one_tile(segmenter, tmp_path):
    d, _ = segmenter
    model = d / "seg" / "export" / "segmenter.onnx"
    seg = Segmenter.load(model)
    assert isinstance(open_model(model), Segmenter) and seg.classes[0] == "background"
    net = segmenter_from_checkpoint(checkpoint.load(d / "seg" / "checkpoints" / "last.pt"))
    tile = np.asarray(Image.open(d / "fields" / "images" / "field1.png"))[:16, :16]
    with torch.no_grad():
        ref = net(torch.from_numpy(normalize(tile, seg.meta.preprocess)[None])).numpy()[0]
    assert np.abs(seg.probabilities(tile) - ref).max() <= 1e-4  # one tile: exactly the model
    big = np.asarray(Image.open(d / "fields" / "images" / "field1.png"))[:, :83]  # not a multiple of the tile
    Image.fromarray(big, "L").save(tmp_path / "odd.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    r = run(["segment", str(tmp_path / "odd.png"), str(tmp_path / "broken.png"), "--model", str(model), "--out", str(tmp_path / "out")])
    assert "1 image(s) segmented into 11 classes (1 unreadable)" in r.output
    labels = np.asarray(Image.open(tmp_path / "out" / "odd.png"))
    assert labels.shape == big.shape and labels.max() <= 10
    assert Image.open(tmp_path / "out" / "odd.overlay.png").size == (83, 96)
    rows = list(csv.reader((tmp_path / "out" / "segments.csv").open()))
    assert rows[0][:3] == ["path", "labels", "share_background"] and abs(sum(map(float, rows[1][2:])) - 1) < 1e-4
    assert (tmp_path / "out" / "classes.txt").read_text().splitlines()[1] == "digit 0"


def test_bench_times_a_segmenter_and_its_int8_file(segmenter, tmp_path):
    d, _ = segmenter
    files = [str(d / "seg" / "export" / n) for n in ("segmenter.onnx", "segmenter-int8.onnx")]
    run(["bench", *files, "--threads", "1", "--rounds", "1", "--runs", "3", "--warmup", "0.1", "--out", str(tmp_path / "b")])
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    assert [Path(r["path"]).name for r in rows] == ["segmenter.onnx", "segmenter-int8.onnx"] and all(r["p50_ms"] > 0 for r in rows)


def test_segment_runs_without_torch(segmenter, tmp_path):
    d, _ = segmenter
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgeclr.cli import cli\n"
            f"cli(['segment', {str(d / 'fields' / 'images')!r}, '--model', {str(d / 'seg' / 'export' / 'segmenter-int8.onnx')!r}, "
            f"'--out', {str(tmp_path / 'o')!r}])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "1 image(s) segmented" in p.stdout and (tmp_path / "o" / "field1.png").is_file()


def test_each_task_file_refuses_the_wrong_command(segmenter, tmp_path):
    d, _ = segmenter
    model = d / "seg" / "export" / "segmenter.onnx"
    with pytest.raises(ModelError, match="is a segmenter: use `edgeclr segment`"):
        Classifier.load(model)
    r = run(["predict", str(d / "fields" / "images"), "--model", str(model), "--out", str(tmp_path / "p.csv")], ok=False)
    assert r.exit_code == 2 and "is a segmenter" in r.output
    r = run(["segment", str(d / "fields" / "images"), "--model", str(d / "run" / "export" / "x.onnx")], ok=False)
    assert r.exit_code == 2


def test_bad_masks_get_a_clear_error(tmp_path):
    root = digit_fields(tmp_path / "f", fields=2)
    with pytest.raises(DataError, match="have no mask"):
        (root / "masks" / "field1.png").rename(tmp_path / "away.png")
        data.load_masked(root / "images", root / "masks", 16, 16, 1)
    (tmp_path / "away.png").rename(root / "masks" / "field1.png")
    Image.open(root / "masks" / "field1.png").crop((0, 0, 90, 96)).save(root / "masks" / "field1.png")
    with pytest.raises(DataError, match=r"mask .*field1.png is 90x96, its image .*field1.png 96x96"):
        data.load_masked(root / "images", root / "masks", 16, 16, 1)
    digit_fields(root, fields=2)
    m = np.asarray(Image.open(root / "masks" / "field0.png")).copy()
    m[0, 0] = 42
    Image.fromarray(m, "L").save(root / "masks" / "field0.png")
    with pytest.raises(DataError, match=r"class ids \[42\] outside the 11 classes"):
        data.load_masked(root / "images", root / "masks", 16, 16, 1)
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(root / "masks" / "field0.png")
    with pytest.raises(DataError, match="is a colour image"):
        data.load_masked(root / "images", root / "masks", 16, 16, 1)
    digit_fields(root, fields=2, classes=False)
    (root / "masks" / "classes.txt").unlink()
    t = data.load_masked(root / "images", root / "masks", 16, 16, 1)
    assert t.images.shape == (72, 16, 16, 1) and t.masks.shape == (72, 16, 16) and t.classes[0] == "background"
    with pytest.raises(DataError, match="smaller than the tile size 128"):
        data.load_masked(root / "images", root / "masks", 128, 128, 1)


def test_bad_segment_requests(tmp_path):
    make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    root = digit_fields(tmp_path / "f", fields=1)
    r = run(["finetune", str(tmp_path / "run"), "--task", "segment", "--data", str(root / "images")], ok=False)
    assert r.exit_code == 2 and "--task segment needs --data IMAGES and --masks DIR" in r.output
    r = run(["finetune", str(tmp_path / "run"), "--masks", str(root / "masks")], ok=False)
    assert r.exit_code == 2 and "--masks belong to --task segment" in r.output
    r = run(["finetune", str(tmp_path / "run"), *SEG, "--data", str(root / "images"), "--masks", str(root / "masks"),
             "--mode", "linear"], ok=False)
    assert r.exit_code == 2 and "--mode frozen or full" in r.output
    r = run(["finetune", str(tmp_path / "run"), *SEG, "--data", str(root / "images"), "--masks", str(root / "masks"),
             "--tiles", "500", "--out", str(tmp_path / "o")], ok=False)
    assert r.exit_code == 2 and "labelled tile(s) of 16 px to train on (--tiles 500)" in r.output
    assert not (tmp_path / "o" / "checkpoints").exists() and not (tmp_path / "o" / "result.json").exists()  # refused before training


@pytest.mark.parametrize("name,head,stride", [("resnet18", "deeplabv3", 8), ("resnet18", "deeplabv3", 16), ("resnet18", "lraspp", None),
                                              ("mobilenet_v3_small", "deeplabv3", 16), ("mobilenet_v3_small", "lraspp", None),
                                              ("mobilenet_v2", "lraspp", 8)])
def test_each_segmentation_head_on_each_backbone_family(name, head, stride):
    torch.manual_seed(0)
    enc = create_model(ModelSpec(name, in_chans=3, stem_stride=2, width=8 if name == "resnet18" else None))
    native = output_stride(enc)
    net = SegmenterNet(enc, 4, stride, head).eval()
    with torch.no_grad():
        p = net(torch.rand(2, 3, 64, 64))
    assert p.shape == (2, 4, 64, 64) and torch.allclose(p.sum(1), torch.ones(2, 64, 64), atol=1e-5)
    want = stride or SEG_HEADS[head].stride
    assert net.output_stride == min(native, want) == output_stride(enc)
    assert net.checkpoint_extras()["seg_head"] == head
    if head == "lraspp":  # the low-level maps: the last block at half the last maps' stride
        assert block_shapes(enc)[net.head.tap][1] == net.output_stride // 2
    assert seg_head_for(name) == ("lraspp" if name.startswith("mobilenet") else "deeplabv3")


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_a_dilated_mobilenet_is_torchvisions_dilated_mobilenet(arch):
    """dilate() on a built MobileNetV3 gives exactly torchvision's `dilated=True` network (the
    backbone of its LR-ASPP and DeepLabV3 MobileNet models) with the same weights."""
    import torchvision

    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None, dilated=True).eval()
    enc = create_model(ModelSpec(arch, in_chans=3)).eval()
    enc.backbone.features.load_state_dict(ref.features.state_dict())
    assert output_stride(enc) == 32 and dilate(enc, 16) == 16
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(feature_maps(enc, x), ref.features(x))


def test_a_checkpoint_without_a_head_name_is_deeplabv3(segmenter):
    """Segmenter checkpoints written before the head table carry no `seg_head`: they load as DeepLabV3."""
    d, _ = segmenter
    ck = checkpoint.load(d / "seg" / "checkpoints" / "last.pt")
    assert ck["seg_head"] == "deeplabv3"
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        ref = segmenter_from_checkpoint(ck)(x)
        del ck["seg_head"]
        net = segmenter_from_checkpoint(ck)
        assert net.head_name == "deeplabv3" and torch.equal(net(x), ref)


def test_a_mobilenet_student_segments_with_lraspp_and_its_int8_file_passes(tmp_path):
    """The edge segmenter: a MobileNet encoder gets LR-ASPP by default (a fraction of DeepLabV3's
    head), trains, exports with its parity check, and quantises."""
    make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", "mobilenet_v3_small")
    root = digit_fields(tmp_path / "f", fields=2)
    run(["finetune", str(tmp_path / "run"), *SEG, "--data", str(root / "images"), "--masks", str(root / "masks"),
         "--formats", "onnx", "--int8", "--calib-images", "32", "--out", str(tmp_path / "seg")])
    res = json.loads((tmp_path / "seg" / "result.json").read_text())
    assert res["seg_head"] == "lraspp" and res["output_stride"] == 16
    assert res["artifacts"]["onnx-fp32"]["parity"]["pixel_agreement"] >= 0.999
    assert abs(res["artifacts"]["onnx-fp32"]["test_miou"] - res["test_miou"]) <= 0.1 and "onnx-int8" in res["artifacts"]
    net = segmenter_from_checkpoint(checkpoint.load(tmp_path / "seg" / "checkpoints" / "last.pt"))
    assert net.head_name == "lraspp" and sum(p.numel() for p in net.head.parameters()) < 200_000


def test_tiles_cover_every_pixel_with_overlap_and_the_scores():
    for n, s, o in [(16, 16, 4), (17, 16, 4), (100, 16, 4), (96, 16, 0), (5, 16, 4)]:
        st = tile_starts(n, s, o)
        covered = np.zeros(max(n, s), bool)
        for a in st:
            covered[a:a + s] = True
        assert covered[:n].all() and st[-1] + s == max(n, s) and st == sorted(set(st))
    conf = tasks.confusion(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [255, 0]]), 2)
    assert conf.tolist() == [[1, 1], [0, 1]]
    sc = tasks.iou_scores(conf)
    assert sc["iou"] == [50.0, 50.0] and round(sc["miou"], 6) == 50.0 and sc["dice"] == [66.667, 66.667]
    probs = np.zeros((1, 3, 2, 2))
    probs[0, 0] = 1
    assert tasks.miou(probs, np.zeros((1, 2, 2)))["iou"] == [100.0, None, None]


@pytest.mark.skipif(importlib.util.find_spec("histolytics") is None,
                    reason="needs the H&E fields of histolytics: pip install --no-deps histolytics==0.3.0 (.ci/run does)")
def test_real_he_nuclei_masks_train_a_segmenter_that_beats_predicting_background(tmp_path):
    """One histolytics H&E field (model-made nucleus type masks: 0 background, 1 connective, 2
    inflammatory, 3 neoplastic): fine-tune on the left half, test on the right."""
    src = Path(importlib.util.find_spec("histolytics").submodule_search_locations[0]) / "data"
    img = np.asarray(Image.open(src / "hgsc_nest.jpg").convert("RGB"))[:192, :384]
    mask = np.load(src / "hgsc_nest_type_mask.npz")["nuc_raster"].astype(np.uint8)[:192, :384]
    for part, sl in (("train", np.s_[:, :192]), ("test", np.s_[:, 192:])):
        (tmp_path / part / "images").mkdir(parents=True)
        (tmp_path / part / "masks").mkdir(parents=True)
        Image.fromarray(img[sl]).save(tmp_path / part / "images" / "hgsc.png")
        Image.fromarray(mask[sl], "L").save(tmp_path / part / "masks" / "hgsc.png")
    (tmp_path / "train" / "masks" / "classes.txt").write_text("background\nconnective\ninflammatory\nneoplastic\n")
    torch.manual_seed(0)
    from edgeclr.runtime import Preprocess

    spec = ModelSpec("resnet18", in_chans=3, stem_stride=2, width=8)
    pp = Preprocess(32, 32, (0.7, 0.5, 0.7), (0.15, 0.15, 0.1), 3)
    checkpoint.save({"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "stage": "train",
                     "model": create_model(spec).state_dict(), "spec": spec.to_dict(), "preprocess": pp.to_dict(),
                     "config": {"data": f"tiles:{tmp_path / 'train' / 'images'}"}}, tmp_path / "run" / "train" / "checkpoints" / "last.pt")
    run(["finetune", str(tmp_path / "run"), "--task", "segment", "--steps", "150", "--batch-size", "16", "--lr", "3e-3",
         "--data", str(tmp_path / "train" / "images"), "--masks", str(tmp_path / "train" / "masks"),
         "--test-data", str(tmp_path / "test" / "images"), "--test-masks", str(tmp_path / "test" / "masks"),
         "--threads", "1", "--out", str(tmp_path / "seg")])
    res = json.loads((tmp_path / "seg" / "result.json").read_text())
    y = mask[:, 192:]
    all_background = tasks.iou_scores(tasks.confusion(np.zeros_like(y), y, 4))["miou"]
    print(f"H&E: mIoU {res['test_miou']:.2f} vs all-background {all_background:.2f}")
    assert res["test_miou"] > all_background + 5, (res["test_miou"], all_background)


def write_slide(path: Path, mpp: float = 0.5) -> Path:
    """A pyramidal tiled TIFF (3 levels, zlib tiles, mpp in the resolution tags) whose left half
    is scikit-image's real immunohistochemistry field (stained tissue) and right half blank glass."""
    import tifffile
    from skimage import data as skdata

    ihc = skdata.immunohistochemistry()  # (512, 512, 3)
    field = np.full((1024, 1024, 3), 245, np.uint8)
    field[:512, :512], field[512:, :512] = ihc, ihc[::-1]
    levels = [field]
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((levels[-1].shape[1] // 2,) * 2, Image.BILINEAR)))
    with tifffile.TiffWriter(path) as tif:
        for i, lv in enumerate(levels):
            res = 1e4 / (mpp * 2 ** i)
            tif.write(lv, tile=(128, 128), photometric="rgb", compression="zlib", resolution=(res, res),
                      resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
    return path


def test_a_whole_slide_image_is_tiled_on_its_tissue_and_segmented(segmenter, tmp_path):
    from edgeclr.runtime.slides import is_slide, slide_tiles

    d, _ = segmenter
    slide = write_slide(tmp_path / "slides" / "case1.tif")
    assert is_slide(slide) and not is_slide(d / "fields" / "images" / "field1.png")
    tiles, corners = slide_tiles(slide, 64, mpp=1.0)  # level 1 (512 px), tiles where there is tissue
    assert len(tiles) >= 8 and tiles.shape[1:] == (64, 64, 3) and corners[:, 1].max() < 512  # none on the glass half
    ds = data.open_dataset(f"slide:{slide}@level=1", tile_size=64, base_size=64)
    assert ds.images.shape == tiles.shape and (ds.images == tiles).all()
    r = run(["segment", str(tmp_path / "slides"), "--model", str(d / "seg" / "export" / "segmenter.onnx"), "--level", "1",
             "--out", str(tmp_path / "out")])
    assert "1 image(s) segmented" in r.output
    labels = np.asarray(Image.open(tmp_path / "out" / "case1.png"))
    assert labels.shape == (512, 512) and (labels[:, 300:] == 0).all()  # glass is background


def test_bad_slides_get_a_clear_error(tmp_path):
    import tifffile

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((64, 64, 3), np.uint8))  # one stripped page: an ordinary image, not a slide
    for spec, msg in ((f"slide:{plain}", "not a whole-slide image OpenSlide can read"),
                      (f"slide:{tmp_path / 'none.svs'}", "does not exist"),
                      (f"slide:{write_slide(tmp_path / 's.tif')}@zoom=2", "give level=N or mpp=X"),
                      (f"slide:{tmp_path / 's.tif'}@level=7", "has levels 0..2, not 7")):
        with pytest.raises(DataError, match=msg):
            data.open_dataset(spec, tile_size=64, base_size=64)
    r = run(["train", "--data", f"slide:{plain}", "--out", str(tmp_path / "run"), "--epochs", "1"], ok=False)
    assert r.exit_code == 2 and "not a whole-slide image" in r.output


def test_init_from_a_weights_file_the_user_has(tmp_path):
    """--init FILE: a torchvision-style state dict (here written by the test; ImageNet weights
    cannot be downloaded) initialises the source's architecture; a file of another architecture,
    or not a state dict, is refused with the fix."""
    make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    root = digit_fields(tmp_path / "f", fields=1)
    torch.manual_seed(7)
    theirs = create_model(ModelSpec("resnet18", in_chans=1, stem_stride=2, width=8)).backbone.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.items()}}, tmp_path / "weights.pth")
    run(["finetune", str(tmp_path / "run"), *SEG, "--data", str(root / "images"), "--masks", str(root / "masks"), "--mode", "frozen",
         "--steps", "2", "--init", str(tmp_path / "weights.pth"), "--formats", "", "--out", str(tmp_path / "ft")])
    mine = checkpoint.load(tmp_path / "ft" / "checkpoints" / "last.pt")["model"]
    conv = "backbone.layer1.0.conv1.weight"
    assert torch.equal(mine[conv], theirs["layer1.0.conv1.weight"])  # frozen: the file's weights, untouched
    torch.save(create_model(ModelSpec("mobilenet_v3_small", in_chans=1)).backbone.state_dict(), tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("not weights")
    for f, msg in (("other.pth", "weights of another architecture"), ("text.pth", "not a state dict that loads"),
                   ("none.pth", "give pretrained, random, or a weights file that exists")):
        r = run(["finetune", str(tmp_path / "run"), *SEG, "--data", str(root / "images"), "--masks", str(root / "masks"),
                 "--init", str(tmp_path / f), "--out", str(tmp_path / f"o-{f}")], ok=False)
        assert r.exit_code == 2 and msg in r.output, r.output
        assert not (tmp_path / f"o-{f}" / "checkpoints").exists()


def _boxes_as_geojson(root, qupath: bool = True):
    """Each digit field's masks as GeoJSON: one rectangle per digit around its inked pixels, class
    "digit D" (QuPath's classification object, or a class_name string); returns the expected label
    maps (the same rectangles drawn with numpy)."""
    expected = {}
    for mask_path in sorted((root / "masks").glob("*.png")):
        m = np.asarray(Image.open(mask_path))
        want, feats = np.zeros(m.shape, np.int64), []
        for y in range(0, m.shape[0], 16):
            for x in range(0, m.shape[1], 16):
                ys, xs = np.nonzero(m[y:y + 16, x:x + 16])
                if not len(ys):
                    continue
                x0, x1, y0, y1 = x + xs.min(), x + xs.max(), y + ys.min(), y + ys.max()
                cid = int(m[y + ys[0], x + xs[0]])
                want[y0:y1 + 1, x0:x1 + 1] = cid
                name = f"digit {cid - 1}"
                feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
                    [[int(x0), int(y0)], [int(x1), int(y0)], [int(x1), int(y1)], [int(x0), int(y1)], [int(x0), int(y0)]]]},
                    "properties": {"classification": {"name": name, "color": [255, 0, 0]}} if qupath else {"class_name": name}})
        mask_path.unlink()
        mask_path.with_suffix(".geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
        expected[mask_path.stem] = want
    return expected


def test_polygon_masks_are_rasterised_like_the_rectangles_they_draw(tmp_path):
    root = digit_fields(tmp_path / "f", fields=2, classes=False)
    want = _boxes_as_geojson(root)
    t = data.load_masked(root / "images", root / "masks", 16, 16, 1)
    present = sorted({int(v) for w in want.values() for v in np.unique(w) if v})  # names sorted: "digit 0" < "digit 1" ...
    assert t.classes == ["background"] + [f"digit {c - 1}" for c in present]
    remap = np.zeros(12, np.int64)
    remap[present] = np.arange(1, len(present) + 1)
    got = np.zeros((2, 96, 96), np.int64)
    for k, (y, x) in enumerate((y, x) for _ in range(2) for y in range(0, 96, 16) for x in range(0, 96, 16)):
        got[t.source[k], y:y + 16, x:x + 16] = t.masks[k]
    for i, stem in enumerate(("field0", "field1")):
        assert np.array_equal(got[i], remap[want[stem]])
    (root / "masks" / "classes.txt").write_text("\n".join(["background"] + [f"digit {i}" for i in range(10)]) + "\n")
    t = data.load_masked(root / "images", root / "masks", 16, 16, 1)  # the class list given: ids follow it
    assert len(t.classes) == 11 and np.array_equal(t.masks[t.source == 0].reshape(-1), want["field0"].reshape(6, 16, 6, 16)
                                                   .transpose(0, 2, 1, 3).reshape(-1))


def test_polygon_holes_ignore_multipolygons_and_bad_polygons(tmp_path):
    def write(features):
        p = tmp_path / "m.geojson"
        p.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        return p

    def poly(rings, name, kind="Polygon"):
        return {"type": "Feature", "geometry": {"type": kind, "coordinates": rings}, "properties": {"class_name": name}}

    def sq(a, b):
        return [[a, a], [b, a], [b, b], [a, b], [a, a]]

    classes = ["background", "stroma", "tumour"]
    m = data.rasterise_polygons(write([poly([sq(0, 40)], "stroma"), poly([sq(10, 30), sq(15, 25)], "tumour"),
                                       poly([[sq(50, 55)], [sq(57, 70)]], "Ignore*", "MultiPolygon")]), (64, 64), classes)
    assert m[5, 5] == 1 and m[12, 12] == 2 and m[20, 20] == 1  # the hole shows the stroma under it
    assert m[52, 52] == 255 and m[60, 60] == 255 and m[45, 45] == 0 and m.shape == (64, 64)  # clipped at the border
    with pytest.raises(DataError, match="class 'necrosis' is not one of the classes"):
        data.rasterise_polygons(write([poly([sq(0, 9)], "necrosis")]), (64, 64), classes)
    with pytest.raises(DataError, match="none of its 1 polygon"):
        data.rasterise_polygons(write([poly([sq(100, 120)], "stroma")]), (64, 64), classes)
    with pytest.raises(DataError, match="feature 0 is a Point"):
        data.rasterise_polygons(write([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]), (64, 64), classes)
    with pytest.raises(DataError, match="feature 0 has no class name"):
        data.rasterise_polygons(write([poly([sq(0, 9)], None)]), (64, 64), classes)
    assert data.rasterise_polygons(write([poly([sq(0, 9)], None)]), (64, 64), ["background", "nucleus"])[3, 3] == 1
    (tmp_path / "m.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(DataError, match="is not readable GeoJSON"):
        data.rasterise_polygons(tmp_path / "m.geojson", (64, 64), classes)


def test_a_slide_with_polygon_annotations_gives_labelled_tissue_tiles(tmp_path):
    """QuPath's whole-slide workflow: polygons in level-0 pixels, the slide read at a coarser level
    (the polygons scaled to it), tiles on glass left out."""
    slide = write_slide(tmp_path / "slides" / "case1.tif")  # level 0 1024 px, tissue on the left half
    (tmp_path / "ann").mkdir()

    def rect(x0, y0, x1, y1, name):
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": {"classification": {"name": name}}}

    (tmp_path / "ann" / "case1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        rect(0, 0, 511, 255, "Tumor"), rect(0, 512, 255, 1023, "Stroma")]}))
    t = data.load_masked(f"slide:{slide}@level=1", tmp_path / "ann", 64, 64, 3)
    assert t.classes == ["background", "Stroma", "Tumor"] and t.images.shape[1:] == (64, 64, 3)
    assert len(t.masks) >= 16 and (t.corners[:, 1] < 256).all()  # tissue tiles only: none on the glass half
    want = np.zeros((512, 512), np.int64)
    want[:128, :256], want[256:, :128] = 2, 1  # the polygons at level 1 (downsample 2; PIL fills the edge pixels)
    for (y, x), m in zip(t.corners, t.masks):
        assert np.array_equal(m, want[y:y + 64, x:x + 64])
    (tmp_path / "ann" / "case1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        rect(4000, 4000, 5000, 5000, "Tumor")]}))
    with pytest.raises(DataError, match="none of its 1 polygon"):
        data.load_masked(f"slide:{slide}@level=1", tmp_path / "ann", 64, 64, 3)
    (tmp_path / "ann" / "case1.geojson").rename(tmp_path / "ann" / "other.geojson")
    with pytest.raises(DataError, match="have no mask"):
        data.load_masked(f"slide:{slide}@level=1", tmp_path / "ann", 64, 64, 3)
