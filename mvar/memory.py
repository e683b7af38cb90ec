"""Measured peak memory of one generation or one training cycle, VAR or MVAR, in a fresh process.

``measure(MemoryJob(...))`` runs the job in a fresh ``python -m mvar.memory_job`` and returns its report;
the measuring itself is in ``memory_job.py``. Also here: the requests and models the benchmark shares
with the job (``random_models``, ``benchmark_request``, ``training_setup``, ``trainer_iteration``) and
``release_freed_memory``.

On CPU each measurement runs in its own subprocess: it loads (or builds) the models, records its
resident set size as the baseline, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``
with 5), generates, and reports peak RSS minus the baseline. A fresh process per configuration
keeps one run's freed-but-cached memory from hiding the next one's. On CUDA the allocator's peak
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``) minus what was allocated
before the measured work is used instead; each report says which (``label``). These are
measurements; the analytic model lives in ``costs.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import checks
from .devices import DTYPES, resolve_device

ROOT = Path(__file__).resolve().parent.parent
# What a measurement on each kind of device is, in the words the page and the reports use.
MEASURED_AS = {"cuda": "GPU memory (CUDA allocator peak)", "cpu": "peak RSS above the weights"}


def measure_label(device) -> str:
    """What a memory job on ``device`` measures: "GPU memory (CUDA allocator peak)" or "peak RSS above the weights"."""
    return MEASURED_AS[torch.device(device).type]


def random_models(preset_name: str, device, seed: int = 0):
    """(tokenizer, transformer) of a preset with random weights: speed and memory do not depend on the values."""
    from .config import get_preset
    from .tokenizer import MultiScaleVQVAE
    from .transformer import ScaleTransformer

    preset = get_preset(preset_name)
    tokenizer = MultiScaleVQVAE.empty(preset.tokenizer, device)
    transformer = ScaleTransformer.empty(preset.transformer, device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in list(tokenizer.parameters()) + list(transformer.parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return tokenizer, transformer


def benchmark_request(transformer_cfg, batch: int, guided: bool):
    """(labels, SamplingConfig) every measured generation uses: classes in turn, VAR's top-k/top-p."""
    from .sampling import SamplingConfig

    labels = [i % transformer_cfg.num_classes for i in range(batch)]
    return labels, SamplingConfig(cfg=1.5 if guided else 0.0, top_k=min(900, transformer_cfg.vocab_size), top_p=0.96)


@dataclass(frozen=True)
class MemoryJob:
    mode: str  # "var" | "mvar"
    batch: int
    preset: str | None = None  # random-init models of a preset (speed and memory do not depend on values)
    tokenizer: str | None = None  # or real files
    transformer: str | None = None
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    cfg: bool = True
    refine_step: int = 8
    kernel_size: int = 7
    decode: bool = True
    device: str = "cpu"  # auto | cpu | cuda | cuda:N, stored resolved ("cuda:0")
    task: str = "generate"  # "generate" | "train" (one optimiser step of every kind in the training cycle)
    ratio_k: int = 8  # MVAR training: joint iterations per cycle

    def __post_init__(self) -> None:
        """Checked here, in the parent process: a bad job fails with a readable ValueError, not in a subprocess."""
        from .config import get_preset

        _one_of("mode", self.mode, ("var", "mvar"))
        _one_of("dtype", self.dtype, tuple(DTYPES))
        _one_of("task", self.task, ("generate", "train"))
        for name, low in (("batch", 1), ("refine_step", 0), ("kernel_size", 1), ("ratio_k", 1)):
            object.__setattr__(self, name, checks.integer(name, getattr(self, name), low=low))  # numpy ints -> JSON
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        checks.boolean("cfg", self.cfg)
        checks.boolean("decode", self.decode)
        if self.preset is not None:
            get_preset(self.preset)
        for name in ("tokenizer", "transformer"):
            path = getattr(self, name)
            if path is not None and not isinstance(path, str | os.PathLike):
                raise ValueError(f"{name} must be a file path, got {checks.shown(path)} ({type(path).__name__})")
            object.__setattr__(self, name, None if path is None else os.fspath(path))
        if self.preset is None and (self.tokenizer is None or self.transformer is None):
            raise ValueError("a memory job needs a preset, or both a tokenizer and a transformer file")
        # resolved here, so that "cuda:3" on a machine of 2 GPUs fails now, not in the subprocess
        object.__setattr__(self, "device", str(resolve_device(self.device, flag="device")))


def _one_of(name: str, value, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {checks.shown(value)}")


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the kernel (glibc keeps it otherwise): a baseline then
    holds only live data, and a server's resident size falls back after a request."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def training_setup(model, tokenizer, batch: int, precision: str):
    """What one training step of the trainer needs, for a measurement: AdamW with the trainer's groups,
    the official step settings (no label smoothing, clipping at 2.0, every token 1/L), the fp16 loss
    scaler on CUDA, and random tokens and labels (each iteration derives its teacher-forcing inputs)."""
    from .training import StepSettings, configure_optimizers, loss_scaler, random_tokens

    device = model.pos_1LC.device
    optimizer = configure_optimizers(model, lr=1e-4, weight_decay=0.05, log=None)
    settings = StepSettings(precision=precision)
    scaler = loss_scaler(device, precision) if device.type == "cuda" else None  # CPU fp16 runs unscaled
    tokens, labels = random_tokens(tokenizer.cfg, batch, model.cfg.num_classes, device=device)
    return optimizer, settings, scaler, tokens, labels


def trainer_iteration(model, tokenizer, tokens, labels, mode, first: int, last: int, optimizer, settings, scaler):
    """One iteration as the trainer runs it: teacher-forcing inputs from the tokenizer, then the step."""
    from .training import TrainingBatch, training_step

    batch = TrainingBatch.from_tokens(tokenizer, tokens, labels)
    return training_step(model, batch, mode, first, last, optimizer, settings, scaler)


def measure(job: MemoryJob, timeout: float = 1800) -> dict:
    """Run ``job`` in a fresh Python process and return its report; ``timeout`` in seconds (> 0)."""
    if not isinstance(job, MemoryJob):
        raise ValueError(f"job must be a MemoryJob, got {checks.shown(job)} ({type(job).__name__})")
    timeout = checks.real("timeout", timeout, 0, low_open=True)
    result = subprocess.run([sys.executable, "-m", "mvar.memory_job", json.dumps(asdict(job))], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
