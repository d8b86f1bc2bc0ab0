"""Fault injection for the reliability tests: the code paths a fault would take, driven by one
environment variable so that a test can hit them in a real process (tests/faults/).

    EDGECLR_FAULT="nan_loss:step=3"            the training loss becomes NaN at global step 3
    EDGECLR_FAULT="nan_loss:step=3:rank=1"     ... on rank 1 of a torchrun run only
    EDGECLR_FAULT="inf_loss:step=3"            the loss becomes +Inf there
    EDGECLR_FAULT="nan_batch:step=3"           one image of the batch becomes NaN there (inf_batch: +Inf)
    EDGECLR_FAULT="kill:stage=distill:step=5"  SIGKILL this process after global step 5 of `distill`
    EDGECLR_FAULT="term:stage=train:step=5"    SIGTERM (likewise `int`: SIGINT) to itself there
    EDGECLR_FAULT="segv:stage=compress:step=2" SIGSEGV there (likewise `abort`: SIGABRT), a native library's crash
    EDGECLR_FAULT="kill:stage=ray_embed:step=1" SIGKILL the Ray worker that has just written shard 1

Unset (always, outside tests), every check is one dict lookup that returns False.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGECLR_FAULT"


def _parse(text: str) -> tuple[str, dict[str, str]]:
    kind, *fields = text.split(":")
    return kind, dict(f.split("=", 1) for f in fields if "=" in f)


def armed(kind: str, **where) -> bool:
    """True when EDGECLR_FAULT names `kind` and every condition it gives matches `where`."""
    text = os.environ.get(ENV)
    if not text:
        return False
    k, cond = _parse(text)
    return k == kind and all(str(where.get(key)) == value for key, value in cond.items())


SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT, "segv": signal.SIGSEGV,
           "abort": signal.SIGABRT}


def maybe_kill(stage: str, step: int, rank: int = 0) -> None:
    """Signal this process here when EDGECLR_FAULT says so: `kill` = SIGKILL (no handler, no
    cleanup: a power cut), `term` = SIGTERM (a preemption), `int` = SIGINT (Ctrl-C), `segv` / `abort` =
    SIGSEGV / SIGABRT (what a native kernel's memory error does)."""
    for kind, sig in SIGNALS.items():
        if armed(kind, stage=stage, step=step, rank=rank):
            os.kill(os.getpid(), sig)


def poison_batch(x, stage: str, step: int, rank: int = 0):
    """The float model input (augmented views) with its first image set to NaN (nan_batch) or +Inf
    (inf_batch) when armed."""
    for kind, value in (("nan_batch", float("nan")), ("inf_batch", float("inf"))):
        if armed(kind, stage=stage, step=step, rank=rank):
            x = x.clone()
            x[0] = value
    return x


def poison_loss(loss, stage: str, step: int, rank: int = 0):
    """The loss times NaN (nan_loss) or +Inf (inf_loss) when armed."""
    for kind, value in (("nan_loss", float("nan")), ("inf_loss", float("inf"))):
        if armed(kind, stage=stage, step=step, rank=rank):
            loss = loss * value
    return loss
