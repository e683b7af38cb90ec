import math
from pathlib import Path

import pytest
import torch

from mvar.config import MVAR_MODE, VAR_MODE, AttentionMode
from mvar.previews import PreviewBudget, Previews
from mvar.sampling import (
    SamplingConfig,
    decode_to_unit,
    filter_logits,
    generate,
    generate_steps,
    normalize_seed,
    sample_tokens,
)

SETTINGS = SamplingConfig(cfg=2.0, top_k=20, top_p=0.9)


@pytest.mark.parametrize("mode", [VAR_MODE, MVAR_MODE], ids=["var", "mvar"])
def test_same_seed_same_tokens_and_batch_independence(tiny_transformer, tiny_tokenizer, mode):
    first = generate(tiny_transformer, tiny_tokenizer, [1, 2, 3], seeds=[10, 11, 12], sampling=SETTINGS, mode=mode)
    again = generate(tiny_transformer, tiny_tokenizer, [1, 2, 3], seeds=[10, 11, 12], sampling=SETTINGS, mode=mode)
    assert all(torch.equal(a, b) for a, b in zip(first.tokens, again.tokens, strict=True))
    assert torch.equal(first.images, again.images)
    alone = generate(tiny_transformer, tiny_tokenizer, [2], seeds=[11], sampling=SETTINGS, mode=mode)
    assert all(torch.equal(a[1:2], b) for a, b in zip(first.tokens, alone.tokens, strict=True))
    other = generate(tiny_transformer, tiny_tokenizer, [2], seeds=[99], sampling=SETTINGS, mode=mode)
    assert not all(torch.equal(a, b) for a, b in zip(other.tokens, alone.tokens, strict=True))
    assert first.images.shape == (3, 3, 64, 64) and first.images.min() >= 0 and first.images.max() <= 1


def test_step_iterator_yields_every_scale_with_previews(tiny_transformer, tiny_tokenizer):
    steps = list(generate_steps(tiny_transformer, tiny_tokenizer, [0, 1], seeds=5, sampling=SETTINGS,
                                mode=MVAR_MODE, previews=True))
    assert [s.scale for s in steps] == list(range(10))
    assert [s.tokens.shape for s in steps] == [(2, p * p) for p in tiny_transformer.cfg.patch_nums]
    assert all(s.preview.shape == (2, 3, 64, 64) and s.seconds > 0 for s in steps)
    # the accumulated map after the last scale is what the tokens imply
    f_hats = tiny_tokenizer.tokens_to_fhats([s.tokens for s in steps])
    torch.testing.assert_close(steps[-1].f_hat, f_hats[-1], atol=1e-5, rtol=1e-5)
    # an int seed means seed + i for sample i
    single = list(generate_steps(tiny_transformer, tiny_tokenizer, [1], seeds=6, sampling=SETTINGS, mode=MVAR_MODE))
    assert torch.equal(single[-1].tokens[0], steps[-1].tokens[1])


def test_attention_capture_records_only_requested_rows(tiny_transformer, tiny_tokenizer):
    schedule = tiny_transformer.schedule
    last = schedule.num_scales - 1
    for mode in (VAR_MODE, MVAR_MODE):
        steps = list(generate_steps(tiny_transformer, tiny_tokenizer, [1, 2], seeds=0, sampling=SETTINGS,
                                    mode=mode, capture_layers=[1], capture_queries={last: [0, 255], 2: None}))
        captured = steps[last].attention[1]
        keys = schedule.end(last) if not mode.markov else schedule.tokens(last)
        assert captured.shape == (2, tiny_transformer.cfg.num_heads, 2, keys)
        torch.testing.assert_close(captured.sum(-1), torch.ones(2, 2, 2))
        assert steps[2].attention[1].shape[2] == 9 and steps[3].attention is None
        if mode.markov:
            # the corner token's weights live in its 7x7 window at the grid's corner
            grid = captured[0, 0, 0].view(16, 16)
            assert grid[:7, :7].sum() == pytest.approx(1.0, abs=1e-5)
            assert (grid[:7, :7] > 0).all()
        else:
            assert captured[0, 0, 0, :schedule.begin(last)].sum() > 0  # earlier scales are visible


