"""Figure builders: pure functions from arrays to images (numpy) or Plotly figures.

Images are uint8 (H, W, 3). Token grids are row-major: token t of a p x p scale is (t // p, t % p).
"""

from __future__ import annotations

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


def filmstrip(previews: list[np.ndarray], cell: int = 96, pad: int = 2) -> np.ndarray:
    """Per-scale previews side by side (as in the paper's progressive figure)."""
    cells = [upscale(p, cell) for p in previews]
    strip = np.full((cell, len(cells) * (cell + pad) - pad, 3), 255, np.uint8)
    for i, image in enumerate(cells):
        strip[:, i * (cell + pad) : i * (cell + pad) + cell] = image
    return strip


def token_at(x: float, y: float, image_size: int, side: int) -> tuple[int, int]:
    """Pixel (x, y) on a displayed image of ``image_size`` px -> (row, col) on a side x side token grid."""
    col = int(np.clip(x * side // image_size, 0, side - 1))
    row = int(np.clip(y * side // image_size, 0, side - 1))
    return row, col


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
    figure = go.Figure(go.Bar(x=[f"s{s}" for s in scales], y=mass, marker_color=colors,
                              hovertemplate="scale %{x}: %{y:.3f}<extra></extra>"))
    figure.update_layout(title=title, yaxis_title="attention mass", xaxis_title="key scale",
                         height=300, margin=dict(l=40, r=10, t=40, b=40), yaxis_range=[0, 1])
    return figure


def cross_scale_heatmaps(per_scale: list[np.ndarray], title: str) -> go.Figure:
    """One small heat map per key scale: where a query's attention goes on every earlier scale."""
    count = len(per_scale)
    figure = make_subplots(rows=1, cols=count, subplot_titles=[f"{m.shape[0]}x{m.shape[0]}" for m in per_scale],
                           horizontal_spacing=0.01)
    peak = max(float(m.max()) for m in per_scale) or 1.0
    for i, grid in enumerate(per_scale):
        figure.add_trace(go.Heatmap(z=grid[::-1], zmin=0, zmax=peak, colorscale="Viridis", showscale=i == count - 1,
                                    hovertemplate="weight %{z:.4f}<extra></extra>"), row=1, col=i + 1)
        figure.update_xaxes(showticklabels=False, row=1, col=i + 1)
        figure.update_yaxes(showticklabels=False, scaleanchor=f"x{i + 1 if i else ''}", row=1, col=i + 1)
    figure.update_layout(title=title, height=220, margin=dict(l=10, r=10, t=60, b=10))
    return figure


def mask_image(patch_nums: tuple[int, ...], kind: str, refine_step: int = 8, kernel_size: int = 7,
               highlight_row: int | None = None, size: int = 340) -> np.ndarray:
    """The attention mask of "var", "scale-markov" or "mvar" as an image (allowed = dark), one row highlighted."""
    if kind == "var":
        allowed = block_causal_mask(patch_nums)
    elif kind == "scale-markov":
        allowed = block_diagonal_mask(patch_nums)
    elif kind == "mvar":
        allowed = mvar_mask(patch_nums, refine_step, kernel_size)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    allowed = allowed.numpy()
    length = allowed.shape[0]
    image = np.where(allowed[..., None], np.array([40, 60, 120], np.uint8), np.array([245, 245, 245], np.uint8))
    picked = (np.arange(size) * length // size).clip(0, length - 1)
    out = image[picked][:, picked].astype(np.uint8)
    if highlight_row is not None:  # keep the highlighted row visible after downsampling
        y = int(highlight_row * size // length)
        out[max(0, y - 1) : y + 2] = np.where(allowed[highlight_row][picked][:, None], [230, 30, 30], [255, 200, 200])
    return out


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


def memory_figure(analytic: dict[str, dict[int, float]], measured: dict[str, dict[int, float]],
                  title: str) -> go.Figure:
    """Peak memory (MiB) against batch size: analytic lines (dashed) and measured points (solid markers)."""
    figure = go.Figure()
    for name, color in (("VAR", VAR_COLOR), ("MVAR", MVAR_COLOR)):
        if name in analytic:
            batches = sorted(analytic[name])
            figure.add_trace(go.Scatter(x=batches, y=[analytic[name][b] for b in batches],
                                        name=f"{name} (analytic model)", mode="lines",
                                        line=dict(color=color, dash="dash")))
        if name in measured and measured[name]:
            batches = sorted(measured[name])
            figure.add_trace(go.Scatter(x=batches, y=[measured[name][b] for b in batches], name=f"{name} (measured)",
                                        mode="lines+markers", line=dict(color=color)))
    figure.update_layout(title=title, xaxis_title="batch size", yaxis_title="peak memory (MiB)", height=340,
                         margin=dict(l=50, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.25))
    return figure


def per_scale_bars(values: dict[str, list[float]], title: str, y_title: str) -> go.Figure:
    """Grouped bars per scale for VAR and MVAR (KV-cache bytes, attention FLOPs, latency...)."""
    figure = go.Figure()
    for name, color in (("VAR", VAR_COLOR), ("MVAR", MVAR_COLOR)):
        if name in values:
            figure.add_trace(go.Bar(x=[f"s{s}" for s in range(len(values[name]))], y=values[name], name=name,
                                    marker_color=color))
    figure.update_layout(title=title, yaxis_title=y_title, barmode="group", height=300,
                         margin=dict(l=50, r=10, t=40, b=40))
    return figure


def preset_memory_figure(curves: dict[str, dict[str, dict[int, float]]], title: str) -> go.Figure:
    """Analytic peak memory above the weights against batch size for several model sizes, VAR vs MVAR."""
    figure = go.Figure()
    for preset, modes in curves.items():
        for name, color, dash in (("VAR", VAR_COLOR, "dash"), ("MVAR", MVAR_COLOR, "solid")):
            batches = sorted(modes[name])
            figure.add_trace(go.Scatter(x=batches, y=[modes[name][b] / 1024 for b in batches], mode="lines",
                                        name=f"{name} {preset}", line=dict(color=color, dash=dash)))
    figure.update_layout(title=title, xaxis_title="batch size", yaxis_title="GiB (analytic model)", height=340,
                         xaxis_type="log", margin=dict(l=50, r=10, t=40, b=40))
    return figure
