"""The app's handlers and figure builders, on tiny random models (fast, no server)."""

import numpy as np
import pytest
import torch

from app import handlers, plots
from app.analysis import AttentionStats, mass_per_key_scale, scale_grid, window_box, window_mass
from app.registry import ModelRegistry
from mvar.schedule import ScaleSchedule

from .conftest import registry_of

SCHEDULE = ScaleSchedule()


@pytest.fixture(scope="module")
def registry(tiny_model_files):
    return registry_of(tiny_model_files)


@pytest.fixture(scope="module")
def record(registry):
    frames = list(handlers.generate_frames(registry, "tiny", "class-3", 7, 1.0, 10, 0.95, False, 2, "fp32"))
    return frames


def test_generation_streams_a_frame_per_scale_per_model(record):
    frames = record
    assert len(frames) == 2 * 10 + 1
    assert all(f.record is None for f in frames[:-1]) and frames[-1].record is not None
    rec = frames[-1].record
    for run in rec.runs.values():
        assert len(run.previews[0]) == 10 and len(run.finals) == 2 and len(run.seconds) == 10
        assert len(run.f_hats) == 10 and run.f_hats[-1].shape[0] == 2  # every sample's maps, for later
        assert run.previews[0][-1].shape == (64, 64, 3) and run.previews[0][-1].dtype == np.uint8
        assert list(run.attention) == [0]  # captured for the sample shown only
    assert [f.scale for f in frames[:-1]] == [s for s in range(10) for _ in range(2)]
    assert frames[0].status.startswith("scale 1 of 10 (1x1)")
    # each image is labelled with its own scale: MVAR runs a scale before VAR
    assert frames[4].shown_scales == {"MVAR": "scale 3 of 10 (3x3)", "VAR": "scale 2 of 10 (2x2)"}
    assert frames[-1].shown_scales == {"MVAR": "scale 10 of 10 (16x16)", "VAR": "scale 10 of 10 (16x16)"}
    done = frames[-1].status
    assert done.startswith("done: 2 images of 'class-3', seed 7 (samples use seeds 7..8), fp32")
    assert "generation alone: MVAR" in done and "previews" in done and "attention capture" in done


def test_the_timings_separate_generation_previews_and_capture(record):
    rec = record[-1].record
    for run in rec.runs.values():
        assert all(t > 0 for t in run.seconds) and all(t > 0 for t in run.preview_seconds)
        assert all(t > 0 for t in run.capture_seconds)
    summary = handlers.timing_summary(rec.runs)
    total = sum(rec.runs["MVAR"].seconds) * 1000
    assert f"MVAR {total:.0f} ms" in summary


def test_same_seed_gives_the_same_images_and_slider_needs_no_recompute(registry, record):
    rec = record[-1].record
    again = list(handlers.generate_frames(registry, "tiny", "class-3", 7, 1.0, 10, 0.95, False, 1, "fp32"))[-1]
    assert np.array_equal(again.record.runs["MVAR"].finals[0], rec.runs["MVAR"].finals[0])
    mvar, var = handlers.scale_view(rec, 5)  # the page's scale 5 of 10 is index 4
    assert mvar is rec.runs["MVAR"].previews[0][4] and var is rec.runs["VAR"].previews[0][4]
    strips = handlers.filmstrips(rec, 5)
    assert strips[0].current == 4 and strips[0].labels[4] == "5: 5x5" and len(strips[0].frames) == 10
    image = plots.filmstrip(strips[0].frames, strips[0].labels, strips[0].current)
    assert image.shape[0] > 200 and image.shape[1] < image.shape[0] * 3  # two rows of five: readable on a phone
    assert (image[..., 0] > 200).sum() > 100  # the current frame's red border


def test_another_sample_gets_its_own_previews_and_attention(registry, record):
    rec = record[-1].record
    models = registry.load("tiny")
    previews = handlers.decode_sample_previews(models, rec, 1)
    attention = handlers.capture_sample_attention(models, rec, 1)
    assert np.array_equal(previews["MVAR"][-1], rec.runs["MVAR"].finals[1])  # the last preview is the final image
    for name, run in rec.runs.items():
        run.previews[1], run.attention[1] = previews[name], attention[name]
    first, second = handlers.attention_view(rec, 10, "mean", "mean", 3, 3, 1), handlers.attention_view(
        rec, 10, "mean", "mean", 3, 3, 2)
    assert second.sample == 1 and not np.allclose(first.mvar_grid, second.mvar_grid)
    assert not np.array_equal(handlers.scale_view(rec, 10, 2)[0], handlers.scale_view(rec, 10, 1)[0])
    with pytest.raises(handlers.UserError, match="Sample must be a whole number from 1 to 2, got 3"):
        handlers.scale_view(rec, 10, 3)


