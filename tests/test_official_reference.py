"""Our code against the official VAR and MVAR code's own outputs, on the same tiny random weights.

``tests/data/official_reference_*.safetensors`` were written by ``tests/make_official_reference.py``, which ran
the official code (github FoundationVision/VAR and CVL-UESTC/MVAR, not part of this repository; see that
script's docstring for the command). Here the weights go through our loaders (official ``.pth`` layouts in
``tmp_path``) and every reference output is recomputed by our tokenizer, transformer and sampler, in fp32:

* logits within ``LOGIT_TOL``; accumulated maps and teacher-forcing inputs within ``MAP_TOL``;
* greedy (top_k=1) tokens exactly equal (the script refused seeds whose greedy or nearest-code choices are
  closer than 2.5e-4, so round-off can not decide a token).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mvar.attention import natten_available
from mvar.checkpoints import load_any
from mvar.config import AttentionMode, TokenizerConfig
from mvar.sampling import SamplingConfig, generate_steps
from mvar.tokenizer import MultiScaleVQVAE

DATA = Path(__file__).parent / "data"
LOGIT_TOL = 1e-4
MAP_TOL = 1e-5
MIN_GAP = 2.5e-4  # what make_official_reference.py demands of every greedy / nearest-code choice
# NATTEN's CPU path (flex attention without torch.compile) warns at every first call
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch.nn.attention.flex_attention",
                                        "ignore::FutureWarning:torch.nn.attention.flex_attention")
WINDOW_BACKENDS = ["dense", "gather", pytest.param("natten", marks=pytest.mark.skipif(
    not natten_available(), reason="natten is not installed"))]


def read_reference(kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of official_reference_{kind}.safetensors and its metadata (config, gaps, file digests)."""
    path = DATA / f"official_reference_{kind}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), json.loads(metadata["reference"])


WEIGHTS, ABOUT = read_reference("weights")
VAR_REF, VAR_META = read_reference("var")
MVAR_REF, MVAR_META = read_reference("mvar")
CONFIG = ABOUT["config"]


def runs_to_bias(runs: torch.Tensor) -> torch.Tensor:
    """(L, 2) [begin, end) of attended keys per row -> the official additive mask (1, 1, L, L) of 0 / -inf."""
    length = runs.shape[0]
    columns = torch.arange(length)
    begin, end = runs[:, :1].long(), runs[:, 1:].long()
    allowed = (columns >= begin) & (columns < end)
    return torch.where(allowed, 0.0, float("-inf")).view(1, 1, length, length)


