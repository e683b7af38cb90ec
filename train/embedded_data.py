"""A procedurally drawn, class-conditional image dataset that ships with the code.

MVAR Studio must train and run offline on a CPU, so instead of downloading a dataset we draw one:
simple scenes ("sun", "house", "fish", ...) that a person recognises at a glance. Every class has
a coarse layout (sky/ground, object placement) that the early, low-resolution scales of a
next-scale generator must get right, and fine detail (stripes, window panes, spokes, spots,
stars, grain) that only the late scales can add.

Images are rendered with numpy from signed distance functions (SDFs) on a fixed pixel grid;
coverage = clamp(0.5 - distance / pixel, 0, 1) gives anti-aliased edges without supersampling,
which keeps rendering well above 1000 images/second in one process.

Everything is deterministic: image ``index`` of a split is drawn from its own RNG derived from
``(seed, split, index)``, so any worker can render any index independently, and the train and
val splits use disjoint seed streams.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 64
SPLITS = ("train", "val")

# Pixel-centre coordinates in [0, 1], y pointing down; shared by every drawing function.
_PX = 1.0 / IMAGE_SIZE
_Y, _X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
_X = (_X + 0.5) * _PX
_Y = (_Y + 0.5) * _PX
_TAU = 2.0 * math.pi


def _upsampler(n: int) -> np.ndarray:
    """(IMAGE_SIZE, n) bilinear interpolation matrix: ``U @ g @ U.T`` smoothly upsamples an n x n grid."""
    pos = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE * (n - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n - 2)
    frac = pos - lo
    up = np.zeros((IMAGE_SIZE, n), np.float32)
    up[np.arange(IMAGE_SIZE), lo] = 1.0 - frac
    up[np.arange(IMAGE_SIZE), lo + 1] = frac
    return up


_UP4, _UP16 = _upsampler(4), _upsampler(16)


# --------------------------------------------------------------------------- colour helpers


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


def _smooth_noise(rng: np.random.Generator, up: np.ndarray) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a random coarse grid, bilinearly upsampled."""
    n = up.shape[1]
    return up @ rng.standard_normal((n, n), dtype=np.float32) @ up.T


# --------------------------------------------------------------------------- SDF primitives
# All take local coordinates (x, y) and return the signed distance (negative inside).


def _len(x, y):
    # Not np.hypot: that is ~4x slower and overflow safety is irrelevant at these magnitudes.
    return np.sqrt(x * x + y * y)


def _frame(cx: float, cy: float, size: float, angle: float = 0.0, mirror: bool = False):
    """Local coordinates of an object centred at (cx, cy), rotated, with 1 unit = ``size`` image widths.

    Returns (x, y, px) where px is the pixel size in local units (needed for anti-aliasing).
    """
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = _X - cx, _Y - cy
    x = (c * dx + s * dy) / size
    y = (c * dy - s * dx) / size
    return (-x if mirror else x), y, _PX / size


def _circle(x, y, cx: float, cy: float, r: float):
    return _len(x - cx, y - cy) - r


def _ellipse(x, y, cx: float, cy: float, a: float, b: float):
    # Scaled-circle approximation: exact on the axes, good enough for anti-aliasing elsewhere.
    return (_len((x - cx) / a, (y - cy) / b) - 1.0) * min(a, b)


def _box(x, y, cx: float, cy: float, hw: float, hh: float, radius: float = 0.0):
    qx = np.abs(x - cx) - (hw - radius)
    qy = np.abs(y - cy) - (hh - radius)
    outside = _len(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - radius


def _segment(x, y, ax: float, ay: float, bx: float, by: float, width: float):
    """Capsule of total thickness ``width`` from (ax, ay) to (bx, by)."""
    ex, ey = bx - ax, by - ay
    t = np.clip(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey + 1e-12), 0.0, 1.0)
    return _len(x - ax - t * ex, y - ay - t * ey) - width / 2


def _convex(x, y, pts):
    """Convex polygon (vertices in either winding order) as the max of its edges' line distances."""
    p = np.asarray(pts, np.float64)
    q = np.roll(p, -1, axis=0)
    orient = 1.0 if np.sum(p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1]) > 0 else -1.0
    d = None
    for (ax, ay), (bx, by) in zip(p, q, strict=True):
        ex, ey = bx - ax, by - ay
        norm = math.hypot(ex, ey) or 1.0
        nx, ny = orient * ey / norm, -orient * ex / norm  # outward normal
        di = (x - ax) * nx + (y - ay) * ny
        d = di if d is None else np.maximum(d, di)
    return d


def _circles(x, y, centers: np.ndarray, radii: np.ndarray):
    """Union of many circles at once (vectorised over a leading axis)."""
    dx = x[None] - centers[:, 0, None, None]
    dy = y[None] - centers[:, 1, None, None]
    return (_len(dx, dy) - radii[:, None, None]).min(axis=0)


def _lines(u, period: float, width: float, phase: float = 0.0):
    """Parallel lines of thickness ``width`` every ``period`` along coordinate u."""
    return np.abs((u / period + phase) % 1.0 - 0.5) * period - width / 2


def _star(x, y, cx: float, cy: float, r_out: float, r_in: float, points: int = 5, angle: float = 0.0):
    """Polar approximation of a star: the radius zig-zags between r_in and r_out."""
    dx, dy = x - cx, y - cy
    rho = _len(dx, dy)
    a = (np.arctan2(dx, -dy) - angle) * (points / _TAU)
    tri = np.abs(a - np.round(a)) * 2.0  # 0 at a tip, 1 between tips
    return (rho - (r_out + (r_in - r_out) * tri)) * 0.6


