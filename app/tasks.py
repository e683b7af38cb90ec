"""The page's work on the models, as functions of plain values, run through ``zerogpu.GpuTasks``.

On ZeroGPU each call runs in a worker process that holds a GPU: it takes plain values (widget values, a
record's settings) and returns data (frames, previews, attention), and the server stores what it returns.
Elsewhere the functions run directly on the registry's device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mvar.devices import autocast_precisions

from . import editing, handlers
from .registry import ModelRegistry
from .zerogpu import ANALYSIS_SECONDS, GENERATE_SECONDS, GpuTasks


@dataclass(frozen=True)
class ModelTasks:
    """``frames(key, class, seed, cfg, top_k, top_p, smooth, images, precision, kernel, refine_step)`` streams
    ``handlers.Frame``s; ``sample(key, record, sample)`` gives one sample's previews and attention;
    ``ablation(key, settings)`` the three variants' previews; ``statistics(key, samples, progress=None)``
    gives (AttentionStats, the MVAR kernel size); ``edit(key, request)`` streams ``editing.EditFrame``s of an
    ``editing.EditRequest``; ``pyramid(key, source)`` gives an ``editing.PyramidView`` of a source image."""

    frames: Callable
    sample: Callable
    ablation: Callable
    statistics: Callable
    precisions: tuple[str, ...]
    edit: Callable
    pyramid: Callable


def model_tasks(registry: ModelRegistry, gpu: GpuTasks, max_images: int) -> ModelTasks:
    offered = gpu.precisions() or autocast_precisions(registry.device)

    @gpu.task(GENERATE_SECONDS)
    def frames(key, class_name, seed, cfg, top_k, top_p, smooth, num_images, precision, kernel=None,
               refine_step=None, device=None):
        yield from handlers.generate_frames(registry, key, class_name, seed, cfg, top_k, top_p, smooth, num_images,
                                            precision, kernel, refine_step, max_images=max_images, device=device,
                                            precisions=offered)

    @gpu.task(GENERATE_SECONDS)
    def sample(key, record, index, device=None):
        models = handlers.load_models(registry, key, device=device)
        return (handlers.decode_sample_previews(models, record, index),
                handlers.capture_sample_attention(models, record, index))

    @gpu.task(GENERATE_SECONDS)
    def ablation(key, settings, device=None):
        models = handlers.load_models(registry, key, device=device)
        return handlers.ablation(models, settings)

    @gpu.task(ANALYSIS_SECONDS)
    def statistics(key, samples, progress=None, device=None):
        models = handlers.load_models(registry, key, device=device)
        return handlers.attention_statistics(models, samples, progress=progress), models.mvar_mode.kernel_size

    @gpu.task(GENERATE_SECONDS)
    def edit(key, request, device=None):
        models = handlers.load_models(registry, key, device=device)
        yield from editing.edit_frames(models, key, request, precisions=offered)

    @gpu.task(GENERATE_SECONDS)
    def pyramid(key, source, device=None):
        models = handlers.load_models(registry, key, device=device)
        return editing.pyramid_view(models, source)

    return ModelTasks(frames, sample, ablation, statistics, offered, edit, pyramid)
