"""Event wiring: which widget change runs which handler, and the app's small named API.

Page events are private (not in the API) and wrapped by ``policy.ui_event``: a refused input shows its
message and leaves every output as it was. The named API (``/generate``, ``/attention``, ``/models``) has
typed, named parameters and outputs, and raises ``gr.Error`` for a refusal, so a script sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from mvar.config import MVAR_MODE, PRESETS, VAR_MODE
from mvar.memory import release_freed_memory

from . import handlers, plots
from .handlers import Filmstrip, GenerationRecord, UserError
from .layout import OVERLAY_SIZE, Page, example_presets, model_text
from .policy import GenerationStore, ImageFiles, ServerLimits, api_endpoint, ui_event, within_time_limit
from .registry import ModelRegistry
from .tasks import ModelTasks
from .zerogpu import GpuTasks

DISPLAY_SIZE = 320  # previews are tiny (64 px for the default models): shown enlarged, with crisp pixels
PRIVATE = dict(api_visibility="private")


@dataclass
class Services:
    registry: ModelRegistry
    store: GenerationStore
    files: ImageFiles
    tasks: ModelTasks
    limits: ServerLimits
    gpu: GpuTasks
    memory_label: str


@dataclass
class ApiWidgets:
    """Hidden components that give the API its typed, named parameters and outputs."""

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


def api_widgets() -> ApiWidgets:
    with gr.Group(visible=False):
        widgets = ApiWidgets(
            trigger=gr.Button("api"), model=gr.Textbox(label="model"), class_name=gr.Textbox(label="class_name"),
            seed=gr.Number(label="seed", precision=0), cfg=gr.Number(label="cfg"),
            top_k=gr.Number(label="top_k", precision=0), top_p=gr.Number(label="top_p"),
            images=gr.Number(label="images", precision=0), precision=gr.Textbox(label="precision"),
            mvar_images=gr.Gallery(label="mvar_images"), var_images=gr.Gallery(label="var_images"),
            generation=gr.JSON(label="generation"), generation_id=gr.Textbox(label="generation_id"),
            scale=gr.Number(label="scale", precision=0), row=gr.Number(label="row", precision=0),
            col=gr.Number(label="col", precision=0), sample=gr.Number(label="sample", precision=0),
            attention=gr.JSON(label="attention"), models=gr.JSON(label="models"))
    return widgets


# ---------------------------------------------------------------------------------------------
# Turning handler data into widget values
# ---------------------------------------------------------------------------------------------


def shown(files: ImageFiles, image):
    """A preview enlarged for the page, as a PNG file written once (see ``policy.ImageFiles``)."""
    if image is None:
        return None
    return files.shown(plots.upscale(image, max(DISPLAY_SIZE, image.shape[0])))


def strip_file(files: ImageFiles, strip: Filmstrip | None):
    return None if strip is None else files.shown(plots.filmstrip(strip.frames, strip.labels, strip.current))


COLUMNS = {"MVAR": "MVAR", "VAR": "VAR baseline"}


def image_label(name: str, shown_scale: str | None) -> str:
    """An image's label: its column and the scale it shows ("MVAR, scale 3 of 10 (3x3)")."""
    return COLUMNS[name] if shown_scale is None else f"{COLUMNS[name]}, {shown_scale}"


