"""Prove edgeclr's torch-free runtime on the aarch64 instruction set (a Raspberry Pi's), without a board.

qemu user-mode emulation (`qemu-aarch64-static`) runs an arm64 Debian Python with the same aarch64
wheels `pip install edgeclr[runtime]` puts on a Raspberry Pi OS 64-bit (numpy, pillow, onnxruntime and
their dependencies, click and pyyaml for the `edgeclr` command). It runs `scripts/aarch64_embed.py`
there and natively (x86, this Python), on the same image files and the same models (FP32 and INT8
ONNX files exported from a tiny real training run), and compares:

  - FP32 embeddings: cosine >= 0.9999 for every image, aarch64 vs x86;
  - INT8 embeddings: cosine >= 0.99 for every image, aarch64 INT8 vs x86 INT8 (`edgeclr compress`
    has no per-image floor: its --max-drop budget is in kNN accuracy points);
  - `edgeclr embed` (the command) gives the same embeddings as `Embedder.embed`, on both sides;
  - bad images and bad models (corrupt / truncated / empty images; missing, wrong or no metadata;
    not an ONNX file) fail with the same exception types and messages on both sides.

    python scripts/aarch64_check.py                      # build the environment once (cache), train, compare
    python scripts/aarch64_check.py --model-dir DIR      # reuse (or keep) the models and images in DIR
    python scripts/aarch64_check.py --cache DIR --out benchmarks/results/aarch64_check

The environment is built once into --cache (default ~/.cache/edgeclr-aarch64, or
$EDGECLR_AARCH64_CACHE): Debian's qemu-user-static and debootstrap (apt-get, as root), an arm64
Debian root with only Python and the libraries it needs (debootstrap --download-only, then dpkg-deb -x
of the dependency closure), and the unpacked aarch64 wheels, one folder per set of versions. Emulation
says nothing about speed: nothing here times anything.

Python API (tests/test_aarch64.py): build_env(), prepare_models(), run_check().
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "scripts" / "aarch64_embed.py"
DEFAULT_CACHE = Path(os.environ.get("EDGECLR_AARCH64_CACHE") or "~/.cache/edgeclr-aarch64").expanduser()
RESULTS = REPO / "benchmarks" / "results" / "aarch64_check"  # its records: latest.{json,md} (benchmarks/README.md)

RELEASE = "bookworm"  # Raspberry Pi OS (64-bit) Bookworm is Debian 12: glibc 2.36, Python 3.11
MIRROR = "http://deb.debian.org/debian"
GUEST_PYTHON = "3.11"
GUEST_GLIBC = 36  # manylinux_2_X wheels with X <= 36 run on bookworm
# onnxruntime on the emulated side: the version pip installs on a Pi today (and this project's x86
# venv runs). Under qemu 7.2 user mode every aarch64 onnxruntime release from 1.28.0 on crashed at
# import (SIGSEGV, si_addr=NULL; 1.32.0 under every -cpu model tried), right after its cpuinfo library
# had read /proc/cpuinfo: qemu 7.2 passes the *host's* x86 /proc/cpuinfo to the guest, which lists no
# ARM processor. 1.27.0 was the newest that imported as is. With an ARM /proc/cpuinfo inside the arm64
# root (qemu -L serves ROOT/proc/cpuinfo for /proc/cpuinfo), as a Pi's kernel would show it, 1.28.0
# and 1.32.0 (the two tried) import and run; see ORT_CHOICE below.
ORT_VERSION = "1.32.0"
# the CPU model qemu emulates: the Raspberry Pi 5's Cortex-A76 (ARMv8.2, dot-product, no SVE/SME).
# qemu's default, "max", also advertises SVE and SME, which no Pi has.
QEMU_CPU = "cortex-a76"
# /proc/cpuinfo lines per CPU model (MIDR fields and the kernel's Features line), as the Pi's kernel writes them
CPUINFO = {
    "cortex-a76": ("0x4", "0xd0b", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),
    "cortex-a72": ("0x0", "0xd08", "3", "fp asimd evtstrm crc32 cpuid"),  # Raspberry Pi 4 (no dot-product)
    "cortex-a53": ("0x0", "0xd03", "4", "fp asimd evtstrm crc32 cpuid"),  # Raspberry Pi 3 / Zero 2 W
}
# Debian packages whose dependency closure is extracted: the interpreter, its standard library, and the
# C++ runtime the wheels' shared objects link against.
GUEST_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1", "base-files")
# dependencies of those packages that the runtime does not load (maintainer scripts, shells, time zones)
SKIP_PACKAGES = {"debconf", "perl-base", "dpkg", "tzdata", "media-types", "init-system-helpers", "readline-common",
                 "debianutils", "usr-is-merged", "mawk", "tar", "coreutils", "bash", "dash", "sed", "grep"}
FP32_FLOOR, INT8_FLOOR = 0.9999, 0.99


class EnvError(RuntimeError):
    """The aarch64 environment cannot be built here (no qemu, not root, no network, ...)."""


def log(msg: str) -> None:
    print(f"[aarch64] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list, what: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EnvError(f"{what} failed: {e}") from e
    if r.returncode != 0:
        raise EnvError(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-1500:]}")
    return r


@contextlib.contextmanager
def _locked(cache: Path):
    """One builder per cache folder at a time (two test sessions may start together)."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# the environment: host tools, arm64 Debian root, aarch64 wheels


