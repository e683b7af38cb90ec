"""The named API (``gradio_client``): ``/generate``, ``/attention`` and ``/models``.

Hidden components give the endpoints their typed, named parameters and outputs. The values are parsed by
the same fields as the page's (``work/settings.py``), so a refusal reads as on the page, and it reaches the
script as ``gr.Error`` (no traceback in the server's log): ``seed="abc"``, ``images=2.5`` and a fractional
``scale`` are refused, never rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .attention import attention_view
from .generate import ensure_sample
from .policy import api_endpoint, within_time_limit
from .services import Services
from .widgets import NumberBox
from .work.models import load_models
from .work.settings import CFG, SEED, TOP_P, UserError, Whole, parse_settings


@dataclass
class ApiWidgets:
    trigger: gr.Button
    model: gr.Textbox
    class_name: gr.Textbox
    seed: gr.Number
    cfg: gr.Number
    top_k: gr.Number
    top_p: gr.Number
    images: gr.Number
    precision: gr.Textbox
    mvar_images: gr.Gallery
    var_images: gr.Gallery
    generation: gr.JSON
    generation_id: gr.Textbox
    scale: gr.Number
    row: gr.Number
    col: gr.Number
    sample: gr.Number
    attention: gr.JSON
    models: gr.JSON


def whole(label: str) -> NumberBox:
    return NumberBox(label=label, precision=0)


def widgets() -> ApiWidgets:
    with gr.Group(visible=False):
        return ApiWidgets(
            trigger=gr.Button("api"), model=gr.Textbox(label="model"), class_name=gr.Textbox(label="class_name"),
            seed=NumberBox(label="seed", precision=0, minimum=SEED.low, maximum=SEED.high),
            cfg=NumberBox(label="cfg", minimum=CFG.low, maximum=CFG.high), top_k=whole("top_k"),
            top_p=NumberBox(label="top_p", minimum=TOP_P.low, maximum=TOP_P.high), images=whole("images"),
            precision=gr.Textbox(label="precision"), mvar_images=gr.Gallery(label="mvar_images"),
            var_images=gr.Gallery(label="var_images"), generation=gr.JSON(label="generation"),
            generation_id=gr.Textbox(label="generation_id"), scale=whole("scale"), row=whole("row"),
            col=whole("col"), sample=whole("sample"), attention=gr.JSON(label="attention"),
            models=gr.JSON(label="models"))


def generate(services: Services, model, class_name, seed, cfg, top_k, top_p, images, precision,
             request: gr.Request):
    """Generate ``images`` samples of a class with MVAR and the VAR baseline; returns both galleries and the
    generation (its id for /attention, the seed and settings used, the timings)."""
    models = load_models(services.registry, model)
    mode = models.mvar_mode  # the API runs each model's own windows
    settings = parse_settings(models, class_name, seed, cfg, top_k, top_p, False, images, precision,
                              str(mode.kernel_size), mode.refine_step, services.limits.max_images,
                              services.tasks.precisions)
    record = None
    for frame in within_time_limit(services.tasks.frames(model, settings), services.limits.time_limit, "generate"):
        record = frame.record or record
    token = services.store.put(request.session_hash if request else None, record)
    runs = record.runs
    info = {"generation_id": token, "seed": record.seed, "class_name": record.class_name,
            "precision": settings.precision, "cfg": settings.sampling.cfg, "top_k": settings.sampling.top_k,
            "top_p": settings.sampling.top_p,
            "mvar": {"label": record.labels.get("MVAR"), "generation_ms": sum(runs["MVAR"].seconds) * 1000},
            "var": {"label": record.labels.get("VAR"), "generation_ms": sum(runs["VAR"].seconds) * 1000}}
    return ([services.files.shown(i) for i in runs["MVAR"].finals],
            [services.files.shown(i) for i in runs["VAR"].finals], info)


def attention(services: Services, generation_id, scale, row, col, sample):
    """Attention of one token (scale 1-based, row, column, sample 1-based) of a generation from /generate:
    MVAR's weights on the token's own grid, VAR's attention mass per scale, and the caption."""
    record = services.store.get(generation_id)
    if record is None:
        raise UserError("generation_id is empty: pass the one /generate returned")
    record.scale(scale)  # a bad scale is named before any work
    index = Whole("sample", 1, record.num_images).parse(sample) - 1
    ensure_sample(services, generation_id, record, index)
    view = attention_view(record, scale, "mean", "mean", row, col, sample)
    return {"mvar_grid": view.mvar_grid.round(6).tolist(), "window": view.window,
            "var_mass_per_scale": view.var_mass.round(6).tolist(), "caption": view.caption}


def models(services: Services):
    """The models this server offers: key (pass it as ``model``) and label."""
    return [{"key": e.key, "label": e.label} for e in services.registry.entries()]


def wire(api: ApiWidgets, services: Services) -> None:
    api.trigger.click(api_endpoint(generate, services), [api.model, api.class_name, api.seed, api.cfg, api.top_k,
                                                         api.top_p, api.images, api.precision],
                      [api.mvar_images, api.var_images, api.generation], api_name="generate",
                      concurrency_id="generate")
    api.trigger.click(api_endpoint(attention, services), [api.generation_id, api.scale, api.row, api.col,
                                                          api.sample],
                      api.attention, api_name="attention", concurrency_id="generate")
    api.trigger.click(api_endpoint(models, services), None, api.models, api_name="models")
