"""Benchmarks: `edgeclr bench` = latency, throughput, memory, size and efficiency, per format.

    discover(MODEL...) -> configurations (model x format x threads x batch)
      -> one worker process each (python -m edgeclr.bench --worker SPEC): load, warm up, wait
      -> rounds: each worker in turn times a chunk of runs (A B C A B C ...), so a noisy machine
         slows every configuration alike and ratios survive
      -> percentiles, images/s, peak memory, MACs, roofline efficiency against this machine's own
         matrix-multiply peak (measured in the same run), ratio to a baseline configuration
      -> bench.json, bench.md, bench.png

A worker imports only what its format needs: an ONNX or OpenVINO model is timed with numpy and its
runtime (the `edgeclr[runtime]` install, no torch); `torch` configurations (eager FP32 of a
checkpoint) need torch. OpenVINO's INFERENCE_PRECISION_HINT is pinned (f32 unless
--precision bf16) and the precision the compiled model reports is the one recorded; the thread
count recorded is the one the runtime reports (torch.get_num_threads, OpenVINO's
INFERENCE_NUM_THREADS, onnxruntime's intra-op setting) next to the threads the worker process
actually had running during the timed runs (/proc/self/task).

Latency is the wall time of the Python call, what a caller of `edgeclr.runtime` pays. For an
OpenVINO model the row also has the runtime's own p50 (each request's `latency`, read after the
clock stops: what OpenVINO's `benchmark_app` reports) and the difference, the per-call Python
overhead, which matters below ~1 ms.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgeclr.errors import BenchError
from edgeclr.formats import format_of
from edgeclr.lock import hold
from edgeclr.report import bench_table
from edgeclr.rundir import exported_files, make_writable_dir, write_manifest
from edgeclr.stages import MODEL_STAGES

log = logging.getLogger("edgeclr.bench")

FORMATS = ("torch", "onnx", "onnx-int8", "openvino", "openvino-int8")
# what a board runs: threads, batch sizes, formats (on ARM, INT8 means onnxruntime: OpenVINO's ARM
# plugin executes INT8 models in fp16; docs/compression.md)
PROFILES: dict[str, dict] = {
    "pi4": {"threads": (1, 4), "batch": (1,), "formats": ("onnx", "onnx-int8"), "int8_flavour": "arm (S8S8)"},
    "pi5": {"threads": (1, 4), "batch": (1,), "formats": ("onnx", "onnx-int8"), "int8_flavour": "arm (S8S8)"},
    "x86": {"threads": (1, 2), "batch": (1, 8, 32), "formats": FORMATS, "int8_flavour": "x86 (U8S8)"},
}


@dataclasses.dataclass(frozen=True)
class Config:
    label: str  # the user's name for the model (file or run)
    path: str
    format: str  # one of FORMATS
    threads: int
    batch: int
    input_size: int | None = None  # torch only: another input size than the checkpoint's
    precision: str = "f32"  # OpenVINO inference precision hint

    @property
    def key(self) -> str:
        return f"{self.label}:{self.format}:t{self.threads}:b{self.batch}"


# ----------------------------------------------------------------------------------------------
# discovery


def classify(path: Path) -> str | None:
    """The format of one exported file (by suffix and its own precision metadata), or None."""
    if path.suffix not in (".onnx", ".xml"):
        return None
    from edgeclr.runtime import read_sidecar

    prec = None
    try:
        if path.suffix == ".onnx":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            meta = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
            prec = meta.get("precision")
        else:
            import openvino  # noqa: F401  (a clear error when it is missing)

            from edgeclr.runtime import openvino_core

            m = openvino_core().read_model(str(path))
            if m.has_rt_info(["model_info", "precision"]):
                prec = m.get_rt_info(["model_info", "precision"]).astype(str)
    except ImportError as e:
        raise BenchError(f"{path}: {format_of(path).runtime} is not installed: {format_of(path).install}") from e
    except Exception as e:  # a file the runtime cannot read
        raise BenchError(f"{path} is not a model the runtime can read ({type(e).__name__}: {str(e)[:200]}); "
                         "pass files written by `edgeclr export` / `edgeclr compress`") from e
    prec = prec or read_sidecar(path).get("precision")
    int8 = prec is not None and "int8" in prec
    return ("onnx" if path.suffix == ".onnx" else "openvino") + ("-int8" if int8 else "")


TORCHVISION = "torchvision:"  # a reference model: an unmodified torchvision classifier in torch eager


def _torchvision_model(name: str):
    import torchvision

    fn = getattr(torchvision.models, name, None)
    if not callable(fn) or name.startswith("_") or name[0].isupper():
        raise BenchError(f"{TORCHVISION}{name}: torchvision has no model {name!r}; e.g. {TORCHVISION}resnet18, "
                         f"{TORCHVISION}mobilenet_v3_large")
    return fn(weights=None).eval()  # random weights: latency does not depend on them, and nothing is downloaded


def discover(models: list[str], formats: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(label, path, format) for every model argument: exported files, checkpoints, run folders,
    and `torchvision:NAME` reference models (an unmodified torchvision network, torch eager).

    A run folder contributes its checkpoint (torch) and every exported file under it
    (export/, compress/models/). Raises BenchError for a path that is none of these.
    """
    wanted = {s for s, prefix in ((".onnx", "onnx"), (".xml", "openvino")) if any(f.startswith(prefix) for f in formats)}
    found = []
    for m in models:
        if m.startswith(TORCHVISION):
            if "torch" not in formats:
                raise BenchError(f"{m} runs in torch eager: add torch to --formats")
            found.append((m, m, "torch"))
            continue
        p = Path(m)
        if not p.exists():
            raise BenchError(f"{p} does not exist: pass exported models (.onnx, .xml), checkpoints or run folders")
        if p.is_file() and p.suffix in (".onnx", ".xml"):
            found.append((p.stem if len(models) > 1 else p.name, str(p), classify(p)))
        elif p.is_file() and p.suffix == ".pt":
            found.append((p.parent.parent.name, str(p), "torch"))
        elif p.is_file():
            raise BenchError(f"{p}: {p.suffix or 'no suffix'} is not a model file edgeclr benchmarks "
                             "(.onnx for onnxruntime, .xml for OpenVINO, .pt edgeclr checkpoints for torch)")
        else:
            files = exported_files(p, tuple(wanted))
            for f in files:
                found.append((f"{p.name}/{f.relative_to(p).with_suffix('')}", str(f), classify(f)))
            if "torch" in formats and _has("torch"):  # the runtime install has no torch: files only
                for stage in MODEL_STAGES:
                    c = p / stage / "checkpoints" / "last.pt"
                    if c.is_file():
                        found.append((f"{p.name}/{stage}", str(c), "torch"))
            if not files and not any(f[2] == "torch" and f[1].startswith(str(p)) for f in found):
                raise BenchError(f"{p}: no exported model (.onnx, .xml) or checkpoint under it")
    return [f for f in found if f[2] in formats]


