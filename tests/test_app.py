"""The app's handlers and figure builders, on tiny random models (fast, no server)."""

import numpy as np
import pytest
import torch

from app import handlers, plots
from app.analysis import AttentionStats, mass_per_key_scale, scale_grid, window_box, window_mass
from app.registry import ModelEntry, ModelRegistry
from mvar.checkpoints import save_model
from mvar.schedule import ScaleSchedule

from .conftest import scramble

SCHEDULE = ScaleSchedule()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_preset):
    from mvar.tokenizer import MultiScaleVQVAE
    from mvar.transformer import ScaleTransformer

    folder = tmp_path_factory.mktemp("tiny-models")
    save_model(folder / "tok.safetensors", scramble(MultiScaleVQVAE(tiny_preset.tokenizer), seed=3))
    save_model(folder / "mvar.safetensors", scramble(ScaleTransformer(tiny_preset.transformer), seed=4),
               extra={"class_names": [f"class-{i}" for i in range(12)], "sampling_defaults": {"cfg": 1.0}})
    entry = ModelEntry("tiny", "tiny test models", "local", str(folder / "tok.safetensors"),
                       str(folder / "mvar.safetensors"))
    return ModelRegistry(None, assets_dir=folder / "no-assets", extra=[entry])


@pytest.fixture(scope="module")
def record(registry):
    frames = list(handlers.generate_frames(registry, "tiny", "class-3", 7, 1.0, 10, 0.95, False, 2))
    return frames


def test_generation_streams_a_frame_per_scale_per_model(record):
    frames = record
    assert len(frames) == 2 * 10 + 1
    assert all(f.record is None for f in frames[:-1]) and frames[-1].record is not None
    rec = frames[-1].record
    for run in rec.runs.values():
        assert len(run.previews) == 10 and len(run.finals) == 2 and len(run.seconds) == 10
        assert run.previews[-1].shape == (64, 64, 3) and run.previews[-1].dtype == np.uint8
    assert "same weights" in frames[-1].status


def test_same_seed_gives_the_same_images_and_slider_needs_no_recompute(registry, record):
    rec = record[-1].record
    again = list(handlers.generate_frames(registry, "tiny", "class-3", 7, 1.0, 10, 0.95, False, 1))[-1].record
    assert np.array_equal(again.runs["MVAR"].finals[0], rec.runs["MVAR"].finals[0])
    mvar, var = handlers.scale_view(rec, 4)
    assert mvar is rec.runs["MVAR"].previews[4] and var is rec.runs["VAR"].previews[4]
    strips = handlers.filmstrips(rec)
    assert strips[0].shape[1] > strips[0].shape[0] * 9


def test_attention_view_window_and_masses(record):
    rec = record[-1].record
    view = handlers.attention_view(rec, 9, "mean", "mean", 0, 15)
    assert view.mvar_overlay.shape == (384, 384, 3)
    assert "window rows 0..6, cols 9..15" in view.caption
    mass = view.var_mass.data[0].y
    assert abs(sum(mass) - 1) < 1e-3
    assert all(m.shape == (340, 340, 3) for m in view.masks)
    early = handlers.attention_view(rec, 3, "1", "0", 1, 2)
    assert "whole scale" in early.caption


def test_captured_mvar_weights_live_in_the_window(record):
    rec = record[-1].record
    weights = rec.runs["MVAR"].attention[9][1][:, 15 * 16 + 0].float()  # layer 1, query (15, 0), (H, 256)
    grid = weights.view(-1, 16, 16)
    assert torch.allclose(grid[:, 9:16, 0:7].sum((-1, -2)), torch.ones(grid.shape[0]), atol=1e-2)


@pytest.mark.parametrize("args,message", [
    (dict(class_name="nope"), "unknown class"),
    (dict(seed="x"), "seed must be an integer"),
    (dict(top_k=-3), "top_k"),
    (dict(top_p=0), "top_p"),
    (dict(cfg=-1), "cfg"),
    (dict(num_images=99), "number of images"),
])
def test_bad_settings_give_user_errors(registry, args, message):
    values = dict(class_name="class-1", seed=1, cfg=1.0, top_k=5, top_p=0.9, smooth=False, num_images=1) | args
    with pytest.raises(handlers.UserError, match=message):
        next(handlers.generate_frames(registry, "tiny", **values))


