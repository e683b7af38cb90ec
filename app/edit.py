"""The Edit tab: zero-shot in-painting, out-painting, class edits and variations of a dataset sample or an
uploaded image, MVAR and the VAR baseline side by side, streamed scale by scale like a generation, then kept
for the Scale slider and the filmstrips; and the image's pyramid (what the tokenizer keeps of it).

Edits are kept in the generation store under the session's own edit key (``<session>:edit``), so they
never replace the session's generation. The model work is ``work/editing.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from mvar.memory import release_freed_memory

from . import plots
from .dataset_samples import SHIPPED
from .policy import TimeLimitExceeded, skips, ui_event, within_time_limit
from .services import Services
from .widgets import (
    COLUMNS,
    DISPLAY_SIZE,
    PRIVATE,
    image_pair,
    number_box,
    scale_slider,
    scale_slider_update,
    shown,
    slider_box,
    strip_file,
)
from .work.editing import (
    BOTH,
    BOX,
    MODE_CHOICES,
    NO_IMAGE,
    EditRecord,
    NothingToEdit,
    SourceImage,
    dataset_image,
    done_status,
    keep_field,
    parse_edit,
    preset_mask,
    source_class,
    uploaded_image,
)
from .work.generation import scale_name
from .work.models import load_models
from .work.settings import SEED, UserError

CANVAS = 384  # pixels of the mask painter's canvas: the image is shown at this size (tokens stay crisp)
PAINT = (255, 255, 255, 190)  # the presets' paint: white, a little transparent so the image shows through
PYRAMID_CELL = 128  # pixels of a reconstruction in the pyramid gallery (at least)
SCALE_NOTE = "step through the edit without recomputing"
KEEP_NOTE = "the image's own coarse layout, new detail on top"
INTRO = """Edit a real image with no training: the image is encoded into its tokens, scale by scale, and
generation runs as usual except that, at every scale, the tokens outside the mask are the image's own and only
those inside are sampled (under the class you pick). **MVAR** and the **VAR** baseline edit the same input side by
side. Paint the region to regenerate in white on the image, or use a preset: **centre** (in-painting), **border**
(out-painting: the centre box is kept), **everything** (plain generation; with *Keep the first N scales*: a
variation that keeps the image's coarse layout)."""


@dataclass
class EditWidgets:
    sample: gr.Button  # loads the next dataset sample
    dataset: gr.Dropdown  # or picks one by name
    upload: gr.UploadButton
    source_note: gr.Markdown
    editor: gr.ImageEditor  # the mask painter: the source as background, the paint = regenerate
    masks: dict[str, gr.Button]  # preset -> its button
    box: gr.Slider
    class_name: gr.Dropdown
    seed: gr.Number
    mode: gr.Radio
    keep_scales: gr.Slider
    final_blend: gr.Checkbox
    run: gr.Button
    stop: gr.Button
    regenerated: gr.Image
    status: gr.Markdown
    mvar_image: gr.Image
    var_image: gr.Image
    scale: gr.Slider
    mvar_strip: gr.Image
    var_strip: gr.Image
    pyramid: gr.Gallery
    psnr_plot: gr.Plot
    source: gr.State  # the work.editing.SourceImage being edited
    next_sample: gr.State  # the position of the next dataset sample in SHIPPED.interleaved()
    record: gr.State  # a GenerationStore token of the last edit

    def loaded(self) -> list:
        """What loading an image writes."""
        return [self.editor, self.source, self.source_note, self.class_name, self.dataset]

    def results(self) -> list:
        """What an edit writes, in the order on_edit gives it."""
        return [self.mvar_image, self.var_image, self.status, self.record, self.scale, self.mvar_strip,
                self.var_strip, self.regenerated]


def tab(first) -> EditWidgets:
    with gr.Tab("Edit"):
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                source = source_column(first)
            with gr.Column(scale=1, min_width=260):
                settings = settings_column(first)
        results = results_rows(len(first.transformer.cfg.patch_nums))
    return EditWidgets(**source, **settings, **results, source=gr.State(None), next_sample=gr.State(0),
                       record=gr.State(None))


def source_column(first) -> dict:
    out = {}
    with gr.Row():
        out["sample"] = gr.Button("Sample from the dataset", elem_id="edit-sample", min_width=140)
        out["upload"] = gr.UploadButton("Upload an image", elem_id="edit-upload", min_width=140, type="filepath")
    out["dataset"] = gr.Dropdown(SHIPPED.names(), value=None, label="Dataset sample (held-out emoji, 3 per class)",
                                 elem_id="edit-dataset", filterable=True)
    out["source_note"] = gr.Markdown("No image yet: pick a dataset sample or upload an image (any size, aspect "
                                     "ratio or mode; it is centre-cropped and resized to the model's "
                                     f"{first.tokenizer.cfg.image_size} px).", elem_id="edit-source-note")
    out["editor"] = gr.ImageEditor(
        label="Mask: paint what to regenerate (white)", type="pil", image_mode="RGBA", sources=[], transforms=(),
        layers=False, canvas_size=(CANVAS, CANVAS), fixed_canvas=True, eraser=gr.Eraser(default_size=16),
        brush=gr.Brush(colors=[("#ffffff", 0.75)], default_color=("#ffffff", 0.75), color_mode="fixed",
                       default_size=16), elem_id="edit-editor", buttons=[],
        placeholder="Pick a dataset sample or upload an image, then paint on it")
    with gr.Row():
        out["masks"] = {kind: gr.Button(text, size="sm", elem_id=f"edit-mask-{elem}", min_width=80)
                        for kind, text, elem in (("centre", "Mask the centre", "centre"),
                                                 ("border", "Mask the border (out-paint)", "border"),
                                                 ("everything", "Mask everything", "all"),
                                                 ("clear", "Clear the mask", "clear"))}
    out["box"] = slider_box(BOX, "% of the image: the centre box masked, or kept when out-painting", value=50,
                            step=5, elem_id="edit-box")
    return out


def settings_column(first) -> dict:
    num_scales = len(first.transformer.cfg.patch_nums)
    out = dict(class_name=gr.Dropdown(first.class_names, value=first.class_names[0], filterable=True,
                                      label="Class: what the regenerated region becomes", elem_id="edit-class"),
               seed=number_box(SEED, value=0, elem_id="edit-seed"),
               mode=gr.Radio(list(MODE_CHOICES), value=BOTH, label="Models", elem_id="edit-mode"),
               keep_scales=slider_box(keep_field(num_scales), KEEP_NOTE, value=0, elem_id="edit-keep"),
               final_blend=gr.Checkbox(True, label="Final blend: outside the mask, the image's own pixels (its "
                                                   "reconstruction by the tokenizer)", elem_id="edit-blend"))
    with gr.Row():
        out["run"] = gr.Button("Edit the image", variant="primary", elem_id="edit-run")
        out["stop"] = gr.Button("Stop", variant="stop", elem_id="edit-stop")
    out["regenerated"] = gr.Image(label="Regenerated (tinted red)", interactive=False, height=200,
                                  elem_id="edit-regenerated", buttons=[])
    return out


def results_rows(num_scales: int) -> dict:
    out = dict(status=gr.Markdown("Load an image, paint a mask and press **Edit the image**.", elem_id="edit-status"))
    out["mvar_image"], out["var_image"] = image_pair("edit-")
    out["scale"] = scale_slider(num_scales, "edit-scale", SCALE_NOTE)
    with gr.Column(elem_id="edit-filmstrips"):
        for name in ("mvar", "var"):
            out[f"{name}_strip"] = gr.Image(label=f"{name.upper()} edit, scale by scale (current scale framed)",
                                            interactive=False, elem_id=f"edit-{name}-strip", buttons=[])
    with gr.Accordion("The image's pyramid: what the tokenizer keeps of it, scale by scale", open=True):
        gr.Markdown("The tokenizer's reconstruction of the loaded image from its first 1, 2, ... scales of "
                    "tokens (what an edit keeps outside the mask), and its PSNR against the image.")
        out["pyramid"] = gr.Gallery(label="Reconstruction after each scale", columns=5, height="auto",
                                    allow_preview=False, elem_id="edit-pyramid")
        out["psnr_plot"] = gr.Plot(label="Reconstruction PSNR per scale", elem_id="edit-psnr")
    return out


def model_updates(models) -> tuple:
    """The tab for another model: its classes, scales and how many of them an edit may keep."""
    num_scales = len(models.transformer.cfg.patch_nums)
    keep = keep_field(num_scales)
    return (gr.update(choices=models.class_names, value=models.class_names[0]),
            scale_slider_update(num_scales, SCALE_NOTE),
            gr.update(maximum=keep.high, value=0, label=keep.label(KEEP_NOTE)))


def model_outputs(w: EditWidgets) -> list:
    return [w.class_name, w.scale, w.keep_scales]


# ---------------------------------------------------------------------------------------------
# Source, mask and record -> view
# ---------------------------------------------------------------------------------------------


def canvas_image(source: SourceImage, canvas: int = CANVAS) -> np.ndarray:
    """The source shown for painting: ``canvas`` pixels square; nearest-neighbour when the factor is whole."""
    image = Image.fromarray(source.pixels)
    resample = Image.Resampling.NEAREST if canvas % source.size == 0 else Image.Resampling.BICUBIC
    return np.asarray(image.resize((canvas, canvas), resample))


def mask_layer(mask: np.ndarray, canvas: int = CANVAS) -> np.ndarray:
    """A mask as the editor's paint layer: (canvas, canvas, 4) RGBA, painted where True, clear elsewhere."""
    size = mask.shape[0]
    picked = (np.arange(canvas) * size // canvas).clip(0, size - 1)
    layer = np.zeros((canvas, canvas, 4), np.uint8)
    layer[mask[picked][:, picked]] = PAINT
    return layer


def editor_value(source: SourceImage, files, layer: np.ndarray | None = None) -> dict:
    """The image editor's value: the source as the background, one paint layer (or none), as PNG files."""
    background = files.shown(canvas_image(source))
    return {"background": background, "layers": [] if layer is None else [files.shown(layer)],
            "composite": None if layer is not None else background}


def regenerated_view(source: SourceImage, mask: np.ndarray) -> np.ndarray:
    """The source with the regenerated pixels tinted (what the edit changes)."""
    image = source.pixels.astype(np.float32)
    image[mask] = 0.45 * image[mask] + 0.55 * np.array([230, 40, 40], np.float32)
    return image.round().astype(np.uint8)


def edit_label(record: EditRecord, name: str, scale: int) -> str:
    """The image's label: its column, the scale, and whether the final image is blended."""
    label = f"{COLUMNS[name]}, {scale_name(scale, record.num_scales, record.patch_nums[scale])}"
    if scale == record.num_scales - 1 and record.request.final_blend:
        label += ", blended"
    return label


def edit_filmstrips(record: EditRecord, scale: int) -> dict[str, plots.Filmstrip | None]:
    """Per model (None for a model that did not run) its frames, scale by scale, the current (0-based) framed."""
    names = [f"{s + 1}: {p}x{p}" for s, p in enumerate(record.patch_nums)]
    out: dict[str, plots.Filmstrip | None] = {"MVAR": None, "VAR": None}
    for name, run in record.runs.items():
        out[name] = plots.Filmstrip([*run.previews[0][:-1], record.final(name)], names, scale)
    return out


def view_outputs(files, record: EditRecord, scale: int) -> tuple:
    """The two images and filmstrips of one scale (0-based) of a kept edit."""
    images, strips = record.images(scale), edit_filmstrips(record, scale)
    return (*(image_update(files, record, name, images.get(name), scale) for name in ("MVAR", "VAR")),
            strip_file(files, strips["MVAR"]), strip_file(files, strips["VAR"]))


def image_update(files, record: EditRecord, name: str, image, scale: int):
    if name not in record.request.models:
        return gr.update(value=None, label=f"{COLUMNS[name]}: not run (Models: {record.request.models[0]} only)")
    return gr.update(value=shown(files, image), label=edit_label(record, name, scale))


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


def edit_session(request: gr.Request | None) -> str | None:
    return f"{request.session_hash}:edit" if request is not None and request.session_hash else None


def _loaded(services: Services, models, source: SourceImage, name=None) -> tuple:
    """What loading ``source`` shows (EditWidgets.loaded); ``name``: the dataset sample's, for its dropdown."""
    label = source_class(models, source)
    return (editor_value(source, services.files), source, source.describe(),
            gr.update(value=label) if label else gr.skip(), name if name else gr.skip())


def on_dataset(services: Services, key, name):
    """A dataset sample picked by name."""
    models = load_models(services.registry, key)
    return _loaded(services, models, dataset_image(name, models.tokenizer.cfg.image_size))


def on_next_sample(services: Services, key, position):
    """The next dataset sample, one class after another."""
    names = SHIPPED.interleaved()
    name = names[int(position or 0) % len(names)]
    models = load_models(services.registry, key)
    return (*_loaded(services, models, dataset_image(name, models.tokenizer.cfg.image_size), name),
            (int(position or 0) + 1) % len(names))


def on_upload(services: Services, key, path):
    models = load_models(services.registry, key)
    return _loaded(services, models, uploaded_image(path, models.tokenizer.cfg.image_size), None)


def on_pyramid(services: Services, key, source):
    """The loaded image's pyramid: the tokenizer's reconstructions after each scale and their PSNR."""
    if source is None:
        return skips(2)
    view = services.tasks.pyramid(key, source)
    gallery = [(services.files.shown(plots.upscale(image, max(PYRAMID_CELL, image.shape[0]))), caption)
               for image, caption in zip(view.images, view.captions, strict=True)]
    return gallery, plots.psnr_figure(view.psnr, view.patch_nums,
                                      "The tokenizer's reconstruction against the image, after each scale")


def on_mask(services: Services, kind: str, source, percent):
    """A preset mask painted on the loaded image."""
    if source is None:
        raise UserError(NO_IMAGE)
    mask = preset_mask(kind, source.size, BOX.parse(percent))
    return editor_value(source, services.files, mask_layer(mask) if mask.any() else None)


def on_edit(services: Services, key, token, source, editor, cls, seed, mode, keep, blend, request: gr.Request):
    """One click of "Edit the image": read the request, stream the edit, keep it and show it whole. Stopped
    (Stop, or the time limit) it ends on the previous edit, shown whole, and says where it stopped."""
    session = edit_session(request)
    models = load_models(services.registry, key)
    try:
        wanted = parse_edit(models, source, editor, cls, seed, mode, keep, blend)
    except NothingToEdit as err:  # not a failure: the page says what to do
        gr.Warning(str(err))
        why = str(err).removeprefix("nothing to edit: ")
        yield (*skips(2), f"**Nothing to edit.** {why[:1].upper()}{why[1:]}", *skips(5))
        return
    idle = [gr.update(value=None, label=COLUMNS[name] + ("" if name in wanted.models else ": not run"))
            for name in ("MVAR", "VAR")]
    yield (*idle, (f"{wanted.note}  \n" if wanted.note else "") + "encoding the image ...", *skips(4),
           tinted(services.files, wanted))
    frames = within_time_limit(services.tasks.edit(key, wanted), services.limits.time_limit, "on_edit")
    reached, patch_nums = "the first scale", models.transformer.cfg.patch_nums
    try:
        for frame in frames:
            if services.stops.requested(session):
                yield stopped_outputs(services, token, f"Stopped at {reached}.")
                return
            if frame.record is None:
                reached = scale_name(frame.scale, len(patch_nums), patch_nums[frame.scale])
                yield (*frame_images(services.files, frame, patch_nums), frame.status, *skips(5))
                continue
            token = services.store.put(session, frame.record)
            mvar, var, mvar_strip, var_strip = view_outputs(services.files, frame.record, frame.record.num_scales - 1)
            yield (mvar, var, frame.status, token, scale_slider_update(frame.record.num_scales, SCALE_NOTE),
                   mvar_strip, var_strip, gr.skip())
    except TimeLimitExceeded as err:  # logged where the limit was met
        gr.Warning(str(err))
        yield stopped_outputs(services, token, f"Stopped at {reached}: past the time limit.")
    finally:
        frames.close()
        release_freed_memory()


def tinted(files, request) -> str:
    """The request's source with the regenerated pixels tinted, as the page shows it."""
    return files.shown(plots.upscale(regenerated_view(request.source, request.mask),
                                     max(DISPLAY_SIZE, request.source.size)))


def stopped_outputs(services: Services, token, where: str) -> tuple:
    """After a stopped edit: the previous edit whole (its images, filmstrips and tint at the scale it showed),
    or empty images when there was none; the status says where the edit stopped."""
    try:
        previous = services.store.get(token)
    except UserError:  # dropped meanwhile (memory budget)
        previous = None
    if not isinstance(previous, EditRecord):
        return (*(gr.update(value=None, label=COLUMNS[name]) for name in ("MVAR", "VAR")),
                f"{where} Nothing was kept: press **Edit the image** again.", gr.skip(), gr.skip(), None, None, None)
    scale = previous.num_scales - 1 if previous.shown_scale is None else previous.shown_scale
    mvar, var, mvar_strip, var_strip = view_outputs(services.files, previous, scale)
    return (mvar, var, f"{where} The page shows the previous edit: {done_status(previous)}", gr.skip(),
            scale_slider_update(previous.num_scales, SCALE_NOTE, scale + 1), mvar_strip, var_strip,
            tinted(services.files, previous.request))


def on_arm(services: Services, request: gr.Request):
    """Edit pressed: from now on a Stop press stops this edit (an earlier press no longer counts)."""
    services.stops.arm(edit_session(request))


def on_stop(services: Services, request: gr.Request):
    services.stops.stop(edit_session(request))


def frame_images(files, frame, patch_nums) -> list:
    where = scale_name(frame.scale, len(patch_nums), patch_nums[frame.scale])
    return [gr.update(value=shown(files, frame.images[name]), label=f"{COLUMNS[name]}, {where}")
            if name in frame.images else gr.skip() for name in ("MVAR", "VAR")]


def on_scale(services: Services, token, scale):
    """The slider (or its box) moved: the kept edit's images and filmstrips of that scale."""
    record = services.store.get(token)
    if not isinstance(record, EditRecord):
        return skips(4)
    record.shown_scale = record.scale(scale)  # a stopped edit comes back to this scale
    return view_outputs(services.files, record, record.shown_scale)


def wire(w: EditWidgets, model: gr.Dropdown, model_changed, services: Services) -> None:
    """``model_changed``: the page's model event (the pyramid follows it)."""
    pyramid = ui_event(on_pyramid, 2, services=services)
    loads = [w.dataset.input(ui_event(on_dataset, 5, services=services), [model, w.dataset], w.loaded(), **PRIVATE),
             w.sample.click(ui_event(on_next_sample, 6, services=services), [model, w.next_sample],
                            [*w.loaded(), w.next_sample], **PRIVATE),
             w.upload.upload(ui_event(on_upload, 5, services=services), [model, w.upload], w.loaded(), **PRIVATE),
             model_changed]
    for event in loads:
        event.then(pyramid, [model, w.source], [w.pyramid, w.psnr_plot], concurrency_id="generate", **PRIVATE)
    for kind, button in w.masks.items():
        preset = ui_event(on_mask, 1, services=services)
        button.click(preset, [gr.State(kind), w.source, w.box], w.editor, **PRIVATE)
    armed = w.run.click(ui_event(on_arm, 0, services=services), None, None, queue=False, **PRIVATE)
    armed.then(ui_event(on_edit, len(w.results()), services=services),
               [model, w.record, w.source, w.editor, w.class_name, w.seed, w.mode, w.keep_scales, w.final_blend],
               w.results(), concurrency_id="generate", **PRIVATE)
    w.stop.click(ui_event(on_stop, 0, services=services), None, None, queue=False, **PRIVATE)
    w.scale.input(ui_event(on_scale, 4, services=services), [w.record, w.scale],
                  [w.mvar_image, w.var_image, w.mvar_strip, w.var_strip], trigger_mode="always_last", **PRIVATE)