def _which(exe: str) -> str | None:
    """shutil.which, also in /usr/sbin and /sbin (debootstrap's home, often off a user's PATH)."""
    return shutil.which(exe) or shutil.which(exe, path="/usr/sbin:/sbin")


def ensure_tools(install: bool = True) -> dict:
    """qemu-aarch64-static, debootstrap and dpkg-deb; installed from Debian's packages when root."""
    need = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap", "dpkg-deb": "dpkg"}
    missing = sorted({pkg for exe, pkg in need.items() if not _which(exe)})
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {', '.join(missing)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True, text=True, env=env)
        if r.returncode != 0:  # a fresh container has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
            subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True, text=True, env=env)
        missing = sorted({pkg for exe, pkg in need.items() if not _which(exe)})
    if missing:
        how = "apt-get install -y " + " ".join(missing)
        raise EnvError(f"the aarch64 check needs {', '.join(missing)}: run `{how}` as root"
                       + ("" if os.geteuid() == 0 else " (this process is not root, so it cannot install them)"))
    qemu = _which("qemu-aarch64-static")
    first = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()
    return {"qemu": qemu, "qemu_version": first[0] if first else "?"}


def _deb_fields(deb: Path) -> dict:
    out = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Depends", "Pre-Depends"],
                         capture_output=True, text=True, check=True).stdout
    fields, key = {}, None
    for line in out.splitlines():
        if line[:1].isspace() and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, v = line.partition(":")
            fields[key] = v.strip()
    return fields


def _closure(debs: dict[str, Path], roots: tuple[str, ...]) -> dict[str, str]:
    """{package: version} reached from roots through Depends/Pre-Depends (first alternative present)."""
    seen, todo = {}, list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in SKIP_PACKAGES:
            continue
        if name not in debs:
            raise EnvError(f"debootstrap did not download {name}, which the arm64 Python needs")
        f = _deb_fields(debs[name])
        seen[name] = f.get("Version", "?")
        for dep in ", ".join(v for v in (f.get("Depends"), f.get("Pre-Depends")) if v).split(","):
            alts = [re.sub(r"[\s(:].*", "", a.strip()) for a in dep.split("|") if a.strip()]
            pick = next((a for a in alts if a in debs or a in SKIP_PACKAGES), None)
            if pick:
                todo.append(pick)
    return dict(sorted(seen.items()))


def build_sysroot(cache: Path, release: str = RELEASE, mirror: str = MIRROR) -> Path:
    """An arm64 Debian root holding only Python 3.11 and what it loads: CACHE/debian-RELEASE-arm64."""
    root = cache / f"debian-{release}-arm64"
    if (root / ".complete.json").is_file():
        return root
    part = cache / f".debian-{release}-arm64.partial"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    if os.geteuid() != 0:
        raise EnvError("debootstrap runs as root only: run this script (or the test) as root once, "
                       f"or build {root} as root and point --cache / EDGECLR_AARCH64_CACHE at it")
    log(f"debootstrap --arch=arm64 --download-only {release} (the .debs only)")
    _run([_which("debootstrap"), "--arch=arm64", "--download-only", "--variant=minbase",
          "--include=" + ",".join(GUEST_PACKAGES), release, part / "debootstrap", mirror], "debootstrap (needs network)")
    archives = part / "debootstrap" / "var" / "cache" / "apt" / "archives"
    debs = {p.name.split("_")[0]: p for p in archives.glob("*.deb")}
    versions = _closure(debs, GUEST_PACKAGES)
    sysroot = part / "root"
    for n in versions:
        _run(["dpkg-deb", "-x", debs[n], sysroot], f"dpkg-deb -x {debs[n].name}")
    if not (sysroot / "usr" / "bin" / f"python{GUEST_PYTHON}").is_file():
        raise EnvError(f"the extracted arm64 root has no usr/bin/python{GUEST_PYTHON}")
    shutil.rmtree(part / "debootstrap")
    info = {"release": release, "debian_version": (sysroot / "etc" / "debian_version").read_text().strip(),
            "mirror": mirror, "packages": versions}
    (sysroot / ".complete.json").write_text(json.dumps(info, indent=1))
    sysroot.rename(root)
    shutil.rmtree(part, ignore_errors=True)
    return root


