"""A prepared check for a CUDA machine: one table, in a few minutes.

    python -m mvar.gpu_check                       # the first CUDA device; refuses without one
    python -m mvar.gpu_check --device cuda:1 --out gpu_check.json
    python -m mvar.gpu_check --device cpu --quick  # dry run of the same code on tiny sizes (the test runs it)

Rows:

* windowed attention: the gather backend and NATTEN against the dense masked reference (max |diff|
  of the outputs, fp32 and bf16, k = 7 on MVAR's 16x16 grid and a 32x32 one); NATTEN's row says why
  they are skipped when it is not installed;
* precision: fp16 and bf16 generation (weights stored in that dtype, as the app runs them) against
  fp32 at greedy sampling (top-k 1, so nothing random): every logit finite, and the fraction of equal
  tokens over the first scales (later scales inherit every earlier difference), on the shipped
  default models (trained: a floor of TRAINED_AGREEMENT) and on the official d16 architecture with
  random weights (for information: random logits are full of near-ties);
* memory: peak memory of one generation at batch 32 (CFG, bf16, tokens + decode), d16 with random
  weights, VAR against MVAR, each in a fresh process (``memory.measure``: the CUDA allocator's peak);
* time: one d16 image (CFG, bf16, tokens + decode), VAR and MVAR (``benchmark.one_generation``).

``--quick`` runs the same rows on the ``tiny`` preset, small grids and small batches.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .attention import natten_available, windowed_attention
from .benchmark import load_models, one_generation
from .config import VAR_MODE, AttentionMode
from .devices import DEVICE_HELP, DTYPES, autocast_precisions, describe_device, resolve_device
from .memory import MemoryJob, measure, measure_label
from .sampling import SamplingConfig, generate_steps, set_precision

ATTENTION_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # max |out - dense|, outputs of order 1
# Equal greedy tokens over the first scales, trained models, fp16/bf16 vs fp32: a floor that separates a
# broken path (about 1/vocab of the tokens agree) from rounding, which flips near-tied logits, after which
# that sample runs on from other tokens. Measured on the CPU here (default models, 8 samples, 6 scales):
# bf16 0.88 (VAR) / 0.87 (MVAR), fp16 0.95 / 1.00, single samples down to 0.43.
TRAINED_AGREEMENT = 0.5
MEMORY_TARGET = 0.36  # MVAR / VAR peak memory, d16 batch 32 (README's target; the paper reports 1/2.8)


@dataclass(frozen=True)
class CheckPlan:
    """Sizes of one run: ``full`` for a CUDA machine, ``quick`` for the dry run."""

    preset: str  # memory and time rows
    memory_batch: int
    attention_sides: tuple[int, ...]
    attention_shape: tuple[int, int, int]  # batch, heads, head_dim
    precision_models: tuple[str, ...]  # "default" (assets/) or a preset with random weights
    precision_samples: int
    first_scales: int
    timing_repeats: int
    kernel_size: int = 7

    @classmethod
    def full(cls) -> CheckPlan:
        return cls("d16", 32, (16, 32), (2, 16, 64), ("default", "d16"), 8, 6, 3)

    @classmethod
    def quick(cls) -> CheckPlan:
        return cls("tiny", 2, (8,), (1, 2, 16), ("default", "tiny"), 8, 6, 1)


@dataclass
class Row:
    check: str
    setting: str
    result: str
    verdict: str  # "ok", "FAIL", "info" or "skipped"
    values: dict = field(default_factory=dict)  # the numbers behind ``result``, for --out


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def attention_rows(plan: CheckPlan, device: torch.device) -> list[Row]:
    """Gather and NATTEN against dense, per grid and dtype."""
    batch, heads, head_dim = plan.attention_shape
    natten = natten_available()
    rows = []
    generator = torch.Generator().manual_seed(0)
    for side in plan.attention_sides:
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            q, k, v = (torch.randn(batch, heads, side * side, head_dim, generator=generator).to(device, dtype)
                       for _ in range(3))
            setting = f"{side}x{side} grid, k={plan.kernel_size}, {dtype_name}, B={batch} H={heads} D={head_dim}"
            with torch.no_grad():
                dense = windowed_attention(q, k, v, side, side, plan.kernel_size, head_dim**-0.5, "dense").float()
                backends = ["gather"] + (["natten"] if natten else [])
                for backend in backends:
                    with warnings.catch_warnings():  # NATTEN's CPU path warns about flex attention, once per shape
                        warnings.simplefilter("ignore")
                        out = windowed_attention(q, k, v, side, side, plan.kernel_size, head_dim**-0.5, backend)
                    diff = float((out.float() - dense).abs().max())
                    tolerance = ATTENTION_TOLERANCE[dtype_name]
                    verdict = "ok" if diff <= tolerance else "FAIL"
                    rows.append(Row(f"attention: {backend} vs dense", setting,
                                    f"max abs diff {diff:.2e} (tolerance {tolerance:g})", verdict,
                                    {"max_abs_diff": diff, "tolerance": tolerance}))
        if not natten:
            rows.append(Row("attention: natten vs dense", f"{side}x{side} grid, k={plan.kernel_size}, fp32 and bf16",
                            "natten is not installed (pip install natten==0.21.7)", "skipped"))
    return rows


def greedy_generation(models, mode: AttentionMode, samples: int, dtype: torch.dtype | None,
                      first_scales: int) -> tuple[torch.Tensor, bool]:
    """Tokens of the first scales (B, n) at top-k 1 with CFG, and whether every logit was finite."""
    transformer, tokenizer = models.transformer, models.tokenizer
    finite = []
    hook = transformer.head.register_forward_hook(lambda _m, _i, out: finite.append(bool(torch.isfinite(out).all())))
    labels = [i % transformer.cfg.num_classes for i in range(samples)]
    sampling = SamplingConfig(cfg=1.5, top_k=1, top_p=1.0)
    try:
        steps = generate_steps(transformer, tokenizer, labels, 0, sampling, mode, max_batch=4096)
        tokens = [next(steps).tokens for _ in range(first_scales)]
        steps.close()
    finally:
        hook.remove()
    return torch.cat(tokens, dim=1).cpu(), all(finite)


def precision_rows(plan: CheckPlan, device: torch.device, dtypes: tuple[str, ...]) -> list[Row]:
    """fp16 / bf16 against fp32: finite logits and equal greedy tokens over the first scales."""
    rows = []
    modes = {"VAR": VAR_MODE, "MVAR": AttentionMode.mvar()}
    for name in plan.precision_models:
        reference = load_models(name, device)
        scales = min(plan.first_scales, len(reference.transformer.cfg.patch_nums))
        tokens_fp32 = {m: greedy_generation(reference, mode, plan.precision_samples, None, scales)[0]
                       for m, mode in modes.items()}
        trained = not reference.random_weights
        for dtype_name in dtypes:
            low = copy.deepcopy(reference)
            set_precision(low.transformer, low.tokenizer, DTYPES[dtype_name])
            agreement, all_finite = {}, True
            for m, mode in modes.items():
                tokens, finite = greedy_generation(low, mode, plan.precision_samples, DTYPES[dtype_name], scales)
                agreement[m] = float((tokens == tokens_fp32[m]).float().mean())
                all_finite &= finite
            del low
            weights = "trained default models" if trained else f"{name}, random weights"
            setting = (f"{weights}, {plan.precision_samples} samples, top-k 1, CFG 1.5, first {scales} scales "
                       f"({tokens_fp32['VAR'].shape[1]} tokens each)")
            result = (f"logits {'finite' if all_finite else 'NOT FINITE'}; equal tokens VAR "
                      f"{agreement['VAR']:.1%}, MVAR {agreement['MVAR']:.1%}")
            if not all_finite:
                verdict = "FAIL"
            elif trained:
                verdict = "ok" if min(agreement.values()) >= TRAINED_AGREEMENT else "FAIL"
            else:
                verdict = "info"  # random weights: near-tied logits flip under rounding; not a pass mark
            rows.append(Row(f"generation: {dtype_name} vs fp32", setting, result, verdict,
                            {"finite": all_finite, "equal_tokens": agreement}))
    return rows


def memory_row(plan: CheckPlan, device: torch.device, dtype_name: str) -> Row:
    """Peak memory of one generation, VAR and MVAR, each in a fresh process."""
    peaks = {}
    for mode in ("var", "mvar"):
        job = MemoryJob(mode=mode, batch=plan.memory_batch, preset=plan.preset, dtype=dtype_name, device=str(device))
        peaks[mode] = measure(job)["peak_bytes"]
    ratio = peaks["mvar"] / peaks["var"]
    verdict = ("ok" if ratio <= MEMORY_TARGET else "FAIL") if plan.preset == "d16" else "info"
    return Row("peak memory: MVAR vs VAR",
               f"{plan.preset}, random weights, batch {plan.memory_batch}, CFG, {dtype_name}, tokens + decode; "
               f"{measure_label(device)}",
               f"VAR {peaks['var'] / 2**20:.0f} MiB, MVAR {peaks['mvar'] / 2**20:.0f} MiB ({ratio:.2f}x; "
               f"target <= {MEMORY_TARGET}x at d16)", verdict,
               {"peak_bytes": peaks, "ratio": ratio})


def timing_row(plan: CheckPlan, device: torch.device, dtype_name: str) -> Row:
    """Seconds for one image (tokens + decode), VAR and MVAR alternating, after a warm-up of each."""
    models = load_models(plan.preset, device)
    dtype = DTYPES[dtype_name]
    set_precision(models.transformer, models.tokenizer, dtype)
    modes = {"VAR": VAR_MODE, "MVAR": AttentionMode.mvar()}
    times = {name: [] for name in modes}
    for repeat in range(plan.timing_repeats + 1):
        for name, mode in modes.items():
            seconds = one_generation(models, mode, 1, dtype, True)["total"]
            if repeat:  # the first of each is the warm-up (kernels, allocator)
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    return Row("time: one image",
               f"{plan.preset}, random weights, batch 1, CFG, {dtype_name}, tokens + decode, "
               f"median of {plan.timing_repeats}",
               f"VAR {median['VAR']:.3f} s, MVAR {median['MVAR']:.3f} s ({median['MVAR'] / median['VAR']:.2f}x)",
               "info", {"seconds": median})


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def markdown(rows: list[Row]) -> str:
    lines = ["| check | setting | result | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.check} | {r.setting} | {r.result} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def choose_device(parser: argparse.ArgumentParser, value: str, quick: bool) -> torch.device:
    """The device to check; a CPU run is refused unless it is the asked-for dry run (--device cpu --quick)."""
    try:
        device = resolve_device(value)
    except ValueError as err:
        parser.error(str(err))
    if device.type != "cuda" and not (value == "cpu" and quick):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        parser.error(f"this check is for a CUDA machine, and --device {value} gives {device} (torch "
                     f"{torch.__version__}, CUDA devices: {gpus}). For a dry run of its code on the CPU: "
                     "python -m mvar.gpu_check --device cpu --quick")
    return device


def run(plan: CheckPlan, device: torch.device) -> list[Row]:
    """Every row, in the table's order."""
    offered = tuple(d for d in ("fp16", "bf16") if device.type == "cpu" or d in autocast_precisions(device))
    timed = "bf16" if "bf16" in offered else "fp16"
    rows = attention_rows(plan, device)
    rows += precision_rows(plan, device, offered)
    rows.append(memory_row(plan, device, timed))
    rows.append(timing_row(plan, device, timed))
    return rows


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m mvar.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto; the CPU only with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the code path")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    device = choose_device(parser, args.device, args.quick)
    plan = CheckPlan.quick() if args.quick else CheckPlan.full()
    natten = "installed" if natten_available() else "not installed"
    print(f"mvar.gpu_check on {describe_device(device)}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"natten {natten}, {'quick' if args.quick else 'full'} plan", flush=True)
    rows = run(plan, device)
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": describe_device(device), "plan": asdict(plan),
                                              "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    failed = [r for r in rows if r.verdict == "FAIL"]
    if failed:
        print(f"{len(failed)} check(s) failed: " + "; ".join(f"{r.check} ({r.setting})" for r in failed),
              file=sys.stderr)
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
