"""The Edit tab's model work: plain values in, data out (images, masks, records, text); no Gradio.

An edit starts from a **source image**: one of the dataset samples (``app/dataset_samples.py``), or an upload
of any size, aspect ratio or mode (``mvar.editing.prepare_image`` fits it to the model and says what it
did). The mask is painted on it in the page's image editor: the painted layers' alpha, any colour
(white paint = regenerate), or one of the presets (centre, border = out-painting, everything =
variations with *Keep the first N scales*). The edit then runs like a generation, MVAR and the VAR
baseline side by side on the same input, one scale of each in turn, and is kept in an
:class:`EditRecord` (per-scale previews and the final images), so the Scale slider re-shows it
without recomputing.

Bad input is a :class:`~app.work.settings.UserError` in the widgets' words: no image yet, a file that is
not an image or is over the upload limit, an empty or too small mask ("nothing to edit").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mvar.config import VAR_MODE
from mvar.devices import DTYPES, dtype_of
from mvar.editing import (
    blend,
    edit_steps,
    image_pyramid,
    open_image,
    outpaint_mask,
    plan_edit,
    prepare_image,
    prepare_mask,
    token_masks,
)
from mvar.sampling import SamplingConfig
from mvar.tokenizer import decode_to_unit, to_uint8

from ..dataset_samples import SHIPPED, DatasetSamples
from ..registry import LoadedModels
from .generation import ModelRun, milliseconds, scale_name
from .settings import SEED, Choice, UserError, Whole, default_precision, flag, scale_field

MAX_UPLOAD_BYTES = 20 * 2**20  # an uploaded image larger than this is refused
NO_IMAGE = "load an image first: pick a dataset sample or upload an image"
BOTH = "MVAR and VAR side by side"
MODE_CHOICES = {BOTH: ("MVAR", "VAR"), "MVAR only": ("MVAR",), "VAR only": ("VAR",)}
PRESETS = ("centre", "border", "everything", "clear")
BOX = Whole("Preset box side", 20, 80)  # the centre box's side, in % of the image


class NothingToEdit(UserError):
    """The mask selects no token that the edit would sample: the result would be the image itself."""


# ---------------------------------------------------------------------------------------------
# The source image
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (Gradio hashes State values; arrays are not)
class SourceImage:
    """What the tab edits: the model's input and where it came from."""

    pixels: np.ndarray  # (S, S, 3) uint8: exactly what the model encodes
    origin: str  # "dataset sample heart 2 (Fluent Flat): the grey heart emoji, <credit>" or the file's name
    note: str  # what was done to fit the model ("" when nothing)
    class_name: str | None = None  # the class of a dataset sample

    @property
    def size(self) -> int:
        return self.pixels.shape[0]

    def describe(self) -> str:
        fitted = f": {self.note}." if self.note else f": {self.size}x{self.size}, used as it is."
        return f"**Image:** {markdown_text(self.origin)}{fitted}"


def markdown_text(text: str) -> str:
    """Text (a file name) shown literally in Markdown: its emphasis, link and heading characters escaped."""
    return "".join("\\" + ch if ch in "\\`*_[]<>#|~" else ch for ch in text)


def _prepared(image: Image.Image, size: int, origin: str, class_name: str | None = None) -> SourceImage:
    prepared = prepare_image(image, size)
    pixels = to_uint8(prepared.pixels[None])[0]
    return SourceImage(pixels, origin, prepared.note, class_name)


def dataset_image(name, size: int, samples: DatasetSamples = SHIPPED) -> SourceImage:
    """The dataset sample of this name ("heart 2 (Fluent Flat)"), fitted to the model (``size`` px)."""
    name = Choice("Dataset sample", tuple(samples.names())).parse(name)
    sample = samples.sample(name)
    return _prepared(Image.fromarray(samples.image(sample)), size, sample.describe(), sample.class_name)


def _file_size(count: int) -> str:
    return f"{count / 2**20:.1f} MB" if count >= 2**20 else f"{count / 2**10:.1f} KB"


