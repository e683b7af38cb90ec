"""Attention masks and the windowed-attention backends (mvar/attention.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from mvar import attention as A
from mvar.schedule import OFFICIAL_PATCH_NUMS, ScaleSchedule

SMALL_PATCH_NUMS = (1, 2, 3, 4)


def brute_force_starts(length: int, kernel_size: int) -> list[int]:
    """NATTEN's rule written out: centre the window, then slide it back inside the axis."""
    if length <= kernel_size:
        return [0] * length
    starts = []
    for i in range(length):
        start = i - kernel_size // 2
        start = max(start, 0)
        start = min(start, length - kernel_size)
        starts.append(start)
    return starts


@functools.cache
def _brute_force_mask(height: int, width: int, kernel_size: int) -> torch.Tensor:
    rows = brute_force_starts(height, kernel_size)
    cols = brute_force_starts(width, kernel_size)
    kh, kw = min(kernel_size, height), min(kernel_size, width)
    mask = torch.zeros(height * width, height * width, dtype=torch.bool)
    for r in range(height):
        for c in range(width):
            for kr in range(rows[r], rows[r] + kh):
                for kc in range(cols[c], cols[c] + kw):
                    mask[r * width + c, kr * width + kc] = True
    return mask


def brute_force_mask(height: int, width: int, kernel_size: int) -> torch.Tensor:
    return _brute_force_mask(height, width, kernel_size).clone()


def random_qkv(batch, heads, tokens, dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=generator).to(dtype) for _ in range(3)]


