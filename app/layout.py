"""The page's widgets, and nothing else: one function per part of the page, each returning its widgets.

Event wiring is in ``events.py``, server policy in ``policy.py``, figures in ``plots.py``. Every control
shows its range in its label; the handlers refuse values outside it with a message in the same words.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from . import handlers

PAPER_URL = "https://arxiv.org/abs/2505.12742"
CODE_URL = "https://github.com/CVL-UESTC/MVAR"
VAR_URL = "https://github.com/FoundationVision/VAR"
OVERLAY_SIZE = 384  # pixels of the attention overlay's token grid (its colour bar comes on the right)

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

CSS = """
#filmstrips img, #ablation img {object-fit: contain;}
@media (max-width: 640px) {
  .gradio-container {padding: 4px !important;}
  #model-row > div {min-width: 100% !important;}
  #mvar-image, #var-image {min-width: 100% !important;}
}
"""


@dataclass
class Header:
    model: gr.Dropdown
    model_note: gr.Markdown
    device_line: gr.Markdown
    record: gr.State  # a GenerationStore token


@dataclass
class GenerateWidgets:
    class_name: gr.Dropdown
    seed: gr.Number
    dice: gr.Button
    cfg: gr.Number
    top_k: gr.Number
    top_p: gr.Number
    smooth: gr.Checkbox
    num_images: gr.Radio
    precision: gr.Radio
    kernel: gr.Dropdown
    refine_step: gr.Number
    run: gr.Button
    stop: gr.Button
    examples: gr.Dataset
    status: gr.Markdown
    mvar_image: gr.Image
    var_image: gr.Image
    scale: gr.Slider
    sample: gr.Radio
    mvar_gallery: gr.Gallery
    var_gallery: gr.Gallery
    mvar_strip: gr.Image
    var_strip: gr.Image
    downloads: gr.File


@dataclass
class AttentionWidgets:
    layer: gr.Dropdown
    head: gr.Dropdown
    token_row: gr.Number
    token_col: gr.Number
    caption: gr.Markdown
    overlay: gr.Image
    var_mass: gr.Plot
    var_maps: gr.Plot
    mask_var: gr.Plot
    mask_scale: gr.Plot
    mask_mvar: gr.Plot


@dataclass
class AblationWidgets:
    run: gr.Button
    status: gr.Markdown
    var_strip: gr.Image
    scale_markov_strip: gr.Image
    mvar_strip: gr.Image
    costs: gr.Markdown


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


@dataclass
class Page:
    header: Header
    generate: GenerateWidgets
    attention: AttentionWidgets
    ablation: AblationWidgets
    analysis: AnalysisWidgets
    memory: MemoryWidgets
    costs: CostWidgets


def header(entries, first, device_line: str, default_note: str) -> Header:
    gr.Markdown(INTRO)
    with gr.Row(elem_id="model-row"):
        model = gr.Dropdown([(e.label, e.key) for e in entries], value=entries[0].key, label="Model",
                            scale=2, min_width=240)
        with gr.Column(scale=3, min_width=240):
            model_note = gr.Markdown(model_text(first), elem_id="model-note")
            device = gr.Markdown(device_line, elem_id="device-line")
    gr.Markdown(default_note, elem_id="default-models-note")
    with gr.Accordion("What you are seeing", open=False):
        gr.Markdown(WHAT_YOU_SEE)
    return Header(model, model_note, device, gr.State(None))


# Class and seed presets: the default models' classes with seeds whose samples read well, and
# ImageNet classes the VAR and MVAR papers show.
DEFAULT_EXAMPLES = [["sun", 0], ["sailboat", 3], ["moon & stars", 5], ["snowman", 7], ["mushroom", 2],
                    ["beach ball", 1]]
IMAGENET_EXAMPLES = [["golden retriever", 0], ["otter", 1], ["giant panda", 2], ["volcano", 3],
                     ["lakeside", 4], ["macaw", 5]]


def example_presets(class_names: list[str]) -> list[list]:
    """The presets whose classes this model has (by name), else its first classes with seed 0."""
    for presets in (DEFAULT_EXAMPLES, IMAGENET_EXAMPLES):
        found = [[name, seed] for name, seed in presets if name in class_names]
        if len(found) >= 3:
            return found
    return [[name, 0] for name in class_names[:6]]


def model_text(models) -> str:
    """The loaded entry's two columns, labelled by what each file was trained for, and the baseline note."""
    return f"**MVAR column:** {models.mvar_label}  \n**VAR column:** {models.var_label}  \n{models.baseline_note}."