def uploaded_image(path, size: int, max_bytes: int = MAX_UPLOAD_BYTES) -> SourceImage:
    """An uploaded file (the path Gradio stored it under, named as the user's file), fitted to the model.

    Refused with a message naming the file: over ``max_bytes``, not an image, too many pixels."""
    if path is None or (isinstance(path, str) and not path.strip()):
        raise UserError("no file was uploaded: pick an image file")
    path = Path(str(path))
    name = path.name
    if not path.is_file():
        raise UserError(f"{name}: the upload did not arrive; upload it again")
    if (count := path.stat().st_size) > max_bytes:
        raise UserError(f"{name} is {_file_size(count)}, over the upload limit of {_file_size(max_bytes)}: "
                        "upload a smaller image")
    try:
        image = open_image(path)
    except ValueError as err:
        raise UserError(str(err).replace(str(path), name)) from None
    return _prepared(image, size, name)


def refit(source: SourceImage, size: int) -> SourceImage:
    """The source for a model of another image size (the model was changed after the image was loaded)."""
    if source.size == size:
        return source
    prepared = prepare_image(Image.fromarray(source.pixels), size)
    note = "; ".join(n for n in (source.note, prepared.note) if n)
    return SourceImage(to_uint8(prepared.pixels[None])[0], source.origin, note, source.class_name)


def source_class(models: LoadedModels, source: SourceImage | None) -> str | None:
    """The class of a dataset sample, if this model has it (the default models do)."""
    if source is None or source.class_name not in models.class_names:
        return None
    return source.class_name


# ---------------------------------------------------------------------------------------------
# The mask
# ---------------------------------------------------------------------------------------------


def _box(size: int, percent) -> tuple[int, int, int, int]:
    percent = BOX.parse(percent)
    side = max(1, round(size * percent / 100))
    start = (size - side) // 2
    return start, start, start + side, start + side


def preset_mask(kind: str, size: int, percent=50) -> np.ndarray:
    """A preset mask (True = regenerate) at the model's ``size``: the centre box, the border around it
    (out-painting: the centre box is kept, ``mvar.editing.outpaint_mask``), everything, or nothing."""
    kind = Choice("preset", PRESETS).parse(kind)
    if kind == "everything":
        return np.ones((size, size), bool)
    if kind == "clear":
        return np.zeros((size, size), bool)
    border = outpaint_mask(size, _box(size, percent)).numpy()
    return border if kind == "border" else ~border


def _alpha(layer) -> np.ndarray:
    if isinstance(layer, Image.Image):
        return np.asarray(layer.convert("RGBA"))[..., 3]
    array = np.asarray(layer)
    if array.ndim == 3 and array.shape[2] == 4:
        return array[..., 3]
    raise UserError("the mask painter sent a layer without transparency: paint the region again")