def _heart(x, y):
    """Inigo Quilez's exact heart SDF; tip at (0, 0), lobes up to y ~ 1.1 (y pointing up)."""
    x = np.abs(x)
    lobe = _len(x - 0.25, y - 0.75) - math.sqrt(2.0) / 4.0
    m = 0.5 * np.maximum(x + y, 0.0)
    body = np.sqrt(np.minimum((x * x + (y - 1.0) ** 2), (x - m) ** 2 + (y - m) ** 2)) * np.sign(x - y)
    return np.where(x + y > 1.0, lobe, body)


# --------------------------------------------------------------------------- painting


def _dot_coverage(centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Coverage of many tiny discs (radius < 1.5 px), touching only a 4x4 pixel window per disc.

    Evaluating every disc over the whole image costs O(n * H * W); snow and star fields need dozens.
    """
    base = np.floor(centers * IMAGE_SIZE).astype(np.int64) - 1
    offs = np.arange(4)
    ix = np.clip(base[:, 0, None, None] + offs[None, None, :], 0, IMAGE_SIZE - 1)
    iy = np.clip(base[:, 1, None, None] + offs[None, :, None], 0, IMAGE_SIZE - 1)
    ix, iy = np.broadcast_arrays(ix, iy)
    # Distances use the (clipped) pixel's own centre, so clipping never puts coverage in the wrong place.
    d = _len((ix + 0.5) * _PX - centers[:, 0, None, None], (iy + 0.5) * _PX - centers[:, 1, None, None])
    cov = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    np.maximum.at(cov, (iy.ravel(), ix.ravel()), _cov(d - radii[:, None, None]).ravel().astype(np.float32))
    return cov


def _cov(d, px: float = _PX):
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _col(color) -> np.ndarray:
    return np.asarray(color, np.float32).reshape(3, 1, 1)


def _paint(img: np.ndarray, cov, color, alpha: float = 1.0) -> None:
    """Alpha-composite a flat colour (or a (3, H, W) image) over the planar ``img`` in place."""
    a = cov if alpha == 1.0 else cov * np.float32(alpha)
    color = color if np.ndim(color) == 3 else _col(color)
    img += a * (color - img)


def _fill(img: np.ndarray, d, px: float, color, alpha: float = 1.0) -> None:
    _paint(img, _cov(d, px), color, alpha)


def _shade(img: np.ndarray, cov, amount) -> None:
    """Darken (amount > 0) or lighten (amount < 0) where ``cov`` is set; amount may be an array."""
    img *= 1.0 - cov * amount


# --------------------------------------------------------------------------- backgrounds


def _gradient(top, bottom, y0: float = 0.0, y1: float = 1.0) -> np.ndarray:
    t = np.clip((_Y - y0) / max(y1 - y0, 1e-6), 0.0, 1.0)
    return _col(top) + _col(bottom - top) * t


def _sky(rng: np.random.Generator) -> np.ndarray:
    """A day or sunset sky as a vertical gradient."""
    if rng.random() < 0.7:
        top = _hsv(rng.uniform(0.55, 0.64), rng.uniform(0.45, 0.8), rng.uniform(0.7, 0.95))
        bottom = _hsv(rng.uniform(0.52, 0.6), rng.uniform(0.1, 0.35), rng.uniform(0.9, 1.0))
    else:
        top = _hsv(rng.uniform(0.6, 0.78), rng.uniform(0.3, 0.6), rng.uniform(0.5, 0.8))
        bottom = _hsv(rng.uniform(0.0, 0.1), rng.uniform(0.35, 0.7), rng.uniform(0.9, 1.0))
    return _gradient(top, bottom)


def _ground(rng: np.random.Generator, img: np.ndarray, horizon: float, color, tilt: float = 0.0) -> None:
    """A slightly tilted, wavy ground plane below ``horizon`` with soft noise on it."""
    wave = rng.uniform(0.0, 0.02) * np.sin(_X * rng.uniform(4, 12) + rng.uniform(0, _TAU))
    d = horizon + tilt * (_X - 0.5) + wave - _Y
    lower = _gradient(color, color * np.float32(0.75), horizon, 1.0)
    cov = _cov(d)
    _paint(img, cov, lower)
    _shade(img, cov, 0.08 * _smooth_noise(rng, _UP16))


def _grass(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0.22, 0.33), rng.uniform(0.45, 0.8), rng.uniform(0.45, 0.75))


def _pastel(rng: np.random.Generator, avoid_hue: float | None = None) -> np.ndarray:
    """A radial gradient in a random light colour, optionally >= 0.12 (on the hue circle) from avoid_hue."""
    h = rng.random()
    while avoid_hue is not None and abs((h - avoid_hue + 0.5) % 1.0 - 0.5) < 0.12:
        h = rng.random()
    inner = _hsv(h, rng.uniform(0.05, 0.3), rng.uniform(0.9, 1.0))
    outer = _hsv(h + rng.uniform(-0.08, 0.08), rng.uniform(0.2, 0.5), rng.uniform(0.65, 0.9))
    r = np.clip(_len(_X - rng.uniform(0.3, 0.7), _Y - rng.uniform(0.3, 0.7)) * 1.4, 0.0, 1.0)
    return _col(inner) + _col(outer - inner) * r


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Film grain + low-frequency lighting variation, then quantise to uint8."""
    light = 1.0 + rng.uniform(0.0, 0.08) * _smooth_noise(rng, _UP4)
    grain = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    grain *= np.float32(rng.uniform(0.0, 0.015))
    out = np.clip(img * light + grain, 0.0, 1.0) * 255.0 + 0.5
    return np.ascontiguousarray(out.astype(np.uint8).transpose(1, 2, 0))


# --------------------------------------------------------------------------- the classes
# Each ``_draw_*`` returns a float32 (64, 64, 3) image in [0, 1]. Local frames put the object's
# main body in roughly [-1, 1]; ``size`` (in image widths) sets the on-screen scale.


def _draw_sun(rng: np.random.Generator) -> np.ndarray:
    img = _sky(rng)
    if rng.random() < 0.5:
        _ground(rng, img, rng.uniform(0.78, 0.92), _grass(rng), rng.uniform(-0.2, 0.2))
    size = rng.uniform(0.11, 0.17)
    x, y, px = _frame(rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.6), size, rng.uniform(0, _TAU))
    rho = _len(x, y)
    n_rays = int(rng.integers(7, 14))
    a = np.arctan2(y, x) * (n_rays / _TAU)
    frac = np.abs(a - np.round(a))  # 0 on a ray's axis, 0.5 between rays
    r_in, r_out = 1.2, rng.uniform(1.7, 2.2)
    half = 0.28 * np.clip((r_out - rho) / (r_out - r_in), 0.0, 1.0) + 0.02  # rays taper outwards
    d_ray = np.maximum((frac - half) * (_TAU / n_rays) * rho, np.maximum(r_in - 0.3 - rho, rho - r_out))
    hue = rng.uniform(0.08, 0.15)
    _fill(img, d_ray, px, _hsv(hue - 0.02, rng.uniform(0.8, 1.0), rng.uniform(0.9, 1.0)))
    disc = rho - 1.0
    _fill(img, disc, px, _hsv(hue + 0.01, rng.uniform(0.7, 0.95), 1.0))
    # A bright core and a darker rim make the disc read as a glowing ball.
    _shade(img, _cov(disc, px), -0.25 * np.clip(1.0 - rho, 0.0, 1.0) + 0.1 * np.clip(rho - 0.6, 0, 1))
    return img