def test_cfg_zero_runs_no_unconditional_branch_and_is_still_deterministic(tiny_transformer, tiny_tokenizer):
    plain = SamplingConfig(cfg=0.0)
    a = generate(tiny_transformer, tiny_tokenizer, [1], seeds=3, sampling=plain, mode=VAR_MODE)
    b = generate(tiny_transformer, tiny_tokenizer, [1], seeds=3, sampling=plain, mode=VAR_MODE)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))


def test_smoothing_and_bf16_paths_run(tiny_transformer, tiny_tokenizer):
    smooth = SamplingConfig(cfg=1.0, smooth=True)
    out = generate(tiny_transformer, tiny_tokenizer, [0], seeds=1, sampling=smooth, mode=MVAR_MODE)
    assert torch.isfinite(out.images).all()
    out = generate(tiny_transformer, tiny_tokenizer, [0, 1], seeds=1, sampling=SETTINGS, mode=VAR_MODE,
                   dtype=torch.bfloat16)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.01)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_k=0, top_p=1.0)).any()


def test_inverse_cdf_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).repeat(5, 1)
    picks = sample_tokens(probs, torch.tensor([0.0, 0.25, 0.5, 0.75, 0.999999]))
    assert picks.tolist() == [1, 1, 3, 3, 3]


def test_seed_normalisation():
    assert normalize_seed(-1) == 2**63 - 1
    assert normalize_seed(2**70) == (2**70) % 2**63
    assert normalize_seed(5.0) == 5
    for bad in ("abc", 1.5, None, float("nan")):
        with pytest.raises(ValueError, match="seed must be an integer"):
            normalize_seed(bad)


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels=[13]), r"class id \(12 = unconditional\) must be an integer in 0..12, got 13"),
    (dict(labels=[-1]), "class id .* got -1"),
    (dict(labels=[]), "class ids must name at least one value"),
    (dict(labels=torch.tensor([1.0])), "class ids must be a sequence of integers"),
    (dict(labels="1"), "class ids must be a sequence of integers"),
    (dict(dtype="bf16"), "dtype must be None, torch.float32"),
    (dict(sampling=dict(cfg=1.5)), "sampling must be a SamplingConfig"),
    (dict(mode="mvar"), "mode must be an AttentionMode"),
    (dict(capture_layers=[0], capture_queries=[0]), "capture_queries must be a Mapping"),
    (dict(capture_layers=[0], capture_queries={10: None}), "capture_queries key must be an integer in 0..9"),
    (dict(sampling=SamplingConfig(top_k=-1)), "top_k"),
    (dict(sampling=SamplingConfig(top_k=10_000)), "top_k"),
    (dict(sampling=SamplingConfig(top_p=0.0)), "top_p"),
    (dict(sampling=SamplingConfig(top_p=1.5)), "top_p"),
    (dict(sampling=SamplingConfig(cfg=-1.0)), "cfg"),
    (dict(sampling=SamplingConfig(cfg=float("nan"))), "cfg"),
    (dict(labels=[0] * 9, max_batch=8), "exceeds the limit"),
    (dict(seeds=[1, 2]), "2 seeds for 1 labels"),
    (dict(capture_layers=[7], capture_queries={0: None}), "capture layers"),
    (dict(capture_layers=[0], capture_queries={2: [9]}), "query tokens of scale 2"),
])
def test_bad_arguments_raise_value_errors(tiny_transformer, tiny_tokenizer, kwargs, message):
    args = dict(labels=[1], seeds=0, sampling=SETTINGS, mode=MVAR_MODE) | kwargs
    with pytest.raises(ValueError, match=message):
        list(generate_steps(tiny_transformer, tiny_tokenizer, **args))


