"""The Generate part: the settings, MVAR and the VAR baseline refining live one scale at a time, then the
scale slider, the sample picker, the galleries, the filmstrips and the downloads of the finished generation.

One click of Generate is :func:`on_generate`, top to bottom: read the settings (one parse,
``work/settings.py``), stream the model work (``tasks.frames``), show each scale's previews, keep the
record, show it whole. The Attention tab follows the new record in its own event, chained after this one.
Stepping the slider and picking a sample re-show the kept record without recomputing. These events listen
to what the user does (``input``, ``select``), never to ``change``: the app's own writes run nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import gradio as gr
import numpy as np

from mvar.memory import release_freed_memory

from . import plots
from .policy import TimeLimitExceeded, skips, ui_event, within_time_limit
from .services import Services
from .widgets import (
    COLUMNS,
    PRIVATE,
    image_pair,
    number_box,
    scale_slider,
    scale_slider_update,
    shown,
    strip_file,
)
from .work.generation import GenerationRecord, done_status, record_of, scale_name
from .work.models import load_models
from .work.settings import CFG, SEED, TOP_P, UserError, kernel_choices, parse_settings, refine_field, top_k_field

SCALE_NOTE = "step back and forth without recomputing"
# Class and seed presets, the one table of them: the default models' classes, each with the seed of 0..7
# that the classifier recognises best in both models' samples (measured), and ImageNet classes the VAR
# and MVAR papers show. A model is offered the rows of its own classes.
EXAMPLES = [["smiley face", 7], ["heart", 1], ["clock", 5], ["person", 3], ["animal face", 6], ["car", 5],
            ["golden retriever", 0], ["otter", 1], ["giant panda", 2], ["volcano", 3], ["lakeside", 4], ["macaw", 5]]


@dataclass
class GenerateWidgets:
    # the settings, in the order parse_settings reads them
    class_name: gr.Dropdown
    seed: gr.Number
    cfg: gr.Number
    top_k: gr.Number
    top_p: gr.Number
    smooth: gr.Checkbox
    num_images: gr.Radio
    precision: gr.Radio
    kernel: gr.Dropdown
    refine_step: gr.Number
    # the rest of the settings column
    dice: gr.Button
    run: gr.Button
    stop: gr.Button
    examples: gr.Dataset
    # what a finished generation shows, in the order record_outputs gives them
    mvar_image: gr.Image
    var_image: gr.Image
    status: gr.Markdown
    record: gr.State  # a GenerationStore token
    scale: gr.Slider
    sample: gr.Radio
    mvar_gallery: gr.Gallery
    var_gallery: gr.Gallery
    mvar_strip: gr.Image
    var_strip: gr.Image
    downloads: gr.File

    def settings(self) -> list:
        return [getattr(self, f.name) for f in fields(self)[:10]]

    def results(self) -> list:
        return [getattr(self, f.name) for f in fields(self)[14:]]

    def views(self) -> list:
        """What stepping and picking a sample re-show."""
        return [self.mvar_image, self.var_image, self.mvar_strip, self.var_strip]


def example_presets(class_names: list[str]) -> list[list]:
    """The example rows whose classes this model has (by name), else its first classes with seed 0."""
    found = [[name, seed] for name, seed in EXAMPLES if name in class_names]
    return found if len(found) >= 3 else [[name, 0] for name in class_names[:6]]


# ---------------------------------------------------------------------------------------------
# The widgets
# ---------------------------------------------------------------------------------------------


def section(first, precisions: tuple[str, ...], default_precision: str, max_images: int) -> GenerateWidgets:
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            settings = settings_column(first, precisions, default_precision, max_images)
        with gr.Column(scale=3, min_width=300):
            results = results_column(len(first.transformer.cfg.patch_nums))
    return GenerateWidgets(**settings, **results)


def settings_column(first, precisions, default_precision: str, max_images: int) -> dict:
    cfg = first.transformer.cfg
    out = dict(class_name=gr.Dropdown(first.class_names, value=first.class_names[0], label="Class", filterable=True,
                                      elem_id="class"))
    with gr.Row():
        out["seed"] = number_box(SEED, value=0, elem_id="seed", scale=3)
        out["dice"] = gr.Button("random", size="sm", scale=1, min_width=60)
    out["cfg"] = number_box(CFG, "0 = none", value=first.sampling["cfg"], elem_id="cfg")
    out["top_k"] = number_box(top_k_field(cfg.vocab_size), "0 = off", value=first.sampling["top_k"], elem_id="top-k")
    out["top_p"] = number_box(TOP_P, "1 = off", value=first.sampling["top_p"], elem_id="top-p")
    out["smooth"] = gr.Checkbox(False, label="Gumbel smoothing (for visualisation)")
    out["num_images"] = gr.Radio([str(i) for i in range(1, max_images + 1)], value="1", label="Images",
                                 elem_id="images")
    out["precision"] = gr.Radio(list(precisions), value=default_precision, label="Precision",
                                info="fp32 is exact: a sample is the same alone or in a batch. bf16 is faster on "
                                     "large models but not batch-invariant: a sample may differ slightly with the "
                                     "number of images.")
    with gr.Accordion("MVAR attention", open=False, elem_id="mvar-attention"):
        out["kernel"] = gr.Dropdown(kernel_choices(cfg.patch_nums), value=str(first.mvar_mode.kernel_size),
                                    label="Window k (odd, up to the largest grid; full = no window)", elem_id="kernel")
        out["refine_step"] = number_box(refine_field(len(cfg.patch_nums)), "windows from scale refine step + 1 on",
                                        value=first.mvar_mode.refine_step, elem_id="refine-step")
    with gr.Row():
        out["run"] = gr.Button("Generate", variant="primary")
        out["stop"] = gr.Button("Stop", variant="stop")
    out["examples"] = gr.Dataset(components=[out["class_name"], out["seed"]],
                                 samples=example_presets(first.class_names),
                                 label="Examples (class, seed): click one, then Generate", elem_id="examples")
    return out


def results_column(num_scales: int) -> dict:
    out = dict(status=gr.Markdown("Pick a class and press **Generate**.", elem_id="status"), record=gr.State(None))
    out["mvar_image"], out["var_image"] = image_pair("")
    out["scale"] = scale_slider(num_scales, "scale-slider", SCALE_NOTE)
    out["sample"] = gr.Radio(["1"], value="1", label="Sample shown (previews, filmstrips and attention follow it)",
                             elem_id="sample")
    with gr.Row():
        for name in ("mvar", "var"):
            out[f"{name}_gallery"] = gr.Gallery(label=f"{COLUMNS[name.upper()]}: every sample", columns=4, height=180,
                                                elem_id=f"{name}-gallery", allow_preview=False, min_width=200,
                                                object_fit="contain")
    with gr.Column(elem_id="filmstrips"):
        for name in ("mvar", "var"):
            out[f"{name}_strip"] = gr.Image(label=f"{name.upper()}, scale by scale (current scale framed)",
                                            interactive=False, elem_id=f"{name}-strip", buttons=[])
    out["downloads"] = gr.File(label="Final images (PNG)", file_count="multiple", elem_id="downloads")
    return out


def model_updates(models, precision: str) -> tuple:
    """The settings for another model: its classes, sampling defaults, ranges, precision, windows, examples."""
    cfg = models.transformer.cfg
    refine = refine_field(len(cfg.patch_nums))
    return (gr.update(choices=models.class_names, value=models.class_names[0]), models.sampling["cfg"],
            gr.update(value=models.sampling["top_k"], maximum=cfg.vocab_size,
                      label=top_k_field(cfg.vocab_size).label("0 = off")),
            models.sampling["top_p"], precision,
            gr.update(choices=kernel_choices(cfg.patch_nums), value=str(models.mvar_mode.kernel_size)),
            gr.update(value=models.mvar_mode.refine_step, maximum=refine.high,
                      label=refine.label("windows from scale refine step + 1 on")),
            gr.Dataset(samples=example_presets(models.class_names)),
            scale_slider_update(len(cfg.patch_nums), SCALE_NOTE))


def model_outputs(w: GenerateWidgets) -> list:
    return [w.class_name, w.cfg, w.top_k, w.top_p, w.precision, w.kernel, w.refine_step, w.examples, w.scale]


# ---------------------------------------------------------------------------------------------
# Record -> view
# ---------------------------------------------------------------------------------------------


def scale_view(record: GenerationRecord, scale: int, sample: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored previews of one scale (0-based) of one sample (0-based): no recomputation."""
    runs = record.runs
    if sample not in runs["MVAR"].previews:
        raise UserError(f"sample {sample + 1} is not decoded yet: pick it in the gallery")
    return runs["MVAR"].previews[sample][scale], runs["VAR"].previews[sample][scale]