def image_pair(prefix: str) -> tuple[gr.Image, gr.Image]:
    """The MVAR and VAR images side by side (element ids ``{prefix}mvar-image`` and ``{prefix}var-image``)."""
    with gr.Row():
        return tuple(gr.Image(label=label, height=320, interactive=False, elem_id=f"{prefix}{name}-image",
                              min_width=200) for name, label in (("mvar", "MVAR"), ("var", "VAR baseline")))


def scale_slider(num_scales: int, elem_id: str, what: str) -> gr.Slider:
    return gr.Slider(1, num_scales, value=num_scales, step=1, elem_id=elem_id,
                     label=f"Scale (1 to {num_scales}): {what}")


def generate_section(first, precisions: tuple[str, ...], default_precision: str, max_images: int) -> GenerateWidgets:
    cfg = first.transformer.cfg
    num_scales = len(cfg.patch_nums)
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            class_name = gr.Dropdown(first.class_names, value=first.class_names[0], label="Class", filterable=True)
            with gr.Row():
                seed = gr.Number(0, label="Seed (0 to 2^63 - 1)", precision=0, elem_id="seed", scale=3)
                dice = gr.Button("random", size="sm", scale=1, min_width=60)
            guidance = gr.Number(first.sampling["cfg"], label=f"CFG (0 to {handlers.CFG_MAX:g}; 0 = none)",
                                 elem_id="cfg")
            top_k = gr.Number(first.sampling["top_k"], label=f"top-k (0 to {cfg.vocab_size}; 0 = off)", precision=0,
                              elem_id="top-k")
            top_p = gr.Number(first.sampling["top_p"], label="top-p (above 0, up to 1; 1 = off)", elem_id="top-p")
            smooth = gr.Checkbox(False, label="Gumbel smoothing (for visualisation)")
            num_images = gr.Radio([str(i) for i in range(1, max_images + 1)], value="1", label="Images",
                                  elem_id="images")
            precision = gr.Radio(list(precisions), value=default_precision, label="Precision",
                                 info="fp32 is exact: a sample is the same alone or in a batch. bf16 is faster on "
                                      "large models but not batch-invariant: a sample may differ slightly with the "
                                      "number of images.")
            with gr.Accordion("MVAR attention", open=False):
                kernel = gr.Dropdown(handlers.kernel_choices(first), value=str(first.mvar_mode.kernel_size),
                                     label="Window k (odd, up to the largest grid; full = no window)")
                refine_step = gr.Number(first.mvar_mode.refine_step, precision=0,
                                        label=f"Refine step (0 to {num_scales}): windows from scale refine step + 1 on")
            with gr.Row():
                run = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            examples = gr.Dataset(components=[class_name, seed], samples=example_presets(first.class_names),
                                  label="Examples (class, seed): click one, then Generate", elem_id="examples")
        with gr.Column(scale=3, min_width=300):
            status = gr.Markdown("Pick a class and press **Generate**.", elem_id="status")
            mvar_image, var_image = image_pair("")
            scale = scale_slider(num_scales, "scale-slider", "step back and forth without recomputing")
            sample = gr.Radio(["1"], value="1", label="Sample shown (previews, filmstrips and attention follow it)",
                              elem_id="sample")
            with gr.Row():
                mvar_gallery = gr.Gallery(label="MVAR: every sample", columns=4, height=180, elem_id="mvar-gallery",
                                          allow_preview=False, min_width=200, object_fit="contain")
                var_gallery = gr.Gallery(label="VAR: every sample", columns=4, height=180, elem_id="var-gallery",
                                         allow_preview=False, min_width=200, object_fit="contain")
            with gr.Column(elem_id="filmstrips"):
                mvar_strip = gr.Image(label="MVAR, scale by scale (current scale framed)", interactive=False,
                                      elem_id="mvar-strip", buttons=[])
                var_strip = gr.Image(label="VAR, scale by scale (current scale framed)", interactive=False,
                                     elem_id="var-strip", buttons=[])
            downloads = gr.File(label="Final images (PNG)", file_count="multiple")
    return GenerateWidgets(class_name, seed, dice, guidance, top_k, top_p, smooth, num_images, precision, kernel,
                           refine_step, run, stop, examples, status, mvar_image, var_image, scale, sample, mvar_gallery,
                           var_gallery, mvar_strip, var_strip, downloads)


