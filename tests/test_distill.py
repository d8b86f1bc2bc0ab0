import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, run
from PIL import Image

from edgeclr import checkpoint, config, data, distill
from edgeclr.loading import load_encoder
from edgeclr.losses import EmbeddingQueue, cosine_distill, relational_distill
from edgeclr.runtime import Preprocess

# a tiny student: MobileNetV3-Small on the teacher's 8x8 digits, 2 epochs of 22 steps
STUDENT = ["--model", "mobilenet_v3_small", "--epochs", "2", "--batch-size", "64", "--knn-every", "0",
           "--no-tensorboard", "--threads", "1", "--warmup-epochs", "0.5", "--queue-size", "256"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    run(["train", *TINY, "--out", str(out)])
    return out


def weights(path, key="model"):
    return checkpoint.load(path)[key]


# -- losses ------------------------------------------------------------------------------------


def test_cosine_distill_is_zero_for_the_same_direction_and_two_for_the_opposite():
    t = torch.randn(5, 8)
    assert cosine_distill(3 * t, t).item() == pytest.approx(0, abs=1e-6)
    assert cosine_distill(-t, t).item() == pytest.approx(2, abs=1e-6)


def test_relational_distill_matches_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    s, t, q = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), F.normalize(torch.randn(7, 6, generator=g), dim=1)
    ts, tt = 0.2, 0.07
    ref = 0.0
    sn, tn = F.normalize(s, dim=1), F.normalize(t, dim=1)
    bank = torch.cat([q, tn])
    for i in range(4):  # KL(p_T || p_S) of row i, written out
        pt = torch.softmax(torch.stack([tn[i] @ b for b in bank]) / tt, 0)
        ps = torch.softmax(torch.stack([sn[i] @ b for b in bank]) / ts, 0)
        ref += float((pt * (pt.log() - ps.log())).sum())
    assert relational_distill(s, t, q, ts, tt).item() == pytest.approx(ref / 4, rel=1e-5)
    assert relational_distill(t, t, q, 0.1, 0.1).item() == pytest.approx(0, abs=1e-6)  # same similarities: 0


def test_queue_is_fifo_and_survives_state_dict():
    q = EmbeddingQueue(5, 2)
    for i in range(3):  # pushes of 2: the oldest rows are overwritten first
        q.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * (i + 1))
    assert q.count == 5 and q.ptr == 1
    q2 = EmbeddingQueue(5, 2)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.items(), q.items()) and q2.ptr == 1
    assert torch.allclose(q.items().norm(dim=1), torch.ones(5))


# -- the stage ---------------------------------------------------------------------------------


def test_distill_writes_a_linked_student_and_leaves_the_teacher_unchanged(teacher, tmp_path):
    tck = teacher / "train/checkpoints/last.pt"
    sha = checkpoint.sha256(tck)
    r = run(["distill", "--teacher", str(teacher), *STUDENT, "--knn-every", "1", "--embed-dim", "32"])
    assert "retention" in r.output
    d = teacher / "distill"  # default --out: the teacher's run folder
    m = json.loads((d / "manifest.json").read_text())
    assert m["stage"] == "distill" and m["completed"] and m["embedding_dim"] == 32 and m["adapter"]
    assert m["inputs"]["teacher"]["sha256"] == sha and m["inputs"]["teacher"]["path"] == str(tck.resolve())
    assert m["model_spec"]["name"] == "mobilenet_v3_small" and m["model_spec"]["head_layers"] == 0
    assert m["preprocess"] == checkpoint.load(tck)["preprocess"]  # the teacher's inputs, exactly
    met = m["metrics"]
    assert met["retention"] == pytest.approx(met["knn_top1"] / met["teacher_knn_top1"])
    assert 0 <= met["topk_overlap"] <= 1 and -1 <= met["cosine_agreement"] <= 1
    ck = checkpoint.load(d / "checkpoints/last.pt")
    assert ck["adapter"]["weight"].shape == (64, 32)  # student width 32 -> teacher width 64
    assert checkpoint.sha256(tck) == sha
    csv = (d / "metrics.csv").read_text()
    assert "loss_cosine" in csv and "loss_relational" in csv