def filmstrips(record: GenerationRecord, scale: int, sample: int) -> tuple[plots.Filmstrip, plots.Filmstrip]:
    names = [f"{s + 1}: {p}x{p}" for s, p in enumerate(record.patch_nums)]
    return tuple(plots.Filmstrip(record.runs[n].previews[sample], names, scale) for n in ("MVAR", "VAR"))


def download_name(record: GenerationRecord, model: str, sample: int) -> str:
    safe_class = "".join(ch if ch.isalnum() else "-" for ch in record.class_name)
    return f"{model.lower()}-{safe_class}-seed{record.seed + sample}.png"


def image_label(name: str, shown_scale: str | None) -> str:
    """An image's label: its column and the scale it shows ("MVAR, scale 3 of 10 (3x3)")."""
    return COLUMNS[name] if shown_scale is None else f"{COLUMNS[name]}, {shown_scale}"


def view_outputs(files, record: GenerationRecord, scale: int) -> tuple:
    """The images and filmstrips of one scale (0-based) of the record's shown sample."""
    sample = record.shown_sample
    where = scale_name(scale, record.num_scales, record.patch_nums[scale])
    images = scale_view(record, scale, sample)
    strips = filmstrips(record, scale, sample)
    return (*(gr.update(value=shown(files, image), label=image_label(name, where))
              for name, image in zip(("MVAR", "VAR"), images, strict=True)),
            strip_file(files, strips[0]), strip_file(files, strips[1]))


