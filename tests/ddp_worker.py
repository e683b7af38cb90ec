"""Run ``train.train_transformer.main`` under torchrun and save every rank's final weights.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.ddp_worker OUT_DIR <train_transformer flags>

The training code runs unchanged; the only addition is a DistributedDataParallel subclass that
remembers the module it wraps, so that after ``main`` returns each rank can write
``OUT_DIR/rank{r}.pt`` with its own copy of the weights (rank 0's checkpoint alone would not
show that the ranks agree). Used by tests/test_training.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import train.train_transformer as train_transformer


class RecordingDDP(train_transformer.DistributedDataParallel):
    wrapped: list[torch.nn.Module] = []

    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        RecordingDDP.wrapped.append(module)


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
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
