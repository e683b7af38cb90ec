"""Attention masks and attention backends.

Masks are boolean, True = the query (row) may attend to the key (column):

* VAR, block-causal: a token of scale s sees every token of scales <= s.
* MVAR, scale-Markov: a token of scale s sees only the tokens of scale s (block-diagonal).
* MVAR, spatial-Markov: on scales >= refine_step a token sees only a k x k neighbourhood of
  its own pn x pn grid, with NATTEN's convention: windows keep their full size and shift
  inward at the borders, so every query sees exactly k*k keys when the grid is at least k wide.

Windowed attention has three implementations that agree to fp32 round-off:

* ``dense``: scaled_dot_product_attention with the N x N neighbourhood mask (the reference).
* ``gather``: halo tiles. The grid is cut into tile_h x tile_w query tiles; each tile attends to
  the (tile_h + k - 1) x (tile_w + k - 1) key region that contains every window of its queries,
  with a small per-tile mask. Memory is O(N * region) (never N x N) and the work runs as
  batched matrix products, which CPUs do far faster than per-query gathers.
* ``natten``: NATTEN's ``na2d`` on heads-last (B, height, width, H, D) tensors, the official MVAR
  code's call. On CUDA it runs NATTEN's fused kernels. On the CPU (``natten`` installed from its
  source distribution, without libnatten) it runs NATTEN's flex-attention path: forward only (no
  gradients), fp32/fp16/bf16, head dims a power of two from 8 to 512, and slower than dense or
  gather, so "auto" never picks it there; it is the independent check of our two backends.

Tensors are (B, H, N, D) throughout: batch, heads, tokens (row-major over the grid), head dim.

Public API: ``window_starts``, ``neighborhood_indices`` and ``neighborhood_mask`` (one grid's windows, as
key positions, key indices or a mask: the reference the tests hold the backends to);
``block_causal_mask``, ``block_diagonal_mask`` and ``mvar_mask`` (the masks over the whole pyramid, which
the app draws); ``dense_attention``, ``windowed_attention`` and their ``*_weights`` (the transformer's
calls); ``resolve_backend`` and ``natten_available``. The timing table of the backends is part of the
benchmark: ``python -m mvar.benchmark --measure attention``.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import boolean, integer, real, shown
from .schedule import ScaleSchedule

BACKENDS: tuple[str, ...] = ("auto", "dense", "gather", "natten")

# Devices NATTEN 0.21 runs on: CUDA (fused kernels, or flex attention) and CPU (flex attention).
NATTEN_DEVICES: tuple[str, ...] = ("cuda", "cpu")

# "auto" uses dense attention up to this many tokens per grid and the gather backend above it.
# Measured on this project's 2-core AVX-512 CPU (B=2, H=16, D=64, k=7; the benchmark's attention table):
# dense is ahead at 16x16, the two tie around 20x20, gather wins from 24x24 (~1.6x) and is ~4-7x
# faster at 64x64. So MVAR's own 13x13 and 16x16 scales run dense on CPU.
DENSE_MAX_TOKENS = 20 * 20

# Query tile of the gather backend. 8x8 with k=7 gives 14x14 key regions (4x the 49 useful keys)
# and matrix products large enough to run near peak; 4x4..6x6 tiles waste less but ran slower,
# 16x16 tiles waste too much (measured 16..64 grids, fp32 and bf16).
GATHER_TILE = (8, 8)

# Upper bound on the elements one gather-backend chunk materialises (logits + key/value regions);
# larger problems are cut along batch and heads. 2**25 fp32 elements is 128 MiB.
GATHER_CHUNK_ELEMENTS = 2**25

# Largest sequence the public mask builders materialise as an (L, L) bool matrix: 2**28 bytes is
# 256 MiB. Beyond it a typo (a 10**5 grid) would exhaust memory instead of failing.
MAX_MASK_TOKENS = 2**14


# ---------------------------------------------------------------------------------------------
# Neighbourhoods (NATTEN semantics)
# ---------------------------------------------------------------------------------------------


def _check_kernel_size(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise ValueError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    return kernel_size


def _check_side(name: str, value: int) -> int:
    return integer(name, value, low=1)


def _check_mask_tokens(tokens: int) -> None:
    if tokens > MAX_MASK_TOKENS:
        raise ValueError(f"a dense mask over {tokens} tokens is too large (at most {MAX_MASK_TOKENS} tokens)")


def _check_scale_factor(scale) -> float:
    """The softmax temperature: a finite number (NaN or inf would turn every output into NaN)."""
    return real("scale", scale)


def window_starts(length: int, kernel_size: int) -> torch.LongTensor:
    """First key position of every query's window along one axis: LongTensor (length,).

    Query i sees keys [start, start + k) with start = clamp(i - k // 2, 0, length - k): windows
    keep their size and shift inward at the borders. An axis shorter than the kernel is one
    window (start 0, size ``length``).
    """
    _check_side("length", length)
    _check_kernel_size(kernel_size)
    positions = torch.arange(length)
    if length <= kernel_size:
        return torch.zeros(length, dtype=torch.long)
    return (positions - kernel_size // 2).clamp(0, length - kernel_size)


def _window_extent(length: int, kernel_size: int) -> int:
    """Keys per window along one axis."""
    return min(kernel_size, length)


@functools.lru_cache(maxsize=64)
def _neighborhood_indices_cached(height: int, width: int, kernel_size: int, device: str) -> torch.Tensor:
    row_starts = window_starts(height, kernel_size)
    col_starts = window_starts(width, kernel_size)
    rows = row_starts[:, None] + torch.arange(_window_extent(height, kernel_size))  # (height, kh)
    cols = col_starts[:, None] + torch.arange(_window_extent(width, kernel_size))  # (width, kw)
    # (height, width, kh, kw): query (r, c) -> key (rows[r, i], cols[c, j])
    flat = rows[:, None, :, None] * width + cols[None, :, None, :]
    return flat.reshape(height * width, -1).to(device)


def neighborhood_indices(height: int, width: int, kernel_size: int) -> torch.LongTensor:
    """Flat key indices of every flat query's window: LongTensor (height*width, kh*kw).

    Flat index = r * width + c; keys are listed row-major inside the window. kh = min(k, height),
    kw = min(k, width). Returns a fresh tensor (the cached one stays private).
    """
    _check_side("height", height)
    _check_side("width", width)
    _check_kernel_size(kernel_size)
    return _neighborhood_indices_cached(height, width, kernel_size, "cpu").clone()


@functools.lru_cache(maxsize=8)
def _neighborhood_mask_cached(height: int, width: int, kernel_size: int, device: str) -> torch.Tensor:
    index = _neighborhood_indices_cached(height, width, kernel_size, device)
    tokens = height * width
    mask = torch.zeros(tokens, tokens, dtype=torch.bool, device=device)
    return mask.scatter_(1, index, True)


def neighborhood_mask(height: int, width: int, kernel_size: int) -> torch.BoolTensor:
    """BoolTensor (N, N), N = height*width: True where query (row) may attend to key (column)."""
    _check_side("height", height)
    _check_side("width", width)
    _check_kernel_size(kernel_size)
    _check_mask_tokens(height * width)
    return _neighborhood_mask_cached(height, width, kernel_size, "cpu").clone()


# ---------------------------------------------------------------------------------------------
# Sequence masks over the scale pyramid
# ---------------------------------------------------------------------------------------------


def _scale_ids(patch_nums: tuple[int, ...]) -> torch.Tensor:
    schedule = ScaleSchedule(patch_nums)
    _check_mask_tokens(schedule.total_tokens)
    return schedule.scale_of_positions()


def block_causal_mask(patch_nums: tuple[int, ...]) -> torch.BoolTensor:
    """VAR: BoolTensor (L, L); a token of scale s sees every token of scales <= s."""
    scale = _scale_ids(patch_nums)
    return scale[:, None] >= scale[None, :]


def block_diagonal_mask(patch_nums: tuple[int, ...]) -> torch.BoolTensor:
    """MVAR scale-Markov: BoolTensor (L, L); a token of scale s sees only tokens of scale s."""
    scale = _scale_ids(patch_nums)
    return scale[:, None] == scale[None, :]


def mvar_mask(patch_nums: tuple[int, ...], refine_step: int, kernel_size: int) -> torch.BoolTensor:
    """MVAR: BoolTensor (L, L); block-diagonal, with each scale >= refine_step windowed.

    The diagonal block of a windowed scale is the neighbourhood mask of its pn x pn grid. This is
    the dense picture of MVAR's attention (the app draws it; tests use it as a reference).
    """
    schedule = ScaleSchedule(patch_nums)
    integer("refine_step", refine_step, low=0)
    _check_kernel_size(kernel_size)
    mask = block_diagonal_mask(schedule.patch_nums)
    for scale in range(refine_step, schedule.num_scales):
        side = schedule.patch_nums[scale]
        begin, end = schedule.begin(scale), schedule.end(scale)
        mask[begin:end, begin:end] = _neighborhood_mask_cached(side, side, kernel_size, "cpu")
    return mask


# ---------------------------------------------------------------------------------------------
# Dense attention
# ---------------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {_describe(t)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, D), got shape {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v disagree on (B, H): {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v have different token counts: {k.shape[2]} vs {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k have different head dims: {q.shape[3]} vs {k.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(scale * q k^T, masked) v: q (B, H, Nq, D), k, v (B, H, Nk, D) -> (B, H, Nq, Dv).

    ``mask`` is boolean, True = may attend, broadcastable to (B, H, Nq, Nk); None = every key.
    ``scale`` is passed through as is (the transformer uses 1.0: its q carries the temperature).
    """
    _check_qkv(q, k, v)
    scale = _check_scale_factor(scale)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = may attend), got {_describe(mask)}")
        scores = (*q.shape[:3], k.shape[2])
        try:
            broadcast = torch.broadcast_shapes(mask.shape, scores)
        except RuntimeError:
            broadcast = None
        if broadcast != torch.Size(scores):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the scores {scores}")
        if mask.device != q.device:
            mask = mask.to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _natten_na2d():
    """NATTEN's fused 2-D neighbourhood attention, or None when NATTEN can't be imported.

    NATTEN >= 0.20 exports ``natten.na2d``; 0.17-0.19 had it in ``natten.functional``. Both take
    heads-last tensors (B, X, Y, heads, D) and a ``scale`` keyword.
    """
    try:
        natten = importlib.import_module("natten")
    except Exception:  # a broken install must not break the CPU paths
        return None
    na2d = getattr(natten, "na2d", None)
    if na2d is None:
        try:
            na2d = getattr(importlib.import_module("natten.functional"), "na2d", None)
        except Exception:
            return None
    return na2d