# ----------------------------------------------------------------------------------------------
# the worker: one configuration in its own process


def _vm(key: str) -> float:
    """VmHWM / VmRSS of this process in MB (Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _threads_running() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _load(cfg: Config):
    """(run(x) callable, input shape, facts) for one configuration."""
    facts: dict = {}
    if cfg.format == "torch":
        import torch

        from edgeclr.models import count_macs

        torch.set_num_threads(cfg.threads)
        if cfg.path.startswith(TORCHVISION):  # the whole network, classifier included
            net = model = _torchvision_model(cfg.path[len(TORCHVISION):])
            shape = (cfg.batch, 3, cfg.input_size or 224, cfg.input_size or 224)
        else:
            from edgeclr.loading import load_encoder
            from edgeclr.models import EmbeddingModel

            net, ck, _ = load_encoder(cfg.path, "cpu")
            model = EmbeddingModel(net, True).eval()
            size = cfg.input_size or ck["preprocess"]["input_size"]
            shape = (cfg.batch, net.spec.in_chans, size, size)
        weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())  # not the optimiser state
        facts.update(threads_setting=torch.get_num_threads(), precision_ran="fp32", params=sum(p.numel() for p in net.parameters()),
                     macs=count_macs(net, shape[1:]), size_bytes=weights, runtime=f"torch {torch.__version__}")

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x))

        return run, shape, facts
    from edgeclr.runtime import open_model

    emb = open_model(cfg.path, threads=cfg.threads, precision=cfg.precision)  # any task's file (embedder, classifier, segmenter)
    pp = emb.meta.preprocess
    shape = (cfg.batch, pp.channels, pp.input_size, pp.input_size)
    facts.update(size_bytes=format_of(cfg.path).size_bytes(cfg.path), macs=getattr(emb.meta, "macs", None),
                 params=getattr(emb.meta, "params", None), precision_file=emb.meta.precision)
    b = emb.backend
    if hasattr(b, "compiled"):
        import openvino as ov

        facts.update(precision_ran=precision_ran(b, "int8" in cfg.format),
                     threads_setting=int(b.compiled.get_property("INFERENCE_NUM_THREADS")), runtime=f"openvino {ov.__version__}",
                     performance_hint=str(b.compiled.get_property("PERFORMANCE_HINT")).split(".")[-1],
                     streams=int(b.compiled.get_property("NUM_STREAMS")))
    else:
        import onnxruntime as ort

        so = b.session.get_session_options()
        facts.update(precision_ran=precision_ran(b, "int8" in cfg.format), threads_setting=so.intra_op_num_threads,
                     runtime=f"onnxruntime {ort.__version__}")
    if b.batch not in (None, cfg.batch):
        raise BenchError(f"{cfg.path} has a fixed batch of {b.batch}: benchmark it with --batch {b.batch}, or export it "
                         "with a dynamic batch")
    return b, shape, facts


def precision_ran(backend, int8_file: bool) -> str:
    """What a runtime backend runs in: an OpenVINO model's 8-bit layers (read from its runtime
    graph) besides its inference precision; onnxruntime: "int8 (QDQ)" for an INT8 file, else fp32."""
    if hasattr(backend, "compiled"):
        low, total = _ov_int8_layers(backend.compiled)
        return f"int8 ({low}/{total} layers), else {backend.precision}" if low else backend.precision
    return "int8 (QDQ)" if int8_file else "fp32"


def _ov_int8_layers(compiled) -> tuple[int, int]:
    """(layers that run in 8 bits, weighted layers) of a compiled OpenVINO model, read from the
    runtime graph the CPU plugin executes (its 'runtimePrecision' of each convolution and matmul):
    an INT8 IR's hint still reads f32, the precision of whatever stayed float."""
    kinds = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")
    infos = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
    prec = [rt["runtimePrecision"].astype(str) for rt in infos
            if "layerType" in rt and "runtimePrecision" in rt and rt["layerType"].astype(str) in kinds]
    return sum(p in ("u8", "i8") for p in prec), len(prec)


