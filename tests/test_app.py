"""The app's model work, views and figure builders, on tiny random models (fast, no server)."""

import numpy as np
import pytest
import torch

from app import ablation, analysis, attention, generate, plots
from app.registry import ModelRegistry
from app.work import costs, settings, statistics
from app.work.ablation import ablation as run_ablation
from app.work.generation import generate_frames, sample_attention, sample_previews, timing_summary
from app.work.models import load_models
from app.work.settings import UserError, default_precision, kernel_choices, parse_settings
from app.work.statistics import AttentionStats, mass_per_key_scale, scale_grid, window_box, window_mass
from mvar.schedule import ScaleSchedule

from .conftest import registry_of

SCHEDULE = ScaleSchedule()
VALUES = dict(class_name="class-1", seed=1, cfg=1.0, top_k=5, top_p=0.9, smooth=False, num_images=1,
              precision="fp32", kernel="7", refine_step=8)


def frames_of(registry, key="tiny", **values):
    """The page's path: the widget values parsed once, then the generation streamed."""
    models = load_models(registry, key)
    return generate_frames(models, key, parse_settings(models, **(VALUES | values)))


@pytest.fixture(scope="module")
def registry(tiny_model_files):
    return registry_of(tiny_model_files)


@pytest.fixture(scope="module")
def record(registry):
    return list(frames_of(registry, class_name="class-3", seed=7, top_k=10, top_p=0.95, num_images=2))


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
    done = frames[-1].status  # it names what ran: the sampling, the precision and MVAR's windows
    assert done.startswith("done: 2 images of 'class-3', seed 7 (samples use seeds 7..8); CFG 1, top-k 10, "
                           "top-p 0.95, fp32; MVAR: 7x7 windows from scale 9 on  |  ")
    assert "generation alone: MVAR" in done and "previews" in done and "attention capture" in done


def test_the_timings_separate_generation_previews_and_capture(record):
    rec = record[-1].record
    for run in rec.runs.values():
        assert all(t > 0 for t in run.seconds) and all(t > 0 for t in run.preview_seconds)
        assert all(t > 0 for t in run.capture_seconds)
    summary = timing_summary(rec.runs)
    total = sum(rec.runs["MVAR"].seconds) * 1000
    assert f"MVAR {total:.0f} ms" in summary


def test_same_seed_gives_the_same_images_and_slider_needs_no_recompute(registry, record):
    rec = record[-1].record
    again = list(frames_of(registry, class_name="class-3", seed=7, top_k=10, top_p=0.95))[-1]
    # the same tokens; the accumulated maps round at 1e-7 with the batch size, so a pixel may differ by one level
    for name in ("MVAR", "VAR"):
        difference = again.record.runs[name].finals[0].astype(int) - rec.runs[name].finals[0].astype(int)
        assert np.abs(difference).max() <= 1 and (difference != 0).mean() < 0.01
    assert rec.scale(5) == 4  # the page's scale 5 of 10 is index 4
    mvar, var = generate.scale_view(rec, 4, 0)
    assert mvar is rec.runs["MVAR"].previews[0][4] and var is rec.runs["VAR"].previews[0][4]
    strips = generate.filmstrips(rec, 4, 0)
    assert strips[0].current == 4 and strips[0].labels[4] == "5: 5x5" and len(strips[0].frames) == 10
    image = plots.filmstrip(strips[0].frames, strips[0].labels, strips[0].current)
    assert image.shape[0] > 200 and image.shape[1] < image.shape[0] * 3  # two rows of five: readable on a phone
    assert (image[..., 0] > 200).sum() > 100  # the current frame's red border


def test_another_sample_gets_its_own_previews_and_attention(registry, record):
    rec = record[-1].record
    models = registry.load("tiny")
    previews = sample_previews(models, rec, 1)
    captured = sample_attention(models, rec, 1)
    assert np.array_equal(previews["MVAR"][-1], rec.runs["MVAR"].finals[1])  # the last preview is the final image
    for name, run in rec.runs.items():
        run.previews[1], run.attention[1] = previews[name], captured[name]
    first, second = attention.attention_view(rec, 10, "mean", "mean", 3, 3, 1), attention.attention_view(
        rec, 10, "mean", "mean", 3, 3, 2)
    assert second.sample == 1 and not np.allclose(first.mvar_grid, second.mvar_grid)
    assert not np.array_equal(generate.scale_view(rec, 9, 1)[0], generate.scale_view(rec, 9, 0)[0])
    with pytest.raises(UserError, match="Sample must be a whole number from 1 to 2, got 3"):
        rec.sample(3)