def test_bad_view_arguments_give_user_errors(record):
    rec = record[-1].record
    with pytest.raises(handlers.UserError, match="outside the 16x16 grid"):
        handlers.attention_view(rec, 9, "mean", "mean", 16, 0)
    with pytest.raises(handlers.UserError, match="scale must be in"):
        handlers.scale_view(rec, 10)
    with pytest.raises(handlers.UserError, match="head must be in"):
        handlers.attention_view(rec, 9, "mean", "5", 0, 0)
    with pytest.raises(handlers.UserError, match="generate an image first"):
        handlers.attention_view(None, 9, "mean", "mean", 0, 0)
    with pytest.raises(ValueError, match="unknown model"):
        next(handlers.generate_frames(_EmptyRegistry(), "x", "a", 1, 1, 1, 1, False, 1))


class _EmptyRegistry(ModelRegistry):
    def __init__(self):
        super().__init__(None, assets_dir="/nonexistent")


def test_overlay_colours_the_window_and_outlines_it():
    image = np.full((64, 64, 3), 128, np.uint8)
    weights = np.zeros((16, 16))
    weights[0:7, 9:16] = 1 / 49
    out = plots.attention_overlay(image, weights, (0, 15), size=160, window=(0, 9, 7, 7))
    cell = 10
    inside = out[3 * cell + 5, 12 * cell + 5].astype(int)
    outside = out[12 * cell + 5, 2 * cell + 5].astype(int)
    assert abs(inside - outside).sum() > 60  # attended cells are coloured, others only dimmed
    assert tuple(out[0 + 1, 9 * cell + 20]) == (230, 30, 30)  # the window's top edge is red


def test_token_at_maps_pixels_to_grid_cells():
    assert plots.token_at(0, 0, 384, 16) == (0, 0)
    assert plots.token_at(383, 383, 384, 16) == (15, 15)
    assert plots.token_at(384 * 3 / 16 + 1, 384 * 5 / 16 + 1, 384, 16) == (5, 3)
    assert plots.token_at(-5, 9999, 384, 13) == (12, 0)


def test_analysis_helpers():
    rows = torch.rand(3, SCHEDULE.total_tokens)
    rows /= rows.sum(-1, keepdim=True)
    mass = mass_per_key_scale(rows, SCHEDULE)
    assert torch.allclose(mass.sum(-1), torch.ones(3), atol=1e-5)
    assert scale_grid(rows, SCHEDULE, 9).shape == (3, 16, 16)
    assert window_box(16, 0, 0, 7) == (0, 0, 7, 7) and window_box(16, 15, 8, 7) == (9, 5, 7, 7)
    grid = torch.zeros(16, 16)
    grid[0:7, 0:7] = 1.0
    assert float(window_mass(grid, 0, 0, 7)) == pytest.approx(1.0)
    assert float(window_mass(grid, 0, 0, 1)) == pytest.approx(1 / 49)
    stats = AttentionStats(10)
    weights = torch.softmax(torch.randn(2, 256, SCHEDULE.total_tokens), -1)
    stats.add_scale(weights, SCHEDULE, 9)
    assert stats.mass_by_distance.sum() == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.diff(stats.mass_in_window) >= 0) and stats.mass_in_window[-1] <= 1 + 1e-6


def test_mask_images_highlight_the_row():
    image = plots.mask_image(SCHEDULE.patch_nums, "var", highlight_row=600)
    assert image.shape == (340, 340, 3)
    y = 600 * 340 // 680
    assert (image[y] == [230, 30, 30]).all(-1).any()
    with pytest.raises(ValueError, match="unknown mask kind"):
        plots.mask_image(SCHEDULE.patch_nums, "other")


def test_per_scale_costs(registry, record):
    costs = handlers.per_scale_costs(registry.load("tiny"), record[-1].record)
    assert costs["kv_cache_mib"]["MVAR"] == [0.0] * 10 and costs["kv_cache_mib"]["VAR"][-1] > 0
    assert len(costs["latency_ms"]["VAR"]) == 10


def test_downloads_are_pngs(record):
    paths = handlers.save_finals(record[-1].record)
    assert len(paths) == 4 and all(p.endswith(".png") for p in paths)


