"""Benchmarks: MVAR against VAR, side by side in one run.

    python -m mvar.benchmark --presets default d16 --batch-sizes 1 8 --dtypes bf16 --out bench/

For every (preset, batch, dtype) it runs VAR and MVAR alternately in this process, repeats, and
reports medians and spreads of generation latency (tokens + decode, and per scale), the KV-cache
bytes actually allocated next to the cost model's, the page's previews (what a generation costs as the
page streams it, against the bare one, and how close each scale's preview is to the tokenizer's full
fp32 decode of the same map), FLOPs counted by torch's flop counter next to
the cost model's, the throughput achieved against a large matmul measured in the same run, and
(in fresh subprocesses) peak memory of generation and of one training step. Official-size presets
run with random weights: speed and memory do not depend on the values, and the output says so.
Timings vary from run to run; the VAR/MVAR ratios are the point.

``--measure attention`` prints the timing table of the windowed-attention backends instead (dense,
gather and, where it imports, natten; forward, no grad, CPU tensors):

    python -m mvar.benchmark --measure attention
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import BACKENDS, natten_available, resolve_backend, windowed_attention
from .checks import integer, positive_integers, shown
from .config import AttentionMode
from .costs import flop_counter, generation_cost, teacher_forced_flops
from .devices import DTYPES, add_device_flag, describe_device, device_from_flag, synchronize
from .files import ASSETS
from .memory import (
    MemoryJob,
    benchmark_request,
    measure,
    random_models,
    trainer_iteration,
    training_setup,
)
from .previews import DEFAULT_PREVIEW_SHARE, PreviewBudget, Previews
from .sampling import decode_to_unit, generate_steps, set_precision
from .tokenizer import MultiScaleVQVAE
from .transformer import ScaleTransformer

MEASUREMENTS = ("latency", "page", "memory", "flops", "train", "train-memory")  # of models, per preset and batch
TABLES = ("attention",)  # measured once, apart from the models

# The attention table times natten up to 32x32 grids: NATTEN's CPU path (flex attention without
# torch.compile, every query-key score evaluated) took ~30 ms per call at 16x16, ~0.5 s at 32x32 and
# ~10 s at 64x64 (B=2, H=16, D=64, k=7, fp32, 2 cores), and the table runs each backend 8 times per row.
NATTEN_BENCHMARK_MAX_TOKENS = 32 * 32


@dataclass(frozen=True)
class Models:
    name: str
    tokenizer: MultiScaleVQVAE
    transformer: ScaleTransformer
    random_weights: bool
    tokenizer_path: str | None = None
    transformer_path: str | None = None


def load_models(name: str, device: torch.device) -> Models:
    """``default``: the shipped models in assets/; any other name: a preset with random weights."""
    if name == "default":
        from .checkpoints import load_model

        tokenizer_path = ASSETS / "tokenizer.safetensors"
        transformer_path = ASSETS / "mvar.safetensors"
        tokenizer = load_model(tokenizer_path, device, expect="tokenizer").model
        transformer = load_model(transformer_path, device, expect="transformer").model
        return Models(name, tokenizer.requires_grad_(False), transformer.requires_grad_(False), False,
                      str(tokenizer_path), str(transformer_path))
    tokenizer, transformer = random_models(name, device)
    return Models(name, tokenizer.eval().requires_grad_(False), transformer.eval().requires_grad_(False), True)


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def matmul_peak_flops(dtype: torch.dtype | None, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Measured throughput (FLOP/s) of a large square matmul in ``dtype``: this machine's practical peak."""
    a = torch.randn(size, size, device=device, dtype=dtype or torch.float32)
    b = torch.randn(size, size, device=device, dtype=dtype or torch.float32)
    a @ b  # warm-up: thread pools, kernels
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times)


