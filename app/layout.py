"""The page: one ``gr.Blocks`` layout wiring widgets to the handlers in ``handlers.py``.

Every event goes through a wrapper that turns ``UserError`` and other failures into a readable
``gr.Error`` message in the page, so the app stays up whatever a user sends. Streaming (generator)
handlers also get a time limit: checked each time they produce a frame, and past it the handler is
closed (no work continues) and the user gets a message.

Load is bounded by Gradio's queue (``demo.queue(max_size=..., default_concurrency_limit=...)`` in
``app.py``): generation, analysis and memory measurement share the "generate" concurrency group, and a
request that finds the queue full is refused by Gradio before any work starts (HTTP 503: the page says "This
application is currently busy. Please try again.", gradio_client raises ``QueueError("Queue is full!
Please try again.")``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import torch

from mvar.config import MVAR_MODE, PRESETS, VAR_MODE
from mvar.devices import autocast_precisions
from mvar.memory import release_freed_memory

from . import handlers, plots
from .handlers import GenerationRecord, UserError
from .registry import ModelRegistry
from .zerogpu import ANALYSIS_SECONDS, GENERATE_SECONDS, GpuTasks

log = logging.getLogger("mvar_studio")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # offered: autocast_precisions(device)
OVERLAY_SIZE = 384
DISPLAY_SIZE = 320
DEFAULT_TIME_LIMIT = 300.0  # seconds per request, for streaming handlers
DEFAULT_KEEP_MIB = 1024  # memory for the generations kept for the views, all sessions together


def readable_errors(fn, time_limit: float | None = None):
    """Run a handler; show problems as messages instead of tracebacks.

    For a generator handler, ``time_limit`` (seconds, None = none) bounds the whole request: the clock
    is read each time the handler produces a frame, and past the limit the frame is dropped, the
    handler is closed (its ``finally`` blocks run, no more work is done) and a ``gr.Error`` says why.
    """

    def report(err: Exception):
        if isinstance(err, gr.Error):
            return err
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
            started = time.monotonic()
            frames = fn(*args, **kwargs)
            try:
                while True:
                    try:
                        frame = next(frames)
                    except StopIteration:
                        return
                    except Exception as err:  # noqa: BLE001 - every failure becomes a message in the page
                        raise report(err) from None
                    if time_limit is not None and time.monotonic() - started > time_limit:
                        log.warning("handler %s stopped at the %g s time limit", fn.__name__, time_limit)
                        raise gr.Error(f"this request took longer than the {time_limit:g} s limit and was "
                                       "stopped; try fewer images (or bf16)")
                    yield frame
            finally:
                frames.close()  # also when Gradio closes us (the user left or cancelled)
        return wrapped_gen

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise report(err) from None
    return wrapped


def record_bytes(record: GenerationRecord) -> int:
    """Memory held by a generation record: its previews, final images and captured attention."""
    total = 0
    for run in record.runs.values():
        total += sum(image.nbytes for image in run.previews) + sum(image.nbytes for image in run.finals)
        total += sum(weights.nbytes for scale in run.attention for weights in scale.values())
    return total


class GenerationStore:
    """The generations kept for the views (scale slider, attention tab, per-scale latency), in a memory budget.

    The page holds only a token (in ``gr.State``); the record stays here. Each session keeps one record
    (a new generation replaces its last one); past ``budget_bytes`` the least recently used records go
    (the newest is always kept); a session's record goes when its page closes (Gradio's unload event,
    ~15 s after a tab or client disconnects). Left in ``gr.State``, records (up to
    2 x ``handlers.CAPTURE_BUDGET_BYTES`` of attention each) would stay for an hour after the tab
    closes, for up to 10,000 sessions.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._records: OrderedDict[str, tuple[str | None, GenerationRecord, int]] = OrderedDict()
        self._latest: dict[str, str] = {}  # session -> its token
        self._lock = threading.Lock()

    def put(self, session: str | None, record: GenerationRecord) -> str:
        token = uuid.uuid4().hex
        size = record_bytes(record)
        with self._lock:
            if session is not None:
                self._records.pop(self._latest.pop(session, ""), None)
                self._latest[session] = token
            self._records[token] = (session, record, size)
            while self.nbytes > self.budget_bytes and len(self._records) > 1:
                self._forget(next(iter(self._records)))
        return token

    def get(self, token: str | None) -> GenerationRecord | None:
        """The record behind a token; None for no token; a message if it was dropped."""
        if token is None:
            return None
        with self._lock:
            if token not in self._records:
                raise UserError("this generation is no longer kept on the server (memory budget, or the page "
                                "was closed): generate again")
            self._records.move_to_end(token)
            return self._records[token][1]

    def drop_session(self, session: str | None) -> None:
        with self._lock:
            token = self._latest.get(session)
            if token is not None:
                self._forget(token)

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def _forget(self, token: str) -> None:
        session, _, _ = self._records.pop(token)
        if self._latest.get(session) == token:
            del self._latest[session]


