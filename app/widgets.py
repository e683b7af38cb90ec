"""Widgets the page's parts share, and the helpers that turn their views into widget values.

Number boxes and sliders are :class:`NumberBox` and :class:`SliderBox`: Gradio's own components would
round a value to their ``precision`` (seed 1.5 ran as seed 2) and refuse one outside ``minimum`` ..
``maximum`` before the event runs, with an "Error" badge on the outputs and a message of their own (an
empty box even wrote a traceback to the log). These pass the value on as the browser sent it, and the
event parses it with the field the label was written from (``work/settings.py``): one message in the
label's words, the outputs kept. The limits still sit on the components (the browser's box, spinner and
slider use them).
"""

from __future__ import annotations

import gradio as gr
import numpy as np
from gradio import component_meta

from . import plots
from .image_files import ImageFiles
from .work.settings import Whole, scale_field

PRIVATE = dict(api_visibility="private")  # page events are not part of the named API
DISPLAY_SIZE = 320  # previews are tiny (64 px for the default models): shown enlarged, with crisp pixels
COLUMNS = {"MVAR": "MVAR", "VAR": "VAR baseline"}


# Gradio writes a .pyi stub beside the source of every component class defined (at each import, into the
# source tree; failing where it is read-only): not for these two, which only change how values come in.
_write_stub, component_meta.create_or_modify_pyi = component_meta.create_or_modify_pyi, lambda *args: None
try:
    class NumberBox(gr.Number):
        """gr.Number whose value reaches the event unrounded and unchecked (the event's parse checks it).

        A subclass, not a patched instance: Gradio rebuilds a component from its class when an event updates
        its properties (a maximum, a label), and the copy must pass values on too."""

        is_template = True  # drawn by Gradio's own Number

        def preprocess(self, payload):
            return payload

    class SliderBox(gr.Slider):
        """gr.Slider whose value (its number box's too) reaches the event unrounded and unchecked."""

        is_template = True  # drawn by Gradio's own Slider

        def preprocess(self, payload):
            return payload
finally:
    component_meta.create_or_modify_pyi = _write_stub


def number_box(field, note: str = "", **kwargs) -> NumberBox:
    """A number box labelled with the field's range (and ``note``), holding the field's limits."""
    return NumberBox(label=field.label(note), **{**field.limits(), **kwargs})


def slider_box(field: Whole, note: str = "", **kwargs) -> SliderBox:
    return SliderBox(label=field.label(note), **{**field.limits(), **kwargs})


def scale_slider(num_scales: int, elem_id: str, what: str) -> SliderBox:
    """The Scale slider of a part (Generate, Edit): 1 to the number of scales, at the last one."""
    return slider_box(scale_field(num_scales), what, value=num_scales, elem_id=elem_id)


def scale_slider_update(num_scales: int, what: str, value: int | None = None) -> dict:
    """The Scale slider for another model (its number of scales) or a new record (``value``)."""
    field = scale_field(num_scales)
    return gr.update(label=field.label(what), maximum=num_scales, value=num_scales if value is None else value)


def image_pair(prefix: str) -> tuple[gr.Image, gr.Image]:
    """The MVAR and VAR images side by side (element ids ``{prefix}mvar-image`` and ``{prefix}var-image``)."""
    with gr.Row():
        return tuple(gr.Image(label=COLUMNS[name.upper()], height=320, interactive=False,
                              elem_id=f"{prefix}{name}-image", min_width=200) for name in ("mvar", "var"))


def shown(files: ImageFiles, image: np.ndarray | None) -> str | None:
    """A preview enlarged for the page, as a PNG file written once (see ``image_files.ImageFiles``)."""
    if image is None:
        return None
    return files.shown(plots.upscale(image, max(DISPLAY_SIZE, image.shape[0])))


def strip_file(files: ImageFiles, strip: plots.Filmstrip | None) -> str | None:
    return None if strip is None else files.shown(strip.image())