def test_attention_view_window_and_masses(record):
    rec = record[-1].record
    view = attention.attention_view(rec, 10, "mean", "mean", 0, 15)
    assert view.mvar_grid.shape == (16, 16) and view.window == (0, 9, 7, 7)
    assert "rows 0..6, columns 9..15" in view.caption and "scale 10 of 10 (16x16)" in view.caption
    assert abs(view.var_mass.sum() - 1) < 1e-3 and len(view.var_grids) == 10
    early = attention.attention_view(rec, 4, "1", "0", 1, 2)
    assert "whole 4x4 grid" in early.caption and early.window is None
    assert plots.mask_figure(rec.patch_nums, "mvar", highlight_row=view.position).layout.yaxis.title.text


def test_the_token_boxes_follow_a_scale_change_only(record):
    rec = record[-1].record
    assert attention.token_after_scale_change(rec, 9, 2, 15, 15) == (2, 2, True)
    assert attention.token_after_scale_change(rec, 2, 2, 16, 0) == (16, 0, False)  # same scale: checked later
    assert attention.token_after_scale_change(rec, None, 2, 5, 5) == (5, 5, False)
    assert attention.token_after_scale_change(rec, 9, 2, "", 3) == ("", 3, False)
    assert attention.token_after_scale_change(rec, 9, 2, 3.5, 3) == (3.5, 3, False)  # a fraction: refused later


def test_the_token_moves_to_the_same_place_when_the_scale_changes():
    assert attention.move_token(15, 15, 16, 3) == (2, 2)  # the corner stays the corner
    assert attention.move_token(0, 0, 16, 4) == (0, 0)
    assert attention.move_token(8, 4, 16, 4) == (2, 1)
    assert attention.move_token(2, 2, 3, 16) == (13, 13)


def test_captured_mvar_weights_live_in_the_window(record):
    rec = record[-1].record
    weights = rec.runs["MVAR"].attention[0][9][1][:, 15 * 16 + 0].float()  # layer 1, query (15, 0), (H, 256)
    grid = weights.view(-1, 16, 16)
    assert torch.allclose(grid[:, 9:16, 0:7].sum((-1, -2)), torch.ones(grid.shape[0]), atol=1e-2)


SEED_RANGE = "from 0 to 2\\^53 - 1 \\(9007199254740991\\)"