def host_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_pins(onnxruntime: str = ORT_VERSION) -> dict[str, str]:
    """What goes on the device: onnxruntime at the version that runs under qemu; numpy, pillow,
    click and pyyaml at this Python's versions, so both sides run the same library code."""
    pins = {"onnxruntime": onnxruntime}
    for d in ("numpy", "pillow", "click", "pyyaml"):
        pins[d] = host_version(d) or ""
    return pins


def build_site(cache: Path, pins: dict[str, str]) -> Path:
    """The aarch64 wheels of edgeclr[runtime] (pip's own resolution, for cp311 on glibc 2.36),
    unpacked into CACHE/site-py311-ortVERSION-HASH."""
    key = hashlib.sha1(json.dumps(sorted(pins.items())).encode()).hexdigest()[:10]
    site = cache / f"site-py{GUEST_PYTHON.replace('.', '')}-ort{pins.get('onnxruntime') or 'latest'}-{key}"
    if (site / ".complete.json").is_file():
        return site
    part = cache / f".{site.name}.partial"
    shutil.rmtree(part, ignore_errors=True)
    wheels = part / "wheels"
    wheels.mkdir(parents=True)
    plats = [f"--platform=manylinux_2_{i}_aarch64" for i in range(GUEST_GLIBC, 16, -1)] + ["--platform=manylinux2014_aarch64"]
    reqs = [f"{k}=={v}" if v else k for k, v in pins.items()]
    log(f"pip download (aarch64, cp{GUEST_PYTHON.replace('.', '')}): {' '.join(reqs)}")
    _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:", *plats,
          f"--python-version={GUEST_PYTHON}", "--implementation=cp", "-d", wheels, *reqs], "pip download of the aarch64 wheels (needs network)")
    dest = part / "site"
    names = {}
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
        name, ver = whl.name.split("-")[:2]
        names[name.lower().replace("_", "-")] = {"version": ver, "wheel": whl.name}
    info = {"pins": pins, "wheels": names}
    (dest / ".complete.json").write_text(json.dumps(info, indent=1))
    dest.rename(site)
    shutil.rmtree(part, ignore_errors=True)
    return site


@dataclasses.dataclass
class Env:
    """A built aarch64 environment: run `python` of the arm64 root under qemu with the wheels."""

    sysroot: Path
    site: Path
    qemu: str
    qemu_version: str
    qemu_cpu: str = QEMU_CPU

    @property
    def info(self) -> dict:
        root = json.loads((self.sysroot / ".complete.json").read_text())
        wheels = json.loads((self.site / ".complete.json").read_text())["wheels"]
        return {"debian": f"{root['release']} ({root['debian_version']})", "debian_python_package": root["packages"].get("python3.11-minimal"),
                "libc6": root["packages"].get("libc6"), "qemu": self.qemu_version, "qemu_cpu": self.qemu_cpu or "default (max)",
                "guest_proc_cpuinfo": "ARM, " + (self.qemu_cpu if self.qemu_cpu in CPUINFO else "cortex-a76") + " MIDR (written by this script)",
                "wheels": {k: v["wheel"] for k, v in wheels.items()}}

    def command(self, args: list) -> list[str]:
        cpu = ["-cpu", self.qemu_cpu] if self.qemu_cpu else []
        return [self.qemu, "-L", str(self.sysroot), *cpu, str(self.sysroot / "usr" / "bin" / f"python{GUEST_PYTHON}"), "-s",
                *map(str, args)]

    def write_cpuinfo(self) -> None:
        """An ARM /proc/cpuinfo for the guest (qemu 7.2 user mode would show it the host's x86 one,
        on which onnxruntime >= 1.28 crashes at import): one entry per host CPU, the MIDR of the
        emulated model (Cortex-A76 for "max" and unknown models)."""
        var, part, rev, feats = CPUINFO.get(self.qemu_cpu, CPUINFO["cortex-a76"])
        entry = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: " + feats + "\nCPU implementer\t: 0x41\n"
                 f"CPU architecture: 8\nCPU variant\t: {var}\nCPU part\t: {part}\nCPU revision\t: {rev}\n\n")
        text = "".join(entry.format(i=i) for i in range(os.cpu_count() or 1))
        f = self.sysroot / "proc" / "cpuinfo"
        if not f.is_file() or f.read_text() != text:
            f.parent.mkdir(exist_ok=True)
            tmp = f.with_name(f".cpuinfo.{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(f)

    def run(self, args: list, pythonpath: list[Path] = (), timeout: float = 600) -> subprocess.CompletedProcess:
        self.write_cpuinfo()
        env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONFAULTHANDLER": "1",
               "PYTHONPATH": os.pathsep.join(str(p) for p in [*pythonpath, self.site])}
        return subprocess.run(self.command(args), capture_output=True, text=True, env=env, timeout=timeout)


