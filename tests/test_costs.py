import pytest
import torch

from mvar.config import MVAR_MODE, PRESETS, VAR_MODE, AttentionMode
from mvar.costs import flop_counter, generation_cost, parameter_count, teacher_forced_flops
from mvar.transformer import ScaleTransformer

from .conftest import random_tokens


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_is_exact(name):
    with torch.device("meta"):
        model = ScaleTransformer(PRESETS[name].transformer)
    assert parameter_count(model.cfg) == model.num_parameters


def _counted(fn) -> int:
    counter = flop_counter()
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", [VAR_MODE, AttentionMode.mvar(backend="dense")], ids=["var", "mvar"])
def test_generation_flops_match_the_flop_counter(tiny_transformer, tiny_tokenizer, mode):
    rows = 4
    tokens = random_tokens(tiny_transformer.cfg.patch_nums, tiny_transformer.cfg.vocab_size, batch=rows)
    f_hats = tiny_tokenizer.tokens_to_fhats(tokens)
    inputs = [None] + [tiny_tokenizer.scale_input(f_hats[s - 1], s) for s in range(1, 10)]
    labels = torch.arange(rows)

    def run():
        cond = tiny_transformer.class_condition(labels)
        cache = None if mode.markov else tiny_transformer.new_kv_cache(rows)
        for scale in range(10):
            x = tiny_transformer.embed_scale(scale, cond, inputs[scale])
            plan = tiny_transformer.plan_for(mode, [scale], cached=cache is not None)
            tiny_transformer.logits(tiny_transformer.run_blocks(x, cond, plan, cache), cond)

    counted = _counted(run)
    model = generation_cost(tiny_transformer.cfg, mode, batch=rows, cfg_guidance=False, windowed_as_dense=True)
    assert abs(model.flops - counted) / counted < 0.02


@pytest.mark.parametrize("mode,scales", [(VAR_MODE, (0, 9)), (AttentionMode.mvar(backend="dense"), (0, 7)),
                                         (AttentionMode.mvar(backend="dense"), (9, 9))])
def test_teacher_forced_flops_match_the_flop_counter(tiny_transformer, tiny_tokenizer, mode, scales):
    tokens = random_tokens(tiny_transformer.cfg.patch_nums, tiny_transformer.cfg.vocab_size, batch=2)
    inputs = tiny_tokenizer.teacher_forcing_inputs(tokens)
    counted = _counted(lambda: tiny_transformer(torch.tensor([0, 1]), inputs, mode, *scales))
    model = teacher_forced_flops(tiny_transformer.cfg, mode, 2, *scales, windowed_as_dense=True)
    assert abs(model - counted) / counted < 0.02


def test_mvar_needs_no_kv_cache_and_less_attention():
    cfg = PRESETS["d16"].transformer
    var = generation_cost(cfg, VAR_MODE, batch=32, dtype="bf16")
    mvar = generation_cost(cfg, MVAR_MODE, batch=32, dtype="bf16")
    # 2 (k and v) x 16 layers x 64 rows x 680 tokens x 1024 channels x 2 bytes
    assert var.kv_cache_bytes == 2 * 16 * 64 * 680 * 1024 * 2
    assert mvar.kv_cache_bytes == 0 and all(s.kv_cache_bytes == 0 for s in mvar.scales)
    assert mvar.attention_flops < var.attention_flops / 5
    assert mvar.scales[9].keys_per_query == 49 and var.scales[9].keys_per_query == 680
    assert mvar.peak_memory_estimate < var.peak_memory_estimate
    # everything but attention is identical
    assert var.flops - var.attention_flops == mvar.flops - mvar.attention_flops


def test_kv_cache_model_equals_allocated_bytes(tiny_transformer):
    cache = tiny_transformer.new_kv_cache(batch=6, dtype=torch.bfloat16)
    cost = generation_cost(tiny_transformer.cfg, VAR_MODE, batch=3, cfg_guidance=True, dtype=torch.bfloat16)
    assert cache.allocated_bytes == cost.kv_cache_bytes


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        generation_cost(PRESETS["tiny"].transformer, VAR_MODE, batch=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        generation_cost(PRESETS["tiny"].transformer, VAR_MODE, dtype="int3")
