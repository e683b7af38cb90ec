"""Every file layout the official VAR and MVAR scripts write loads, strictly, without running code.

The files are made as the official scripts make them: ``torch.save`` of the dict they save, around a
state dict in the official layout (MVAR's own block-diagonal training mask, or VAR's block-causal one),
from a model with the d16 shapes and random weights where the layout is the point, from the tiny preset
where the check is about one entry.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from mvar.checkpoints import (
    CheckpointError,
    convert_official,
    load_any,
    load_model,
    main,
    official_transformer_state_dict,
    read_official_file,
)
from mvar.config import OFFICIAL_TOKENIZER, AttentionMode, TransformerConfig, official_transformer
from mvar.schedule import OFFICIAL_PATCH_NUMS
from mvar.tokenizer import MultiScaleVQVAE
from mvar.transformer import ScaleTransformer

from .conftest import scramble

PWNED = Path(tempfile.gettempdir()) / "mvar_layout_pwned"


@pytest.fixture(scope="module")
def d16():
    """A transformer with the d16 shapes and random weights (std 0.02, the scale of trained weights)."""
    model = ScaleTransformer.empty(official_transformer(16))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def assert_same_weights(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


def optimiser_state(model: torch.nn.Module) -> dict:
    """A real AdamW state after one step, over the 1-D parameters (the official state is over all of them;
    its structure, not its size, is what a loader must get through)."""
    params = [p for p in model.parameters() if p.ndim == 1][:8]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimiser = torch.optim.AdamW(copies, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    for p in copies:
        p.grad = torch.ones_like(p)
    optimiser.step()
    return optimiser.state_dict()


@pytest.fixture
def absent_module_args():
    """An ``args`` object of a class whose module exists when the file is saved but not when it is loaded
    (the official scripts pickle their own ``Args``; that code is not installed here)."""
    module = types.ModuleType("official_run_utils")

    class Args:
        pass

    Args.__module__, Args.__qualname__ = module.__name__, "Args"
    module.Args = Args
    sys.modules[module.__name__] = module
    args = Args()
    args.depth, args.kernel_size, args.refine_step, args.pn = 16, 5, 7, "1_2_3_4_5_6_8_10_13_16"
    args.ratio_k, args.tblr, args.twd, args.ls, args.fp16 = 8, 1e-4, 0.05, 0.0, 1
    args.data_path = "/data/imagenet"
    yield args
    sys.modules.pop(module.__name__, None)


def save_without_module(obj, path: Path, module: str) -> None:
    torch.save(obj, path)
    sys.modules.pop(module, None)  # the class's module is gone from here on


# ----- d16, official layouts -------------------------------------------------------------------


def test_mvar_release_file_loads_as_mvar(ram_dir, d16):
    """mvar-d16.pth / mvar-finetune-dXX.pth: a dict whose 'mvar_wo_ddp' entry is the state dict, beside others."""
    path = ram_dir / "mvar-d16.pth"
    torch.save({"mvar_wo_ddp": official_transformer_state_dict(d16, mask="block-diagonal"), "epoch": 300}, path)
    loaded = load_any(path, "transformer")
    assert loaded.config == official_transformer(16)
    assert loaded.trained_mode == "mvar" and loaded.extra["training_mask"] == "block-diagonal"
    assert loaded.extra["official_layout"] == "mvar_wo_ddp"
    assert_same_weights(loaded.model, d16)


def test_mvar_training_checkpoint_with_args_of_an_absent_class(ram_dir, d16, absent_module_args):
    """{"epoch", "iter", "trainer": {"config", "mvar_wo_ddp", "mvar_opt"}, "args"}: the weights come out,
    the args (an object of a class not installed here) are read as data, and their kernel_size /
    refine_step set MVAR's attention."""
    path = ram_dir / "mvar-ckpt-ep-3.pth"
    trainer = {"config": {"patch_nums": OFFICIAL_PATCH_NUMS, "resos": tuple(16 * p for p in OFFICIAL_PATCH_NUMS),
                          "label_smooth": 0.0},
               "mvar_wo_ddp": official_transformer_state_dict(d16, mask="block-diagonal"),
               "mvar_opt": optimiser_state(d16)}
    save_without_module({"epoch": 3, "iter": 0, "trainer": trainer, "args": absent_module_args}, path,
                        "official_run_utils")
    assert "official_run_utils" not in sys.modules
    loaded = load_any(path, "transformer")
    assert loaded.trained_mode == "mvar" and loaded.extra["official_layout"] == "trainer.mvar_wo_ddp"
    assert loaded.extra["attention"] == {"refine_step": 7, "kernel_size": 5}
    assert AttentionMode.mvar_from_extra(loaded.extra) == AttentionMode.mvar(refine_step=7, kernel_size=5)
    assert loaded.extra["official_args"]["ratio_k"] == 8 and "data_path" not in loaded.extra["official_args"]
    assert loaded.extra["official_config"]["label_smooth"] == 0.0
    assert_same_weights(loaded.model, d16)
    assert "official_run_utils" not in sys.modules  # nothing was imported on the file's behalf


