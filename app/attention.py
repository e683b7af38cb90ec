"""The Attention tab: where one token of the current scale attends, for the sample shown.

MVAR's weights on the token's k x k window of its own grid (an overlay on the preview, with a colour bar),
VAR's attention on every earlier scale and its mass per scale, and the three attention masks with the
token's row marked. A token is picked by a click (on the map or on the generated images) or by typing its
row and column. Changing the scale keeps the token at the same relative place.

The view follows the kept record: after a generation (:func:`on_record`, chained after Generate), after the
slider or a sample pick (chained after the Generate part's own event, which reports a bad scale), and on its
own widgets. ``shown`` (a ``gr.State``) remembers which record and scale the view and the token boxes refer
to, so the token moves with the scale, and a refused generation (the same record) renders nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
import torch

from mvar.schedule import ScaleSchedule

from . import plots
from .policy import skips, ui_event
from .services import Services
from .widgets import DISPLAY_SIZE, PRIVATE, NumberBox
from .work.generation import GenerationRecord, record_of, scale_name
from .work.settings import Real, UserError, Whole, as_whole, shown
from .work.statistics import mass_per_key_scale, scale_grid, window_box

OVERLAY_SIZE = 384  # pixels of the attention overlay's token grid (its colour bar comes on the right)
MAX_DISPLAYED_SIZE = 8192  # pixels of a displayed image, for clicks


@dataclass
class AttentionWidgets:
    layer: gr.Dropdown
    head: gr.Dropdown
    token_row: gr.Number
    token_col: gr.Number
    # the view, in the order view_outputs gives it
    overlay: gr.Image
    var_maps: gr.Plot
    var_mass: gr.Plot
    mask_var: gr.Plot
    mask_scale: gr.Plot
    mask_mvar: gr.Plot
    caption: gr.Markdown
    shown: gr.State  # (record token, 0-based scale) the view and the token boxes refer to

    def view(self) -> list:
        return [self.overlay, self.var_maps, self.var_mass, self.mask_var, self.mask_scale, self.mask_mvar,
                self.caption, self.token_row, self.token_col, self.shown]


def tab() -> AttentionWidgets:
    with gr.Tab("Attention"):
        gr.Markdown("Click a token on the **attention map** below, or on the MVAR or VAR image above, or type its "
                    "row and column: the map shows where that token of the current scale attends.")
        with gr.Row():
            layer = gr.Dropdown(["mean"], value="mean", label="Layer", min_width=120)
            head = gr.Dropdown(["mean"], value="mean", label="Head", min_width=120)
            # the grid's side changes with the scale: the box holds the bottom, the event checks the top
            row, col = (NumberBox(0, label=f"{name} (0 to side - 1)", minimum=0, step=1, precision=0,
                                  elem_id=elem_id, min_width=120)
                        for name, elem_id in (("Token row", "token-row"), ("Token column", "token-col")))
        caption = gr.Markdown("", elem_id="attention-caption")
        with gr.Row():
            overlay = gr.Image(label="MVAR: the token's attention on its scale's grid (window in red)",
                               height=OVERLAY_SIZE, interactive=False, elem_id="attention-overlay", min_width=280)
            var_mass = gr.Plot(label="VAR: attention mass per scale", min_width=280)
        var_maps = gr.Plot(label="VAR: attention on every scale so far", elem_id="var-maps")
        with gr.Row():
            masks = [gr.Plot(label=label, min_width=260) for label in ("VAR mask", "Scale-Markov mask", "MVAR mask")]
    return AttentionWidgets(layer, head, row, col, overlay, var_maps, var_mass, *masks, caption, gr.State(None))


# ---------------------------------------------------------------------------------------------
# Record -> view
# ---------------------------------------------------------------------------------------------


@dataclass
class AttentionView:
    """Everything the attention tab shows for one token, as data."""

    scale: int
    side: int
    token: tuple[int, int]
    sample: int
    layer: int | str
    head: int | str
    mvar_grid: np.ndarray  # (side, side): the MVAR query's weights on its own grid
    mvar_preview: np.ndarray  # the sample's MVAR preview at this scale
    window: tuple[int, int, int, int] | None  # (row0, col0, rows, cols) of the k x k window, if windowed
    var_grids: list[np.ndarray]  # per key scale 0..scale: the VAR query's weights on that grid
    var_mass: np.ndarray  # (scale + 1,): VAR's attention mass per key scale
    position: int  # the query's flat position (for the masks' highlighted row)
    patch_nums: tuple[int, ...]
    refine_step: int
    kernel_size: int
    caption: str


def _mean_or(name: str, value, allowed, words: str) -> int | str:
    """"mean", or one of ``allowed`` (the dropdowns send their choices as text)."""
    if isinstance(value, str) and value == "mean":
        return value
    number = as_whole(value)
    if number is not None and number in allowed:
        return number
    raise UserError(f"{name} must be 'mean' or {words}, got {shown(value, 'nothing')}")


def _weights(captured: dict[int, torch.Tensor], layer, head, query: int) -> torch.Tensor:
    """(Nk,) fp32 weights of one query, layer (or "mean") and head (or "mean")."""
    if not captured:
        raise UserError("no attention was captured for this generation")
    if layer == "mean":
        rows = torch.stack([w[:, query].float() for w in captured.values()]).mean(0)  # (H, Nk)
    else:
        rows = captured[layer][:, query].float()
    return rows.mean(0) if head == "mean" else rows[head]


def token_fields(side: int) -> tuple[Whole, Whole]:
    return Whole("Token row", 0, side - 1), Whole("Token column", 0, side - 1)


def attention_view(record: GenerationRecord | None, scale, layer, head, row, col, sample=1) -> AttentionView:
    """The view of one token; ``scale`` and ``sample`` as the page numbers them (from 1)."""
    record = record_of(record)
    scale, sample = record.scale(scale), record.sample(sample)
    layers = record.captured_layers
    layer = _mean_or("Layer", layer, layers, f"one of the captured layers {list(layers)}")
    head = _mean_or("Head", head, range(record.num_heads), f"a whole number from 0 to {record.num_heads - 1}")
    side = record.patch_nums[scale]
    row_field, col_field = token_fields(side)
    row, col = row_field.parse(row), col_field.parse(col)
    mvar_run, var_run = record.runs["MVAR"], record.runs["VAR"]
    if sample not in mvar_run.attention or sample not in mvar_run.previews:
        raise UserError(f"sample {sample + 1} is not ready yet: pick it in the gallery")
    query, schedule = row * side + col, ScaleSchedule(record.patch_nums)
    mvar_rows = _weights(mvar_run.attention[sample][scale], layer, head, query)
    grid = scale_grid(mvar_rows, schedule, scale, keys_begin=mvar_run.keys_begin[scale]).numpy()
    box = window_box(side, row, col, record.kernel_size) if mvar_run.mode.is_windowed(scale) else None
    var_rows = _weights(var_run.attention[sample][scale], layer, head, query)
    mass = mass_per_key_scale(var_rows, schedule)[: scale + 1].numpy()
    where = (f"its {record.kernel_size}x{record.kernel_size} window, rows {box[0]}..{box[0] + box[2] - 1}, "
             f"columns {box[1]}..{box[1] + box[3] - 1}" if box else
             f"the whole {side}x{side} grid (no window before scale {record.refine_step + 1})")
    caption = (f"Token ({row}, {col}) of {scale_name(scale, record.num_scales, side)}, sample {sample + 1}, "
               f"layer {layer}, head {head}. MVAR attends only within its scale, to {where}. VAR puts "
               f"{mass[scale]:.0%} of its attention on its own scale"
               + (f" and {mass[scale - 1]:.0%} on the previous one." if scale else "."))
    return AttentionView(scale, side, (row, col), sample, layer, head, grid, mvar_run.previews[sample][scale], box,
                         [scale_grid(var_rows, schedule, s).numpy() for s in range(scale + 1)], mass,
                         schedule.begin(scale) + query, record.patch_nums, record.refine_step, record.kernel_size,
                         caption)


def move_token(row: int, col: int, old_side: int, new_side: int) -> tuple[int, int]:
    """The token at the same relative position on another grid (the centre of the old cell)."""
    def place(i: int) -> int:
        return min(new_side - 1, int((i + 0.5) * new_side / old_side))

    return place(row), place(col)


def token_after_scale_change(record: GenerationRecord, old_scale: int | None, new_scale: int, row, col):
    """(row, col, moved): the token boxes' values carried to ``new_scale`` (0-based) when they referred to
    ``old_scale``; unchanged (and checked later) when the scale is the same or the boxes hold no numbers."""
    row_value, col_value = as_whole(row), as_whole(col)
    if (old_scale is None or old_scale == new_scale or not 0 <= old_scale < record.num_scales
            or row_value is None or col_value is None):
        return row, col, False
    old_side = record.patch_nums[old_scale]
    row, col = move_token(min(max(row_value, 0), old_side - 1), min(max(col_value, 0), old_side - 1),
                          old_side, record.patch_nums[new_scale])
    return row, col, True


def token_from_click(record: GenerationRecord | None, scale, x, y, displayed_width, displayed_height=None):
    """A click at pixel (x, y) on an image of the current scale -> the token (row, col) under it.

    A click just outside the image (its border) counts as the nearest token."""
    record = record_of(record)
    scale = record.scale(scale)
    width = Whole("displayed image width", 1, MAX_DISPLAYED_SIZE).parse(displayed_width)
    height = width if displayed_height is None else Whole("displayed image height", 1, MAX_DISPLAYED_SIZE).parse(
        displayed_height)
    x = min(max(Real("click x", -1e9, 1e9).parse(x), 0.0), width - 1.0)
    y = min(max(Real("click y", -1e9, 1e9).parse(y), 0.0), height - 1.0)
    side = record.patch_nums[scale]
    return min(side - 1, int(y * side / height)), min(side - 1, int(x * side / width))


def view_outputs(files, token: str, view: AttentionView, write_token: bool) -> tuple:
    """AttentionWidgets.view of one view; the token boxes are written only when ``write_token`` (the token
    moved with the scale, or was clicked): otherwise a late reply would overwrite what the user is typing."""
    overlay = plots.attention_overlay(view.mvar_preview, view.mvar_grid, view.token, size=OVERLAY_SIZE,
                                      window=view.window)
    masks = [plots.mask_figure(view.patch_nums, kind, view.refine_step, view.kernel_size,
                               highlight_row=view.position) for kind in ("var", "scale-markov", "mvar")]
    return (files.shown(plots.with_colour_bar(overlay, float(view.mvar_grid.max()))),
            plots.cross_scale_heatmaps(view.var_grids, f"VAR: where token {view.token} attends, scale by scale"),
            plots.mass_by_scale_figure(view.var_mass, view.scale, "VAR: attention mass per scale"),
            *masks, view.caption, view.token[0] if write_token else gr.skip(),
            view.token[1] if write_token else gr.skip(), (token, view.scale))


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


def _render(services: Services, token, scale, layer, head, row, col, shown_state, clicked=False) -> tuple:
    record = record_of(services.store.get(token))
    s = record.scale(scale)
    old = shown_state[1] if shown_state else None
    row, col, moved = token_after_scale_change(record, old, s, row, col)
    view = attention_view(record, scale, layer, head, row, col, record.shown_sample + 1)
    return view_outputs(services.files, token, view, moved or clicked)


def on_view(services: Services, token, scale, layer, head, row, col, shown_state):
    """A layer, head or token typed: the view of that token."""
    if token is None:
        return skips(10)
    return _render(services, token, scale, layer, head, row, col, shown_state)


def on_follow(services: Services, token, scale, layer, head, row, col, shown_state):
    """After the Generate part's slider or sample event: the view follows, quietly (that event reports a bad
    scale itself)."""
    record = services.store.get(token) if token is not None else None
    if record is None or as_whole(scale) is None or not 1 <= as_whole(scale) <= record.num_scales:
        return skips(10)
    return _render(services, token, scale, layer, head, row, col, shown_state)


def on_record(services: Services, token, scale, row, col, shown_state):
    """After a generation: the new record's layers and heads, and its view (nothing when no new record came)."""
    if token is None or (shown_state and shown_state[0] == token):
        return skips(12)
    record = record_of(services.store.get(token))
    choices = (gr.update(choices=["mean"] + [str(i) for i in record.captured_layers], value="mean"),
               gr.update(choices=["mean"] + [str(i) for i in range(record.num_heads)], value="mean"))
    return (*choices, *_render(services, token, scale, "mean", "mean", row, col, shown_state))