def test_memory_measured_in_subprocesses_and_analytic(registry, monkeypatch):
    models = registry.load("tiny")
    measured = handlers.measured_memory_mib(models, [1, 2])
    assert set(measured) == {"VAR", "MVAR"} and all(set(v) >= {1, 2} for v in measured.values())
    assert all(value > 0 for v in measured.values() for value in v.values())
    jobs = []
    monkeypatch.setattr("mvar.memory.measure", lambda job: jobs.append(job) or {"peak_bytes": 2**20})
    handlers.measured_memory_mib(models, [1, 2])
    assert jobs == []  # cached per loaded model: nothing measured again
    handlers.measured_memory_mib(models, [3])
    assert sorted(job.mode for job in jobs) == ["mvar", "var"] and {job.batch for job in jobs} == {3}
    from mvar.config import MVAR_MODE, VAR_MODE
    var = handlers.analytic_memory_mib(models.transformer.cfg, VAR_MODE)
    mvar = handlers.analytic_memory_mib(models.transformer.cfg, MVAR_MODE)
    assert all(mvar[b] < var[b] for b in var)


def test_analysis_is_computed_once_per_model(registry):
    models = registry.load("tiny")
    first = handlers.attention_statistics(models, samples=1)
    assert handlers.attention_statistics(models, samples=1) is first
    assert first.mass_by_distance.sum() == pytest.approx(1.0, abs=1e-3)
    assert np.all(np.diff(first.mass_in_window) >= -1e-9)
    with pytest.raises(handlers.UserError, match="samples must be"):
        handlers.attention_statistics(models, samples=0)


def test_without_any_model_files_an_untrained_stand_in_is_offered_and_labelled(tmp_path):
    registry = ModelRegistry(None, assets_dir=tmp_path / "empty")
    (entry,) = registry.entries()
    assert entry.source == "random" and "UNTRAINED" in entry.label
    models = registry.load(entry.key)
    assert models.transformer.cfg.num_classes == len(models.class_names)


def test_registry_lists_official_files_and_hub_presets_but_never_paths_from_the_browser(tmp_path, monkeypatch):
    import sys
    import types

    models = tmp_path / "models"
    models.mkdir()
    for name in ("vae_ch160v4096z32.pth", "var_d16.pth", "mvar-finetune-d16.pth", "unrelated.pth"):
        (models / name).write_bytes(b"")
    registry = ModelRegistry(models, assets_dir=tmp_path / "no-assets")
    entries = {e.key: e for e in registry.entries()}
    assert set(entries) == {"var-d16", "mvar-finetune-d16", "mvar-finetune-d16+var-d16"}
    assert entries["mvar-finetune-d16"].var_transformer is None  # alone: the same weights in VAR mode
    assert entries["mvar-finetune-d16+var-d16"].var_transformer.endswith("var_d16.pth")  # separate VAR baseline
    assert entries["mvar-finetune-d16"].sampling["cfg"] == 2.0  # the official README's suggestion
    with pytest.raises(ValueError, match="unknown model"):
        registry.load(str(models / "var_d16.pth"))  # a path is not a key
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.ModuleType("huggingface_hub"))
    online = ModelRegistry(models, assets_dir=tmp_path / "no-assets", allow_download=True)
    keys = [e.key for e in online.entries()]
    assert "mvar-d16" in keys and "var-d30" in keys and keys.count("var-d16") == 1


def test_bf16_generation_uses_bf16_copies_made_once(registry):
    frames = list(handlers.generate_frames(registry, "tiny", "class-3", 7, 1.0, 10, 0.95, False, 1, torch.bfloat16))
    rec = frames[-1].record
    assert rec is not None and rec.runs["MVAR"].finals[0].shape == (64, 64, 3)
    models = registry.load("tiny")
    tokenizer, mvar, var = models.in_precision(torch.bfloat16)
    assert mvar.head.weight.dtype == torch.bfloat16 and var is mvar  # one checkpoint, both modes
    assert tokenizer.decoder.conv_out.weight.dtype == torch.bfloat16
    assert models.transformer.head.weight.dtype == torch.float32  # the fp32 models are untouched
    assert models.in_precision(torch.bfloat16)[1] is mvar  # made once
    assert models.in_precision(None)[1] is models.transformer
