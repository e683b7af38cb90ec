"""MVAR: Markovian Visual AutoRegressive modeling, with VAR as the baseline on the same weights.

The library, one idea per file:
  schedule.py      the scale pyramid (1x1 ... 16x16) and where each scale sits in the sequence
  config.py        dataclasses for models and attention modes, and the named presets
  ranges.py        the valid range of every generation setting (seed, cfg, top-k, top-p, images, k, refine step)
  tokenizer.py     the multi-scale residual VQ-VAE (VAR's tokenizer), and decoded maps as images
  attention.py     attention masks and windowed-attention backends
  transformer.py   the VAR/MVAR transformer (one parameterisation, two attention modes)
  sampling.py      generation, scale by scale
  previews.py      each scale's preview: the full decode of its map, decoded lazily or within a time budget
  editing.py       zero-shot editing of real images (in-painting, out-painting, class edits, variations)
  training.py      the one training step and the optimiser groups, shared by the trainer and the benchmark
  checkpoints.py   our safetensors format, official .pth files, conversion, hub download (and its command)
  inert_pickle.py  reading torch.save files without running anything on a file's behalf
  costs.py         the analytic cost model (FLOPs, KV cache, memory)
  memory.py        measured peak memory of a generation or a training step, in a fresh process
  devices.py       --device values, the precision names (DTYPES), autocast and synchronize
  checks.py        the argument checks the library shares
  files.py         where the shipped models are, atomic file writes, image grids

Commands, ``python -m mvar.NAME`` (each file is only its command):
  sample.py        class-conditional images as a PNG grid
  edit.py          zero-shot editing of an image file
  sample_fid.py    FID-ready samples (PNGs and one .npz), resumable, sharded under torchrun
  benchmark.py     VAR against MVAR: latency, the page's previews, memory, FLOPs, training; the attention table
  gpu_check.py     a prepared check for a CUDA machine
  memory_job.py    one memory measurement (the subprocess memory.measure starts)
"""

from .config import (
    MVAR_MODE,
    PRESETS,
    VAR_MODE,
    AttentionMode,
    TokenizerConfig,
    TransformerConfig,
    get_preset,
)
from .schedule import ScaleSchedule

__all__ = [
    "MVAR_MODE", "PRESETS", "VAR_MODE", "AttentionMode", "ScaleSchedule", "TokenizerConfig",
    "TransformerConfig", "get_preset",
]
