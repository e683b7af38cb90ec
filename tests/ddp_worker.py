"""Run ``train.train_transformer.main`` under torchrun and save every rank's final weights.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.ddp_worker OUT_DIR <train_transformer flags>

The training code runs unchanged; the only addition is a DistributedDataParallel subclass that
remembers the module it wraps, so that after ``main`` returns each rank can write
``OUT_DIR/rank{r}.pt`` with its own copy of the weights (rank 0's checkpoint alone would not
show that the ranks agree). Used by tests/test_training.py.

Fault injection for tests/test_faults.py: ``DDP_FAULT=RANK:WHEN:HOW`` makes rank RANK fail
either when it starts training step WHEN (an integer) or, with WHEN ``cache``, while it encodes
the token cache; HOW is ``kill`` (SIGKILL itself), ``exit`` (exit code 3 without cleanup) or
``hang`` (sleep for an hour, as a deadlocked rank would). The worker also writes its pid to
``OUT_DIR/pid{rank}`` (so that a test can clean up a hung rank) and, when the fault fires, the
wall-clock time to ``OUT_DIR/fault-time``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

import train.train_transformer as train_transformer


class RecordingDDP(train_transformer.DistributedDataParallel):
    wrapped: list[torch.nn.Module] = []

    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        RecordingDDP.wrapped.append(module)


def fail(how: str, out: Path) -> None:
    (out / "fault-time").write_text(repr(time.time()))
    print(f"rank {os.environ['RANK']}: injected fault: {how}", flush=True)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(3)
    elif how == "hang":
        time.sleep(3600)
    raise SystemExit(f"unknown fault {how!r}")


def inject_fault(spec: str, out: Path) -> None:
    victim, when, how = spec.split(":")
    if int(os.environ["RANK"]) != int(victim):
        return
    if when == "cache":
        real_token_cache = train_transformer.token_cache

        def token_cache(tokenizer, *args, **kwargs):
            tokenizer.encode = lambda *_, **__: fail(how, out)  # dies after the first heartbeat
            return real_token_cache(tokenizer, *args, **kwargs)

        train_transformer.token_cache = token_cache
        return
    real_batch_indices = train_transformer.batch_indices

    def batch_indices(step, *args, **kwargs):
        if step == int(when):
            fail(how, out)
        return real_batch_indices(step, *args, **kwargs)

    train_transformer.batch_indices = batch_indices


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    if os.environ.get("DDP_FAULT"):
        inject_fault(os.environ["DDP_FAULT"], out)
    train_transformer.DistributedDataParallel = RecordingDDP
    train_transformer.main(argv)
    if len(RecordingDDP.wrapped) != 1:
        raise SystemExit(f"expected one DDP-wrapped model, got {len(RecordingDDP.wrapped)}")
    rank = int(os.environ["RANK"])
    state = {k: v.detach().cpu().clone() for k, v in RecordingDDP.wrapped[0].state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
