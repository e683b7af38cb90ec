"""The page: one ``gr.Blocks`` layout wiring widgets to the handlers in ``handlers.py``.

Every event goes through a wrapper that turns ``UserError`` and other failures into a readable
``gr.Error`` message in the page, so the app stays up whatever a user sends.
"""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr
import torch

from mvar.config import MVAR_MODE, PRESETS, VAR_MODE

from . import handlers, plots
from .handlers import UserError
from .registry import ModelRegistry

log = logging.getLogger("mvar_studio")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
OVERLAY_SIZE = 384
DISPLAY_SIZE = 320


def readable_errors(fn):
    """Run a handler; show problems as messages instead of tracebacks."""

    def report(err: Exception):
        if isinstance(err, UserError):
            return gr.Error(str(err))
        if isinstance(err, torch.OutOfMemoryError | MemoryError):
            return gr.Error("out of memory: try fewer images or bf16")
        if isinstance(err, ValueError):
            return gr.Error(str(err))
        log.exception("handler %s failed", fn.__name__)
        return gr.Error(f"something went wrong ({type(err).__name__}); the app is still running")

    if _is_generator(fn):
        @functools.wraps(fn)
        def wrapped_gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - every failure becomes a message in the page
                raise report(err) from None
        return wrapped_gen

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise report(err) from None
    return wrapped


def display(image):
    """Previews are tiny (64 px for the default models): show them enlarged, with crisp pixels."""
    return None if image is None else plots.upscale(image, max(DISPLAY_SIZE, image.shape[0]))


def _is_generator(fn) -> bool:
    return inspect.isgeneratorfunction(fn)