def wire(demo: gr.Blocks, page: Page, api: ApiWidgets, services: Services) -> None:
    registry, store, files, tasks = services.registry, services.store, services.files, services.tasks
    head, gen, att, abl, ana, mem, cost = (page.header, page.generate, page.attention, page.ablation, page.analysis,
                                           page.memory, page.costs)
    token_scale = gr.State(None)  # the 0-based scale the token row / column boxes refer to

    # ----- model choice -----------------------------------------------------------------------
    def on_model(key, progress=gr.Progress()):  # noqa: B008 - Gradio's way to ask for a progress bar
        progress(0, desc="loading the model (downloading it first if it comes from the hub)")
        models = handlers.load_models(registry, key, progress)
        precision = handlers.default_precision(models, tasks.precisions)
        if not services.gpu.active:
            progress(0.95, desc="warming up (one small generation per mode)")
            handlers.warm_up(models, precision)
        num_scales = len(models.transformer.cfg.patch_nums)
        return (gr.update(choices=models.class_names, value=models.class_names[0]), model_text(models),
                models.sampling["cfg"], models.sampling["top_k"], models.sampling["top_p"], precision,
                gr.update(choices=handlers.kernel_choices(models), value=str(models.mvar_mode.kernel_size)),
                models.mvar_mode.refine_step, gr.Dataset(samples=example_presets(models.class_names)),
                gr.update(maximum=num_scales, value=num_scales))

    model_outputs = [gen.class_name, head.model_note, gen.cfg, gen.top_k, gen.top_p, gen.precision, gen.kernel,
                     gen.refine_step, gen.examples, gen.scale]
    head.model.change(ui_event(on_model, len(model_outputs)), head.model, model_outputs, **PRIVATE)
    gen.dice.click(handlers.random_seed, None, gen.seed, **PRIVATE)
    gen.examples.click(lambda sample: (sample[0], sample[1]), gen.examples, [gen.class_name, gen.seed], **PRIVATE)

    # ----- generation -------------------------------------------------------------------------
    gen_outputs = [gen.mvar_image, gen.var_image, gen.status, head.record, gen.scale, gen.sample, gen.mvar_gallery,
                   gen.var_gallery, gen.mvar_strip, gen.var_strip, gen.downloads, att.layer, att.head]
    skip_rest = tuple(gr.skip() for _ in gen_outputs[3:])

    def on_generate(key, cls, seed, cfg, k, p, smooth, count, precision, kernel, refine, request: gr.Request):
        frames = tasks.frames(key, cls, seed, cfg, k, p, smooth, count, precision, kernel, refine)
        try:
            for frame in frames:
                rec = frame.record
                images = [gr.update(value=shown(files, image), label=image_label(name, frame.shown_scales.get(name)))
                          for name, image in (("MVAR", frame.mvar_image), ("VAR", frame.var_image))]
                if rec is None:
                    yield (*images, frame.status, *skip_rest)
                    continue
                num_scales = rec.num_scales
                token = store.put(request.session_hash if request else None, rec)
                finals = handlers.final_images(rec)
                downloads = files.downloads(token, {handlers.download_name(rec, name, i): image
                                                    for name, images_ in finals.items()
                                                    for i, image in enumerate(images_)})
                strips = handlers.filmstrips(rec)
                yield (*images, frame.status, token,
                       gr.update(maximum=num_scales, value=num_scales),
                       gr.update(choices=[str(i + 1) for i in range(rec.num_images)], value="1"),
                       [(files.shown(image), f"sample {i + 1}") for i, image in enumerate(finals["MVAR"])],
                       [(files.shown(image), f"sample {i + 1}") for i, image in enumerate(finals["VAR"])],
                       strip_file(files, strips[0]), strip_file(files, strips[1]), downloads,
                       gr.update(choices=["mean"] + [str(i) for i in rec.captured_layers], value="mean"),
                       gr.update(choices=["mean"] + [str(i) for i in range(rec.num_heads)], value="mean"))
        finally:
            frames.close()
            release_freed_memory()

    # concurrency: the queue's default_concurrency_limit (--concurrency), shared with analysis and memory
    generation = gen.run.click(
        ui_event(on_generate, len(gen_outputs), services.limits.time_limit),
        [head.model, gen.class_name, gen.seed, gen.cfg, gen.top_k, gen.top_p, gen.smooth, gen.num_images,
         gen.precision, gen.kernel, gen.refine_step], gen_outputs, concurrency_id="generate", **PRIVATE)
    gen.stop.click(None, None, None, cancels=[generation], **PRIVATE)

    # ----- stepping and samples ---------------------------------------------------------------
    def views(token, scale, sample=None):
        record = store.get(token)
        if record is None:
            return tuple(gr.skip() for _ in range(4))
        # the record's shown sample, not the event's: a reply to an older event must not bring back the
        # sample the user picked before (events of one page can finish out of order)
        sample = record.shown_sample + 1
        mvar_image, var_image = handlers.scale_view(record, scale, sample)
        s = handlers.check_scale(record, scale)
        side = record.patch_nums[s]
        strips = handlers.filmstrips(record, scale, sample)
        labels = [image_label(name, handlers.scale_name(s, record.num_scales, side)) for name in ("MVAR", "VAR")]
        return (gr.update(value=shown(files, mvar_image), label=labels[0]),
                gr.update(value=shown(files, var_image), label=labels[1]),
                strip_file(files, strips[0]), strip_file(files, strips[1]))

    view_outputs = [gen.mvar_image, gen.var_image, gen.mvar_strip, gen.var_strip]
    gen.scale.change(ui_event(views, len(view_outputs)), [head.record, gen.scale, gen.sample], view_outputs,
                     trigger_mode="always_last", **PRIVATE)

    def ensure_sample(token, record: GenerationRecord, sample) -> None:
        """Decode and capture a sample of a kept generation once (a model task), and keep the result."""
        index = handlers.check_sample(record, sample)
        if index not in record.runs["MVAR"].previews or index not in record.runs["MVAR"].attention:
            previews, attention = tasks.sample(record.model_key, record, index)
            for name, run in record.runs.items():
                run.previews[index], run.attention[index] = previews[name], attention[name]
            store.refresh(token)

    def on_sample(token, sample, scale):
        record = store.get(token)
        if record is None:
            return tuple(gr.skip() for _ in range(4))
        ensure_sample(token, record, sample)
        record.shown_sample = handlers.check_sample(record, sample)
        return views(token, scale)

    sample_event = gen.sample.change(ui_event(on_sample, len(view_outputs)), [head.record, gen.sample, gen.scale],
                                     view_outputs, concurrency_id="generate", **PRIVATE)

    def pick_sample(evt: gr.SelectData):
        return str(evt.index + 1)

    gen.mvar_gallery.select(pick_sample, None, gen.sample, **PRIVATE)
    gen.var_gallery.select(pick_sample, None, gen.sample, **PRIVATE)

    # ----- attention ----------------------------------------------------------------------------
    att_outputs = [att.overlay, att.var_maps, att.var_mass, att.mask_var, att.mask_scale, att.mask_mvar, att.caption,
                   att.token_row, att.token_col, token_scale]

    def on_attention(token, scale, layer, head_, row, col, sample, referred):
        record = store.get(token) if token is not None else None
        if record is None:
            return tuple(gr.skip() for _ in att_outputs)
        s = handlers.check_scale(record, scale)
        row, col, moved = handlers.token_after_scale_change(record, referred, s, row, col)
        view = handlers.attention_view(record, scale, layer, head_, row, col, record.shown_sample + 1)
        overlay = plots.attention_overlay(view.mvar_preview, view.mvar_grid, view.token, size=OVERLAY_SIZE,
                                          window=view.window)
        masks = [plots.mask_figure(view.patch_nums, kind, view.refine_step, view.kernel_size,
                                   highlight_row=view.position) for kind in ("var", "scale-markov", "mvar")]
        return (files.shown(plots.with_colour_bar(overlay, float(view.mvar_grid.max()))),
                plots.cross_scale_heatmaps(view.var_grids, f"VAR: where token {view.token} attends, scale by scale"),
                plots.mass_by_scale_figure(view.var_mass, view.scale, "VAR: attention mass per scale"),
                *masks, view.caption,
                # the boxes are written only when the token moved with the scale: otherwise a reply to an
                # earlier event would overwrite what the user is typing into them
                view.token[0] if moved else gr.skip(), view.token[1] if moved else gr.skip(), s)

    att_inputs = [head.record, gen.scale, att.layer, att.head, att.token_row, att.token_col, gen.sample, token_scale]
    attention = ui_event(on_attention, len(att_outputs))
    for trigger in (att.layer.change, att.head.change, att.token_row.submit, att.token_col.submit):
        trigger(attention, att_inputs, att_outputs, **PRIVATE)
    gen.scale.change(attention, att_inputs, att_outputs, trigger_mode="always_last", **PRIVATE)
    head.record.change(attention, att_inputs, att_outputs, **PRIVATE)
    sample_event.then(attention, att_inputs, att_outputs, **PRIVATE)

    def click_token(token, scale, evt: gr.SelectData, width: int):
        record = store.get(token)
        row, col = handlers.token_from_click(record, scale, evt.index[0], evt.index[1], width)
        return row, col

    def on_overlay_click(token, scale, evt: gr.SelectData):  # the grid is OVERLAY_SIZE wide; the bar beyond it
        return click_token(token, scale, evt, OVERLAY_SIZE)

    def on_image_click(token, scale, evt: gr.SelectData):  # the generated images, shown DISPLAY_SIZE wide
        return click_token(token, scale, evt, DISPLAY_SIZE)

    for image, handler in ((att.overlay, on_overlay_click), (gen.mvar_image, on_image_click),
                           (gen.var_image, on_image_click)):
        image.select(ui_event(handler, 2), [head.record, gen.scale], [att.token_row, att.token_col],
                     **PRIVATE).then(attention, att_inputs, att_outputs, **PRIVATE)

    # ----- ablation -----------------------------------------------------------------------------
    def on_ablation(key, cls, seed, cfg, k, p, smooth, count, precision, kernel, refine):
        models = handlers.load_models(registry, key)
        settings = handlers.parse_settings(models, cls, seed, cfg, k, p, smooth, count, precision, kernel, refine,
                                           services.limits.max_images, tasks.precisions)
        result = tasks.ablation(key, settings)
        strips = [files.shown(plots.filmstrip(result.previews[name],
                                              [f"{s + 1}: {q}x{q}" for s, q in enumerate(result.patch_nums)]))
                  for name in ("VAR", "+ scale-Markov", "full MVAR")]
        status = (f"{settings.class_name!r}, seed {settings.seed}, {settings.precision}: the same weights under "
                  "three attentions, sample 1, scale by scale.")
        return (status, *strips, handlers.ablation_table(result))

    abl_outputs = [abl.status, abl.var_strip, abl.scale_markov_strip, abl.mvar_strip, abl.costs]
    abl.run.click(ui_event(on_ablation, len(abl_outputs)),
                  [head.model, gen.class_name, gen.seed, gen.cfg, gen.top_k, gen.top_p, gen.smooth, gen.num_images,
                   gen.precision, gen.kernel, gen.refine_step], abl_outputs, concurrency_id="generate", **PRIVATE)

    # ----- analysis -----------------------------------------------------------------------------
    def on_analyse(key, n, progress=gr.Progress()):  # noqa: B008 - Gradio injects progress this way
        # a ZeroGPU call pickles its arguments: gr.Progress stays here, the bar then shows no steps
        stats, kernel_size = tasks.statistics(key, n, progress=None if services.gpu.active else progress)
        return (handlers.analysis_conclusion(stats, kernel_size),
                plots.mass_by_distance_figure(stats.mass_by_distance),
                plots.window_mass_figure(list(stats.window_sizes), stats.mass_in_window, kernel_size))

    ana.run.click(ui_event(on_analyse, 3), [head.model, ana.samples], [ana.conclusion, ana.distance_plot,
                                                                       ana.window_plot],
                  concurrency_id="generate", **PRIVATE)

    # ----- memory -------------------------------------------------------------------------------
    presets = {name: {"VAR": handlers.analytic_memory_mib(PRESETS[name].transformer, VAR_MODE, dtype="bf16"),
                      "MVAR": handlers.analytic_memory_mib(PRESETS[name].transformer, MVAR_MODE, dtype="bf16")}
               for name in ("d16", "d20", "d24", "d30")}

    def on_memory(key, batches, dtype_name, progress=gr.Progress()):  # noqa: B008
        models = handlers.load_models(registry, key)
        measured = handlers.measured_memory_mib(models, batches, dtype_name, progress, device=registry.device)
        chosen = sorted({int(b) for b in batches})
        cfg = models.transformer.cfg
        analytic = {"VAR": handlers.analytic_memory_mib(cfg, VAR_MODE, dtype=dtype_name),
                    "MVAR": handlers.analytic_memory_mib(cfg, models.mvar_mode, dtype=dtype_name)}
        points = {k: {b: v[b] for b in chosen if b in v} for k, v in measured.items()}
        return (plots.memory_figure(analytic, points, f"Peak memory, {dtype_name}, CFG on; measured: "
                                                      f"{services.memory_label}"),
                plots.preset_memory_figure(presets, "Official sizes d16-d30, bf16, CFG on (analytic)"))

    mem.run.click(ui_event(on_memory, 2), [head.model, mem.batches, mem.precision], [mem.plot, mem.presets_plot],
                  concurrency_id="generate", **PRIVATE)

    # ----- costs --------------------------------------------------------------------------------
    def on_costs(key, token):
        models = handlers.load_models(registry, key)
        try:
            record = store.get(token)
        except UserError:
            record = None  # dropped: the analytic costs without the measured latency
        if record is not None and record.model_key != key:
            record = None  # another model's generation says nothing about this one
        costs = handlers.per_scale_costs(models, record)
        what = f"batch {costs['batch']}, {costs['dtype']}, CFG on (two branches)"
        latency = costs.get("latency_ms")
        return (plots.per_scale_bars(costs["kv_cache_mib"], f"KV cache after each scale (analytic; {what})", "MiB",
                                     zero_note="0: no cache"),
                plots.per_scale_bars(costs["attention_mflops"], f"Attention FLOPs per scale (analytic; {what})",
                                     "MFLOP"),
                plots.per_scale_bars(latency, f"Latency per scale, generation alone (measured; {what})", "ms")
                if latency else plots.placeholder_figure("Latency per scale (measured)",
                                                         "generate an image with this model first"))

    cost.run.click(ui_event(on_costs, 3), [head.model, head.record], [cost.kv_plot, cost.flops_plot,
                                                                       cost.latency_plot], **PRIVATE)

    # ----- the named API --------------------------------------------------------------------------
    def generate(model, class_name, seed, cfg, top_k, top_p, images, precision, request: gr.Request):
        """Generate ``images`` samples of a class with MVAR and the VAR baseline; returns both galleries and the
        generation (its id for /attention, the seed and settings used, the timings)."""
        record = None
        frames = tasks.frames(model, class_name, seed, cfg, top_k, top_p, False, images, precision)
        for frame in within_time_limit(frames, services.limits.time_limit, "generate"):
            record = frame.record or record
        token = store.put(request.session_hash if request else None, record)
        finals = handlers.final_images(record)
        runs = record.runs
        info = {"generation_id": token, "seed": record.seed, "class_name": record.class_name,
                "precision": record.settings.precision, "cfg": record.settings.sampling.cfg,
                "top_k": record.settings.sampling.top_k, "top_p": record.settings.sampling.top_p,
                "mvar": {"label": record.labels.get("MVAR"), "generation_ms": sum(runs["MVAR"].seconds) * 1000},
                "var": {"label": record.labels.get("VAR"), "generation_ms": sum(runs["VAR"].seconds) * 1000}}
        return ([files.shown(i) for i in finals["MVAR"]], [files.shown(i) for i in finals["VAR"]], info)

    api.trigger.click(api_endpoint(generate), [api.model, api.class_name, api.seed, api.cfg, api.top_k, api.top_p,
                                               api.images, api.precision],
                      [api.mvar_images, api.var_images, api.generation], api_name="generate",
                      concurrency_id="generate")

    def attention_api(generation_id, scale, row, col, sample):
        """Attention of one token (scale 1-based, row, column, sample 1-based) of a generation from /generate:
        MVAR's weights on the token's own grid, VAR's attention mass per scale, and the caption."""
        record = store.get(generation_id)
        if record is None:
            raise UserError("generation_id is empty: pass the one /generate returned")
        ensure_sample(generation_id, record, sample)
        view = handlers.attention_view(record, scale, "mean", "mean", row, col, sample)
        return {"mvar_grid": view.mvar_grid.round(6).tolist(), "window": view.window,
                "var_mass_per_scale": view.var_mass.round(6).tolist(), "caption": view.caption}

    api.trigger.click(api_endpoint(attention_api), [api.generation_id, api.scale, api.row, api.col, api.sample],
                      api.attention, api_name="attention", concurrency_id="generate")

    def models_api():
        """The models this server offers: key (pass it as ``model``) and label."""
        return [{"key": e.key, "label": e.label} for e in registry.entries()]

    api.trigger.click(api_endpoint(models_api), None, api.models, api_name="models")

    # ----- page close -----------------------------------------------------------------------------
    def on_close(request: gr.Request):
        store.drop_session(request.session_hash)
        release_freed_memory()

    demo.unload(on_close)


