"""The VAR/MVAR transformer: one parameterisation, two ways to attend.

VAR and MVAR share every parameter (MVAR checkpoints are VAR state dicts), so one module set
serves both; an :class:`~mvar.config.AttentionMode` says how tokens may attend:

* VAR: block-causal, a token of scale s sees every token of scales <= s. Inference keeps a
  KV cache of the earlier scales in every layer.
* MVAR: a scale sees only itself (the accumulated map it receives already carries all earlier
  scales), so inference needs no KV cache; on scales >= refine_step each query sees only a
  k x k window of its own grid.

Parameter names follow VAR's official checkpoints (``blocks.3.attn.mat_qkv.weight`` ...), so
they load strictly through ``checkpoints.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as attn_ops
from .checks import integer, shown
from .config import VAR_MODE, AttentionMode, TransformerConfig

# ---------------------------------------------------------------------------------------------
# How one forward pass attends, the KV cache, and attention capture for visualisation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionPlan:
    """How the tokens of one forward pass attend to each other (the same in every layer).

    ``mask`` (Nq, Nk) bool, True = may attend; None = every key. ``segments`` instead cut the
    queries into consecutive runs, each attending to one contiguous run of keys,
    ((q_begin, q_end, k_begin, k_end), ...): block-causal and block-diagonal patterns run as a few
    unmasked attention calls, which skips the masked-out work. ``window`` (height, width, kernel)
    turns on windowed attention over a single height x width grid.
    """

    mask: torch.Tensor | None = None
    window: tuple[int, int, int] | None = None
    backend: str = "auto"
    segments: tuple[tuple[int, int, int, int], ...] | None = None

    def mask_rows(self, rows: torch.Tensor, num_keys: int) -> torch.Tensor | None:
        """(nq, Nk) bool mask of the given query rows (None = every key)."""
        if self.segments is None:
            return None if self.mask is None else self.mask[rows]
        allowed = torch.zeros(len(rows), num_keys, dtype=torch.bool, device=rows.device)
        for q_begin, q_end, k_begin, k_end in self.segments:
            inside = (rows >= q_begin) & (rows < q_end)
            allowed[inside, k_begin:k_end] = True
        return allowed


class KVCache:
    """VAR's per-layer key/value cache, preallocated for the whole sequence.

    Shapes: keys[layer] and values[layer] are (B, H, L, D). Preallocating avoids a chain of
    torch.cat copies (each scale would otherwise copy the whole cache once per layer).
    """

    def __init__(self, depth: int, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, heads, length, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.filled = 0  # positions [0, filled) hold earlier scales
        self.pending = 0  # tokens written by the current forward; committed by advance()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this scale's (B, H, n, D) keys/values; return all keys/values so far (B, H, filled+n, D)."""
        n = k.shape[2]
        end = self.filled + n
        if end > self.keys[layer].shape[2]:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.keys[layer].shape[2]}")
        self.keys[layer][:, :, self.filled : end] = k
        self.values[layer][:, :, self.filled : end] = v
        self.pending = n
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self) -> None:
        self.filled += self.pending
        self.pending = 0

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class AttentionCapture:
    """Ask the blocks to record the softmax weights of some query tokens.

    ``queries``: positions within the current forward's sequence (None = all). After the
    forward, ``weights[layer]`` is (B, H, nq, Nk) over every key that forward could see
    (for VAR with a cache: all tokens of the scales so far; otherwise the sequence itself).
    ``samples``: batch rows to record (None = all; B is then their count), so a viewer showing one
    sample of a CFG batch computes the weights of that row alone. Only the requested rows are ever
    materialised; ``seconds`` adds up the time spent computing them (the capture's own cost).
    """

    layers: tuple[int, ...]
    queries: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q, k and a learned per-head temperature."""

    def __init__(self, cfg: TransformerConfig, layer_index: int):
        super().__init__()
        width, heads = cfg.width, cfg.num_heads
        self.layer_index = layer_index
        self.num_heads, self.head_dim = heads, cfg.head_dim
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        # keys carry no bias; a constant zero block lets one fused linear produce q, k and v
        self.register_buffer("zero_k_bias", torch.zeros(width), persistent=False)
        # temperature exp(min(s_h, ln 100)) per head, initialised to 4
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.max_log_temperature = math.log(100.0)
        self.proj = nn.Linear(width, width)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, C) -> q, k, v each (B, H, N, D); q already carries the temperature."""
        batch, length, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        temperature = self.scale_mul_1H11.clamp_max(self.max_log_temperature).exp()
        q = F.normalize(q, dim=-1) * temperature.to(q.dtype)
        k = F.normalize(k, dim=-1)
        return q, k.to(q.dtype), v.to(q.dtype)

    def forward(
        self,
        x: torch.Tensor,
        plan: AttentionPlan,
        cache: KVCache | None = None,
        capture: AttentionCapture | None = None,
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.project_qkv(x)
        if cache is not None:
            k, v = cache.write(self.layer_index, k, v)
        if plan.window is not None:
            height, grid_width, kernel = plan.window
            out = attn_ops.windowed_attention(q, k, v, height, grid_width, kernel, scale=1.0, backend=plan.backend)
        elif plan.segments is not None:
            out = torch.cat([attn_ops.dense_attention(q[:, :, qb:qe], k[:, :, kb:ke], v[:, :, kb:ke], scale=1.0)
                             for qb, qe, kb, ke in plan.segments], dim=2)
        else:
            out = attn_ops.dense_attention(q, k, v, scale=1.0, mask=plan.mask)
        if capture is not None and self.layer_index in capture.layers:
            started = time.perf_counter()
            rows_q, rows_k = q, k
            if capture.samples is not None:
                rows_q, rows_k = q[capture.samples.to(q.device)], k[capture.samples.to(k.device)]
            capture.weights[self.layer_index] = self.attention_rows(rows_q, rows_k, plan, cache, capture.queries)
            capture.seconds += time.perf_counter() - started
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))

    @torch.no_grad()
    def attention_rows(self, q, k, plan: AttentionPlan, cache: KVCache | None, queries) -> torch.Tensor:
        """Softmax weights (B, H, nq, Nk) of the chosen queries, computed in fp32."""
        rows = torch.arange(q.shape[2], device=q.device) if queries is None else queries.to(q.device)
        q_rows = q[:, :, rows].float()
        if plan.window is not None:
            height, grid_width, kernel = plan.window
            return attn_ops.windowed_attention_weights(q_rows, k.float(), height, grid_width, kernel, 1.0, rows)
        return attn_ops.dense_attention_weights(q_rows, k.float(), 1.0, plan.mask_rows(rows, k.shape[2]))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a sample's whole residual branch with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