def _click(services: Services, token, scale, layer, head, shown_state, evt: gr.SelectData, width: int):
    record = services.store.get(token)
    row, col = token_from_click(record, scale, evt.index[0], evt.index[1], width)
    return _render(services, token, scale, layer, head, row, col, shown_state, clicked=True)


def on_overlay_click(services: Services, token, scale, layer, head, shown_state, evt: gr.SelectData):
    """A click on the map: its grid is OVERLAY_SIZE wide, the colour bar beyond it."""
    return _click(services, token, scale, layer, head, shown_state, evt, OVERLAY_SIZE)


def on_image_click(services: Services, token, scale, layer, head, shown_state, evt: gr.SelectData):
    """A click on a generated image (shown DISPLAY_SIZE wide)."""
    return _click(services, token, scale, layer, head, shown_state, evt, DISPLAY_SIZE)


def wire(w: AttentionWidgets, record: gr.State, scale: gr.Slider, images, followed, services: Services) -> None:
    """``record``, ``scale``, ``images``: the Generate part's; ``followed``: (the generation, the Generate
    part's events the view follows)."""
    generation, others = followed
    inputs = [record, scale, w.layer, w.head, w.token_row, w.token_col, w.shown]
    view = ui_event(on_view, 10, services=services)
    for trigger in (w.layer.input, w.head.input, w.token_row.submit, w.token_col.submit):
        trigger(view, inputs, w.view(), **PRIVATE)
    for event in others:
        event.then(ui_event(on_follow, 10, services=services), inputs, w.view(), **PRIVATE)
    generation.then(ui_event(on_record, 12, services=services), [record, scale, w.token_row, w.token_col, w.shown],
                    [w.layer, w.head, *w.view()], **PRIVATE)
    clicked = [record, scale, w.layer, w.head, w.shown]
    w.overlay.select(ui_event(on_overlay_click, 10, services=services), clicked, w.view(), **PRIVATE)
    for image in images:
        image.select(ui_event(on_image_click, 10, services=services), clicked, w.view(), **PRIVATE)