# ---------------------------------------------------------------------------------------------
# The Edit tab
# ---------------------------------------------------------------------------------------------

PYRAMID_CELL = 128  # pixels of a reconstruction in the pyramid gallery (at least)


def wire_edit(edit, header, services: Services, demo: gr.Blocks | None = None) -> None:
    """The Edit tab (``layout.EditWidgets``): loading an image (a dataset sample or an upload) and its pyramid,
    the preset masks, the edit itself (streamed scale by scale like a generation, under the generation's time
    limit, in the "generate" concurrency group) and stepping through it. Edits are kept in ``services.store``
    under the session's own edit key (``<session>:edit``), so they never replace the session's generation;
    ``demo``: where to drop them when the page closes."""
    from . import editing

    registry, store, files, tasks = services.registry, services.store, services.files, services.tasks

    def edit_session(request: gr.Request | None) -> str | None:
        return f"{request.session_hash}:edit" if request is not None and request.session_hash else None

    # ----- the source image and its pyramid ---------------------------------------------------
    def loaded(models, source):
        label = editing.source_label(models, source)
        return (editing.editor_value(source, files), source, source.describe(),
                gr.update(value=label) if label else gr.skip())

    def on_sample(key, index):
        models = handlers.load_models(registry, key)
        source = editing.dataset_image(index, models.tokenizer.cfg.image_size)
        return (*loaded(models, source), int(index) + 1)

    def on_upload(key, path):
        models = handlers.load_models(registry, key)
        return loaded(models, editing.uploaded_image(path, models.tokenizer.cfg.image_size))

    def on_pyramid(key, source):
        if source is None:
            return gr.skip(), gr.skip()
        view = tasks.pyramid(key, source)
        gallery = [(files.shown(plots.upscale(image, max(PYRAMID_CELL, image.shape[0]))), caption)
                   for image, caption in zip(view.images, view.captions, strict=True)]
        return gallery, plots.psnr_figure(view.psnr, view.patch_nums,
                                          "The tokenizer's reconstruction against the image, after each scale")

    load_outputs = [edit.editor, edit.source, edit.source_note, edit.class_name]
    pyramid_outputs = [edit.pyramid, edit.psnr_plot]
    sampled = edit.sample.click(ui_event(on_sample, len(load_outputs) + 1), [header.model, edit.next_index],
                                [*load_outputs, edit.next_index], **PRIVATE)
    uploaded = edit.upload.upload(ui_event(on_upload, len(load_outputs)), [header.model, edit.upload], load_outputs,
                                  **PRIVATE)
    for event in (sampled, uploaded):
        event.then(ui_event(on_pyramid, 2), [header.model, edit.source], pyramid_outputs, concurrency_id="generate",
                   **PRIVATE)

    # ----- preset masks ---------------------------------------------------------------------------
    def preset(kind: str):
        def on_preset(source, percent):
            if source is None:
                raise UserError("load an image first: press **Sample from the dataset** or **Upload an image**")
            mask = editing.preset_mask(kind, source.size, percent)
            return editing.editor_value(source, files, editing.mask_layer(mask) if mask.any() else None)

        on_preset.__name__ = f"on_mask_{kind}"
        return ui_event(on_preset, 1)

    for button, kind in ((edit.mask_centre, "centre"), (edit.mask_border, "border"), (edit.mask_all, "everything"),
                         (edit.mask_clear, "clear")):
        button.click(preset(kind), [edit.source, edit.box], edit.editor, **PRIVATE)

    # ----- the edit -------------------------------------------------------------------------------
    def column(name: str) -> str:
        return "MVAR" if name == "MVAR" else "VAR baseline"

    def image_update(record, name: str, image, scale: int):
        if name not in record.request.models:
            return gr.update(value=None, label=f"{column(name)}: not run (Models: {record.request.models[0]} only)")
        return gr.update(value=shown(files, image), label=editing.edit_label(record, name, scale))

    edit_outputs = [edit.mvar_image, edit.var_image, edit.status, edit.record, edit.scale, edit.mvar_strip,
                    edit.var_strip, edit.regenerated]
    skip_all = tuple(gr.skip() for _ in edit_outputs)

    def on_edit(key, source, editor, cls, seed, mode, keep, blend, request: gr.Request):
        models = handlers.load_models(registry, key)
        try:
            wanted = editing.parse_edit(models, source, editor, cls, seed, mode, keep, blend)
        except editing.NothingToEdit as err:  # not a failure: the page says what to do
            gr.Warning(str(err))
            why = str(err).removeprefix("nothing to edit: ")
            yield (*skip_all[:2], f"**Nothing to edit.** {why[:1].upper()}{why[1:]}", *skip_all[3:])
            return
        idle = {name: gr.update(value=None, label=column(name) + ("" if name in wanted.models else ": not run"))
                for name in ("MVAR", "VAR")}
        patch_nums = models.transformer.cfg.patch_nums
        yield (idle["MVAR"], idle["VAR"], (f"{wanted.note}  \n" if wanted.note else "") + "encoding the image ...",
               *skip_all[3:7], files.shown(plots.upscale(editing.regenerated_view(wanted.source, wanted.mask),
                                                         max(DISPLAY_SIZE, wanted.source.size))))
        frames = tasks.edit(key, wanted)
        try:
            for frame in frames:
                record = frame.record
                if record is None:
                    where = handlers.scale_name(frame.scale, len(patch_nums), patch_nums[frame.scale])
                    images = [gr.update(value=shown(files, frame.images[name]), label=f"{column(name)}, {where}")
                              if name in frame.images else gr.skip() for name in ("MVAR", "VAR")]
                    yield (*images, frame.status, *skip_all[3:])
                    continue
                token = store.put(edit_session(request), record)
                last = record.num_scales - 1
                strips = editing.edit_filmstrips(record)
                yield (image_update(record, "MVAR", record.final("MVAR"), last),
                       image_update(record, "VAR", record.final("VAR"), last), frame.status, token,
                       gr.update(maximum=record.num_scales, value=record.num_scales),
                       strip_file(files, strips["MVAR"]), strip_file(files, strips["VAR"]), gr.skip())
        finally:
            frames.close()
            release_freed_memory()

    editing_event = edit.run.click(
        ui_event(on_edit, len(edit_outputs), services.limits.time_limit),
        [header.model, edit.source, edit.editor, edit.class_name, edit.seed, edit.mode, edit.keep_scales,
         edit.final_blend], edit_outputs, concurrency_id="generate", **PRIVATE)
    edit.stop.click(None, None, None, cancels=[editing_event], **PRIVATE)

    # ----- stepping through a kept edit ------------------------------------------------------------
    def on_scale(token, scale):
        record = store.get(token)
        if not isinstance(record, editing.EditRecord):
            return tuple(gr.skip() for _ in range(4))
        s = editing.check_edit_scale(record, scale)
        images = editing.edit_view(record, scale)
        strips = editing.edit_filmstrips(record, scale)
        return (image_update(record, "MVAR", images.get("MVAR"), s), image_update(record, "VAR", images.get("VAR"), s),
                strip_file(files, strips["MVAR"]), strip_file(files, strips["VAR"]))

    edit.scale.change(ui_event(on_scale, 4), [edit.record, edit.scale],
                      [edit.mvar_image, edit.var_image, edit.mvar_strip, edit.var_strip], trigger_mode="always_last",
                      **PRIVATE)

    # ----- another model ------------------------------------------------------------------------
    def on_model(key):
        models = handlers.load_models(registry, key)
        num_scales = len(models.transformer.cfg.patch_nums)
        return (gr.update(choices=models.class_names, value=models.class_names[0]),
                gr.update(maximum=num_scales, value=num_scales),
                gr.update(maximum=num_scales - 1, value=0, label=editing.keep_label(num_scales)))

    header.model.change(ui_event(on_model, 3), header.model, [edit.class_name, edit.scale, edit.keep_scales],
                        **PRIVATE).then(ui_event(on_pyramid, 2), [header.model, edit.source], pyramid_outputs,
                                        concurrency_id="generate", **PRIVATE)

    if demo is not None:
        def on_close(request: gr.Request):
            store.drop_session(edit_session(request))

        demo.unload(on_close)
