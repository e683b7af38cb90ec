import json
from pathlib import Path

import pytest
import torch

from mvar.attention import neighborhood_mask
from mvar.config import MVAR_MODE, VAR_MODE, AttentionMode, TransformerConfig, official_transformer
from mvar.transformer import ScaleTransformer

from .conftest import random_tokens

LAYOUT = json.loads((Path(__file__).parent / "data" / "official_layout.json").read_text())
OFFICIAL_BUFFERS = {"lvl_1L", "attn_bias_for_masking"}


def stepwise_logits(transformer, tokenizer, labels, tokens, mode):
    """Inference path (one scale at a time, KV cache in VAR mode) on given tokens: (B, L, V)."""
    cond = transformer.class_condition(labels)
    cache = None if mode.markov else transformer.new_kv_cache(len(labels))
    f_hats = tokenizer.tokens_to_fhats(tokens)
    outputs = []
    for scale in range(transformer.schedule.num_scales):
        scale_input = None if scale == 0 else tokenizer.scale_input(f_hats[scale - 1], scale)
        x = transformer.embed_scale(scale, cond, scale_input)
        plan = transformer.plan_for(mode, [scale], cached=cache is not None)
        outputs.append(transformer.logits(transformer.run_blocks(x, cond, plan, cache), cond))
    return torch.cat(outputs, dim=1)


def test_official_layout_matches_var_d16_key_for_key():
    with torch.device("meta"):
        model = ScaleTransformer(official_transformer(16))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k: v for k, v in LAYOUT["transformer_d16"].items()
                if k not in OFFICIAL_BUFFERS and not k.endswith("zero_k_bias")}
    assert ours == official
    # the buffers we derive instead of storing are exactly the official file's extras
    extras = set(LAYOUT["transformer_d16"]) - set(ours)
    assert extras == OFFICIAL_BUFFERS | {f"blocks.{i}.attn.zero_k_bias" for i in range(16)}


@pytest.mark.parametrize("depth,millions", [(16, 310), (20, 600), (24, 1000), (30, 2000)])
def test_official_presets_have_the_published_sizes(depth, millions):
    with torch.device("meta"):
        model = ScaleTransformer(official_transformer(depth))
    assert abs(model.num_parameters / 1e6 - millions) / millions < 0.06


