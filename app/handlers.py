"""Event handlers: plain functions from widget values to widget values.

Generation runs MVAR and the VAR baseline on the same class and seeds, one scale of each in
turn, and streams a frame per scale. What a view needs later (per-scale previews, timings, the
captured attention of sample 0) is kept in a :class:`GenerationRecord` held in ``gr.State``, so
stepping through scales or clicking tokens never recomputes the generation.

Handlers raise :class:`UserError` (shown as a message in the page) for bad input. Widget values
arrive loosely typed (an emptied Number box sends None, a slider a float, a dropdown a string), so
every handler checks its arguments first and names the bad one and its valid range.

Handlers that run the models take a ``device``: None for the registry's device, or a device to move
the loaded models onto first (ZeroGPU: inside the call that holds the GPU, see ``zerogpu.py``).
What they return holds numpy images and CPU tensors only, so it can cross a process boundary.
"""

from __future__ import annotations

import math
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mvar import checks
from mvar.config import VAR_MODE, AttentionMode
from mvar.costs import dtype_bytes, generation_cost
from mvar.devices import autocast_precisions
from mvar.sample import to_uint8
from mvar.sampling import SamplingConfig, decode_to_unit, generate_steps, normalize_seed
from mvar.schedule import ScaleSchedule

from . import plots
from .analysis import AttentionStats, mass_per_key_scale, scale_grid, window_box
from .registry import LoadedModels, ModelRegistry

MAX_IMAGES = 4  # default limit of images per generation (generate_frames' max_images)
CAPTURE_BUDGET_BYTES = 64 * 2**20  # per model and generation; beyond it only some layers are captured
CFG_MAX = 100.0  # SamplingConfig's own bound
MAX_ANALYSIS_SAMPLES = 16
MAX_COST_BATCH = 4096  # analytic costs only: no memory is allocated, but plots need sane axes
MAX_MEASURED_BATCH = 64  # each measured batch runs a real generation in a subprocess
MAX_MEASUREMENTS = 8  # distinct batch sizes per request
MAX_DISPLAYED_SIZE = 8192  # pixels of a displayed image, for clicks
PRECISIONS = (None, torch.float32, torch.bfloat16, torch.float16)
MEASURED_DTYPES = autocast_precisions("cpu")  # on CUDA also fp16: see measured_memory_mib


class UserError(ValueError):
    """A problem with what the user asked for: shown in the page, never as a traceback."""


@dataclass
class ModelRun:
    """One model's side of a generation (MVAR or the VAR baseline)."""

    mode: AttentionMode
    previews: list[np.ndarray] = field(default_factory=list)  # per scale, sample 0, (H, W, 3) uint8
    finals: list[np.ndarray] = field(default_factory=list)  # every sample's final image
    seconds: list[float] = field(default_factory=list)
    attention: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per scale: layer -> (H, nq, Nk) fp16
    keys_begin: list[int] = field(default_factory=list)


@dataclass
class GenerationRecord:
    model_key: str
    class_name: str
    seed: int
    patch_nums: tuple[int, ...]
    captured_layers: tuple[int, ...]
    num_heads: int
    kernel_size: int
    refine_step: int
    runs: dict[str, ModelRun]  # "MVAR", "VAR"

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _parsed(value):
    """A widget value with numeric strings ("3", " 0.5 ") turned into numbers; anything else unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    for parse in (int, float):
        try:
            return parse(text)
        except (ValueError, OverflowError):
            pass
    return value


def _user_errors(check, *args, **kwargs):
    """Run a library check; its ValueError becomes a UserError with the same message."""
    try:
        return check(*args, **kwargs)
    except ValueError as err:
        raise UserError(str(err)) from None


def _number(name: str, value, low=None, high=None, low_open: bool = False) -> float:
    """A finite number in range (NaN, inf, None, bools and words refused)."""
    return _user_errors(checks.real, name, _parsed(value), low, high, low_open)


def _integral(value):
    """Like ``_parsed``, and a whole float (3.0: sliders and Number boxes send floats) becomes an int."""
    value = _parsed(value)
    if checks.is_real(value) and not checks.is_integer(value):
        try:
            number = float(value)
        except OverflowError:
            return value
        if math.isfinite(number) and number.is_integer():
            return int(number)
    return value


def _whole(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An integer in range; 3.0 counts as 3, 2.5 does not."""
    return _user_errors(checks.integer, name, _integral(value), low, high)