def test_schedule_mismatch_between_tokenizer_and_transformer_is_refused(tiny_transformer):
    from mvar.config import TokenizerConfig
    from mvar.tokenizer import MultiScaleVQVAE
    other = MultiScaleVQVAE(TokenizerConfig(vocab_size=32, latent_channels=8, channels=32, channel_mult=(1, 1, 1),
                                            num_res_blocks=1, image_size=64, patch_nums=(1, 2, 4, 8, 16)))
    with pytest.raises(ValueError, match="does not match"):
        list(generate_steps(tiny_transformer, other, [1], mode=AttentionMode.mvar()))


@pytest.mark.parametrize("smooth", [False, True])
def test_sampling_in_chunks_gives_the_same_samples(tiny_transformer, tiny_tokenizer, monkeypatch, smooth):
    import mvar.sampling

    settings = SamplingConfig(cfg=2.0, top_k=20, top_p=0.9, smooth=smooth)
    whole = generate(tiny_transformer, tiny_tokenizer, [1, 2, 3, 4, 5], seeds=7, sampling=settings, mode=MVAR_MODE)
    monkeypatch.setattr(mvar.sampling, "SAMPLING_CHUNK_ELEMENTS", 1)  # one sample per chunk
    chunked = generate(tiny_transformer, tiny_tokenizer, [1, 2, 3, 4, 5], seeds=7, sampling=settings, mode=MVAR_MODE)
    assert all(torch.equal(a, b) for a, b in zip(whole.tokens, chunked.tokens, strict=True))
    torch.testing.assert_close(whole.images, chunked.images)


@pytest.mark.parametrize("mode", [VAR_MODE, MVAR_MODE], ids=["var", "mvar"])
def test_bf16_weights_match_bf16_autocast(tiny_preset, tiny_tokenizer, mode):
    """set_precision stores the weights autocast would produce, so generation barely changes."""
    import copy

    from mvar.sampling import set_precision
    from mvar.transformer import ScaleTransformer
    from tests.conftest import scramble

    transformer = scramble(ScaleTransformer(tiny_preset.transformer), seed=4).eval()
    tokenizer = copy.deepcopy(tiny_tokenizer)
    autocast = generate(transformer, tokenizer, [1, 2], seeds=3, sampling=SETTINGS, mode=mode, dtype=torch.bfloat16)
    set_precision(transformer, tokenizer, torch.bfloat16)
    assert transformer.head.weight.dtype == tokenizer.decoder.conv_out.weight.dtype == torch.bfloat16
    assert tokenizer.quantize.embedding.weight.dtype == torch.float32  # f_hat accumulates in fp32
    stored = generate(transformer, tokenizer, [1, 2], seeds=3, sampling=SETTINGS, mode=mode)  # dtype from weights
    agree = torch.cat([(a == b).flatten() for a, b in zip(autocast.tokens, stored.tokens, strict=True)])
    assert agree.float().mean() > 0.9
    assert stored.images.dtype == torch.float32 and stored.images.min() >= 0 and stored.images.max() <= 1
    with pytest.raises(ValueError, match="stored in torch.bfloat16"):
        generate(transformer, tokenizer, [1], sampling=SETTINGS, mode=mode, dtype=torch.float16)
    set_precision(transformer, tokenizer, None)
    assert transformer.head.weight.dtype == torch.float32


def test_decode_picks_its_chunk_from_the_image_size(tiny_tokenizer):
    f_hat = torch.randn(5, tiny_tokenizer.cfg.latent_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tiny_tokenizer.decode(f_hat), tiny_tokenizer.decode(f_hat, chunk_size=1),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [0, 1, 5, 31, 32])
