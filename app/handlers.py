"""Handlers: plain functions from widget values to data (numpy images, numbers, text); ``plots`` makes figures.

Generation runs MVAR and the VAR baseline on the same class and seeds, one scale of each in turn, and
streams a frame per scale. What the views need later is kept in a :class:`GenerationRecord`: every
sample's accumulated map after every scale (so any sample's previews can be decoded later, cheaply),
the final images, the timings, and the captured attention of the selected sample. Stepping through
scales, picking a sample or clicking a token never regenerates the images.

Handlers raise :class:`UserError` for bad input, with the widget's label in the message and the range
the widget shows. Widget values arrive loosely typed (an emptied Number box sends None, a slider a
float, a dropdown a string), so every handler checks its arguments first.

Handlers that run the models take a ``device``: None for the registry's device, or a device to move
the loaded models onto first (ZeroGPU: inside the call that holds the GPU, see ``zerogpu.py``).
What they return holds numpy images and CPU tensors only, so it can cross a process boundary.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mvar import checks
from mvar.config import VAR_MODE, AttentionMode
from mvar.costs import dtype_bytes, generation_cost
from mvar.devices import autocast_precisions
from mvar.sampling import SEED_MODULUS, SamplingConfig, decode_preview, decode_to_unit, generate_steps
from mvar.schedule import ScaleSchedule
from mvar.tokenizer import to_uint8

from .analysis import AttentionStats, mass_per_key_scale, scale_grid, window_box
from .registry import LoadedModels, ModelRegistry

MAX_IMAGES = 4  # default limit of images per generation (generate_frames' max_images)
CAPTURE_BUDGET_BYTES = 64 * 2**20  # per model and generation; beyond it only some layers are captured
CFG_MAX = 10.0  # the page's CFG range (the sampler allows more; past 10 images saturate)
SEED_MAX = SEED_MODULUS - 1
MAX_ANALYSIS_SAMPLES = 16
MAX_COST_BATCH = 4096  # analytic costs only: no memory is allocated, but plots need sane axes
MAX_MEASURED_BATCH = 64  # each measured batch runs a real generation in a subprocess
MAX_MEASUREMENTS = 8  # distinct batch sizes per request
MAX_DISPLAYED_SIZE = 8192  # pixels of a displayed image, for clicks
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEASURED_DTYPES = autocast_precisions("cpu")  # on CUDA also fp16: see measured_memory_mib
BF16_MIN_PARAMETERS = 100_000_000  # below this bf16 buys nothing on a CPU (measured: the default models)
FULL_WINDOW = "full"  # the kernel-size choice that turns spatial windows off


class UserError(ValueError):
    """A problem with what the user asked for: shown in the page, never as a traceback."""


# ---------------------------------------------------------------------------------------------
# Checking widget values (messages use the widgets' own labels)
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


def _shown(value) -> str:
    return "an empty box" if value is None or (isinstance(value, str) and not value.strip()) else checks.shown(value)


def _number(label: str, value, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in range, or a UserError in the widget's words."""
    parsed = _parsed(value)
    try:
        return checks.real(label, parsed, low, high, low_open)
    except ValueError:
        bound = f"above {low:g}" if low_open else f"from {low:g}"
        raise UserError(f"{label} must be a number {bound} to {high:g}, got {_shown(value)}") from None


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


def _whole(label: str, value, low: int, high: int) -> int:
    """A whole number in range; 3.0 counts as 3, 2.5 does not."""
    parsed = _integral(value)
    if not checks.is_integer(parsed) or not low <= int(parsed) <= high:
        raise UserError(f"{label} must be a whole number from {low} to {high}, got {_shown(value)}")
    return int(parsed)


def check_seed(value) -> int:
    parsed = _integral(value)
    if not checks.is_integer(parsed) or not 0 <= int(parsed) <= SEED_MAX:
        raise UserError(f"Seed must be a whole number from 0 to 2^63 - 1 ({SEED_MAX}), got {_shown(value)}")
    return int(parsed)