def _seed(value) -> int:
    """Any integer, however large or negative, folded into the generator's range."""
    value = _integral(value)
    if not checks.is_integer(value):
        raise UserError(f"seed must be an integer (any size), got {checks.shown(value)} ({type(value).__name__})")
    return normalize_seed(int(value))


def _record(record) -> GenerationRecord:
    if not isinstance(record, GenerationRecord):
        raise UserError("generate an image first")
    return record


def parse_settings(models: LoadedModels, class_name, seed, cfg, top_k, top_p, smooth, num_images,
                   max_images: int = MAX_IMAGES):
    """Widget values -> (class id, seed, SamplingConfig, number of images), or a UserError naming the bad one."""
    max_images = checks.integer("max_images", max_images, low=1)  # the server's setting, not user input
    if not isinstance(class_name, str) or class_name not in models.class_names:
        raise UserError(f"unknown class {checks.shown(class_name)}: pick one of the {len(models.class_names)} "
                        "classes in the list")
    vocab = models.transformer.cfg.vocab_size
    sampling = SamplingConfig(
        cfg=_number("cfg", cfg, 0, CFG_MAX),
        top_k=_whole("top_k", top_k, 0, vocab),
        top_p=_number("top_p", top_p, 0, 1, low_open=True),
        smooth=_user_errors(checks.boolean, "smooth", smooth),
    )
    _user_errors(sampling.validate, vocab)  # the library's own checks, should they ever be stricter
    num_images = _whole("number of images", num_images, 1, max_images)
    return models.class_names.index(class_name), _seed(seed), sampling, num_images