@pytest.mark.parametrize("args,message", [
    (dict(class_name="nope"), "Class must be one of the 12 in the list, got 'nope'"),
    (dict(seed="abc"), f"Seed must be a whole number {SEED_RANGE}, got 'abc'"),  # letters, through the API
    (dict(seed=-1), f"Seed must be a whole number {SEED_RANGE}, got -1"),
    (dict(seed=2**53), f"Seed must be a whole number {SEED_RANGE}, got 9007199254740992"),
    (dict(seed=None), f"Seed must be a whole number {SEED_RANGE}, got no number"),  # empty, or not a number
    (dict(seed=1.5), f"Seed must be a whole number {SEED_RANGE}, got 1.5"),  # refused, not rounded
    (dict(top_k=-3), "top-k must be a whole number from 0 to 32, got -3"),
    (dict(top_k=100000), "top-k must be a whole number from 0 to 32, got 100000"),
    (dict(top_k=2.5), "top-k must be a whole number from 0 to 32, got 2.5"),
    (dict(top_k=None), "top-k must be a whole number from 0 to 32, got no number"),
    (dict(top_p=0), "top-p must be a number above 0 and at most 1, got 0"),
    (dict(top_p=None), "top-p must be a number above 0 and at most 1, got no number"),
    (dict(cfg=-3), "CFG must be a number from 0 to 10, got -3"),
    (dict(cfg=1000), "CFG must be a number from 0 to 10, got 1000"),
    (dict(cfg=None), "CFG must be a number from 0 to 10, got no number"),
    (dict(cfg="abc"), "CFG must be a number from 0 to 10, got 'abc'"),
    (dict(num_images=0), "Images must be a whole number from 1 to 4, got 0"),
    (dict(num_images=100), "Images must be a whole number from 1 to 4, got 100"),
    (dict(num_images=2.5), "Images must be a whole number from 1 to 4, got 2.5"),
    (dict(precision="fp8"), "Precision must be one of fp32, bf16, fp16, got 'fp8'"),
    (dict(kernel="4"), "Window k must be one of the 9 in the list, got '4'"),
    (dict(kernel=7.5), "Window k must be one of the 9 in the list, got 7.5"),
    (dict(refine_step=11), "Refine step must be a whole number from 0 to 10, got 11"),
    (dict(refine_step=2.5), "Refine step must be a whole number from 0 to 10, got 2.5"),
    (dict(refine_step=None), "Refine step must be a whole number from 0 to 10, got no number"),  # no default
])
def test_bad_settings_are_refused_in_the_widgets_words(registry, args, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        parse_settings(registry.load("tiny"), **(VALUES | args))  # refused before any work: nothing to undo


@pytest.mark.parametrize("seed", [0, 1, 12345678901, 2**53 - 1, float(2**40), "77"])
def test_the_seed_used_is_the_seed_typed_in_the_whole_range(registry, seed):
    assert parse_settings(registry.load("tiny"), **(VALUES | dict(seed=seed))).seed == int(seed)
    assert type(parse_settings(registry.load("tiny"), **(VALUES | dict(seed=seed))).seed) is int


def test_labels_and_refusals_say_the_same_range():
    for field, note in ((settings.SEED, ""), (settings.CFG, "0 = none"), (settings.TOP_P, "1 = off"),
                        (settings.top_k_field(32), "0 = off"), (settings.refine_field(10), "")):
        label = field.label(note)
        with pytest.raises(UserError) as err:
            field.parse(-1)
        assert field.range_text in label
        assert field.range_text.replace(", up to", " and at most").replace("above", "a number above") in str(
            err.value) or field.range_text in str(err.value)
    assert settings.SEED.label() == "Seed (0 to 2^53 - 1)" and settings.SEED.limits()["maximum"] == 2**53 - 1
    assert settings.TOP_P.label("1 = off") == "top-p (above 0, up to 1; 1 = off)"


def test_mvar_attention_settings_reach_the_generation(registry):
    models = registry.load("tiny")
    assert kernel_choices(models.transformer.cfg.patch_nums) == ["1", "3", "5", "7", "9", "11", "13", "15", "full"]
    chosen = parse_settings(models, "class-1", 1, 1.0, 5, 0.9, False, 1, "fp32", "3", 9)
    assert chosen.mvar_mode.kernel_size == 3 and chosen.mvar_mode.refine_step == 9
    full = parse_settings(models, "class-1", 1, 1.0, 5, 0.9, False, 1, "fp32", "full", 2)
    assert not any(full.mvar_mode.is_windowed(s) for s in range(10))


def test_bad_view_arguments_give_user_errors(record):
    rec = record[-1].record
    with pytest.raises(UserError, match="Token row must be a whole number from 0 to 15, got 16"):
        attention.attention_view(rec, 10, "mean", "mean", 16, 0)
    with pytest.raises(UserError, match="Token column must be a whole number from 0 to 15, got 3.7"):
        attention.attention_view(rec, 10, "mean", "mean", 3, 3.7)  # refused, not rounded
    for scale in (11, 0, 5.5, None):
        with pytest.raises(UserError, match="^Scale must be a whole number from 1 to 10, got "):
            rec.scale(scale)
    with pytest.raises(UserError, match="Head must be 'mean' or a whole number from 0 to 1"):
        attention.attention_view(rec, 10, "mean", "5", 0, 0)
    with pytest.raises(UserError, match="generate an image first"):
        attention.attention_view(None, 10, "mean", "mean", 0, 0)
    with pytest.raises(UserError, match="unknown model"):
        load_models(_EmptyRegistry(), "x")


class _EmptyRegistry(ModelRegistry):
    def __init__(self):
        super().__init__(None, assets_dir="/nonexistent")


def test_default_precision_is_fp32_where_bf16_buys_nothing(registry):
    models = registry.load("tiny")
    assert default_precision(models, ("fp32", "bf16")) == "fp32"


def test_the_ablation_runs_the_three_attentions_on_one_sample(registry):
    models = registry.load("tiny")
    chosen = parse_settings(models, "class-2", 3, 1.5, 0, 1.0, False, 1, "fp32", "5", 8)
    result = run_ablation(models, chosen)
    assert list(result.previews) == ["VAR", "+ scale-Markov", "full MVAR"]
    assert all(len(p) == 10 for p in result.previews.values())
    assert result.costs["VAR"]["KV cache MiB"] > 0 == result.costs["full MVAR"]["KV cache MiB"]
    assert result.costs["full MVAR"]["attention GFLOPs"] < result.costs["+ scale-Markov"]["attention GFLOPs"] \
        < result.costs["VAR"]["attention GFLOPs"]
    table = ablation.ablation_table(result)
    assert "| full MVAR |" in table and "full MVAR: 5x5 windows from scale 9 on" in table
    with pytest.raises(UserError, match="generate first"):
        run_ablation(models, None)


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


def test_mask_figures_mark_the_row():
    with pytest.raises(ValueError, match="unknown mask kind"):
        plots.mask_figure(SCHEDULE.patch_nums, "other")
    figure = plots.mask_figure(SCHEDULE.patch_nums, "scale-markov", highlight_row=600)
    assert figure.layout.xaxis.title.text == "key position" and figure.layout.shapes[0].y0 == 600


def test_per_scale_costs_describe_what_was_run(registry, record):
    figures = costs.per_scale_costs(registry.load("tiny"), record[-1].record)
    assert figures["kv_cache_mib"]["MVAR"] == [0.0] * 10 and figures["kv_cache_mib"]["VAR"][-1] > 0
    assert len(figures["latency_ms"]["VAR"]) == 10 and figures["batch"] == 2 and figures["dtype"] == "fp32"
    bars = plots.per_scale_bars(figures["kv_cache_mib"], "KV", "MiB", zero_note="0: no cache")
    assert list(bars.data[1].text) == ["0: no cache"] * 10


def test_charts_read(registry):
    from mvar.config import MVAR_MODE, PRESETS, VAR_MODE
    presets = {n: {"VAR": costs.analytic_memory_mib(PRESETS[n].transformer, VAR_MODE),
                   "MVAR": costs.analytic_memory_mib(PRESETS[n].transformer, MVAR_MODE)} for n in ("d16", "d20")}
    figure = plots.preset_memory_figure(presets, "sizes")
    colours = [trace.line.color for trace in figure.data]
    assert len(set(colours)) == 4  # one shade per size and mode: the lines can be told apart
    assert list(figure.layout.xaxis.ticktext) == ["1", "2", "4", "8", "16", "32", "64"]
    measured = plots.memory_figure({"VAR": {1: 1, 64: 9}}, {"VAR": {1: 1.0, 2: 2.0, 4: 3.0}}, "m")
    assert measured.layout.xaxis.range[1] < np.log10(8)  # the axis spans the measured batches
    empty = plots.placeholder_figure("Latency", "generate an image with this model first")
    assert empty.layout.annotations[0].text.startswith("generate")


def test_analysis_conclusion_in_words(registry):
    stats = statistics.attention_statistics(registry.load("tiny"), samples=1)
    text = analysis.analysis_conclusion(stats, 7)
    assert "a 7x7 window (MVAR's k) captures" in text and "% of its attention on its own scale" in text


def test_memory_measured_in_subprocesses_and_analytic(registry, monkeypatch):
    models = registry.load("tiny")
    measured = costs.measured_memory_mib(models, [1, 2])
    assert set(measured) == {"VAR", "MVAR"} and all(set(v) >= {1, 2} for v in measured.values())
    assert all(value > 0 for v in measured.values() for value in v.values())
    jobs = []
    monkeypatch.setattr("mvar.memory.measure", lambda job: jobs.append(job) or {"peak_bytes": 2**20})
    costs.measured_memory_mib(models, [1, 2])
    assert jobs == []  # cached per loaded model: nothing measured again
    costs.measured_memory_mib(models, [3])
    assert sorted(job.mode for job in jobs) == ["mvar", "var"] and {job.batch for job in jobs} == {3}
    from mvar.config import MVAR_MODE, VAR_MODE
    var = costs.analytic_memory_mib(models.transformer.cfg, VAR_MODE)
    mvar = costs.analytic_memory_mib(models.transformer.cfg, MVAR_MODE)
    assert all(mvar[b] < var[b] for b in var)


def test_analysis_is_computed_once_per_model(registry):
    models = registry.load("tiny")
    first = statistics.attention_statistics(models, samples=1)
    assert statistics.attention_statistics(models, samples=1) is first
    assert first.mass_by_distance.sum() == pytest.approx(1.0, abs=1e-3)
    assert np.all(np.diff(first.mass_in_window) >= -1e-9)
    with pytest.raises(UserError, match="Samples must be a whole number from 1 to 16"):
        statistics.attention_statistics(models, samples=0)


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
    frames = list(frames_of(registry, class_name="class-3", seed=7, top_k=10, top_p=0.95, precision="bf16"))
    rec = frames[-1].record
    assert rec is not None and rec.runs["MVAR"].finals[0].shape == (64, 64, 3)
    models = registry.load("tiny")
    tokenizer, mvar, var = models.in_precision(torch.bfloat16)
    assert mvar.head.weight.dtype == torch.bfloat16 and var is mvar  # one checkpoint, both modes
    assert tokenizer.decoder.conv_out.weight.dtype == torch.bfloat16
    assert models.transformer.head.weight.dtype == torch.float32  # the fp32 models are untouched
    assert models.in_precision(torch.bfloat16)[1] is mvar  # made once
    assert models.in_precision(None)[1] is models.transformer


def test_the_about_note_credits_every_artwork_source_with_its_licence():
    from app.page import DEFAULT_MODELS_NOTE

    for credit in ("© Microsoft", "MIT", "Noto", "Apache License 2.0",
                   "Twemoji graphics by Twitter, Inc. and other contributors", "CC BY 4.0", "CREDITS.md"):
        assert credit in DEFAULT_MODELS_NOTE
