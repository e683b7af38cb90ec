"""Figure builders: pure functions from arrays to images (numpy) or Plotly figures.

Images are uint8 (H, W, 3). Token grids are row-major: token t of a p x p scale is (t // p, t % p).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mvar.attention import block_causal_mask, block_diagonal_mask, mvar_mask

VAR_COLOR, MVAR_COLOR = "#d62728", "#1f77b4"


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upscale of (h, w, 3) to (size, size, 3), so token cells stay crisp."""
    h, w = image.shape[:2]
    rows = (np.arange(size) * h // size).clip(0, h - 1)
    cols = (np.arange(size) * w // size).clip(0, w - 1)
    return image[rows][:, cols]


@dataclass
class Filmstrip:
    """One model's previews of one sample, scale by scale, with the frame labels and the current scale."""

    frames: list[np.ndarray]
    labels: list[str]
    current: int

    def image(self) -> np.ndarray:
        return filmstrip(self.frames, self.labels, self.current)


def filmstrip(frames: list[np.ndarray], labels: list[str] | None = None, current: int | None = None,
              cell: int = 112, columns: int = 5, pad: int = 6, label_height: int = 16) -> np.ndarray:
    """Per-scale previews in a grid of ``columns`` (as in the paper's progressive figure), each labelled
    underneath, the ``current`` scale framed in red. Two rows of five stay readable on a phone."""
    from PIL import Image, ImageDraw

    rows = -(-len(frames) // columns)
    width = columns * (cell + pad) + pad
    height = rows * (cell + label_height + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        left, top = pad + c * (cell + pad), pad + r * (cell + label_height + pad)
        canvas.paste(Image.fromarray(upscale(frame, cell)), (left, top))
        if current == i:
            draw.rectangle([left - 3, top - 3, left + cell + 2, top + cell + 2], outline=(214, 39, 40), width=3)
        if labels is not None:
            text = labels[i]
            draw.text((left + cell // 2 - 3 * len(text), top + cell + 2), text,
                      fill=(214, 39, 40) if current == i else (60, 60, 60))
    return np.asarray(canvas)


def _heat_colors(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB float in [0, 1]: dark purple to yellow (a viridis-like ramp)."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float) / 255
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def attention_overlay(
    image: np.ndarray,
    weights: np.ndarray,
    token: tuple[int, int],
    size: int = 384,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """The scale's token grid over the image, cells coloured by attention weight.

    image (h, w, 3) uint8; weights (p, p) >= 0, the query's attention over this grid; token the
    query (row, col); window (row0, col0, rows, cols) the k x k window to outline. Cells with zero
    weight keep the image (dimmed); the query cell is outlined in white, the window in red.
    """
    side = weights.shape[0]
    base = upscale(image, size).astype(float) / 255
    cell = size / side
    scaled = weights / weights.max() if weights.max() > 0 else weights
    heat = _heat_colors(scaled)
    rows = (np.arange(size) / cell).astype(int).clip(0, side - 1)
    heat_px = heat[rows][:, rows]
    attended = (weights > 0)[rows][:, rows][..., None]
    out = np.where(attended, 0.35 * base + 0.65 * heat_px, 0.45 * base)
    out = (out * 255).round().astype(np.uint8)
    _grid_lines(out, side)
    if window is not None:
        _outline(out, window, cell, (230, 30, 30), 3)
    _outline(out, (token[0], token[1], 1, 1), cell, (255, 255, 255), 2)
    return out


def with_colour_bar(image: np.ndarray, peak: float, bar_width: int = 70) -> np.ndarray:
    """The overlay with a vertical colour bar on its right: 0 at the bottom, ``peak`` (the largest weight)
    at the top. Clicks on the bar are outside the grid (the page maps them to the nearest column)."""
    from PIL import Image, ImageDraw

    size = image.shape[0]
    ramp = _heat_colors(np.linspace(1, 0, size))[:, None, :].repeat(16, axis=1)
    canvas = Image.new("RGB", (size + bar_width, size), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    canvas.paste(Image.fromarray((ramp * 255).round().astype(np.uint8)), (size + 8, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((size + 28, 2), f"{peak:.3f}", fill=(0, 0, 0))
    draw.text((size + 28, size // 2 - 6), "weight", fill=(0, 0, 0))
    draw.text((size + 28, size - 14), "0", fill=(0, 0, 0))
    return np.asarray(canvas)


def _grid_lines(image: np.ndarray, side: int) -> None:
    if side > 32:
        return
    size = image.shape[0]
    for i in range(1, side):
        position = round(i * size / side)
        image[position, :] = (image[position, :] * 0.6).astype(np.uint8)
        image[:, position] = (image[:, position] * 0.6).astype(np.uint8)


def _outline(image: np.ndarray, box: tuple[int, int, int, int], cell: float, color, width: int) -> None:
    row0, col0, rows, cols = box
    top, left = round(row0 * cell), round(col0 * cell)
    bottom = min(image.shape[0], round((row0 + rows) * cell)) - 1
    right = min(image.shape[1], round((col0 + cols) * cell)) - 1
    image[top : top + width, left : right + 1] = color
    image[bottom - width + 1 : bottom + 1, left : right + 1] = color
    image[top : bottom + 1, left : left + width] = color
    image[top : bottom + 1, right - width + 1 : right + 1] = color


def mass_by_scale_figure(mass: np.ndarray, query_scale: int, title: str) -> go.Figure:
    """Bar chart of a query's attention mass on each scale (paper's motivation panel a)."""
    scales = np.arange(len(mass))
    colors = [VAR_COLOR if s == query_scale else "#888888" for s in scales]
    figure = go.Figure(go.Bar(x=[f"{s + 1}" for s in scales], y=mass, marker_color=colors,
                              hovertemplate="scale %{x}: %{y:.3f}<extra></extra>"))
    figure.update_layout(title=title, yaxis_title="attention mass", xaxis_title="key scale (red: the query's own)",
                         height=300, margin=dict(l=40, r=10, t=40, b=40), yaxis_range=[0, 1])
    return figure


def cross_scale_heatmaps(per_scale: list[np.ndarray], title: str, columns: int = 5) -> go.Figure:
    """One small heat map per key scale: where a query's attention goes on every earlier scale (2 rows of 5)."""
    count = len(per_scale)
    rows = -(-count // columns)
    figure = make_subplots(rows=rows, cols=columns, horizontal_spacing=0.03, vertical_spacing=0.16,
                           subplot_titles=[f"scale {i + 1} ({m.shape[0]}x{m.shape[0]})" for i, m in
                                           enumerate(per_scale)])
    peak = max(float(m.max()) for m in per_scale) or 1.0
    for i, grid in enumerate(per_scale):
        r, c = divmod(i, columns)
        figure.add_trace(go.Heatmap(z=grid[::-1], zmin=0, zmax=peak, colorscale="Viridis", showscale=i == count - 1,
                                    colorbar=dict(title="weight", len=0.8),
                                    hovertemplate="weight %{z:.4f}<extra></extra>"), row=r + 1, col=c + 1)
        figure.update_xaxes(showticklabels=False, row=r + 1, col=c + 1)
        figure.update_yaxes(showticklabels=False, row=r + 1, col=c + 1)
    figure.update_annotations(font_size=11)
    figure.update_layout(title=title, height=170 * rows + 70, margin=dict(l=10, r=10, t=70, b=10))
    return figure


MASK_TITLES = {"var": "VAR: block-causal", "scale-markov": "+ scale-Markov: block-diagonal",
               "mvar": "MVAR: + k x k windows"}


def mask_matrix(patch_nums: tuple[int, ...], kind: str, refine_step: int = 8, kernel_size: int = 7) -> np.ndarray:
    if kind == "var":
        return block_causal_mask(patch_nums).numpy()
    if kind == "scale-markov":
        return block_diagonal_mask(patch_nums).numpy()
    if kind == "mvar":
        return mvar_mask(patch_nums, refine_step, kernel_size).numpy()
    raise ValueError(f"unknown mask kind {kind!r}")


def mask_figure(patch_nums: tuple[int, ...], kind: str, refine_step: int = 8, kernel_size: int = 7,
                highlight_row: int | None = None, size: int = 340) -> go.Figure:
    """An attention mask (allowed = dark) with query / key position axes and the query's row marked."""
    allowed = mask_matrix(patch_nums, kind, refine_step, kernel_size)
    length = allowed.shape[0]
    picked = (np.arange(size) * length // size).clip(0, length - 1)
    shown = allowed[picked][:, picked].astype(float)
    positions = picked
    figure = go.Figure(go.Heatmap(z=shown, x=positions, y=positions, colorscale=[[0, "#f5f5f5"], [1, "#283c78"]],
                                  showscale=False, hovertemplate="query %{y}, key %{x}<extra></extra>"))
    if highlight_row is not None:
        figure.add_hline(y=highlight_row, line_color="#e61e1e", line_width=2)
    ends = np.cumsum([p * p for p in patch_nums])
    figure.update_layout(title=dict(text=MASK_TITLES[kind], font_size=13), height=330,
                         margin=dict(l=50, r=10, t=40, b=40),
                         xaxis=dict(title="key position", tickvals=[0, *ends[-3:].tolist()]),
                         yaxis=dict(title="query position", autorange="reversed",
                                    tickvals=[0, *ends[-3:].tolist()], scaleanchor="x"))
    return figure


def mass_by_distance_figure(var_mass: np.ndarray, title: str = "Attention mass by scale distance") -> go.Figure:
    """Mean attention mass on scale s - d, for d = 0, 1, 2, ... (panel a of the motivation figure)."""
    figure = go.Figure(go.Bar(x=[f"{d}" for d in range(len(var_mass))], y=var_mass, marker_color=VAR_COLOR))
    figure.update_layout(title=title, xaxis_title="scale distance (0 = own scale)", yaxis_title="mean mass",
                         height=300, yaxis_range=[0, 1], margin=dict(l=40, r=10, t=40, b=40))
    return figure


def window_mass_figure(sizes: list[int], mass: np.ndarray, kernel_size: int,
                       title: str = "Attention mass inside a k x k window") -> go.Figure:
    """Mean same-scale attention mass captured by a k x k window around the query (panel b)."""
    figure = go.Figure(go.Scatter(x=sizes, y=mass, mode="lines+markers", line_color=VAR_COLOR))
    figure.add_vline(x=kernel_size, line_dash="dot", annotation_text=f"MVAR k={kernel_size}")
    figure.update_layout(title=title, xaxis_title="window size k", yaxis_title="captured mass",
                         yaxis_range=[0, 1.02], height=300, margin=dict(l=40, r=10, t=40, b=40))
    return figure


def _batch_axis(batches: list[int]) -> dict:
    """A log2 batch axis that ticks at the batches themselves (1, 2, 4, ...), not log10's "1 ... 10, 2, 3"."""
    low, high = min(batches), max(batches)
    ticks = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if low <= b <= high] or batches
    return dict(type="log", tickvals=ticks, ticktext=[str(t) for t in ticks],
                range=[np.log10(low) - 0.08, np.log10(high) + 0.08], title="batch size")


def memory_figure(analytic: dict[str, dict[int, float]], measured: dict[str, dict[int, float]],
                  title: str) -> go.Figure:
    """Peak memory (MiB) against batch size: measured points (solid) and the analytic model (dashed), on the
    range of the measured batches (the analytic lines continue beyond it in the official-sizes chart)."""
    figure = go.Figure()
    shown = sorted({b for points in measured.values() for b in points}) or sorted(
        {b for points in analytic.values() for b in points})
    for name, color in (("VAR", VAR_COLOR), ("MVAR", MVAR_COLOR)):
        if name in analytic:
            batches = [b for b in sorted(analytic[name]) if shown[0] <= b <= shown[-1]]
            figure.add_trace(go.Scatter(x=batches, y=[analytic[name][b] for b in batches],
                                        name=f"{name} (analytic model)", mode="lines",
                                        line=dict(color=color, dash="dash")))
        if name in measured and measured[name]:
            batches = sorted(measured[name])
            figure.add_trace(go.Scatter(x=batches, y=[measured[name][b] for b in batches], name=f"{name} (measured)",
                                        mode="lines+markers", line=dict(color=color), marker_size=9))
    figure.update_layout(title=title, xaxis=_batch_axis(shown), yaxis_title="peak memory (MiB)", height=360,
                         margin=dict(l=50, r=10, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    return figure


def per_scale_bars(values: dict[str, list[float]], title: str, y_title: str,
                   zero_note: str | None = None) -> go.Figure:
    """Grouped bars per scale (1-based, as everywhere on the page) for VAR and MVAR. Bars that are zero
    are labelled (``zero_note``, e.g. "0: no cache") so a zero does not read as missing data."""
    figure = go.Figure()
    for name, color in (("VAR", VAR_COLOR), ("MVAR", MVAR_COLOR)):
        if name in values:
            ys = values[name]
            labels = [zero_note if zero_note and v == 0 else "" for v in ys]
            figure.add_trace(go.Bar(x=[f"{s + 1}" for s in range(len(ys))], y=ys, name=name, marker_color=color,
                                    text=labels, textposition="outside", cliponaxis=False))
    figure.update_layout(title=title, xaxis_title="scale", yaxis_title=y_title, barmode="group", height=320,
                         margin=dict(l=50, r=10, t=50, b=40))
    return figure


def placeholder_figure(title: str, message: str) -> go.Figure:
    """An empty chart that says why it is empty."""
    figure = go.Figure()
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font_size=14)
    figure.update_layout(title=title, height=260, xaxis_visible=False, yaxis_visible=False,
                         margin=dict(l=20, r=20, t=50, b=20))
    return figure


PRESET_SHADES = {"VAR": ["#f4a6a6", "#e35d5d", "#c42727", "#7f1010"],
                 "MVAR": ["#a6c8f4", "#5d9be3", "#2766c4", "#10387f"]}


def preset_memory_figure(curves: dict[str, dict[str, dict[int, float]]], title: str) -> go.Figure:
    """Analytic peak memory above the weights against batch size for several model sizes, VAR vs MVAR:
    a shade per size (light = small), dashed for VAR, solid for MVAR."""
    figure = go.Figure()
    batches_all = set()
    for i, (preset, modes) in enumerate(curves.items()):
        for name, dash in (("VAR", "dash"), ("MVAR", "solid")):
            batches = sorted(modes[name])
            batches_all.update(batches)
            color = PRESET_SHADES[name][min(i, len(PRESET_SHADES[name]) - 1)]
            figure.add_trace(go.Scatter(x=batches, y=[modes[name][b] / 1024 for b in batches], mode="lines+markers",
                                        name=f"{name} {preset}", line=dict(color=color, dash=dash), marker_size=5))
    figure.update_layout(title=title, xaxis=_batch_axis(sorted(batches_all)), yaxis_title="GiB (analytic model)",
                         yaxis_type="log", height=380, margin=dict(l=50, r=10, t=50, b=40))
    return figure


def psnr_figure(psnr: list[float], patch_nums: tuple[int, ...], title: str = "Reconstruction PSNR per scale"
                ) -> go.Figure:
    """PSNR (dB) of the tokenizer's reconstruction after each scale (1-based, with its grid), against the input.

    An exact reconstruction (infinite PSNR) is drawn at the top of the axis and labelled "exact"."""
    finite = [v for v in psnr if np.isfinite(v)]
    top = (max(finite) if finite else 40.0) + 5
    ys = [v if np.isfinite(v) else top for v in psnr]
    labels = [f"{v:.1f} dB" if np.isfinite(v) else "exact" for v in psnr]
    ticks = [f"{s + 1}: {p}x{p}" for s, p in enumerate(patch_nums)]
    figure = go.Figure(go.Scatter(x=ticks, y=ys, mode="lines+markers+text", text=labels, textposition="top center",
                                  line_color=MVAR_COLOR, cliponaxis=False,
                                  hovertemplate="scale %{x}: %{text}<extra></extra>"))
    figure.update_layout(title=title, xaxis_title="scales decoded (scale: grid)", yaxis_title="PSNR (dB)",
                         yaxis_range=[min(finite + [top]) - 3 if finite else 0, top + 3], height=300,
                         margin=dict(l=50, r=10, t=50, b=50))
    return figure