def test_frozen_teacher_weights_and_bn_statistics_do_not_move(teacher, tmp_path):
    t, tck, _ = load_encoder(teacher, "cpu", role="teacher")
    before = {k: v.clone() for k, v in t.state_dict().items()}
    cfg = config.DistillConfig(teacher=str(teacher), model="mobilenet_v3_small", batch_size=32, threads=1)
    cfg.resolve(tck["config"], 8)
    ds = data.open_dataset("digits", "pretrain")
    pp = Preprocess.from_dict(tck["preprocess"])
    s, a = distill.build_student(cfg, 1, t.embed_dim)
    tr = distill.DistillTrainer(cfg, s, a, t, ds, pp, torch.device("cpu"), tmp_path, {"sha256": "x", "path": "x"})
    s0 = {k: v.clone() for k, v in s.state_dict().items()}
    for step, x, _, idx in data.iterate_batches(ds, 32, 0, 0):
        tr.step = step
        tr.optimise(tr.distill_loss(x, idx))
        if step == 3:
            break
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert any(not torch.equal(s0[k], v) for k, v in s.state_dict().items())  # the student did learn


def test_the_loss_falls(teacher, tmp_path):
    out = tmp_path / "d"  # 3 full batches per epoch (1,347 = 3 x 449): no small trailing batch in the log
    run(["distill", "--teacher", str(teacher), *STUDENT, "--epochs", "8", "--batch-size", "449", "--log-every", "3",
         "--out", str(out)])
    rows = [line.split(",") for line in (out / "distill/metrics.csv").read_text().splitlines()[1:]]
    for name in ("loss", "loss_cosine", "loss_relational"):
        v = [float(r[5]) for r in rows if r[4] == name]
        assert len(v) == 8 and np.mean(v[-2:]) < 0.9 * np.mean(v[:2]), (name, v)


def test_interrupted_then_resumed_equals_uninterrupted(teacher, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(["distill", "--teacher", str(teacher), *STUDENT, "--out", str(ref)])
    # a deadline that has passed after the first step: checkpoint after step 1 and stop
    run(["distill", "--teacher", str(teacher), *STUDENT, "--out", str(cut), "--max-minutes", "1e-6"])
    ck = checkpoint.load(cut / "distill/checkpoints/last.pt")
    assert ck["global_step"] == 1 and ck["queue"]["count"] == 64
    run(["distill", "--teacher", str(teacher), *STUDENT, "--out", str(cut), "--resume"])
    for key in ("model", "adapter"):
        a, b = weights(ref / "distill/checkpoints/last.pt", key), weights(cut / "distill/checkpoints/last.pt", key)
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k
    qa, qb = weights(ref / "distill/checkpoints/last.pt", "queue"), weights(cut / "distill/checkpoints/last.pt", "queue")
    assert torch.allclose(qa["buf"], qb["buf"], atol=1e-6)


def test_cache_teacher_targets_are_the_teachers_clean_view_embeddings(teacher, tmp_path):
    out = tmp_path / "c"
    run(["distill", "--teacher", str(teacher), *STUDENT, "--epochs", "1", "--cache-teacher", "--out", str(out)])
    cached = np.load(out / "distill/teacher_cache.npy")
    t, tck, _ = load_encoder(teacher, "cpu", role="teacher")
    ds = data.open_dataset("digits", "pretrain")
    from edgeclr.heldout import eval_inputs

    x, _ = eval_inputs(ds, Preprocess.from_dict(tck["preprocess"]), [0, 5, 99])
    with torch.no_grad():
        assert np.allclose(cached[[0, 5, 99]], t.embed(x).numpy(), atol=1e-5)
    mtime = (out / "distill/teacher_cache.npy").stat().st_mtime_ns
    run(["distill", "--teacher", str(teacher), *STUDENT, "--epochs", "2", "--cache-teacher", "--out", str(out), "--resume"])
    assert (out / "distill/teacher_cache.npy").stat().st_mtime_ns == mtime  # reused, not recomputed


def test_wrong_teachers_are_clear_errors(teacher, tmp_path):
    stu = tmp_path / "s"
    run(["distill", "--teacher", str(teacher), *STUDENT, "--epochs", "1", "--out", str(stu)])
    r = run(["distill", "--teacher", str(stu / "distill"), *STUDENT, "--out", str(tmp_path / "x")], ok=False)
    assert r.exit_code == 2 and "is a distill checkpoint" in r.output and "edgeclr train" in r.output
    cut = tmp_path / "cut.pt"
    cut.write_bytes((teacher / "train/checkpoints/last.pt").read_bytes()[:5000])
    r = run(["distill", "--teacher", str(cut), *STUDENT, "--out", str(tmp_path / "y")], ok=False)
    assert r.exit_code == 2 and "truncated" in r.output
    r = run(["distill", "--teacher", str(teacher), *STUDENT, "--input-size", "16", "--out", str(tmp_path / "z")], ok=False)
    assert r.exit_code == 2 and "differs from the teacher's input size 8" in r.output
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 12, 3), np.uint8)).save(rgb / f"{i}.png")
    r = run(["distill", "--teacher", str(teacher), *STUDENT, "--data", str(rgb), "--out", str(tmp_path / "w")], ok=False)
    assert r.exit_code == 2 and "3-channel images" in r.output and "1-channel" in r.output
    r = run(["distill", *STUDENT, "--out", str(tmp_path / "v")], ok=False)
    assert r.exit_code == 2 and "--teacher is required" in r.output