def attention_tab() -> AttentionWidgets:
    with gr.Tab("Attention"):
        gr.Markdown("Click a token on the **attention map** below, or on the MVAR or VAR image above, or type its "
                    "row and column: the map shows where that token of the current scale attends.")
        with gr.Row():
            layer = gr.Dropdown(["mean"], value="mean", label="Layer", min_width=120)
            head = gr.Dropdown(["mean"], value="mean", label="Head", min_width=120)
            token_row = gr.Number(0, label="Token row (0 to side - 1)", precision=0, min_width=120,
                                  elem_id="token-row")
            token_col = gr.Number(0, label="Token column (0 to side - 1)", precision=0, min_width=120,
                                  elem_id="token-col")
        caption = gr.Markdown("", elem_id="attention-caption")
        with gr.Row():
            overlay = gr.Image(label="MVAR: the token's attention on its scale's grid (window in red)",
                               height=OVERLAY_SIZE, interactive=False, elem_id="attention-overlay", min_width=280)
            var_mass = gr.Plot(label="VAR: attention mass per scale", min_width=280)
        var_maps = gr.Plot(label="VAR: attention on every scale so far", elem_id="var-maps")
        with gr.Row():
            mask_var = gr.Plot(label="VAR mask", min_width=260)
            mask_scale = gr.Plot(label="Scale-Markov mask", min_width=260)
            mask_mvar = gr.Plot(label="MVAR mask", min_width=260)
    return AttentionWidgets(layer, head, token_row, token_col, caption, overlay, var_mass, var_maps, mask_var,
                            mask_scale, mask_mvar)


def ablation_tab() -> AblationWidgets:
    with gr.Tab("Ablation"):
        gr.Markdown("The paper's ablation, live on the loaded weights with the class, seed and settings above: "
                    "**VAR** (block-causal attention, KV cache), **+ scale-Markov** (each scale attends only to "
                    "itself, no windows) and **full MVAR** (+ k x k windows from the refine step on, as set in "
                    "*MVAR attention*). Sample 1, scale by scale, with the cost model's FLOPs and memory.")
        run = gr.Button("Run the ablation", variant="primary")
        status = gr.Markdown("")
        with gr.Column(elem_id="ablation"):
            var_strip = gr.Image(label="VAR", interactive=False, buttons=[])
            scale_markov_strip = gr.Image(label="+ scale-Markov", interactive=False, buttons=[])
            mvar_strip = gr.Image(label="full MVAR", interactive=False, buttons=[])
        costs = gr.Markdown("", elem_id="ablation-costs")
    return AblationWidgets(run, status, var_strip, scale_markov_strip, mvar_strip, costs)


def analysis_tab() -> AnalysisWidgets:
    with gr.Tab("Analysis"):
        gr.Markdown("The loaded model run in VAR mode over a few samples: how much attention falls on the query's "
                    "own scale and on nearby scales, and how much of the same-scale attention a k x k window "
                    "captures: the two observations MVAR is built on (the paper's motivation figure, panels a "
                    "and b).")
        samples = gr.Slider(1, handlers.MAX_ANALYSIS_SAMPLES, value=4, step=1,
                            label=f"Samples (1 to {handlers.MAX_ANALYSIS_SAMPLES})")
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


@dataclass
class EditWidgets:
    sample: gr.Button  # draws the next image of the embedded dataset
    upload: gr.UploadButton
    source_note: gr.Markdown
    editor: gr.ImageEditor  # the mask painter: the source as background, the paint = regenerate
    mask_centre: gr.Button
    mask_border: gr.Button
    mask_all: gr.Button
    mask_clear: gr.Button
    box: gr.Slider
    class_name: gr.Dropdown
    seed: gr.Number
    mode: gr.Radio
    keep_scales: gr.Slider
    final_blend: gr.Checkbox
    run: gr.Button
    stop: gr.Button
    status: gr.Markdown
    regenerated: gr.Image
    mvar_image: gr.Image
    var_image: gr.Image
    scale: gr.Slider
    mvar_strip: gr.Image
    var_strip: gr.Image
    pyramid: gr.Gallery
    psnr_plot: gr.Plot
    source: gr.State  # the editing.SourceImage being edited
    next_index: gr.State  # the next dataset sample's index
    record: gr.State  # a GenerationStore token of the last edit


EDIT_INTRO = """Edit a real image with no training: the image is encoded into its tokens, scale by scale, and
generation runs as usual except that, at every scale, the tokens outside the mask are the image's own and only
those inside are sampled (under the class you pick). **MVAR** and the **VAR** baseline edit the same input side by
side. Paint the region to regenerate in white on the image, or use a preset: **centre** (in-painting), **border**
(out-painting: the centre box is kept), **everything** (plain generation; with *Keep the first N scales*: a
variation that keeps the image's coarse layout)."""