def test_attention_view_window_and_masses(record):
    rec = record[-1].record
    view = handlers.attention_view(rec, 10, "mean", "mean", 0, 15)
    assert view.mvar_grid.shape == (16, 16) and view.window == (0, 9, 7, 7)
    assert "rows 0..6, columns 9..15" in view.caption and "scale 10 of 10 (16x16)" in view.caption
    assert abs(view.var_mass.sum() - 1) < 1e-3 and len(view.var_grids) == 10
    early = handlers.attention_view(rec, 4, "1", "0", 1, 2)
    assert "whole 4x4 grid" in early.caption and early.window is None
    assert plots.mask_figure(rec.patch_nums, "mvar", highlight_row=view.position).layout.yaxis.title.text


def test_the_token_boxes_follow_a_scale_change_only(record):
    rec = record[-1].record
    assert handlers.token_after_scale_change(rec, 9, 2, 15, 15) == (2, 2, True)
    assert handlers.token_after_scale_change(rec, 2, 2, 16, 0) == (16, 0, False)  # same scale: checked later
    assert handlers.token_after_scale_change(rec, None, 2, 5, 5) == (5, 5, False)
    assert handlers.token_after_scale_change(rec, 9, 2, "", 3) == ("", 3, False)


def test_the_token_moves_to_the_same_place_when_the_scale_changes():
    assert handlers.move_token(15, 15, 16, 3) == (2, 2)  # the corner stays the corner
    assert handlers.move_token(0, 0, 16, 4) == (0, 0)
    assert handlers.move_token(8, 4, 16, 4) == (2, 1)
    assert handlers.move_token(2, 2, 3, 16) == (13, 13)


def test_captured_mvar_weights_live_in_the_window(record):
    rec = record[-1].record
    weights = rec.runs["MVAR"].attention[0][9][1][:, 15 * 16 + 0].float()  # layer 1, query (15, 0), (H, 256)
    grid = weights.view(-1, 16, 16)
    assert torch.allclose(grid[:, 9:16, 0:7].sum((-1, -2)), torch.ones(grid.shape[0]), atol=1e-2)


@pytest.mark.parametrize("args,message", [
    (dict(class_name="nope"), "Class must be one of the 12 in the list, got 'nope'"),
    (dict(seed="abc"), "Seed must be a whole number from 0 to 2\\^63 - 1 \\(9223372036854775807\\), got 'abc'"),
    (dict(seed=-1), "Seed must be a whole number from 0 to"),
    (dict(seed=99999999999999999999), "Seed must be a whole number from 0 to"),
    (dict(seed=None), "Seed must be a whole number .* got an empty box"),
    (dict(top_k=-3), "top-k must be a whole number from 0 to 32, got -3"),
    (dict(top_k=100000), "top-k must be a whole number from 0 to 32, got 100000"),
    (dict(top_k=1.5), "top-k must be a whole number"),
    (dict(top_k=None), "top-k must be a whole number from 0 to 32, got an empty box"),
    (dict(top_p=0), "top-p must be a number above 0 to 1"),
    (dict(cfg=-3), "CFG must be a number from 0 to 10, got -3"),
    (dict(cfg=1000), "CFG must be a number from 0 to 10, got 1000"),
    (dict(cfg=None), "CFG must be a number from 0 to 10, got an empty box"),
    (dict(num_images=0), "Images must be a whole number from 1 to 4, got 0"),
    (dict(num_images=100), "Images must be a whole number from 1 to 4, got 100"),
    (dict(precision="fp8"), "Precision must be"),
    (dict(kernel="4"), "Window k must be"),
    (dict(refine_step=11), "Refine step must be a whole number from 0 to 10, got 11"),
])
def test_bad_settings_are_refused_in_the_widgets_words(registry, args, message):
    values = dict(class_name="class-1", seed=1, cfg=1.0, top_k=5, top_p=0.9, smooth=False, num_images=1,
                  precision="fp32", kernel="7", refine_step=8) | args
    with pytest.raises(handlers.UserError, match=message):
        handlers.generate_frames(registry, "tiny", **values)  # refused before any work: nothing to undo


def test_mvar_attention_settings_reach_the_generation(registry):
    models = registry.load("tiny")
    assert handlers.kernel_choices(models) == ["1", "3", "5", "7", "9", "11", "13", "15", "full"]
    settings = handlers.parse_settings(models, "class-1", 1, 1.0, 5, 0.9, False, 1, "fp32", "3", 9)
    assert settings.mvar_mode.kernel_size == 3 and settings.mvar_mode.refine_step == 9
    full = handlers.parse_settings(models, "class-1", 1, 1.0, 5, 0.9, False, 1, "fp32", "full", 2)
    assert not any(full.mvar_mode.is_windowed(s) for s in range(10))