def natten_available() -> bool:
    """True when the ``natten`` package imports and offers a fused ``na2d``."""
    return _natten_na2d() is not None


def resolve_backend(
    backend: str, device: torch.device | str, num_tokens: int, natten_installed: bool | None = None
) -> str:
    """The windowed-attention backend to run: "dense", "gather" or "natten".

    "auto" picks natten on CUDA when it is installed, else dense for grids of at most
    ``DENSE_MAX_TOKENS`` tokens and gather above (on the CPU natten runs, but slower than both).
    "natten" is allowed on CUDA and CPU tensors when NATTEN imports; elsewhere it is a ValueError.
    ``natten_installed`` overrides the import check (for tests).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {shown(backend)}; choose one of {BACKENDS}")
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a device name like 'cpu', got {shown(device)}") from None
    integer("num_tokens", num_tokens, low=1)
    installed = natten_available() if natten_installed is None else boolean("natten_installed", natten_installed)
    if backend == "natten":
        if not installed:
            raise ValueError("attention backend 'natten' needs the natten package (pip install natten==0.21.7), "
                             "which is not installed; use 'dense' or 'gather'")
        if device_type not in NATTEN_DEVICES:
            raise ValueError(f"attention backend 'natten' runs on {' or '.join(NATTEN_DEVICES)} tensors, "
                             f"but these are on {device_type}")
        return "natten"
    if backend != "auto":
        return backend
    if installed and device_type == "cuda":  # fused kernels; NATTEN's CPU path is slower than ours
        return "natten"
    return "dense" if num_tokens <= DENSE_MAX_TOKENS else "gather"


# ---------------------------------------------------------------------------------------------
# Gather backend: halo tiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AxisTiles:
    """How one grid axis is cut into query tiles and the key region each tile reads."""

    tile: int  # queries per tile along the axis
    count: int  # tiles; count * tile >= length (the last tile may run past the grid)
    region: int  # keys per region along the axis
    region_keys: torch.Tensor  # (count, region) key positions of each tile's region
    allowed: torch.Tensor  # (count, tile, region) bool: query of the tile may see key of the region


def _axis_tiles(length: int, kernel_size: int, tile: int) -> _AxisTiles:
    tile = min(tile, length)
    count = math.ceil(length / tile)
    extent = _window_extent(length, kernel_size)
    starts = window_starts(length, kernel_size)
    # queries of a tile have window starts within tile-1 of each other, so a region of
    # tile + extent - 1 keys from the first query's start (pulled inside the grid) covers them all
    region = min(length, tile + extent - 1)
    first_query = torch.arange(count) * tile
    region_start = starts[first_query].clamp(max=length - region)
    region_keys = region_start[:, None] + torch.arange(region)
    # queries past the grid's end (last tile) borrow the last real query's window: no empty rows
    queries = (first_query[:, None] + torch.arange(tile)).clamp(max=length - 1)
    query_start = starts[queries][:, :, None]  # (count, tile, 1)
    keys = region_keys[:, None, :]  # (count, 1, region)
    allowed = (keys >= query_start) & (keys < query_start + extent)
    return _AxisTiles(tile, count, region, region_keys, allowed)


@dataclass(frozen=True)
class _TilePlan:
    rows: _AxisTiles
    cols: _AxisTiles
    key_index: torch.Tensor  # (T, R*C) flat key positions of every tile's region
    bias: torch.Tensor  # (T, Q, R*C) additive mask, 0 = may attend, -inf = may not

    @property
    def num_tiles(self) -> int:
        return self.rows.count * self.cols.count

    @property
    def tile_tokens(self) -> int:
        return self.rows.tile * self.cols.tile

    @property
    def region_tokens(self) -> int:
        return self.rows.region * self.cols.region


@functools.lru_cache(maxsize=32)
def _tile_plan(
    height: int, width: int, kernel_size: int, tile: tuple[int, int], dtype: torch.dtype, device: str
) -> _TilePlan:
    rows = _axis_tiles(height, kernel_size, tile[0])
    cols = _axis_tiles(width, kernel_size, tile[1])
    # tile (i, j) = rows tile i x cols tile j, row-major; region keys row-major as well
    key_index = rows.region_keys[:, None, :, None] * width + cols.region_keys[None, :, None, :]
    key_index = key_index.reshape(rows.count * cols.count, rows.region * cols.region)
    # (Tr, Tc, th, tw, R, C): a key is allowed when both its row and its column are
    allowed = (
        rows.allowed[:, None, :, None, :, None] & cols.allowed[None, :, None, :, None, :]
    ).reshape(rows.count * cols.count, rows.tile * cols.tile, rows.region * cols.region)
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return _TilePlan(rows, cols, key_index.to(device), bias.to(device))


def _logits_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_tiles(x: torch.Tensor, height: int, width: int, plan: _TilePlan, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, T, Q, D) of ``dtype``: queries grouped by tile, grid padded to whole tiles."""
    rows, cols = plan.rows, plan.cols
    grid = x.unflatten(2, (height, width))
    pad_h, pad_w = rows.count * rows.tile - height, cols.count * cols.tile - width
    if pad_h or pad_w:
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    tiles = grid.unflatten(3, (cols.count, cols.tile)).unflatten(2, (rows.count, rows.tile))
    # (B, H, Tr, th, Tc, tw, D) -> (B, H, Tr, Tc, th, tw, D)
    tiles = tiles.permute(0, 1, 2, 4, 3, 5, 6).to(dtype)
    return tiles.reshape(*x.shape[:2], plan.num_tiles, plan.tile_tokens, x.shape[-1])