def edit_tab(first) -> EditWidgets:
    from . import editing

    num_scales = len(first.transformer.cfg.patch_nums)
    with gr.Tab("Edit"):
        gr.Markdown(EDIT_INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                with gr.Row():
                    sample = gr.Button("Sample from the dataset", elem_id="edit-sample", min_width=140)
                    upload = gr.UploadButton("Upload an image", elem_id="edit-upload", min_width=140,
                                             type="filepath")
                source_note = gr.Markdown("No image yet: sample one from the dataset or upload one (any size, "
                                          "aspect ratio or mode; it is centre-cropped and resized to the model's "
                                          f"{first.tokenizer.cfg.image_size} px).", elem_id="edit-source-note")
                editor = gr.ImageEditor(
                    label="Mask: paint what to regenerate (white)", type="pil", image_mode="RGBA", sources=[],
                    transforms=(), layers=False, canvas_size=(editing.CANVAS, editing.CANVAS), fixed_canvas=True,
                    brush=gr.Brush(colors=[("#ffffff", 0.75)], default_color=("#ffffff", 0.75), color_mode="fixed",
                                   default_size=16),
                    eraser=gr.Eraser(default_size=16), elem_id="edit-editor", buttons=[],
                    placeholder="Sample an image from the dataset or upload one, then paint on it")
                with gr.Row():
                    mask_centre = gr.Button("Mask the centre", size="sm", elem_id="edit-mask-centre", min_width=80)
                    mask_border = gr.Button("Mask the border (out-paint)", size="sm", elem_id="edit-mask-border",
                                            min_width=80)
                    mask_all = gr.Button("Mask everything", size="sm", elem_id="edit-mask-all", min_width=80)
                    mask_clear = gr.Button("Clear the mask", size="sm", elem_id="edit-mask-clear", min_width=80)
                box = gr.Slider(editing.BOX_MIN, editing.BOX_MAX, value=50, step=5,
                                label=f"Preset box side ({editing.BOX_MIN} to {editing.BOX_MAX} % of the image): "
                                      "the centre box masked, or kept when out-painting")
            with gr.Column(scale=1, min_width=260):
                class_name = gr.Dropdown(first.class_names, value=first.class_names[0], filterable=True,
                                         label="Class: what the regenerated region becomes", elem_id="edit-class")
                seed = gr.Number(0, label="Seed (0 to 2^63 - 1)", precision=0, elem_id="edit-seed")
                mode = gr.Radio(list(editing.MODE_CHOICES), value=editing.BOTH, label="Models", elem_id="edit-mode")
                keep_scales = gr.Slider(0, num_scales - 1, value=0, step=1, label=editing.keep_label(num_scales),
                                        elem_id="edit-keep")
                final_blend = gr.Checkbox(True, label="Final blend: outside the mask, the image's own pixels (its "
                                                      "reconstruction by the tokenizer)", elem_id="edit-blend")
                with gr.Row():
                    run = gr.Button("Edit the image", variant="primary", elem_id="edit-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
                regenerated = gr.Image(label="Regenerated (tinted red)", interactive=False, height=200,
                                       elem_id="edit-regenerated", buttons=[])
        status = gr.Markdown("Load an image, paint a mask and press **Edit the image**.", elem_id="edit-status")
        mvar_image, var_image = image_pair("edit-")
        scale = scale_slider(num_scales, "edit-scale", "step through the edit without recomputing")
        with gr.Column(elem_id="edit-filmstrips"):
            mvar_strip = gr.Image(label="MVAR edit, scale by scale (current scale framed)", interactive=False,
                                  elem_id="edit-mvar-strip", buttons=[])
            var_strip = gr.Image(label="VAR edit, scale by scale (current scale framed)", interactive=False,
                                 elem_id="edit-var-strip", buttons=[])
        with gr.Accordion("The image's pyramid: what the tokenizer keeps of it, scale by scale", open=True):
            gr.Markdown("The tokenizer's reconstruction of the loaded image from its first 1, 2, ... scales of "
                        "tokens (what an edit keeps outside the mask), and its PSNR against the image.")
            pyramid = gr.Gallery(label="Reconstruction after each scale", columns=5, height="auto",
                                 allow_preview=False, elem_id="edit-pyramid")
            psnr_plot = gr.Plot(label="Reconstruction PSNR per scale", elem_id="edit-psnr")
    return EditWidgets(sample, upload, source_note, editor, mask_centre, mask_border, mask_all, mask_clear, box,
                       class_name, seed, mode, keep_scales, final_blend, run, stop, status, regenerated, mvar_image,
                       var_image, scale, mvar_strip, var_strip, pyramid, psnr_plot, gr.State(None), gr.State(0),
                       gr.State(None))