def _draw_house(rng: np.random.Generator) -> np.ndarray:
    img = _sky(rng)
    ground_y = rng.uniform(0.74, 0.86)
    _ground(rng, img, ground_y, _grass(rng))
    size = rng.uniform(0.2, 0.3)
    x, y, px = _frame(rng.uniform(0.35, 0.65), ground_y - size, size, rng.uniform(-0.06, 0.06))
    w = rng.uniform(0.7, 1.0)
    wall = _hsv(rng.choice([0.02, 0.08, 0.12, 0.55, 0.6]) + rng.uniform(-0.03, 0.03), rng.uniform(0.2, 0.7),
                rng.uniform(0.65, 0.95))
    d_wall = _box(x, y, 0.0, 0.45, w, 0.55)
    _fill(img, d_wall, px, wall)
    # Siding boards: fine horizontal lines only the late scales can resolve.
    _fill(img, np.maximum(d_wall, _lines(y, rng.uniform(0.14, 0.2), 0.035)), px, wall * 0.8)
    roof = _hsv(rng.uniform(-0.03, 0.08), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.6))
    if rng.random() < 0.6:
        _fill(img, _box(x, y, 0.55 * w, -0.55, 0.12, 0.3), px, roof * 0.8)  # chimney
    peak = -rng.uniform(0.75, 1.05)
    d_roof = _convex(x, y, [(-w - 0.2, -0.05), (w + 0.2, -0.05), (0.0, peak)])
    _fill(img, d_roof, px, roof)
    _fill(img, np.maximum(d_roof, _lines(y, 0.12, 0.03)), px, roof * 0.75)
    door_x = rng.uniform(-0.5, 0.5) * w
    _fill(img, _box(x, y, door_x, 0.72, 0.16, 0.28, 0.04), px, _hsv(rng.uniform(0.0, 0.12), 0.6, 0.35))
    _fill(img, _circle(x, y, door_x + 0.08, 0.75, 0.03), px, (0.9, 0.8, 0.3))
    glass = _hsv(rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.6), rng.uniform(0.8, 1.0))
    for wx in (-0.5 * w, 0.5 * w):
        if abs(wx - door_x) < 0.4:
            continue
        win = _box(x, y, wx, 0.35, 0.18, 0.16)
        _fill(img, win - 0.04, px, (0.95, 0.95, 0.92))  # frame
        _fill(img, win, px, glass)
        panes = np.maximum(win, np.minimum(np.abs(x - wx), np.abs(y - 0.35)) - 0.02)
        _fill(img, panes, px, (0.95, 0.95, 0.92))
    return img


