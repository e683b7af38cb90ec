"""The model registry: official files discovered under their official names (alone and paired with the VAR
release of their depth), labels that follow the file, loading per key without a global lock, eviction that
leaves a holder's models working, the device, and the Hugging Face Spaces policy (downloads offered, models
folder). Downloads themselves (fake hub) are in test_hub.py.
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from app.provenance import TrainedFor, baseline_note, mvar_label, trained_for, var_label
from app.registry import (
    ASSETS,
    LoadedModels,
    ModelEntry,
    ModelRegistry,
    official_entries_spec,
    on_space,
    space_models_dir,
)
from mvar.checkpoints import load_any, official_transformer_state_dict
from mvar.config import AttentionMode, official_transformer
from mvar.sampling import SamplingConfig, generate
from mvar.transformer import ScaleTransformer

VAR_NAMES = ("var_d16.pth", "var_d20.pth", "var_d24.pth", "var_d30.pth")
MVAR_NAMES = ("mvar-d16.pth", "mvar-finetune-d16.pth", "mvar-finetune-d20.pth", "mvar-finetune-d24.pth")
EVERY_KEY = ["mvar-d16", "mvar-d16+var-d16", "mvar-finetune-d16", "mvar-finetune-d16+var-d16",
             "mvar-finetune-d20", "mvar-finetune-d20+var-d20", "mvar-finetune-d24", "mvar-finetune-d24+var-d24",
             "var-d16", "var-d20", "var-d24", "var-d30"]


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    """Every official file name, written as the official code writes them: var_dXX.pth a plain state dict with
    VAR's block-causal mask, mvar-*.pth ``{"mvar_wo_ddp": state dict}`` with MVAR's block-diagonal one (depth-1
    transformers: the names matter here, not the sizes), and the VAE file as an empty placeholder (listing only
    checks that it is there; loading it is test_hub's)."""
    folder = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    model = ScaleTransformer(official_transformer(1))
    for name in VAR_NAMES:
        torch.save(official_transformer_state_dict(model), folder / name)
    for name in MVAR_NAMES:
        torch.save({"mvar_wo_ddp": official_transformer_state_dict(model, "block-diagonal")}, folder / name)
    (folder / "vae_ch160v4096z32.pth").write_bytes(b"")
    (folder / "unrelated.pth").write_bytes(b"")
    (folder / "var_d16 (1).pth").write_bytes(b"")  # a browser's second download is not an official name
    return folder


def keys(registry: ModelRegistry) -> list[str]:
    return [e.key for e in registry.entries()]


def test_models_dir_discovers_official_names_alone_and_paired_in_order(official_dir, tmp_path):
    registry = ModelRegistry(official_dir, assets_dir=tmp_path / "no-assets", space=False)
    entries = {e.key: e for e in registry.entries()}
    assert keys(registry) == EVERY_KEY
    assert all(e.source == "local" for e in entries.values())
    pair = entries["mvar-d16+var-d16"]
    assert (Path(pair.tokenizer).name, Path(pair.transformer).name, Path(pair.var_transformer).name) == (
        "vae_ch160v4096z32.pth", "mvar-d16.pth", "var_d16.pth")
    assert pair.label == "MVAR-d16 with the VAR-d16 baseline (local files)"
    assert entries["mvar-d16"].var_transformer is None  # alone: the same weights in VAR mode
    assert entries["var-d16"].label.startswith("VAR-d16 alone (its MVAR side: VAR weights with MVAR attention, "
                                               "not trained for it)")
    assert entries["mvar-finetune-d20+var-d20"].sampling["cfg"] == 1.5  # the MVAR file's official settings
    assert entries["mvar-finetune-d24"].sampling == {"cfg": 1.4, "top_p": 0.96, "top_k": 900}
    assert entries["var-d30"].sampling["cfg"] == 1.5


def test_a_pairing_needs_both_files_and_every_entry_needs_the_vae(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("vae_ch160v4096z32.pth", "mvar-finetune-d20.pth", "var_d16.pth", "mvar-d16.pth"):
        (folder / name).write_bytes(b"")
    registry = ModelRegistry(folder, assets_dir=tmp_path / "no-assets", space=False)
    assert keys(registry) == ["mvar-d16", "mvar-d16+var-d16", "mvar-finetune-d20", "var-d16"]  # no var_d20.pth
    (folder / "vae_ch160v4096z32.pth").unlink()
    assert [e.source for e in registry.entries()] == ["random"]  # nothing runs without the tokenizer


def test_official_spec_pairs_every_mvar_release_with_the_var_release_of_its_depth():
    pairs = {key: (name, var) for key, name, var in official_entries_spec() if var}
    assert pairs == {"mvar-d16+var-d16": ("mvar-d16", "var-d16"),
                     "mvar-finetune-d16+var-d16": ("mvar-finetune-d16", "var-d16"),
                     "mvar-finetune-d20+var-d20": ("mvar-finetune-d20", "var-d20"),
                     "mvar-finetune-d24+var-d24": ("mvar-finetune-d24", "var-d24")}


def side(official_dir: Path, name: str) -> TrainedFor:
    return trained_for(load_any(official_dir / name, "transformer"))


def test_official_files_say_what_they_were_trained_for(official_dir):
    assert side(official_dir, "var_d16.pth") == TrainedFor("var_d16.pth", "var", None, True)
    assert side(official_dir, "mvar-d16.pth") == TrainedFor("mvar-d16.pth", "mvar", None, True)
    assert side(official_dir, "mvar-finetune-d20.pth") == TrainedFor("mvar-finetune-d20.pth", "mvar",
                                                                      "var_d20.pth", False)


def test_labels_follow_the_file_not_its_name(official_dir, tmp_path):
    # a VAR file saved under an MVAR release's name carries VAR's training mask: it is VAR weights
    model = ScaleTransformer(official_transformer(1))
    torch.save(official_transformer_state_dict(model), tmp_path / "mvar-finetune-d16.pth")
    impostor = side(tmp_path, "mvar-finetune-d16.pth")
    assert impostor == TrainedFor("mvar-finetune-d16.pth", "var")  # no fine-tuning claim either
    assert mvar_label(impostor) == "VAR weights with MVAR attention, not trained for it (mvar-finetune-d16.pth)"
    # the same for an MVAR file under a VAR name
    torch.save({"mvar_wo_ddp": official_transformer_state_dict(model, "block-diagonal")}, tmp_path / "var_d20.pth")
    assert var_label(side(tmp_path, "var_d20.pth")) == "MVAR weights with VAR attention, not trained for it " \
                                                      "(var_d20.pth)"
    # a file that says nothing (no card, no mask) is not given a history
    state = official_transformer_state_dict(model)
    del state["attn_bias_for_masking"]
    torch.save(state, tmp_path / "mine.pth")
    quiet = side(tmp_path, "mine.pth")
    assert quiet == TrainedFor("mine.pth", None)
    assert mvar_label(quiet) == "mine.pth with MVAR attention (the file does not say what it was trained for)"
    assert baseline_note(quiet, side(official_dir, "var_d16.pth"), same_weights=False).endswith(
        "how the MVAR side (mine.pth) relates to it is not recorded")


def loaded(mvar: TrainedFor, var: TrainedFor | None, tiny_transformer, tiny_tokenizer) -> LoadedModels:
    """LoadedModels as the registry builds them; a second transformer object when ``var`` is given."""
    other = tiny_transformer if var is None else ScaleTransformer(tiny_transformer.cfg)
    entry = ModelEntry("k", "k", "local", "t", "m")
    return LoadedModels(entry, tiny_tokenizer, tiny_transformer, other, ["a"], {}, AttentionMode.mvar(), mvar,
                        var if var is not None else mvar)


def test_the_baseline_note_is_true_for_every_official_pairing(official_dir, tiny_transformer, tiny_tokenizer):
    var16, mvar16, fine16 = (side(official_dir, n) for n in ("var_d16.pth", "mvar-d16.pth",
                                                               "mvar-finetune-d16.pth"))
    from_scratch = loaded(mvar16, var16, tiny_transformer, tiny_tokenizer)
    assert from_scratch.baseline_note == ("VAR baseline = a separate checkpoint, var_d16.pth; the MVAR side "
                                          "(mvar-d16.pth) was trained from scratch, not from it")
    assert from_scratch.mvar_label == "MVAR: mvar-d16.pth, trained with MVAR attention, trained from scratch"
    assert from_scratch.var_label == "VAR: var_d16.pth, trained with VAR attention, trained from scratch"
    fine_tuned = loaded(fine16, var16, tiny_transformer, tiny_tokenizer)
    assert fine_tuned.baseline_note.endswith("the MVAR side (mvar-finetune-d16.pth) was fine-tuned from it")
    assert fine_tuned.mvar_label.endswith("fine-tuned from var_d16.pth")
    # fine-tuned from another depth's VAR than the one shown: said so, not "from it"
    fine20 = side(official_dir, "mvar-finetune-d20.pth")
    assert loaded(fine20, var16, tiny_transformer, tiny_tokenizer).baseline_note.endswith(
        "was fine-tuned from var_d20.pth, not from it")
    # one file in both modes
    alone = loaded(mvar16, None, tiny_transformer, tiny_tokenizer)
    assert alone.baseline_note == ("VAR baseline = the same weights run with VAR's block-causal attention and KV "
                                   "cache (they were trained for MVAR's attention, not VAR's)")
    assert alone.var_label == "MVAR weights with VAR attention, not trained for it (mvar-d16.pth)"
    var_alone = loaded(var16, None, tiny_transformer, tiny_tokenizer)
    assert var_alone.mvar_label == "VAR weights with MVAR attention, not trained for it (var_d16.pth)"
    assert var_alone.var_label.startswith("VAR: var_d16.pth")
    assert "the MVAR side was not" in var_alone.baseline_note
    assert "fine-tuned" not in alone.baseline_note + var_alone.baseline_note + from_scratch.baseline_note


def test_the_default_models_are_labelled_from_their_cards(tmp_path):
    models = ModelRegistry(None, assets_dir=ASSETS, space=False).load("default")
    assert models.mvar_label == "MVAR: mvar.safetensors, trained with MVAR attention, fine-tuned from var.safetensors"
    assert models.var_label == "VAR: var.safetensors, trained with VAR attention, trained from scratch"
    assert models.baseline_note == ("VAR baseline = a separate checkpoint, var.safetensors; the MVAR side "
                                    "(mvar.safetensors) was fine-tuned from it")
    untrained = ModelRegistry(None, assets_dir=tmp_path, space=False).load("untrained-small")
    assert untrained.mvar_label == "random weights (untrained) with MVAR attention"
    assert "same weights" in untrained.baseline_note and "trained for" not in untrained.baseline_note


def test_trained_for_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match=r"mode must be one of \('var', 'mvar', 'untrained'\) or None, got 'vr'"):
        TrainedFor("x.pth", "vr")


TINY = [ModelEntry(key, key, "random", "tiny", "tiny") for key in ("tiny-a", "tiny-b")]


def sample(models: LoadedModels) -> torch.Tensor:
    return generate(models.transformer, models.tokenizer, labels=[1], seeds=3,
                    sampling=SamplingConfig(cfg=1.0, top_k=10, top_p=0.95), mode=models.mvar_mode).images


def test_eviction_leaves_a_holders_models_working(tmp_path):
    registry = ModelRegistry(None, assets_dir=tmp_path, extra=TINY, max_loaded=1, space=False)
    held = registry.load("tiny-a")
    before = sample(held)
    other = registry.load("tiny-b")  # evicts tiny-a from the registry
    assert registry.loaded_keys() == ["tiny-b"]
    assert torch.equal(sample(held), before)  # the holder's models are untouched
    assert held.transformer.head.weight.device.type == "cpu" and not held.transformer.head.weight.is_meta
    again = registry.load("tiny-a")
    assert again is not held and registry.loaded_keys() == ["tiny-a"]  # loaded anew
    assert other.transformer is not again.transformer


def test_the_registry_device_is_the_default_for_load(tmp_path):
    registry = ModelRegistry(None, assets_dir=tmp_path, extra=TINY, device="meta", space=False)
    assert registry.device == "meta"
    on_meta = registry.load("tiny-a")
    assert on_meta.transformer.head.weight.is_meta and on_meta.tokenizer.decoder.conv_out.weight.is_meta
    on_cpu = registry.load("tiny-a", device="cpu")
    assert on_cpu is not on_meta and on_cpu.transformer.head.weight.device.type == "cpu"
    assert registry.load("tiny-a") is on_meta  # one loaded copy per (key, device)


def test_two_users_loading_the_same_key_load_it_once(tmp_path, monkeypatch):
    """The second caller waits for the first one's load (no second load), and sees its progress."""
    registry = ModelRegistry(None, assets_dir=tmp_path, extra=TINY, space=False)
    inside, release, calls = threading.Event(), threading.Event(), []
    real = registry._load_entry

    def slow_load(entry, device, report=None):
        calls.append(entry.key)
        report(0.5, desc="half way")
        inside.set()
        assert release.wait(60)
        return real(entry, device, report)

    monkeypatch.setattr(registry, "_load_entry", slow_load)
    results, waiting = {}, threading.Event()
    first = threading.Thread(target=lambda: results.setdefault("first", registry.load("tiny-a")))
    first.start()
    assert inside.wait(60)
    seen = []

    def second_progress(fraction, desc=""):
        seen.append((fraction, desc))
        if desc.startswith("waiting for tiny-a"):
            waiting.set()

    second = threading.Thread(target=lambda: results.setdefault("second", registry.load("tiny-a",
                                                                                        progress=second_progress)))
    second.start()
    try:
        assert waiting.wait(60)  # the second caller is waiting, not loading (a global lock would block it)
        assert seen[0] == (0.5, "waiting for tiny-a: another user is loading it")
    finally:
        release.set()
    first.join(60)
    second.join(60)
    assert results["first"] is results["second"] and calls == ["tiny-a"]
    assert seen[-1] == (1.0, "tiny-a is loaded")


def test_a_failed_load_reaches_every_waiter_and_is_not_kept(tmp_path, monkeypatch):
    registry = ModelRegistry(None, assets_dir=tmp_path, extra=TINY, space=False)
    inside, release = threading.Event(), threading.Event()

    def broken(entry, device, report=None):
        inside.set()
        assert release.wait(60)
        raise ValueError("tiny-a.pth: truncated")

    monkeypatch.setattr(registry, "_load_entry", broken)
    errors, waiting = [], threading.Event()

    def user(progress=None):
        try:
            registry.load("tiny-a", progress=progress)
        except ValueError as err:
            errors.append(str(err))

    first = threading.Thread(target=user)
    first.start()
    assert inside.wait(60)
    second = threading.Thread(target=user, args=(lambda f, desc="": waiting.set(),))
    second.start()
    try:
        assert waiting.wait(60)
    finally:
        release.set()
    first.join(60)
    second.join(60)
    assert errors == ["tiny-a.pth: truncated"] * 2
    monkeypatch.undo()
    assert registry.loaded_keys() == [] and registry.load("tiny-a").entry.key == "tiny-a"  # a retry loads


def test_space_policy(tmp_path):
    assert on_space({"SPACE_ID": "someone/mvar-studio"}) and not on_space({}) and not on_space({"SPACE_ID": ""})
    data, fallback = tmp_path / "data", tmp_path / "fallback"
    assert space_models_dir(data, fallback) == fallback  # no persistent storage
    data.write_text("not a folder")
    assert space_models_dir(data, fallback) == fallback
    data.unlink()
    data.mkdir()
    assert space_models_dir(data, fallback) == data / "models"  # persistent storage: kept across restarts


def test_on_a_space_the_official_presets_are_offered_after_the_default_models(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the default models must load without the hub")

    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = no_network
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setenv("SPACE_ID", "someone/mvar-studio")
    monkeypatch.setattr("app.registry.space_models_dir", lambda: tmp_path / "space-models")
    registry = ModelRegistry(assets_dir=ASSETS)  # no --download, no --models-dir: the Space decides
    assert registry.space and registry.models_dir == tmp_path / "space-models"
    entries = registry.entries()
    assert [e.key for e in entries] == ["default", *EVERY_KEY]
    assert entries[0].source == "default" and {e.source for e in entries[1:]} == {"hub"}
    pair = registry.entry("mvar-d16+var-d16")
    assert (pair.tokenizer, pair.transformer, pair.var_transformer) == ("vae", "mvar-d16", "var-d16")
    assert pair.label == "MVAR-d16 with the VAR-d16 baseline (download from the hub)"
    assert registry.load("default").entry.key == "default"  # at once, no download
    # off a Space, the same registry offers no downloads
    monkeypatch.delenv("SPACE_ID")
    assert keys(ModelRegistry(tmp_path / "space-models", assets_dir=ASSETS)) == ["default"]