def test_var_training_checkpoint_gives_the_transformer_or_the_tokenizer(ram_dir, d16):
    """VAR's trainer writes {"trainer": {"config", "var_wo_ddp", "vae_local", "var_opt"}, "args": OrderedDict}."""
    tokenizer = MultiScaleVQVAE.empty(OFFICIAL_TOKENIZER)
    scramble(tokenizer, seed=3, std=0.02)
    for buffer in tokenizer.buffers():  # empty() leaves them uninitialised: whatever memory held (even NaN)
        buffer.zero_()
    path = ram_dir / "ar-ckpt-last.pth"
    trainer = {"config": {"patch_nums": OFFICIAL_PATCH_NUMS, "label_smooth": 0.0},
               "var_wo_ddp": official_transformer_state_dict(d16), "vae_local": tokenizer.state_dict(),
               "var_opt": optimiser_state(d16)}
    torch.save({"epoch": 200, "iter": 0, "trainer": trainer, "args": OrderedDict(depth=16, tblr=1e-4)}, path)
    transformer = load_any(path, "transformer")
    assert transformer.trained_mode == "var" and transformer.extra["training_mask"] == "block-causal"
    assert transformer.extra["official_layout"] == "trainer.var_wo_ddp"
    assert_same_weights(transformer.model, d16)
    vae = load_any(path, "tokenizer")
    assert vae.extra["official_layout"] == "trainer.vae_local"
    assert_same_weights(vae.model, tokenizer)


# ----- tiny: one entry at a time ---------------------------------------------------------------


def test_plain_var_state_dict_is_var_and_fine_tuned_mvar_keeps_the_mask_it_inherited(tmp_path, tiny_transformer):
    var = tmp_path / "var_d16.pth"
    torch.save(official_transformer_state_dict(tiny_transformer), var)
    loaded = load_any(var, "transformer")
    assert loaded.trained_mode == "var" and loaded.extra["official_layout"] == "state dict"
    # MVAR's fine-tuning loads a VAR file strictly, buffers included, so its files may carry VAR's mask
    tuned = tmp_path / "mvar-finetune-d16.pth"
    torch.save({"mvar_wo_ddp": official_transformer_state_dict(tiny_transformer)}, tuned)
    loaded = load_any(tuned, "transformer")
    assert loaded.trained_mode == "mvar" and loaded.extra["training_mask"] == "block-causal"


def test_a_mask_that_is_neither_vars_nor_mvars_is_refused_saying_which_was_expected(tmp_path, tiny_transformer):
    state = official_transformer_state_dict(tiny_transformer)
    state["attn_bias_for_masking"] = torch.zeros_like(state["attn_bias_for_masking"])  # full attention
    path = tmp_path / "odd.pth"
    torch.save({"mvar_wo_ddp": state}, path)
    with pytest.raises(CheckpointError, match="neither VAR's block-causal mask nor MVAR's block-diagonal") as err:
        load_any(path, "transformer")
    assert "odd.pth" in str(err.value)


class _RunsACommand:
    def __reduce__(self):
        return (os.system, (f"echo pwned > {PWNED}",))


def test_a_training_checkpoint_whose_args_run_a_command_is_refused(tmp_path, tiny_transformer):
    PWNED.unlink(missing_ok=True)
    path = tmp_path / "evil-ckpt.pth"
    torch.save({"trainer": {"mvar_wo_ddp": official_transformer_state_dict(tiny_transformer)},
                "args": _RunsACommand()}, path)
    with pytest.raises(CheckpointError, match="execute code") as err:
        load_any(path, "transformer")
    assert "evil-ckpt.pth" in str(err.value) and "system" in str(err.value)
    assert not PWNED.exists()


