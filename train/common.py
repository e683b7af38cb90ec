"""What every training script shares: distributed setup, step-indexed data order, the learning
rate schedule, EMA weights, atomic resumable checkpoints and the metrics log.

Resumability is exact: the data order and every random draw are functions of (seed, step) or
live in the checkpoint, so a run killed at any point and resumed from its last checkpoint ends
with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mvar.devices import distributed_device, resolve_device
from mvar.training import PRECISIONS, autocast, loss_scaler  # noqa: F401 - loss_scaler: re-exported for the scripts

# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


DEFAULT_DIST_TIMEOUT = 600.0  # seconds; the training scripts' --dist-timeout default
_dist_state: dict = {}  # the timeout of the process group set up here, for error messages


def setup_distributed(timeout_seconds: float = DEFAULT_DIST_TIMEOUT, device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (gloo on CPU, NCCL on GPU).

    ``device`` is the ``--device`` flag: auto | cpu | cuda | cuda:N for one process; under torchrun
    auto | cpu | cuda, each rank then taking the GPU of its LOCAL_RANK (see ``mvar.devices``). A bad
    value ends the process with a readable error before any process group is set up.

    The timeout makes the surviving ranks fail with an error when one rank dies or hangs, instead
    of waiting forever in a collective. A rank that dies outright closes its sockets, and gloo
    reports that at once ("Connection closed/reset by peer"); a rank that hangs (or a lost
    machine) is only noticed when a collective has waited ``timeout_seconds``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        chosen = resolve_device(device) if world_size <= 1 else distributed_device(device, local_rank)
    except ValueError as err:
        raise SystemExit(f"error: rank {rank}: {err}" if world_size > 1 else f"error: {err}") from None
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)  # NCCL and bare .cuda() calls use the current device
    if world_size <= 1:
        return DistInfo(device=chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    device = chosen
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    _dist_state["timeout"] = timeout_seconds
    return DistInfo(rank, world_size, local_rank, device)

# What a collective that lost a peer raises: torch's Dist* errors (NCCL), or with gloo a plain
# RuntimeError from the transport: "Connection closed by peer" / "Connection reset by peer" (the
# peer died), "Timed out waiting ... for recv" or "Application timeout caused pair closure" (the
# peer hung past the timeout; the latter is what the next collective on the broken pair says).
_COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer", "timed out",
                               "pair closure", "socket closed")


def is_collective_failure(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _COLLECTIVE_FAILURE_MARKERS)


def exit_on_collective_failure(main):
    """Decorate a training script's ``main``: when a collective fails because another rank died
    or hung, exit non-zero with one readable line instead of a C++ traceback (or an abort while
    tearing down a broken process group)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:
            if not (dist.is_initialized() and is_collective_failure(err)):
                raise
            rank, world_size = dist.get_rank(), dist.get_world_size()
            detail = " ".join(str(err).split())
            detail = detail.split(" This is typically caused")[0][:400]  # gloo's advice follows
            timeout = _dist_state.get("timeout")
            timeout = f"{timeout:g} s" if timeout else "unknown"
            lowered = detail.lower()
            if "by peer" in lowered:
                cause = "another rank closed its connection: it has died (killed, crashed or exited)"
            elif "timeout" in lowered or "timed out" in lowered:
                cause = (f"another rank did not answer within the collective timeout ({timeout}, --dist-timeout): "
                         "it has hung, died without closing its connection, or was busy for longer than that")
            else:
                cause = f"another rank has probably died or hung (collective timeout {timeout}, --dist-timeout)"
            cleanup_distributed()
            raise SystemExit(f"error: rank {rank} of {world_size}: a collective operation failed; {cause}. "
                             f"Check the other ranks' logs. ({type(err).__name__}: {detail})") from None

    return wrapped


def cleanup_distributed() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # a group broken by a dead rank may fail to shut down; we exit anyway
            warnings.warn(f"destroying the process group failed: {err}", stacklevel=2)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


# ---------------------------------------------------------------------------------------------
# Data order: batches are a pure function of (seed, step), sharded over ranks
# ---------------------------------------------------------------------------------------------


def batch_indices(step: int, dataset_size: int, global_batch: int, seed: int, info: DistInfo) -> list[int]:
    """Dataset indices of this rank's share of global step ``step``.

    Each epoch is a fresh permutation seeded by (seed, epoch); the global batch is split
    into ``world_size`` contiguous shares, so 2 ranks x B samples see exactly the same samples
    as 1 rank x 2B.
    """
    if global_batch % info.world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {info.world_size} ranks")
    if dataset_size < global_batch:
        raise ValueError(f"dataset of {dataset_size} samples is smaller than one batch ({global_batch})")
    per_epoch = dataset_size // global_batch  # drop the last partial batch of each epoch
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    share = global_batch // info.world_size
    start = position * global_batch + info.rank * share
    return order[start : start + share].tolist()