def one_generation(models: Models, mode: AttentionMode, batch: int, dtype, cfg: bool) -> dict:
    labels, sampling = benchmark_request(models.transformer.cfg, batch, cfg)
    device = models.transformer.pos_1LC.device
    synchronize(device)
    started = time.perf_counter()
    steps = list(generate_steps(models.transformer, models.tokenizer, labels, 0, sampling, mode, dtype=dtype,
                                max_batch=4096))
    tokens_seconds = time.perf_counter() - started  # generate_steps synchronises after every scale
    decode_to_unit(models.tokenizer, steps[-1].f_hat)  # in the decoder's stored dtype
    synchronize(device)
    total = time.perf_counter() - started
    return {"total": total, "tokens": tokens_seconds, "decode": total - tokens_seconds,
            "per_scale": [s.seconds for s in steps], "kv_cache_bytes": max(s.kv_cache_bytes for s in steps),
            "first_preview": first_preview_seconds(models, mode, batch, dtype, cfg)}


def page_generation(models: Models, mode: AttentionMode, batch: int, dtype, cfg: bool, budget: PreviewBudget
                    ) -> dict:
    """A generation as the page streams it: the first sample's previews (full decodes) of the scales the
    budget lets through as they come (``previews.PreviewBudget``; always the last, which is the final
    image), then the other samples' final images. The other scales' previews are decoded when a viewer
    asks for them (``previews.Previews``): see :func:`preview_fidelity` for that cost."""
    labels, sampling = benchmark_request(models.transformer.cfg, batch, cfg)
    device = models.transformer.pos_1LC.device
    synchronize(device)
    started = time.perf_counter()
    steps = list(generate_steps(models.transformer, models.tokenizer, labels, 0, sampling, mode, dtype=dtype,
                                max_batch=4096, previews=True, preview_samples=1, preview_budget=budget))
    if batch > 1:  # the first sample's final image is its last preview
        decode_to_unit(models.tokenizer, steps[-1].f_hat[1:])
    synchronize(device)
    return {"total": time.perf_counter() - started, "previews": sum(s.preview_seconds for s in steps),
            "streamed_scales": [s.scale + 1 for s in steps if s.preview is not None]}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB between two images in [0, 1] (inf when equal)."""
    mse = float((a.float() - b.float()).square().mean())
    return float("inf") if mse == 0 else -10 * math.log10(mse)


def lazy_previews(models: Models, mode: AttentionMode, dtype, cfg: bool) -> tuple[Previews, float]:
    """One sample's previews of every scale, as a viewer gets them (``previews.Previews``, in the measured
    precision), and the median time of one preview's decode (what a scale slider's first visit costs)."""
    labels, sampling = benchmark_request(models.transformer.cfg, 1, cfg)
    previews = Previews(dtype)
    for step in generate_steps(models.transformer, models.tokenizer, labels, 0, sampling, mode, dtype=dtype,
                               max_batch=4096):
        previews.add(step.f_hat)
    seconds = []
    for scale in range(previews.num_scales):
        before = previews.seconds
        previews.image(models.tokenizer, scale)
        seconds.append(previews.seconds - before)
    return previews, statistics.median(seconds)


def preview_psnr(previews: Previews, tokenizer: MultiScaleVQVAE, reference: MultiScaleVQVAE) -> list[float]:
    """PSNR (dB) per scale of each decoded preview of sample 0 against ``reference`` (the tokenizer in fp32)
    decoding the same partial map."""
    device = reference.post_quant_conv.weight.device
    with torch.no_grad():
        expected = decode_to_unit(reference, torch.cat([m[:1] for m in previews.maps]).to(device)).cpu()
    return [psnr(previews.image(tokenizer, scale), expected[scale]) for scale in range(previews.num_scales)]


def first_preview_seconds(models: Models, mode: AttentionMode, batch: int, dtype, cfg: bool) -> float:
    """Time from the call until the first scale's decoded preview is in hand (what the app streams first;
    like the app, only the first sample is previewed)."""
    labels, sampling = benchmark_request(models.transformer.cfg, batch, cfg)
    started = time.perf_counter()
    steps = generate_steps(models.transformer, models.tokenizer, labels, 0, sampling, mode, previews=True,
                           dtype=dtype, max_batch=4096, preview_samples=1)
    first = next(steps)  # synchronised by generate_steps before it yields
    seconds = time.perf_counter() - started
    steps.close()
    assert first.preview is not None
    return seconds


def counted_generation_flops(models: Models, mode: AttentionMode, batch: int, dtype, cfg: bool) -> int:
    """FLOPs of the token generation (no decode) counted on a real run."""
    counter = flop_counter()
    labels, sampling = benchmark_request(models.transformer.cfg, batch, cfg)
    with counter:
        list(generate_steps(models.transformer, models.tokenizer, labels, 0, sampling, mode, dtype=dtype,
                            max_batch=4096))
    return counter.get_total_flops()


def training_steps(models: Models, mode: AttentionMode, batch: int, dtype_name: str, repeats: int,
                   ratio_k: int = 8) -> dict:
    """Time of one training iteration of each kind in the cycle, and the cycle's average.

    Each iteration is the trainer's: teacher-forcing inputs from the tokenizer, then
    ``mvar.training.training_step`` (weighted CE, backward, clipping, AdamW with the trainer's groups)
    on a fresh fp32 model under autocast. VAR: every step is the full sequence. MVAR: ``ratio_k``
    joint steps, then one per windowed scale.
    """
    model = ScaleTransformer(models.transformer.cfg).to(models.transformer.pos_1LC.device).train()
    device = model.pos_1LC.device
    optimizer, settings, scaler, tokens, labels = training_setup(model, models.tokenizer, batch, dtype_name)
    cycle = mode.training_cycle(model.schedule.num_scales, ratio_k)
    per_kind = {}
    for first, last in sorted(set(cycle)):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up (AdamW state, kernels)
            synchronize(device)
            started = time.perf_counter()
            trainer_iteration(model, models.tokenizer, tokens, labels, mode, first, last, optimizer, settings, scaler)
            synchronize(device)
            times.append(time.perf_counter() - started)
        per_kind[f"{first}-{last}"] = {"seconds": statistics.median(times[1:]), "weight": cycle.count((first, last)),
                                       "spread": spread(times[1:])}
    average = sum(k["seconds"] * k["weight"] for k in per_kind.values()) / len(cycle)
    flops = sum(teacher_forced_flops(model.cfg, mode, batch, first, last) for first, last in cycle) / len(cycle) * 3
    return {"average_step_seconds": average, "per_kind": per_kind, "analytic_flops_per_step": flops}


def batches_for(args, measurement: str) -> list[int]:
    """Batch sizes a measurement runs at: memory and training have their own lists (big batches are slow)."""
    if measurement == "memory" and args.memory_batch_sizes:
        return args.memory_batch_sizes
    if measurement in ("train", "train-memory") and args.train_batch_sizes:
        return args.train_batch_sizes
    return args.batch_sizes


def run(args) -> dict:
    device = torch.device(args.device)  # resolved by main
    report = {"machine": machine_info(device), "configs": [], "notes": []}
    if "attention" in args.measure:
        report["attention"] = print_attention_table()
    if not any(m in MEASUREMENTS for m in args.measure):
        return report
    if "page" in args.measure:
        args.budgets = {}  # (preset, dtype, mode) -> the PreviewBudget its page-style runs share, as the app keeps one
    all_batches = sorted({b for m in args.measure if m in MEASUREMENTS for b in batches_for(args, m)})
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        peak = matmul_peak_flops(dtype, device)
        report.setdefault("matmul_peak_flops", {})[dtype_name] = peak
        for preset in args.presets:
            models = load_models(preset, device)
            # the previews' fidelity is measured against the fp32 tokenizer's decode
            reference = copy.deepcopy(models.tokenizer) if "page" in args.measure else None
            set_precision(models.transformer, models.tokenizer, dtype)  # weights stored in the dtype measured
            if models.random_weights:
                report["notes"].append(f"{preset}: random weights (speed and memory do not depend on the values)")
            for batch in all_batches:
                wanted = [m for m in args.measure if m in MEASUREMENTS and batch in batches_for(args, m)]
                entry = measure_config(models, preset, batch, dtype_name, wanted, args, peak, reference)
                report["configs"].append(entry)
                print_entry(entry)
    return report


def measure_config(models: Models, preset: str, batch: int, dtype_name: str, wanted: list[str], args,
                   peak: float, reference: MultiScaleVQVAE | None = None) -> dict:
    """Every wanted measurement of one (preset, batch, dtype), VAR and MVAR side by side."""
    dtype = DTYPES[dtype_name]
    device = models.transformer.pos_1LC.device
    modes = {"VAR": AttentionMode.var(), "MVAR": AttentionMode.mvar(args.refine_step, args.kernel_size)}
    entry = {"preset": preset, "batch": batch, "dtype": dtype_name, "cfg": args.cfg, "modes": {},
             "matmul_peak_flops": peak}
    backend = resolve_backend("auto", device, models.transformer.cfg.patch_nums[-1] ** 2)
    for name, mode in modes.items():
        cost = generation_cost(models.transformer.cfg, mode, batch, args.cfg, dtype_name,
                               windowed_as_dense=backend == "dense")
        entry["modes"][name] = {"analytic": {"flops": cost.flops, "kv_cache_bytes": cost.kv_cache_bytes,
                                             "peak_estimate_bytes": cost.peak_memory_estimate}}
    if "latency" in wanted:
        one_generation(models, modes["VAR"], batch, dtype, args.cfg)  # warm-up
        one_generation(models, modes["MVAR"], batch, dtype, args.cfg)
        runs = {name: [] for name in modes}
        peaks = []
        for _ in range(args.repeats):  # alternate, so drift hits both alike (and the matmul peak too)
            peaks.append(matmul_peak_flops(dtype, device, repeats=3))
            for name, mode in modes.items():
                runs[name].append(one_generation(models, mode, batch, dtype, args.cfg))
        entry["matmul_peak_flops"] = peak = statistics.median(peaks)
        for name, results in runs.items():
            out = entry["modes"][name]
            out["latency_total"] = spread([r["total"] for r in results])
            out["latency_tokens"] = spread([r["tokens"] for r in results])
            out["latency_decode"] = spread([r["decode"] for r in results])
            out["first_preview"] = spread([r["first_preview"] for r in results])
            out["latency_per_scale"] = [statistics.median(r["per_scale"][s] for r in results)
                                        for s in range(len(results[0]["per_scale"]))]
            out["kv_cache_bytes_allocated"] = results[0]["kv_cache_bytes"]
    if "page" in wanted:  # the page's previews against the bare generation, alternating, same mode
        pages = {name: [] for name in modes}
        bare = {name: [] for name in modes}
        budgets = {name: args.budgets.setdefault((preset, dtype_name, name), PreviewBudget(args.preview_share))
                   for name in modes}
        for name, mode in modes.items():
            page_generation(models, mode, batch, dtype, args.cfg, budgets[name])  # warm-up (it measures a decode)
        for _ in range(args.repeats):
            for name, mode in modes.items():
                bare[name].append(one_generation(models, mode, batch, dtype, args.cfg)["total"])
                pages[name].append(page_generation(models, mode, batch, dtype, args.cfg, budgets[name]))
        for name in modes:
            out = entry["modes"][name]
            out["page_total"] = spread([r["total"] for r in pages[name]])
            out["page_previews"] = spread([r["previews"] for r in pages[name]])
            out["page_bare_total"] = spread(bare[name])
            out["page_ratio"] = out["page_total"]["median"] / out["page_bare_total"]["median"]
            out["page_streamed_scales"] = [r["streamed_scales"] for r in pages[name]]
            out["page_preview_share"] = args.preview_share
        # what a preview decoded later costs, for every mode before the fp32 reference decodes (their large
        # fp32 activations would slow the next timed decode)
        lazy = {name: lazy_previews(models, mode, dtype, args.cfg) for name, mode in modes.items()}
        for name, (previews, seconds) in lazy.items():
            entry["modes"][name]["preview_fidelity"] = {
                "psnr": preview_psnr(previews, models.tokenizer, reference), "decode_seconds": seconds}
    if "flops" in wanted:
        for name, mode in modes.items():
            counted = counted_generation_flops(models, mode, batch, dtype, args.cfg)
            out = entry["modes"][name]
            out["counted_flops"] = counted
            out["flops_error"] = (out["analytic"]["flops"] - counted) / counted
            if "latency_tokens" in out:
                out["achieved_flops_per_s"] = counted / out["latency_tokens"]["median"]
                out["fraction_of_matmul_peak"] = out["achieved_flops_per_s"] / peak
    files = {"preset": None if not models.random_weights else preset,
             "tokenizer": models.tokenizer_path, "transformer": models.transformer_path}
    memory_kinds = (("memory", "generate", "peak_memory"), ("train-memory", "train", "train_peak_memory"))
    for measurement, task, key in memory_kinds:
        if measurement in wanted:
            for name in modes:
                job = MemoryJob(mode=name.lower(), batch=batch, dtype=dtype_name, cfg=args.cfg, device=args.device,
                                refine_step=args.refine_step, kernel_size=args.kernel_size, task=task, **files)
                entry["modes"][name][key] = measure(job)
    if "train" in wanted:
        for name, mode in modes.items():
            entry["modes"][name]["train"] = training_steps(models, mode, batch, dtype_name, args.repeats)
    return entry


# ---------------------------------------------------------------------------------------------
# The attention backends' timing table (--measure attention)
# ---------------------------------------------------------------------------------------------


def _time_interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) ms of each function, runs interleaved so load from elsewhere hits all alike."""
    for fn in fns.values():
        fn()  # warm-up: plan caches, allocator
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def attention_backends() -> tuple[str, ...]:
    """The backends the timing table covers: dense and gather, and natten where it imports."""
    return ("dense", "gather", "natten") if natten_available() else ("dense", "gather")


def time_attention(
    sides: tuple[int, ...] = (16, 20, 24, 32, 64),
    batch: int = 2,
    heads: int = 16,
    head_dim: int = 64,
    kernel_size: int = 7,
    repeats: int = 7,
    backends: tuple[str, ...] | None = None,
    natten_max_tokens: int = NATTEN_BENCHMARK_MAX_TOKENS,
) -> list[dict]:
    """Forward time (median, min ms) of each backend (default :func:`attention_backends`), fp32 and
    bf16, no grad, on CPU tensors. One row per grid and dtype: {"grid", "dtype", backend: (median, min)};
    natten is timed only on grids of at most ``natten_max_tokens`` tokens (its row entry is absent above)."""
    sides = positive_integers("sides", sides)
    for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim), ("repeats", repeats),
                        ("kernel_size", kernel_size)):
        integer(name, value, low=1)
    integer("natten_max_tokens", natten_max_tokens, low=0)
    backends = attention_backends() if backends is None else backends
    for backend in backends:
        if backend not in BACKENDS or backend == "auto":
            raise ValueError(f"backends: {shown(backend)} is not one of dense, gather, natten")
        resolve_backend(backend, "cpu", 1)  # natten where it is not installed: a clear error now
    rows = []
    generator = torch.Generator().manual_seed(0)
    for side in sides:
        tokens = side * side
        for dtype in (torch.float32, torch.bfloat16):
            # the transformer's layout: q, k, v are views of one (B, N, 3, H, D) projection
            qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=generator).to(dtype)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            fns = {
                backend: functools.partial(windowed_attention, q, k, v, side, side, kernel_size, 1.0, backend)
                for backend in backends
                if backend != "natten" or tokens <= natten_max_tokens
            }
            with torch.no_grad():
                times = _time_interleaved(fns, repeats if tokens <= 32 * 32 else max(3, repeats // 2))
            rows.append({"grid": f"{side}x{side}", "dtype": str(dtype).removeprefix("torch."), **times})
    return rows


def attention_table(rows: list[dict]) -> list[str]:
    """The timing table as text lines: ms median (min) per backend, and each backend's time over
    gather's; "-" where a backend was not timed on a grid."""
    backends = [name for name in ("dense", "gather", "natten") if any(name in row for row in rows)]
    ratios = [name for name in backends if name != "gather" and "gather" in backends]
    lines = [f"{'grid':>7} {'dtype':>9}" + "".join(f" {name:>17}" for name in backends)
             + "".join(f" {name + '/gather':>14}" for name in ratios)]
    for row in rows:
        cells = "".join(f" {row[name][0]:8.1f} ({row[name][1]:6.1f})" if name in row else f" {'-':>17}"
                        for name in backends)
        ratio = "".join(f" {row[name][0] / row['gather'][0]:13.2f}x" if name in row else f" {'-':>14}"
                        for name in ratios)
        lines.append(f"{row['grid']:>7} {row['dtype']:>9}{cells}{ratio}")
    return lines


def print_attention_table() -> list[dict]:
    """Time the backends with the table's defaults and print the table; returns its rows."""
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; B=2 H=16 D=64 k=7; forward, no grad; ms median (min)")
    if natten_available():
        side = math.isqrt(NATTEN_BENCHMARK_MAX_TOKENS)
        print(f"natten (NATTEN's CPU flex-attention path) is timed up to {side}x{side} only (~10 s a call at 64x64)")
    else:
        print("natten is not importable: no natten column (pip install natten==0.21.7)")
    rows = time_attention()
    for line in attention_table(rows):
        print(line, flush=True)
    return rows


def machine_info(device: torch.device | None = None) -> dict:
    import os
    import platform

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.device("cpu") if device is None else torch.device(device)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": describe_device(device),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def print_entry(entry: dict) -> None:
    head = f"{entry['preset']}  batch {entry['batch']}  {entry['dtype']}  cfg {'on' if entry['cfg'] else 'off'}"
    print(head)
    var, mvar = entry["modes"]["VAR"], entry["modes"]["MVAR"]
    lines = []
    if "latency_total" in var:
        v, m = var["latency_total"]["median"], mvar["latency_total"]["median"]
        lines.append(f"  latency (tokens+decode) VAR {v:.3f} s  MVAR {m:.3f} s  ratio {m / v:.2f}")
        v, m = var["latency_tokens"]["median"], mvar["latency_tokens"]["median"]
        lines.append(f"  of which tokens        VAR {v:.3f} s  MVAR {m:.3f} s")
        v, m = var["first_preview"]["median"], mvar["first_preview"]["median"]
        lines.append(f"  first preview          VAR {v:.3f} s  MVAR {m:.3f} s")
    if "page_total" in var:
        v, m = var["page_total"]["median"], mvar["page_total"]["median"]
        lines.append(f"  page-style generation  VAR {v:.3f} s ({var['page_ratio']:.2f}x bare "
                     f"{var['page_bare_total']['median']:.3f} s)  MVAR {m:.3f} s ({mvar['page_ratio']:.2f}x bare "
                     f"{mvar['page_bare_total']['median']:.3f} s), previews within {var['page_preview_share']:g} "
                     f"of the generation's time")
        for name, out in (("VAR", var), ("MVAR", mvar)):
            streamed = "; ".join(",".join(map(str, scales)) for scales in out["page_streamed_scales"])
            lines.append(f"    {name:<4} scales previewed as they came, per repeat: {streamed} (the others when "
                         f"asked: {out['preview_fidelity']['decode_seconds']:.3f} s each)")
        for name, out in (("VAR", var), ("MVAR", mvar)):
            values = out["preview_fidelity"]["psnr"]
            lines.append(f"  preview fidelity {name:<4}  PSNR vs the fp32 full decode, scales 1..{len(values)}: "
                         f"{' '.join(f'{p:.1f}' for p in values)} dB (min {min(values):.1f})")
    if "peak_memory" in var:
        v, m = var["peak_memory"]["peak_bytes"], mvar["peak_memory"]["peak_bytes"]
        lines.append(f"  peak memory            VAR {v / 2**20:.0f} MiB  MVAR {m / 2**20:.0f} MiB  ratio {m / v:.2f}")
    if "kv_cache_bytes_allocated" in var:
        lines.append(f"  KV cache (VAR)         allocated {var['kv_cache_bytes_allocated'] / 2**20:.1f} MiB, "
                     f"model {var['analytic']['kv_cache_bytes'] / 2**20:.1f} MiB")
    if "counted_flops" in var:
        lines.append(f"  FLOPs                  VAR {var['counted_flops'] / 1e9:.1f} G "
                     f"(model {var['flops_error']:+.2%})  MVAR {mvar['counted_flops'] / 1e9:.1f} G "
                     f"(model {mvar['flops_error']:+.2%})")
    if "fraction_of_matmul_peak" in var:
        lines.append(f"  transformer throughput VAR {var['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s "
                     f"({var['fraction_of_matmul_peak']:.0%})  MVAR {mvar['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s "
                     f"({mvar['fraction_of_matmul_peak']:.0%}) of a {entry['matmul_peak_flops'] / 1e9:.0f} GFLOP/s "
                     f"matmul")
    if "train" in var:
        v, m = var["train"]["average_step_seconds"], mvar["train"]["average_step_seconds"]
        lines.append(f"  train step (cycle avg) VAR {v:.3f} s  MVAR {m:.3f} s  ratio {m / v:.2f}")
    if "train_peak_memory" in var:
        v, m = var["train_peak_memory"]["peak_bytes"], mvar["train_peak_memory"]["peak_bytes"]
        lines.append(f"  train peak memory      VAR {v / 2**20:.0f} MiB  MVAR {m / 2**20:.0f} MiB  ratio {m / v:.2f}")
    print("\n".join(lines), flush=True)


def markdown_table(report: dict) -> str:
    """The report as a Markdown table, one row per configuration (what README's Performance shows)."""

    def pair(entry: dict, key: str, fmt) -> str:
        var, mvar = entry["modes"]["VAR"].get(key), entry["modes"]["MVAR"].get(key)
        if var is None or mvar is None:
            return ""
        v, m = fmt(var), fmt(mvar)
        return f"{number(v)} / {number(m)} ({m / v:.2f}x)"

    def number(value: float) -> str:
        return f"{value:.0f}" if value >= 100 else f"{value:.3g}"

    median = lambda out: out["median"]  # noqa: E731 - one-line accessors read best inline
    mib = lambda out: out["peak_bytes"] / 2**20  # noqa: E731
    rows = ["| preset | batch | dtype | latency s, tokens+decode | first preview s | peak memory MiB | "
            "train step s (cycle avg) | train peak MiB | FLOPs vs model | throughput / matmul peak |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in report["configs"]:
        var, mvar = entry["modes"]["VAR"], entry["modes"]["MVAR"]
        flops = (f"{var['flops_error']:+.2%} / {mvar['flops_error']:+.2%}" if "flops_error" in var else "")
        share = (f"{var['fraction_of_matmul_peak']:.0%} / {mvar['fraction_of_matmul_peak']:.0%}"
                 if "fraction_of_matmul_peak" in var else "")
        train = pair(entry, "train", lambda out: out["average_step_seconds"])
        rows.append(f"| {entry['preset']} | {entry['batch']} | {entry['dtype']} | "
                    f"{pair(entry, 'latency_total', median)} | {pair(entry, 'first_preview', median)} | "
                    f"{pair(entry, 'peak_memory', mib)} | {train} | {pair(entry, 'train_peak_memory', mib)} | "
                    f"{flops} | {share} |")
    return "\n".join(rows) + "\n\nEach cell: VAR / MVAR (MVAR's ratio to VAR).\n"


def write_charts(report: dict, folder: Path, png: bool = False) -> list[Path]:
    import plotly.graph_objects as go

    written = []
    by_key: dict = {}
    for entry in report["configs"]:
        by_key.setdefault((entry["preset"], entry["dtype"]), []).append(entry)
    memory = go.Figure()
    latency = go.Figure()
    for (preset, dtype), entries in by_key.items():
        entries.sort(key=lambda e: e["batch"])
        for name, dash in (("VAR", "dash"), ("MVAR", "solid")):
            points = [(e["batch"], e["modes"][name]["peak_memory"]["peak_bytes"] / 2**20) for e in entries
                      if "peak_memory" in e["modes"][name]]
            if points:
                memory.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                            name=f"{name} {preset} {dtype}", line=dict(dash=dash)))
        timed = [e for e in entries if "latency_per_scale" in e["modes"]["VAR"]]
        last = timed[-1] if timed else entries[-1]
        for name in ("VAR", "MVAR"):
            if "latency_per_scale" in last["modes"][name]:
                latency.add_trace(go.Bar(y=[t * 1000 for t in last["modes"][name]["latency_per_scale"]],
                                         x=[f"s{i}" for i in range(len(last["modes"][name]["latency_per_scale"]))],
                                         name=f"{name} {preset} {dtype} batch {last['batch']}"))
    memory.update_layout(title="Peak memory of generation against batch size (measured, CFG on)",
                         xaxis_title="batch", yaxis_title="MiB above the loaded weights", yaxis_type="log")
    latency.update_layout(title="Latency per scale (median)", yaxis_title="ms", barmode="group")
    for figure, name in ((memory, "memory_vs_batch.html"), (latency, "latency_per_scale.html")):
        path = folder / name
        figure.write_html(path, include_plotlyjs="cdn")
        written.append(path)
        if png:
            written.append(path.with_suffix(".png"))
            figure.write_image(written[-1], width=900, height=500)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mvar.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["default"], help="default (assets/), d16, d20, ..., tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--memory-batch-sizes", type=int, nargs="+", help="for memory (default: --batch-sizes)")
    parser.add_argument("--train-batch-sizes", type=int, nargs="+",
                        help="for train and train-memory (default: --batch-sizes)")
    parser.add_argument("--png", action="store_true", help="also write the charts as PNG (needs kaleido and Chrome)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--measure", nargs="+", choices=MEASUREMENTS + TABLES, default=list(MEASUREMENTS),
                        help="what to measure (default: every measurement of the models; 'attention': the "
                             "attention backends' timing table)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--refine-step", type=int, default=8)
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--preview-share", type=float, default=DEFAULT_PREVIEW_SHARE,
                        help="page: streamed previews may take this share of the generation's time "
                             f"(default {DEFAULT_PREVIEW_SHARE}, as the page)")
    add_device_flag(parser)
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)
    args.device = str(device_from_flag(parser, args.device))  # "cuda:0": the memory jobs get the same device
    sizes = args.batch_sizes + (args.memory_batch_sizes or []) + (args.train_batch_sizes or [])
    if args.repeats < 1 or any(b < 1 for b in sizes):
        parser.error("--repeats and the batch sizes must be positive")
    if not args.preview_share >= 0:
        parser.error("--preview-share must be a number >= 0")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    report = run(args)
    report["arguments"] = {k: v for k, v in vars(args).items() if k != "budgets"}
    (folder / "benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    charts = write_charts(report, folder, png=args.png)
    (folder / "summary.md").write_text(markdown_table(report))
    print(markdown_table(report))
    for note in sorted(set(report["notes"])):
        print("note:", note)
    print(f"wrote {folder / 'benchmark.json'}, {folder / 'summary.md'} and {', '.join(str(c) for c in charts)}")


if __name__ == "__main__":
    main()