def build_env(cache: Path = DEFAULT_CACHE, onnxruntime: str = ORT_VERSION, pins: dict | None = None, qemu_cpu: str = QEMU_CPU,
              install: bool = True) -> Env:
    """Build (once; re-used when present) and smoke-test the aarch64 environment.

    Raises:
        EnvError: it cannot be built here (tools missing and not root, no network).
        RuntimeError: it was built, but its Python cannot import numpy, PIL and onnxruntime.
    """
    cache = Path(cache).expanduser()
    tools = ensure_tools(install)
    pins = pins or default_pins(onnxruntime)
    t0 = time.time()
    with _locked(cache):
        sysroot = build_sysroot(cache)
        site = build_site(cache, pins)
    env = Env(sysroot, site, tools["qemu"], tools["qemu_version"], qemu_cpu)
    r = env.run(["-c", "import platform, numpy, PIL.Image, onnxruntime; print(platform.machine())"], timeout=300)
    if r.returncode != 0 or r.stdout.strip() != "aarch64":  # built, but broken: a failure, not a reason to skip
        raise RuntimeError(f"the emulated Python cannot import numpy, PIL and onnxruntime (exit {r.returncode}): "
                       f"{(r.stderr or r.stdout).strip()[-1500:]}")
    log(f"aarch64 environment ready in {time.time() - t0:.0f} s: {sysroot.name}, {site.name}")
    return env


# ----------------------------------------------------------------------------------------------
# models and images: a tiny real training run, its FP32 export, INT8 as `edgeclr compress` makes it


def write_images(folder: Path, n: int = 20) -> list[Path]:
    """n real digits (scikit-learn), scaled up, as PNG and JPEG, grayscale and RGB, several sizes."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        a = (d.images[500 + i] * 255 / 16).astype(np.uint8)
        img = Image.fromarray(a, "L").resize([(64, 64), (48, 80), (160, 160), (96, 72)][i % 4], Image.BILINEAR)
        if i % 3 == 0:
            img = img.convert("RGB")
        p = folder / f"digit{i:02d}_{d.target[500 + i]}.{'png' if i % 2 else 'jpg'}"
        img.save(p, quality=90) if p.suffix == ".jpg" else img.save(p)
        out.append(p)
    return out


def write_bad_images(folder: Path, good_jpeg: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = good_jpeg.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "not_an_image.png").write_text("this is text, not a PNG\n")
    (folder / "empty.jpg").write_bytes(b"")
    return sorted(folder.iterdir())


def write_bad_models(folder: Path, fp32: Path) -> list[Path]:
    """no edgeclr metadata; metadata of another input size; not an ONNX file; a missing file."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(fp32))
    props = {p.key: p.value for p in m.metadata_props}
    del m.metadata_props[:]
    onnx.save(m, str(folder / "no_metadata.onnx"))
    props.update(input_size="32", resize_size="32")
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(folder / "wrong_metadata.onnx"))
    (folder / "not_onnx.onnx").write_bytes(b"\x08\x07garbage, not a protobuf\xff\xfe" * 8)
    return [folder / n for n in ("no_metadata.onnx", "wrong_metadata.onnx", "not_onnx.onnx")] + [folder / "missing.onnx"]


def quantize_int8(fp32: Path, run: Path, out: Path, target: str, calib_images: int = 64, seed: int = 0) -> dict:
    """INT8 exactly as `edgeclr compress` makes its ONNX file: calibration_inputs (real digits through
    the runtime's preprocessing) -> float_scope (first conv, embedding layer, SE stay float) -> quantize_onnx."""
    from edgeclr.compress.quantize import calibration_inputs, float_scope, quantize_onnx
    from edgeclr.export import load_model
    from edgeclr.models import EmbeddingModel
    from edgeclr.runtime import Preprocess

    encoder, ckpt, _ = load_model(run)
    pp = Preprocess.from_dict(ckpt["preprocess"])
    calib = calibration_inputs("digits", pp, calib_images, seed, ckpt.get("config") or {})
    scope = float_scope(fp32, EmbeddingModel(encoder, True))
    info = quantize_onnx(fp32, out, calib, target, sorted({n for v in scope.values() for n in v}))
    return {**info, "target": target, "float_scope": scope}


