"""The torch-free runtime on the aarch64 instruction set (a Raspberry Pi's), under qemu user-mode
emulation: same embeddings and same error behaviour as on x86 (scripts/aarch64_check.py).

Skipped, with the reason, when qemu-aarch64-static is missing or the environment cannot be built
(no network, not root); with CI=true and qemu present, a build failure fails the test instead.
A qemu crash or a wrong result fails it. The environment is cached in ~/.cache/edgeclr-aarch64
($EDGECLR_AARCH64_CACHE); a first build downloads about 85 MB (arm64 .debs ~38 MB, wheels ~45 MB)
and took 30 s here; the whole test took 65 s with a cold cache and 38 s with a warm one (2 shared cores).
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_check():
    spec = importlib.util.spec_from_file_location("aarch64_check", REPO / "scripts" / "aarch64_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


check = _load_check()
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("aarch64_models")


def test_runtime_on_aarch64_matches_x86(model_dir, tmp_path):
    if not shutil.which("qemu-aarch64-static"):
        pytest.skip("qemu-aarch64-static is not installed (Debian: apt-get install qemu-user-static debootstrap); "
                    "the aarch64 check needs user-mode emulation")
    try:
        env = check.build_env(check.DEFAULT_CACHE)
    except check.EnvError as e:
        if IN_CI:
            pytest.fail(f"CI=true and qemu is installed, but the aarch64 environment could not be built: {e}")
        pytest.skip(f"the aarch64 environment cannot be built here: {e}")

    r = check.run_check(env, model_dir=model_dir, work=tmp_path, results_dir=None)

    assert r["env_aarch64"]["machine"] == "aarch64"
    assert r["environment"]["onnxruntime"] == check.ORT_VERSION
    assert not r["env_aarch64"]["torch_imported"] and not r["env_x86"]["torch_imported"]
    fp32 = r["models"]["fp32"]
    assert fp32["images"] == 20 and fp32["cos_min"] >= check.FP32_FLOOR, fp32
    for name in ("int8_arm", "int8_x86"):
        assert r["models"][name]["cos_min"] >= check.INT8_FLOOR, (name, r["models"][name])
    for name, m in r["models"].items():  # `edgeclr embed` (the command) = Embedder.embed, on both sides
        assert m["cli_cos_min_x86"] >= m["floor"] and m["cli_cos_min_aarch64"] >= m["floor"], (name, m)
    cases = {e["case"]: e for e in r["errors"]}
    assert len(cases) == len(r["errors"]) >= 10
    assert all(e["same"] for e in r["errors"]), [e for e in r["errors"] if not e["same"]]
    assert cases["load_image truncated.jpg"]["type_aarch64"] == "ImageError"
    assert cases["Embedder.load no_metadata.onnx"]["type_aarch64"] == "ModelError"
    assert cases["Embedder.load wrong_metadata.onnx"]["type_aarch64"] == "ModelError"
    assert r["passed"], r["failures"]