def _draw_tree(rng: np.random.Generator) -> np.ndarray:
    img = _sky(rng)
    ground_y = rng.uniform(0.78, 0.9)
    _ground(rng, img, ground_y, _grass(rng) * 0.85)
    size = rng.uniform(0.18, 0.26)
    cx = rng.uniform(0.35, 0.65)
    x, y, px = _frame(cx, ground_y - 1.6 * size, size, rng.uniform(-0.08, 0.08))
    bark = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.5, 0.8), rng.uniform(0.25, 0.45))
    leaf = _hsv(rng.uniform(0.2, 0.38), rng.uniform(0.55, 0.9), rng.uniform(0.35, 0.65))
    leaves = _cov(_smooth_noise(rng, _UP16), 0.5)  # leafy clumps
    if rng.random() < 0.35:  # conifer: stacked triangles
        _fill(img, _box(x, y, 0.0, 1.25, 0.14, 0.4), px, bark)
        for i, (top, half) in enumerate(((-1.5, 0.6), (-1.0, 0.85), (-0.4, 1.05))):
            d = _convex(x, y, [(-half, top + 1.2), (half, top + 1.2), (0.0, top)])
            _fill(img, d, px, leaf * (0.8 + 0.1 * i))
            _shade(img, _cov(d, px) * leaves, 0.25)
        return img
    trunk_w = rng.uniform(0.14, 0.22)
    trunk = [(-trunk_w, 1.6), (trunk_w, 1.6), (0.6 * trunk_w, -0.2), (-0.6 * trunk_w, -0.2)]  # tapers up
    _fill(img, _convex(x, y, trunk), px, bark)
    _fill(img, _segment(x, y, 0.0, 0.6, 0.5, 0.1, 0.1), px, bark)  # a branch
    k = int(rng.integers(4, 7))
    ang = rng.uniform(0, _TAU) + np.arange(k) * (_TAU / k)
    centers = np.stack([np.cos(ang) * rng.uniform(0.35, 0.6, k), np.sin(ang) * rng.uniform(0.25, 0.45, k)], 1)
    radii = rng.uniform(0.45, 0.65, k)
    d_crown = np.minimum(_circles(x, y, centers, radii), _circle(x, y, 0.0, 0.0, 0.65))
    _fill(img, d_crown, px, leaf)
    crown = _cov(d_crown, px)
    _shade(img, crown * leaves, 0.3)
    _shade(img, crown, np.clip(y * 0.25, -0.2, 0.25))  # light from above
    if rng.random() < 0.4:  # fruit
        n = int(rng.integers(4, 9))
        fruit = np.stack([rng.uniform(-0.8, 0.8, n), rng.uniform(-0.6, 0.5, n)], 1)
        d = np.maximum(_circles(x, y, fruit, np.full(n, 0.09)), d_crown + 0.05)
        _fill(img, d, px, _hsv(rng.choice([0.0, 0.08, 0.14]), 0.9, 0.9))
    return img


def _draw_fish(rng: np.random.Generator) -> np.ndarray:
    top = _hsv(rng.uniform(0.47, 0.58), rng.uniform(0.5, 0.9), rng.uniform(0.6, 0.9))
    img = _gradient(top, top * rng.uniform(0.35, 0.6))
    # Caustic ripples near the surface.
    ripple = np.sin(_X * 25 + 6 * np.sin(_Y * 9 + rng.uniform(0, _TAU))) * np.clip(0.6 - _Y, 0, 1)
    _shade(img, np.ones_like(_X), -0.12 * ripple)
    size = rng.uniform(0.2, 0.28)
    x, y, px = _frame(rng.uniform(0.38, 0.62), rng.uniform(0.38, 0.62), size, rng.uniform(-0.35, 0.35),
                      mirror=bool(rng.random() < 0.5))
    body_c = _hsv(rng.choice([0.02, 0.08, 0.13, 0.8, 0.95, 0.5]) + rng.uniform(-0.03, 0.03),
                  rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    fin_c = body_c * 0.75
    b = rng.uniform(0.4, 0.55)
    _fill(img, _convex(x, y, [(0.65, 0.0), (1.2, -0.5), (1.05, 0.0), (1.2, 0.5)]), px, fin_c)  # tail
    _fill(img, _convex(x, y, [(-0.3, -b + 0.05), (0.05, -b - 0.35), (0.35, -b + 0.1)]), px, fin_c)  # dorsal
    d_body = _ellipse(x, y, 0.0, 0.0, 0.85, b)
    _fill(img, d_body, px, body_c)
    body = _cov(d_body, px)
    pattern = rng.integers(3)
    if pattern == 0:  # bands, clownfish style
        _fill(img, np.maximum(d_body, _lines(x, rng.uniform(0.4, 0.55), 0.14, rng.random())), px,
              (0.97, 0.97, 0.95))
    elif pattern == 1:  # scales: a lattice of small arcs
        scales = np.abs(_len((x * 6) % 1 - 0.5, (y * 6 + 0.5 * np.floor(x * 6)) % 1 - 0.5) - 0.45)
        _shade(img, body * (scales < 0.1) * (x > -0.45), 0.3)
    _shade(img, body, np.clip(y / b, -1, 1) * 0.2)  # darker belly side
    _fill(img, _circle(x, y, -0.5, -0.1, 0.13), px, (1, 1, 1))
    _fill(img, _circle(x, y, -0.53, -0.1, 0.07), px, (0.05, 0.05, 0.05))
    _fill(img, _segment(x, y, -0.85, 0.12, -0.7, 0.15, 0.04), px, body_c * 0.4)  # mouth
    n = int(rng.integers(2, 5))  # bubbles rising from the mouth
    by = -0.3 - np.arange(n) * 0.35
    bx = -1.0 - 0.1 * np.sin(np.arange(n) * 2.0)
    rings = np.abs(_circles(x, y, np.stack([bx, by], 1), np.linspace(0.08, 0.15, n))) - 0.025
    _fill(img, rings, px, (0.85, 0.95, 1.0), 0.8)
    return img


def _draw_boat(rng: np.random.Generator) -> np.ndarray:
    img = _sky(rng)
    horizon = rng.uniform(0.62, 0.74)
    sea = _hsv(rng.uniform(0.5, 0.62), rng.uniform(0.5, 0.85), rng.uniform(0.45, 0.75))
    size = rng.uniform(0.18, 0.25)
    # The waterline (local y ~ 0.85) cuts the hull, so the hull and its trim stay visible.
    x, y, px = _frame(rng.uniform(0.35, 0.65), horizon - 0.85 * size, size, rng.uniform(-0.12, 0.12),
                      mirror=bool(rng.random() < 0.5))
    _fill(img, _box(x, y, 0.0, -0.35, 0.035, 0.95), px, (0.35, 0.22, 0.12))  # mast
    sail = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.85, 1.0))
    d_sail = _convex(x, y, [(0.08, -1.25), (0.08, 0.45), (rng.uniform(0.8, 1.05), 0.45)])
    _fill(img, d_sail, px, sail)
    if rng.random() < 0.5:  # striped sail
        _fill(img, np.maximum(d_sail, _lines(y, 0.3, 0.12)), px, _hsv(rng.random(), 0.8, 0.8))
    _fill(img, _convex(x, y, [(-0.08, -1.0), (-0.08, 0.45), (-rng.uniform(0.5, 0.75), 0.45)]), px, sail * 0.9)
    _fill(img, _convex(x, y, [(0.0, -1.3), (0.0, -1.12), (0.3, -1.21)]), px, (0.9, 0.15, 0.1))  # flag
    hull = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.7))
    d_hull = _convex(x, y, [(-1.15, 0.55), (1.2, 0.55), (0.85, 1.0), (-0.85, 1.0)])
    _fill(img, d_hull, px, hull)
    _fill(img, np.maximum(d_hull, np.abs(y - 0.68) - 0.04), px, (0.95, 0.95, 0.95))  # trim line
    # Sea in front of the hull: wavy surface, then wave crests as fine lines.
    surface = horizon + 0.008 * np.sin(_X * 40 + rng.uniform(0, _TAU))
    d_sea = surface - _Y
    water = _gradient(sea, sea * 0.6, horizon, 1.0)
    _paint(img, _cov(d_sea), water)
    crest = _lines(_Y + 0.012 * np.sin(_X * 30 + rng.uniform(0, _TAU)), rng.uniform(0.05, 0.08), 0.012)
    _fill(img, np.maximum(crest, d_sea - 0.02), _PX, (0.9, 0.95, 1.0), 0.6)
    return img