def frame_images(files, frame) -> list:
    """The two images of a streamed frame, each labelled with the scale it shows."""
    return [gr.update(value=shown(files, image), label=image_label(name, frame.shown_scales.get(name)))
            for name, image in (("MVAR", frame.mvar_image), ("VAR", frame.var_image))]


def record_outputs(files, token: str, record: GenerationRecord, status: str) -> tuple:
    """Everything a finished generation shows (GenerateWidgets.results), at its last scale."""
    last = record.num_scales - 1
    mvar_image, var_image, mvar_strip, var_strip = view_outputs(files, record, last)
    galleries = [[(files.shown(image), f"sample {i + 1}") for i, image in enumerate(record.runs[name].finals)]
                 for name in ("MVAR", "VAR")]
    downloads = files.downloads(token, {download_name(record, name, i): image for name, run in record.runs.items()
                                        for i, image in enumerate(run.finals)})
    return (mvar_image, var_image, status, token, scale_slider_update(record.num_scales, SCALE_NOTE),
            gr.update(choices=[str(i + 1) for i in range(record.num_images)], value=str(record.shown_sample + 1)),
            *galleries, mvar_strip, var_strip, downloads)


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


def on_generate(services: Services, key, token, cls, seed, cfg, top_k, top_p, smooth, count, precision, kernel,
                refine, request: gr.Request):
    """One click of Generate: read the settings, stream the previews, then keep the record and show it whole.

    Stopped (the Stop button, or the time limit) it ends on the previous result, shown whole, and says where
    the new run stopped: never half the new run's previews beside the old run's galleries."""
    session = request.session_hash if request else None
    models = load_models(services.registry, key)
    settings = parse_settings(models, cls, seed, cfg, top_k, top_p, smooth, count, precision, kernel, refine,
                              services.limits.max_images, services.tasks.precisions)
    if services.stops.requested(session):  # pressed while the run waited in the queue
        yield stopped_outputs(services, token, "Stopped before the first scale.")
        return
    frames = within_time_limit(services.tasks.frames(key, settings), services.limits.time_limit, "on_generate")
    reached = "the first scale"
    try:
        for frame in frames:
            if services.stops.requested(session):
                yield stopped_outputs(services, token, f"Stopped at {reached}.")
                return
            if frame.record is None:  # a scale of one model: its preview, the rest kept
                reached = scale_name(frame.scale, len(models.transformer.cfg.patch_nums),
                                     models.transformer.cfg.patch_nums[frame.scale])
                yield (*frame_images(services.files, frame), frame.status, *skips(8))
                continue
            token = services.store.put(session, frame.record)
            yield record_outputs(services.files, token, frame.record, frame.status)
    except TimeLimitExceeded as err:  # logged where the limit was met
        gr.Warning(str(err))
        yield stopped_outputs(services, token, f"Stopped at {reached}: past the time limit.")
    finally:
        frames.close()
        release_freed_memory()


