"""Analytic cost model of generation: FLOPs, KV-cache bytes, parameters and activation memory.

Counts follow ``torch.utils.flop_counter``'s convention (a multiply-add is 2 FLOPs) and cover
the transformer's matmuls: the qkv and output projections, QK^T and AV, the MLP, the AdaLN
linears, the word embedding and the head. The tokenizer's decoder is not included.

Attention keys per query at scale s:
  VAR  - every token of scales <= s (the KV cache plus the scale itself);
  MVAR - the scale's own tokens, or a k x k window on scales >= refine_step
         (``windowed_as_dense=True`` counts what a dense masked kernel computes instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .checks import boolean, integer
from .config import AttentionMode, TransformerConfig
from .devices import DTYPES


def dtype_bytes(dtype) -> int:
    """Bytes per element of a precision: its name (fp32, bf16, fp16), its torch dtype, or that dtype's name
    (float32, bfloat16, float16)."""
    named = {**DTYPES, **{str(d).removeprefix("torch."): d for d in DTYPES.values()}}
    if isinstance(dtype, str) and dtype in named:
        return named[dtype].itemsize
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype.itemsize
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(named)}")


@dataclass(frozen=True)
class ScaleCost:
    scale: int
    tokens: int  # queries of this scale (per sample)
    keys_per_query: int
    projection_flops: int  # qkv + output projection, all layers
    attention_flops: int  # QK^T + AV, all layers
    mlp_flops: int
    other_flops: int  # AdaLN linears, word embedding, head
    kv_cache_bytes: int  # cache occupied after this scale (VAR), 0 for MVAR
    activation_bytes: int  # largest set of live activations while this scale runs

    @property
    def flops(self) -> int:
        return self.projection_flops + self.attention_flops + self.mlp_flops + self.other_flops


@dataclass(frozen=True)
class GenerationCost:
    mode: str
    batch: int  # samples asked for
    rows: int  # rows through the transformer (2 x batch with CFG)
    dtype_bytes: int
    parameters: int
    parameter_bytes: int
    kv_cache_bytes: int  # allocated for the whole generation (VAR), 0 for MVAR
    scales: tuple[ScaleCost, ...]

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.scales)

    @property
    def attention_flops(self) -> int:
        return sum(s.attention_flops for s in self.scales)

    @property
    def peak_activation_bytes(self) -> int:
        return max(s.activation_bytes for s in self.scales)

    @property
    def peak_memory_estimate(self) -> int:
        """Weights + KV cache + the largest activation set: an estimate, not a measurement."""
        return self.parameter_bytes + self.kv_cache_bytes + self.peak_activation_bytes


def _check_model(cfg, mode=None) -> None:
    if not isinstance(cfg, TransformerConfig):
        raise ValueError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")
    if mode is not None and not isinstance(mode, AttentionMode):
        raise ValueError(f"mode must be an AttentionMode, got {type(mode).__name__}")


def parameter_count(cfg: TransformerConfig) -> int:
    """Exact number of parameters of :class:`~mvar.transformer.ScaleTransformer`."""
    _check_model(cfg)
    c, m, v = cfg.width, cfg.mlp_hidden, cfg.vocab_size
    schedule = cfg.schedule
    embeddings = (cfg.latent_channels * c + c) + (cfg.num_classes + 1) * c \
        + schedule.tokens(0) * c + schedule.total_tokens * c + schedule.num_scales * c
    per_block = (3 * c * c + 2 * c + cfg.num_heads) + (c * c + c) + (c * m + m) + (m * c + c) + (c * 6 * c + 6 * c)
    head = (c * 2 * c + 2 * c) + (c * v + v)
    return embeddings + cfg.depth * per_block + head


def keys_per_query(cfg: TransformerConfig, mode: AttentionMode, scale: int, windowed_as_dense: bool = False) -> int:
    _check_model(cfg, mode)
    schedule = cfg.schedule
    side = cfg.patch_nums[schedule.check_scale(scale)]  # checked: a negative index would wrap silently
    if not mode.markov:
        return schedule.end(scale)
    if mode.is_windowed(scale) and not windowed_as_dense:
        return min(mode.kernel_size, side) ** 2
    return side * side


def generation_cost(
    cfg: TransformerConfig,
    mode: AttentionMode,
    batch: int = 1,
    cfg_guidance: bool = True,
    dtype="float32",
    windowed_as_dense: bool = False,
) -> GenerationCost:
    """Per-scale and total cost of generating ``batch`` samples (CFG doubles the rows)."""
    _check_model(cfg, mode)
    batch = integer("batch", batch, low=1)
    boolean("cfg_guidance", cfg_guidance)
    boolean("windowed_as_dense", windowed_as_dense)
    nbytes = dtype_bytes(dtype)
    rows = batch * (2 if cfg_guidance else 1)
    c, m, v, depth = cfg.width, cfg.mlp_hidden, cfg.vocab_size, cfg.depth
    schedule = cfg.schedule
    kv_total = 0 if mode.markov else 2 * depth * rows * schedule.total_tokens * c * nbytes
    scales = []
    for s in range(schedule.num_scales):
        n = schedule.tokens(s)
        keys = keys_per_query(cfg, mode, s, windowed_as_dense)
        projection = depth * 2 * rows * n * (3 * c * c + c * c)
        attention = depth * 2 * 2 * rows * n * keys * c  # QK^T and AV, H heads of C/H channels
        mlp = depth * 2 * rows * n * 2 * c * m
        # AdaLN modulations depend on the labels alone: computed once, before scale 0
        adaln = depth * 2 * rows * c * 6 * c + 2 * rows * c * 2 * c if s == 0 else 0
        embed = 2 * rows * n * cfg.latent_channels * c if s > 0 else 0
        head = 2 * rows * n * c * v
        occupied = 0 if mode.markov else 2 * depth * rows * schedule.end(s) * c * nbytes
        scores = rows * cfg.num_heads * n * keys * nbytes  # if a kernel materialises them
        live = rows * n * (2 * c + 3 * c + m) * nbytes + scores + 3 * rows * n * v * 4  # logits/probs/cdf fp32
        scales.append(ScaleCost(s, n, keys, projection, attention, mlp, adaln + embed + head, occupied, live))
    params = parameter_count(cfg)
    return GenerationCost(mode.name, batch, rows, nbytes, params, params * nbytes, kv_total, tuple(scales))


def teacher_forced_flops(cfg: TransformerConfig, mode: AttentionMode, batch: int, first_scale: int = 0,
                         last_scale: int | None = None, windowed_as_dense: bool = False) -> int:
    """FLOPs of one teacher-forced forward (training) over scales first..last, matmuls only.

    VAR's forward always runs from scale 0 (earlier scales are context); each scale's queries
    attend to the prefix of scales <= s. MVAR's forward runs its groups separately: the early
    scales jointly (each attending only to itself), each windowed scale alone.
    """
    _check_model(cfg, mode)
    batch = integer("batch", batch, low=1)
    schedule = cfg.schedule
    first_scale, last_scale = schedule.check_range(first_scale, last_scale)
    boolean("windowed_as_dense", windowed_as_dense)
    c, m, v, depth = cfg.width, cfg.mlp_hidden, cfg.vocab_size, cfg.depth

    def group_flops(scales: list[int], pairs: int, logit_tokens: int) -> int:
        """``pairs``: query-key pairs the attention computes, summed over the group's queries."""
        n = sum(schedule.tokens(s) for s in scales)
        dense = depth * 2 * batch * n * (4 * c * c + 2 * c * m) + depth * 2 * 2 * batch * pairs * c
        embed = sum(2 * batch * schedule.tokens(s) * cfg.latent_channels * c for s in scales if s > 0)
        return dense + embed + 2 * batch * logit_tokens * c * v

    adaln = depth * 2 * batch * c * 6 * c + 2 * batch * c * 2 * c  # once per forward, shared by its groups
    if not mode.markov:
        # block-causal, run as one prefix attention per scale: scale s meets end(s) keys
        scales = list(range(0, last_scale + 1))
        pairs = sum(schedule.tokens(s) * schedule.end(s) for s in scales)
        return adaln + group_flops(scales, pairs, schedule.end(last_scale) - schedule.begin(first_scale))
    total = adaln
    early = [s for s in range(first_scale, last_scale + 1) if not mode.is_windowed(s)]
    if early:
        pairs = sum(schedule.tokens(s) ** 2 for s in early)  # block-diagonal, one call per scale
        total += group_flops(early, pairs, sum(schedule.tokens(s) for s in early))
    for s in range(first_scale, last_scale + 1):
        if mode.is_windowed(s):
            pairs = schedule.tokens(s) * keys_per_query(cfg, mode, s, windowed_as_dense)
            total += group_flops([s], pairs, schedule.tokens(s))
    return total


# ---------------------------------------------------------------------------------------------
# Counting FLOPs on a real forward
# ---------------------------------------------------------------------------------------------


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """``torch.utils.flop_counter`` that also counts CPU attention.

    PyTorch's counter knows the CUDA attention kernels but not the CPU one
    (``_scaled_dot_product_flash_attention_for_cpu``), so attention would count as zero on CPU;
    we give it the same formula PyTorch uses for the others.
    """
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)