@dataclass(frozen=True)
class Condition:
    """A batch's class embedding and the AdaLN modulations every block derives from it.

    They depend on the labels alone, so generation computes them once and reuses them at every
    scale (the AdaLN linears hold a third of the weights; rereading them per scale costs time).
    """

    embedding: torch.Tensor  # (B, C)
    blocks: tuple[torch.Tensor, ...]  # per block (B, 1, 6, C)
    head: torch.Tensor  # (B, 1, 2, C)

    def rows(self, index: torch.Tensor) -> Condition:
        """The condition of a subset of the batch (index: (b,) row ids)."""
        return Condition(self.embedding[index], tuple(m[index] for m in self.blocks), self.head[index])


class AdaLNBlock(nn.Module):
    """Attention + MLP, each modulated by the class embedding (AdaLN, LayerNorms without affine)."""

    def __init__(self, cfg: TransformerConfig, layer_index: int, drop_path: float):
        super().__init__()
        self.width = cfg.width
        self.drop_path = drop_path
        self.attn = SelfAttention(cfg, layer_index)
        self.ffn = FeedForward(cfg)
        self.ln_wo_grad = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (B, C) -> (B, 1, 6, C): gammas, scales and shifts of both branches."""
        return self.ada_lin(cond).view(-1, 1, 6, self.width)

    def forward(self, x, modulation, plan: AttentionPlan, cache=None, capture=None) -> torch.Tensor:
        """x (B, N, C), modulation (B, 1, 6, C) -> (B, N, C)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.unbind(2)
        h = self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, plan, cache, capture)
        x = x + _drop_path(h * gamma1, self.drop_path, self.training)
        h = self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2)
        return x + _drop_path(h * gamma2, self.drop_path, self.training)