def display(image):
    """Previews are tiny (64 px for the default models): show them enlarged, with crisp pixels."""
    return None if image is None else plots.upscale(image, max(DISPLAY_SIZE, image.shape[0]))


def _is_generator(fn) -> bool:
    return inspect.isgeneratorfunction(fn)


@dataclass(frozen=True)
class ModelTasks:
    """The page's work on the models, as functions of plain widget values (ZeroGPU calls when active).

    ``frames(key, class, seed, cfg, top_k, top_p, smooth, images, precision)`` streams handlers' Frames;
    ``statistics(key, samples, progress=None)`` gives (AttentionStats, the MVAR kernel size).
    """

    frames: Callable
    statistics: Callable
    precisions: tuple[str, ...]


def model_tasks(registry: ModelRegistry, gpu: GpuTasks) -> ModelTasks:
    """The model work of ``build_app``, run through ``gpu`` (see ``zerogpu.py``)."""
    offered = gpu.precisions() or autocast_precisions(registry.device)

    @gpu.task(GENERATE_SECONDS)
    def frames(key, class_name, seed, cfg, top_k, top_p, smooth, num_images, precision, device=None):
        if not isinstance(precision, str) or precision not in offered:
            raise UserError(f"precision must be one of {list(offered)} here, got {precision!r}")
        yield from handlers.generate_frames(registry, key, class_name, seed, cfg, top_k, top_p, smooth, num_images,
                                            DTYPES[precision], device=device)

    @gpu.task(ANALYSIS_SECONDS)
    def statistics(key, samples, progress=None, device=None):
        models = handlers.load_models(registry, key, device=device)
        return handlers.attention_statistics(models, samples, progress=progress), models.mvar_mode.kernel_size

    return ModelTasks(frames, statistics, offered)


