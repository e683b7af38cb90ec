"""MVAR: Markovian Visual AutoRegressive modeling, with VAR as the baseline on the same weights.

Files, one idea each:
  schedule.py     the scale pyramid (1x1 ... 16x16) and where each scale sits in the sequence
  config.py       dataclasses for models and attention modes, and the named presets
  tokenizer.py    the multi-scale residual VQ-VAE (VAR's tokenizer)
  attention.py    attention masks and windowed-attention backends
  transformer.py  the VAR/MVAR transformer (one parameterisation, two attention modes)
  sampling.py     generation, scale by scale
  checkpoints.py  our safetensors format, official .pth files, conversion, hub download
  costs.py        the analytic cost model (FLOPs, KV cache, memory)
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
