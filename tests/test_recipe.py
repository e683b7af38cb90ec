"""The official training recipe, as train_transformer and mvar.training implement it.

Weight-decay groups of the d16 preset against VAR's/MVAR's rule (restated here by our parameter
names), the official learning-rate and weight-decay schedules at chosen steps, the 1/L token
weighting, gradient clipping, each preset's defaults, --epochs, --alng and the flags' errors.
Every model here is tiny or on the meta device: the file runs in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mvar.config import AttentionMode, get_preset
from mvar.training import (
    StepSettings,
    TrainingBatch,
    configure_optimizers,
    decays,
    parameter_groups,
    random_tokens,
    token_weights,
    training_step,
)
from mvar.transformer import ScaleTransformer
from train.common import lr_factor, weight_decay_at
from train.train_transformer import build_model, parse_args, resolve_epochs

# ---------------------------------------------------------------------------------------------
# 1. Weight decay as VAR and MVAR do it
# ---------------------------------------------------------------------------------------------


def d16_on_meta() -> ScaleTransformer:
    with torch.device("meta"):  # shapes and names only: no 1.2 GB of weights
        return ScaleTransformer(get_preset("d16").transformer, initialize=False)


def test_d16_weight_decay_groups_follow_the_official_rule():
    model = d16_on_meta()
    names = [name for name, _ in model.named_parameters()]
    # The official rule, restated for our names: exempt are the biases (q_bias and v_bias too),
    # the position tables, the level embedding and the attention temperatures; all else decays,
    # the word and class embeddings included.
    exempt = {n for n in names if n.endswith("bias")} | {"pos_start", "pos_1LC", "lvl_embed.weight"}
    exempt |= {f"blocks.{i}.attn.scale_mul_1H11" for i in range(16)}
    groups = parameter_groups(model)
    assert {n for n, _ in groups["no_decay"]} == exempt
    assert {n for n, _ in groups["decay"]} == set(names) - exempt
    for name in ("word_embed.weight", "class_emb.weight", "head.weight", "head_nm.ada_lin.1.weight",
                 "blocks.3.attn.mat_qkv.weight", "blocks.3.ada_lin.1.weight", "blocks.15.ffn.fc2.weight"):
        assert name in {n for n, _ in groups["decay"]}
    # 5 weight matrices per block, plus word_embed, class_emb, head_nm's AdaLN and the head
    assert len(groups["decay"]) == 5 * 16 + 4
    # per block 6 biases (q, v, proj, fc1, fc2, ada_lin) and scale_mul; 3 more biases (word_embed,
    # head_nm's AdaLN, head); pos_start, pos_1LC, lvl_embed
    assert len(groups["no_decay"]) == len(exempt) == 16 * 7 + 3 + 3
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for _, p in groups["decay"]) + sum(p.numel() for _, p in groups["no_decay"]) == total
    assert 300e6 < total < 320e6


def test_the_rule_on_names_outside_our_model():
    vector, matrix = torch.zeros(3), torch.zeros(3, 3)
    assert not decays("anything", vector)  # every 1-D tensor
    assert not decays("proj.bias", matrix)
    for exempt in ("x.cls_token", "pos_embed", "a.gamma1", "norm.beta", "ada_gss", "moe_bias.w", "scale_mul_1H11"):
        assert not decays(exempt, matrix), exempt
    assert decays("word_embed.weight", matrix) and decays("class_emb.weight", matrix)


def test_configure_optimizers_prints_its_groups(capsys):
    model = ScaleTransformer(get_preset("tiny").transformer)
    optimizer = configure_optimizers(model, lr=1e-3, weight_decay=0.05)
    printed = capsys.readouterr().out
    groups = parameter_groups(model)
    for key, decay in (("decay", 0.05), ("no_decay", 0.0)):
        count, elements = len(groups[key]), sum(p.numel() for _, p in groups[key])
        assert f"{key:8s} (weight decay {decay:g}): {count} tensors, {elements:,} elements" in printed
    assert "blocks.*.attn.scale_mul_1H11" in printed and "word_embed.weight" in printed
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    configure_optimizers(model, lr=1e-3, weight_decay=0.05, log=None)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# 2. The schedule, the defaults of each preset, --epochs and --alng
# ---------------------------------------------------------------------------------------------

# total - 1 - warmup = 1000 steps of decay, so step 20 + 10 * p is p/1000 of the way down
TOTAL, WARMUP = 1021, 20


@pytest.mark.parametrize(("schedule", "step", "expected"), [
    ("lin0", 0, 0.005), ("lin0", 10, 0.005 + 0.995 * 0.5), ("lin0", 20, 1.0),
    ("lin0", 69, 1.0),  # held for the first 5% after the warm-up
    ("lin0", 70, 1.0),  # then linear: 0.1 + 0.9 * (1 - 0.05) / 0.95 = 1 at the start of the fall ...
    ("lin0", 545, 0.1 + 0.9 * 0.475 / 0.95),  # ... 0.55 at 52.5% ...
    ("lin0", 1020, 0.1),  # ... wpe at the last step
    ("lin", 150, 1.0), ("lin", 595, 0.1 + 0.9 * 0.425 / 0.85), ("lin", 1020, 0.1),
    ("lin00", 520, 0.55), ("cos", 520, 0.55), ("cos", 270, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    ("exp", 595, math.sqrt(0.1)), ("exp", 1020, 0.1),
])
def test_official_lr_schedule_values(schedule, step, expected):
    assert lr_factor(schedule, step, TOTAL, WARMUP, wp0=0.005, wpe=0.1) == pytest.approx(expected)


def test_lr_schedule_edges():
    assert lr_factor("lin0", 0, 2, 0, wpe=0.1) == 1.0  # no warm-up: the peak from step 0
    assert lr_factor("lin0", 1, 2, 1, wpe=0.1) == 1.0  # a run of warm-up + 1 step does not divide by zero
    assert lr_factor("lin0", 5000, TOTAL, WARMUP, wpe=0.1) == pytest.approx(0.1)  # past the end: wpe
    lrs = [lr_factor("lin0", s, TOTAL, WARMUP, wpe=0.1) for s in range(TOTAL)]
    assert all(a <= b for a, b in zip(lrs[:WARMUP + 1], lrs[1:WARMUP + 1], strict=False))
    assert all(a >= b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1:], strict=False))
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor("linear", 100, TOTAL, WARMUP)


def test_weight_decay_schedule():
    assert {weight_decay_at(s, 101, 0.05, 0.05) for s in range(101)} == {0.05}  # constant unless twde
    assert weight_decay_at(0, 101, 0.05, 0.08) == pytest.approx(0.05)
    assert weight_decay_at(50, 101, 0.05, 0.08) == pytest.approx(0.065)
    assert weight_decay_at(100, 101, 0.05, 0.08) == pytest.approx(0.08)


def test_official_presets_default_to_the_published_recipe():
    for preset in ("d16", "d20", "d24", "d30"):
        args = parse_args(["--run-dir", "x", "--preset", preset, "--mode", "mvar", "--batch-size", "448",
                           "--steps", "1000"])
        assert args.base_lr == 1e-4 and args.lr == pytest.approx(1e-4 * 448 / 256)
        assert (args.schedule, args.wp0, args.wpe, args.alng) == ("lin0", 0.005, 0.1, 1e-3)
        assert (args.label_smoothing, args.weight_decay, args.weight_decay_end) == (0.0, 0.05, 0.05)
        assert args.grad_clip == 2.0
        assert args.loss_weighting == "token" and args.warmup == 20  # ep / 50 of the run
    var = {p: parse_args(["--run-dir", "x", "--preset", p, "--mode", "var", "--batch-size", "768"])
           for p in ("d16", "d20", "d24", "d30")}
    assert (var["d16"].lr, var["d16"].alng, var["d16"].wpe) == (pytest.approx(3e-4), 1e-3, 0.1)
    assert (var["d20"].base_lr, var["d20"].alng, var["d20"].wpe) == (1e-4, 1e-3, 0.1)
    assert (var["d24"].base_lr, var["d24"].alng, var["d24"].wpe) == (8e-5, 1e-4, 0.01)
    assert (var["d30"].base_lr, var["d30"].alng, var["d30"].wpe) == (8e-5, 1e-5, 0.01)
    assert var["d30"].weight_decay_end == 0.08 and var["d24"].weight_decay_end == 0.05
    assert all(a.label_smoothing == 0.0 and a.schedule == "lin0" for a in var.values())


def test_small_presets_keep_our_recipe_and_flags_override():
    small = parse_args(["--run-dir", "x"])
    assert small.lr == pytest.approx(6e-4) and small.batch_size == 64  # base 2.4e-3 x 64 / 256
    assert (small.schedule, small.warmup, small.wpe, small.label_smoothing, small.alng) == ("cos", 200, 0.1, 0.1, 1e-5)
    assert parse_args(["--run-dir", "x", "--preset", "tiny", "--batch-size", "128"]).lr == pytest.approx(1.2e-3)
    given = parse_args(["--run-dir", "x", "--preset", "d16", "--lr", "3e-4", "--label-smoothing", "0.1",
                        "--warmup", "7", "--schedule", "cos", "--weight-decay-end", "0.1"])
    assert (given.lr, given.label_smoothing, given.warmup, given.schedule) == (3e-4, 0.1, 7, "cos")
    assert (given.weight_decay, given.weight_decay_end) == (0.05, 0.1)


@pytest.mark.parametrize(("flags", "message"), [
    (["--schedule", "linear"], "--schedule must be one of lin0, lin, lin00, cos, exp, got 'linear'"),
    (["--loss-weighting", "sum"], "--loss-weighting must be one of token, mean, got 'sum'"),
    (["--wpe", "0"], "--wpe must be a ratio of the peak lr in (0, 1], got 0.0"),
    (["--wp0", "2"], "--wp0 must be a ratio of the peak lr in (0, 1], got 2.0"),
    (["--base-lr", "-1"], "--base-lr must be a positive learning rate, got -1.0"),
    (["--lr", "0"], "--lr must be a positive learning rate, got 0.0"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--warmup", "-3"], "--warmup must be >= 0 steps, got -3"),
    (["--epochs", "-1"], "--epochs must be >= 0, got -1.0"),
    (["--alng=-1e-3"], "--alng must be >= 0, got -0.001"),
    (["--preset", "d17"], "--preset: unknown preset 'd17'"),
])
def test_bad_recipe_flags_are_refused_by_name(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--run-dir", "x", *flags])
    assert message in capsys.readouterr().err


def test_epochs_become_steps_and_the_warmup_follows():
    # MVAR-d16 from scratch: 300 epochs of ImageNet's 1,281,167 images at batch 448
    args = parse_args(["--run-dir", "x", "--preset", "d16", "--mode", "mvar", "--batch-size", "448", "--epochs", "300"])
    assert args.warmup is None  # decided once the training set is known
    resolved = resolve_epochs(args, 1_281_167)
    assert 1_281_167 // 448 == 2859 and resolved.steps == 300 * 2859 == 857_700
    assert resolved.warmup == round(857_700 / 50) == 17_154
    fixed = resolve_epochs(parse_args(["--run-dir", "x", "--epochs", "2", "--warmup", "5"]), 640)
    assert (fixed.steps, fixed.warmup) == (20, 5)
    assert resolve_epochs(parse_args(["--run-dir", "x", "--steps", "9"]), 640).steps == 9  # no --epochs: --steps
    with pytest.raises(SystemExit, match="less than one step"):
        resolve_epochs(parse_args(["--run-dir", "x", "--epochs", "0.01"]), 640)


def test_alng_scales_only_the_adaln_gamma_channels():
    config = get_preset("tiny").transformer
    base = build_model(config, parse_args(["--run-dir", "x", "--preset", "tiny", "--alng", "1e-5"]), "cpu")
    scaled = build_model(config, parse_args(["--run-dir", "x", "--preset", "tiny", "--alng", "1e-3"]), "cpu")
    width = config.width
    for name, value in base.state_dict().items():
        if name.endswith("ada_lin.1.weight") and name.startswith("blocks."):
            torch.testing.assert_close(scaled.state_dict()[name][: 2 * width], value[: 2 * width] * 100)
            assert torch.equal(scaled.state_dict()[name][2 * width :], value[2 * width :])
        else:
            assert torch.equal(scaled.state_dict()[name], value), name
    torch.manual_seed(0)  # the default (1e-5) is VAR's init, what ScaleTransformer(config) draws
    reference = ScaleTransformer(config)
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in base.state_dict().items())


# ---------------------------------------------------------------------------------------------
# 3. One training step: the token weighting, the loss it backpropagates, clipping
# ---------------------------------------------------------------------------------------------


def test_token_weights_of_the_official_schedule():
    schedule = get_preset("d16").transformer.schedule
    assert schedule.total_tokens == 680
    for (first, last), share in {(0, 9): 680, (0, 7): 255, (8, 8): 169, (9, 9): 256}.items():
        weights = token_weights(schedule, first, last)
        assert len(weights) == share and torch.all(weights == 1 / 680)
        assert float(weights.sum()) == pytest.approx(share / 680)
        mean = token_weights(schedule, first, last, "mean")
        assert torch.all(mean == 1 / share) and float(mean.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="loss weighting must be one of token, mean"):
        token_weights(schedule, 0, 9, "sum")


@pytest.fixture
def tiny_step_inputs(tiny_tokenizer):
    torch.manual_seed(0)
    model = ScaleTransformer(get_preset("tiny").transformer).train()
    tokens, labels = random_tokens(tiny_tokenizer.cfg, 4, 12, seed=3)
    return model, TrainingBatch.from_tokens(tiny_tokenizer, tokens, labels)


@pytest.mark.parametrize(("mode", "first", "last"), [
    (AttentionMode.var(), 0, 9), (AttentionMode.mvar(), 0, 7), (AttentionMode.mvar(), 9, 9)])
@pytest.mark.parametrize("weighting", ["token", "mean"])
def test_the_step_backpropagates_the_weighted_loss(tiny_step_inputs, mode, first, last, weighting):
    model, batch = tiny_step_inputs
    begin, end = model.schedule.span(first, last)
    with torch.no_grad():
        logits = model(batch.labels, batch.inputs, mode, first, last)
    summed = F.cross_entropy(logits.flatten(0, 1), batch.tokens[:, begin:end].flatten(), reduction="sum")
    per_token = 1 / 680 if weighting == "token" else 1 / (end - begin)
    expected = summed * per_token / len(batch.labels)  # each token's weight, summed, then averaged over the batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    result = training_step(model, batch, mode, first, last, optimizer,
                           StepSettings(loss_weighting=weighting, precision="fp32"))
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-7)
    assert sorted(result.per_scale) == list(range(first, last + 1))
    assert all(p.grad is None for p in model.parameters())  # freed after the step


def test_the_step_clips_the_gradient_norm(tiny_step_inputs):
    model, batch = tiny_step_inputs
    before = [p.detach().clone() for p in model.parameters()]
    mode = AttentionMode.var()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the (clipped) gradient
    result = training_step(model, batch, mode, 0, 9, optimizer, StepSettings(grad_clip=1e-3, precision="fp32"))
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert float(result.grad_norm) > 1e-2  # the true norm, reported before clipping ...
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)  # ... and the step clipped to 1e-3
    unclipped = [p.detach().clone() for p in model.parameters()]
    result = training_step(model, batch, mode, 0, 9, optimizer, StepSettings(grad_clip=0.0, precision="fp32"))
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), unclipped, strict=True)))
    assert float(moved) == pytest.approx(float(result.grad_norm), rel=1e-3)  # clip <= 0: no clipping


def test_step_settings_default_to_the_official_recipe_and_refuse_bad_values():
    assert StepSettings() == StepSettings(label_smoothing=0.0, grad_clip=2.0, loss_weighting="token")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        StepSettings(label_smoothing=1.0)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        StepSettings(precision="fp8")