class AdaLNHeadNorm(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.width = cfg.width
        self.ln_wo_grad = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (B, C) -> (B, 1, 2, C)."""
        return self.ada_lin(cond).view(-1, 1, 2, self.width)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        scale, shift = modulation.unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


class ScaleTransformer(nn.Module):
    """Next-scale predictor. Shapes: B batch, N tokens, C width, V vocab, Cvae latent channels."""

    def __init__(self, cfg: TransformerConfig, initialize: bool = True):
        super().__init__()
        self.cfg = cfg
        self.schedule = cfg.schedule
        width, total = cfg.width, self.schedule.total_tokens
        first = cfg.patch_nums[0] ** 2
        self.word_embed = nn.Linear(cfg.latent_channels, width)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, width)  # last row: the null class
        self.pos_start = nn.Parameter(torch.zeros(1, first, width))
        self.pos_1LC = nn.Parameter(torch.zeros(1, total, width))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), width)
        rates = [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # deeper drops more
        self.blocks = nn.ModuleList(AdaLNBlock(cfg, i, rates[i]) for i in range(cfg.depth))
        self.head_nm = AdaLNHeadNorm(cfg)
        self.head = nn.Linear(width, cfg.vocab_size)
        # scale index of every flat position (derived, not stored in our files)
        self.register_buffer("lvl_1L", self.schedule.scale_of_positions().unsqueeze(0), persistent=False)
        if initialize:
            self.init_weights()

    @classmethod
    def empty(cls, cfg: TransformerConfig, device="cpu") -> ScaleTransformer:
        """Allocated but uninitialised (fast): for loading weights that overwrite every parameter."""
        with torch.device("meta"):
            model = cls(cfg, initialize=False)
        model = model.to_empty(device=device)
        model.reset_derived_buffers()
        return model

    def reset_derived_buffers(self) -> None:
        self.lvl_1L.copy_(self.schedule.scale_of_positions().unsqueeze(0))
        for block in self.blocks:
            block.attn.zero_k_bias.zero_()

    # ----- initialisation ----------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, adaln: float = 0.5, adaln_gamma: float = 1e-5, head: float = 0.02) -> None:
        """VAR's initialisation: truncated normals with std sqrt(1/(3C)), damped residual branches."""
        std = math.sqrt(1 / self.cfg.width / 3)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(head)
        self.head_nm.ada_lin[-1].weight.mul_(adaln)
        width, depth = self.cfg.width, self.cfg.depth
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            # gammas start near zero so every block starts close to the identity
            block.ada_lin[-1].weight[: 2 * width].mul_(adaln_gamma)
            block.ada_lin[-1].weight[2 * width :].mul_(adaln)
            block.attn.scale_mul_1H11.fill_(math.log(4.0))
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()

    # ----- validation --------------------------------------------------------------------------

    def check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Class ids (B,) as a long tensor on the model's device; floats and bools are refused, never truncated."""
        if not torch.is_tensor(labels):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise ValueError(f"labels must be a 1-D tensor of integer class ids, got {shown(labels)}") from None
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D tensor of integer class ids, got a {labels.dtype} tensor")
        labels = labels.to(device=self.pos_1LC.device, dtype=torch.long)
        if labels.ndim != 1 or labels.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high > self.cfg.null_class:
            raise ValueError(
                f"class id out of range: got {low if low < 0 else high}, valid ids are 0..{self.cfg.num_classes - 1} "
                f"(and {self.cfg.null_class} for unconditional)"
            )
        return labels

    # ----- embeddings --------------------------------------------------------------------------

    def class_condition(self, labels: torch.Tensor) -> Condition:
        """labels (B,) -> the batch's Condition; the null class id gives the unconditional embedding."""
        embedding = self.class_emb(self.check_labels(labels))
        return Condition(embedding, tuple(block.modulation(embedding) for block in self.blocks),
                         self.head_nm.modulation(embedding))

    def embed_scale(self, scale: int, cond: Condition, scale_input: torch.Tensor | None) -> torch.Tensor:
        """Transformer input of one scale: (B, n_s, C).

        Scale 0 is the class embedding plus a learned start position; scale s > 0 is the
        accumulated map ``scale_input`` (B, n_s, Cvae) through ``word_embed``. Both get the level
        and absolute position embeddings.
        """
        begin, end = self.schedule.begin(scale), self.schedule.end(scale)
        if scale == 0:
            x = cond.embedding.unsqueeze(1) + self.pos_start
        else:
            if scale_input is None or scale_input.shape[1:] != (end - begin, self.cfg.latent_channels):
                got = None if scale_input is None else tuple(scale_input.shape)
                raise ValueError(f"scale {scale} needs an input of shape (B, {end - begin}, "
                                 f"{self.cfg.latent_channels}), got {got}")
            x = self.word_embed(scale_input.to(self.word_embed.weight.dtype))
        return x + self.lvl_embed.weight[scale] + self.pos_1LC[:, begin:end]

    def logits(self, hidden: torch.Tensor, cond: Condition) -> torch.Tensor:
        """hidden (B, N, C) -> logits (B, N, V) in fp32."""
        return self.head(self.head_nm(hidden, cond.head)).float()

    def run_blocks(self, x, cond: Condition, plan: AttentionPlan, cache: KVCache | None = None,
                   capture: AttentionCapture | None = None) -> torch.Tensor:
        for block, modulation in zip(self.blocks, cond.blocks, strict=True):
            x = block(x, modulation, plan, cache, capture)
        if cache is not None:
            cache.advance()
        return x

    # ----- attention plans ---------------------------------------------------------------------

    def plan_for(self, mode: AttentionMode, scales: Sequence[int], cached: bool = False,
                 dense_mask: bool = False) -> AttentionPlan:
        """The attention plan of a forward over the contiguous ``scales``.

        VAR: block-causal over the scales (with a cache, the current scale sees all cached keys
        and itself: no mask). MVAR: block-diagonal over a group of early scales, or one windowed
        scale alone. Multi-scale patterns run as per-scale segments, or as one masked call with
        ``dense_mask`` (the reference).
        """
        if not isinstance(mode, AttentionMode):
            raise ValueError(f"mode must be an AttentionMode, got {shown(mode)} ({type(mode).__name__})")
        if isinstance(scales, str | bytes) or not isinstance(scales, Iterable):
            raise ValueError(f"scales must be a sequence of scale indices, got {shown(scales)}")
        scales = [self.schedule.check_scale(s) for s in scales]
        if not scales or any(b != a + 1 for a, b in zip(scales, scales[1:], strict=False)):
            raise ValueError(f"scales must be consecutive scale indices (at least one), got {scales}")
        nums = tuple(self.cfg.patch_nums[s] for s in scales)
        device = self.pos_1LC.device
        ends = [sum(n * n for n in nums[: i + 1]) for i in range(len(nums))]
        begins = [0] + ends[:-1]
        if not mode.markov:
            if cached or len(scales) == 1:
                return AttentionPlan()
            if dense_mask:
                return AttentionPlan(mask=attn_ops.block_causal_mask(nums).to(device))
            return AttentionPlan(segments=tuple((b, e, 0, e) for b, e in zip(begins, ends, strict=True)))
        windowed = [s for s in scales if mode.is_windowed(s)]
        if windowed:
            if len(scales) != 1:
                raise ValueError("an MVAR forward covers either early scales or exactly one windowed scale")
            side = nums[0]
            return AttentionPlan(window=(side, side, mode.kernel_size), backend=mode.backend)
        if len(scales) == 1:
            return AttentionPlan()
        if dense_mask:
            return AttentionPlan(mask=attn_ops.block_diagonal_mask(nums).to(device))
        return AttentionPlan(segments=tuple((b, e, b, e) for b, e in zip(begins, ends, strict=True)))

    @staticmethod
    def mvar_groups(mode: AttentionMode, first: int, last: int) -> list[list[int]]:
        """Split scales first..last into MVAR's independent forwards: early scales jointly, windowed alone."""
        early = [s for s in range(first, last + 1) if not mode.is_windowed(s)]
        late = [[s] for s in range(first, last + 1) if mode.is_windowed(s)]
        return ([early] if early else []) + late

    # ----- teacher-forced forward (training) ---------------------------------------------------

    def forward(
        self,
        labels: torch.Tensor,
        scale_inputs: torch.Tensor | None,
        mode: AttentionMode = VAR_MODE,
        first_scale: int = 0,
        last_scale: int | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits of scales first_scale..last_scale: (B, N_range, V).

        ``scale_inputs`` is (B, L - n_0, Cvae): the inputs of scales 1..S-1 (tokenizer's
        ``teacher_forcing_inputs``); only the slices of the requested scales are read. Labels are
        used as given: label dropout for CFG is the training loop's job.
        """
        schedule = self.schedule
        last_scale = schedule.num_scales - 1 if last_scale is None else last_scale
        schedule.check_scale(first_scale)
        schedule.check_scale(last_scale)
        if last_scale < first_scale:
            raise ValueError(f"last_scale {last_scale} < first_scale {first_scale}")
        cond = self.class_condition(labels)
        expected = schedule.total_tokens - schedule.tokens(0)
        if last_scale > 0 and (scale_inputs is None or scale_inputs.shape[1] != expected):
            got = None if scale_inputs is None else tuple(scale_inputs.shape)
            raise ValueError(f"scale_inputs must be (B, {expected}, {self.cfg.latent_channels}), got {got}")
        offset = schedule.tokens(0)

        def inputs_of(s: int) -> torch.Tensor | None:
            if s == 0:
                return None
            return scale_inputs[:, schedule.begin(s) - offset : schedule.end(s) - offset]

        if not mode.markov:
            # VAR: context is every earlier scale, so always run from scale 0
            scales = list(range(0, last_scale + 1))
            x = torch.cat([self.embed_scale(s, cond, inputs_of(s)) for s in scales], dim=1)
            hidden = self.run_blocks(x, cond, self.plan_for(mode, scales))
            begin = schedule.begin(first_scale)
            return self.logits(hidden[:, begin:], cond)
        outputs = []
        for group in self.mvar_groups(mode, first_scale, last_scale):
            x = torch.cat([self.embed_scale(s, cond, inputs_of(s)) for s in group], dim=1)
            outputs.append(self.logits(self.run_blocks(x, cond, self.plan_for(mode, group)), cond))
        return torch.cat(outputs, dim=1)

    def new_kv_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        batch = integer("batch", batch, low=1)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating-point torch.dtype, got {shown(dtype)}")
        cfg = self.cfg
        return KVCache(cfg.depth, batch, cfg.num_heads, self.schedule.total_tokens, cfg.head_dim,
                       dtype or self.pos_1LC.dtype, self.pos_1LC.device)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