def _draw_flower(rng: np.random.Generator) -> np.ndarray:
    img = _pastel(rng) if rng.random() < 0.5 else _gradient(_hsv(rng.uniform(0.5, 0.6), 0.3, 0.95),
                                                            _grass(rng))
    size = rng.uniform(0.17, 0.25)
    cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.5)
    stem = _hsv(rng.uniform(0.25, 0.35), 0.7, 0.5)
    sx = cx + rng.uniform(-0.1, 0.1)
    _fill(img, _segment(_X, _Y, cx, cy, sx, 1.05, 0.045 * size / 0.2), _PX, stem)
    lx, ly, lpx = _frame((cx + sx) / 2 + 0.06, cy + 0.55 * (1.05 - cy), size, rng.uniform(-0.9, -0.4))
    _fill(img, _ellipse(lx, ly, 0.0, 0.0, 0.55, 0.2), lpx, stem * 1.15)  # leaf
    x, y, px = _frame(cx, cy, size, rng.uniform(0, _TAU))
    rho = _len(x, y)
    n = int(rng.integers(5, 9))
    theta = np.arctan2(y, x)
    lobes = np.abs(np.cos(theta * (n / 2.0)))
    d_petals = (rho - (0.35 + 0.65 * np.sqrt(lobes))) * 0.7
    petal = _hsv(rng.choice([0.0, 0.08, 0.13, 0.75, 0.83, 0.92, 0.6]) + rng.uniform(-0.03, 0.03),
                 rng.uniform(0.5, 0.9), rng.uniform(0.85, 1.0))
    if rng.random() < 0.2:
        petal = _hsv(0.0, 0.0, 0.97)  # white daisy
    _fill(img, d_petals, px, petal)
    # Darker petal bases and thin veins along each petal's axis.
    _shade(img, _cov(d_petals, px), 0.35 * np.clip(0.8 - rho, 0.0, 1.0))
    vein = np.maximum(np.maximum(d_petals + 0.08, (1.0 - lobes) * rho * 3.0 - 0.06), 0.3 - rho)
    _fill(img, vein, px, petal * 0.6)
    d_c = rho - rng.uniform(0.25, 0.35)
    _fill(img, d_c, px, _hsv(rng.uniform(0.07, 0.15), 0.85, rng.uniform(0.5, 0.95)))
    seeds = np.minimum(np.abs(x * 14 % 1 - 0.5), np.abs(y * 14 % 1 - 0.5)) / 14
    _fill(img, np.maximum(d_c, 0.025 - seeds), px, (0.35, 0.2, 0.05), 0.6)
    return img


def _draw_car(rng: np.random.Generator) -> np.ndarray:
    img = _sky(rng)
    road_y = rng.uniform(0.72, 0.82)
    asphalt = _hsv(0.0, 0.0, rng.uniform(0.25, 0.45))
    _ground(rng, img, road_y, asphalt)
    dash = np.maximum(np.abs(_Y - (road_y + 1.0) / 2) - 0.012, _lines(_X, 0.2, 0.1, rng.random()))
    _fill(img, dash, _PX, (0.95, 0.95, 0.85))
    size = rng.uniform(0.22, 0.3)
    x, y, px = _frame(rng.uniform(0.4, 0.6), road_y - 0.2 * size, size, rng.uniform(-0.05, 0.05),
                      mirror=bool(rng.random() < 0.5))
    paint = _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.45, 0.95))
    top = rng.uniform(-0.6, -0.45)
    d_cabin = _convex(x, y, [(-0.65, -0.2), (0.6, -0.2), (0.3, top), (-0.4, top)])
    _fill(img, d_cabin, px, paint * 0.9)
    glass = np.maximum(d_cabin + 0.07, 0.045 - np.abs(x + 0.05))  # two windows split by a pillar
    _fill(img, glass, px, _hsv(0.55, 0.25, 0.95))
    d_body = _box(x, y, 0.0, -0.02, 1.0, 0.25, 0.12)
    _fill(img, d_body, px, paint)
    _fill(img, np.maximum(d_body, np.abs(x + 0.05) - 0.01), px, paint * 0.6)  # door seam
    _fill(img, _box(x, y, -0.22, -0.1, 0.08, 0.02), px, paint * 0.5)  # handle
    _fill(img, _circle(x, y, -0.93, -0.1, 0.07), px, (1.0, 0.95, 0.55))  # headlight
    _fill(img, _box(x, y, 0.97, -0.1, 0.04, 0.07), px, (0.85, 0.1, 0.1))  # tail light
    for wx in (-0.6, 0.6):
        _fill(img, _circle(x, y, wx, 0.22, 0.25), px, (0.06, 0.06, 0.06))
        _fill(img, _circle(x, y, wx, 0.22, 0.13), px, (0.75, 0.75, 0.78))
        cross = np.minimum(np.abs(x - wx), np.abs(y - 0.22)) - 0.018
        spokes = np.maximum(_circle(x, y, wx, 0.22, 0.13), cross)
        _fill(img, spokes, px, (0.35, 0.35, 0.38))
    return img