def painted_mask(value, size: int) -> np.ndarray:
    """The editor's value -> the mask (size, size) bool, True = regenerate: everything painted on any of its
    layers (alpha above zero, whatever the colour), area-downsampled to the model's pixels."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise UserError("the mask painter sent something that is not its usual value: reload the page")
    layers = value.get("layers") or []
    if not layers:
        return np.zeros((size, size), bool)
    alphas = [_alpha(layer) for layer in layers]
    shape = alphas[0].shape
    if any(a.shape != shape for a in alphas):
        raise UserError("the painted layers differ in size: clear the mask and paint it again")
    painted = np.logical_or.reduce([a > 0 for a in alphas]).astype(np.float32)
    return prepare_mask(painted, size).numpy()


# ---------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EditRequest:
    """An edit, checked: plain values (it crosses to a ZeroGPU worker)."""

    source: SourceImage
    mask: np.ndarray  # (S, S) bool, True = regenerate
    class_name: str
    label: int
    seed: int
    models: tuple[str, ...]  # "MVAR", "VAR": which run
    keep_scales: int
    final_blend: bool
    regenerated: tuple[int, ...]  # tokens sampled per scale
    note: str  # "" or what kind of edit this is (plain generation, variation)


def keep_field(num_scales: int) -> Whole:
    return Whole("Keep the first N scales", 0, num_scales - 1)


def parse_edit(models: LoadedModels, source, editor, class_name, seed, mode, keep_scales,
               final_blend) -> EditRequest:
    """Widget values -> an EditRequest, or a UserError (NothingToEdit for an empty or too small mask)."""
    if not isinstance(source, SourceImage):
        raise UserError(NO_IMAGE)
    size = models.tokenizer.cfg.image_size
    source = refit(source, size)
    class_name = Choice("Class", tuple(models.class_names)).parse(class_name)
    seed = SEED.parse(seed)
    mode = Choice("Models", tuple(MODE_CHOICES)).parse(mode)
    patch_nums = models.transformer.cfg.patch_nums
    keep_scales = keep_field(len(patch_nums)).parse(keep_scales)
    final_blend = flag("Final blend", final_blend)
    mask = painted_mask(editor, size)
    if not mask.any():
        raise NothingToEdit("nothing to edit: the mask is empty. Paint the region to regenerate in white, or "
                            "press a preset (centre, border, everything)")
    regenerated = tuple(int(r.sum()) if s >= keep_scales else 0
                        for s, r in enumerate(token_masks(torch.from_numpy(mask), patch_nums)))
    if not any(regenerated):
        raise NothingToEdit("nothing to edit: the painted region covers less than half of every token "
                            f"(the last scale's tokens are {size // patch_nums[-1]} px wide): paint a larger region")
    note = ""
    if mask.all():
        note = (f"The mask covers the whole image and no scale is kept: this is plain generation of {class_name!r}, "
                "nothing of the image is used." if keep_scales == 0 else
                f"A variation: the image's first {keep_scales} scale{'s' if keep_scales > 1 else ''} kept, "
                "the rest regenerated.")
    return EditRequest(source, mask, class_name, models.class_names.index(class_name), seed, MODE_CHOICES[mode],
                       keep_scales, final_blend, regenerated, note)


# ---------------------------------------------------------------------------------------------
# Running an edit
# ---------------------------------------------------------------------------------------------


@dataclass
class EditRecord:
    """An edit kept for the Scale slider and the filmstrips: per model, the previews and the final image."""

    model_key: str
    request: EditRequest
    patch_nums: tuple[int, ...]
    runs: dict[str, ModelRun]  # the models that ran: "MVAR", "VAR"
    labels: dict[str, str] = field(default_factory=dict)  # what each column runs
    precision: str = "fp32"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    shown_scale: int | None = None  # the scale the page shows (0-based; None: the last)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def final(self, name: str) -> np.ndarray | None:
        run = self.runs.get(name)
        return run.finals[0] if run and run.finals else None

    def scale(self, value) -> int:
        """The tab's 1-based Scale -> a 0-based scale index, or a UserError in the slider's words."""
        return scale_field(self.num_scales).parse(value) - 1

    def images(self, scale: int) -> dict[str, np.ndarray]:
        """Each model's stored image at a scale (0-based; the final image, blended if asked, at the last)."""
        last = scale == self.num_scales - 1
        return {name: self.final(name) if last else run.previews[0][scale] for name, run in self.runs.items()}


@dataclass
class EditFrame:
    """What the page shows after each scale of each model; ``record`` on the last frame."""

    images: dict[str, np.ndarray]  # "MVAR"/"VAR" -> the latest preview of each model that runs
    scale: int  # 0-based
    status: str
    record: EditRecord | None = None


def edit_sampling(models: LoadedModels) -> SamplingConfig:
    """The edit samples with the model's own defaults (CFG, top-k, top-p), as the page's first generation."""
    return SamplingConfig(**{k: models.sampling[k] for k in ("cfg", "top_k", "top_p")})


def _tokens_line(request: EditRequest, scale: int, side: int) -> str:
    return f"{request.regenerated[scale]} of {side * side} tokens sampled"


