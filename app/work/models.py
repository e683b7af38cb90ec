"""The loaded models as the page's work uses them: loading an entry (a UserError for a bad key or file),
moving it onto a ZeroGPU call's device, warming it up, and which layers' attention a generation captures."""

from __future__ import annotations

import threading

import torch

from mvar.config import VAR_MODE
from mvar.devices import dtype_of
from mvar.sampling import SamplingConfig, generate_steps

from ..registry import LoadedModels, ModelRegistry
from .settings import UserError, shown

CAPTURE_BUDGET_BYTES = 64 * 2**20  # per model and generation; beyond it only some layers are captured


def load_models(registry: ModelRegistry, model_key, progress=None, device=None) -> LoadedModels:
    """The loaded models of an entry; an unknown key or a broken file is a UserError.

    ``progress(fraction, desc=...)`` (e.g. ``gr.Progress``) follows a hub download and the loading.
    ``device``: None = where the registry loads them; else they are moved there (see :func:`place_models`).
    """
    if not isinstance(model_key, str):
        raise UserError(f"Model must be one from the list, got {shown(model_key, 'nothing')}")
    try:
        models = registry.load(model_key, progress=progress)
    except ValueError as err:
        raise UserError(str(err)) from None
    if device is not None:
        place_models(models, device)
    return models


_PLACING = threading.Lock()


def place_models(models: LoadedModels, device) -> None:
    """Move a loaded entry's models, and the low-precision copies made of them, onto ``device`` in place.

    Under ZeroGPU this runs in the call's worker process, so the server's copies stay on the CPU;
    elsewhere the move happens once (later calls find the models there).
    """
    device = torch.device(device)
    with _PLACING:  # two first calls must not copy (in_precision) or run a half-moved model
        modules = [models.tokenizer, models.transformer, models.var_transformer]
        for key, value in list(models.cache.items()):  # other handlers may add entries meanwhile
            if isinstance(key, tuple) and key[:1] == ("weights",):
                modules.extend(value)  # in_precision's (tokenizer, transformer, var_transformer) copies
        for module in modules:
            module.to(device)


def capture_layers_for(models: LoadedModels) -> tuple[int, ...]:
    """All layers when their VAR attention rows of one sample fit the budget, else evenly spaced ones."""
    cfg = models.transformer.cfg
    schedule = cfg.schedule
    per_layer = sum(schedule.tokens(s) * schedule.end(s) for s in range(schedule.num_scales)) * cfg.num_heads * 2
    count = max(1, min(cfg.depth, CAPTURE_BUDGET_BYTES // per_layer))
    return tuple(sorted({round(i * (cfg.depth - 1) / max(1, count - 1)) for i in range(count)}))


def warm_up(models: LoadedModels, precision: str = "fp32") -> None:
    """One small generation in each mode, so that the first user's timings are not the allocator's and
    kernels' first-call costs (those made MVAR look slower than VAR on the first generation)."""
    if ("warm", precision) in models.cache:
        return
    dtype = dtype_of(precision)
    tokenizer, mvar_transformer, var_transformer = models.in_precision(dtype)
    sampling = SamplingConfig(cfg=1.5, top_k=0, top_p=1.0)
    models.cache[("warm", precision)] = True
    for transformer, mode in ((mvar_transformer, models.mvar_mode), (var_transformer, VAR_MODE)):
        for _ in generate_steps(transformer, tokenizer, [0], 0, sampling, mode, previews=True, preview_samples=1,
                                capture_layers=capture_layers_for(models)[:1], capture_queries={0: None},
                                capture_samples=[0], dtype=dtype):
            pass