def test_bad_view_arguments_give_user_errors(record):
    rec = record[-1].record
    with pytest.raises(handlers.UserError, match="Token row must be a whole number from 0 to 15, got 16"):
        handlers.attention_view(rec, 10, "mean", "mean", 16, 0)
    with pytest.raises(handlers.UserError, match="Scale must be a whole number from 1 to 10, got 11"):
        handlers.scale_view(rec, 11)
    with pytest.raises(handlers.UserError, match="Head must be 'mean' or a whole number from 0 to 1"):
        handlers.attention_view(rec, 10, "mean", "5", 0, 0)
    with pytest.raises(handlers.UserError, match="generate an image first"):
        handlers.attention_view(None, 10, "mean", "mean", 0, 0)
    with pytest.raises(handlers.UserError, match="unknown model"):
        handlers.generate_frames(_EmptyRegistry(), "x", "a", 1, 1, 1, 1, False, 1, "fp32")


class _EmptyRegistry(ModelRegistry):
    def __init__(self):
        super().__init__(None, assets_dir="/nonexistent")


def test_default_precision_is_fp32_where_bf16_buys_nothing(registry):
    models = registry.load("tiny")
    assert handlers.default_precision(models, ("fp32", "bf16")) == "fp32"


def test_the_ablation_runs_the_three_attentions_on_one_sample(registry):
    models = registry.load("tiny")
    settings = handlers.parse_settings(models, "class-2", 3, 1.5, 0, 1.0, False, 1, "fp32", "5", 8)
    result = handlers.ablation(models, settings)
    assert list(result.previews) == ["VAR", "+ scale-Markov", "full MVAR"]
    assert all(len(p) == 10 for p in result.previews.values())
    assert result.costs["VAR"]["KV cache MiB"] > 0 == result.costs["full MVAR"]["KV cache MiB"]
    assert result.costs["full MVAR"]["attention GFLOPs"] < result.costs["+ scale-Markov"]["attention GFLOPs"] \
        < result.costs["VAR"]["attention GFLOPs"]
    table = handlers.ablation_table(result)
    assert "| full MVAR |" in table and "k = 5 from scale 9 on" in table
    with pytest.raises(handlers.UserError, match="generate first"):
        handlers.ablation(models, None)


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
    figure = plots.mask_figure(SCHEDULE.patch_nums, "scale-markov", highlight_row=600)
    assert figure.layout.xaxis.title.text == "key position" and figure.layout.shapes[0].y0 == 600


def test_per_scale_costs_describe_what_was_run(registry, record):
    costs = handlers.per_scale_costs(registry.load("tiny"), record[-1].record)
    assert costs["kv_cache_mib"]["MVAR"] == [0.0] * 10 and costs["kv_cache_mib"]["VAR"][-1] > 0
    assert len(costs["latency_ms"]["VAR"]) == 10 and costs["batch"] == 2 and costs["dtype"] == "fp32"
    bars = plots.per_scale_bars(costs["kv_cache_mib"], "KV", "MiB", zero_note="0: no cache")
    assert list(bars.data[1].text) == ["0: no cache"] * 10


def test_charts_read(registry):
    from mvar.config import MVAR_MODE, PRESETS, VAR_MODE
    presets = {n: {"VAR": handlers.analytic_memory_mib(PRESETS[n].transformer, VAR_MODE),
                   "MVAR": handlers.analytic_memory_mib(PRESETS[n].transformer, MVAR_MODE)} for n in ("d16", "d20")}
    figure = plots.preset_memory_figure(presets, "sizes")
    colours = [trace.line.color for trace in figure.data]
    assert len(set(colours)) == 4  # one shade per size and mode: the lines can be told apart
    assert list(figure.layout.xaxis.ticktext) == ["1", "2", "4", "8", "16", "32", "64"]
    measured = plots.memory_figure({"VAR": {1: 1, 64: 9}}, {"VAR": {1: 1.0, 2: 2.0, 4: 3.0}}, "m")
    assert measured.layout.xaxis.range[1] < np.log10(8)  # the axis spans the measured batches
    empty = plots.placeholder_figure("Latency", "generate an image with this model first")
    assert empty.layout.annotations[0].text.startswith("generate")


def test_analysis_conclusion_in_words(registry):
    stats = handlers.attention_statistics(registry.load("tiny"), samples=1)
    text = handlers.analysis_conclusion(stats, 7)
    assert "a 7x7 window (MVAR's k) captures" in text and "% of its attention on its own scale" in text


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
    with pytest.raises(handlers.UserError, match="Samples must be a whole number from 1 to 16"):
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
    frames = list(handlers.generate_frames(registry, "tiny", "class-3", 7, 1.0, 10, 0.95, False, 1, "bf16"))
    rec = frames[-1].record
    assert rec is not None and rec.runs["MVAR"].finals[0].shape == (64, 64, 3)
    models = registry.load("tiny")
    tokenizer, mvar, var = models.in_precision(torch.bfloat16)
    assert mvar.head.weight.dtype == torch.bfloat16 and var is mvar  # one checkpoint, both modes
    assert tokenizer.decoder.conv_out.weight.dtype == torch.bfloat16
    assert models.transformer.head.weight.dtype == torch.float32  # the fp32 models are untouched
    assert models.in_precision(torch.bfloat16)[1] is mvar  # made once
    assert models.in_precision(None)[1] is models.transformer