def stopped_outputs(services: Services, token, where: str) -> tuple:
    """After a stopped run: the previous result whole (images and filmstrips of the scale and sample it
    showed, the slider there), the rest as it was, and the status saying where the run stopped."""
    try:
        previous = services.store.get(token)
    except UserError:  # dropped meanwhile (memory budget)
        previous = None
    if previous is None:
        return (*(gr.update(value=None, label=COLUMNS[name]) for name in ("MVAR", "VAR")),
                f"{where} Nothing was kept: press **Generate** again.", gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                gr.skip(), None, None, gr.skip())
    scale = previous.num_scales - 1 if previous.shown_scale is None else previous.shown_scale
    mvar_image, var_image, mvar_strip, var_strip = view_outputs(services.files, previous, scale)
    return (mvar_image, var_image, f"{where} The page shows the previous result: {done_status(previous)}",
            gr.skip(), scale_slider_update(previous.num_scales, SCALE_NOTE, scale + 1), gr.skip(), gr.skip(),
            gr.skip(), mvar_strip, var_strip, gr.skip())


def on_arm(services: Services, request: gr.Request):
    """Generate pressed: from now on a Stop press stops this run (an earlier press no longer counts)."""
    services.stops.arm(request.session_hash if request else None)


def on_stop(services: Services, request: gr.Request):
    services.stops.stop(request.session_hash if request else None)


def ensure_sample(services: Services, token: str, record: GenerationRecord, index: int) -> None:
    """Decode and capture a sample (0-based) of a kept generation once (a model task), and keep the result."""
    if index not in record.runs["MVAR"].previews or index not in record.runs["MVAR"].attention:
        previews, attention = services.tasks.sample(record.model_key, record, index)
        for name, run in record.runs.items():
            run.previews[index], run.attention[index] = previews[name], attention[name]
        services.store.refresh(token)


def on_scale(services: Services, token, scale):
    """The slider (or its box) moved: the images and filmstrips of that scale, from the kept record."""
    record = services.store.get(token)
    if record is None:
        return skips(4)
    record.shown_scale = record_of(record).scale(scale)  # a stopped run comes back to this scale
    return view_outputs(services.files, record, record.shown_scale)


def on_sample(services: Services, token, sample, scale):
    """Another sample picked: decode it once, then show it at the slider's scale."""
    record = services.store.get(token)
    if record is None:
        return skips(5)
    index = record.sample(sample)
    ensure_sample(services, token, record, index)
    record.shown_sample = index  # late replies of older events follow the latest pick
    record.shown_scale = record.scale(scale)
    return (str(index + 1), *view_outputs(services.files, record, record.shown_scale))


def on_gallery(services: Services, token, scale, evt: gr.SelectData):
    """A gallery image clicked: that sample, as if picked with the radio."""
    return on_sample(services, token, evt.index + 1, scale)


def pick_example(example):
    return example[0], example[1]


def random_seed() -> int:
    return random.randrange(0, 2**31 - 1)


def wire(w: GenerateWidgets, model: gr.Dropdown, services: Services):
    """The part's events; returns the events other parts follow (the generation, the scale, the sample)."""
    w.dice.click(random_seed, None, w.seed, **PRIVATE)
    w.examples.click(pick_example, w.examples, [w.class_name, w.seed], **PRIVATE)
    # arming is immediate (no queue): a Stop pressed while the run still waits in the queue stops it too;
    # the run's concurrency: the queue's default_concurrency_limit (--concurrency), shared with the model work
    armed = w.run.click(ui_event(on_arm, 0, services=services), None, None, queue=False, **PRIVATE)
    generation = armed.then(ui_event(on_generate, len(w.results()), services=services),
                            [model, w.record, *w.settings()], w.results(), concurrency_id="generate", **PRIVATE)
    w.stop.click(ui_event(on_stop, 0, services=services), None, None, queue=False, **PRIVATE)
    scaled = w.scale.input(ui_event(on_scale, 4, services=services), [w.record, w.scale], w.views(),
                           trigger_mode="always_last", **PRIVATE)
    picked = [w.sample.input(ui_event(on_sample, 5, services=services), [w.record, w.sample, w.scale],
                             [w.sample, *w.views()], concurrency_id="generate", **PRIVATE)]
    for gallery in (w.mvar_gallery, w.var_gallery):
        picked.append(gallery.select(ui_event(on_gallery, 5, services=services), [w.record, w.scale],
                                     [w.sample, *w.views()], concurrency_id="generate", **PRIVATE))
    return generation, scaled, picked
