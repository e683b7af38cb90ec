"""Attention statistics: pure functions of captured attention weights, and the Analysis tab's run.

A captured row is a query's softmax weights over the keys it could see: in VAR mode every
token of the scales so far (flat positions 0..end(s)), in MVAR mode its own scale's tokens.
:func:`attention_statistics` runs the loaded model in VAR mode over a few samples and gathers the
paper's motivation figure (panels a and b) from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mvar.attention import window_starts
from mvar.config import VAR_MODE
from mvar.sampling import SamplingConfig, generate_steps
from mvar.schedule import ScaleSchedule

from ..registry import LoadedModels
from .models import capture_layers_for
from .settings import SEED, UserError, Whole

WINDOW_SIZES = (1, 3, 5, 7, 9, 11, 13, 15)
MAX_ANALYSIS_SAMPLES = 16
SAMPLES = Whole("Samples", 1, MAX_ANALYSIS_SAMPLES)


def mass_per_key_scale(rows: torch.Tensor, schedule: ScaleSchedule, keys_begin: int = 0) -> torch.Tensor:
    """(..., Nk) weights over flat keys starting at ``keys_begin`` -> (..., S) mass on each scale."""
    total = rows.shape[-1]
    out = rows.new_zeros(*rows.shape[:-1], schedule.num_scales)
    for scale in range(schedule.num_scales):
        begin = max(schedule.begin(scale) - keys_begin, 0)
        end = min(schedule.end(scale) - keys_begin, total)
        if end > begin:
            out[..., scale] = rows[..., begin:end].sum(-1)
    return out


def scale_grid(rows: torch.Tensor, schedule: ScaleSchedule, scale: int, keys_begin: int = 0) -> torch.Tensor:
    """(..., Nk) -> (..., p, p): the weights on one key scale's grid."""
    side = schedule.patch_nums[scale]
    begin = schedule.begin(scale) - keys_begin
    return rows[..., begin : begin + side * side].reshape(*rows.shape[:-1], side, side)


def window_box(side: int, row: int, col: int, kernel_size: int) -> tuple[int, int, int, int]:
    """(row0, col0, rows, cols) of the k x k window of query (row, col), shifted inward at borders."""
    starts = window_starts(side, kernel_size)
    extent = min(kernel_size, side)
    return int(starts[row]), int(starts[col]), extent, extent


def window_mass(grid: torch.Tensor, row: int, col: int, kernel_size: int) -> torch.Tensor:
    """Mass of (..., p, p) same-scale weights inside the query's k x k window, as a fraction of the grid's mass."""
    side = grid.shape[-1]
    r0, c0, rows, cols = window_box(side, row, col, kernel_size)
    inside = grid[..., r0 : r0 + rows, c0 : c0 + cols].sum((-1, -2))
    total = grid.sum((-1, -2)).clamp_min(1e-12)
    return inside / total


@dataclass
class AttentionStats:
    """Running means over queries of VAR-mode attention (the paper's motivation figure a and b)."""

    num_scales: int
    window_sizes: tuple[int, ...] = WINDOW_SIZES
    distance_sum: np.ndarray = field(init=False)
    distance_count: np.ndarray = field(init=False)
    window_sum: np.ndarray = field(init=False)
    window_count: int = 0

    def __post_init__(self) -> None:
        self.distance_sum = np.zeros(self.num_scales)
        self.distance_count = np.zeros(self.num_scales)
        self.window_sum = np.zeros(len(self.window_sizes))

    def add_scale(self, weights: torch.Tensor, schedule: ScaleSchedule, scale: int, min_side: int = 8) -> None:
        """weights (..., nq, Nk): every query of ``scale`` (all of them, row-major), VAR keys from 0."""
        mass = mass_per_key_scale(weights.float(), schedule).reshape(-1, schedule.num_scales)
        for key_scale in range(scale + 1):
            self.distance_sum[scale - key_scale] += float(mass[:, key_scale].sum())
        # every query counts at every distance (0 where it has no scale that far back): the means sum to 1
        self.distance_count += mass.shape[0]
        side = schedule.patch_nums[scale]
        if side < min_side:
            return
        grid = scale_grid(weights.float(), schedule, scale)  # (..., nq, p, p)
        grid = grid.reshape(-1, side * side, side, side)
        for query in range(side * side):
            row, col = divmod(query, side)
            for i, k in enumerate(self.window_sizes):
                self.window_sum[i] += float(window_mass(grid[:, query], row, col, k).sum())
        self.window_count += grid.shape[0] * side * side

    @property
    def mass_by_distance(self) -> np.ndarray:
        """Mean mass a query puts on the scale ``d`` steps below its own, d = 0..S-1 (sums to 1)."""
        return self.distance_sum / np.maximum(self.distance_count, 1)

    @property
    def mass_in_window(self) -> np.ndarray:
        return self.window_sum / max(self.window_count, 1)


def attention_statistics(models: LoadedModels, samples: int = 4, seed: int = 0, progress=None) -> AttentionStats:
    """Run the loaded model in VAR mode on a few samples and gather the paper's panel a / b statistics.

    Cached per loaded model, sample count and seed; ``progress(fraction, desc=...)`` follows the run.
    """
    samples, seed = SAMPLES.parse(samples), SEED.parse(seed)
    if progress is not None and not callable(progress):
        raise UserError(f"progress must be callable or None, got {type(progress).__name__}")
    key = ("attention-stats", samples, seed)
    if key not in models.cache:
        models.cache[key] = _attention_statistics(models, samples, seed, progress)
    return models.cache[key]


def _attention_statistics(models: LoadedModels, samples: int, seed: int, progress) -> AttentionStats:
    cfg = models.var_transformer.cfg
    schedule = cfg.schedule
    stats = AttentionStats(schedule.num_scales)
    layers = capture_layers_for(models)
    sampling = SamplingConfig(**{k: models.sampling[k] for k in ("cfg", "top_k", "top_p")})
    queries = dict.fromkeys(range(schedule.num_scales))  # every query of every scale
    total, done = samples * schedule.num_scales, 0
    for i in range(samples):
        steps = generate_steps(models.var_transformer, models.tokenizer, [i % cfg.num_classes], seed + i, sampling,
                               VAR_MODE, capture_layers=layers, capture_queries=queries)
        for step in steps:
            for weights in step.attention.values():
                stats.add_scale(weights[0].cpu(), schedule, step.scale)  # (H, nq, Nk); many small reads: on the CPU
            done += 1
            if progress is not None:
                progress(done / total, desc=f"sample {i + 1}/{samples}, scale {step.scale + 1}")
    return stats
