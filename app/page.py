"""The page: its top (what it is, the model choice), the parts below it, and :func:`build_app`.

Each part is one module holding its widgets, its events and its record-to-view functions: ``generate.py``,
``attention.py``, ``ablation.py``, ``edit.py``, ``analysis.py`` (Analysis, Memory, Cost per scale) and
``api.py`` (the named API). Choosing another model is the one event that writes into several parts
(:func:`on_model`): it loads the model once and gives each part its new widgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from mvar.memory import release_freed_memory

from . import ablation, analysis, api, attention, edit, generate
from .image_files import ImageFiles
from .policy import ServerLimits, ui_event
from .registry import ModelRegistry
from .services import Services
from .store import GenerationStore
from .tasks import model_tasks
from .widgets import PRIVATE
from .work.costs import memory_label
from .work.models import load_models, warm_up
from .work.settings import default_precision
from .zerogpu import GpuTasks

PAPER_URL = "https://arxiv.org/abs/2505.12742"
CODE_URL = "https://github.com/CVL-UESTC/MVAR"
VAR_URL = "https://github.com/FoundationVision/VAR"
INTRO = f"""# MVAR Studio
Next-scale image generation with **MVAR** ([paper]({PAPER_URL}), [code]({CODE_URL})) next to its **VAR**
baseline ([code]({VAR_URL})), on the same class and seeds, one scale at a time."""
WHAT_YOU_SEE = """**What you are seeing.** Both models draw an image as a pyramid of token maps, 1x1 up to the
largest grid, each scale refining the one before (the previews below are those partial images). VAR lets every
token attend to every token of every earlier scale, so it keeps a growing KV cache. MVAR makes two Markov
assumptions: a scale attends only to itself (its input already carries the earlier scales), and on the large
scales each token attends only to a k x k window around it. So MVAR needs no KV cache and far less attention
work; the **Attention** tab shows where each token looks, **Ablation** switches the two assumptions on one at a
time, **Memory** and **Cost per scale** show what they save."""
DEFAULT_MODELS_NOTE = (
    "**The default models** are small ones this project trained on emoji artwork (12 classes, 64 px images, "
    "CPU-sized), so the page runs anywhere. For the official ImageNet 256 px models, start the app with "
    "`--models-dir` (a folder with `vae_ch160v4096z32.pth`, `var_d16.pth`, `mvar-d16.pth`, ...) or `--download` "
    "(see docs/official-weights.md and docs/devices-and-spaces.md).\n\n"
    "**The artwork they learned from** (see CREDITS.md): Fluent Emoji 3D, Color and Flat, © Microsoft "
    "Corporation, MIT licence; Noto Emoji, © Google LLC, Apache License 2.0; Twemoji graphics by Twitter, Inc. "
    "and other contributors, CC BY 4.0. Images resized to 64 px on white.")
CSS = """
#filmstrips img, #ablation img {object-fit: contain;}
@media (max-width: 640px) {
  .gradio-container {padding: 4px !important;}
  #model-row > div {min-width: 100% !important;}
  #mvar-image, #var-image {min-width: 100% !important;}
}
"""  # goes to demo.launch(css=...)


@dataclass
class Header:
    model: gr.Dropdown
    model_note: gr.Markdown
    device_line: gr.Markdown


def model_text(models) -> str:
    """The loaded entry's two columns, labelled by what each file was trained for, and the baseline note."""
    return f"**MVAR column:** {models.mvar_label}  \n**VAR column:** {models.var_label}  \n{models.baseline_note}."