def _draw_moon(rng: np.random.Generator) -> np.ndarray:
    img = _gradient(_hsv(rng.uniform(0.6, 0.75), rng.uniform(0.5, 0.9), rng.uniform(0.05, 0.15)),
                    _hsv(rng.uniform(0.6, 0.72), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.4)))
    n = int(rng.integers(12, 30))
    dots = np.stack([rng.random(n), rng.random(n)], 1)
    _paint(img, _dot_coverage(dots, rng.uniform(0.004, 0.012, n)), (1.0, 1.0, 0.9), 0.9)
    size = rng.uniform(0.14, 0.2)
    x, y, px = _frame(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.6), size, rng.uniform(0, _TAU))
    moon = _hsv(rng.uniform(0.1, 0.16), rng.uniform(0.1, 0.5), rng.uniform(0.9, 1.0))
    d_moon = np.maximum(_circle(x, y, 0.0, 0.0, 1.0), -_circle(x, y, rng.uniform(0.4, 0.6), -0.15, 0.9))
    _fill(img, d_moon - 0.12, px, moon, 0.2)  # glow
    _fill(img, d_moon, px, moon)
    craters = np.array([[-0.65, 0.2], [-0.5, -0.45], [-0.3, 0.65]])
    _fill(img, np.maximum(_circles(x, y, craters, np.array([0.14, 0.1, 0.08])), d_moon), px, moon * 0.82)
    for _ in range(int(rng.integers(2, 5))):  # a few big five-point stars around the moon
        ang = rng.uniform(0, _TAU)
        r = rng.uniform(1.6, 2.4)
        tip = rng.uniform(0.3, 0.45)
        d = _star(x, y, math.cos(ang) * r, math.sin(ang) * r, tip, 0.15, 5, rng.uniform(0, 1))
        _fill(img, d, px, (1.0, 0.95, 0.55))
    return img


def _draw_mushroom(rng: np.random.Generator) -> np.ndarray:
    img = _gradient(_hsv(rng.uniform(0.2, 0.4), rng.uniform(0.3, 0.6), rng.uniform(0.25, 0.5)),
                    _hsv(rng.uniform(0.15, 0.3), rng.uniform(0.4, 0.7), rng.uniform(0.5, 0.8)))
    ground_y = rng.uniform(0.8, 0.9)
    _ground(rng, img, ground_y, _hsv(rng.uniform(0.05, 0.1), 0.6, rng.uniform(0.3, 0.45)))
    size = rng.uniform(0.2, 0.28)
    x, y, px = _frame(rng.uniform(0.38, 0.62), ground_y - 1.0 * size, size, rng.uniform(-0.2, 0.2))
    stem_c = _hsv(rng.uniform(0.08, 0.14), rng.uniform(0.05, 0.25), rng.uniform(0.85, 0.98))
    d_stem = _convex(x, y, [(-0.25, 1.0), (0.25, 1.0), (0.2, -0.1), (-0.2, -0.1)]) - 0.05
    _fill(img, d_stem, px, stem_c)
    _shade(img, _cov(d_stem, px), np.clip(x * 0.6, -0.1, 0.25))
    cap_c = _hsv(rng.choice([0.0, 0.02, 0.06, 0.09]), rng.uniform(0.7, 1.0), rng.uniform(0.6, 0.95))
    h = rng.uniform(0.6, 0.85)
    d_cap = np.maximum(_ellipse(x, y, 0.0, 0.05, 0.95, h), y - 0.05) - 0.03
    _fill(img, _ellipse(x, y, 0.0, 0.05, 0.85, 0.1), px, stem_c * 0.8)  # gills underneath
    _fill(img, d_cap, px, cap_c)
    _shade(img, _cov(d_cap, px), np.clip(0.25 * (x + 0.3 - y * 0.5), -0.15, 0.3))
    k = int(rng.integers(4, 8))
    spots = np.stack([rng.uniform(-0.7, 0.7, k), rng.uniform(-h + 0.1, -0.1, k)], 1)
    _fill(img, np.maximum(_circles(x, y, spots, rng.uniform(0.08, 0.16, k)), d_cap + 0.05), px,
          (0.98, 0.97, 0.92))
    # Grass blades in front: thin spikes along the ground line.
    blades = np.abs(((_X * rng.uniform(30, 50)) % 1.0) - 0.5) * 2.0
    d_blade = _Y - (ground_y + 0.01 - rng.uniform(0.03, 0.05) * (1.0 - blades))
    _fill(img, np.maximum(-d_blade, _Y - ground_y - 0.03), _PX, _grass(rng))
    return img