def prepare_models(model_dir: Path) -> dict:
    """Train (2 epochs, width 8, 16 px digits), export FP32 ONNX, quantise INT8 (arm and x86 flavours),
    write images, bad images and bad models into model_dir; re-used when model_dir/models.json exists."""
    model_dir = Path(model_dir)
    done = model_dir / "models.json"
    if done.is_file():
        spec = json.loads(done.read_text())
        if all(Path(p).exists() for p in spec["models"].values()):
            return spec
    model_dir.mkdir(parents=True, exist_ok=True)
    run = model_dir / "run"
    t0 = time.time()
    if not (run / "train" / "checkpoints" / "last.pt").is_file():
        shutil.rmtree(run, ignore_errors=True)
        log("training a tiny model (digits, 2 epochs, width 8, 16 px)")
        _run([sys.executable, "-m", "edgeclr", "train", "--data", "digits", "--width", "8", "--stem-stride", "1", "--input-size", "16",
              "--batch-size", "64", "--epochs", "2", "--knn-every", "0", "--no-tensorboard", "--threads", "1", "--out", run], "edgeclr train",
             cwd=REPO)  # 1 thread: 9 s beside other jobs on 2 cores, where 2 threads took 140 s
    fp32 = run / "export" / "model.onnx"
    if not fp32.is_file():
        _run([sys.executable, "-m", "edgeclr", "export", run, "--format", "onnx"], "edgeclr export", cwd=REPO)
    qdir = model_dir / "int8"
    qdir.mkdir(exist_ok=True)
    quant = {}
    for target in ("arm", "x86"):
        q = qdir / f"int8-{target}.onnx"
        quant[target] = quantize_int8(fp32, run, q, target)
    images = write_images(model_dir / "images")
    spec = {"run": str(run), "models": {"fp32": str(fp32), "int8_arm": str(qdir / "int8-arm.onnx"), "int8_x86": str(qdir / "int8-x86.onnx")},
            "images": str(model_dir / "images"), "n_images": len(images),
            "bad_images": [str(p) for p in write_bad_images(model_dir / "bad_images", next(p for p in images if p.suffix == ".jpg"))],
            "bad_models": [str(p) for p in write_bad_models(model_dir / "bad_models", fp32)],
            "quantization": {k: {kk: vv for kk, vv in v.items() if kk != "float_scope"} | {"float_nodes": sum(map(len, v["float_scope"].values()))}
                             for k, v in quant.items()},
            "train": "edgeclr train --data digits --width 8 --stem-stride 1 --input-size 16 --batch-size 64 --epochs 2 --knn-every 0 --threads 1"}
    done.write_text(json.dumps(spec, indent=1))
    log(f"models and images ready in {time.time() - t0:.0f} s: {model_dir}")
    return spec


# ----------------------------------------------------------------------------------------------
# run both sides, compare


def driver_args(spec: dict, out: Path) -> list[str]:
    args = [str(DRIVER), "--images", spec["images"], "--out", str(out)]
    for name, path in spec["models"].items():
        args += ["--model", f"{name}={path}"]
    for p in spec["bad_images"]:
        args += ["--bad-image", p]
    for p in spec["bad_models"]:
        args += ["--bad-model", p]
    return args


