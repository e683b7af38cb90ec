"""The Ablation tab: the paper's ablation live on the loaded weights, with the Generate part's settings:
VAR, + scale-Markov (no windows) and full MVAR, sample 1 scale by scale, with the cost model's figures."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from . import plots
from .policy import ui_event
from .services import Services
from .widgets import PRIVATE
from .work.ablation import VARIANTS, Ablation
from .work.models import load_models
from .work.settings import parse_settings


@dataclass
class AblationWidgets:
    run: gr.Button
    status: gr.Markdown
    var_strip: gr.Image
    scale_markov_strip: gr.Image
    mvar_strip: gr.Image
    costs: gr.Markdown

    def outputs(self) -> list:
        return [self.status, self.var_strip, self.scale_markov_strip, self.mvar_strip, self.costs]


def tab() -> AblationWidgets:
    with gr.Tab("Ablation"):
        gr.Markdown("The paper's ablation, live on the loaded weights with the class, seed and settings above: "
                    "**VAR** (block-causal attention, KV cache), **+ scale-Markov** (each scale attends only to "
                    "itself, no windows) and **full MVAR** (+ k x k windows from the refine step on, as set in "
                    "*MVAR attention*). Sample 1, scale by scale, with the cost model's FLOPs and memory.")
        run = gr.Button("Run the ablation", variant="primary")
        status = gr.Markdown("")
        with gr.Column(elem_id="ablation"):
            strips = [gr.Image(label=name, interactive=False, buttons=[]) for name in VARIANTS]
        costs = gr.Markdown("", elem_id="ablation-costs")
    return AblationWidgets(run, status, *strips, costs)


def ablation_table(result: Ablation) -> str:
    """The ablation's cost figures as a Markdown table (the cost model; time measured here)."""
    rows = ["| | generation (measured) | GFLOPs | attention GFLOPs | KV cache MiB | peak MiB above weights |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, cost in result.costs.items():
        rows.append(f"| {name} | {result.seconds[name] * 1000:.0f} ms | {cost['GFLOPs']:.3g} | "
                    f"{cost['attention GFLOPs']:.3g} | {cost['KV cache MiB']:.3g} | {cost['peak MiB']:.3g} |")
    settings = result.settings
    return ("\n".join(rows) + f"\n\nOne image, {settings.precision}, CFG "
            f"{'on (two branches)' if settings.sampling.cfg > 0 else 'off'}; full MVAR: "
            f"{settings.windows_text(len(result.patch_nums))}. FLOPs and memory from the cost model (`mvar/costs.py`).")


def on_ablation(services: Services, key, cls, seed, cfg, top_k, top_p, smooth, count, precision, kernel, refine):
    models = load_models(services.registry, key)
    settings = parse_settings(models, cls, seed, cfg, top_k, top_p, smooth, count, precision, kernel, refine,
                              services.limits.max_images, services.tasks.precisions)
    result = services.tasks.ablation(key, settings)
    names = [f"{s + 1}: {p}x{p}" for s, p in enumerate(result.patch_nums)]
    strips = [services.files.shown(plots.filmstrip(result.previews[name], names)) for name in VARIANTS]
    status = (f"{settings.class_name!r}, seed {settings.seed}, {settings.sampling_text()}: the same weights under "
              "three attentions, sample 1, scale by scale.")
    return (status, *strips, ablation_table(result))


def wire(w: AblationWidgets, model: gr.Dropdown, settings: list, services: Services) -> None:
    """``settings``: the Generate part's settings widgets (GenerateWidgets.settings)."""
    w.run.click(ui_event(on_ablation, len(w.outputs()), services=services), [model, *settings], w.outputs(),
                concurrency_id="generate", **PRIVATE)
