"""Command (the subprocess side of ``memory.measure``): run one memory job in this fresh process and print
its report as one line of JSON.

    python -m mvar.memory_job '{"mode": "mvar", "batch": 8, "preset": "d16", "dtype": "bf16"}'

On the CPU the baseline is the resident set size before the measured work and the peak the kernel's
peak-RSS counter, reset first (``/proc/self/clear_refs`` with 5); on CUDA the allocator's peak minus
what was allocated before. A fresh process per job keeps one job's freed-but-cached memory from
hiding the next one's.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .config import AttentionMode
from .devices import dtype_of
from .memory import (
    MemoryJob,
    benchmark_request,
    measure_label,
    random_models,
    release_freed_memory,
    trainer_iteration,
    training_setup,
)
from .sampling import decode_to_unit, generate_steps, set_precision


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _build_models(job: MemoryJob, device: torch.device):
    if job.preset:
        return random_models(job.preset, device)
    from .checkpoints import load_any

    return (load_any(job.tokenizer, "tokenizer", device=device).model,
            load_any(job.transformer, "transformer", device=device).model)


def _start_measuring(device: torch.device) -> int:
    if device.type == "cuda":  # the job's own GPU, which need not be the current one
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    release_freed_memory()
    baseline = _read_status_kib("VmRSS") * 1024
    _reset_peak_rss()
    return baseline


def _peak(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device),
                "cuda allocator peak minus allocated before the measured work")
    return _read_status_kib("VmHWM") * 1024, "peak RSS minus RSS before the measured work (fresh subprocess)"


def run_training_job(job: MemoryJob) -> dict:
    """Peak memory of one training iteration of every kind in the cycle (the largest counts), each
    the trainer's own (``mvar.training.training_step``, teacher-forcing inputs included).

    The baseline is taken after a warm-up cycle, so it holds the fp32 weights and AdamW's state
    (the same for VAR and MVAR); the peak adds activations and gradients.
    """
    device = torch.device(job.device)
    tokenizer, model = _build_models(job, device)
    tokenizer.eval().requires_grad_(False)
    model.train().requires_grad_(True)
    optimizer, settings, scaler, tokens, labels = training_setup(model, tokenizer, job.batch, job.dtype)
    mode = AttentionMode.var() if job.mode == "var" else AttentionMode.mvar(job.refine_step, job.kernel_size)
    kinds = sorted(set(mode.training_cycle(model.schedule.num_scales, job.ratio_k)))
    for first, last in kinds:  # warm-up: allocates AdamW's state
        trainer_iteration(model, tokenizer, tokens, labels, mode, first, last, optimizer, settings, scaler)
    baseline = _start_measuring(device)
    started = time.perf_counter()
    for first, last in kinds:
        trainer_iteration(model, tokenizer, tokens, labels, mode, first, last, optimizer, settings, scaler)
    peak, kind = _peak(device)
    return {"job": asdict(job), "peak_bytes": peak - baseline, "baseline_bytes": baseline, "measure": kind,
            "label": measure_label(device), "seconds": time.perf_counter() - started}


def run_job(job: MemoryJob) -> dict:
    """Run one measurement in this process (the subprocess side)."""
    if job.task == "train":
        return run_training_job(job)
    device = torch.device(job.device)
    tokenizer, transformer = _build_models(job, device)
    tokenizer.eval().requires_grad_(False)
    transformer.eval().requires_grad_(False)
    mode = AttentionMode.var() if job.mode == "var" else AttentionMode.mvar(job.refine_step, job.kernel_size)
    dtype = dtype_of(job.dtype)
    set_precision(transformer, tokenizer, dtype)
    labels, sampling = benchmark_request(transformer.cfg, job.batch, job.cfg)

    baseline = _start_measuring(device)
    steps = list(generate_steps(transformer, tokenizer, labels, 0, sampling, mode, max_batch=4096))
    if job.decode:
        decode_to_unit(tokenizer, steps[-1].f_hat)
    peak, kind = _peak(device)
    return {"job": asdict(job), "peak_bytes": peak - baseline, "baseline_bytes": baseline, "measure": kind,
            "label": measure_label(device), "seconds": sum(s.seconds for s in steps)}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(run_job(MemoryJob(**json.loads(argv[0])))))


if __name__ == "__main__":
    main()