def stage_package(dest: Path) -> Path:
    """A copy of this checkout's edgeclr package (its .py files) for the emulated PYTHONPATH."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(REPO / "edgeclr", dest / "edgeclr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _cos(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def compare(x86: Path, arm: Path, spec: dict) -> dict:
    """Agreement of the two sides' outputs; `failures` lists every check that did not hold."""
    import numpy as np

    failures = []
    ids_x, ids_a = (x86 / "ids.txt").read_text(), (arm / "ids.txt").read_text()
    if ids_x != ids_a:
        failures.append("the two sides embedded different file lists")
    models = {}
    for name in spec["models"]:
        floor = FP32_FLOOR if name.startswith("fp32") else INT8_FLOOR
        ex, ea = np.load(x86 / f"{name}.npy"), np.load(arm / f"{name}.npy")
        if ex.shape != ea.shape:
            failures.append(f"{name}: shapes differ, x86 {ex.shape} vs aarch64 {ea.shape}")
            continue
        c = _cos(ex, ea)
        r = {"images": len(c), "dim": int(ex.shape[1]), "floor": floor, "cos_min": float(c.min()), "cos_median": float(np.median(c)),
             "max_abs_diff": float(np.abs(ex - ea).max())}
        if not name.startswith("fp32"):
            r["cos_min_vs_fp32_x86"] = float(_cos(ex, np.load(x86 / "fp32.npy")).min())
            r["cos_min_vs_fp32_aarch64"] = float(_cos(ea, np.load(arm / "fp32.npy")).min())
        for side, d in (("x86", x86), ("aarch64", arm)):
            cli = d / f"{name}.cli.npy"
            if not cli.is_file():
                failures.append(f"{name}: `edgeclr embed` wrote nothing on {side}")
                continue
            cli_ids = (d / f"{name}.cli.ids.txt").read_text()
            if cli_ids != ids_x:
                failures.append(f"{name}: `edgeclr embed` on {side} embedded other files than Embedder.embed")
            else:
                r[f"cli_cos_min_{side}"] = float(_cos(np.load(cli), np.load(d / f"{name}.npy")).min())
                if r[f"cli_cos_min_{side}"] < floor:
                    failures.append(f"{name}: `edgeclr embed` and Embedder.embed disagree on {side} (cosine {r[f'cli_cos_min_{side}']:.6f})")
        if r["cos_min"] < floor:
            failures.append(f"{name}: min cosine aarch64 vs x86 {r['cos_min']:.6f} < {floor}")
        models[name] = r

    def norm(s: str) -> str:
        return s.replace(str(x86), "<out>").replace(str(arm), "<out>")

    ex, ea = json.loads((x86 / "errors.json").read_text()), json.loads((arm / "errors.json").read_text())
    errors = []
    for i in range(max(len(ex), len(ea))):
        a = ex[i] if i < len(ex) else {"case": "?", "type": "(none)", "message": ""}
        b = ea[i] if i < len(ea) else {"case": "?", "type": "(none)", "message": ""}
        same = a["case"] == b["case"] and a["type"] == b["type"] and norm(a["message"]) == norm(b["message"])
        errors.append({"case": a["case"], "type_x86": a["type"], "type_aarch64": b["type"], "same": same,
                       **({} if same else {"message_x86": a["message"], "message_aarch64": b["message"]}), "message": a["message"]})
        if not same:
            failures.append(f"error behaviour differs: {a['case']}: x86 {a['type']}: {a['message'][:200]} | "
                            f"aarch64 {b['type']}: {b['message'][:200]}")
        if a["type"] is None:
            failures.append(f"{a['case']}: raised nothing")
    envx, enva = json.loads((x86 / "env.json").read_text()), json.loads((arm / "env.json").read_text())
    if enva["machine"] != "aarch64":
        failures.append(f"the emulated side reports machine {enva['machine']!r}, not aarch64")
    for side, e in (("x86", envx), ("aarch64", enva)):
        if e["torch_imported"]:
            failures.append(f"the runtime imported torch on {side}")
    return {"passed": not failures, "failures": failures, "models": models, "errors": errors, "env_x86": envx, "env_aarch64": enva}


