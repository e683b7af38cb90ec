"""The measuring tabs: Analysis (the loaded model in VAR mode over a few samples: the paper's motivation
figure), Memory (peak memory against batch size, measured and analytic) and Cost per scale (KV cache and
attention FLOPs of the last generation's settings, and its measured latency per scale)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np

from mvar.config import MVAR_MODE, PRESETS, VAR_MODE

from . import plots
from .policy import ui_event
from .services import Services
from .widgets import PRIVATE, slider_box
from .work.costs import analytic_memory_mib, measured_memory_mib, per_scale_costs
from .work.models import load_models
from .work.settings import UserError
from .work.statistics import SAMPLES, AttentionStats

PRESET_SIZES = ("d16", "d20", "d24", "d30")


@dataclass
class AnalysisWidgets:
    samples: gr.Slider
    run: gr.Button
    conclusion: gr.Markdown
    distance_plot: gr.Plot
    window_plot: gr.Plot


@dataclass
class MemoryWidgets:
    batches: gr.CheckboxGroup
    precision: gr.Radio
    run: gr.Button
    plot: gr.Plot
    presets_plot: gr.Plot


@dataclass
class CostWidgets:
    run: gr.Button
    kv_plot: gr.Plot
    flops_plot: gr.Plot
    latency_plot: gr.Plot


def analysis_tab() -> AnalysisWidgets:
    with gr.Tab("Analysis"):
        gr.Markdown("The loaded model run in VAR mode over a few samples: how much attention falls on the query's "
                    "own scale and on nearby scales, and how much of the same-scale attention a k x k window "
                    "captures: the two observations MVAR is built on (the paper's motivation figure, panels a "
                    "and b).")
        samples = slider_box(SAMPLES, value=4, elem_id="analysis-samples")
        run = gr.Button("Compute")
        conclusion = gr.Markdown("", elem_id="analysis-conclusion")
        with gr.Row():
            distance_plot = gr.Plot(label="Attention mass by scale distance", min_width=280)
            window_plot = gr.Plot(label="Same-scale mass inside a k x k window", min_width=280)
    return AnalysisWidgets(samples, run, conclusion, distance_plot, window_plot)


def memory_tab(device: str, memory_label: str, precisions: tuple[str, ...]) -> MemoryWidgets:
    with gr.Tab("Memory"):
        gr.Markdown("Peak memory above the loaded weights, VAR against MVAR, with CFG (two branches). "
                    "**Measured**: one fresh process per point, peak RSS minus RSS after loading (CPU) or the "
                    "allocator's peak (CUDA). **Analytic**: KV cache + the largest set of live activations, from "
                    f"the cost model.\n\nMeasured here on {device}: **{memory_label}**.", elem_id="memory-measure")
        with gr.Row():
            batches = gr.CheckboxGroup(["1", "2", "4", "8"], value=["1", "2", "4"], label="Batch sizes to measure")
            precision = gr.Radio(list(precisions), value="fp32", label="Precision")
            run = gr.Button("Measure and plot")
        plot = gr.Plot(label="This model: measured and analytic", elem_id="memory-plot")
        presets_plot = gr.Plot(label="Official sizes d16-d30: analytic", elem_id="presets-plot")
    return MemoryWidgets(batches, precision, run, plot, presets_plot)


def costs_tab() -> CostWidgets:
    with gr.Tab("Cost per scale"):
        gr.Markdown("Per scale, for the last generation's batch, precision and MVAR settings (CFG: two branches): "
                    "the KV cache VAR holds (MVAR holds none), the attention FLOPs (both analytic, from the cost "
                    "model) and the measured latency of the generation alone (previews and attention capture "
                    "excluded).")
        run = gr.Button("Show per-scale costs")
        kv_plot = gr.Plot(label="KV cache", elem_id="kv-plot")
        flops_plot = gr.Plot(label="Attention FLOPs", elem_id="flops-plot")
        latency_plot = gr.Plot(label="Latency", elem_id="latency-plot")
    return CostWidgets(run, kv_plot, flops_plot, latency_plot)


# ---------------------------------------------------------------------------------------------
# Views and events
# ---------------------------------------------------------------------------------------------


def analysis_conclusion(stats: AttentionStats, kernel_size: int) -> str:
    """The analysis in words: where VAR's attention goes, and what MVAR's window keeps of it."""
    by_distance = stats.mass_by_distance
    sizes, inside = list(stats.window_sizes), stats.mass_in_window
    own = float(by_distance[0])
    previous = float(by_distance[1]) if len(by_distance) > 1 else 0.0
    kept = float(inside[sizes.index(kernel_size)]) if kernel_size in sizes else float(
        np.interp(kernel_size, sizes, inside))
    return (f"In this model, run with VAR's attention, a token puts {own:.0%} of its attention on its own scale "
            f"and {previous:.0%} on the previous one: {own + previous:.0%} on the two scales MVAR's scale-Markov "
            f"input keeps. Within its own scale, a {kernel_size}x{kernel_size} window (MVAR's k) captures "
            f"{kept:.0%} of that attention.")


def on_analyse(services: Services, key, samples, progress=gr.Progress()):  # noqa: B008 - Gradio's progress
    # a ZeroGPU call pickles its arguments: gr.Progress stays here, the bar then shows no steps
    stats, kernel_size = services.tasks.statistics(key, SAMPLES.parse(samples),
                                                   progress=None if services.gpu.active else progress)
    return (analysis_conclusion(stats, kernel_size), plots.mass_by_distance_figure(stats.mass_by_distance),
            plots.window_mass_figure(list(stats.window_sizes), stats.mass_in_window, kernel_size))


def preset_memory() -> dict:
    """The analytic memory of the official sizes, bf16 (for the second memory chart)."""
    return {name: {"VAR": analytic_memory_mib(PRESETS[name].transformer, VAR_MODE, dtype="bf16"),
                   "MVAR": analytic_memory_mib(PRESETS[name].transformer, MVAR_MODE, dtype="bf16")}
            for name in PRESET_SIZES}


def on_memory(services: Services, key, batches, precision, progress=gr.Progress()):  # noqa: B008
    models = load_models(services.registry, key)
    measured = measured_memory_mib(models, batches, precision, progress, device=services.registry.device)
    chosen = sorted({int(b) for b in batches})
    cfg = models.transformer.cfg
    analytic = {"VAR": analytic_memory_mib(cfg, VAR_MODE, dtype=precision),
                "MVAR": analytic_memory_mib(cfg, models.mvar_mode, dtype=precision)}
    points = {k: {b: v[b] for b in chosen if b in v} for k, v in measured.items()}
    return (plots.memory_figure(analytic, points, f"Peak memory, {precision}, CFG on; measured: "
                                                  f"{services.memory_label}"),
            plots.preset_memory_figure(preset_memory(), "Official sizes d16-d30, bf16, CFG on (analytic)"))


def on_costs(services: Services, key, token):
    models = load_models(services.registry, key)
    try:
        record = services.store.get(token)
    except UserError:
        record = None  # dropped: the analytic costs without the measured latency
    if record is not None and record.model_key != key:
        record = None  # another model's generation says nothing about this one
    costs = per_scale_costs(models, record)
    what = f"batch {costs['batch']}, {costs['dtype']}, CFG on (two branches)"
    latency = costs.get("latency_ms")
    return (plots.per_scale_bars(costs["kv_cache_mib"], f"KV cache after each scale (analytic; {what})", "MiB",
                                 zero_note="0: no cache"),
            plots.per_scale_bars(costs["attention_mflops"], f"Attention FLOPs per scale (analytic; {what})", "MFLOP"),
            plots.per_scale_bars(latency, f"Latency per scale, generation alone (measured; {what})", "ms")
            if latency else plots.placeholder_figure("Latency per scale (measured)",
                                                     "generate an image with this model first"))


def wire(ana: AnalysisWidgets, mem: MemoryWidgets, cost: CostWidgets, model: gr.Dropdown, record: gr.State,
         services: Services) -> None:
    ana.run.click(ui_event(on_analyse, 3, services=services), [model, ana.samples],
                  [ana.conclusion, ana.distance_plot, ana.window_plot], concurrency_id="generate", **PRIVATE)
    mem.run.click(ui_event(on_memory, 2, services=services), [model, mem.batches, mem.precision],
                  [mem.plot, mem.presets_plot], concurrency_id="generate", **PRIVATE)
    cost.run.click(ui_event(on_costs, 3, services=services), [model, record],
                   [cost.kv_plot, cost.flops_plot, cost.latency_plot], **PRIVATE)