@pytest.mark.parametrize("top_p", [1.0, 0.999, 0.5, 0.05])
def test_filter_logits_matches_the_definition(top_k, top_p):
    """Reference: mask below the k-th best, then drop tokens once the sorted mass before them reaches top_p."""
    logits = torch.randn(50, 32, generator=torch.Generator().manual_seed(top_k))
    expected = logits.clone()
    if 0 < top_k < 32:
        expected[expected < expected.topk(top_k).values[:, -1:]] = float("-inf")
    for row in expected:
        probs = row.softmax(-1)
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]
        row[order[before >= top_p]] = float("-inf")
    assert torch.equal(filter_logits(logits, top_k, top_p), expected)


def test_channels_last_decoder_decodes_the_same(tiny_tokenizer, tiny_transformer):
    import copy

    from mvar.sampling import set_precision

    tokenizer, transformer = copy.deepcopy(tiny_tokenizer), copy.deepcopy(tiny_transformer)
    set_precision(transformer, tokenizer, None)  # fp32, decoder stored channels-last
    assert tokenizer.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    f_hat = torch.randn(3, tokenizer.cfg.latent_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tokenizer.decode(f_hat), tiny_tokenizer.decode(f_hat), atol=1e-5, rtol=1e-5)


def test_previews_of_the_first_samples_only(tiny_transformer, tiny_tokenizer):
    steps = list(generate_steps(tiny_transformer, tiny_tokenizer, [0, 1, 2], seeds=5, sampling=SETTINGS,
                                mode=MVAR_MODE, previews=True, preview_samples=1))
    assert all(s.preview.shape == (1, 3, 64, 64) for s in steps)
    full = list(generate_steps(tiny_transformer, tiny_tokenizer, [0, 1, 2], seeds=5, sampling=SETTINGS,
                               mode=MVAR_MODE, previews=True))
    torch.testing.assert_close(steps[-1].preview[0], full[-1].preview[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="preview_samples"):
        next(generate_steps(tiny_transformer, tiny_tokenizer, [0], previews=True, preview_samples=0))


def test_arguments_are_checked_when_called_not_at_the_first_step(tiny_transformer, tiny_tokenizer):
    with pytest.raises(ValueError, match="top_p"):
        generate_steps(tiny_transformer, tiny_tokenizer, [0], sampling=SamplingConfig(top_p=2.0))  # no next()
    with pytest.raises(ValueError, match="class id"):
        generate_steps(tiny_transformer, tiny_tokenizer, [99])


def test_previews_are_the_full_decodes_of_the_partial_maps(tiny_transformer, tiny_tokenizer):
    steps = list(generate_steps(tiny_transformer, tiny_tokenizer, [3, 4], seeds=2, sampling=SETTINGS, mode=MVAR_MODE,
                                previews=True))
    for step in steps:
        assert step.preview.shape == (2, 3, 64, 64) and 0 <= step.preview.min() <= step.preview.max() <= 1
        assert 0 < step.preview_seconds < step.seconds and step.capture_seconds == 0
        assert step.generation_seconds == pytest.approx(step.seconds - step.preview_seconds)
        assert torch.equal(step.preview, decode_to_unit(tiny_tokenizer, step.f_hat))


def _budget_run(transformer, tokenizer, budget, **kwargs):
    return list(generate_steps(transformer, tokenizer, [3], seeds=2, sampling=SETTINGS, mode=MVAR_MODE,
                               previews=True, preview_budget=budget, **kwargs))


def test_a_preview_budget_decodes_what_fits_and_always_the_last_scale(tiny_transformer, tiny_tokenizer):
    everything = _budget_run(tiny_transformer, tiny_tokenizer, None)
    # nothing measured yet: the first scale is decoded (it measures the cost); with share 0 nothing else but the last
    budget = PreviewBudget(share=0)
    steps = _budget_run(tiny_transformer, tiny_tokenizer, budget)
    assert [s.preview is not None for s in steps] == [True] + [False] * 8 + [True]
    assert budget.decode_seconds > 0 and all(s.preview_seconds == 0 for s in steps[1:-1])
    # measured now: a later stream skips the first scale too
    steps = _budget_run(tiny_transformer, tiny_tokenizer, budget)
    assert [s.preview is not None for s in steps] == [False] * 9 + [True]
    assert torch.equal(steps[-1].preview, everything[-1].preview)
    # a large share decodes every scale, the same images as without a budget
    steps = _budget_run(tiny_transformer, tiny_tokenizer, PreviewBudget(share=1e9, decode_seconds=1.0))
    assert all(torch.equal(s.preview, e.preview) for s, e in zip(steps, everything, strict=True))
    # in between: a scale is decoded when the previews so far plus one more decode fit in share x generation time
    budget = PreviewBudget(share=0.5, decode_seconds=0.01)
    assert budget.allows(1.0, 0.49, last=False) and not budget.allows(1.0, 0.495, last=False)
    assert budget.allows(0.0, 9.0, last=True)
    budget.measured(0.03)  # slower: counts at once
    assert budget.decode_seconds == 0.03
    budget.measured(0.01)  # faster: halfway
    assert budget.decode_seconds == pytest.approx(0.02)
    for bad in (dict(share=-1), dict(share=float("nan")), dict(share="1"), dict(decode_seconds=-1.0)):
        with pytest.raises(ValueError):
            PreviewBudget(**bad)
    with pytest.raises(ValueError, match="preview_budget"):
        generate_steps(tiny_transformer, tiny_tokenizer, [0], preview_budget=PreviewBudget())  # no previews


def test_previews_decode_a_scale_when_first_asked_for_and_keep_it(tiny_transformer, tiny_tokenizer):
    import pickle

    everything = list(generate_steps(tiny_transformer, tiny_tokenizer, [3, 5], seeds=2, sampling=SETTINGS,
                                     mode=MVAR_MODE, previews=True))
    previews = Previews()
    for step in generate_steps(tiny_transformer, tiny_tokenizer, [3, 5], seeds=2, sampling=SETTINGS, mode=MVAR_MODE,
                               previews=True, preview_samples=1, preview_budget=PreviewBudget(share=0)):
        previews.add(step.f_hat, step.preview)
    assert previews.num_scales == 10 and previews.num_samples == 2 and previews.seconds == 0
    assert [previews.is_decoded(s, 0) for s in range(10)] == [True] + [False] * 8 + [True]
    assert not previews.is_decoded(9, 1)
    kept = pickle.loads(pickle.dumps(previews))  # CPU tensors only: it can cross a process boundary
    image = previews.image(tiny_tokenizer, 4, 1)
    assert previews.seconds > 0 and previews.is_decoded(4, 1) and previews.image(tiny_tokenizer, 4, 1) is image
    for sample in (0, 1):  # the lazy decodes are the stream's, sample by sample
        strip = kept.images(tiny_tokenizer, sample)
        assert strip.shape == (10, 3, 64, 64)
        for scale, step in enumerate(everything):
            torch.testing.assert_close(strip[scale], step.preview[sample], atol=1e-6, rtol=0)
    assert kept.nbytes == sum(m.nbytes for m in kept.maps) + 20 * 3 * 64 * 64 * 4
    for scale, sample in ((10, 0), (0, 2), (-1, 0), (1.0, 0)):
        with pytest.raises(ValueError):
            previews.image(tiny_tokenizer, scale, sample)
    with pytest.raises(ValueError, match="map"):
        previews.add(everything[0].f_hat[:1])
    with pytest.raises(ValueError, match="dtype"):
        Previews("bf16")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).square().mean())
    return float("inf") if mse == 0 else -10 * math.log10(mse)