def worker(spec: str) -> None:
    """Protocol on stdin/stdout, one JSON line each: -> ready{facts}; 'run N' -> {times}; 'stats' -> {...}."""
    cfg = Config(**json.loads(spec))
    rss_before = _vm("VmRSS")
    try:
        run, shape, facts = _load(cfg)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(3):
            run(x)
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    facts.update(rss_before_load_mb=rss_before)
    own_latency = hasattr(run, "last_latency_ms")  # OpenVINO: its request's own latency, beside the call's wall time
    print(json.dumps({"ready": facts}), flush=True)
    threads_seen = 0
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "warmup":
            t_end = time.perf_counter() + float(cmd[1])
            while time.perf_counter() < t_end:
                run(x)
            print(json.dumps({"ok": True}), flush=True)
        elif cmd[0] == "run":
            ts, own = [], []
            for _ in range(int(cmd[1])):
                t = time.perf_counter()
                run(x)
                ts.append(time.perf_counter() - t)
                if own_latency:  # read after the clock stopped: it costs the timed call nothing
                    own.append(run.last_latency_ms / 1000)
            # once per chunk, not per call: nothing but the clock runs between timed calls, as in
            # benchmark_app's loop (listing /proc/self/task after each call changed a 0.5-ms model's
            # next inference by a median 0.98-1.43x over two runs: results/bench_between_calls/latest.md); the runtime's
            # threads live as long as its compiled model, so the count is the same
            threads_seen = max(threads_seen, _threads_running())
            print(json.dumps({"times": ts, "runtime_times": own}), flush=True)
        elif cmd[0] == "stats":
            print(json.dumps({"peak_rss_mb": _vm("VmHWM"), "threads_in_process": threads_seen}), flush=True)