def _from_tiles(x: torch.Tensor, height: int, width: int, plan: _TilePlan) -> torch.Tensor:
    """(B, H, T, Q, D) -> (B, H, N, D), dropping the padding."""
    rows, cols = plan.rows, plan.cols
    tiles = x.unflatten(3, (rows.tile, cols.tile)).unflatten(2, (rows.count, cols.count))
    grid = tiles.permute(0, 1, 2, 4, 3, 5, 6).reshape(
        *x.shape[:2], rows.count * rows.tile, cols.count * cols.tile, x.shape[-1]
    )
    return grid[:, :, :height, :width].reshape(*x.shape[:2], height * width, x.shape[-1])


def _gather_regions(x: torch.Tensor, plan: _TilePlan, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, T, R*C, D) of ``dtype``: the key region of every tile, copied out."""
    batch, heads, tokens, dim = x.shape
    if x.dtype != dtype:  # cast and make contiguous in one pass
        x = x.to(dtype, memory_format=torch.contiguous_format)
    rows = x.reshape(batch * heads, tokens, dim)
    # index_select of contiguous rows copies whole D-vectors: ~2x faster than advanced indexing
    regions = rows.index_select(1, plan.key_index.view(-1))
    return regions.view(batch, heads, plan.num_tiles, plan.region_tokens, dim)


def _tiled_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int, scale: float, plan: _TilePlan
) -> torch.Tensor:
    """Halo-tile attention of one chunk of (batch, heads): (B, H, N, D) -> (B, H, N, Dv)."""
    # q k^T runs in fp32 even for bf16 inputs: bf16 logits would round to 2^-8 of their size,
    # which the exp turns into percent-level errors at the transformer's temperatures (up to 100)
    exact = plan.bias.dtype
    q_tiles = _to_tiles(q, height, width, plan, exact)  # (B, H, T, Q, D)
    if scale != 1.0:
        q_tiles = q_tiles * scale
    logits = torch.matmul(q_tiles, _gather_regions(k, plan, exact).transpose(-1, -2))  # (B, H, T, Q, R*C)
    probs = torch.softmax(logits.add_(plan.bias), dim=-1).to(v.dtype)
    out = torch.matmul(probs, _gather_regions(v, plan, v.dtype))  # (B, H, T, Q, Dv)
    return _from_tiles(out, height, width, plan)


def _gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    height: int,
    width: int,
    kernel_size: int,
    scale: float,
    tile: tuple[int, int] = GATHER_TILE,
) -> torch.Tensor:
    """Windowed attention by halo tiles, cut into chunks along batch and heads to bound memory."""
    if height <= kernel_size and width <= kernel_size:
        # every window is the whole grid (N <= k*k): plain attention, nothing to mask
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    plan = _tile_plan(height, width, kernel_size, tile, _logits_dtype(q.dtype), str(q.device))
    batch, heads = q.shape[:2]
    per_head = plan.num_tiles * plan.region_tokens * (plan.tile_tokens + k.shape[-1] + v.shape[-1])
    heads_per_chunk = max(1, GATHER_CHUNK_ELEMENTS // per_head)
    if heads_per_chunk >= batch * heads:
        return _tiled_chunk(q, k, v, height, width, scale, plan)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    batch_step = max(1, heads_per_chunk // heads)
    head_step = min(heads, heads_per_chunk)
    for b in range(0, batch, batch_step):
        for h in range(0, heads, head_step):
            part = (slice(b, b + batch_step), slice(h, h + head_step))
            out[part] = _tiled_chunk(q[part], k[part], v[part], height, width, scale, plan)
    return out


# ---------------------------------------------------------------------------------------------
# NATTEN backend
# ---------------------------------------------------------------------------------------------


def _natten_kernel(height: int, width: int, kernel_size: int) -> tuple[int, int] | None:
    """NATTEN's per-axis kernel for our window rule, or None where NATTEN can't express it.

    An axis shorter than the kernel is one window over the whole axis (see :func:`window_starts`);
    a kernel equal to the axis length is exactly that in NATTEN. NATTEN refuses kernels below 2.
    """
    kernel = (min(kernel_size, height), min(kernel_size, width))
    return kernel if min(kernel) >= 2 else None


def _heads_last(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, height, width, H, D): the layout NATTEN's na2d takes (as the official code)."""
    return x.transpose(1, 2).reshape(x.shape[0], height, width, x.shape[1], x.shape[3])