def test_var_kv_cached_inference_equals_teacher_forcing(tiny_transformer, tiny_tokenizer):
    tokens = random_tokens(tiny_transformer.cfg.patch_nums, tiny_transformer.cfg.vocab_size, batch=2)
    labels = torch.tensor([1, tiny_transformer.cfg.null_class])
    with torch.no_grad():
        teacher = tiny_transformer(labels, tiny_tokenizer.teacher_forcing_inputs(tokens), VAR_MODE)
        stepwise = stepwise_logits(tiny_transformer, tiny_tokenizer, labels, tokens, VAR_MODE)
    assert teacher.shape == (2, 680, tiny_transformer.cfg.vocab_size)
    torch.testing.assert_close(stepwise, teacher, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_mvar_inference_equals_teacher_forcing(tiny_transformer, tiny_tokenizer, backend):
    mode = AttentionMode.mvar(backend=backend)
    tokens = random_tokens(tiny_transformer.cfg.patch_nums, tiny_transformer.cfg.vocab_size, batch=2, seed=5)
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        teacher = tiny_transformer(labels, tiny_tokenizer.teacher_forcing_inputs(tokens), mode)
        stepwise = stepwise_logits(tiny_transformer, tiny_tokenizer, labels, tokens, mode)
        # a forward over one windowed scale alone gives that scale's slice
        only_13 = tiny_transformer(labels, tiny_tokenizer.teacher_forcing_inputs(tokens), mode, 8, 8)
    torch.testing.assert_close(stepwise, teacher, atol=2e-5, rtol=1e-4)
    begin, end = tiny_transformer.schedule.begin(8), tiny_transformer.schedule.end(8)
    torch.testing.assert_close(only_13, teacher[:, begin:end], atol=2e-5, rtol=1e-4)


def test_var_and_mvar_differ_on_the_same_weights(tiny_transformer, tiny_tokenizer):
    tokens = random_tokens(tiny_transformer.cfg.patch_nums, tiny_transformer.cfg.vocab_size, batch=1, seed=6)
    inputs = tiny_tokenizer.teacher_forcing_inputs(tokens)
    labels = torch.tensor([2])
    with torch.no_grad():
        var = tiny_transformer(labels, inputs, VAR_MODE)
        mvar = tiny_transformer(labels, inputs, MVAR_MODE)
    assert torch.allclose(var[:, :1], mvar[:, :1], atol=1e-6)  # scale 0 attends only to itself either way
    assert not torch.allclose(var[:, 1:], mvar[:, 1:], atol=1e-3)


def _logits_after_perturbing(transformer, inputs, labels, mode, positions):
    """Teacher-forced logits after changing the inputs at flat sequence positions (>= 1)."""
    changed = inputs.clone()
    for position in positions:
        changed[:, position - 1] += 1.0  # inputs exclude scale 0's single token
    with torch.no_grad():
        return transformer(labels, changed, mode)


def test_mvar_queries_ignore_tokens_outside_their_scale_and_window(tiny_transformer, tiny_tokenizer):
    schedule = tiny_transformer.schedule
    tokens = random_tokens(schedule.patch_nums, tiny_transformer.cfg.vocab_size, batch=1, seed=7)
    inputs = tiny_tokenizer.teacher_forcing_inputs(tokens)
    labels = torch.tensor([1])
    with torch.no_grad():
        base = tiny_transformer(labels, inputs, MVAR_MODE)
    last = schedule.num_scales - 1  # 16x16, windowed with k = 7
    begin = schedule.begin(last)
    query = begin + 0  # the corner token (0, 0): its window is rows 0..6, cols 0..6

    outside_scale = _logits_after_perturbing(tiny_transformer, inputs, labels, MVAR_MODE,
                                             range(schedule.begin(last - 1), schedule.end(last - 1)))
    assert torch.equal(outside_scale[:, query], base[:, query])
    # with depth D the query's output depends on its window's windows, D times over
    window = neighborhood_mask(16, 16, 7)
    reach = window[0].clone()
    for _ in range(tiny_transformer.cfg.depth - 1):
        reach = window[reach].any(0)
    outside = [begin + i for i in torch.nonzero(~reach).flatten().tolist()]
    assert len(outside) > 50  # 16x16 grid, 2 layers of 7x7 windows: a 10x10 corner is reachable
    outside_window = _logits_after_perturbing(tiny_transformer, inputs, labels, MVAR_MODE, outside)
    assert torch.equal(outside_window[:, query], base[:, query])
    inside_window = _logits_after_perturbing(tiny_transformer, inputs, labels, MVAR_MODE, [begin + 6 * 16 + 6])
    assert not torch.allclose(inside_window[:, query], base[:, query], atol=1e-4)

    # an early (non-windowed) scale: every token of its own scale matters, no other scale does
    scale = 5
    q5 = schedule.begin(scale)
    other = _logits_after_perturbing(tiny_transformer, inputs, labels, MVAR_MODE,
                                     range(schedule.begin(4), schedule.end(4)))
    assert torch.equal(other[:, q5], base[:, q5])
    same = _logits_after_perturbing(tiny_transformer, inputs, labels, MVAR_MODE, [schedule.end(scale) - 1])
    assert not torch.allclose(same[:, q5], base[:, q5], atol=1e-4)


def test_var_queries_see_earlier_scales_but_not_later(tiny_transformer, tiny_tokenizer):
    schedule = tiny_transformer.schedule
    tokens = random_tokens(schedule.patch_nums, tiny_transformer.cfg.vocab_size, batch=1, seed=8)
    inputs = tiny_tokenizer.teacher_forcing_inputs(tokens)
    labels = torch.tensor([1])
    with torch.no_grad():
        base = tiny_transformer(labels, inputs, VAR_MODE)
    q = schedule.begin(5)
    earlier = _logits_after_perturbing(tiny_transformer, inputs, labels, VAR_MODE, [schedule.begin(2)])
    later = _logits_after_perturbing(tiny_transformer, inputs, labels, VAR_MODE, [schedule.begin(6)])
    assert not torch.allclose(earlier[:, q], base[:, q], atol=1e-4)
    assert torch.equal(later[:, q], base[:, q])


def test_bad_arguments_raise_value_errors(tiny_transformer, tiny_tokenizer):
    tokens = random_tokens(tiny_transformer.cfg.patch_nums, tiny_transformer.cfg.vocab_size, batch=1)
    inputs = tiny_tokenizer.teacher_forcing_inputs(tokens)
    with pytest.raises(ValueError, match="class id out of range"):
        tiny_transformer(torch.tensor([13]), inputs)
    with pytest.raises(ValueError, match="class id out of range"):
        tiny_transformer(torch.tensor([-1]), inputs)
    with pytest.raises(ValueError, match="scale_inputs must be"):
        tiny_transformer(torch.tensor([0]), inputs[:, :10])
    with pytest.raises(ValueError, match="out of range"):
        tiny_transformer(torch.tensor([0]), inputs, VAR_MODE, 0, 10)
    with pytest.raises(ValueError, match="not divisible"):
        TransformerConfig(width=100, num_heads=3)
    with pytest.raises(ValueError, match="odd"):
        AttentionMode.mvar(kernel_size=6)


@pytest.mark.parametrize("mode,scales", [(VAR_MODE, list(range(10))), (MVAR_MODE, list(range(8)))],
                         ids=["var-block-causal", "mvar-block-diagonal"])
def test_segmented_attention_equals_the_dense_masked_reference(tiny_transformer, tiny_tokenizer, mode, scales):
    tokens = random_tokens(tiny_transformer.cfg.patch_nums, tiny_transformer.cfg.vocab_size, batch=2, seed=9)
    inputs = tiny_tokenizer.teacher_forcing_inputs(tokens)
    cond = tiny_transformer.class_condition(torch.tensor([1, 2]))
    offset = 1
    x = torch.cat([tiny_transformer.embed_scale(s, cond, None if s == 0 else
                   inputs[:, tiny_transformer.schedule.begin(s) - offset: tiny_transformer.schedule.end(s) - offset])
                   for s in scales], dim=1)
    with torch.no_grad():
        segmented = tiny_transformer.run_blocks(x, cond, tiny_transformer.plan_for(mode, scales))
        dense = tiny_transformer.run_blocks(x, cond, tiny_transformer.plan_for(mode, scales, dense_mask=True))
    assert tiny_transformer.plan_for(mode, scales).segments is not None
    torch.testing.assert_close(segmented, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("labels", [
    torch.tensor([1.7]), torch.tensor([float("nan")]), torch.tensor([True]), torch.tensor([1.0], dtype=torch.bfloat16),
    [1.7], [True, False], ["3"], [2**70], "abc", None,
])
def test_labels_must_be_integer_class_ids_never_truncated(tiny_transformer, labels):
    with pytest.raises(ValueError, match="labels must be a 1-D tensor of integer class ids"):
        tiny_transformer.check_labels(labels)


def test_integer_labels_of_any_integer_dtype_are_accepted(tiny_transformer):
    for labels in (torch.tensor([1, 12]), torch.tensor([1, 12], dtype=torch.uint8), [1, 12], (1, 12)):
        checked = tiny_transformer.check_labels(labels)
        assert checked.dtype == torch.long and checked.tolist() == [1, 12]
    with pytest.raises(ValueError, match="non-empty 1-D"):
        tiny_transformer.check_labels(torch.ones(2, 2, dtype=torch.long))


@pytest.mark.parametrize("scales,message", [
    ([-1], "out of range"), ([10], "out of range"), ([0, -1], "out of range"), ([1.0], "scale index"),
    ([True], "scale index"), (["0"], "scale index"), ([], "consecutive"), ([0, 2], "consecutive"),
    ([1, 0], "consecutive"), (3, "sequence of scale indices"), ("01", "sequence of scale indices"),
])
@pytest.mark.parametrize("mode", [VAR_MODE, MVAR_MODE], ids=["var", "mvar"])
def test_plan_for_checks_every_scale(tiny_transformer, mode, scales, message):
    with pytest.raises(ValueError, match=message):
        tiny_transformer.plan_for(mode, scales)


def test_plan_for_checks_the_mode(tiny_transformer):
    with pytest.raises(ValueError, match="mode must be an AttentionMode"):
        tiny_transformer.plan_for("var", [0])


@pytest.mark.parametrize("batch", [0, -1, True, 2.0, "2", None, 2**70 * 1.0])
def test_kv_cache_batch_must_be_a_positive_integer(tiny_transformer, batch):
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        tiny_transformer.new_kv_cache(batch)


def test_kv_cache_dtype_must_be_a_float_dtype(tiny_transformer):
    assert tiny_transformer.new_kv_cache(2, torch.bfloat16).keys[0].dtype == torch.bfloat16
    for dtype in ("bf16", torch.int64, torch.bool):
        with pytest.raises(ValueError, match="dtype must be None or a floating-point"):
            tiny_transformer.new_kv_cache(2, dtype)


def test_mvar_mode_from_a_files_extra():
    from mvar.config import AttentionMode

    assert AttentionMode.mvar_from_extra({}) == AttentionMode.mvar()
    saved = {"attention": {"refine_step": 6, "kernel_size": 5}}
    assert AttentionMode.mvar_from_extra(saved) == AttentionMode.mvar(6, 5)
    assert AttentionMode.mvar_from_extra(saved, kernel_size=9) == AttentionMode.mvar(6, 9)
    assert AttentionMode.mvar_from_extra({"attention": "junk"}) == AttentionMode.mvar()
