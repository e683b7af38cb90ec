"""Costs and memory: the cost model's per-scale figures (KV cache, attention FLOPs) with the measured latency
of a generation, the analytic memory against batch size, and measured peak memory (a fresh subprocess per
point)."""

from __future__ import annotations

from pathlib import Path

from mvar.config import VAR_MODE, AttentionMode
from mvar.costs import dtype_bytes, generation_cost
from mvar.devices import autocast_precisions

from ..registry import LoadedModels
from .generation import GenerationRecord, record_of
from .settings import Choice, UserError, Whole, shown

MAX_COST_BATCH = 4096  # analytic costs only: no memory is allocated, but plots need sane axes
MAX_MEASURED_BATCH = 64  # each measured batch runs a real generation in a subprocess
MAX_MEASUREMENTS = 8  # distinct batch sizes per request
ANALYTIC_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def _dtype(dtype) -> str:
    try:
        dtype_bytes(dtype)
    except ValueError as err:
        raise UserError(str(err)) from None
    return dtype


def per_scale_costs(models: LoadedModels, record: GenerationRecord | None, batch: int = 1, dtype="fp32",
                    mvar_mode: AttentionMode | None = None) -> dict:
    """KV-cache bytes, attention FLOPs (analytic) and latency (measured, the generation alone) per scale.

    With a record the analytic figures use its batch, precision and MVAR settings, so they describe
    what was run; without one, ``batch`` and ``dtype``."""
    if record is not None:
        record = record_of(record)
        batch, dtype, mvar_mode = record.num_images, record.settings.precision, record.settings.mvar_mode
    batch, dtype = Whole("batch", 1, MAX_COST_BATCH).parse(batch), _dtype(dtype)
    cfg = models.transformer.cfg
    var = generation_cost(cfg, VAR_MODE, batch, True, dtype)
    mvar = generation_cost(cfg, mvar_mode or models.mvar_mode, batch, True, dtype)
    out = {
        "batch": batch, "dtype": dtype, "cfg_branches": 2,
        "kv_cache_mib": {"VAR": [s.kv_cache_bytes / 2**20 for s in var.scales],
                         "MVAR": [s.kv_cache_bytes / 2**20 for s in mvar.scales]},
        "attention_mflops": {"VAR": [s.attention_flops / 1e6 for s in var.scales],
                             "MVAR": [s.attention_flops / 1e6 for s in mvar.scales]},
        "total_gflops": {"VAR": var.flops / 1e9, "MVAR": mvar.flops / 1e9},
        "peak_mib": {"VAR": (var.kv_cache_bytes + var.peak_activation_bytes) / 2**20,
                     "MVAR": (mvar.kv_cache_bytes + mvar.peak_activation_bytes) / 2**20},
    }
    if record is not None:
        out["latency_ms"] = {name: [t * 1000 for t in run.seconds] for name, run in record.runs.items()}
    return out


def analytic_memory_mib(cfg, mode: AttentionMode, batches=ANALYTIC_BATCHES, dtype="fp32") -> dict[int, float]:
    """KV cache + largest activation set (MiB) per batch: the part a measurement above the loaded weights sees."""
    batches, dtype = batch_sizes(batches, MAX_COST_BATCH), _dtype(dtype)
    out = {}
    for batch in batches:
        cost = generation_cost(cfg, mode, batch, True, dtype)
        out[batch] = (cost.kv_cache_bytes + cost.peak_activation_bytes) / 2**20
    return out


def batch_sizes(batches, limit: int, count: int | None = None) -> list[int]:
    """Distinct batch sizes in 1..limit (at most ``count`` of them), in the order given."""
    if isinstance(batches, str | bytes) or not hasattr(batches, "__iter__"):
        raise UserError(f"Batch sizes must be a list of whole numbers from 1 to {limit}, got {shown(batches)}")
    field = Whole("Batch size", 1, limit)
    chosen = list(dict.fromkeys(field.parse(b) for b in batches))
    if not chosen:
        raise UserError("pick at least one batch size")
    if count is not None and len(chosen) > count:
        raise UserError(f"pick at most {count} batch sizes, got {len(chosen)}")
    return chosen


def measured_memory_mib(models: LoadedModels, batches, dtype: str = "fp32", progress=None,
                        device="cpu") -> dict[str, dict]:
    """Peak memory above the loaded weights, measured in a fresh subprocess per (mode, batch) on ``device``:
    peak RSS on the CPU, the CUDA allocator's peak on a GPU (:func:`memory_label` says which)."""
    from mvar.memory import MemoryJob, measure

    batches = batch_sizes(batches, MAX_MEASURED_BATCH, MAX_MEASUREMENTS)
    Choice("Precision", autocast_precisions(device)).parse(dtype)
    if progress is not None and not callable(progress):
        raise UserError(f"progress must be callable or None, got {type(progress).__name__}")
    random_weights = models.entry.source == "random"
    if not random_weights and (models.entry.source == "hub" or not Path(models.entry.transformer).exists()):
        raise UserError("measurements need the model files on this machine")
    cache = models.cache.setdefault(("memory", dtype, str(device)), {"VAR": {}, "MVAR": {}})
    todo = [(name, b) for b in batches for name in ("VAR", "MVAR") if b not in cache[name]]
    for i, (name, batch) in enumerate(todo):
        if progress is not None:
            progress(i / len(todo), desc=f"measuring {name} at batch {batch}")
        transformer = models.entry.var_transformer if name == "VAR" and models.entry.var_transformer \
            else models.entry.transformer
        files = dict(preset=models.entry.transformer) if random_weights else dict(
            tokenizer=models.entry.tokenizer, transformer=transformer)
        job = MemoryJob(mode=name.lower(), batch=batch, dtype=dtype, refine_step=models.mvar_mode.refine_step,
                        kernel_size=models.mvar_mode.kernel_size, device=str(device), **files)
        cache[name][batch] = measure(job)["peak_bytes"] / 2**20
    return cache


def memory_label(device) -> str:
    """What :func:`measured_memory_mib` measures on ``device``, for the page."""
    from mvar.memory import measure_label

    return measure_label(device)