def run_check(env: Env | None = None, model_dir: Path | None = None, work: Path | None = None, results_dir: Path | None = RESULTS,
              cache: Path = DEFAULT_CACHE, other_cpus: tuple[str, ...] = ()) -> dict:
    """The whole check; writes results_dir/latest.{json,md} unless results_dir is None.
    other_cpus: more qemu CPU models to run the emulated side on, each compared with the first."""
    import tempfile

    env = env or build_env(cache)
    work = Path(work or tempfile.mkdtemp(prefix="edgeclr-aarch64-"))
    spec = prepare_models(Path(model_dir) if model_dir else work / "models")
    x86, arm = work / "out-x86", work / "out-aarch64"
    for d in (x86, arm):
        shutil.rmtree(d, ignore_errors=True)
    stage = stage_package(work / "stage")
    log("running the driver natively (x86)")
    r = subprocess.run([sys.executable, *driver_args(spec, x86)], capture_output=True, text=True, cwd=REPO, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"the driver failed natively (exit {r.returncode}): {r.stderr[-3000:]}")
    log("running the driver under qemu-aarch64")
    r = env.run(driver_args(spec, arm), pythonpath=[stage], timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"the driver failed under qemu-aarch64 (exit {r.returncode}): {r.stderr[-3000:]}")
    result = compare(x86, arm, spec)
    result["other_cpu_models"] = {}
    for cpu in other_cpus:
        import numpy as np

        log(f"running the driver under qemu-aarch64 -cpu {cpu}")
        other = work / f"out-aarch64-{cpu}"
        shutil.rmtree(other, ignore_errors=True)
        r = dataclasses.replace(env, qemu_cpu=cpu).run(driver_args(spec, other), pythonpath=[stage], timeout=900)
        if r.returncode != 0:
            result["failures"].append(f"-cpu {cpu}: the driver failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
            continue
        same = {n: bool(np.array_equal(np.load(arm / f"{n}.npy"), np.load(other / f"{n}.npy"))) for n in spec["models"]}
        errs_same = json.loads((arm / "errors.json").read_text()) == json.loads((other / "errors.json").read_text())
        result["other_cpu_models"][cpu] = {"bitwise_identical_to_" + env.qemu_cpu: same, "errors_identical": errs_same,
                                           "cpu_features": json.loads((other / "env.json").read_text())["cpu_features"]}
    env.write_cpuinfo()  # leave the root's /proc/cpuinfo at this env's model
    result["passed"] = not result["failures"]
    for er in result["errors"]:  # paths of this run's model folder are not part of the result
        for k in ("message", "message_x86", "message_aarch64"):
            if k in er:
                er[k] = er[k].replace(str(Path(spec["images"]).parent), "<models>")
    e = result["env_aarch64"]
    result["environment"] = {**env.info, "machine": e["machine"], "python": e["python"], "libc": e["libc"], "numpy": e["numpy"],
                             "pillow": e["pillow"], "onnxruntime": e["onnxruntime"], "cpu_features": e["cpu_features"]}
    result["x86"] = {k: result["env_x86"][k] for k in ("machine", "python", "numpy", "pillow", "onnxruntime")}
    result["inputs"] = {"images": spec["n_images"], "bad_images": [Path(p).name for p in spec["bad_images"]],
                        "bad_models": [Path(p).name for p in spec["bad_models"]], "train": spec["train"],
                        "quantization": spec["quantization"]}
    if results_dir is not None:
        write_results(result, Path(results_dir))
    return result


def format_md(r: dict) -> str:
    e, x = r["environment"], r["x86"]
    lines = ["# edgeclr runtime on aarch64 (qemu user-mode emulation) vs x86", "",
             f"Result: **{'PASS' if r['passed'] else 'FAIL'}**. Written by `python scripts/aarch64_check.py`; "
             "`tests/test_aarch64.py` runs the same check. Emulation proves numbers and behaviour on the aarch64 "
             "instruction set with the device's wheels, not speed: no timings are reported.", "",
             "## Environments", "", "| | aarch64 (emulated) | x86 (native) |", "|---|---|---|",
             f"| machine | {e['machine']} | {x['machine']} |", f"| OS | Debian {e['debian']}, {e['libc']} | the host |",
             f"| Python | {e['python']} (Debian {e['debian_python_package']}) | {x['python']} |",
             f"| numpy | {e['numpy']} | {x['numpy']} |", f"| pillow | {e['pillow']} | {x['pillow']} |",
             f"| onnxruntime | {e['onnxruntime']} | {x['onnxruntime']} |",
             f"| emulator | {e['qemu']}, CPU model {e['qemu_cpu']} | - |", "",
             f"CPU features the emulated CPU reports (AT_HWCAP/AT_HWCAP2): {', '.join(e['cpu_features'] or [])}.", "",
             f"Wheels: {', '.join(e['wheels'].values())}.", "",
             "## Embeddings", "",
             f"{r['inputs']['images']} real digits images (PNG and JPEG, grayscale and RGB, 48 to 160 px), a ResNet teacher "
             f"from `{r['inputs']['train']}`, exported FP32 ONNX and quantised to INT8 by `edgeclr compress`'s own functions "
             "(static QDQ, per-channel, 64 calibration images; `int8_arm`: s8 activations, `int8_x86`: u8).", "",
             "| model | images | min cosine aarch64 vs x86 | median | max abs diff | floor | `edgeclr embed` = Embedder (min cos, x86 / aarch64) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        lines.append(f"| {name} | {m['images']} | {m['cos_min']:.7f} | {m['cos_median']:.7f} | {m['max_abs_diff']:.2e} | {m['floor']} | "
                     f"{m.get('cli_cos_min_x86', float('nan')):.7f} / {m.get('cli_cos_min_aarch64', float('nan')):.7f} |")
    lines += ["", "FP32 floor: 0.9999 per image. INT8: `edgeclr compress` states no per-image floor (its `--max-drop` is a kNN "
              "accuracy budget), so INT8 uses cosine >= 0.99 per image between aarch64 INT8 and x86 INT8 of the same file.", "",
              "## Error behaviour (same exception type and message on both sides)", "",
              "| case | x86 | aarch64 | same | message |", "|---|---|---|---|---|"]
    for er in r["errors"]:
        msg = er["message"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {er['case']} | {er['type_x86']} | {er['type_aarch64']} | {'yes' if er['same'] else 'NO'} | {msg[:220]} |")
    if r.get("other_cpu_models"):
        lines += ["", f"## Other qemu CPU models (compared with -cpu {e['qemu_cpu']})", "",
                  "| -cpu | embeddings bitwise identical | error cases identical | CPU features reported |", "|---|---|---|---|"]
        for cpu, o in r["other_cpu_models"].items():
            same = next(v for k, v in o.items() if k.startswith("bitwise"))
            lines.append(f"| {cpu} | {', '.join(f'{n}: {v}' for n, v in same.items())} | {o['errors_identical']} | "
                         f"{', '.join(o['cpu_features'] or [])} |")
    if r["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in r["failures"]]
    if r.get("onnxruntime_choice"):
        lines += ["", "## Which onnxruntime runs under this qemu", "", r["onnxruntime_choice"]]
    return "\n".join(lines) + "\n"


ORT_CHOICE = """\
onnxruntime 1.32.0 runs here: the newest release, the one pip installs on a Pi today, and the x86 side's version.
Bisection over the released aarch64 cp311 wheels under Debian bookworm's qemu-aarch64-static 7.2.22, with the
/proc/cpuinfo qemu passes through (the host's, x86: `vendor_id: AuthenticAMD`): 1.20.1, 1.21.1, 1.22.1,
1.23.2, 1.24.4, 1.25.1, 1.26.0 and 1.27.0 import (1.20.1 and 1.27.0 also ran this check's FP32 and INT8
models and passed it); 1.28.0, 1.29.0, 1.30.0, 1.31.0, 1.31.1 and 1.32.0 die at import with
`qemu: uncaught target signal 11 (Segmentation fault)`; 1.32.0 crashed the same under `-cpu` max (qemu's
default: the same HWCAPs), cortex-a76, cortex-a72, neoverse-n1 and a64fx: not an instruction qemu 7.2 lacks
(that would be SIGILL, and would depend on the CPU model).
`qemu -strace`: the fault (si_addr=NULL) comes right after onnxruntime's cpuinfo library read
/proc/cpuinfo and, new in 1.28.0, /sys/devices/system/cpu/cpu*/cache/index2/{level,size,shared_cpu_list};
gdb on qemu's gdb stub: a store to address 0 (`str d31, [x24, x2]` with x24 = x2 = 0) in a static
initialiser of onnxruntime_pybind11_state.so, run by the dynamic loader while Python imports it. qemu 7.2
user mode shows an aarch64 program the host's x86 /proc/cpuinfo, which lists no ARM processor; a Pi's kernel
lists its Cortex cores. With an ARM /proc/cpuinfo in the arm64 root (qemu -L serves ROOT/proc/cpuinfo for
/proc/cpuinfo), 1.28.0 and 1.32.0 import and pass this check: the script writes one, with the MIDR of the
emulated CPU model (Cortex-A76, the Pi 5's, by default). Without it, 1.27.0 is the newest release that runs.
"""


def write_results(r: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    r = {**r, "onnxruntime_choice": ORT_CHOICE}
    (folder / "latest.json").write_text(json.dumps(r, indent=1) + "\n")
    (folder / "latest.md").write_text(format_md(r))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the aarch64 environment is built once [%(default)s]")
    ap.add_argument("--model-dir", type=Path, help="models and images: re-used when DIR/models.json exists, else made there")
    ap.add_argument("--work", type=Path, help="folder for the two sides' outputs [a new temporary folder]")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of the record latest.{json,md} [%(default)s]")
    ap.add_argument("--onnxruntime", default=ORT_VERSION, help="aarch64 onnxruntime version [%(default)s]")
    ap.add_argument("--qemu-cpu", default=QEMU_CPU, help="qemu CPU model (-cpu): cortex-a76 (Pi 5), cortex-a72 (Pi 4), max, ... [%(default)s]")
    ap.add_argument("--other-cpus", default="cortex-a72,max",
                    help="comma list of further qemu CPU models to run the aarch64 side on and compare (empty: none) [%(default)s]")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install qemu-user-static / debootstrap")
    a = ap.parse_args(argv)
    try:
        env = build_env(a.cache, a.onnxruntime, qemu_cpu=a.qemu_cpu, install=not a.no_install)
    except EnvError as e:
        print(f"aarch64 check: cannot build the environment: {e}", file=sys.stderr)
        return 2
    r = run_check(env, a.model_dir, a.work, a.out, other_cpus=tuple(c for c in a.other_cpus.split(",") if c))
    for name, m in r["models"].items():
        print(f"{name}: {m['images']} images, cosine aarch64 vs x86 min {m['cos_min']:.7f} median {m['cos_median']:.7f} (floor {m['floor']})")
    print(f"error cases: {sum(e['same'] for e in r['errors'])}/{len(r['errors'])} identical")
    print("PASS" if r["passed"] else "FAIL:\n  " + "\n  ".join(r["failures"]))
    if a.out:
        print(f"wrote {a.out / 'latest.md'}")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