def matmul_peak(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """This machine's FP32 GEMM rate at `threads` (MAC/s), numpy in a fresh process (BLAS threads set)."""
    code = ("import numpy as np, time\n"
            f"a = np.random.rand({n}, {n}).astype(np.float32); b = np.random.rand({n}, {n}).astype(np.float32)\n"
            "a @ b\nts = []\nt_end = time.perf_counter() + %f\n"
            "while time.perf_counter() < t_end:\n    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)\n"
            f"print({n}**3 / sorted(ts)[len(ts) // 2])\n") % seconds
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


# ----------------------------------------------------------------------------------------------
# the parent


class _Worker:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeclr.bench", "--worker", json.dumps(dataclasses.asdict(cfg))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads)})
        self.times: list[float] = []
        self.round_p50: list[float] = []  # the median of each round's runs: rounds pair up across configurations
        self.runtime_times: list[float] = []

    def ready(self) -> None:
        """Wait for the worker's model to be loaded and warm (its facts)."""
        cfg = self.cfg
        msg = self._read()
        if "error" in msg:
            raise BenchError(f"{cfg.path} ({cfg.format}, {cfg.threads} thread(s), batch {cfg.batch}): {msg['error']}")
        self.facts = msg["ready"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-1500:]
            raise BenchError(f"the benchmark worker for {self.cfg.path} died: {err}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:  # a worker slow to exit (a starved machine) must not cost the timings already taken
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("the benchmark worker for %s did not exit in 30 s after quit: killed", self.cfg.path)
            self.proc.kill()
            self.proc.wait()


def run_bench(configs: list[Config], rounds: int, runs: int, warmup_s: float) -> list[dict]:
    """Time every configuration, interleaved; one process per configuration (loaded side by side, timed one at a time)."""
    workers = []
    try:
        at_once = max(1, os.cpu_count() or 1)  # loading overlaps (no timing runs then); a loaded worker idles on stdin
        for i in range(0, len(configs), at_once):
            group = []
            for c in configs[i:i + at_once]:
                group.append(_Worker(c))
                workers.append(group[-1])
            for w in group:
                w.ready()
        for w in workers:
            w.ask(f"warmup {warmup_s}")
        for _ in range(rounds):
            for w in workers:
                got = w.ask(f"run {runs}")
                w.times += got["times"]
                w.round_p50.append(float(np.median(got["times"])) * 1000)
                w.runtime_times += got["runtime_times"]
        rows = []
        for w in workers:
            stats = w.ask("stats")
            t = np.asarray(w.times) * 1000
            c = w.cfg
            row = {**dataclasses.asdict(c), **w.facts, **stats, "runs": len(t), "p50_ms": float(np.percentile(t, 50)),
                   "p90_ms": float(np.percentile(t, 90)), "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()),
                   "round_p50_ms": w.round_p50}
            if w.runtime_times:  # OpenVINO's own request latency, as benchmark_app reports it; p50_ms is the Python call
                row["runtime_p50_ms"] = float(np.percentile(np.asarray(w.runtime_times) * 1000, 50))
                row["call_overhead_ms"] = row["p50_ms"] - row["runtime_p50_ms"]
            row["images_per_s"] = c.batch / (row["p50_ms"] / 1000)
            row["model_rss_mb"] = row["peak_rss_mb"] - row["rss_before_load_mb"]
            rows.append(row)
        return rows
    finally:
        for w in workers:
            w.close()


def ratio_interval(slow: list[float], fast: list[float], level: float = 0.95, draws: int = 2000) -> tuple[float, float, float]:
    """(ratio, low, high): the median over rounds of slow/fast latency, each round's pair timed in the
    same interleaved round (run_bench's round_p50_ms), and a bootstrap interval of that median
    (rounds resampled with replacement, a fixed seed: the same timings give the same interval)."""
    r = np.asarray(slow, dtype=float) / np.asarray(fast, dtype=float)
    boot = np.median(np.random.default_rng(0).choice(r, size=(draws, len(r)), replace=True), axis=1)
    return float(np.median(r)), float(np.quantile(boot, (1 - level) / 2)), float(np.quantile(boot, (1 + level) / 2))


def latencies(models: dict[str, str | Path], threads: int = 1, batch: int = 1, runs: int = 30, rounds: int = 5,
              warmup_s: float = 0.2) -> dict[str, float]:
    """{label: p50 ms} of every model (an exported file, or a checkpoint in torch eager) at `threads`
    and `batch`, timed together, interleaved, each in its own worker process (run_bench): the one
    latency source of compress's, eval's and deploy's tables, so that the ratios in one table come
    from one measurement (benchmarks/ use it too). About `runs` timed calls per model, in `rounds` turns."""
    configs = [Config(label, str(p), "torch" if Path(p).suffix == ".pt" else classify(Path(p)), threads, batch)
               for label, p in models.items()]
    rounds = max(1, min(rounds, runs))
    return {r["label"]: r["p50_ms"] for r in run_bench(configs, rounds, -(-runs // rounds), warmup_s)}


def plan(cfg) -> tuple[list[Config], tuple[int, ...]]:
    """(configurations to run, thread counts): every model found x thread count x batch size; refuses
    unknown formats and models before anything runs."""
    prof = PROFILES.get(cfg.profile) if cfg.profile else None
    threads = tuple(int(t) for t in cfg.threads.split(",")) if cfg.threads else (prof["threads"] if prof else (1,))
    batches = tuple(int(b) for b in cfg.batch.split(",")) if cfg.batch else (prof["batch"] if prof else (1,))
    formats = tuple(cfg.formats.split(",")) if cfg.formats else (prof["formats"] if prof else FORMATS)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise BenchError(f"unknown format(s) {bad}; valid: {', '.join(FORMATS)}")
    found = discover(list(cfg.models), formats)
    if not found:
        raise BenchError(f"none of {list(cfg.models)} has a model in formats {', '.join(formats)}")
    if "torch" in {f[2] for f in found} and not _has("torch"):
        raise BenchError("torch configurations need torch (pip install 'edgeclr[train]'); or pass --formats without torch")
    configs = [Config(label, path, fmt, t, b, cfg.input_size if fmt == "torch" else None, cfg.precision)
               for label, path, fmt in found for t in threads for b in batches]
    return configs, threads


def main(cfg) -> dict:
    """`edgeclr bench`: write OUT/bench.{json,md,png} and return the rows."""
    t0 = time.time()
    configs, threads = plan(cfg)
    out = Path(cfg.out)
    with hold(out, "the bench folder", is_dir=True):  # one writer per folder, from before the first run
        make_writable_dir(out)
        return _bench(cfg, configs, threads, out, t0)


def _bench(cfg, configs: list[Config], threads: tuple[int, ...], out: Path, t0: float) -> dict:
    from edgeclr import __version__

    log.info("%d configuration(s): %s", len(configs), ", ".join(c.key for c in configs))
    peaks = {t: matmul_peak(t) for t in sorted(set(threads))}
    rows = run_bench(configs, cfg.rounds, cfg.runs, cfg.warmup)
    for r in rows:
        r["peak_macs_per_s"] = peaks[r["threads"]]
        if r.get("macs"):
            r["gmacs_per_s"] = r["macs"] * r["images_per_s"] / 1e9
            r["efficiency"] = r["macs"] * r["images_per_s"] / peaks[r["threads"]]
    base = _baseline(rows, cfg.baseline)
    for r in rows:
        b = next((x for x in rows if x["label"] == base["label"] and x["format"] == base["format"]
                  and x["threads"] == r["threads"] and x["batch"] == r["batch"]), None) if base else None
        if b is not None:
            r["speedup_vs_baseline"] = b["p50_ms"] / r["p50_ms"]
    result = {"edgeclr_version": __version__, "machine": machine(), "profile": cfg.profile,
              "baseline": base and base["label"] + ":" + base["format"],
              "rounds": cfg.rounds, "runs_per_round": cfg.runs, "warmup_s": cfg.warmup, "matmul_peak_macs_per_s": peaks,
              "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    write_manifest(out, "bench", inputs={"models": sorted({c.path for c in configs})}, spec=None, preprocess=None, embed_dim=None,
                   metrics={f"{r['label']}:{r['format']}:t{r['threads']}:b{r['batch']}": {"p50_ms": r["p50_ms"],
                            **({"speedup_vs_baseline": r["speedup_vs_baseline"]} if r.get("speedup_vs_baseline") else {})}
                            for r in rows},
                   wall_time_s=time.time() - t0, artifacts={"json": str(out / "bench.json"), "md": str(out / "bench.md")})
    (out / "bench.md").write_text(bench_table(result) + "\n")
    result["chart"] = _chart(rows, out / "bench.png")
    result["table"] = bench_table(result)
    result["out"] = str(out)
    return result


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _baseline(rows: list[dict], spec: str | None) -> dict | None:
    """The baseline configuration: 'LABEL[:FORMAT]', or by default the teacher in torch eager, else the first row."""
    if spec:
        label, _, fmt = spec.partition(":")
        hit = [r for r in rows if r["label"] == label and (not fmt or r["format"] == fmt)]
        if not hit:
            raise BenchError(f"--baseline {spec}: no such configuration; labels: {sorted({r['label'] for r in rows})}")
        return hit[0]
    torch_train = [r for r in rows if r["format"] == "torch" and r["label"].endswith("/train")]
    return (torch_train or rows)[0]


def machine() -> dict:
    import platform

    cpu = "unknown"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version()}



def _chart(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no chart (bench.json and bench.md are written)")
        return None
    b1 = [r for r in rows if r["batch"] == min(x["batch"] for x in rows)]
    names = sorted({f"{r['label']}\n{r['format']}" for r in b1})
    threads = sorted({r["threads"] for r in b1})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    w = 0.8 / len(threads)
    for j, t in enumerate(threads):
        vals = [next((r["p50_ms"] for r in b1 if f"{r['label']}\n{r['format']}" == n and r["threads"] == t), 0) for n in names]
        ax.bar(np.arange(len(names)) + j * w, vals, w, label=f"{t} thread(s)")
    ax.set_xticks(np.arange(len(names)) + w * (len(threads) - 1) / 2, names, fontsize=7)
    ax.set_ylabel(f"p50 latency, ms (batch {b1[0]['batch']})")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    worker(sys.argv[2])
