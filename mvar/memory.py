"""Measured peak memory of one generation, VAR or MVAR, in a fresh process.

On CPU each measurement runs in its own subprocess: it loads (or builds) the models, records its
resident set size as the baseline, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``
with 5), generates, and reports peak RSS minus the baseline. A fresh process per configuration
keeps one run's freed-but-cached memory from hiding the next one's. On CUDA the allocator's peak
is used instead. These are measurements; the analytic model lives in ``costs.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


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
    device: str = "cpu"


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _release_freed_memory() -> None:
    """Hand memory freed while loading (e.g. fp32 weights cast to bf16) back to the kernel, so the
    baseline holds only live data and generation cannot hide its peak in those freed pages."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: the baseline may keep some freed pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_job(job: MemoryJob) -> dict:
    """Run one measurement in this process (the subprocess side)."""
    from .checkpoints import load_any
    from .config import AttentionMode, get_preset
    from .sampling import SamplingConfig, decode_to_unit, generate_steps, set_precision
    from .tokenizer import MultiScaleVQVAE
    from .transformer import ScaleTransformer

    device = torch.device(job.device)
    if job.preset:
        preset = get_preset(job.preset)
        tokenizer = MultiScaleVQVAE.empty(preset.tokenizer, device)
        transformer = ScaleTransformer.empty(preset.transformer, device)
        with torch.no_grad():
            for p in list(tokenizer.parameters()) + list(transformer.parameters()):
                p.normal_(0, 0.02)
    else:
        tokenizer = load_any(job.tokenizer, "tokenizer", device=device).model
        transformer = load_any(job.transformer, "transformer", device=device).model
    tokenizer.eval().requires_grad_(False)
    transformer.eval().requires_grad_(False)
    mode = AttentionMode.var() if job.mode == "var" else AttentionMode.mvar(job.refine_step, job.kernel_size)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[job.dtype]
    set_precision(transformer, tokenizer, dtype)
    sampling = SamplingConfig(cfg=1.5 if job.cfg else 0.0, top_k=min(900, transformer.cfg.vocab_size), top_p=0.96)
    labels = [i % transformer.cfg.num_classes for i in range(job.batch)]

    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _release_freed_memory()
        baseline = _read_status_kib("VmRSS") * 1024
        _reset_peak_rss()
    steps = list(generate_steps(transformer, tokenizer, labels, 0, sampling, mode, dtype=dtype, max_batch=4096))
    if job.decode:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            decode_to_unit(tokenizer, steps[-1].f_hat)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        kind = "cuda allocator peak minus allocated after loading"
    else:
        peak = _read_status_kib("VmHWM") * 1024
        kind = "peak RSS minus RSS after loading (fresh subprocess)"
    return {"job": asdict(job), "peak_bytes": peak - baseline, "baseline_bytes": baseline, "measure": kind,
            "seconds": sum(s.seconds for s in steps)}


def measure(job: MemoryJob, timeout: float = 1800) -> dict:
    """Run ``job`` in a fresh Python process and return its report."""
    result = subprocess.run([sys.executable, "-m", "mvar.memory", json.dumps(asdict(job))], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_job(MemoryJob(**json.loads(sys.argv[1])))))