def _draw_ball(rng: np.random.Generator) -> np.ndarray:
    img = _pastel(rng)
    floor_y = rng.uniform(0.78, 0.9)
    _ground(rng, img, floor_y, _hsv(rng.uniform(0.08, 0.14), rng.uniform(0.2, 0.5), rng.uniform(0.7, 0.9)))
    size = rng.uniform(0.17, 0.26)
    cx = rng.uniform(0.35, 0.65)
    _fill(img, _ellipse(_X, _Y, cx, floor_y + 0.02, size * 0.9, size * 0.18), _PX, (0, 0, 0), 0.3)  # shadow
    x, y, px = _frame(cx, floor_y - size * rng.uniform(0.95, 1.4), size, rng.uniform(0, _TAU))
    d_ball = _len(x, y) - 1.0
    _fill(img, d_ball, px, (0.97, 0.97, 0.97))
    # Beach-ball segments radiate from a pole that is offset from the centre (the ball looks tilted).
    pole_x, pole_y = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)
    px_, py_ = x - pole_x, y - pole_y
    rho = _len(px_, py_)
    segments = 6
    a = np.arctan2(py_, px_) * (segments / _TAU) + rng.random()
    hues = rng.permutation(np.array([0.0, 0.13, 0.33, 0.6, 0.8]))
    for j in range(2):  # colours j and j + 1 of 3 (the third is the white base)
        f = (a / 3.0 - j / 3.0) % 1.0
        d = np.maximum((np.abs(f - 1 / 6) - 1 / 6) * 3.0 * (_TAU / segments) * rho, d_ball)
        _fill(img, d, px, _hsv(hues[j], rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)))
    _fill(img, np.maximum(rho - 0.15, d_ball), px, (0.97, 0.97, 0.97))  # pole cap
    ball = _cov(d_ball, px)
    r = _len(x + 0.35, y + 0.35)
    _shade(img, ball, 0.45 * np.clip(r - 0.6, 0.0, 1.0))  # sphere shading, lit from top left
    _fill(img, np.maximum(_ellipse(x, y, -0.42, -0.45, 0.22, 0.14), d_ball), px, (1, 1, 1), 0.75)
    return img


def _draw_heart(rng: np.random.Generator) -> np.ndarray:
    img = _pastel(rng, avoid_hue=0.97)  # keep the heart's reds off the wallpaper
    if rng.random() < 0.5:  # polka dots or diagonal stripes on the wallpaper
        f = rng.uniform(6, 10)
        dots = _len((_X * f) % 1 - 0.5, (_Y * f + 0.5 * np.floor(_X * f)) % 1 - 0.5) / f - 0.12 / f * 2
        _fill(img, dots, _PX, (1, 1, 1), 0.5)
    else:
        _fill(img, _lines(_X + _Y, rng.uniform(0.08, 0.14), 0.025), _PX, (1, 1, 1), 0.4)
    size = rng.uniform(0.3, 0.42)
    x, y, px = _frame(rng.uniform(0.38, 0.62), rng.uniform(0.4, 0.6), size, rng.uniform(-0.4, 0.4))
    hx, hy = x, 0.55 - y  # the SDF wants y up with the tip at the origin
    d = _heart(hx, hy)
    color = _hsv(rng.choice([0.97, 0.0, 0.93, 0.88]) + rng.uniform(-0.02, 0.02), rng.uniform(0.6, 1.0),
                 rng.uniform(0.75, 1.0))
    _fill(img, d, px, color * 0.6)  # outline
    _fill(img, d + rng.uniform(0.04, 0.08), px, color)
    _fill(img, _ellipse(x, y, -0.25, -0.2, 0.1, 0.06), px, (1, 1, 1), 0.8)  # shine
    if rng.random() < 0.5:  # sparkles
        for sx, sy in ((0.6, -0.5), (-0.7, 0.3)):
            _fill(img, _star(x, y, sx, sy, 0.15, 0.04, 4), px, (1, 1, 0.9))
    return img


def _draw_snowman(rng: np.random.Generator) -> np.ndarray:
    img = _gradient(_hsv(rng.uniform(0.55, 0.68), rng.uniform(0.2, 0.6), rng.uniform(0.45, 0.85)),
                    _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.05, 0.2), rng.uniform(0.8, 0.95)))
    ground_y = rng.uniform(0.8, 0.9)
    _ground(rng, img, ground_y, _hsv(0.6, rng.uniform(0.02, 0.1), rng.uniform(0.88, 0.98)))
    size = rng.uniform(0.13, 0.18)
    x, y, px = _frame(rng.uniform(0.35, 0.65), ground_y - 2.9 * size, size, rng.uniform(-0.1, 0.1))
    snow = np.array([0.97, 0.97, 1.0], np.float32)
    stick = (0.35, 0.2, 0.1)
    _fill(img, _segment(x, y, -0.55, 1.2, -1.5, 0.5, 0.09), px, stick)  # arms
    _fill(img, _segment(x, y, 0.55, 1.2, 1.5, 0.6, 0.09), px, stick)
    balls = ((0.0, 2.0, 0.95), (0.0, 0.75, 0.7), (0.0, -0.35, 0.5))
    for bx, by, r in balls:
        d = _circle(x, y, bx, by, r)
        _fill(img, d, px, snow)
        _shade(img, _cov(d, px), 0.2 * np.clip((_len(x - bx + 0.3 * r, y - by + 0.3 * r) / r) - 0.6, 0, 1))
    coal = (0.08, 0.08, 0.1)
    eyes_buttons = np.array([[-0.17, -0.45], [0.17, -0.45], [0.0, 0.5], [0.0, 0.8], [0.0, 1.1]])
    _fill(img, _circles(x, y, eyes_buttons, np.array([0.07, 0.07, 0.08, 0.08, 0.08])), px, coal)
    nose = [(0.0, -0.34), (0.0, -0.2), (rng.uniform(0.45, 0.65), -0.28)]  # carrot
    _fill(img, _convex(x, y, nose), px, (1.0, 0.5, 0.1))
    if rng.random() < 0.6:  # scarf
        _fill(img, _box(x, y, 0.0, 0.1, 0.5, 0.08, 0.05), px, _hsv(rng.random(), 0.8, 0.85))
        _fill(img, _box(x, y, 0.3, 0.35, 0.08, 0.25, 0.04), px, _hsv(rng.random(), 0.8, 0.85))
    if rng.random() < 0.7:  # top hat
        _fill(img, _box(x, y, 0.0, -0.82, 0.55, 0.06), px, coal)
        _fill(img, _box(x, y, 0.0, -1.15, 0.35, 0.33), px, coal)
        _fill(img, _box(x, y, 0.0, -0.95, 0.35, 0.05), px, _hsv(rng.random(), 0.8, 0.7))
    n = int(rng.integers(15, 35))  # falling snow
    flakes = np.stack([rng.random(n), rng.random(n) * ground_y], 1)
    _paint(img, _dot_coverage(flakes, rng.uniform(0.004, 0.01, n)), snow, 0.85)
    return img