def test_a_truncated_release_file_names_the_file(tmp_path, tiny_transformer):
    path = tmp_path / "mvar-finetune-d20.pth"
    torch.save({"mvar_wo_ddp": official_transformer_state_dict(tiny_transformer, mask="block-diagonal")}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_any(path, "transformer")
    assert "mvar-finetune-d20.pth" in str(err.value)


def test_a_dict_without_a_known_entry_lists_what_it_found_and_what_was_expected(tmp_path, tiny_transformer):
    path = tmp_path / "other.pth"
    torch.save({"weights": official_transformer_state_dict(tiny_transformer), "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"found top-level entries \[epoch, weights\].*'mvar_wo_ddp'"):
        load_any(path, "transformer")


def small_schedule_transformer() -> ScaleTransformer:
    config = TransformerConfig(depth=2, width=64, num_heads=2, num_classes=12, vocab_size=32, latent_channels=8,
                               patch_nums=(1, 2, 4))
    return scramble(ScaleTransformer(config), seed=5)


def test_the_schedule_comes_from_the_files_config_or_args(tmp_path):
    model = small_schedule_transformer()
    state = official_transformer_state_dict(model, mask="block-diagonal")
    plain = tmp_path / "plain.pth"
    torch.save({"mvar_wo_ddp": state}, plain)
    with pytest.raises(CheckpointError, match="only the official 10-scale schedule"):
        load_any(plain, "transformer")
    for name, holder in (("config", {"trainer": {"config": {"patch_nums": (1, 2, 4)}, "mvar_wo_ddp": state}}),
                         ("pn", {"trainer": {"mvar_wo_ddp": state}, "args": {"pn": "1_2_4"}})):
        path = tmp_path / f"{name}.pth"
        torch.save(holder, path)
        loaded = load_any(path, "transformer")
        assert loaded.config.patch_nums == (1, 2, 4), name
        assert_same_weights(loaded.model, model)


def test_args_that_contradict_the_weights_are_named(tmp_path, tiny_transformer):
    state = official_transformer_state_dict(tiny_transformer, mask="block-diagonal")
    cases = {"depth": ({"depth": 16}, "args.depth is 16, but the weights have 2 blocks"),
             "kernel": ({"kernel_size": 4}, "args: kernel_size must be a positive odd number"),
             "pn": ({"pn": "1_2_x"}, "args.pn is not a scale schedule")}
    for name, (args, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save({"trainer": {"mvar_wo_ddp": state}, "args": args}, path)
        with pytest.raises(CheckpointError, match=message):
            load_any(path, "transformer")


def test_convert_handles_every_layout_and_keeps_what_the_file_says(tmp_path, tiny_transformer, absent_module_args,
                                                                   capsys):
    state = official_transformer_state_dict(tiny_transformer, mask="block-diagonal")
    absent_module_args.depth = 2
    layouts = {"plain": state, "release": {"mvar_wo_ddp": state, "extra": "x"},
               "training": {"epoch": 1, "iter": 0, "trainer": {"config": {"patch_nums": OFFICIAL_PATCH_NUMS},
                                                               "mvar_wo_ddp": state}, "args": absent_module_args},
               "var-training": {"trainer": {"var_wo_ddp": official_transformer_state_dict(tiny_transformer)}}}
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / f"{name}.pth")
    sys.modules.pop("official_run_utils", None)
    for name in layouts:
        out = tmp_path / f"{name}.safetensors"
        main(["convert", str(tmp_path / f"{name}.pth"), str(out), "--kind", "transformer"])
        assert f"wrote {out}" in capsys.readouterr().out
        ours = load_model(out)
        assert_same_weights(ours.model, tiny_transformer)
        assert ours.extra["converted_from"] == f"{name}.pth"
        assert ours.trained_mode == ("var" if name == "var-training" else "mvar"), name
    assert load_model(tmp_path / "training.safetensors").extra["attention"] == {"refine_step": 7, "kernel_size": 5}


def test_convert_of_a_tokenizer_from_a_var_training_checkpoint(tmp_path, tiny_tokenizer, tiny_transformer):
    path = tmp_path / "ckpt.pth"
    torch.save({"trainer": {"var_wo_ddp": official_transformer_state_dict(tiny_transformer),
                            "vae_local": tiny_tokenizer.state_dict()}}, path)
    assert read_official_file(path, "tokenizer").layout == "trainer.vae_local"
    with pytest.raises(CheckpointError, match="does not match the model"):
        convert_official(path, tmp_path / "vae.safetensors", "tokenizer")  # the official tokenizer's shapes
