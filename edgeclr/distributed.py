"""Scale-out on PyTorch's own distributed engine: torchrun / torch.distributed.

    torchrun --nproc_per_node=N -m edgeclr train ...        # one machine, N processes
    edgeclr train --devices N ...                           # the same, torchrun started for you
    torchrun --nnodes=M --nproc_per_node=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m edgeclr train ...

What each piece does:
- `init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process
  group: NCCL on CUDA, gloo on CPU. Without torchrun it returns a single-process `Dist`.
- `gather_with_grad(x)`: an autograd all-gather. Forward: every rank's (B, P) rows concatenated
  in rank order. Backward: the incoming gradient is summed over ranks (all-reduce) and this
  rank's slice returned, so the gradient that other ranks' losses send to this rank's embeddings
  is kept. A gather without gradient (re-inserting only the local rows) drops that part and
  trains a different model (tests/test_distributed.py shows it fails the reference).
- `sync_flags(...)`: one small all-reduce per step that makes every rank agree on stopping
  (a signal on any rank, the time budget, a non-finite loss on any rank).

The global batch is `batch_size` (split evenly over ranks), so the learning rate scales with the
global batch (`lr_scaling`: linear or sqrt) whatever the number of processes.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from edgeclr.errors import EdgeclrError

log = logging.getLogger("edgeclr.distributed")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: str = "auto") -> Dist:
    """Join the process group torchrun set up (idempotent); a single-process Dist otherwise.

    The backend follows the device: NCCL for CUDA, gloo for CPU.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local_rank, local_world, dist.get_backend())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss contributes to these rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...) in rank order, differentiable w.r.t. this rank's rows.

    Every rank must pass the same B (the sharding in data.shard_batches guarantees it).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_mean(x: float, d: Dist, device: torch.device) -> float:
    """The mean of a number over ranks (the logged loss is the global batch's)."""
    if not d.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / d.world


def sync_flags(d: Dist, device: torch.device, *flags: float) -> list[float]:
    """Element-wise max of small numbers over ranks: one collective per training step."""
    if not d.enabled:
        return list(flags)
    t = torch.tensor(flags, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# `edgeclr train --devices N`: start the same command under torchrun on this machine


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


class WorkersFailed(EdgeclrError, RuntimeError):
    """The processes a launch started ended with a non-zero exit code (they printed why)."""

    def __init__(self, returncode: int):
        super().__init__(f"the training processes exited with code {returncode}")
        self.returncode = returncode


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node nproc -m edgeclr ARGV`.

    Returns the exit code: torchrun's, or 128 + the signal when this launcher was interrupted or
    terminated (the signal is passed on to torchrun, which passes it to every rank; each rank
    checkpoints and exits with 128 + signal).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "edgeclr", *argv]
    log.info("starting %d processes: %s", nproc, shlex.join(cmd))
    env = dict(os.environ)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    proc = subprocess.Popen(cmd, env=env)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 + got[0] if got else rc