def reference_attention(q, k, v, scale, mask):
    """Softmax attention in float64, written out."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v.double()


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
def test_window_starts_match_brute_force(kernel_size):
    for length in range(1, 24):
        starts = A.window_starts(length, kernel_size)
        assert starts.dtype == torch.long and starts.shape == (length,)
        assert starts.tolist() == brute_force_starts(length, kernel_size)


def test_window_starts_reject_bad_kernels():
    for bad in (0, -1, 2, 8, 3.0, True):
        with pytest.raises(ValueError):
            A.window_starts(10, bad)
    with pytest.raises(ValueError):
        A.window_starts(0, 3)


@pytest.mark.parametrize("height,width,kernel_size", [(16, 16, 7), (13, 13, 7), (7, 9, 7), (5, 3, 7), (1, 1, 7),
                                                      (10, 4, 3), (8, 8, 1)])
def test_neighborhood_mask_matches_brute_force(height, width, kernel_size):
    mask = A.neighborhood_mask(height, width, kernel_size)
    assert mask.dtype == torch.bool and mask.shape == (height * width, height * width)
    assert torch.equal(mask, brute_force_mask(height, width, kernel_size))


def test_neighborhood_indices_are_row_major_windows():
    height, width, kernel_size = 9, 11, 5
    index = A.neighborhood_indices(height, width, kernel_size)
    assert index.dtype == torch.long and index.shape == (height * width, 25)
    mask = brute_force_mask(height, width, kernel_size)
    for query in range(height * width):
        assert index[query].tolist() == mask[query].nonzero().flatten().tolist()  # sorted = row-major


def test_neighborhood_indices_shape_when_grid_is_smaller_than_kernel():
    assert A.neighborhood_indices(5, 3, 7).shape == (15, 15)
    assert A.neighborhood_indices(9, 3, 7).shape == (27, 21)
    assert A.neighborhood_indices(1, 1, 7).tolist() == [[0]]


def test_every_query_sees_k_squared_keys_and_windows_shift_inward():
    side, kernel_size = 16, 7
    mask = A.neighborhood_mask(side, side, kernel_size)
    assert (mask.sum(dim=1) == kernel_size**2).all()
    index = A.neighborhood_indices(side, side, kernel_size)

    def rows_cols(query):
        keys = index[query]
        return sorted(set((keys // side).tolist())), sorted(set((keys % side).tolist()))

    assert rows_cols(0) == (list(range(0, 7)), list(range(0, 7)))  # corner (0, 0)
    assert rows_cols(side * side - 1) == (list(range(9, 16)), list(range(9, 16)))  # corner (15, 15)
    assert rows_cols(8 * side + 8) == (list(range(5, 12)), list(range(5, 12)))  # centred inside
    assert rows_cols(1 * side + 14) == (list(range(0, 7)), list(range(9, 16)))  # (1, 14)


def test_cached_tensors_are_not_shared_with_callers():
    index = A.neighborhood_indices(6, 6, 3)
    index.zero_()
    assert A.neighborhood_indices(6, 6, 3).sum() > 0
    mask = A.neighborhood_mask(6, 6, 3)
    mask.zero_()
    assert A.neighborhood_mask(6, 6, 3).any()


# ---------------------------------------------------------------------------------------------
# Sequence masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_nums", [OFFICIAL_PATCH_NUMS, SMALL_PATCH_NUMS])
def test_block_causal_and_block_diagonal_masks(patch_nums):
    schedule = ScaleSchedule(patch_nums)
    length = schedule.total_tokens
    causal = A.block_causal_mask(patch_nums)
    diagonal = A.block_diagonal_mask(patch_nums)
    assert causal.shape == diagonal.shape == (length, length)
    assert causal.dtype == diagonal.dtype == torch.bool
    for s in range(schedule.num_scales):
        begin, end = schedule.begin(s), schedule.end(s)
        assert (causal[begin:end].sum(dim=1) == end).all()  # everything up to the end of scale s
        assert (diagonal[begin:end].sum(dim=1) == schedule.tokens(s)).all()
        assert diagonal[begin:end, begin:end].all()
    assert torch.equal(diagonal, causal & causal.T)
    assert not torch.triu(causal, diagonal=1)[: schedule.tokens(0)].any()
    if patch_nums == OFFICIAL_PATCH_NUMS:
        assert length == 680 and causal.sum() == sum(
            schedule.tokens(s) * schedule.end(s) for s in range(schedule.num_scales)
        )


@pytest.mark.parametrize("patch_nums,refine_step,kernel_size", [(OFFICIAL_PATCH_NUMS, 8, 7),
                                                                (SMALL_PATCH_NUMS, 2, 3)])
def test_mvar_mask(patch_nums, refine_step, kernel_size):
    schedule = ScaleSchedule(patch_nums)
    mask = A.mvar_mask(patch_nums, refine_step, kernel_size)
    diagonal = A.block_diagonal_mask(patch_nums)
    assert mask.shape == diagonal.shape
    assert not (mask & ~diagonal).any()  # never leaves its own scale
    for s in range(schedule.num_scales):
        begin, end, side = schedule.begin(s), schedule.end(s), patch_nums[s]
        block = mask[begin:end, begin:end]
        if s < refine_step:
            assert block.all()
        else:
            assert torch.equal(block, brute_force_mask(side, side, kernel_size))
            expected = min(kernel_size, side) ** 2
            assert (block.sum(dim=1) == expected).all()


def test_mvar_mask_without_windowed_scales_is_block_diagonal():
    assert torch.equal(A.mvar_mask(SMALL_PATCH_NUMS, 99, 3), A.block_diagonal_mask(SMALL_PATCH_NUMS))


def test_mask_arguments_are_validated():
    with pytest.raises(ValueError):
        A.block_causal_mask((2, 1))
    with pytest.raises(ValueError):
        A.mvar_mask(SMALL_PATCH_NUMS, -1, 3)
    with pytest.raises(ValueError):
        A.mvar_mask(SMALL_PATCH_NUMS, 2, 4)


# ---------------------------------------------------------------------------------------------
# Backends agree with the dense reference
# ---------------------------------------------------------------------------------------------

GRIDS = [(16, 16), (13, 13), (7, 9), (5, 3), (1, 1), (9, 20), (3, 17), (24, 10)]


@pytest.mark.parametrize("height,width", GRIDS)
@pytest.mark.parametrize("batch,heads", [(1, 1), (2, 3)])
def test_backends_agree_fp32(height, width, batch, heads):
    kernel_size, scale = 7, 0.35
    q, k, v = random_qkv(batch, heads, height * width, 16, seed=height * 100 + width)
    reference = reference_attention(q, k, v, scale, brute_force_mask(height, width, kernel_size))
    dense = A.windowed_attention(q, k, v, height, width, kernel_size, scale, backend="dense")
    gather = A.windowed_attention(q, k, v, height, width, kernel_size, scale, backend="gather")
    auto = A.windowed_attention(q, k, v, height, width, kernel_size, scale, backend="auto")
    for out in (dense, gather, auto):
        assert out.shape == q.shape and out.dtype == torch.float32
        assert (out.double() - reference).abs().max() < 1e-5
    assert (gather - dense).abs().max() < 1e-5


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 9])
def test_gather_backend_other_kernels(kernel_size):
    height, width = 11, 14
    q, k, v = random_qkv(2, 2, height * width, 8, seed=kernel_size)
    reference = reference_attention(q, k, v, 1.0, brute_force_mask(height, width, kernel_size))
    gather = A.windowed_attention(q, k, v, height, width, kernel_size, 1.0, backend="gather")
    assert (gather.double() - reference).abs().max() < 1e-5


def test_gather_backend_on_a_large_grid_and_in_chunks(monkeypatch):
    height, width, kernel_size = 40, 33, 7
    q, k, v = random_qkv(2, 3, height * width, 8, seed=7)
    dense = A.windowed_attention(q, k, v, height, width, kernel_size, 0.5, backend="dense")
    whole = A.windowed_attention(q, k, v, height, width, kernel_size, 0.5, backend="gather")
    assert (whole - dense).abs().max() < 1e-5
    monkeypatch.setattr(A, "GATHER_CHUNK_ELEMENTS", 1)  # one head at a time
    chunked = A.windowed_attention(q, k, v, height, width, kernel_size, 0.5, backend="gather")
    assert (chunked - dense).abs().max() < 1e-5


def test_gather_accepts_the_transformers_strided_layout():
    """q, k, v as views of one (B, N, 3, H, D) projection, value head dim differing is fine too."""
    height, width, heads, dim = 12, 12, 4, 8
    qkv = torch.randn(2, height * width, 3, heads, dim, generator=torch.Generator().manual_seed(3))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    dense = A.windowed_attention(q, k, v, height, width, 7, 1.0, backend="dense")
    gather = A.windowed_attention(q, k, v, height, width, 7, 1.0, backend="gather")
    assert (gather - dense).abs().max() < 1e-5
    v_wide = torch.randn(2, heads, height * width, 2 * dim)
    dense = A.windowed_attention(q, k, v_wide, height, width, 7, 1.0, backend="dense")
    gather = A.windowed_attention(q, k, v_wide, height, width, 7, 1.0, backend="gather")
    assert gather.shape == (2, heads, height * width, 2 * dim)
    assert (gather - dense).abs().max() < 1e-5


def test_gather_backend_gradients_match_dense():
    """Training runs through the same code: gradients must agree too."""
    height, width, kernel_size = 11, 10, 5
    inputs = [t.requires_grad_() for t in random_qkv(2, 2, height * width, 8, seed=11)]
    cotangent = torch.randn(2, 2, height * width, 8, generator=torch.Generator().manual_seed(12))
    grads = {}
    for backend in ("dense", "gather"):
        out = A.windowed_attention(*inputs, height, width, kernel_size, 0.8, backend=backend)
        grads[backend] = torch.autograd.grad(out, inputs, cotangent)
    for dense, gather in zip(grads["dense"], grads["gather"], strict=True):
        assert (dense - gather).abs().max() < 1e-5


@pytest.mark.parametrize("height,width", [(16, 16), (13, 13), (7, 9), (24, 10)])
def test_backends_agree_bf16(height, width):
    kernel_size = 7
    q, k, v = random_qkv(2, 2, height * width, 32, dtype=torch.bfloat16, seed=1)
    reference = reference_attention(q, k, v, 0.2, brute_force_mask(height, width, kernel_size))
    for backend in ("dense", "gather"):
        out = A.windowed_attention(q, k, v, height, width, kernel_size, 0.2, backend=backend)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        assert (out.double() - reference).abs().max() < 2e-2


def test_bf16_gather_stays_accurate_at_the_transformers_temperatures():
    """Unit q, k times a per-head temperature up to 100 (as in the transformer): logits reach 100,
    where bf16 rounding of the logits alone would cost ~0.2 absolute error."""
    side, kernel_size = 12, 7
    q, k, v = random_qkv(2, 4, side * side, 32, seed=4)
    temperature = torch.tensor([5.0, 20.0, 50.0, 100.0]).view(1, 4, 1, 1)
    q = torch.nn.functional.normalize(q, dim=-1) * temperature
    k = torch.nn.functional.normalize(k, dim=-1)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    reference = reference_attention(q, k, v, 1.0, brute_force_mask(side, side, kernel_size))
    for backend in ("dense", "gather"):
        out = A.windowed_attention(q, k, v, side, side, kernel_size, 1.0, backend=backend)
        assert (out.double() - reference).abs().max() < 3e-2


def test_dense_attention_passes_scale_and_mask_through():
    q, k, v = random_qkv(2, 2, 10, 8)
    mask = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) < 0.5
    mask.fill_diagonal_(True)
    for scale in (1.0, 0.25, 3.0):
        out = A.dense_attention(q, k, v, scale, mask)
        assert (out.double() - reference_attention(q, k, v, scale, mask)).abs().max() < 1e-5
    full = A.dense_attention(q, k, v, 1.0)
    assert (full.double() - reference_attention(q, k, v, 1.0, torch.ones(10, 10, dtype=torch.bool))).abs().max() < 1e-5
    # queries and keys of different lengths (VAR with a KV cache)
    q_new = q[:, :, :4]
    out = A.dense_attention(q_new, k, v, 1.0)
    assert out.shape == (2, 2, 4, 8)
    with pytest.raises(ValueError):
        A.dense_attention(q, k, v, 1.0, mask.float())


# ---------------------------------------------------------------------------------------------
# Attention weights for visualisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(16, 16), (7, 9), (5, 3)])
def test_windowed_attention_weights(height, width):
    kernel_size, scale = 7, 0.7
    q, k, _ = random_qkv(2, 3, height * width, 8, seed=5)
    query_index = torch.tensor([0, width - 1, height * width // 2, height * width - 1])
    weights = A.windowed_attention_weights(q[:, :, query_index], k, height, width, kernel_size, scale, query_index)
    assert weights.shape == (2, 3, 4, height * width) and weights.dtype == torch.float32
    mask = brute_force_mask(height, width, kernel_size)[query_index]
    logits = (q[:, :, query_index].double() @ k.double().transpose(-1, -2)) * scale
    expected = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    assert (weights.double() - expected).abs().max() < 1e-6
    assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 3, 4))
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()  # exactly zero outside the window


def test_windowed_weights_match_the_output_of_windowed_attention():
    height, width, kernel_size = 10, 10, 5
    q, k, v = random_qkv(1, 2, height * width, 8, seed=9)
    everything = torch.arange(height * width)
    weights = A.windowed_attention_weights(q, k, height, width, kernel_size, 1.0, everything)
    out = A.windowed_attention(q, k, v, height, width, kernel_size, 1.0, backend="gather")
    assert (weights @ v - out).abs().max() < 1e-5


def test_dense_attention_weights():
    q, k, _ = random_qkv(2, 2, 12, 8, seed=2)
    rows = torch.tensor([0, 5, 11])
    mask_rows = torch.tril(torch.ones(12, 12, dtype=torch.bool))[rows]
    weights = A.dense_attention_weights(q[:, :, rows], k, 0.5, mask_rows)
    logits = (q[:, :, rows].double() @ k.double().transpose(-1, -2)) * 0.5
    expected = torch.softmax(logits.masked_fill(~mask_rows, float("-inf")), dim=-1)
    assert weights.shape == (2, 2, 3, 12) and weights.dtype == torch.float32
    assert (weights.double() - expected).abs().max() < 1e-6
    assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 2, 3))
    assert (weights[..., 0, 1:] == 0).all()  # query 0 sees only key 0
    unmasked = A.dense_attention_weights(q[:, :, rows], k, 0.5)
    assert torch.allclose(unmasked.sum(dim=-1), torch.ones(2, 2, 3))
    with pytest.raises(ValueError):
        A.dense_attention_weights(q[:, :, rows], k, 0.5, mask_rows[:2])


def test_weights_reject_bad_query_index():
    q, k, _ = random_qkv(1, 1, 16, 4)
    with pytest.raises(ValueError):
        A.windowed_attention_weights(q[:, :, :1], k, 4, 4, 3, 1.0, torch.tensor([16]))
    with pytest.raises(ValueError):
        A.windowed_attention_weights(q[:, :, :2], k, 4, 4, 3, 1.0, torch.tensor([1]))


# ---------------------------------------------------------------------------------------------
# Backend choice and input validation
# ---------------------------------------------------------------------------------------------


def test_resolve_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small, large = A.DENSE_MAX_TOKENS, A.DENSE_MAX_TOKENS + 1
    assert A.resolve_backend("auto", cpu, small, natten_installed=False) == "dense"
    assert A.resolve_backend("auto", cpu, large, natten_installed=False) == "gather"
    # natten runs on the CPU but slower than ours: "auto" keeps dense / gather there
    assert A.resolve_backend("auto", "cpu", small, natten_installed=True) == "dense"
    assert A.resolve_backend("auto", "cpu", large, natten_installed=True) == "gather"
    assert A.resolve_backend("auto", cuda, small, natten_installed=True) == "natten"
    assert A.resolve_backend("auto", cuda, large, natten_installed=False) == "gather"
    assert A.resolve_backend("dense", cpu, large) == "dense"
    assert A.resolve_backend("gather", cpu, small) == "gather"
    assert A.resolve_backend("natten", "cuda:0", small, natten_installed=True) == "natten"
    assert A.resolve_backend("natten", cpu, large, natten_installed=True) == "natten"
    with pytest.raises(ValueError, match=r"'natten' runs on cuda or cpu tensors, but these are on meta"):
        A.resolve_backend("natten", "meta", small, natten_installed=True)
    for device in (cpu, cuda):
        with pytest.raises(ValueError, match=r"needs the natten package \(pip install natten==0.21.7\)"):
            A.resolve_backend("natten", device, small, natten_installed=False)
    with pytest.raises(ValueError, match="unknown"):
        A.resolve_backend("flash", cpu, small)


def test_resolve_backend_covers_the_config_backends():
    from mvar.config import AttentionMode

    for backend in ("auto", "dense", "gather", "natten"):
        AttentionMode.mvar(backend=backend)
        assert A.resolve_backend(backend, "cpu", 100, natten_installed=True) in A.BACKENDS


def test_windowed_attention_validates_inputs():
    q, k, v = random_qkv(1, 2, 20, 8)
    with pytest.raises(ValueError, match="grid"):
        A.windowed_attention(q, k, v, 4, 4, 3, 1.0)  # 16 != 20
    with pytest.raises(ValueError, match="kernel_size"):
        A.windowed_attention(q, k, v, 4, 5, 4, 1.0)
    with pytest.raises(ValueError):
        A.windowed_attention(q, k[:, :1], v, 4, 5, 3, 1.0)
    with pytest.raises(ValueError):
        A.windowed_attention(q, k[..., :4], v, 4, 5, 3, 1.0)
    with pytest.raises(ValueError):
        A.windowed_attention(q[0], k, v, 4, 5, 3, 1.0)
    with pytest.raises(ValueError):
        A.windowed_attention(q, k.double(), v, 4, 5, 3, 1.0)
    with pytest.raises(ValueError, match="unknown"):
        A.windowed_attention(q, k, v, 4, 5, 3, 1.0, backend="sparse")


# ---------------------------------------------------------------------------------------------
# NATTEN: the official code's kernel, an independent check of dense and gather
# ---------------------------------------------------------------------------------------------

needs_natten = pytest.mark.skipif(
    not A.natten_available(), reason="natten is not importable (requirements-dev.txt installs natten==0.21.7)"
)
# NATTEN's CPU path warns once that flex attention runs without torch.compile (NATTEN forbids compiling it)
quiet_flex = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile", "ignore:return_lse")

# every shape on the list, few distinct shapes (each first na2d call per shape costs time)
NATTEN_GRIDS = [(13, 13), (16, 16), (5, 9), (12, 7)]


@pytest.fixture
def natten_calls(monkeypatch):
    """The shapes and kernels every na2d call receives (NATTEN still does the work)."""
    na2d, calls = A._natten_na2d(), []

    def recording_na2d(q, k, v, **kwargs):
        calls.append((tuple(q.shape), kwargs["kernel_size"]))
        return na2d(q, k, v, **kwargs)

    monkeypatch.setattr(A, "_natten_na2d", lambda: recording_na2d)
    return calls


@needs_natten
@quiet_flex
@pytest.mark.parametrize("kernel_size", [3, 5, 7, 9])
@pytest.mark.parametrize("height,width", NATTEN_GRIDS)
def test_dense_and_gather_agree_with_natten_fp32(height, width, kernel_size, natten_calls):
    batch, heads, dim, scale = 2, 3, 16, 0.35
    q, k, v = random_qkv(batch, heads, height * width, dim, seed=10 * kernel_size + height)
    with torch.no_grad():  # NATTEN's CPU path is forward only
        natten = A.windowed_attention(q, k, v, height, width, kernel_size, scale, backend="natten")
        dense = A.windowed_attention(q, k, v, height, width, kernel_size, scale, backend="dense")
        gather = A.windowed_attention(q, k, v, height, width, kernel_size, scale, backend="gather")
    # NATTEN itself ran, on the official code's heads-last layout, with the window clipped per axis
    assert natten_calls == [((batch, height, width, heads, dim), (min(kernel_size, height), min(kernel_size, width)))]
    assert natten.shape == q.shape and natten.dtype == torch.float32
    assert (dense - natten).abs().max() < 1e-5
    assert (gather - natten).abs().max() < 1e-5
    reference = reference_attention(q, k, v, scale, brute_force_mask(height, width, kernel_size))
    assert (natten.double() - reference).abs().max() < 1e-5


@needs_natten
@quiet_flex
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_natten_agrees_with_dense_in_half_precision(dtype):
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    height, width, kernel_size = 16, 16, 7
    for device in devices:
        q, k, v = (t.to(device) for t in random_qkv(2, 2, height * width, 32, dtype=dtype))
        with torch.no_grad():
            dense = A.windowed_attention(q, k, v, height, width, kernel_size, 0.5, backend="dense")
            natten = A.windowed_attention(q, k, v, height, width, kernel_size, 0.5, backend="natten")
        assert natten.dtype == dtype
        assert (natten.float() - dense.float()).abs().max() < 2e-2


@needs_natten
def test_natten_falls_back_to_tiles_where_a_window_is_one_wide(natten_calls):
    """A 1-wide axis (or k = 1) has no NATTEN kernel (it wants >= 2); the result is the same attention."""
    for height, width, kernel_size in ((1, 7, 3), (6, 5, 1)):
        q, k, v = random_qkv(1, 2, height * width, 8, seed=height)
        with torch.no_grad():
            natten = A.windowed_attention(q, k, v, height, width, kernel_size, 1.0, backend="natten")
        reference = reference_attention(q, k, v, 1.0, brute_force_mask(height, width, kernel_size))
        assert (natten.double() - reference).abs().max() < 1e-5
    assert natten_calls == []


@needs_natten
@quiet_flex
def test_natten_on_cpu_refuses_what_it_cannot_run_with_a_clear_error():
    q, k, v = random_qkv(1, 2, 64, 8)
    with pytest.raises(ValueError, match=r"'natten' has no kernel .* that need gradients; on the CPU NATTEN runs "
                                         r"forward only .* use backend 'dense' or 'gather'"):
        A.windowed_attention(q.requires_grad_(), k, v, 8, 8, 3, 1.0, backend="natten")
    with pytest.raises(ValueError, match=r"no kernel for torch.float64 tensors on cpu with head dim 8;"):
        A.windowed_attention(q.detach().double(), k.double(), v.double(), 8, 8, 3, 1.0, backend="natten")
    q, k, v = random_qkv(1, 2, 64, 12)
    with pytest.raises(ValueError, match=r"head dim 12;.*head dims a power of two from 8 to 512"):
        A.windowed_attention(q, k, v, 8, 8, 3, 1.0, backend="natten")


@needs_natten
@quiet_flex
def test_mvar_logits_with_natten_equal_dense(tiny_transformer, tiny_tokenizer, natten_calls):
    """The whole model in MVAR mode: NATTEN on the windowed scales gives the dense backend's logits."""
    from mvar.config import AttentionMode

    from .conftest import random_tokens

    cfg = tiny_transformer.cfg
    tokens = random_tokens(cfg.patch_nums, cfg.vocab_size, batch=2, seed=9)
    labels = torch.tensor([3, cfg.null_class])
    inputs = tiny_tokenizer.teacher_forcing_inputs(tokens)
    with torch.no_grad():
        logits = {backend: tiny_transformer(labels, inputs, AttentionMode.mvar(backend=backend))
                  for backend in ("natten", "dense", "gather")}
    # NATTEN ran in every block on each windowed scale (13x13 and 16x16), heads last
    heads, dim = cfg.num_heads, cfg.head_dim
    windowed = [cfg.patch_nums[s] for s in range(AttentionMode.mvar().refine_step, len(cfg.patch_nums))]
    assert sorted(natten_calls) == sorted(((2, side, side, heads, dim), (7, 7)) for side in windowed
                                          for _ in range(cfg.depth))
    assert logits["natten"].shape == (2, sum(p * p for p in cfg.patch_nums), cfg.vocab_size)
    assert (logits["natten"] - logits["dense"]).abs().max() < 1e-4
    assert (logits["gather"] - logits["natten"]).abs().max() < 1e-4
    # and the windows matter: VAR's logits on these scales are far from them
    var = tiny_transformer(labels, inputs, AttentionMode.var())
    assert (var - logits["natten"]).abs().max() > 1e-2