def test_a_resnet_student_takes_width_and_last_stride_and_a_mobilenet_refuses_them(teacher):
    _, tck, _ = load_encoder(teacher, "cpu", role="teacher")
    cfg = config.DistillConfig(teacher=str(teacher), model="resnet18", width=8, last_stride=1).resolve(tck["config"], 8)
    s, _ = distill.build_student(cfg, 1, 64)
    assert (s.spec.width, s.spec.last_stride, s.spec.stem_stride, s.spec.head_layers) == (8, 1, 1, 0)
    assert s.backbone.layer1[0].conv1.out_channels == 8 and s(torch.zeros(2, 1, 8, 8)).shape == (2, 64)
    for model, stem in (("resnet18", 4), ("mobilenet_v3_small", 2)):  # above 64 px: the architecture's own stem
        assert config.DistillConfig(teacher=str(teacher), model=model).resolve(tck["config"], 224).stem_stride == stem
    with pytest.raises(config.ConfigError, match="shape a ResNet student"):
        config.DistillConfig(teacher=str(teacher), model="mobilenet_v3_small", width=8).resolve(tck["config"], 8)
    # a teacher whose data preset shapes a ResNet (Fashion-MNIST: width 16, last stride 1) still takes a MobileNet student
    fm = {k: v for k, v in tck["config"].items() if k not in ("width", "last_stride")} | {"data": "fashion-mnist"}
    cfg = config.DistillConfig(teacher=str(teacher), model="mobilenet_v3_small", stem_stride=1).resolve(fm, 28)
    assert (cfg.width, cfg.last_stride, cfg.stem_stride) == (None, None, 1)