def build_app(registry: ModelRegistry, time_limit: float | None = DEFAULT_TIME_LIMIT,
              keep_mib: float = DEFAULT_KEEP_MIB, gpu: GpuTasks | None = None) -> gr.Blocks:
    """The page. ``time_limit``: seconds a generation may run (None = no limit); ``keep_mib``: memory for
    the generations kept for the views, all sessions together (see :class:`GenerationStore`); ``gpu``: how
    the model work runs (default: directly on ``registry.device``; ZeroGPU calls, see ``zerogpu.py``)."""
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive seconds or None, got {time_limit!r}")
    if not keep_mib >= 0:
        raise ValueError(f"keep_mib must be >= 0, got {keep_mib!r}")
    store = GenerationStore(int(keep_mib * 2**20))
    gpu = gpu or GpuTasks()
    tasks = model_tasks(registry, gpu)
    memory_label = handlers.memory_label(registry.device)  # the memory jobs run on the server's device
    entries = registry.entries()
    if not entries:
        raise SystemExit("error: no models available (assets/ is empty and no --models-dir files were found)")
    first = registry.load(entries[0].key)

    with gr.Blocks(title="MVAR Studio") as demo:
        record = gr.State(None)  # a GenerationStore token
        gr.Markdown("# MVAR Studio\nNext-scale generation with **MVAR** (scale- and spatial-Markov attention) "
                    "next to its **VAR** baseline: same class, same seeds, one scale at a time.")
        with gr.Row():
            model = gr.Dropdown([(e.label, e.key) for e in entries], value=entries[0].key, label="Model")
            baseline_note = gr.Markdown(first.baseline_note)
        gr.Markdown(gpu.describe(registry.device), elem_id="device-line")
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
                precision = gr.Radio(list(tasks.precisions), label="Precision",
                                     value="bf16" if "bf16" in tasks.precisions else tasks.precisions[-1])
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
                        "model, for every batch size and for the official model sizes.\n\n"
                        f"Measured here on {registry.device}: **{memory_label}**.", elem_id="memory-measure")
            with gr.Row():
                measure_batches = gr.CheckboxGroup(["1", "2", "4", "8"], value=["1", "2", "4"],
                                                   label="Batch sizes to measure")
                measure_dtype = gr.Radio(list(autocast_precisions(registry.device)), value="fp32", label="Precision")
                measure_button = gr.Button("Measure and plot")
            memory_plot = gr.Plot(label="This model: measured and analytic", elem_id="memory-plot")
            presets_plot = gr.Plot(label="Official sizes: analytic")

        with gr.Tab("Cost per scale"):
            costs_button = gr.Button("Show per-scale costs")
            kv_plot = gr.Plot()
            flops_plot = gr.Plot()
            latency_plot = gr.Plot(elem_id="latency-plot")

        # ----- events -----
        def on_model(key, progress=gr.Progress()):  # noqa: B008 - Gradio's way to ask for a progress bar
            progress(0, desc="loading the model (downloading it first if it comes from the hub)")
            models = handlers.load_models(registry, key, progress)
            return (gr.update(choices=models.class_names, value=models.class_names[0]), models.baseline_note,
                    models.sampling["cfg"], models.sampling["top_k"], models.sampling["top_p"])

        model.change(readable_errors(on_model), model, [class_name, baseline_note, cfg, top_k, top_p])
        dice.click(handlers.random_seed, None, seed)

        def on_generate(key, cls, seed_value, cfg_value, k, p, smooth_value, count, dtype_name,
                        request: gr.Request):
            frames = tasks.frames(key, cls, seed_value, cfg_value, k, p, smooth_value, count, dtype_name)
            try:
                for frame in frames:
                    shown = (display(frame.mvar_image), display(frame.var_image))
                    if frame.record is None:
                        yield *shown, frame.status, gr.skip(), gr.skip(), gr.skip(), \
                            gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    else:
                        rec = frame.record
                        strips = handlers.filmstrips(rec)
                        layers = ["mean"] + [str(i) for i in rec.captured_layers]
                        heads = ["mean"] + [str(i) for i in range(rec.num_heads)]
                        token = store.put(request.session_hash if request else None, rec)
                        yield (*shown, frame.status, token, strips[0], strips[1],
                               handlers.save_finals(rec), rec.num_scales - 1,
                               gr.update(choices=layers, value="mean"), gr.update(choices=heads, value="mean"))
            finally:
                frames.close()
                release_freed_memory()

        # concurrency: the queue's default_concurrency_limit (--concurrency), shared with analysis and memory
        run.click(readable_errors(on_generate, time_limit),
                  [model, class_name, seed, cfg, top_k, top_p, smooth, num_images, precision],
                  [mvar_image, var_image, status, record, mvar_strip, var_strip, downloads, scale, layer, head],
                  concurrency_id="generate", api_name="generate")

        def on_scale(token, s):
            return tuple(display(image) for image in handlers.scale_view(store.get(token), s))

        scale.change(readable_errors(on_scale), [record, scale], [mvar_image, var_image])

        def on_attention(token, s, lay, hd, r, c):
            if token is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            view = handlers.attention_view(store.get(token), s, lay, hd, r, c)
            return (view.mvar_overlay, view.var_heatmaps,
                    view.var_mass, view.masks[0], view.masks[1], view.masks[2], view.caption)

        attention_outputs = [overlay, var_maps, var_mass, mask_var, mask_scale, mask_mvar, caption]
        attention_inputs = [record, scale, layer, head, token_row, token_col]
        for trigger in (scale.release, layer.change, head.change, token_row.submit, token_col.submit):
            trigger(readable_errors(on_attention), attention_inputs, attention_outputs)
        record.change(readable_errors(on_attention), attention_inputs, attention_outputs)

        def on_click(token, s, evt: gr.SelectData):
            row, col = handlers.token_from_click(store.get(token), s, evt.index[0], evt.index[1], OVERLAY_SIZE)
            return row, col

        overlay.select(readable_errors(on_click), [record, scale], [token_row, token_col]).then(
            readable_errors(on_attention), attention_inputs, attention_outputs)

        def on_analyse(key, n, progress=gr.Progress()):  # noqa: B008 - Gradio injects progress this way
            # a ZeroGPU call pickles its arguments: gr.Progress stays here, the bar then shows no steps
            stats, kernel_size = tasks.statistics(key, n, progress=None if gpu.active else progress)  # checks n
            return (plots.mass_by_distance_figure(stats.mass_by_distance),
                    plots.window_mass_figure(list(stats.window_sizes), stats.mass_in_window, kernel_size))

        analyse.click(readable_errors(on_analyse), [model, samples], [distance_plot, window_plot],
                      concurrency_id="generate")

        def on_costs(key, token):
            models = handlers.load_models(registry, key)
            try:
                rec = store.get(token)
            except UserError:
                rec = None  # dropped: the analytic costs without the measured latency
            costs = handlers.per_scale_costs(models, rec)
            latency = costs.get("latency_ms")
            return (plots.per_scale_bars(costs["kv_cache_mib"], "KV cache after each scale (analytic)", "MiB"),
                    plots.per_scale_bars(costs["attention_mflops"], "Attention FLOPs per scale (analytic)",
                                         "MFLOP"),
                    plots.per_scale_bars(latency, "Latency per scale (measured, last generation)", "ms")
                    if latency else None)

        # the official sizes' analytic curves do not depend on anything the page sends
        presets = {name: {"VAR": handlers.analytic_memory_mib(PRESETS[name].transformer, VAR_MODE, dtype="bf16"),
                          "MVAR": handlers.analytic_memory_mib(PRESETS[name].transformer, MVAR_MODE, dtype="bf16")}
                   for name in ("d16", "d20", "d24", "d30")}

        def on_memory(key, batches, dtype_name, progress=gr.Progress()):  # noqa: B008
            models = handlers.load_models(registry, key)
            measured = handlers.measured_memory_mib(models, batches, dtype_name, progress,  # it checks batches
                                                    device=registry.device)
            chosen = sorted({int(b) for b in batches})
            cfg = models.transformer.cfg
            analytic = {"VAR": handlers.analytic_memory_mib(cfg, VAR_MODE, dtype=dtype_name),
                        "MVAR": handlers.analytic_memory_mib(cfg, models.mvar_mode, dtype=dtype_name)}
            shown = {k: {b: v[b] for b in chosen if b in v} for k, v in measured.items()}
            return (plots.memory_figure(analytic, shown, f"Peak memory (MiB); measured: {memory_label}"),
                    plots.preset_memory_figure(presets, "Official sizes, bf16, CFG on (analytic)"))

        measure_button.click(readable_errors(on_memory), [model, measure_batches, measure_dtype],
                             [memory_plot, presets_plot], concurrency_id="generate")

        costs_button.click(readable_errors(on_costs), [model, record], [kv_plot, flops_plot, latency_plot])

        def on_close(request: gr.Request):
            store.drop_session(request.session_hash)
            release_freed_memory()

        demo.unload(on_close)
    return demo