def _choice(label: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        shown = f"one of {', '.join(map(str, choices))}" if len(choices) <= 6 else \
            f"one of the {len(choices)} in the list"
        raise UserError(f"{label} must be {shown}, got {_shown(value)}")
    return value


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """A generation request, checked."""

    class_name: str
    label: int
    seed: int
    sampling: SamplingConfig
    num_images: int
    precision: str
    mvar_mode: AttentionMode


def kernel_choices(models: LoadedModels) -> list[str]:
    """MVAR's window sizes for this model: odd k up to the largest grid's side, and "full" (no windows)."""
    side = models.transformer.cfg.patch_nums[-1]
    return [str(k) for k in range(1, side + 1, 2)] + [FULL_WINDOW]


def mvar_mode_for(models: LoadedModels, kernel, refine_step) -> AttentionMode:
    """The MVAR attention of the page's k and refine-step widgets ("full" k: scale-Markov only)."""
    kernel = _choice("Window k", str(_integral(kernel)) if kernel is not None else kernel, kernel_choices(models))
    num_scales = len(models.transformer.cfg.patch_nums)
    refine = _whole("Refine step", refine_step, 0, num_scales)
    if kernel == FULL_WINDOW:
        return AttentionMode.mvar(refine_step=num_scales, kernel_size=models.mvar_mode.kernel_size)
    return AttentionMode.mvar(refine_step=refine, kernel_size=int(kernel))


def parse_settings(models: LoadedModels, class_name, seed, cfg, top_k, top_p, smooth, num_images, precision,
                   kernel=None, refine_step=None, max_images: int = MAX_IMAGES, precisions=None) -> Settings:
    """Widget values -> Settings, or a UserError naming the widget and the range it shows."""
    max_images = checks.integer("max_images", max_images, low=1)  # the server's setting, not user input
    class_name = _choice("Class", class_name, models.class_names)
    vocab = models.transformer.cfg.vocab_size
    sampling = SamplingConfig(
        cfg=_number("CFG", cfg, 0, CFG_MAX),
        top_k=_whole("top-k", top_k, 0, vocab),
        top_p=_number("top-p", top_p, 0, 1, low_open=True),
        smooth=bool(smooth) if isinstance(smooth, bool) else _choice("Gumbel smoothing", smooth, [True, False]),
    )
    offered = list(precisions) if precisions is not None else list(PRECISIONS)
    precision = _choice("Precision", precision, offered)
    mode = models.mvar_mode if kernel is None and refine_step is None else mvar_mode_for(
        models, kernel if kernel is not None else str(models.mvar_mode.kernel_size),
        refine_step if refine_step is not None else models.mvar_mode.refine_step)
    return Settings(class_name, models.class_names.index(class_name), check_seed(seed), sampling,
                    _whole("Images", num_images, 1, max_images), precision, mode)


def default_precision(models: LoadedModels, offered) -> str:
    """fp32 where bf16 gains nothing (small models; and it is exact and batch-invariant), else bf16."""
    if models.transformer.num_parameters < BF16_MIN_PARAMETERS or "bf16" not in offered:
        return "fp32"
    return "bf16"


def warm_up(models: LoadedModels, precision: str = "fp32") -> None:
    """One small generation in each mode, so that the first user's timings are not the allocator's and
    kernels' first-call costs (those made MVAR look slower than VAR on the first generation)."""
    if ("warm", precision) in models.cache:
        return
    tokenizer, mvar_transformer, var_transformer = models.in_precision(PRECISIONS[precision])
    sampling = SamplingConfig(cfg=1.5, top_k=0, top_p=1.0)
    models.cache[("warm", precision)] = True
    for transformer, mode in ((mvar_transformer, models.mvar_mode), (var_transformer, VAR_MODE)):
        for _ in generate_steps(transformer, tokenizer, [0], 0, sampling, mode, previews=True, preview_samples=1,
                                capture_layers=capture_layers_for(models)[:1], capture_queries={0: None},
                                capture_samples=[0], dtype=PRECISIONS[precision]):
            pass


def capture_layers_for(models: LoadedModels) -> tuple[int, ...]:
    """All layers when their VAR attention rows of one sample fit the budget, else evenly spaced ones."""
    cfg = models.transformer.cfg
    schedule = cfg.schedule
    per_layer = sum(schedule.tokens(s) * schedule.end(s) for s in range(schedule.num_scales)) * cfg.num_heads * 2
    count = max(1, min(cfg.depth, CAPTURE_BUDGET_BYTES // per_layer))
    return tuple(sorted({round(i * (cfg.depth - 1) / max(1, count - 1)) for i in range(count)}))


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """One model's side of a generation (MVAR or the VAR baseline)."""

    mode: AttentionMode
    f_hats: list[torch.Tensor] = field(default_factory=list)  # per scale (B, Cvae, h, w) fp32 on the CPU
    previews: dict[int, list[np.ndarray]] = field(default_factory=dict)  # sample -> per scale (H, W, 3) uint8
    finals: list[np.ndarray] = field(default_factory=list)  # every sample's final image
    seconds: list[float] = field(default_factory=list)  # per scale, the generation alone
    preview_seconds: list[float] = field(default_factory=list)
    capture_seconds: list[float] = field(default_factory=list)
    attention: dict[int, list[dict[int, torch.Tensor]]] = field(default_factory=dict)  # sample -> per scale:
    keys_begin: list[int] = field(default_factory=list)  # layer -> (H, nq, Nk) fp16


@dataclass
class GenerationRecord:
    model_key: str
    settings: Settings
    patch_nums: tuple[int, ...]
    captured_layers: tuple[int, ...]
    num_heads: int
    runs: dict[str, ModelRun]  # "MVAR", "VAR"
    labels: dict[str, str] = field(default_factory=dict)  # "MVAR"/"VAR" -> what the column shows
    shown_sample: int = 0  # the sample the page shows (0-based); kept here so late replies follow the latest pick

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def num_images(self) -> int:
        return self.settings.num_images

    @property
    def kernel_size(self) -> int:
        return self.settings.mvar_mode.kernel_size

    @property
    def refine_step(self) -> int:
        return self.settings.mvar_mode.refine_step

    @property
    def class_name(self) -> str:
        return self.settings.class_name

    @property
    def seed(self) -> int:
        return self.settings.seed


@dataclass
class Frame:
    """What the page shows after each scale of each model; ``record`` on the last frame."""

    mvar_image: np.ndarray | None
    var_image: np.ndarray | None
    scale: int  # 0-based, the latest scale of either model
    status: str
    record: GenerationRecord | None = None
    shown_scales: dict[str, str] = field(default_factory=dict)  # "MVAR"/"VAR" -> scale_name of its image


def load_models(registry: ModelRegistry, model_key, progress=None, device=None) -> LoadedModels:
    """The loaded models of an entry; an unknown key or a broken file is a UserError.

    ``progress(fraction, desc=...)`` (e.g. ``gr.Progress``) follows a hub download and the loading.
    ``device``: None = where the registry loads them; else they are moved there (see :func:`place_models`).
    """
    if not isinstance(model_key, str):
        raise UserError(f"Model must be one from the list, got {_shown(model_key)}")
    try:
        models = registry.load(model_key, progress=progress)
    except ValueError as err:
        raise UserError(str(err)) from None
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


def scale_name(scale: int, num_scales: int, side: int) -> str:
    """The page's one numbering: 1-based, with the grid: "scale 3 of 10 (3x3)"."""
    return f"scale {scale + 1} of {num_scales} ({side}x{side})"


def _milliseconds(values: list[float]) -> str:
    return f"{sum(values) * 1000:.0f} ms"


def timing_summary(runs: dict[str, ModelRun]) -> str:
    """Generation time of each model alone, then what the page's previews and attention capture added."""
    mvar, var = runs["MVAR"], runs["VAR"]
    return (f"generation alone: MVAR {_milliseconds(mvar.seconds)}, VAR {_milliseconds(var.seconds)}  |  "
            f"added by the page: previews {_milliseconds(mvar.preview_seconds + var.preview_seconds)}, "
            f"attention capture {_milliseconds(mvar.capture_seconds + var.capture_seconds)}")


def generate_frames(registry: ModelRegistry, model_key: str, class_name, seed, cfg, top_k, top_p, smooth,
                    num_images, precision, kernel=None, refine_step=None, max_images: int = MAX_IMAGES,
                    device=None, precisions=None) -> Iterator[Frame]:
    """Run MVAR and VAR scale by scale, alternating, and yield a frame after each scale of each.

    Every argument is checked before any work (the first frame): a refused request changes nothing.
    ``max_images`` bounds ``num_images`` (the server's limit); ``precisions`` the choices offered here.
    """
    models = load_models(registry, model_key, device=device)
    settings = parse_settings(models, class_name, seed, cfg, top_k, top_p, smooth, num_images, precision,
                              kernel, refine_step, max_images, precisions)
    return _frames(models, model_key, settings)


def _frames(models: LoadedModels, model_key: str, settings: Settings) -> Iterator[Frame]:
    layers = capture_layers_for(models)
    patch_nums = models.transformer.cfg.patch_nums
    num_scales = len(patch_nums)
    queries = dict.fromkeys(range(num_scales))  # every query of every scale
    tokenizer, mvar_transformer, var_transformer = models.in_precision(PRECISIONS[settings.precision])
    labels = [settings.label] * settings.num_images
    common = dict(previews=True, capture_layers=layers, capture_queries=queries, max_batch=settings.num_images,
                  preview_samples=1, capture_samples=[0], dtype=PRECISIONS[settings.precision])
    streams = {
        "MVAR": generate_steps(mvar_transformer, tokenizer, labels, settings.seed, settings.sampling,
                               settings.mvar_mode, **common),
        "VAR": generate_steps(var_transformer, tokenizer, labels, settings.seed, settings.sampling, VAR_MODE,
                              **common),
    }
    runs = {name: ModelRun(mode=settings.mvar_mode if name == "MVAR" else VAR_MODE, previews={0: []},
                           attention={0: []}) for name in streams}
    record = GenerationRecord(model_key, settings, patch_nums, layers, models.transformer.cfg.num_heads, runs,
                              {"MVAR": models.mvar_label, "VAR": models.var_label})
    latest = {"MVAR": None, "VAR": None}
    shown = {}  # the scale each image shows: MVAR runs a scale before VAR does
    for scale in range(num_scales):
        for name, stream in streams.items():
            step = next(stream)
            run = runs[name]
            image = to_uint8(step.preview)[0]
            run.previews[0].append(image)
            run.f_hats.append(step.f_hat.float().cpu())
            run.seconds.append(step.generation_seconds)
            run.preview_seconds.append(step.preview_seconds)
            run.capture_seconds.append(step.capture_seconds)
            run.attention[0].append({layer: w[0].half().cpu() for layer, w in (step.attention or {}).items()})
            run.keys_begin.append(step.attention_keys_begin)
            if scale == num_scales - 1:  # the page streams the first image; the others are decoded at the end
                rest = list(to_uint8(decode_to_unit(tokenizer, step.f_hat[1:]))) if settings.num_images > 1 else []
                run.finals = [image, *rest]
            latest[name] = image
            shown[name] = scale_name(scale, num_scales, step.side)
            status = (f"{scale_name(scale, num_scales, step.side)}  |  MVAR {_milliseconds(runs['MVAR'].seconds)}, "
                      f"VAR {_milliseconds(runs['VAR'].seconds)} (generation alone)")
            yield Frame(latest["MVAR"], latest["VAR"], scale, status, shown_scales=dict(shown))
    done = (f"done: {settings.num_images} image{'s' if settings.num_images > 1 else ''} of "
            f"{settings.class_name!r}, seed {settings.seed}"
            + (f" (samples use seeds {settings.seed}..{settings.seed + settings.num_images - 1})"
               if settings.num_images > 1 else "")
            + f", {settings.precision}  |  {timing_summary(runs)}")
    yield Frame(latest["MVAR"], latest["VAR"], num_scales - 1, done, record, dict(shown))


def random_seed() -> int:
    return random.randrange(0, 2**31 - 1)


def _record(record) -> GenerationRecord:
    if not isinstance(record, GenerationRecord):
        raise UserError("generate an image first")
    return record


def check_scale(record: GenerationRecord, scale) -> int:
    """The page's 1-based Scale widget -> a 0-based scale index."""
    return _whole("Scale", scale, 1, _record(record).num_scales) - 1


def check_sample(record: GenerationRecord, sample) -> int:
    """The page's 1-based sample number -> a 0-based index."""
    return _whole("Sample", sample, 1, _record(record).num_images) - 1


def decode_sample_previews(models: LoadedModels, record: GenerationRecord, sample: int) -> dict[str, list]:
    """One sample's per-scale previews, decoded from the stored maps (cheap at the small scales)."""
    sample = check_sample(record, sample + 1)
    tokenizer = models.tokenizer
    device = tokenizer.quant_conv.weight.device
    out = {}
    with torch.no_grad():
        for name, run in record.runs.items():
            out[name] = run.previews.get(sample) or [
                to_uint8(decode_preview(tokenizer, f_hat[sample : sample + 1].to(device), side))[0]
                for f_hat, side in zip(run.f_hats, record.patch_nums, strict=True)]
    return out


def scale_view(record: GenerationRecord | None, scale, sample=1) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The stored previews of one scale of one sample, for the slider: no recomputation."""
    if record is None:
        return None, None
    scale, sample = check_scale(record, scale), check_sample(record, sample)
    runs = record.runs
    if sample not in runs["MVAR"].previews:
        raise UserError(f"sample {sample + 1} is not decoded yet: pick it in the gallery")
    return runs["MVAR"].previews[sample][scale], runs["VAR"].previews[sample][scale]


@dataclass
class Filmstrip:
    """One model's previews of one sample, scale by scale, with the frame labels and the current scale."""

    frames: list[np.ndarray]
    labels: list[str]
    current: int


def filmstrips(record: GenerationRecord | None, scale=None, sample=1) -> tuple[Filmstrip | None, Filmstrip | None]:
    if record is None:
        return None, None
    record = _record(record)
    current = record.num_scales - 1 if scale is None else check_scale(record, scale)
    sample = check_sample(record, sample)
    names = [f"{s + 1}: {p}x{p}" for s, p in enumerate(record.patch_nums)]
    runs = record.runs
    return tuple(Filmstrip(runs[n].previews[sample], names, current) for n in ("MVAR", "VAR"))


def final_images(record: GenerationRecord | None) -> dict[str, list[np.ndarray]]:
    """Every sample's final image per model, for the galleries and downloads."""
    if record is None:
        return {"MVAR": [], "VAR": []}
    return {name: list(run.finals) for name, run in _record(record).runs.items()}


def download_name(record: GenerationRecord, model: str, sample: int) -> str:
    safe_class = "".join(ch if ch.isalnum() else "-" for ch in record.class_name)
    return f"{model.lower()}-{safe_class}-seed{record.seed + sample}.png"


# ---------------------------------------------------------------------------------------------
# Attention of the selected sample
# ---------------------------------------------------------------------------------------------


def capture_sample_attention(models: LoadedModels, record: GenerationRecord, sample: int) -> dict[str, list]:
    """One sample's attention, captured by running its batch again with the capture on that sample alone.

    The same batch, settings and precision give the same tokens, so the weights belong to the images
    shown; only the captured rows differ."""
    sample = check_sample(record, sample + 1)
    runs = record.runs
    if sample in runs["MVAR"].attention:
        return {name: run.attention[sample] for name, run in runs.items()}
    settings = record.settings
    tokenizer, mvar_transformer, var_transformer = models.in_precision(PRECISIONS[settings.precision])
    queries = dict.fromkeys(range(record.num_scales))
    out = {}
    for name, transformer in (("MVAR", mvar_transformer), ("VAR", var_transformer)):
        steps = generate_steps(transformer, tokenizer, [settings.label] * settings.num_images, settings.seed,
                               settings.sampling, runs[name].mode, dtype=PRECISIONS[settings.precision],
                               capture_layers=record.captured_layers, capture_queries=queries,
                               capture_samples=[sample], max_batch=settings.num_images)
        out[name] = [{layer: w[0].half().cpu() for layer, w in step.attention.items()} for step in steps]
    return out


# ---------------------------------------------------------------------------------------------
# The ablation: VAR, + scale-Markov, full MVAR on the same weights
# ---------------------------------------------------------------------------------------------


@dataclass
class Ablation:
    """Sample 1 of a request under the three attentions: previews per scale, time and the cost model."""

    settings: Settings
    previews: dict[str, list[np.ndarray]]  # "VAR", "+ scale-Markov", "full MVAR" -> per scale
    seconds: dict[str, float]  # the generation alone
    costs: dict[str, dict[str, float]]  # -> GFLOPs, attention GFLOPs, KV cache MiB, peak MiB (analytic)
    patch_nums: tuple[int, ...]


def ablation_modes(settings: Settings, num_scales: int) -> dict[str, AttentionMode]:
    full = settings.mvar_mode
    return {"VAR": VAR_MODE,
            "+ scale-Markov": AttentionMode.mvar(refine_step=num_scales, kernel_size=full.kernel_size),
            "full MVAR": full}


def ablation(models: LoadedModels, settings: Settings) -> Ablation:
    """Run sample 1 of ``settings`` (its class, seed, sampling, precision) in each of the three modes."""
    if not isinstance(settings, Settings):
        raise UserError("generate first: the ablation uses the class, seed and settings of the page")
    cfg = models.transformer.cfg
    tokenizer, transformer, _ = models.in_precision(PRECISIONS[settings.precision])
    dtype = PRECISIONS[settings.precision]
    previews, seconds, costs = {}, {}, {}
    for name, mode in ablation_modes(settings, len(cfg.patch_nums)).items():
        steps = list(generate_steps(transformer, tokenizer, [settings.label], settings.seed, settings.sampling, mode,
                                    previews=True, dtype=dtype))
        previews[name] = [to_uint8(step.preview)[0] for step in steps]
        seconds[name] = sum(step.generation_seconds for step in steps)
        cost = generation_cost(cfg, mode, 1, settings.sampling.cfg > 0, settings.precision)
        costs[name] = {"GFLOPs": cost.flops / 1e9, "attention GFLOPs": cost.attention_flops / 1e9,
                       "KV cache MiB": cost.kv_cache_bytes / 2**20,
                       "peak MiB": (cost.kv_cache_bytes + cost.peak_activation_bytes) / 2**20}
    return Ablation(settings, previews, seconds, costs, cfg.patch_nums)


def ablation_table(result: Ablation) -> str:
    """The ablation's cost figures as a Markdown table (the cost model; time measured here)."""
    rows = ["| | generation (measured) | GFLOPs | attention GFLOPs | KV cache MiB | peak MiB above weights |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, cost in result.costs.items():
        rows.append(f"| {name} | {result.seconds[name] * 1000:.0f} ms | {cost['GFLOPs']:.3g} | "
                    f"{cost['attention GFLOPs']:.3g} | {cost['KV cache MiB']:.3g} | {cost['peak MiB']:.3g} |")
    mode = result.settings.mvar_mode
    windows = (f"k = {mode.kernel_size} from scale {mode.refine_step + 1} on" if mode.refine_step <
               len(result.patch_nums) else "no windows")
    return ("\n".join(rows) + f"\n\nOne image, {result.settings.precision}, CFG "
            f"{'on (two branches)' if result.settings.sampling.cfg > 0 else 'off'}; full MVAR: {windows}. "
            "FLOPs and memory from the cost model (`mvar/costs.py`).")


def _is_mean(choice) -> bool:
    return isinstance(choice, str) and choice == "mean"


def _check_layer(record: GenerationRecord, layer) -> int | str:
    """"mean" or one of the captured layers (the dropdown sends them as strings)."""
    if _is_mean(layer):
        return layer
    value = _integral(layer)
    if checks.is_integer(value) and value in record.captured_layers:
        return int(value)
    raise UserError(f"Layer must be 'mean' or one of the captured layers {list(record.captured_layers)}, "
                    f"got {_shown(layer)}")


def _check_head(record: GenerationRecord, head) -> int | str:
    if _is_mean(head):
        return head
    value = _integral(head)
    if checks.is_integer(value) and 0 <= value < record.num_heads:
        return int(value)
    raise UserError(f"Head must be 'mean' or a whole number from 0 to {record.num_heads - 1}, got {_shown(head)}")


def _weights(captured: dict[int, torch.Tensor], layer, head, query: int) -> torch.Tensor:
    """(Nk,) fp32 weights of one query, layer (or "mean") and head (or "mean")."""
    if not captured:
        raise UserError("no attention was captured for this generation")
    if layer == "mean":
        rows = torch.stack([w[:, query].float() for w in captured.values()]).mean(0)  # (H, Nk)
    else:
        rows = captured[layer][:, query].float()
    return rows.mean(0) if head == "mean" else rows[head]


def move_token(row: int, col: int, old_side: int, new_side: int) -> tuple[int, int]:
    """The token at the same relative position on another grid (the centre of the old cell)."""
    def place(i: int) -> int:
        return min(new_side - 1, int((i + 0.5) * new_side / old_side))

    return place(row), place(col)


def token_after_scale_change(record: GenerationRecord, old_scale: int | None, new_scale: int, row, col):
    """(row, col, moved): the token boxes' values carried to ``new_scale`` (0-based) when they referred to
    ``old_scale``; unchanged (and checked later) when the scale is the same or the boxes hold no numbers."""
    row_value, col_value = _integral(row), _integral(col)
    if old_scale is None or old_scale == new_scale or not (checks.is_integer(row_value)
                                                         and checks.is_integer(col_value)):
        return row, col, False
    old_side = record.patch_nums[old_scale]
    row, col = move_token(min(max(int(row_value), 0), old_side - 1), min(max(int(col_value), 0), old_side - 1),
                          old_side, record.patch_nums[new_scale])
    return row, col, True


def check_token(record: GenerationRecord, scale: int, row, col) -> tuple[int, int]:
    side = record.patch_nums[scale]
    return (_whole("Token row", row, 0, side - 1), _whole("Token column", col, 0, side - 1))


@dataclass
class AttentionView:
    """Everything the attention tab shows for one token, as data."""

    scale: int
    side: int
    token: tuple[int, int]
    sample: int
    layer: int | str
    head: int | str
    mvar_grid: np.ndarray  # (side, side): the MVAR query's weights on its own grid
    mvar_preview: np.ndarray  # the sample's MVAR preview at this scale
    window: tuple[int, int, int, int] | None  # (row0, col0, rows, cols) of the k x k window, if windowed
    var_grids: list[np.ndarray]  # per key scale 0..scale: the VAR query's weights on that grid
    var_mass: np.ndarray  # (scale + 1,): VAR's attention mass per key scale
    position: int  # the query's flat position (for the masks' highlighted row)
    patch_nums: tuple[int, ...]
    refine_step: int
    kernel_size: int
    caption: str


def attention_view(record: GenerationRecord | None, scale, layer, head, row, col, sample=1) -> AttentionView:
    record = _record(record)
    scale, sample = check_scale(record, scale), check_sample(record, sample)
    layer, head = _check_layer(record, layer), _check_head(record, head)
    row, col = check_token(record, scale, row, col)
    mvar_run, var_run = record.runs["MVAR"], record.runs["VAR"]
    if sample not in mvar_run.attention or sample not in mvar_run.previews:
        raise UserError(f"sample {sample + 1} is not ready yet: pick it in the gallery")
    side = record.patch_nums[scale]
    query = row * side + col
    schedule = ScaleSchedule(record.patch_nums)
    mvar_rows = _weights(mvar_run.attention[sample][scale], layer, head, query)
    grid = scale_grid(mvar_rows, schedule, scale, keys_begin=mvar_run.keys_begin[scale]).numpy()
    windowed = mvar_run.mode.is_windowed(scale)
    box = window_box(side, row, col, record.kernel_size) if windowed else None
    var_rows = _weights(var_run.attention[sample][scale], layer, head, query)
    mass = mass_per_key_scale(var_rows, schedule)[: scale + 1].numpy()
    where = (f"its {record.kernel_size}x{record.kernel_size} window, rows {box[0]}..{box[0] + box[2] - 1}, "
             f"columns {box[1]}..{box[1] + box[3] - 1}" if box else
             f"the whole {side}x{side} grid (no window before scale {record.refine_step + 1})")
    caption = (f"Token ({row}, {col}) of {scale_name(scale, record.num_scales, side)}, sample {sample + 1}, "
               f"layer {layer}, head {head}. MVAR attends only within its scale, to {where}. VAR puts "
               f"{mass[scale]:.0%} of its attention on its own scale"
               + (f" and {mass[scale - 1]:.0%} on the previous one." if scale else "."))
    return AttentionView(scale, side, (row, col), sample, layer, head, grid, mvar_run.previews[sample][scale], box,
                         [scale_grid(var_rows, schedule, s).numpy() for s in range(scale + 1)], mass,
                         schedule.begin(scale) + query, record.patch_nums, record.refine_step, record.kernel_size,
                         caption)


def token_from_click(record: GenerationRecord | None, scale, x, y, displayed_width, displayed_height=None):
    """A click at pixel (x, y) on an image of the current scale -> the token (row, col) under it.

    A click just outside the image (its border) counts as the nearest token."""
    record = _record(record)
    scale = check_scale(record, scale)
    width = _whole("displayed image width", displayed_width, 1, MAX_DISPLAYED_SIZE)
    height = width if displayed_height is None else _whole("displayed image height", displayed_height, 1,
                                                           MAX_DISPLAYED_SIZE)
    x = min(max(_number("click x", x, -1e9, 1e9), 0.0), width - 1.0)
    y = min(max(_number("click y", y, -1e9, 1e9), 0.0), height - 1.0)
    side = record.patch_nums[scale]
    return min(side - 1, int(y * side / height)), min(side - 1, int(x * side / width))


# ---------------------------------------------------------------------------------------------
# Analysis (VAR mode, several samples)
# ---------------------------------------------------------------------------------------------


def attention_statistics(models: LoadedModels, samples: int = 4, seed: int = 0, progress=None) -> AttentionStats:
    """Run the loaded model in VAR mode on a few samples and gather the paper's panel a / b statistics.

    Cached per loaded model and sample count.
    """
    samples = _whole("Samples", samples, 1, MAX_ANALYSIS_SAMPLES)
    seed = check_seed(seed)
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


def analysis_conclusion(stats: AttentionStats, kernel_size: int) -> str:
    """The analysis in words: where VAR's attention goes, and what MVAR's window keeps of it."""
    by_distance = stats.mass_by_distance
    sizes = list(stats.window_sizes)
    inside = stats.mass_in_window
    own = float(by_distance[0])
    previous = float(by_distance[1]) if len(by_distance) > 1 else 0.0
    if kernel_size in sizes:
        kept = float(inside[sizes.index(kernel_size)])
    else:
        kept = float(np.interp(kernel_size, sizes, inside))
    return (f"In this model, run with VAR's attention, a token puts {own:.0%} of its attention on its own scale "
            f"and {previous:.0%} on the previous one: {own + previous:.0%} on the two scales MVAR's scale-Markov "
            f"input keeps. Within its own scale, a {kernel_size}x{kernel_size} window (MVAR's k) captures "
            f"{kept:.0%} of that attention.")


# ---------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------


def per_scale_costs(models: LoadedModels, record: GenerationRecord | None, batch: int = 1, dtype="fp32",
                    mvar_mode: AttentionMode | None = None) -> dict:
    """KV-cache bytes, attention FLOPs (analytic) and latency (measured, the generation alone) per scale.

    With a record the analytic figures use its batch, precision and MVAR settings, so they describe
    what was run; without one, ``batch`` and ``dtype``."""
    if record is not None:
        record = _record(record)
        batch, dtype, mvar_mode = record.num_images, record.settings.precision, record.settings.mvar_mode
    batch = _whole("batch", batch, 1, MAX_COST_BATCH)
    try:
        dtype_bytes(dtype)
    except ValueError as err:
        raise UserError(str(err)) from None
    cfg = models.transformer.cfg
    mvar_mode = mvar_mode or models.mvar_mode
    var = generation_cost(cfg, VAR_MODE, batch, True, dtype)
    mvar = generation_cost(cfg, mvar_mode, batch, True, dtype)
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


# ---------------------------------------------------------------------------------------------
# Memory against VAR
# ---------------------------------------------------------------------------------------------

ANALYTIC_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def analytic_memory_mib(cfg, mode: AttentionMode, batches=ANALYTIC_BATCHES, dtype="fp32") -> dict[int, float]:
    """KV cache + largest activation set (MiB) per batch: the part a measurement above the loaded weights sees."""
    batches = _batch_sizes(batches, MAX_COST_BATCH)
    try:
        dtype_bytes(dtype)
    except ValueError as err:
        raise UserError(str(err)) from None
    out = {}
    for batch in batches:
        cost = generation_cost(cfg, mode, batch, True, dtype)
        out[batch] = (cost.kv_cache_bytes + cost.peak_activation_bytes) / 2**20
    return out


def _batch_sizes(batches, limit: int, count: int | None = None) -> list[int]:
    """Distinct batch sizes in 1..limit (at most ``count`` of them), in the order given."""
    if isinstance(batches, str | bytes) or not hasattr(batches, "__iter__"):
        raise UserError(f"Batch sizes must be a list of whole numbers from 1 to {limit}, got {_shown(batches)}")
    chosen = list(dict.fromkeys(_whole("Batch size", b, 1, limit) for b in batches))
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
    _choice("Precision", dtype, list(autocast_precisions(device)))
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