_CLASSES: tuple[tuple[str, Callable[[np.random.Generator], np.ndarray]], ...] = (
    ("sun", _draw_sun),
    ("house", _draw_house),
    ("tree", _draw_tree),
    ("fish", _draw_fish),
    ("sailboat", _draw_boat),
    ("flower", _draw_flower),
    ("car", _draw_car),
    ("moon & stars", _draw_moon),
    ("mushroom", _draw_mushroom),
    ("beach ball", _draw_ball),
    ("heart", _draw_heart),
    ("snowman", _draw_snowman),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in _CLASSES)
NUM_CLASSES = len(CLASS_NAMES)


# --------------------------------------------------------------------------- public API


def render(class_id: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one random image of ``class_id``: a (64, 64, 3) uint8 array, fully determined by ``rng``."""
    if isinstance(class_id, bool) or not isinstance(class_id, (int, np.integer)):
        raise ValueError(f"class_id must be an int, got {class_id!r}")
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class_id must be in [0, {NUM_CLASSES}), got {class_id}")
    img = _CLASSES[int(class_id)][1](rng).astype(np.float32, copy=False)
    return _finish(img, rng)


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def _check_nonneg(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _rng(split: str, index: int, seed: int, stream: int = 0) -> np.random.Generator:
    """Independent generator per (seed, split, index, stream): spawn keys never collide across splits."""
    key = (_check_split(split), _check_nonneg("index", index), stream)
    return np.random.default_rng(np.random.SeedSequence(_check_nonneg("seed", seed), spawn_key=key))


def sample(split: str, index: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Image ``index`` of ``split``: (uint8 HWC image, class id). Classes cycle, so any prefix is balanced."""
    rng = _rng(split, index, seed)
    label = int(index) % NUM_CLASSES
    return render(label, rng), label


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1] (the range the tokenizer trains on)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class EmbeddedDataset(torch.utils.data.Dataset):
    """The first ``size`` images of a split as (float32 (3, 64, 64) tensor in [-1, 1], label) pairs.

    With ``flip=True`` an image is mirrored horizontally with probability 1/2, decided by a separate
    stream of the same per-index seed (and the epoch, see ``set_epoch``), so it stays reproducible.
    """

    def __init__(self, split: str = "train", size: int = 50000, seed: int = 0, flip: bool = False):
        _check_split(split)
        self.split = split
        self.size = _check_nonneg("size", size)
        self.seed = _check_nonneg("seed", seed)
        self.flip = bool(flip)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the flips for a new epoch (the images themselves never change)."""
        self.epoch = _check_nonneg("epoch", epoch)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset index must be an int, got {type(index).__name__}")
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of size {self.size}")
        image, label = sample(self.split, int(index), self.seed)
        if self.flip and _rng(self.split, int(index), self.seed, stream=1 + self.epoch).random() < 0.5:
            image = image[:, ::-1]
        return to_tensor(image), label


def preview_grid(per_class: int = 8, seed: int = 0, split: str = "val") -> np.ndarray:
    """One row per class of real dataset items (uint8 HWC), with a 2 px gap between cells."""
    per_class = _check_nonneg("per_class", per_class)
    if per_class == 0:
        raise ValueError("per_class must be at least 1")
    cell = IMAGE_SIZE + 2
    grid = np.full((NUM_CLASSES * cell, per_class * cell, 3), 255, np.uint8)
    for c in range(NUM_CLASSES):
        for k in range(per_class):
            image, _ = sample(split, c + k * NUM_CLASSES, seed)
            grid[c * cell : c * cell + IMAGE_SIZE, k * cell : k * cell + IMAGE_SIZE] = image
    return grid


def save_preview_grid(
    path: str, per_class: int = 8, seed: int = 0, scale: int = 1, labels: bool = True
) -> None:
    """Save ``preview_grid`` as a PNG, nearest-upscaled by ``scale``, optionally with class names."""
    scale = _check_nonneg("scale", scale)
    if scale == 0:
        raise ValueError("scale must be at least 1")
    grid = Image.fromarray(preview_grid(per_class, seed))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    if labels:
        margin = 100
        canvas = Image.new("RGB", (grid.width + margin, grid.height), (255, 255, 255))
        canvas.paste(grid, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        row = (IMAGE_SIZE + 2) * scale
        for c, name in enumerate(CLASS_NAMES):
            draw.text((6, c * row + row // 2 - 6), f"{c}: {name}", fill=(0, 0, 0), font=font)
        grid = canvas
    grid.save(path)
