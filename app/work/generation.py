"""Generation as the page streams it: MVAR and the VAR baseline on the same class and seeds, one scale of
each in turn, a :class:`Frame` after each, and at the end a :class:`GenerationRecord` holding what the views
need later: every sample's accumulated map after every scale (so any sample's previews can be decoded
later, cheaply), the final images, the timings, and the captured attention of the sample shown. Stepping
through scales, picking a sample or clicking a token never regenerates the images.

What these functions return holds numpy images and CPU tensors only, so it can cross a process boundary
(ZeroGPU, see ``app/zerogpu.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from mvar.config import VAR_MODE, AttentionMode
from mvar.devices import dtype_of
from mvar.previews import decode_previews
from mvar.sampling import generate_steps
from mvar.tokenizer import to_uint8

from ..registry import LoadedModels
from .models import capture_layers_for
from .settings import Settings, UserError, Whole, scale_field


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
    shown_scale: int | None = None  # the scale the page shows (0-based; None: the last)

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

    def scale(self, value) -> int:
        """The page's 1-based Scale -> a 0-based scale index, or a UserError in the slider's words."""
        return scale_field(self.num_scales).parse(value) - 1

    def sample(self, value) -> int:
        """The page's 1-based sample number -> a 0-based index."""
        return Whole("Sample", 1, self.num_images).parse(value) - 1


@dataclass
class Frame:
    """What the page shows after each scale of each model; ``record`` on the last frame."""

    mvar_image: np.ndarray | None
    var_image: np.ndarray | None
    scale: int  # 0-based, the latest scale of either model
    status: str
    record: GenerationRecord | None = None
    shown_scales: dict[str, str] = field(default_factory=dict)  # "MVAR"/"VAR" -> scale_name of its image


def scale_name(scale: int, num_scales: int, side: int) -> str:
    """The page's one numbering: 1-based, with the grid: "scale 3 of 10 (3x3)"."""
    return f"scale {scale + 1} of {num_scales} ({side}x{side})"


def milliseconds(values: list[float]) -> str:
    return f"{sum(values) * 1000:.0f} ms"


def timing_summary(runs: dict[str, ModelRun]) -> str:
    """Generation time of each model alone, then what the page's previews and attention capture added."""
    mvar, var = runs["MVAR"], runs["VAR"]
    return (f"generation alone: MVAR {milliseconds(mvar.seconds)}, VAR {milliseconds(var.seconds)}  |  "
            f"added by the page: previews {milliseconds(mvar.preview_seconds + var.preview_seconds)}, "
            f"attention capture {milliseconds(mvar.capture_seconds + var.capture_seconds)}")


def done_status(record: GenerationRecord) -> str:
    settings = record.settings
    count = settings.num_images
    seeds = f" (samples use seeds {settings.seed}..{settings.seed + count - 1})" if count > 1 else ""
    return (f"done: {count} image{'s' if count > 1 else ''} of {settings.class_name!r}, seed {settings.seed}{seeds}; "
            f"{settings.sampling_text()}; MVAR: {settings.windows_text(record.num_scales)}  |  "
            f"{timing_summary(record.runs)}")