def edit_frames(models: LoadedModels, model_key: str, request: EditRequest, precisions=None) -> Iterator[EditFrame]:
    """Run the request's models scale by scale, alternating, and yield a frame after each scale of each."""
    if not isinstance(request, EditRequest):
        raise UserError("load an image and paint a mask first")
    precision = default_precision(models, tuple(precisions or DTYPES))
    dtype = dtype_of(precision)
    tokenizer, mvar_transformer, var_transformer = models.in_precision(dtype)
    source = refit(request.source, tokenizer.cfg.image_size)
    pixels = torch.from_numpy(source.pixels).permute(2, 0, 1).float().div(255)
    plan = plan_edit(tokenizer, pixels, torch.from_numpy(request.mask), 1, request.keep_scales)
    sampling = edit_sampling(models)
    modes = {"MVAR": (mvar_transformer, models.mvar_mode), "VAR": (var_transformer, VAR_MODE)}
    streams = {name: edit_steps(modes[name][0], tokenizer, plan, request.label, request.seed, sampling,
                                modes[name][1], previews=True, dtype=dtype) for name in request.models}
    runs = {name: ModelRun(mode=modes[name][1], previews={0: []}) for name in streams}
    patch_nums = tokenizer.cfg.patch_nums
    record = EditRecord(model_key, request, patch_nums, runs,
                        {"MVAR": models.mvar_label, "VAR": models.var_label}, precision, sampling)
    latest: dict[str, np.ndarray] = {}
    num_scales = len(patch_nums)
    for scale, side in enumerate(patch_nums):
        for name, stream in streams.items():
            step = next(stream)
            run = runs[name]
            image = to_uint8(step.preview)[0]
            run.previews[0].append(image)
            run.seconds.append(step.generation_seconds)
            run.preview_seconds.append(step.preview_seconds)
            if scale == num_scales - 1:
                run.finals = [_final(tokenizer, step.f_hat, plan) if request.final_blend else image]
            latest[name] = image
            times = ", ".join(f"{n} {milliseconds(r.seconds)}" for n, r in runs.items())
            yield EditFrame(dict(latest), scale, f"{scale_name(scale, num_scales, side)}: "
                                                 f"{_tokens_line(request, scale, side)}  |  {times} (generation alone)")
    yield EditFrame({name: record.final(name) for name in runs}, num_scales - 1, done_status(record), record)


def _final(tokenizer, f_hat: torch.Tensor, plan) -> np.ndarray:
    """The last scale decoded, with the pixels outside the mask the tokenizer's reconstruction of the image."""
    with torch.no_grad():
        generated = decode_to_unit(tokenizer, f_hat)
        reconstruction = decode_to_unit(tokenizer, plan.image_f_hat.to(f_hat.device))
        return to_uint8(blend(generated, reconstruction, plan.regenerate))[0]


def done_status(record: EditRecord) -> str:
    request = record.request
    names = " and ".join(record.runs)
    side = record.patch_nums[-1]
    kept = (f"the image's first {request.keep_scales} scale{'s' if request.keep_scales > 1 else ''} kept whole, "
            if request.keep_scales else "")
    blended = ("final blend on: outside the mask the pixels are the tokenizer's reconstruction of the image"
               if request.final_blend else "final blend off: every pixel is the generation's own")
    sampling = record.sampling
    times = ", ".join(f"{n} {milliseconds(r.seconds)}" for n, r in record.runs.items())
    origin = markdown_text(request.source.origin)
    return ((f"{request.note}  \n" if request.note else "")
            + f"done: {names} edit{'s' if len(record.runs) > 1 else ''} of {origin} under "
            f"{request.class_name!r}, seed {request.seed}; {kept}{request.regenerated[-1]} of {side * side} tokens "
            f"sampled at the last scale; {blended}. Sampling: CFG {sampling.cfg:g}, top-k {sampling.top_k}, "
            f"top-p {sampling.top_p:g}, {record.precision}  |  generation alone: {times}")


# ---------------------------------------------------------------------------------------------
# The image's pyramid
# ---------------------------------------------------------------------------------------------


@dataclass
class PyramidView:
    """The tokenizer's reconstructions of the source after each scale, and their PSNR against it."""

    images: list[np.ndarray]
    psnr: list[float]  # dB; inf where the reconstruction is exact
    captions: list[str]
    patch_nums: tuple[int, ...]


def _decibels(value: float) -> str:
    return "exact" if math.isinf(value) else f"{value:.1f} dB"


def pyramid_view(models: LoadedModels, source: SourceImage) -> PyramidView:
    if not isinstance(source, SourceImage):
        raise UserError(NO_IMAGE)
    tokenizer = models.tokenizer
    source = refit(source, tokenizer.cfg.image_size)
    pixels = torch.from_numpy(source.pixels).permute(2, 0, 1).float().div(255)
    pyramid = image_pyramid(tokenizer, pixels)
    patch_nums = tokenizer.cfg.patch_nums
    count = len(patch_nums)
    captions = [f"{scale_name(s, count, p)}: {_decibels(v)}" for s, (p, v) in
                enumerate(zip(patch_nums, pyramid.psnr, strict=True))]
    return PyramidView(list(to_uint8(pyramid.reconstructions)), list(pyramid.psnr), captions, patch_nums)
