"""Device choice: one function turns a ``--device`` value into a torch device, or says what is wrong.

Every entry point (the app, ``mvar.sample``, ``mvar.benchmark``, ``mvar.gpu_check``, the memory
job, evaluation and training) takes ``--device auto|cpu|cuda|cuda:N`` and resolves it here:

* ``auto``: the first CUDA device when one is present, else the CPU;
* ``cpu``;
* ``cuda``: the first CUDA device (an error without one);
* ``cuda:N``: that device (an error when this machine has N or fewer).

Training under torchrun resolves per rank with :func:`distributed_device` (rank i of a node on
``cuda:LOCAL_RANK``). Also here: a one-line description of a device for the page, the autocast
precisions a device offers, ``DTYPES`` (the one map from a precision's name to its dtype),
``autocast`` (a no-op for full precision) and a ``synchronize`` that is a no-op on the CPU (for timings).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from . import checks

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_HELP = ("auto (the first CUDA device when one is present, else the CPU), cpu, cuda (the first CUDA device) "
               "or cuda:N")


def parse_device(value, flag: str = "--device") -> tuple[str, int | None]:
    """The syntax alone: ``(kind, index)`` with kind auto | cpu | cuda and index None or N >= 0."""
    if not isinstance(value, str):
        raise ValueError(f"{flag} must be one of {DEVICE_CHOICES} (a string), got {checks.shown(value)} "
                         f"({type(value).__name__})")
    if value in ("auto", "cpu", "cuda"):
        return value, None
    kind, colon, index = value.partition(":")
    if kind == "cuda" and colon and index.isdigit() and index.isascii() and str(int(index)) == index:
        return "cuda", int(index)
    raise ValueError(f"{flag} must be one of {DEVICE_CHOICES}, got {checks.shown(value)}")


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _no_cuda(flag: str, value: str) -> ValueError:
    build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
    return ValueError(f"{flag} {value}: no CUDA device is available on this machine ({build}, torch "
                      f"{torch.__version__}); use {flag} cpu or {flag} auto")


def resolve_device(value="auto", flag: str = "--device") -> torch.device:
    """``value`` (auto | cpu | cuda | cuda:N) -> a torch device that exists here, else a ValueError naming ``flag``."""
    kind, index = parse_device(value, flag)
    if kind == "cpu":
        return torch.device("cpu")
    count = _cuda_count()
    if kind == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    if count == 0:
        raise _no_cuda(flag, value)
    index = 0 if index is None else index
    if index >= count:
        have = "1 CUDA device (cuda:0)" if count == 1 else f"{count} CUDA devices (cuda:0 .. cuda:{count - 1})"
        raise ValueError(f"{flag} {value}: this machine has {have}")
    return torch.device("cuda", index)


def distributed_device(value, local_rank: int, flag: str = "--device") -> torch.device:
    """The device of one torchrun rank: ``cuda:LOCAL_RANK`` for auto (with CUDA) and cuda, the CPU for cpu
    (and for auto without CUDA). A fixed ``cuda:N`` is refused: every rank of the node would share that GPU."""
    kind, index = parse_device(value, flag)
    if index is not None:
        raise ValueError(f"{flag} {value} names one GPU, but under torchrun every rank takes the GPU of its "
                         f"LOCAL_RANK: use {flag} cuda or {flag} auto")
    count = _cuda_count()
    if kind == "cpu" or (kind == "auto" and count == 0):
        return torch.device("cpu")
    if count == 0:
        raise _no_cuda(flag, value)
    if not 0 <= local_rank < count:
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this machine has {count} CUDA device(s); start at "
                         f"most {count} processes per node (torchrun --nproc_per_node {count})")
    return torch.device("cuda", local_rank)


def add_device_flag(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help=f"where to run: {DEVICE_HELP} (default {default})")


def device_from_flag(parser: argparse.ArgumentParser, value) -> torch.device:
    """:func:`resolve_device` for a command line: a bad value ends the command with ``parser.error``."""
    try:
        return resolve_device(value)
    except ValueError as err:
        parser.error(str(err))


def describe_device(device) -> str:
    """One line for people: "cuda:0 (NVIDIA H200)" or "CPU (2 threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"CPU ({threads} thread{'s' if threads != 1 else ''})"
    return str(device)


# The one map from a precision's name (flags, the page) to its torch dtype.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def checked_dtype(dtype) -> torch.dtype | None:
    """A generation's dtype argument: None (full precision) or one of DTYPES' torch dtypes, else a ValueError."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {checks.shown(dtype)} ({type(dtype).__name__})")
    return dtype


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a precision name (fp32 | bf16 | fp16); a ValueError names the choices."""
    if name not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {checks.shown(name)}")
    return DTYPES[name]


def autocast_precisions(device) -> tuple[str, ...]:
    """Precisions generation offers on ``device``: fp32 and bf16 on the CPU; on CUDA also fp16, and bf16 only
    where the GPU supports it (Ampere and later)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ("fp32", "bf16")
    # native bf16 from compute capability 8 (Ampere); torch.cuda.is_bf16_supported() also counts emulation,
    # and asks the current device rather than this one
    native = torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
    return ("fp32", "bf16", "fp16") if native else ("fp32", "fp16")


def autocast(device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s kind; nothing for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def synchronize(device) -> None:
    """Wait for queued CUDA work (a timing must not stop before the GPU does); nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
