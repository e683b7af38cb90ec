"""The page's work on the models, as functions of plain values, run through ``zerogpu.GpuTasks``.

On ZeroGPU each call runs in a worker process that holds a GPU: it takes plain values (a model key, the
checked ``Settings`` or ``EditRequest``, a kept record) and returns data (frames, previews, attention), and
the server stores what it returns. Elsewhere the functions run directly on the registry's device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mvar.devices import autocast_precisions

from .registry import ModelRegistry
from .work import ablation as ablation_work
from .work import editing, generation
from .work import statistics as statistics_work
from .work.models import load_models
from .zerogpu import ANALYSIS_SECONDS, GENERATE_SECONDS, GpuTasks


@dataclass(frozen=True)
class ModelTasks:
    """``frames(key, settings)`` streams ``work.generation.Frame``s; ``sample(key, record, index)`` gives one
    sample's (0-based) previews and attention; ``ablation(key, settings)`` the three variants' previews;
    ``statistics(key, samples, progress=None)`` gives (AttentionStats, the MVAR kernel size); ``edit(key,
    request)`` streams ``work.editing.EditFrame``s; ``pyramid(key, source)`` gives a source image's
    ``work.editing.PyramidView``; ``precisions``: the precisions offered here."""

    frames: Callable
    sample: Callable
    ablation: Callable
    statistics: Callable
    precisions: tuple[str, ...]
    edit: Callable
    pyramid: Callable


def model_tasks(registry: ModelRegistry, gpu: GpuTasks) -> ModelTasks:
    offered = gpu.precisions() or autocast_precisions(registry.device)

    @gpu.task(GENERATE_SECONDS)
    def frames(key, settings, device=None):
        yield from generation.generate_frames(load_models(registry, key, device=device), key, settings)

    @gpu.task(GENERATE_SECONDS)
    def sample(key, record, index, device=None):
        models = load_models(registry, key, device=device)
        return generation.sample_previews(models, record, index), generation.sample_attention(models, record, index)

    @gpu.task(GENERATE_SECONDS)
    def ablation(key, settings, device=None):
        return ablation_work.ablation(load_models(registry, key, device=device), settings)

    @gpu.task(ANALYSIS_SECONDS)
    def statistics(key, samples, progress=None, device=None):
        models = load_models(registry, key, device=device)
        return statistics_work.attention_statistics(models, samples, progress=progress), models.mvar_mode.kernel_size

    @gpu.task(GENERATE_SECONDS)
    def edit(key, request, device=None):
        yield from editing.edit_frames(load_models(registry, key, device=device), key, request, precisions=offered)

    @gpu.task(GENERATE_SECONDS)
    def pyramid(key, source, device=None):
        return editing.pyramid_view(load_models(registry, key, device=device), source)

    return ModelTasks(frames, sample, ablation, statistics, offered, edit, pyramid)