def _natten_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int, kernel_size: int, scale: float
) -> torch.Tensor:
    """Windowed attention by NATTEN's na2d: (B, H, N, D) -> (B, H, N, Dv)."""
    na2d = _natten_na2d()
    if na2d is None:
        raise ValueError("attention backend 'natten' needs the natten package, which is not installed")
    kernel = _natten_kernel(height, width, kernel_size)
    if kernel is None:
        # a 1-wide window on some axis: NATTEN has no kernel for it, our tiles compute the same thing
        return _gather_attention(q, k, v, height, width, kernel_size, scale)
    try:
        # NATTEN scales q k^T itself (default D^-0.5): pass ours explicitly, as the official code does
        out = na2d(_heads_last(q, height, width), _heads_last(k, height, width), _heads_last(v, height, width),
                   kernel_size=kernel, dilation=1, scale=float(scale))
    except NotImplementedError:
        # NATTEN found no kernel for these tensors; its own message only says "no suitable backend"
        grad = any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled()
        raise ValueError(
            f"attention backend 'natten' has no kernel for {q.dtype} tensors on {q.device.type} with head dim "
            f"{q.shape[-1]}{' that need gradients' if grad else ''}; on the CPU NATTEN runs forward only "
            "(no gradients), in fp32, fp16 or bf16, with head dims a power of two from 8 to 512; "
            "use backend 'dense' or 'gather'"
        ) from None
    # (B, height, width, H, Dv) -> (B, H, N, Dv)
    return out.flatten(1, 2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Windowed attention
# ---------------------------------------------------------------------------------------------


def _check_window(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int, kernel_size: int
) -> None:
    _check_qkv(q, k, v)
    _check_side("height", height)
    _check_side("width", width)
    _check_kernel_size(kernel_size)
    tokens = height * width
    if q.shape[2] != tokens or k.shape[2] != tokens:
        raise ValueError(
            f"windowed attention over a {height}x{width} grid needs {tokens} query and key tokens, "
            f"got q {q.shape[2]} and k {k.shape[2]}"
        )


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    height: int,
    width: int,
    kernel_size: int,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Neighbourhood attention over one height x width grid: q, k, v (B, H, N, D) -> (B, H, N, Dv).

    Query (r, c) attends to the kernel_size x kernel_size window of keys around it (shifted
    inward at the borders, see :func:`window_starts`). ``backend``: "dense" | "gather" |
    "natten" | "auto" (see :func:`resolve_backend`). bf16 in gives bf16 out.
    """
    _check_window(q, k, v, height, width, kernel_size)
    scale = _check_scale_factor(scale)
    chosen = resolve_backend(backend, q.device, height * width)
    if chosen == "natten":
        return _natten_attention(q, k, v, height, width, kernel_size, scale)
    if chosen == "gather":
        return _gather_attention(q, k, v, height, width, kernel_size, scale)
    mask = _neighborhood_mask_cached(height, width, kernel_size, str(q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# Attention weights for visualisation
# ---------------------------------------------------------------------------------------------


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{shown(value)} ({type(value).__name__})"


def _check_rows_and_keys(q_rows: torch.Tensor, k: torch.Tensor) -> None:
    for name, t in (("q_rows", q_rows), ("k", k)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {_describe(t)}")
    if q_rows.dim() != 4 or k.dim() != 4 or q_rows.shape[:2] != k.shape[:2] or q_rows.shape[3] != k.shape[3]:
        raise ValueError(
            f"q_rows (B, H, nq, D) and k (B, H, Nk, D) disagree: {tuple(q_rows.shape)}, {tuple(k.shape)}"
        )


def dense_attention_weights(
    q_rows: torch.Tensor, k: torch.Tensor, scale: float, mask_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention weights of some queries: q_rows (B, H, nq, D), k (B, H, Nk, D) -> (B, H, nq, Nk).

    ``mask_rows`` (nq, Nk) bool, True = may attend (None = every key). Computed and returned in
    fp32; a query with no allowed key gets a row of zeros.
    """
    _check_rows_and_keys(q_rows, k)
    scale = _check_scale_factor(scale)
    logits = torch.matmul(q_rows.float(), k.float().transpose(-1, -2)) * scale
    if mask_rows is not None:
        expected = logits.shape[-2:]
        if not isinstance(mask_rows, torch.Tensor) or mask_rows.dtype != torch.bool or mask_rows.shape != expected:
            raise ValueError(f"mask_rows must be bool (nq, Nk) = {tuple(expected)}, got {_describe(mask_rows)}")
        logits = logits.masked_fill(~mask_rows.to(logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def _check_query_index(query_index) -> torch.Tensor:
    """Flat query positions as a LongTensor (nq,): integers only (a float 2.7 is no position)."""
    try:
        index = torch.as_tensor(query_index)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"query_index must be integer positions, got {shown(query_index)}") from None
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise ValueError(f"query_index must be integer positions, got {_describe(index)}")
    return index.to(torch.long).reshape(-1)


def windowed_attention_weights(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    height: int,
    width: int,
    kernel_size: int,
    scale: float,
    query_index: torch.Tensor,
) -> torch.Tensor:
    """Windowed softmax weights of selected queries as dense rows: (B, H, nq, N), fp32.

    ``query_index`` (nq,) flat positions of the queries, ``q_rows`` (B, H, nq, D) the queries at
    those positions, ``k`` (B, H, N, D) all keys of the grid. Weights outside a query's window
    are exactly zero.
    """
    _check_side("height", height)
    _check_side("width", width)
    _check_kernel_size(kernel_size)
    scale = _check_scale_factor(scale)
    tokens = height * width
    query_index = _check_query_index(query_index)
    _check_rows_and_keys(q_rows, k)
    if k.shape[2] != tokens:
        raise ValueError(f"k has {k.shape[2]} tokens, a {height}x{width} grid has {tokens}")
    if q_rows.shape[2] != query_index.numel():
        raise ValueError(f"q_rows has {q_rows.shape[2]} queries but query_index names {query_index.numel()}")
    if query_index.numel() and (query_index.min() < 0 or query_index.max() >= tokens):
        raise ValueError(f"query_index must lie in [0, {tokens}), got {query_index.tolist()}")
    all_windows = _neighborhood_indices_cached(height, width, kernel_size, str(k.device))
    windows = all_windows[query_index.to(k.device)]  # (nq, kh*kw)
    keys = k.float()[:, :, windows]  # (B, H, nq, kh*kw, D)
    logits = torch.einsum("bhqd,bhqkd->bhqk", q_rows.float(), keys) * scale
    weights = torch.softmax(logits, dim=-1)
    rows = weights.new_zeros(*weights.shape[:3], tokens)
    return rows.scatter_(-1, windows.expand(*weights.shape), weights)
