"""The paper's ablation on the loaded weights: VAR, + scale-Markov (no windows) and full MVAR, one sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mvar.config import VAR_MODE, AttentionMode
from mvar.costs import generation_cost
from mvar.devices import dtype_of
from mvar.sampling import generate_steps
from mvar.tokenizer import to_uint8

from ..registry import LoadedModels
from .settings import Settings, UserError

VARIANTS = ("VAR", "+ scale-Markov", "full MVAR")


@dataclass
class Ablation:
    """Sample 1 of a request under the three attentions: previews per scale, time and the cost model."""

    settings: Settings
    previews: dict[str, list[np.ndarray]]  # "VAR", "+ scale-Markov", "full MVAR" -> per scale
    seconds: dict[str, float]  # the generation alone
    costs: dict[str, dict[str, float]]  # -> GFLOPs, attention GFLOPs, KV cache MiB, peak MiB (analytic)
    patch_nums: tuple[int, ...]


def ablation_modes(settings: Settings, num_scales: int) -> dict[str, AttentionMode]:
    full = settings.mvar_mode
    return {"VAR": VAR_MODE,
            "+ scale-Markov": AttentionMode.mvar(refine_step=num_scales, kernel_size=full.kernel_size),
            "full MVAR": full}


def ablation(models: LoadedModels, settings: Settings) -> Ablation:
    """Run sample 1 of ``settings`` (its class, seed, sampling, precision) in each of the three modes."""
    if not isinstance(settings, Settings):
        raise UserError("generate first: the ablation uses the class, seed and settings of the page")
    cfg = models.transformer.cfg
    dtype = dtype_of(settings.precision)
    tokenizer, transformer, _ = models.in_precision(dtype)
    previews, seconds, costs = {}, {}, {}
    for name, mode in ablation_modes(settings, len(cfg.patch_nums)).items():
        steps = list(generate_steps(transformer, tokenizer, [settings.label], settings.seed, settings.sampling, mode,
                                    previews=True, dtype=dtype))
        previews[name] = [to_uint8(step.preview)[0] for step in steps]
        seconds[name] = sum(step.generation_seconds for step in steps)
        cost = generation_cost(cfg, mode, 1, settings.sampling.cfg > 0, settings.precision)
        costs[name] = {"GFLOPs": cost.flops / 1e9, "attention GFLOPs": cost.attention_flops / 1e9,
                       "KV cache MiB": cost.kv_cache_bytes / 2**20,
                       "peak MiB": (cost.kv_cache_bytes + cost.peak_activation_bytes) / 2**20}
    return Ablation(settings, previews, seconds, costs, cfg.patch_nums)