@pytest.mark.parametrize("precision", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_previews_of_the_default_models_show_what_the_partial_map_decodes_to(precision):
    """Issue 17: at every scale, in both modes, a preview (streamed or decoded later) is within 30 dB PSNR of the
    tokenizer's full fp32 decode of the same partial map (previews decoded at the scale's own side measured
    14.7-22 dB)."""
    import copy

    from mvar.checkpoints import load_model
    from mvar.sampling import set_precision

    assets = Path(__file__).resolve().parent.parent / "assets"
    tokenizer = load_model(assets / "tokenizer.safetensors", expect="tokenizer").model.eval().requires_grad_(False)
    for name, mode in (("var", VAR_MODE), ("mvar", AttentionMode.mvar(8, 7))):
        transformer = load_model(assets / f"{name}.safetensors", expect="transformer").model.eval()
        run_tokenizer = copy.deepcopy(tokenizer)
        if precision is not None:
            set_precision(transformer, run_tokenizer, precision)
        previews = Previews(precision)
        for step in generate_steps(transformer, run_tokenizer, [4, 7], seeds=[3, 8], sampling=SamplingConfig(cfg=1.5),
                                   mode=mode, previews=True, preview_samples=1, dtype=precision,
                                   preview_budget=PreviewBudget(share=0.5)):
            previews.add(step.f_hat, step.preview)
        assert previews.is_decoded(9, 0)
        for scale, f_hat in enumerate(previews.maps):
            reference = decode_to_unit(tokenizer, f_hat)  # fp32
            for sample in (0, 1):
                measured = _psnr(previews.image(run_tokenizer, scale, sample), reference[sample])
                assert measured >= 30, f"{name} scale {scale + 1} sample {sample}: {measured:.1f} dB"


@pytest.mark.parametrize("mode", [VAR_MODE, MVAR_MODE])
def test_capture_of_one_sample_equals_its_rows_of_the_full_capture(tiny_transformer, tiny_tokenizer, mode):
    queries = dict.fromkeys(range(10))
    both = list(generate_steps(tiny_transformer, tiny_tokenizer, [1, 2], seeds=4, sampling=SETTINGS, mode=mode,
                               capture_layers=[0, 1], capture_queries=queries))
    second = list(generate_steps(tiny_transformer, tiny_tokenizer, [1, 2], seeds=4, sampling=SETTINGS, mode=mode,
                                 capture_layers=[0, 1], capture_queries=queries, capture_samples=[1]))
    for a, b in zip(both, second, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert b.capture_seconds > 0
        for layer in (0, 1):
            assert b.attention[layer].shape[0] == 1
            torch.testing.assert_close(b.attention[layer][0], a.attention[layer][1])
    with pytest.raises(ValueError, match="capture_samples"):
        generate_steps(tiny_transformer, tiny_tokenizer, [1, 2], capture_layers=[0], capture_queries=queries,
                       capture_samples=[2])


def test_the_sampler_checks_against_the_shared_ranges(tiny_transformer):
    from mvar import ranges

    vocab = tiny_transformer.cfg.vocab_size
    edge = SamplingConfig(cfg=ranges.CFG_MAX, top_k=ranges.top_k_max(vocab), top_p=ranges.TOP_P_MAX)
    assert edge.validate(vocab) == edge
    assert SamplingConfig(cfg=ranges.CFG_MIN, top_k=ranges.TOP_K_MIN, top_p=1e-9).validate(vocab).top_k == 0
    for bad, message in ((dict(cfg=ranges.CFG_MAX + 0.5), "cfg must be a number in \\[0.0, 10.0\\]"),
                         (dict(top_k=vocab + 1), f"top_k must be an integer in 0..{vocab}"),
                         (dict(top_p=ranges.TOP_P_MIN), "top_p must be a number in \\(0.0, 1.0\\]")):
        with pytest.raises(ValueError, match=message):
            SamplingConfig(**bad).validate(vocab)
    assert normalize_seed(ranges.SEED_MAX) == ranges.SEED_MAX and normalize_seed(ranges.SEED_MAX + 1) == 0
    assert ranges.kernel_sizes(16) == (1, 3, 5, 7, 9, 11, 13, 15) and ranges.refine_step_max(10) == 10