# ---------------------------------------------------------------------------------------------
# Optimisation helpers
# ---------------------------------------------------------------------------------------------


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final_ratio: float = 0.1) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``peak * final_ratio`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


SCHEDULES = ("lin0", "lin", "lin00", "cos", "exp")  # the transformer's --schedule (VAR's and MVAR's names)


def lr_factor(schedule: str, step: int, total: int, warmup: int, wp0: float = 0.005, wpe: float = 0.01) -> float:
    """VAR's and MVAR's learning-rate multiplier at ``step`` (0-based) of a ``total``-step run.

    Warm-up: linear from ``wp0`` (step 0) towards 1 over ``warmup`` steps. Then, with ``done`` going
    from 0 (end of warm-up) to 1 (the last step, ``total - 1``), down to ``wpe``:
    "lin0" holds 1 for the first 5% of ``done`` then falls linearly; "lin" the same after 15%;
    "lin00" falls linearly from the start; "cos" is a half cosine; "exp" holds for 15% then
    falls exponentially. (The official code also has "lin<T>" for progressive training; not here.)
    """
    if step < warmup:
        return wp0 + (1 - wp0) * step / warmup
    done = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if schedule == "cos":
        return wpe + (1 - wpe) * 0.5 * (1 + math.cos(math.pi * done))
    if schedule == "lin00":
        return wpe + (1 - wpe) * (1 - done)
    if schedule in ("lin0", "lin", "exp"):
        hold = 0.05 if schedule == "lin0" else 0.15
        if done < hold:
            return 1.0
        if schedule == "exp":
            return math.exp((done - hold) / (1 - hold) * math.log(wpe))
        return wpe + (1 - wpe) * (1 - done) / (1 - hold)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def weight_decay_at(step: int, total: int, start: float, end: float) -> float:
    """The official weight decay: half cosine from ``start`` (step 0) to ``end`` (step total-1);
    constant when they are equal (the official default: twde unset means twde = twd)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total - 1))))


class EMA:
    """Exponential moving average of a model's floating-point parameters (fp32 copies)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.float(), 1 - self.decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        load_averages(model, self.shadow)


def load_averages(model: torch.nn.Module, shadow: dict[str, torch.Tensor]) -> None:
    """Put an EMA's averages (e.g. a checkpoint's "ema") into ``model``; entries it lacks keep their value."""
    model.load_state_dict({k: shadow.get(k, v).to(v.dtype) for k, v in model.state_dict().items()})


# ---------------------------------------------------------------------------------------------
# Run folder: checkpoints and metrics
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU: draws made there (drop path)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_output_dir(path: Path, need_bytes: int = 200 * 2**20) -> None:
    """Fail before training starts if the run folder cannot be written or the disk is full."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-") as handle:
            handle.write(b"x")
            handle.flush()
    except OSError as err:
        raise SystemExit(f"error: run folder {path} is not writable: {err}") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise SystemExit(f"error: only {free / 2**20:.0f} MiB free under {path}; "
                         f"need at least {need_bytes / 2**20:.0f} MiB for checkpoints")


class RunFolder:
    """checkpoints/step-XXXXXXX.pt (the newest ``keep`` of them) and metrics.jsonl."""

    def __init__(self, path, keep: int = 2):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.keep = keep

    def save(self, step: int, state: dict) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        target = self.checkpoints / f"step-{step:07d}.pt"
        fd, tmp = tempfile.mkstemp(dir=self.checkpoints, prefix=".tmp-", suffix=".pt")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, target)  # atomic: a reader sees the old file set or the new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
        return target

    def list(self) -> list[Path]:
        return sorted(self.checkpoints.glob("step-*.pt")) if self.checkpoints.exists() else []

    def load_latest(self) -> dict | None:
        """The newest readable checkpoint; a corrupt newest one falls back to the previous with a warning."""
        for path in reversed(self.list()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # truncated zip, bad pickle: all mean "unusable"
                warnings.warn(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                              "falling back to the previous one", stacklevel=2)
        return None

    def log(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


class Throughput:
    def __init__(self):
        self.started = time.perf_counter()
        self.samples = 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        return self.samples / max(1e-9, time.perf_counter() - self.started)


def check_precision(device: torch.device, precision: str) -> None:
    """fp32 and bf16 everywhere, fp16 on CUDA only (CPU autocast to fp16 is slow and has no loss scaling here)."""
    if precision not in PRECISIONS:
        raise SystemExit(f"error: --precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda" and precision == "fp16":
        raise SystemExit(f"error: --precision fp16 is for CUDA devices, this run is on {device}; use bf16 or fp32")


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CPU; bf16 or fp16 on CUDA; nothing for fp32 (the training step's own autocast)."""
    check_precision(device, precision)
    return autocast(device, precision)


def parse_dataclass_args(cls, prog: str, description: str, argv=None, required=("run_dir",)):
    """A command line with one ``--flag`` per dataclass field (defaults and types from the fields)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.name in required:
            parser.add_argument(flag, required=True)
        else:  # a field whose default is None ("decided later") names its type in its metadata
            parser.add_argument(flag, type=f.metadata.get("type", type(f.default)), default=f.default)
    parsed = cls(**vars(parser.parse_args(argv)))
    for name in ("steps", "batch_size", "save_every", "log_every"):
        if hasattr(parsed, name) and getattr(parsed, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(parsed, name)}")
    if hasattr(parsed, "dist_timeout") and not parsed.dist_timeout > 0:
        parser.error(f"--dist-timeout must be a positive number of seconds, got {parsed.dist_timeout}")
    if hasattr(parsed, "precision") and parsed.precision not in PRECISIONS:
        parser.error(f"--precision must be one of {', '.join(PRECISIONS)}, got {parsed.precision!r}")
    return parsed, parser


def restore_training_state(state: dict, model: torch.nn.Module, optimizer, ema: EMA | None) -> tuple[int, float]:
    """Load model, optimiser, EMA and RNG state from a checkpoint dict; return (step, wall seconds so far)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # moves its state onto the parameters' device itself
    if ema is not None and state.get("ema"):
        where = {name: value.device for name, value in model.state_dict().items()}
        ema.shadow = {name: value.to(where.get(name, value.device)) for name, value in state["ema"].items()}
    set_rng_state(state["rng"])
    return state["step"], state["wall_seconds"]


def command_line() -> str:
    return " ".join(["python", "-m", "train." + Path(sys.argv[0]).stem] + sys.argv[1:])