def capture_layers_for(models: LoadedModels) -> tuple[int, ...]:
    """All layers when their VAR attention rows of sample 0 fit the budget, else evenly spaced ones."""
    cfg = models.transformer.cfg
    schedule = cfg.schedule
    per_layer = sum(schedule.tokens(s) * schedule.end(s) for s in range(schedule.num_scales)) * cfg.num_heads * 2
    count = max(1, min(cfg.depth, CAPTURE_BUDGET_BYTES // per_layer))
    return tuple(sorted({round(i * (cfg.depth - 1) / max(1, count - 1)) for i in range(count)}))


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@dataclass
class Frame:
    """What the page shows after each scale of each model."""

    mvar_image: np.ndarray | None
    var_image: np.ndarray | None
    status: str
    record: GenerationRecord | None = None


def load_models(registry: ModelRegistry, model_key, progress=None, device=None) -> LoadedModels:
    """The loaded models of an entry; an unknown key or a broken file is a UserError.

    ``progress(fraction, desc=...)`` (e.g. ``gr.Progress``) follows a hub download and the loading.
    ``device``: None = where the registry loads them; else they are moved there (see :func:`place_models`).
    """
    if not isinstance(model_key, str):
        raise UserError(f"unknown model {checks.shown(model_key)}: pick one from the list")
    models = _user_errors(registry.load, model_key, progress=progress)
    if device is not None:
        place_models(models, device)
    return models


_PLACING = threading.Lock()


def place_models(models: LoadedModels, device) -> None:
    """Move a loaded entry's models, and the low-precision copies made of them, onto ``device`` in place.

    Under ZeroGPU this runs in the call's worker process, so the server's copies stay on the CPU;
    elsewhere the move happens once (later calls find the models there).
    """
    device = torch.device(device)
    with _PLACING:  # two first calls must not copy (in_precision) or run a half-moved model
        modules = [models.tokenizer, models.transformer, models.var_transformer]
        for key, value in list(models.cache.items()):  # other handlers may add entries meanwhile
            if isinstance(key, tuple) and key[:1] == ("weights",):
                modules.extend(value)  # in_precision's (tokenizer, transformer, var_transformer) copies
        for module in modules:
            module.to(device)


def generate_frames(registry: ModelRegistry, model_key: str, class_name: str, seed, cfg, top_k, top_p, smooth,
                    num_images, dtype: torch.dtype | None = None, max_images: int = MAX_IMAGES,
                    device=None) -> Iterator[Frame]:
    """Run MVAR and VAR scale by scale, alternating, and yield a frame after each scale of each.

    ``max_images`` bounds ``num_images`` (and the sampler's batch): the server's limit. ``device``: see
    :func:`load_models`.
    """
    if not (dtype is None or isinstance(dtype, torch.dtype) and dtype in PRECISIONS):
        raise UserError(f"precision must be fp32, bf16 or fp16, got {checks.shown(dtype)}")
    models = load_models(registry, model_key, device=device)
    label, seed, sampling, num_images = parse_settings(models, class_name, seed, cfg, top_k, top_p, smooth,
                                                       num_images, max_images)
    layers = capture_layers_for(models)
    patch_nums = models.transformer.cfg.patch_nums
    queries = dict.fromkeys(range(len(patch_nums)))  # every query of every scale
    tokenizer, mvar_transformer, var_transformer = models.in_precision(dtype)
    streams = {
        "MVAR": generate_steps(mvar_transformer, tokenizer, [label] * num_images, seed, sampling,
                               models.mvar_mode, previews=True, capture_layers=layers,
                               capture_queries=queries, max_batch=max_images, preview_samples=1),
        "VAR": generate_steps(var_transformer, tokenizer, [label] * num_images, seed, sampling,
                              VAR_MODE, previews=True, capture_layers=layers, capture_queries=queries,
                              max_batch=max_images, preview_samples=1),
    }
    runs = {name: ModelRun(mode=models.mvar_mode if name == "MVAR" else VAR_MODE) for name in streams}
    record = GenerationRecord(model_key, class_name, seed, patch_nums, layers, models.transformer.cfg.num_heads,
                              models.mvar_mode.kernel_size, models.mvar_mode.refine_step, runs)
    latest = {"MVAR": None, "VAR": None}
    started = time.perf_counter()
    for scale in range(len(patch_nums)):
        for name, stream in streams.items():
            step = next(stream)
            run = runs[name]
            images = to_uint8(step.preview)
            run.previews.append(images[0])
            run.seconds.append(step.seconds)
            run.attention.append({layer: w[0].half().cpu() for layer, w in (step.attention or {}).items()})
            run.keys_begin.append(step.attention_keys_begin)
            if scale == len(patch_nums) - 1:  # the page streams the first image; all are decoded at the end
                run.finals = [images[0]] + (list(to_uint8(decode_to_unit(tokenizer, step.f_hat[1:])))
                                            if num_images > 1 else [])
            latest[name] = images[0]
            status = (f"scale {scale + 1}/{len(patch_nums)} ({step.side}x{step.side})  |  "
                      f"MVAR {sum(runs['MVAR'].seconds) * 1000:.0f} ms, VAR {sum(runs['VAR'].seconds) * 1000:.0f} ms"
                      f"  |  wall {time.perf_counter() - started:.2f} s")
            yield Frame(latest["MVAR"], latest["VAR"], status)
    yield Frame(latest["MVAR"], latest["VAR"], f"done: {status}. {models.baseline_note}.", record)


def random_seed() -> int:
    return random.randrange(0, 2**31 - 1)


def scale_view(record: GenerationRecord | None, scale: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The stored previews of one scale, for the slider: no recomputation."""
    if record is None:
        return None, None
    scale = _check_scale(_record(record), scale)
    return record.runs["MVAR"].previews[scale], record.runs["VAR"].previews[scale]


def filmstrips(record: GenerationRecord | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    if record is None:
        return None, None
    _record(record)
    return plots.filmstrip(record.runs["MVAR"].previews), plots.filmstrip(record.runs["VAR"].previews)


def save_finals(record: GenerationRecord | None) -> list[str]:
    """Write the final images as PNG files in a temp folder, for download."""
    if record is None:
        return []
    _record(record)
    folder = Path(tempfile.mkdtemp(prefix="mvar-studio-"))
    paths = []
    safe_class = "".join(ch if ch.isalnum() else "-" for ch in record.class_name)
    for name, run in record.runs.items():
        for i, image in enumerate(run.finals):
            path = folder / f"{name.lower()}-{safe_class}-seed{record.seed}-{i}.png"
            Image.fromarray(image).save(path)
            paths.append(str(path))
    return paths


def _check_scale(record: GenerationRecord, scale) -> int:
    scale = _whole("scale", scale)
    if not 0 <= scale < record.num_scales:
        raise UserError(f"scale must be in 0..{record.num_scales - 1}, got {checks.shown(scale)}")
    return scale


def _is_mean(choice) -> bool:
    return isinstance(choice, str) and choice == "mean"


def _check_layer(record: GenerationRecord, layer) -> int | str:
    """"mean" or one of the captured layers (the dropdown sends them as strings)."""
    if _is_mean(layer):
        return layer
    choices = list(record.captured_layers)
    value = _integral(layer)
    if checks.is_integer(value) and value in choices:
        return int(value)
    raise UserError(f"layer must be one of the captured layers {choices} or 'mean', got {checks.shown(layer)}")


def _check_head(record: GenerationRecord, head) -> int | str:
    """"mean" or a head index."""
    if _is_mean(head):
        return head
    value = _integral(head)
    if checks.is_integer(value) and 0 <= value < record.num_heads:
        return int(value)
    raise UserError(f"head must be in 0..{record.num_heads - 1} or 'mean', got {checks.shown(head)}")


# ---------------------------------------------------------------------------------------------
# Attention views
# ---------------------------------------------------------------------------------------------


@dataclass
class AttentionView:
    mvar_overlay: np.ndarray
    var_heatmaps: object  # plotly Figure
    var_mass: object  # plotly Figure
    masks: list[np.ndarray]  # VAR, scale-Markov, MVAR
    caption: str


def _weights(run: ModelRun, scale: int, layer, head, query: int) -> torch.Tensor:
    """(Nk,) fp32 weights of one query, layer (or "mean") and head (or "mean")."""
    captured = run.attention[scale]
    if not captured:
        raise UserError("no attention was captured for this generation")
    if layer == "mean":
        stacked = torch.stack([w[:, query].float() for w in captured.values()])  # (layers, H, Nk)
        rows = stacked.mean(0)
    else:
        if layer not in captured:
            raise UserError(f"layer {layer} was not captured (captured: {sorted(captured)})")
        rows = captured[layer][:, query].float()
    if head == "mean":
        return rows.mean(0)
    if not 0 <= head < rows.shape[0]:
        raise UserError(f"head must be in 0..{rows.shape[0] - 1}, got {head}")
    return rows[head]


def attention_view(record: GenerationRecord | None, scale, layer, head, row, col) -> AttentionView:
    record = _record(record)
    scale = _check_scale(record, scale)
    layer, head = _check_layer(record, layer), _check_head(record, head)
    side = record.patch_nums[scale]
    row, col = _whole("token row", row), _whole("token column", col)
    if not (0 <= row < side and 0 <= col < side):
        raise UserError(f"token ({checks.shown(row)}, {checks.shown(col)}) is outside the {side}x{side} grid of "
                        f"scale {scale}: rows and columns are 0..{side - 1}")
    query = row * side + col
    schedule_nums = record.patch_nums
    schedule = ScaleSchedule(schedule_nums)
    mvar_run, var_run = record.runs["MVAR"], record.runs["VAR"]

    mvar_rows = _weights(mvar_run, scale, layer, head, query)
    grid = scale_grid(mvar_rows, schedule, scale, keys_begin=mvar_run.keys_begin[scale]).numpy()
    windowed = scale >= record.refine_step
    box = window_box(side, row, col, record.kernel_size) if windowed else None
    overlay = plots.attention_overlay(mvar_run.previews[scale], grid, (row, col), window=box)

    var_rows = _weights(var_run, scale, layer, head, query)
    per_scale = [scale_grid(var_rows, schedule, s).numpy() for s in range(scale + 1)]
    mass = mass_per_key_scale(var_rows, schedule)[: scale + 1].numpy()
    position = schedule.begin(scale) + query
    masks = [plots.mask_image(schedule_nums, kind, record.refine_step, record.kernel_size, highlight_row=position)
             for kind in ("var", "scale-markov", "mvar")]
    where = f"window rows {box[0]}..{box[0] + box[2] - 1}, cols {box[1]}..{box[1] + box[3] - 1}" if box else \
        "whole scale (no window below the refine step)"
    caption = (f"Token ({row}, {col}) of scale {scale} ({side}x{side}), layer {layer}, head {head}. "
               f"MVAR attends only within its scale: {where}. VAR spreads "
               f"{mass[scale]:.0%} of its attention on its own scale"
               + (f" and {mass[scale - 1]:.0%} on the previous one." if scale else "."))
    return AttentionView(
        overlay,
        plots.cross_scale_heatmaps(per_scale, f"VAR: where token ({row}, {col}) attends, scale by scale"),
        plots.mass_by_scale_figure(mass, scale, "VAR: attention mass per scale"),
        masks, caption,
    )


def token_from_click(record: GenerationRecord | None, scale, x: float, y: float, displayed_size: int):
    """A click at pixel (x, y) on the overlay image -> the token (row, col) of the current scale.

    A click just outside the image (its border) counts as the nearest token.
    """
    record = _record(record)
    scale = _check_scale(record, scale)
    size = _whole("displayed image size", displayed_size, 1, MAX_DISPLAYED_SIZE)
    # clamped here, before any arithmetic: a huge coordinate would overflow in numpy
    x, y = (min(max(_number(name, v), 0.0), size - 1.0) for name, v in (("click x", x), ("click y", y)))
    return plots.token_at(x, y, size, record.patch_nums[scale])


# ---------------------------------------------------------------------------------------------
# Analysis (VAR mode, several samples)
# ---------------------------------------------------------------------------------------------


def attention_statistics(models: LoadedModels, samples: int = 4, seed: int = 0, progress=None) -> AttentionStats:
    """Run the loaded model in VAR mode on a few samples and gather the paper's panel a / b statistics.

    Cached per loaded model and sample count.
    """
    samples = _whole("samples", samples, 1, MAX_ANALYSIS_SAMPLES)
    seed = _seed(seed)
    _check_progress(progress)
    key = ("attention-stats", samples, seed)
    if key not in models.cache:
        models.cache[key] = _attention_statistics(models, samples, seed, progress)
    return models.cache[key]


def _check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise UserError(f"progress must be callable or None, got {type(progress).__name__}")


def _attention_statistics(models: LoadedModels, samples: int, seed: int, progress) -> AttentionStats:
    cfg = models.var_transformer.cfg
    schedule = cfg.schedule
    stats = AttentionStats(schedule.num_scales)
    layers = capture_layers_for(models)
    labels = [i % cfg.num_classes for i in range(samples)]
    total = samples * schedule.num_scales
    done = 0
    for i, label in enumerate(labels):
        sampling = SamplingConfig(**{k: models.sampling[k] for k in ("cfg", "top_k", "top_p")})
        steps = generate_steps(models.var_transformer, models.tokenizer, [label], seed + i, sampling, VAR_MODE,
                               capture_layers=layers, capture_queries=dict.fromkeys(range(schedule.num_scales)))
        for step in steps:
            for weights in step.attention.values():
                stats.add_scale(weights[0].cpu(), schedule, step.scale)  # (H, nq, Nk); many small reads: on the CPU
            done += 1
            if progress is not None:
                progress(done / total, desc=f"sample {i + 1}/{samples}, scale {step.scale + 1}")
    return stats


# ---------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------


def per_scale_costs(models: LoadedModels, record: GenerationRecord | None, batch: int = 1, dtype="fp32") -> dict:
    """KV-cache bytes, attention FLOPs (analytic) and latency (measured, last generation) per scale."""
    if record is not None:
        _record(record)
    batch = _whole("batch", batch, 1, MAX_COST_BATCH)
    _user_errors(dtype_bytes, dtype)
    cfg = models.transformer.cfg
    var = generation_cost(cfg, VAR_MODE, batch, True, dtype)
    mvar = generation_cost(cfg, models.mvar_mode, batch, True, dtype)
    out = {
        "kv_cache_mib": {"VAR": [s.kv_cache_bytes / 2**20 for s in var.scales],
                         "MVAR": [s.kv_cache_bytes / 2**20 for s in mvar.scales]},
        "attention_mflops": {"VAR": [s.attention_flops / 1e6 for s in var.scales],
                             "MVAR": [s.attention_flops / 1e6 for s in mvar.scales]},
    }
    if record is not None:
        out["latency_ms"] = {name: [t * 1000 for t in run.seconds] for name, run in record.runs.items()}
    return out


# ---------------------------------------------------------------------------------------------
# Memory against VAR
# ---------------------------------------------------------------------------------------------

ANALYTIC_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def analytic_memory_mib(cfg, mode: AttentionMode, batches=ANALYTIC_BATCHES, dtype="fp32") -> dict[int, float]:
    """KV cache + largest activation set (MiB) per batch: the part a measurement above the loaded weights sees."""
    batches = _batch_sizes(batches, MAX_COST_BATCH)
    _user_errors(dtype_bytes, dtype)
    out = {}
    for batch in batches:
        cost = generation_cost(cfg, mode, batch, True, dtype)
        out[batch] = (cost.kv_cache_bytes + cost.peak_activation_bytes) / 2**20
    return out


def _batch_sizes(batches, limit: int, count: int | None = None) -> list[int]:
    """Distinct batch sizes in 1..limit (at most ``count`` of them), in the order given."""
    if isinstance(batches, str | bytes) or not hasattr(batches, "__iter__"):
        raise UserError(f"batch sizes must be a list of integers in 1..{limit}, got {checks.shown(batches)}")
    chosen = list(dict.fromkeys(_whole("batch size", b, 1, limit) for b in batches))
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

    batches = _batch_sizes(batches, MAX_MEASURED_BATCH, MAX_MEASUREMENTS)
    offered = autocast_precisions(device)
    if not isinstance(dtype, str) or dtype not in offered:
        raise UserError(f"precision must be one of {list(offered)}, got {checks.shown(dtype)}")
    _check_progress(progress)
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