def generate_frames(models: LoadedModels, model_key: str, settings: Settings) -> Iterator[Frame]:
    """Run MVAR and VAR scale by scale, alternating, and yield a frame after each scale of each."""
    if not isinstance(settings, Settings):
        raise UserError("the generation's settings were not checked: press Generate again")
    layers = capture_layers_for(models)
    patch_nums = models.transformer.cfg.patch_nums
    num_scales = len(patch_nums)
    dtype = dtype_of(settings.precision)
    tokenizer, mvar_transformer, var_transformer = models.in_precision(dtype)
    labels = [settings.label] * settings.num_images
    common = dict(previews=True, capture_layers=layers, capture_queries=dict.fromkeys(range(num_scales)),
                  max_batch=settings.num_images, preview_samples=1, capture_samples=[0], dtype=dtype)
    streams = {"MVAR": generate_steps(mvar_transformer, tokenizer, labels, settings.seed, settings.sampling,
                                      settings.mvar_mode, **common),
               "VAR": generate_steps(var_transformer, tokenizer, labels, settings.seed, settings.sampling, VAR_MODE,
                                     **common)}
    runs = {name: ModelRun(mode=settings.mvar_mode if name == "MVAR" else VAR_MODE, previews={0: []},
                           attention={0: []}) for name in streams}
    record = GenerationRecord(model_key, settings, patch_nums, layers, models.transformer.cfg.num_heads, runs,
                              {"MVAR": models.mvar_label, "VAR": models.var_label})
    latest, shown = {"MVAR": None, "VAR": None}, {}  # MVAR runs a scale before VAR does
    for scale in range(num_scales):
        for name, stream in streams.items():
            latest[name] = _keep_step(runs[name], next(stream), tokenizer, dtype, scale == num_scales - 1)
            shown[name] = scale_name(scale, num_scales, patch_nums[scale])
            status = (f"{shown[name]}  |  MVAR {milliseconds(runs['MVAR'].seconds)}, "
                      f"VAR {milliseconds(runs['VAR'].seconds)} (generation alone)")
            yield Frame(latest["MVAR"], latest["VAR"], scale, status, shown_scales=dict(shown))
    yield Frame(latest["MVAR"], latest["VAR"], num_scales - 1, done_status(record), record, dict(shown))


def _keep_step(run: ModelRun, step, tokenizer, dtype, last: bool) -> np.ndarray:
    """Keep what one scale of one model produced; returns its preview of the sample shown."""
    image = to_uint8(step.preview)[0]
    run.previews[0].append(image)
    run.f_hats.append(step.f_hat.float().cpu())
    run.seconds.append(step.generation_seconds)
    run.preview_seconds.append(step.preview_seconds)
    run.capture_seconds.append(step.capture_seconds)
    run.attention[0].append({layer: w[0].half().cpu() for layer, w in (step.attention or {}).items()})
    run.keys_begin.append(step.attention_keys_begin)
    if last:  # the page streams the first image; the others are decoded at the end, as the stream decodes
        rest = list(to_uint8(decode_previews(tokenizer, step.f_hat[1:], dtype))) if step.f_hat.shape[0] > 1 else []
        run.finals = [image, *rest]
    return image


def record_of(record) -> GenerationRecord:
    if not isinstance(record, GenerationRecord):
        raise UserError("generate an image first")
    return record


def sample_previews(models: LoadedModels, record: GenerationRecord, sample: int) -> dict[str, list]:
    """One sample's (0-based) per-scale previews, decoded from the stored maps as the stream decodes them
    (``mvar.previews.decode_previews``, in the generation's precision)."""
    dtype = dtype_of(record.settings.precision)
    tokenizer = models.in_precision(dtype)[0]
    device = tokenizer.quant_conv.weight.device
    return {name: run.previews.get(sample) or [
        to_uint8(decode_previews(tokenizer, f_hat[sample : sample + 1].to(device), dtype))[0] for f_hat in run.f_hats]
        for name, run in record.runs.items()}


def sample_attention(models: LoadedModels, record: GenerationRecord, sample: int) -> dict[str, list]:
    """One sample's (0-based) attention, captured by running its batch again with the capture on that sample.

    The same batch, settings and precision give the same tokens, so the weights belong to the images
    shown; only the captured rows differ."""
    runs = record.runs
    if sample in runs["MVAR"].attention:
        return {name: run.attention[sample] for name, run in runs.items()}
    settings = record.settings
    dtype = dtype_of(settings.precision)
    tokenizer, mvar_transformer, var_transformer = models.in_precision(dtype)
    queries = dict.fromkeys(range(record.num_scales))
    out = {}
    for name, transformer in (("MVAR", mvar_transformer), ("VAR", var_transformer)):
        steps = generate_steps(transformer, tokenizer, [settings.label] * settings.num_images, settings.seed,
                               settings.sampling, runs[name].mode, dtype=dtype,
                               capture_layers=record.captured_layers, capture_queries=queries,
                               capture_samples=[sample], max_batch=settings.num_images)
        out[name] = [{layer: w[0].half().cpu() for layer, w in step.attention.items()} for step in steps]
    return out