def build_app(registry: ModelRegistry) -> gr.Blocks:
    entries = registry.entries()
    if not entries:
        raise SystemExit("error: no models available (assets/ is empty and no --models-dir files were found)")
    first = registry.load(entries[0].key)

    with gr.Blocks(title="MVAR Studio") as demo:
        record = gr.State(None)
        gr.Markdown("# MVAR Studio\nNext-scale generation with **MVAR** (scale- and spatial-Markov attention) "
                    "next to its **VAR** baseline: same class, same seeds, one scale at a time.")
        with gr.Row():
            model = gr.Dropdown([(e.label, e.key) for e in entries], value=entries[0].key, label="Model")
            baseline_note = gr.Markdown(first.baseline_note)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                class_name = gr.Dropdown(first.class_names, value=first.class_names[0], label="Class",
                                         filterable=True)
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0)
                    dice = gr.Button("random", size="sm")
                cfg = gr.Slider(0, 10, value=first.sampling["cfg"], step=0.1, label="CFG")
                top_k = gr.Number(first.sampling["top_k"], label="top-k (0 = off)", precision=0)
                top_p = gr.Slider(0.01, 1.0, value=first.sampling["top_p"], step=0.01, label="top-p (1 = off)")
                smooth = gr.Checkbox(False, label="Gumbel smoothing (for visualisation)")
                num_images = gr.Slider(1, handlers.MAX_IMAGES, value=1, step=1, label="Images")
                precision = gr.Radio(list(DTYPES), value="bf16", label="Precision")
                run = gr.Button("Generate", variant="primary")
            with gr.Column(scale=3):
                status = gr.Markdown("")
                with gr.Row():
                    mvar_image = gr.Image(label="MVAR", height=320, interactive=False, elem_id="mvar-image")
                    var_image = gr.Image(label="VAR baseline", height=320, interactive=False, elem_id="var-image")
                scale = gr.Slider(0, len(first.transformer.cfg.patch_nums) - 1, value=9, step=1,
                                  label="Scale (step back and forth without recomputing)", elem_id="scale-slider")
                mvar_strip = gr.Image(label="MVAR, scale by scale", interactive=False)
                var_strip = gr.Image(label="VAR, scale by scale", interactive=False)
                downloads = gr.File(label="Final images (PNG)", file_count="multiple")

        with gr.Tab("Attention"):
            gr.Markdown("Click a token on the left image (or set row/column) to see where it attends.")
            with gr.Row():
                layer = gr.Dropdown(["mean"], value="mean", label="Layer")
                head = gr.Dropdown(["mean"], value="mean", label="Head")
                token_row = gr.Number(0, label="Token row", precision=0)
                token_col = gr.Number(0, label="Token column", precision=0)
            caption = gr.Markdown("")
            with gr.Row():
                overlay = gr.Image(label="MVAR: attention on this scale's token grid", height=OVERLAY_SIZE,
                                   interactive=False, elem_id="attention-overlay")
                with gr.Column():
                    var_mass = gr.Plot(label="VAR: attention mass per scale")
            var_maps = gr.Plot(label="VAR: attention on every earlier scale")
            with gr.Row():
                mask_var = gr.Image(label="VAR mask (block-causal)", interactive=False)
                mask_scale = gr.Image(label="Scale-Markov mask", interactive=False)
                mask_mvar = gr.Image(label="MVAR mask (+ k x k windows)", interactive=False)

        with gr.Tab("Analysis"):
            gr.Markdown("The loaded model run in VAR mode over a few samples: how much attention falls on the "
                        "query's own scale and on nearby scales, and how much of the same-scale attention a "
                        "k x k window captures: the two observations MVAR is built on.")
            samples = gr.Slider(1, 8, value=4, step=1, label="Samples")
            analyse = gr.Button("Compute")
            distance_plot = gr.Plot()
            window_plot = gr.Plot()

        with gr.Tab("Memory"):
            gr.Markdown("Peak memory above the loaded weights, VAR against MVAR. **Measured**: one fresh "
                        "process per point, peak RSS minus RSS after loading (CPU) or the allocator's peak "
                        "(CUDA). **Analytic**: KV cache + the largest set of live activations, from the cost "
                        "model, for every batch size and for the official model sizes.")
            with gr.Row():
                measure_batches = gr.CheckboxGroup(["1", "2", "4", "8"], value=["1", "2", "4"],
                                                   label="Batch sizes to measure")
                measure_dtype = gr.Radio(["fp32", "bf16"], value="fp32", label="Precision")
                measure_button = gr.Button("Measure and plot")
            memory_plot = gr.Plot(label="This model: measured and analytic", elem_id="memory-plot")
            presets_plot = gr.Plot(label="Official sizes: analytic")

        with gr.Tab("Cost per scale"):
            costs_button = gr.Button("Show per-scale costs")
            kv_plot = gr.Plot()
            flops_plot = gr.Plot()
            latency_plot = gr.Plot(elem_id="latency-plot")

        # ----- events -----
        def on_model(key, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - shows hub download bars
            progress(0, desc="loading the model (downloading it first if it comes from the hub)")
            models = registry.load(key)
            return (gr.update(choices=models.class_names, value=models.class_names[0]), models.baseline_note,
                    models.sampling["cfg"], models.sampling["top_k"], models.sampling["top_p"])

        model.change(readable_errors(on_model), model, [class_name, baseline_note, cfg, top_k, top_p])
        dice.click(handlers.random_seed, None, seed)

        def on_generate(key, cls, seed_value, cfg_value, k, p, smooth_value, count, dtype_name):
            for frame in handlers.generate_frames(registry, key, cls, seed_value, cfg_value, k, p, smooth_value,
                                                  count, DTYPES.get(dtype_name)):
                shown = (display(frame.mvar_image), display(frame.var_image))
                if frame.record is None:
                    yield *shown, frame.status, gr.skip(), gr.skip(), gr.skip(), \
                        gr.skip(), gr.skip(), gr.skip(), gr.skip()
                else:
                    strips = handlers.filmstrips(frame.record)
                    layers = ["mean"] + [str(i) for i in frame.record.captured_layers]
                    heads = ["mean"] + [str(i) for i in range(frame.record.num_heads)]
                    yield (*shown, frame.status, frame.record, strips[0], strips[1],
                           handlers.save_finals(frame.record), frame.record.num_scales - 1,
                           gr.update(choices=layers, value="mean"), gr.update(choices=heads, value="mean"))

        run.click(readable_errors(on_generate),
                  [model, class_name, seed, cfg, top_k, top_p, smooth, num_images, precision],
                  [mvar_image, var_image, status, record, mvar_strip, var_strip, downloads, scale, layer, head],
                  concurrency_limit=2, concurrency_id="generate", api_name="generate")

        def on_scale(rec, s):
            return tuple(display(image) for image in handlers.scale_view(rec, s))

        scale.change(readable_errors(on_scale), [record, scale], [mvar_image, var_image])

        def on_attention(rec, s, lay, hd, r, c):
            if rec is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            view = handlers.attention_view(rec, s, lay, hd, r, c)
            return (view.mvar_overlay, view.var_heatmaps,
                    view.var_mass, view.masks[0], view.masks[1], view.masks[2], view.caption)

        attention_outputs = [overlay, var_maps, var_mass, mask_var, mask_scale, mask_mvar, caption]
        attention_inputs = [record, scale, layer, head, token_row, token_col]
        for trigger in (scale.release, layer.change, head.change, token_row.submit, token_col.submit):
            trigger(readable_errors(on_attention), attention_inputs, attention_outputs)
        record.change(readable_errors(on_attention), attention_inputs, attention_outputs)

        def on_click(rec, s, evt: gr.SelectData):
            row, col = handlers.token_from_click(rec, s, evt.index[0], evt.index[1], OVERLAY_SIZE)
            return row, col

        overlay.select(readable_errors(on_click), [record, scale], [token_row, token_col]).then(
            readable_errors(on_attention), attention_inputs, attention_outputs)

        def on_analyse(key, n, progress=gr.Progress()):  # noqa: B008 - Gradio injects progress this way
            models = registry.load(key)
            stats = handlers.attention_statistics(models, int(n), progress=progress)
            return (plots.mass_by_distance_figure(stats.mass_by_distance),
                    plots.window_mass_figure(list(stats.window_sizes), stats.mass_in_window,
                                             models.mvar_mode.kernel_size))

        analyse.click(readable_errors(on_analyse), [model, samples], [distance_plot, window_plot],
                      concurrency_id="generate")

        def on_costs(key, rec):
            models = registry.load(key)
            costs = handlers.per_scale_costs(models, rec)
            latency = costs.get("latency_ms")
            return (plots.per_scale_bars(costs["kv_cache_mib"], "KV cache after each scale (analytic)", "MiB"),
                    plots.per_scale_bars(costs["attention_mflops"], "Attention FLOPs per scale (analytic)",
                                         "MFLOP"),
                    plots.per_scale_bars(latency, "Latency per scale (measured, last generation)", "ms")
                    if latency else None)

        def on_memory(key, batches, dtype_name, progress=gr.Progress()):  # noqa: B008
            models = registry.load(key)
            chosen = sorted(int(b) for b in batches) or [1]
            measured = handlers.measured_memory_mib(models, chosen, dtype_name, progress)
            cfg = models.transformer.cfg
            analytic = {"VAR": handlers.analytic_memory_mib(cfg, VAR_MODE, dtype=dtype_name),
                        "MVAR": handlers.analytic_memory_mib(cfg, models.mvar_mode, dtype=dtype_name)}
            presets = {name: {"VAR": handlers.analytic_memory_mib(PRESETS[name].transformer, VAR_MODE,
                                                                  dtype="bf16"),
                              "MVAR": handlers.analytic_memory_mib(PRESETS[name].transformer, MVAR_MODE,
                                                                   dtype="bf16")}
                       for name in ("d16", "d20", "d24", "d30")}
            return (plots.memory_figure(analytic, {k: {b: v[b] for b in chosen if b in v} for k, v in
                                                   measured.items()}, "Peak memory above the weights (MiB)"),
                    plots.preset_memory_figure(presets, "Official sizes, bf16, CFG on (analytic)"))

        measure_button.click(readable_errors(on_memory), [model, measure_batches, measure_dtype],
                             [memory_plot, presets_plot], concurrency_id="generate")

        costs_button.click(readable_errors(on_costs), [model, record], [kv_plot, flops_plot, latency_plot])
    return demo