def test_bn_recalibration_sets_the_clean_image_statistics_and_is_recorded(teacher, tmp_path):
    from edgeclr.heldout import eval_inputs
    from edgeclr.runtime import Preprocess

    out = tmp_path / "run"
    run(["distill", "--teacher", str(teacher), *STUDENT, "--out", str(out), "--bn-recalibrate", "300"])
    ck = checkpoint.load(out / "distill/checkpoints/last.pt")
    student, _, _ = load_encoder(out / "distill", "cpu")
    pp = Preprocess.from_dict(ck["preprocess"])
    ds = data.open_dataset("digits", "pretrain")
    idx = np.sort(np.random.default_rng(0).choice(len(ds), 300, replace=False))
    x, _ = eval_inputs(ds, pp, idx)
    # the first BatchNorm's running mean is exactly the mean of its input over the 300 clean images
    conv, bn = next((m, n) for m, n in zip(student.modules(), list(student.modules())[1:])
                    if isinstance(m, torch.nn.Conv2d) and isinstance(n, torch.nn.BatchNorm2d))
    with torch.no_grad():
        want = conv(x).mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, want, atol=1e-4)
    # off: the running averages of the augmented views stay, and they differ
    run(["distill", "--teacher", str(teacher), *STUDENT, "--out", str(tmp_path / "off"), "--bn-recalibrate", "0"])
    off = checkpoint.load(tmp_path / "off/distill/checkpoints/last.pt")["model"]
    key = next(k for k in off if k.endswith("running_mean"))
    assert not torch.allclose(off[key], ck["model"][key], atol=1e-3)


def test_a_time_budget_stop_still_recalibrates_and_reports_the_final_weights(teacher, tmp_path):
    """--max-minutes ends a run early: the student that is kept gets its BatchNorm statistics and
    its kNN figure from the final weights, not from the last epoch's monitor (a bug once)."""
    out = tmp_path / "run"
    args = [a if a != "0" else "1" for a in STUDENT]  # --knn-every 1: a monitor at every epoch end
    run(["distill", "--teacher", str(teacher), *args, "--epochs", "3", "--out", str(out), "--bn-recalibrate", "300",
         "--max-minutes", "1e-6"])
    m = json.loads((out / "distill/manifest.json").read_text())
    assert not m["completed"] and m["global_step"] == 1
    assert ",knn_top1," not in (out / "distill/metrics.csv").read_text()  # no epoch ended: no monitor ran in training
    assert 0 < m["metrics"]["knn_top1"] <= 100 and m["metrics"]["retention"] > 0  # measured on the final weights
    ck = checkpoint.load(out / "distill/checkpoints/last.pt")["model"]
    key = next(k for k in ck if k.endswith("num_batches_tracked"))
    assert int(ck[key]) == -(-300 // 256)  # the recalibration's 2 batches of <= 256, not the one training step


def test_the_monitor_scores_a_student_with_clean_image_statistics_and_leaves_its_own_alone(teacher, tmp_path):
    """Mid-distillation, a MobileNet's running BatchNorm statistics are those of augmented views; the
    kNN monitor scored them (MobileNetV3-Large on 16-px digits: 3.3% at epoch 10, 91.3% once
    re-estimated). It now scores a copy re-estimated on clean images, as the final student is."""
    import copy

    from edgeclr.heldout import HeldOut, recalibrate_bn_on

    out = tmp_path / "run"
    run(["distill", "--teacher", str(teacher), *STUDENT, "--out", str(out), "--bn-recalibrate", "0"])
    student, ck, _ = load_encoder(out / "distill", "cpu")
    pp = Preprocess.from_dict(ck["preprocess"])
    bank, query = data.open_dataset("digits", "train"), data.open_dataset("digits", "test")
    plain = HeldOut.from_datasets(bank, query, pp, 0, 1000, 200, k=20, t=0.07)
    recal = HeldOut.from_datasets(bank, query, pp, 0, 1000, 200, k=20, t=0.07, bn_recalibrate=True)
    with torch.no_grad():  # statistics far from any real image's
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(50.0)
                m.running_var.fill_(1e-4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    broken, scored = plain(student, "cpu"), recal(student, "cpu")
    ref = copy.deepcopy(student)
    recalibrate_bn_on(ref, recal.bank_x, "cpu")
    assert scored == plain(ref, "cpu")  # the copy re-estimated on the bank's clean images
    assert broken < 25 and scored > broken + 15  # 10 classes: the broken statistics score near chance
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the model's own are untouched
    assert recal(student, "cpu", recalibrate=False) == broken