def header(entries, first, device_line: str, default_note: str) -> Header:
    gr.Markdown(INTRO)
    with gr.Row(elem_id="model-row"):
        model = gr.Dropdown([(e.label, e.key) for e in entries], value=entries[0].key, label="Model",
                            scale=2, min_width=240)
        with gr.Column(scale=3, min_width=240):
            model_note = gr.Markdown(model_text(first), elem_id="model-note")
            device = gr.Markdown(device_line, elem_id="device-line")
    if default_note:  # developer text and credits, out of the first screen's way
        with gr.Accordion("About these models", open=False, elem_id="about-models"):
            gr.Markdown(default_note, elem_id="default-models-note")
    with gr.Accordion("What you are seeing", open=False):
        gr.Markdown(WHAT_YOU_SEE)
    return Header(model, model_note, device)


def on_model(services: Services, key, progress=gr.Progress()):  # noqa: B008 - Gradio's progress bar
    """Another model: load it (downloading it first if it comes from the hub), warm it up, and give the
    header, the Generate part and the Edit tab their widgets for it."""
    progress(0, desc="loading the model (downloading it first if it comes from the hub)")
    models = load_models(services.registry, key, progress)
    precision = default_precision(models, services.tasks.precisions)
    if not services.gpu.active:  # on ZeroGPU the models only run inside GPU calls
        progress(0.95, desc="warming up (one small generation per mode)")
        warm_up(models, precision)
    return (model_text(models), *generate.model_updates(models, precision), *edit.model_updates(models))


def on_close(services: Services, request: gr.Request):
    """The page closed: its generation and its edit go (and their download files)."""
    services.store.drop_session(request.session_hash)
    services.store.drop_session(edit.edit_session(request))
    release_freed_memory()


def build_app(registry: ModelRegistry, limits: ServerLimits | None = None, gpu: GpuTasks | None = None) -> gr.Blocks:
    """The page. ``limits``: the time limit, the memory for kept generations and the images per generation
    (``policy.ServerLimits``); ``gpu``: how the model work runs (default: directly on ``registry.device``;
    ZeroGPU calls, see ``zerogpu.py``)."""
    limits = limits or ServerLimits()
    files = ImageFiles()
    gpu = gpu or GpuTasks()
    services = Services(registry, GenerationStore(int(limits.keep_mib * 2**20), on_forget=files.forget), files,
                        model_tasks(registry, gpu), limits, gpu, memory_label(registry.device))
    entries = registry.entries()
    if not entries:
        raise SystemExit("error: no models available (assets/ is empty and no --models-dir files were found)")
    first = registry.load(entries[0].key)
    precision = default_precision(first, services.tasks.precisions)
    if not gpu.active:  # on ZeroGPU the models only run inside GPU calls
        warm_up(first, precision)
    # delete_cache: Gradio's own copies of served files go after an hour (checked every 10 minutes)
    with gr.Blocks(title="MVAR Studio", delete_cache=(600, 3600)) as demo:
        head = header(entries, first, gpu.describe(registry.device),
                      DEFAULT_MODELS_NOTE if entries[0].source == "default" else "")
        gen = generate.section(first, services.tasks.precisions, precision, limits.max_images)
        att, abl, ed = attention.tab(), ablation.tab(), edit.tab(first)
        ana, mem, cost = (analysis.analysis_tab(), analysis.memory_tab(str(registry.device), services.memory_label,
                                                                       services.tasks.precisions),
                          analysis.costs_tab())
        model_outputs = [head.model_note, *generate.model_outputs(gen), *edit.model_outputs(ed)]
        model_changed = head.model.input(ui_event(on_model, len(model_outputs), services=services), head.model,
                                         model_outputs, **PRIVATE)
        generation, scaled, picked = generate.wire(gen, head.model, services)
        attention.wire(att, gen.record, gen.scale, [gen.mvar_image, gen.var_image], (generation, [scaled, *picked]),
                       services)
        ablation.wire(abl, head.model, gen.settings(), services)
        edit.wire(ed, head.model, model_changed, services)
        analysis.wire(ana, mem, cost, head.model, gen.record, services)
        api.wire(api.widgets(), services)
        demo.unload(ui_event(on_close, 0, services=services))
    return demo
