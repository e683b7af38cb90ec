"""Class-conditional generation, scale by scale, in VAR or MVAR mode.

``generate_steps`` is the core: an iterator that yields after every scale (tokens, accumulated
``f_hat``, optional preview, timing, optional attention weights), which the app streams from.
``generate`` runs it to the end for batch generation. A preview is the full decode of the scale's
accumulated map; which scales a stream decodes, and how the others are decoded later, see ``previews.py``.

Determinism: every sample owns a ``torch.Generator`` seeded from its own seed and draws its
random numbers in a fixed order, so a sample never depends on the other samples in its batch
(in fp32; in bf16 and fp16 the matrix products round differently with the batch size, so a sample
can differ slightly between batches).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import checks, ranges
from .config import VAR_MODE, AttentionMode
from .devices import autocast, checked_dtype, synchronize
from .previews import PreviewBudget, decode_previews
from .tokenizer import MultiScaleVQVAE, decode_to_unit
from .transformer import AttentionCapture, ScaleTransformer

SEED_MODULUS = ranges.SEED_MODULUS  # any integer seed is folded into the generator's range


@dataclass(frozen=True)
class SamplingConfig:
    """The settings' ranges are in ``ranges.py``. cfg (0..10): guidance strength t = cfg * s / (S - 1) at scale s,
    logits = (1 + t) cond - t uncond (VAR's ramp);
    0 = no guidance, and no unconditional branch is run. In MVAR mode cfg == 1.0 is no guidance as well,
    as in the official MVAR sampler (VAR's applies its ramp at 1.0 too; see :func:`is_guided`);
    top_k: keep the k most likely tokens (0 = off); top_p: nucleus mass in (0, 1] (1 = off);
    smooth: VAR's Gumbel-softmax smoothing of the token embeddings (for visualisation)."""

    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 1.0
    smooth: bool = False

    def validate(self, vocab_size: int) -> SamplingConfig:
        """The settings with plain Python types (float, int, float, bool), or a ValueError naming the bad one."""
        return SamplingConfig(
            cfg=checks.real("cfg", self.cfg, ranges.CFG_MIN, ranges.CFG_MAX),
            top_k=checks.integer("top_k", self.top_k, ranges.TOP_K_MIN, ranges.top_k_max(vocab_size)),
            top_p=checks.real("top_p", self.top_p, ranges.TOP_P_MIN, ranges.TOP_P_MAX, low_open=True),
            smooth=checks.boolean("smooth", self.smooth),
        )


@dataclass
class ScaleStep:
    """What one scale of generation produced. B is the number of samples (CFG branch excluded)."""

    scale: int
    side: int
    tokens: torch.Tensor  # (B, side*side)
    f_hat: torch.Tensor  # (B, Cvae, h, w): accumulated map after this scale
    preview: torch.Tensor | None  # (B or preview_samples, 3, H, W) in [0, 1]: the full decode of f_hat, if
    # previews were asked for (and, with a PreviewBudget, the budget let this scale's be decoded now)
    seconds: float  # wall time of this scale: generation, plus the preview and capture below
    attention: dict[int, torch.Tensor] | None = None  # layer -> (B or capture_samples, H, nq, Nk), cond. branch
    attention_queries: torch.Tensor | None = None  # (nq,) query positions within the scale
    attention_keys_begin: int = 0  # flat position of key 0 (VAR: 0, MVAR: begin of this scale)
    kv_cache_bytes: int = 0  # bytes the KV cache holds allocated (VAR), 0 for MVAR
    preview_seconds: float = 0.0  # of ``seconds``: decoding the preview
    capture_seconds: float = 0.0  # of ``seconds``: computing the captured attention weights

    @property
    def generation_seconds(self) -> float:
        """The scale's own work (transformer, sampling, accumulation), without preview and capture."""
        return self.seconds - self.preview_seconds - self.capture_seconds


@dataclass(frozen=True)
class ForcedTokens:
    """Tokens to take instead of sampling them (zero-shot editing, see ``edit.py``).

    Per scale s: ``tokens[s]`` (B, p_s*p_s) token ids and ``keep[s]`` (B, p_s*p_s) bool, True where the
    given token is kept. Sampling still draws its random numbers for every position, so what is sampled
    elsewhere depends only on the sample's seed, never on what was forced or on the batch."""

    tokens: tuple[torch.Tensor, ...]
    keep: tuple[torch.Tensor, ...]


@dataclass
class Generation:
    tokens: list[torch.Tensor]  # per scale (B, p*p)
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    seconds_per_scale: list[float]
    seconds_total: float


def is_guided(sampling: SamplingConfig, mode: AttentionMode) -> bool:
    """Whether classifier-free guidance runs (and with it the unconditional branch): cfg > 0, except that
    MVAR mode follows the official MVAR sampler, where cfg == 1.0 means no guidance."""
    return sampling.cfg > 0 and not (mode.markov and sampling.cfg == 1.0)


def normalize_seed(seed) -> int:
    """Any integer (negative, huge; numpy ints; a whole float such as 5.0) -> a valid generator seed.

    Everything else is refused with a ValueError: bools, strings ("12" is no seed), 1.5, NaN, inf, None.
    """
    if checks.is_integer(seed):
        return int(seed) % SEED_MODULUS
    if checks.is_real(seed):
        try:
            number = float(seed)
        except OverflowError:  # a huge Fraction: not worth supporting
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            return int(number) % SEED_MODULUS
    raise ValueError(f"seed must be an integer, got {checks.shown(seed)} ({type(seed).__name__})")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p: (N, V) -> (N, V).

    The most likely token always survives. With top-k on, the nucleus is searched among the k
    candidates ``topk`` returns already sorted, which spares a sort of the whole vocabulary.
    """
    vocab = logits.shape[-1]
    keep = top_k if 0 < top_k < vocab else vocab
    if top_p >= 1.0:
        if keep == vocab:
            return logits
        kth_best = logits.topk(keep, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth_best, float("-inf"))
    if keep < vocab:
        candidates, order = logits.topk(keep, dim=-1)  # sorted, descending
    else:
        candidates, order = logits.sort(dim=-1, descending=True)
    probs = candidates.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p
    drop[..., 0] = False  # a top_p that rounds to 0 in fp32 must still leave one token
    kept = candidates.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, kept)


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs (N, V), uniforms (N,) in [0, 1) -> token ids (N,)."""
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    # right=True: the first token whose cdf exceeds the target, never a zero-probability one
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def set_precision(transformer: ScaleTransformer, tokenizer: MultiScaleVQVAE, dtype: torch.dtype | None) -> None:
    """Store the weights generation runs through in ``dtype`` (in place): the transformer and the decoder.

    Autocast alone would recast every fp32 weight at every scale, which for a d16 model costs as
    much time as the matmuls of the small scales. The quantiser that accumulates ``f_hat`` keeps
    fp32. ``None`` or float32 restores full precision. The decoder's convolutions are also stored
    channels-last, about 15% faster on CPU.
    """
    dtype = checked_dtype(dtype) or torch.float32
    transformer.to(dtype)
    tokenizer.post_quant_conv.to(dtype)
    tokenizer.decoder.to(dtype, memory_format=torch.channels_last)  # oneDNN's fast conv layout on CPU


def compute_dtype(transformer: ScaleTransformer, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of a generation: the one asked for, else that of low-precision weights."""
    stored = transformer.pos_1LC.dtype
    if stored in LOW_PRECISION:
        if dtype not in (None, stored):
            raise ValueError(f"the weights are stored in {stored}, not {dtype}: call set_precision first")
        return stored
    return dtype


def sample_seeds(seeds, count: int) -> list[int]:
    """Each sample's generator seed: one per sample, or one integer for all (sample i then uses seed + i),
    each folded into 0..``ranges.SEED_MAX`` by :func:`normalize_seed`."""
    if isinstance(seeds, str | bytes) or not isinstance(seeds, Sequence):  # one seed ("12" is one bad seed)
        base = normalize_seed(seeds)
        return [(base + i) % SEED_MODULUS for i in range(count)]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} labels")
    return [normalize_seed(seed) for seed in seeds]


def _check_capture_queries(capture_queries, patch_nums: Sequence[int]) -> dict[int, tuple[int, ...] | None] | None:
    """{scale index: token positions within the scale, or None for all} with every key and position checked."""
    if capture_queries is None:
        return None
    checks.instance("capture_queries", capture_queries, Mapping, "scale index -> token positions or None")
    last = len(patch_nums) - 1
    return {checks.integer("capture_queries key", scale, 0, last):
            None if chosen is None else checks.integers(f"capture query tokens of scale {scale}", chosen, 0,
                                                        patch_nums[scale] ** 2 - 1)
            for scale, chosen in capture_queries.items()}


def _check_models(tokenizer: MultiScaleVQVAE, transformer: ScaleTransformer) -> None:
    """The two models must share the scale schedule, the vocabulary and the latent width."""
    if tokenizer.cfg.patch_nums != transformer.cfg.patch_nums:
        raise ValueError(f"the tokenizer's scale schedule {tokenizer.cfg.patch_nums} does not match the "
                         f"transformer's {transformer.cfg.patch_nums}")
    if (tokenizer.cfg.vocab_size, tokenizer.cfg.latent_channels) != (transformer.cfg.vocab_size,
                                                                     transformer.cfg.latent_channels):
        raise ValueError("tokenizer and transformer disagree on vocab_size or latent_channels")


def generate_steps(
    transformer: ScaleTransformer,
    tokenizer: MultiScaleVQVAE,
    labels: Sequence[int] | torch.Tensor,
    seeds: int | Sequence[int] = 0,
    sampling: SamplingConfig | None = None,
    mode: AttentionMode = VAR_MODE,
    previews: bool = False,
    dtype: torch.dtype | None = None,
    capture_layers: Sequence[int] | None = None,
    capture_queries: Mapping[int, Sequence[int] | None] | None = None,
    max_batch: int = ranges.MAX_BATCH,
    preview_samples: int | None = None,
    forced: ForcedTokens | None = None,
    capture_samples: Sequence[int] | None = None,
    preview_budget: PreviewBudget | None = None,
) -> Iterator[ScaleStep]:
    """Generate B = len(labels) images, yielding after every scale.

    seeds: one per sample, or one int (sample i then uses seed + i). dtype: autocast dtype for
    the transformer (None/float32 = full precision; bfloat16 on CPU, float16/bfloat16 on CUDA).
    capture_layers / capture_queries: record the attention weights of the chosen query tokens
    ({scale: token indices or None for all}) at the chosen layers, conditional branch only.
    previews: decode each scale's accumulated map in full (``previews.decode_previews``), for the first
    ``preview_samples`` samples (None = all): a 256 px decode costs about as much as a whole scale of a
    d16 transformer, so a viewer showing one image should not pay for the others. preview_budget (a
    ``previews.PreviewBudget``, with previews): decode a scale's previews only when the budget allows,
    else the step's ``preview`` is None (keep the maps in a ``previews.Previews`` to decode them later).
    capture_samples: the samples whose attention is captured (None = all). forced: tokens kept instead
    of sampled (editing), see ForcedTokens.
    Arguments are checked here, when called, not at the first step.
    """
    cfg = transformer.cfg
    sampling = SamplingConfig() if sampling is None else sampling
    sampling = checks.instance("sampling", sampling, SamplingConfig).validate(cfg.vocab_size)
    checks.instance("mode", mode, AttentionMode, "VAR_MODE, MVAR_MODE, AttentionMode.mvar(...)")
    dtype = compute_dtype(transformer, checked_dtype(dtype))
    previews = checks.boolean("previews", previews)
    if preview_samples is not None:
        preview_samples = checks.integer("preview_samples", preview_samples, low=1)
    if preview_budget is not None and not previews:
        raise ValueError("preview_budget needs previews=True")
    if preview_budget is not None:
        checks.instance("preview_budget", preview_budget, PreviewBudget)
    max_batch = checks.integer("max_batch", max_batch, low=1)
    labels = list(checks.integers("class ids", labels, 0, cfg.num_classes,
                                  item=f"class id ({cfg.num_classes} = unconditional)"))
    if len(labels) > max_batch:
        raise ValueError(f"batch of {len(labels)} exceeds the limit of {max_batch} samples")
    seeds = sample_seeds(seeds, len(labels))
    _check_models(tokenizer, transformer)
    layers = tuple(range(cfg.depth)) if capture_layers is None else checks.integers(
        "capture layers", capture_layers, 0, cfg.depth - 1)
    capture_queries = _check_capture_queries(capture_queries, cfg.patch_nums)
    forced = _check_forced(forced, cfg.patch_nums, len(labels), cfg.vocab_size)
    if capture_samples is not None:
        capture_samples = torch.tensor(checks.integers("capture_samples", capture_samples, 0, len(labels) - 1))
    return _scale_steps(transformer, tokenizer, labels, seeds, sampling, mode, previews, dtype, layers,
                        capture_queries, preview_samples, forced, capture_samples, preview_budget)


def _check_forced(forced, patch_nums: Sequence[int], batch: int, vocab: int) -> ForcedTokens | None:
    if forced is None:
        return None
    checks.instance("forced", forced, ForcedTokens)
    if len(forced.tokens) != len(patch_nums) or len(forced.keep) != len(patch_nums):
        raise ValueError(f"forced tokens need one map per scale ({len(patch_nums)}), got "
                         f"{len(forced.tokens)} token maps and {len(forced.keep)} keep masks")
    for scale, (tokens, keep) in enumerate(zip(forced.tokens, forced.keep, strict=True)):
        shape = (batch, patch_nums[scale] ** 2)
        if not (torch.is_tensor(tokens) and torch.is_tensor(keep)) or tuple(tokens.shape) != shape \
                or tuple(keep.shape) != shape or keep.dtype != torch.bool or tokens.is_floating_point():
            raise ValueError(f"forced scale {scale}: tokens (integer) and keep (bool) must both be {shape}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"forced scale {scale} has token ids outside 0..{vocab - 1}")
    return forced


@torch.no_grad()
def _scale_steps(transformer: ScaleTransformer, tokenizer: MultiScaleVQVAE, labels: list[int], seeds: list[int],
                 sampling: SamplingConfig, mode: AttentionMode, previews: bool, dtype, layers: tuple[int, ...],
                 capture_queries, preview_samples: int | None, forced: ForcedTokens | None = None,
                 capture_samples: torch.Tensor | None = None, budget: PreviewBudget | None = None
                 ) -> Iterator[ScaleStep]:
    """The generation loop of :func:`generate_steps`, on checked arguments."""
    cfg = transformer.cfg
    device = transformer.pos_1LC.device
    schedule = transformer.schedule
    batch = len(labels)
    guided = is_guided(sampling, mode)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    branch_labels = torch.tensor(labels + ([cfg.null_class] * batch if guided else []), device=device)
    codebook = tokenizer.quantize.embedding.weight

    with autocast(device, dtype):
        cond = transformer.class_condition(branch_labels)
        activation_dtype = transformer.word_embed(codebook[:1]).dtype
    cache = None if mode.markov else transformer.new_kv_cache(len(branch_labels), activation_dtype)
    side_final = schedule.final_side
    f_hat = torch.zeros(batch, cfg.latent_channels, side_final, side_final, device=device)
    scale_input = None
    generated = previewed = 0.0  # seconds so far: the generation's own, the previews of the scales before the last

    for scale, side in enumerate(cfg.patch_nums):
        started = time.perf_counter()
        capture = None
        if capture_queries is not None and scale in capture_queries:
            chosen = capture_queries[scale]  # checked by generate_steps
            query_index = None if chosen is None else torch.tensor(chosen, dtype=torch.long)
            capture = AttentionCapture(layers=layers, queries=query_index, samples=capture_samples)

        with autocast(device, dtype):
            step_input = None if scale_input is None else scale_input.repeat(2 if guided else 1, 1, 1)
            x = transformer.embed_scale(scale, cond, step_input)
            plan = transformer.plan_for(mode, [scale], cached=cache is not None)
            hidden = transformer.run_blocks(x, cond, plan, cache, capture)  # (2B or B, n, C)
        tokens, embedded = _choose_tokens(transformer, hidden, cond, sampling, schedule.guidance_ratio(scale),
                                          generators, codebook, dtype, guided)
        if forced is not None:
            keep = forced.keep[scale].to(device)
            tokens = torch.where(keep, forced.tokens[scale].to(device), tokens)
            embedded = torch.where(keep.unsqueeze(-1), codebook[tokens].float(), embedded)
        h_small = embedded.transpose(1, 2).reshape(batch, cfg.latent_channels, side, side)
        f_hat = tokenizer.add_scale(f_hat, scale, h_small)
        if scale + 1 < schedule.num_scales:
            scale_input = tokenizer.scale_input(f_hat, scale + 1)

        synchronize(device)
        generated += time.perf_counter() - started - (0.0 if capture is None else capture.seconds)
        last = scale + 1 == schedule.num_scales
        preview, preview_seconds = None, 0.0
        if previews and (budget is None or budget.allows(generated, previewed, last)):
            preview_started = time.perf_counter()
            preview = decode_previews(tokenizer, f_hat[:preview_samples], dtype)
            synchronize(device)
            preview_seconds = time.perf_counter() - preview_started
            previewed += 0.0 if last else preview_seconds
            if budget is not None:
                budget.measured(preview_seconds)
        attention = None
        if capture is not None:
            # without samples the capture saw both CFG branches: keep the conditional rows
            rows = slice(None) if capture_samples is not None else slice(0, batch)
            attention = {layer: w[rows].float() for layer, w in capture.weights.items()}
        synchronize(device)  # CUDA runs ahead of the host: the scale's time must include its kernels
        yield ScaleStep(
            scale=scale, side=side, tokens=tokens, f_hat=f_hat, preview=preview,
            seconds=time.perf_counter() - started, attention=attention,
            preview_seconds=preview_seconds, capture_seconds=0.0 if capture is None else capture.seconds,
            attention_queries=None if capture is None else (
                capture.queries if capture.queries is not None else torch.arange(side * side)),
            attention_keys_begin=schedule.begin(scale) if mode.markov else 0,
            kv_cache_bytes=0 if cache is None else cache.allocated_bytes,
        )


SAMPLING_CHUNK_ELEMENTS = 2**23  # (token, vocab) logits per chunk: bounds the fp32 temporaries of sampling


def _choose_tokens(transformer: ScaleTransformer, hidden: torch.Tensor, cond, sampling: SamplingConfig,
                   ratio: float, generators: list[torch.Generator], codebook: torch.Tensor, dtype, guided: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, guidance, filtering and sampling of one scale, a few samples at a time.

    hidden (2B or B, n, C) -> tokens (B, n) and their code vectors (B, n, Cvae) in fp32. Chunking
    keeps the (samples, n, V) fp32 temporaries (logits, sorted logits, probabilities, cdf) from
    dominating peak memory at large batches; every sample still draws from its own generator.
    """
    batch = len(generators)
    n, vocab = hidden.shape[1], transformer.cfg.vocab_size
    chunk = max(1, SAMPLING_CHUNK_ELEMENTS // (n * vocab))
    all_tokens, all_embedded = [], []
    for begin in range(0, batch, chunk):
        samples = torch.arange(begin, min(begin + chunk, batch), device=hidden.device)
        rows = torch.cat((samples, samples + batch)) if guided else samples
        with autocast(hidden.device, dtype):
            logits = transformer.logits(hidden[rows], cond.rows(rows))  # (rows, n, V) fp32
        if guided:
            strength = sampling.cfg * ratio
            logits = (1 + strength) * logits[: len(samples)] - strength * logits[len(samples) :]
        filtered = filter_logits(logits.flatten(0, 1), sampling.top_k, sampling.top_p).view(len(samples), n, vocab)
        del logits
        own = generators[begin : begin + len(samples)]
        uniforms = torch.stack([torch.rand(n, generator=g, device=hidden.device) for g in own])
        tokens = sample_tokens(filtered.softmax(dim=-1).flatten(0, 1), uniforms.flatten()).view(len(samples), n)
        if sampling.smooth:
            # Gumbel-softmax over sharpened logits: a soft mix of code vectors (VAR's "more smooth")
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            gumbels = torch.stack([
                -torch.empty(n, vocab, device=hidden.device).exponential_(generator=g).log() for g in own
            ])
            embedded = ((filtered * (1 + ratio) + gumbels) / tau).softmax(dim=-1) @ codebook.float()
        else:
            embedded = codebook[tokens].float()
        all_tokens.append(tokens)
        all_embedded.append(embedded)
    return torch.cat(all_tokens), torch.cat(all_embedded)


@torch.no_grad()
def generate(
    transformer: ScaleTransformer,
    tokenizer: MultiScaleVQVAE,
    labels: Sequence[int] | torch.Tensor,
    seeds: int | Sequence[int] = 0,
    sampling: SamplingConfig | None = None,
    mode: AttentionMode = VAR_MODE,
    dtype: torch.dtype | None = None,
    decode_chunk: int | None = None,
    max_batch: int = ranges.MAX_BATCH,
) -> Generation:
    """Generate to the end and decode once: the batch helper behind the CLI and the benchmarks."""
    started = time.perf_counter()
    if decode_chunk is not None:
        decode_chunk = checks.integer("decode_chunk", decode_chunk, low=1)
    steps = list(generate_steps(transformer, tokenizer, labels, seeds, sampling, mode,
                                previews=False, dtype=dtype, max_batch=max_batch))
    with autocast(steps[-1].f_hat.device, compute_dtype(transformer, dtype)):
        images = decode_to_unit(tokenizer, steps[-1].f_hat, decode_chunk)
    return Generation(
        tokens=[s.tokens for s in steps],
        images=images,
        seconds_per_scale=[s.seconds for s in steps],
        seconds_total=time.perf_counter() - started,
    )