def official_state(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's state dict as the official model held it: fp32 weights, lvl_1L, its training mask."""
    state = {k: v.float() for k, v in WEIGHTS.items() if not k.startswith("quantize.") and k != "lvl_1L"}
    state["lvl_1L"] = WEIGHTS["lvl_1L"]
    state["attn_bias_for_masking"] = runs_to_bias(reference["attn_bias_for_masking_runs"])
    return state


def load_var(folder: Path):
    """Official VAR's weights saved as a plain state dict (as var_d16.pth is), through load_any."""
    torch.save(official_state(VAR_REF), folder / "var_tiny.pth")
    return load_any(folder / "var_tiny.pth", "transformer")


def load_mvar(folder: Path):
    """Official MVAR's weights in its release layout {"mvar_wo_ddp": state dict}, through load_any."""
    torch.save({"mvar_wo_ddp": official_state(MVAR_REF)}, folder / "mvar_tiny.pth")
    return load_any(folder / "mvar_tiny.pth", "transformer")


def make_tokenizer() -> MultiScaleVQVAE:
    """Our VQ-VAE in the official architecture at the tiny size; only the quantizer's weights matter here."""
    config = TokenizerConfig(vocab_size=CONFIG["vocab_size"], latent_channels=CONFIG["latent_channels"],
                             channels=CONFIG["channels"], channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                             image_size=CONFIG["image_size"], patch_nums=tuple(CONFIG["patch_nums"]))
    model = MultiScaleVQVAE(config).eval()
    quantizer = {k.removeprefix("quantize."): v.float() for k, v in WEIGHTS.items() if k.startswith("quantize.")}
    model.quantize.load_state_dict(quantizer, strict=True)
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def var_loaded(tmp_path_factory):
    return load_var(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def mvar_loaded(tmp_path_factory):
    return load_mvar(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def mvar_mode(backend: str = "auto") -> AttentionMode:
    return AttentionMode.mvar(refine_step=CONFIG["refine_step"], kernel_size=CONFIG["kernel_size"], backend=backend)


def per_scale(flat: torch.Tensor) -> list[torch.Tensor]:
    """(B, L) tokens of all scales -> per scale (B, p*p), as long."""
    sizes = [p * p for p in CONFIG["patch_nums"]]
    return [t.long() for t in flat.split(sizes, dim=1)]


def teacher_inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Our teacher-forcing inputs of the reference tokens: labels (B,), inputs (B, L-1, Cvae)."""
    return VAR_REF["teacher_labels"], tokenizer.teacher_forcing_inputs(per_scale(VAR_REF["teacher_tokens"]))


def max_diff(ours: torch.Tensor, official: torch.Tensor) -> float:
    assert ours.shape == official.shape
    return float((ours.float() - official.float()).abs().max())


def greedy(transformer, tokenizer, cfg: float, mode: AttentionMode) -> tuple[torch.Tensor, torch.Tensor]:
    """Our greedy generation of the reference labels: tokens (B, L) and the final f_hat."""
    steps = list(generate_steps(transformer, tokenizer, VAR_REF["generate_labels"].tolist(), seeds=0,
                                sampling=SamplingConfig(cfg=cfg, top_k=1, top_p=1.0), mode=mode))
    return torch.cat([s.tokens for s in steps], dim=1), steps[-1].f_hat


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_official_files_load_with_their_training_masks(var_loaded, mvar_loaded):
    assert var_loaded.extra["training_mask"] == "block-causal" and var_loaded.extra["trained_mode"] == "var"
    assert mvar_loaded.extra["training_mask"] == "block-diagonal" and mvar_loaded.extra["trained_mode"] == "mvar"
    cfg = var_loaded.model.cfg
    assert (cfg.depth, cfg.width, cfg.num_heads, cfg.num_classes, cfg.vocab_size, cfg.latent_channels) == (
        CONFIG["depth"], CONFIG["width"], CONFIG["num_heads"], CONFIG["num_classes"], CONFIG["vocab_size"],
        CONFIG["latent_channels"])
    assert mvar_loaded.model.cfg == cfg
    # no greedy or nearest-code choice of the reference is close enough to a tie for round-off to decide it
    gaps = [v for meta in (VAR_META, MVAR_META) for k, v in meta.items() if k.endswith("_gap")]
    assert len(gaps) == 5 and min(gaps) >= MIN_GAP
    # every parameter is the stored value, upcast from float8 exactly
    for name, tensor in var_loaded.model.state_dict().items():
        if name in WEIGHTS:
            assert torch.equal(tensor, WEIGHTS[name].float()), name


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_quantizer_tokens_and_map_equal_the_official(tokenizer):
    tokens, f_hats = tokenizer.quantize.quantize(VAR_REF["quantize_latent"])
    assert torch.equal(torch.cat(tokens, dim=1), VAR_REF["quantize_tokens"].long())
    assert max_diff(f_hats[-1], VAR_REF["quantize_fhat"]) <= MAP_TOL


def test_teacher_forcing_inputs_equal_the_official(tokenizer):
    _, inputs = teacher_inputs(tokenizer)
    assert max_diff(inputs, VAR_REF["teacher_inputs"]) <= MAP_TOL
    assert MVAR_META["teacher_inputs_max_diff_to_var"] == 0.0  # MVAR's helper builds VAR's inputs, bit for bit


# ---------------------------------------------------------------------------------------------
# Teacher-forced logits
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_var_teacher_forced_logits_equal_the_official(var_loaded, tokenizer):
    labels, inputs = teacher_inputs(tokenizer)
    ours = var_loaded.model(labels, inputs, AttentionMode.var())
    assert max_diff(ours, VAR_REF["teacher_logits"]) <= LOGIT_TOL


@torch.no_grad()
def test_mvar_joint_block_logits_equal_the_official(mvar_loaded, tokenizer):
    labels, inputs = teacher_inputs(tokenizer)
    ours = mvar_loaded.model(labels, inputs, mvar_mode(), first_scale=0, last_scale=CONFIG["refine_step"] - 1)
    assert max_diff(ours, MVAR_REF["teacher_logits_joint"]) <= LOGIT_TOL


@pytest.mark.parametrize("backend", WINDOW_BACKENDS)
@pytest.mark.parametrize("scale", [8, 9])
@torch.no_grad()
def test_mvar_windowed_scale_logits_equal_natten_in_the_official(mvar_loaded, tokenizer, scale, backend):
    labels, inputs = teacher_inputs(tokenizer)
    ours = mvar_loaded.model(labels, inputs, mvar_mode(backend), first_scale=scale, last_scale=scale)
    assert max_diff(ours, MVAR_REF[f"teacher_logits_scale{scale}"]) <= LOGIT_TOL


@torch.no_grad()
def test_the_reference_tells_the_attention_patterns_apart(var_loaded, tokenizer):
    """A wrong mask, window or block would fail the comparisons above by far more than their tolerance."""
    labels, inputs = teacher_inputs(tokenizer)
    model = var_loaded.model
    full = MVAR_REF["teacher_logits_scale9"]
    begin = sum(p * p for p in CONFIG["patch_nums"][:9])
    assert max_diff(VAR_REF["teacher_logits"][:, begin:], full) > 100 * LOGIT_TOL  # block-causal vs windowed
    wrong_kernel = AttentionMode.mvar(refine_step=CONFIG["refine_step"], kernel_size=5)
    assert max_diff(model(labels, inputs, wrong_kernel, first_scale=9, last_scale=9), full) > 100 * LOGIT_TOL
    unwindowed = AttentionMode.mvar(refine_step=10)  # scale 9 attends to all of itself
    assert max_diff(model(labels, inputs, unwindowed, first_scale=9, last_scale=9), full) > 100 * LOGIT_TOL
    last_block = model.blocks[-1].ada_lin[-1]
    saved = last_block.bias.clone()
    try:
        last_block.bias[: 2 * CONFIG["width"]] = 0  # gammas of the last block ~0: that block barely counts
        assert max_diff(model(labels, inputs, AttentionMode.var()), VAR_REF["teacher_logits"]) > 100 * LOGIT_TOL
    finally:
        last_block.bias.copy_(saved)


# ---------------------------------------------------------------------------------------------
# Greedy generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_var_greedy_generation_equals_the_official(var_loaded, tokenizer, cfg):
    """The official VAR applies its guidance ramp t = cfg * s/(S-1) at any cfg, 1.0 included; so do we."""
    tokens, f_hat = greedy(var_loaded.model, tokenizer, cfg, AttentionMode.var())
    assert torch.equal(tokens, VAR_REF[f"generate_cfg{cfg}_tokens"].long())
    assert max_diff(f_hat, VAR_REF[f"generate_cfg{cfg}_fhat"]) <= MAP_TOL


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_mvar_greedy_generation_with_guidance_equals_the_official(mvar_loaded, tokenizer, backend):
    tokens, f_hat = greedy(mvar_loaded.model, tokenizer, 2.5, mvar_mode(backend))
    assert torch.equal(tokens, MVAR_REF["generate_cfg2.5_tokens"].long())
    assert max_diff(f_hat, MVAR_REF["generate_cfg2.5_fhat"]) <= MAP_TOL


def test_mvar_greedy_generation_without_guidance_equals_the_official_at_cfg_one(mvar_loaded, tokenizer):
    """The official MVAR sampler treats cfg == 1.0 as no guidance (conditional branch only), like our cfg 0."""
    tokens, f_hat = greedy(mvar_loaded.model, tokenizer, 0.0, mvar_mode())
    assert torch.equal(tokens, MVAR_REF["generate_cfg1.0_tokens"].long())
    assert max_diff(f_hat, MVAR_REF["generate_cfg1.0_fhat"]) <= MAP_TOL


def test_mvar_greedy_generation_at_cfg_one_equals_the_official(mvar_loaded, tokenizer):
    tokens, _ = greedy(mvar_loaded.model, tokenizer, 1.0, mvar_mode())
    assert torch.equal(tokens, MVAR_REF["generate_cfg1.0_tokens"].long())


# ---------------------------------------------------------------------------------------------
# The measured differences: python -m tests.test_official_reference
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def measured_differences(var_model, mvar_model, tokenizer) -> dict[str, float]:
    """Largest |ours - official| of every compared output (greedy tokens: the count of differing tokens)."""
    labels, inputs = teacher_inputs(tokenizer)
    tokens, f_hats = tokenizer.quantize.quantize(VAR_REF["quantize_latent"])
    found = {
        "quantizer: differing tokens": float((torch.cat(tokens, 1) != VAR_REF["quantize_tokens"].long()).sum()),
        "quantizer: f_hat": max_diff(f_hats[-1], VAR_REF["quantize_fhat"]),
        "teacher-forcing inputs": max_diff(inputs, VAR_REF["teacher_inputs"]),
        "VAR logits, 680 positions": max_diff(var_model(labels, inputs, AttentionMode.var()),
                                              VAR_REF["teacher_logits"]),
        "MVAR logits, joint block (scales 0-7)": max_diff(
            mvar_model(labels, inputs, mvar_mode(), 0, CONFIG["refine_step"] - 1), MVAR_REF["teacher_logits_joint"]),
    }
    backends = ["dense", "gather"] + (["natten"] if natten_available() else [])
    for scale in (8, 9):
        for backend in backends:
            found[f"MVAR logits, scale {scale} ({backend} vs NATTEN)"] = max_diff(
                mvar_model(labels, inputs, mvar_mode(backend), scale, scale), MVAR_REF[f"teacher_logits_scale{scale}"])
    runs = [("VAR", var_model, AttentionMode.var(), VAR_REF, cfg, cfg) for cfg in (1.0, 2.5)]
    runs += [("MVAR", mvar_model, mvar_mode(b), MVAR_REF, 2.5, 2.5) for b in ("dense", "gather")]
    runs += [("MVAR", mvar_model, mvar_mode(), MVAR_REF, cfg, 1.0) for cfg in (0.0, 1.0)]
    for name, model, mode, reference, ours_cfg, official_cfg in runs:
        tokens, f_hat = greedy(model, tokenizer, ours_cfg, mode)
        what = f"{name} greedy, our cfg {ours_cfg} ({mode.backend}) vs official cfg {official_cfg}"
        found[f"{what}: differing tokens"] = float((tokens != reference[f"generate_cfg{official_cfg}_tokens"]).sum())
        found[f"{what}: f_hat"] = max_diff(f_hat, reference[f"generate_cfg{official_cfg}_fhat"])
    return found


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        differences = measured_differences(load_var(Path(folder)).model, load_mvar(Path(folder)).model,
                                           make_tokenizer())
    for name, value in differences.items():
        print(f"{name:75s} {value:.3g}")
