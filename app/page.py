"""The app: the layout of ``layout.py`` wired by ``events.py`` under the policy of ``policy.py``."""

from __future__ import annotations

import gradio as gr

from . import handlers
from .events import Services, api_widgets, wire, wire_edit
from .layout import (
    CSS,
    Page,
    ablation_tab,
    analysis_tab,
    attention_tab,
    costs_tab,
    edit_tab,
    generate_section,
    header,
    memory_tab,
)
from .policy import DEFAULT_KEEP_MIB, DEFAULT_TIME_LIMIT, GenerationStore, ImageFiles, ServerLimits
from .registry import ModelRegistry
from .tasks import model_tasks
from .zerogpu import GpuTasks

DEFAULT_MODELS_NOTE = ("**The default models** are small ones this project trained on its own embedded dataset "
                       "(12 synthetic classes, 64 px images, CPU-sized), so the page runs anywhere. For the "
                       "official ImageNet 256 px models, start the app with `--models-dir` (a folder with "
                       "`vae_ch160v4096z32.pth`, `var_d16.pth`, `mvar-d16.pth`, ...) or `--download` (see the "
                       "README's Official weights and Hosting sections).")

__all__ = ["CSS", "DEFAULT_KEEP_MIB", "DEFAULT_TIME_LIMIT", "build_app"]  # CSS goes to demo.launch(css=...)


def build_app(registry: ModelRegistry, time_limit: float | None = DEFAULT_TIME_LIMIT,
              keep_mib: float = DEFAULT_KEEP_MIB, gpu: GpuTasks | None = None,
              max_images: int = handlers.MAX_IMAGES) -> gr.Blocks:
    """The page. ``time_limit``: seconds a generation may run (None = no limit); ``keep_mib``: memory for the
    generations kept for the views, all sessions together; ``gpu``: how the model work runs (default: directly
    on ``registry.device``; ZeroGPU calls, see ``zerogpu.py``)."""
    limits = ServerLimits(time_limit, keep_mib, max_images)
    files = ImageFiles()
    store = GenerationStore(int(limits.keep_mib * 2**20), on_forget=files.forget)
    gpu = gpu or GpuTasks()
    tasks = model_tasks(registry, gpu, limits.max_images)
    entries = registry.entries()
    if not entries:
        raise SystemExit("error: no models available (assets/ is empty and no --models-dir files were found)")
    first = registry.load(entries[0].key)
    if not gpu.active:  # on ZeroGPU the models only run inside GPU calls
        handlers.warm_up(first, handlers.default_precision(first, tasks.precisions))
    services = Services(registry, store, files, tasks, limits, gpu, handlers.memory_label(registry.device))
    # delete_cache: Gradio's own copies of served files go after an hour (checked every 10 minutes)
    with gr.Blocks(title="MVAR Studio", delete_cache=(600, 3600)) as demo:
        top = header(entries, first, gpu.describe(registry.device),
                     DEFAULT_MODELS_NOTE if entries[0].source == "default" else "")
        generate = generate_section(first, tasks.precisions, handlers.default_precision(first, tasks.precisions),
                                    limits.max_images)
        attention, ablation = attention_tab(), ablation_tab()
        edit = edit_tab(first)
        page = Page(top, generate, attention, ablation, analysis_tab(),
                    memory_tab(str(registry.device), services.memory_label, tuple(tasks.precisions)), costs_tab())
        wire(demo, page, api_widgets(), services)
        wire_edit(edit, top, services, demo)
    return demo
