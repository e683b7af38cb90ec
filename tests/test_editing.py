"""The Edit tab's model work (app/work/editing.py) and views (app/edit.py) on tiny random models: source images
and their notes, the dataset samples, masks from the painter and the presets, refusals in the widgets' words,
the streamed edit against mvar.editing.edit, stepping, the pyramid, and the tasks."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from app import edit as edit_tab
from app import plots
from app.dataset_samples import SHIPPED
from app.store import GenerationStore, record_bytes
from app.tasks import model_tasks
from app.work import editing
from app.work.editing import MAX_UPLOAD_BYTES
from app.work.settings import UserError
from app.zerogpu import GpuTasks
from mvar.config import VAR_MODE
from mvar.editing import edit, image_pyramid, outpaint_mask
from mvar.tokenizer import to_uint8

from .conftest import fake_spaces, registry_of
from .test_app import frames_of

SIZE = 64  # the tiny tokenizer's image size
CANVAS = edit_tab.CANVAS
SAMPLE = "clock 2 (Twemoji)"  # a dataset sample: 64 px, like the tiny models' images


@pytest.fixture(scope="module")
def registry(tiny_model_files):
    return registry_of(tiny_model_files)


@pytest.fixture(scope="module")
def models(registry):
    return registry.load("tiny")


@pytest.fixture(scope="module")
def source():
    return editing.dataset_image(SAMPLE, SIZE)


def painted(mask: np.ndarray, color=(255, 255, 255), alpha: int = 190) -> dict:
    """The editor's value with ``mask`` (at any size) painted on one layer, as the page sends it."""
    picked = (np.arange(CANVAS) * mask.shape[0] // CANVAS).clip(0, mask.shape[0] - 1)
    inside = mask[picked][:, picked]
    layer = np.zeros((CANVAS, CANVAS, 4), np.uint8)
    layer[inside] = (*color, alpha)
    background = Image.new("RGBA", (CANVAS, CANVAS), (10, 20, 30, 255))
    return {"background": background, "layers": [Image.fromarray(layer, "RGBA")], "composite": background}


def centre_square(size: int = SIZE, side: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    start = (size - side) // 2
    mask[start : start + side, start : start + side] = True
    return mask


# ----- source images -----------------------------------------------------------------------------


def test_a_dataset_sample_is_the_assets_cell_used_as_it_is_with_its_credit(source):
    sample = SHIPPED.sample(SAMPLE)
    assert np.array_equal(source.pixels, SHIPPED.image(sample)) and source.class_name == "clock"
    assert source.note == "" and source.origin == (
        "dataset sample clock 2 (Twemoji): the five-thirty emoji, Twemoji graphics by Twitter, Inc. and other "
        "contributors (CC BY 4.0)")
    assert source.describe().endswith(": 64x64, used as it is.")
    bigger = editing.dataset_image(SAMPLE, 128)  # a 128 px model: resized, and the page says so
    assert bigger.pixels.shape == (128, 128, 3) and bigger.note == "resized from 64x64 to 128x128"
    with pytest.raises(UserError, match=r"^Dataset sample must be one of the 36 in the list, got 'sun 1'"):
        editing.dataset_image("sun 1", SIZE)


def test_the_dataset_samples_are_named_and_credited_cell_by_cell():
    names = SHIPPED.names()
    assert len(names) == 36 and len(set(names)) == 36 and names[3] == "heart 1 (Fluent Color)"
    interleaved = SHIPPED.interleaved()  # the "Sample from the dataset" button: one class after another
    assert sorted(interleaved) == sorted(names) and interleaved[:2] == ["smiley face 1 (Fluent 3D)",
                                                                       "heart 1 (Fluent Color)"]
    for sample in SHIPPED.samples:
        assert SHIPPED.image(sample).shape == (64, 64, 3) and sample.credit in sample.describe()
        if sample.style == "twemoji":  # CC BY: the credit goes with the image
            assert "Twemoji graphics by Twitter, Inc. and other contributors" in sample.describe()
    cells = [SHIPPED.image(SHIPPED.sample(name)) for name in names[:3]]
    assert not np.array_equal(cells[0], cells[1])  # each name its own cell


def test_the_dataset_class_sets_the_class_only_for_a_model_that_has_it(models, source):
    assert editing.source_class(models, source) is None  # the tiny model's classes are class-0 ... class-11

    class Named:
        class_names = ["smiley face", "clock"]

    assert editing.source_class(Named, source) == "clock"


def test_an_upload_of_any_size_aspect_and_mode_is_fitted_and_the_page_says_how(tmp_path):
    rgba = np.zeros((60, 100, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :50, 3] = 255  # the left half opaque, the right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "wide photo_1.png")
    source = editing.uploaded_image(tmp_path / "wide photo_1.png", SIZE)
    assert source.pixels.shape == (64, 64, 3) and source.pixels.dtype == np.uint8
    assert "transparent pixels put on white" in source.note
    assert "centre-cropped from 100x60 to 60x60" in source.note and "resized from 60x60 to 64x64" in source.note
    assert source.origin == "wide photo_1.png" and r"wide photo\_1.png" in source.describe()
    assert (source.pixels[:, -4:] > 240).all()  # the transparent right edge became white
    Image.fromarray(np.full((64, 64), 90, np.uint8), "L").save(tmp_path / "grey.jpg")
    grey = editing.uploaded_image(tmp_path / "grey.jpg", SIZE)
    assert grey.note == "converted from L to RGB" and grey.pixels.shape == (64, 64, 3)


def test_an_upload_over_the_limit_is_refused_with_its_size(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as handle:  # sparse: the size counts, not the content
        handle.truncate(MAX_UPLOAD_BYTES + 2**20)
    with pytest.raises(UserError, match=r"^huge\.png is 21\.0 MB, over the upload limit of 20\.0 MB"):
        editing.uploaded_image(path, SIZE)
    small = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(small)
    assert 2**10 < os.path.getsize(small) < 2**20
    with pytest.raises(UserError, match=r"small\.png is \d+\.\d KB, over the upload limit of 1\.0 KB"):
        editing.uploaded_image(small, SIZE, max_bytes=2**10)
    assert editing.uploaded_image(small, SIZE).pixels.shape == (64, 64, 3)  # within the default limit


def test_a_file_that_is_not_an_image_gets_a_message_naming_it(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are notes, not pixels")
    with pytest.raises(UserError) as err:
        editing.uploaded_image(path, SIZE)
    assert str(err.value) == "notes.png: not a readable image file (UnidentifiedImageError)"
    assert str(tmp_path) not in str(err.value)  # the user's file name, not the server's path
    with pytest.raises(UserError, match="no file was uploaded"):
        editing.uploaded_image(None, SIZE)
    with pytest.raises(UserError, match="gone.png: the upload did not arrive"):
        editing.uploaded_image(tmp_path / "gone.png", SIZE)


def test_the_canvas_shows_the_models_input_with_crisp_tokens(source):
    canvas = edit_tab.canvas_image(source)
    assert canvas.shape == (CANVAS, CANVAS, 3)
    factor = CANVAS // SIZE
    assert np.array_equal(canvas[::factor, ::factor], source.pixels)  # nearest: every pixel a 6x6 block


# ----- masks -------------------------------------------------------------------------------------


def test_the_mask_is_every_painted_pixel_of_any_layer_in_any_colour():
    mask = centre_square()
    assert np.array_equal(editing.painted_mask(painted(mask), SIZE), mask)
    assert np.array_equal(editing.painted_mask(painted(mask, color=(200, 0, 0), alpha=40), SIZE), mask)
    two = painted(np.eye(SIZE, dtype=bool)[::-1] & False)
    two["layers"].append(painted(mask)["layers"][0])  # a second, painted layer
    assert np.array_equal(editing.painted_mask(two, SIZE), mask)
    assert not editing.painted_mask(painted(np.zeros((SIZE, SIZE), bool)), SIZE).any()
    assert not editing.painted_mask(None, SIZE).any()
    assert not editing.painted_mask({"background": None, "layers": [], "composite": None}, SIZE).any()
    uneven = painted(mask)
    uneven["layers"].append(Image.new("RGBA", (10, 10)))
    with pytest.raises(UserError, match="layers differ in size"):
        editing.painted_mask(uneven, SIZE)
    with pytest.raises(UserError, match="not its usual value"):
        editing.painted_mask("a string", SIZE)


def test_presets_paint_the_centre_the_border_or_everything_and_read_back_exactly():
    centre = editing.preset_mask("centre", SIZE, 50)
    assert centre.sum() == 32 * 32 and centre[16:48, 16:48].all()
    border = editing.preset_mask("border", SIZE, 50)
    assert np.array_equal(border, outpaint_mask(SIZE, (16, 16, 48, 48)).numpy()) and np.array_equal(border, ~centre)
    assert editing.preset_mask("everything", SIZE).all() and not editing.preset_mask("clear", SIZE).any()
    for mask in (centre, border, editing.preset_mask("centre", SIZE, 20)):
        layer = edit_tab.mask_layer(mask)
        assert layer.shape == (CANVAS, CANVAS, 4) and set(np.unique(layer[..., 3])) == {0, edit_tab.PAINT[3]}
        value = {"background": None, "layers": [Image.fromarray(layer, "RGBA")], "composite": None}
        assert np.array_equal(editing.painted_mask(value, SIZE), mask)
    with pytest.raises(UserError, match=r"^Preset box side must be a whole number from 20 to 80, got 95$"):
        editing.preset_mask("centre", SIZE, 95)
    with pytest.raises(UserError, match=r"^Preset box side must be a whole number from 20 to 80, got 52.5$"):
        editing.preset_mask("centre", SIZE, 52.5)  # refused, not rounded


# ----- the request -------------------------------------------------------------------------------


def request(models, source, mask=None, mode=editing.BOTH, keep=0, blend=True, seed=5, class_name="class-2"):
    editor = painted(centre_square() if mask is None else mask)
    return editing.parse_edit(models, source, editor, class_name, seed, mode, keep, blend)


def test_an_empty_or_too_small_mask_is_nothing_to_edit(models, source):
    with pytest.raises(editing.NothingToEdit, match="^nothing to edit: the mask is empty. Paint the region"):
        request(models, source, np.zeros((SIZE, SIZE), bool))
    speck = np.zeros((SIZE, SIZE), bool)
    speck[10, 10] = True  # one pixel of 64: under half of a 4 px token even at the last scale
    with pytest.raises(editing.NothingToEdit, match="covers less than half of every token .*tokens are 4 px wide"):
        request(models, source, speck)
    assert issubclass(editing.NothingToEdit, UserError)  # a message in the page, never a traceback


def test_a_full_mask_is_plain_generation_and_with_kept_scales_a_variation(models, source):
    full = np.ones((SIZE, SIZE), bool)
    plain = request(models, source, full)
    assert "this is plain generation of 'class-2'" in plain.note and plain.regenerated[0] == 1
    variation = request(models, source, full, keep=3)
    assert variation.note.startswith("A variation: the image's first 3 scales kept")
    assert variation.regenerated[:3] == (0, 0, 0) and variation.regenerated[3] == 16
    assert request(models, source).note == ""  # an in-painting needs no note


def test_requests_are_checked_in_the_widgets_words(models, source):
    with pytest.raises(UserError, match=r"^load an image first"):
        request(models, None)
    with pytest.raises(UserError, match=r"^Keep the first N scales must be a whole number from 0 to 9, got 10"):
        request(models, source, keep=10)
    with pytest.raises(UserError, match=r"^Class must be one of the 12 in the list, got 'dog'"):
        request(models, source, class_name="dog")
    with pytest.raises(UserError, match=r"^Models must be one of MVAR and VAR side by side, MVAR only, VAR only"):
        request(models, source, mode="both")
    with pytest.raises(UserError, match=r"^Seed must be a whole number"):
        request(models, source, seed=-1)
    with pytest.raises(UserError, match=r"^Final blend must be on or off"):
        request(models, source, blend="yes")
    with pytest.raises(UserError, match=r"^Seed must be a whole number from 0 to 2\^53 - 1 \(\d+\), got 1.5"):
        request(models, source, seed=1.5)  # refused, not rounded
    with pytest.raises(UserError, match=r"^Keep the first N scales must be a whole number from 0 to 9, got 2.5"):
        request(models, source, keep=2.5)
    wanted = request(models, source, keep=2.0, seed="7")  # a slider's float and a box's text are fine
    assert wanted.keep_scales == 2 and wanted.seed == 7 and wanted.models == ("MVAR", "VAR")
    assert wanted.regenerated[-1] == 8 * 8  # the centre 32 px of 64: 8x8 of the 16x16 last tokens


def test_the_regenerated_view_tints_exactly_the_mask(source):
    mask = centre_square()
    view = edit_tab.regenerated_view(source, mask)
    assert np.array_equal(view[~mask], source.pixels[~mask]) and not np.array_equal(view[mask], source.pixels[mask])
    expected = (0.45 * source.pixels[mask].astype(float) + 0.55 * np.array([230, 40, 40])).round()
    assert np.array_equal(view[mask], expected.astype(np.uint8))  # towards red, the image still visible


# ----- the edit ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both_frames(models, source):
    return list(editing.edit_frames(models, "tiny", request(models, source)))


def test_the_edit_streams_a_frame_per_scale_per_model_and_is_the_librarys_edit(models, source, both_frames):
    frames = both_frames
    assert len(frames) == 2 * 10 + 1 and all(f.record is None for f in frames[:-1])
    assert [f.scale for f in frames[:-1]] == [s for s in range(10) for _ in range(2)]
    assert set(frames[0].images) == {"MVAR"} and set(frames[1].images) == {"MVAR", "VAR"}
    # the centre quarter of the image is under half of the 1x1 token: kept; at 3x3 the middle token is sampled
    assert frames[0].status.startswith("scale 1 of 10 (1x1): 0 of 1 tokens sampled")
    assert frames[4].status.startswith("scale 3 of 10 (3x3): 1 of 9 tokens sampled")
    record = frames[-1].record
    assert record.precision == "fp32" and record.sampling.cfg == 1.0
    wanted = record.request
    pixels = torch.from_numpy(source.pixels).permute(2, 0, 1).float().div(255)
    mask = torch.from_numpy(wanted.mask)
    for name, transformer, mode in (("MVAR", models.transformer, models.mvar_mode),
                                    ("VAR", models.var_transformer, VAR_MODE)):
        run = record.runs[name]
        assert len(run.previews[0]) == 10 and len(run.seconds) == 10 and len(run.finals) == 1
        expected = edit(transformer, models.tokenizer, pixels, mask, wanted.label, [wanted.seed], record.sampling,
                        mode, final_blend=True)
        final = record.final(name)
        assert np.array_equal(final, to_uint8(expected.images)[0]), name  # the page's edit is the library's
        reconstruction = to_uint8(expected.reconstruction)[0]
        assert np.array_equal(final[~wanted.mask], reconstruction[~wanted.mask])  # blended outside the mask
        assert np.array_equal(run.previews[0][-1], to_uint8(expected.unblended)[0])
    assert not np.array_equal(record.final("MVAR"), record.final("VAR"))  # two models, two results
    done = frames[-1].status
    assert "done: MVAR and VAR edits of dataset sample clock 2 (Twemoji): the five-thirty emoji, Twemoji graphics" \
        in done and "under 'class-2', seed 5" in done
    assert "64 of 256 tokens sampled at the last scale" in done and "final blend on" in done


def test_one_model_only_and_no_blend(models, source):
    frames = list(editing.edit_frames(models, "tiny", request(models, source, mode="VAR only", blend=False)))
    assert len(frames) == 10 + 1 and all(set(f.images) == {"VAR"} for f in frames)
    record = frames[-1].record
    assert list(record.runs) == ["VAR"] and record.final("MVAR") is None
    assert np.array_equal(record.final("VAR"), record.runs["VAR"].previews[0][-1])  # no blend: the decode itself
    strips = edit_tab.edit_filmstrips(record, record.scale(4))
    assert strips["MVAR"] is None and strips["VAR"].current == 3 and strips["VAR"].labels[3] == "4: 4x4"
    assert "final blend off" in frames[-1].status and "done: VAR edit of" in frames[-1].status
    with pytest.raises(UserError, match="load an image and paint a mask first"):
        next(editing.edit_frames(models, "tiny", None))


def test_the_scale_slider_reshows_the_stored_edit(both_frames):
    record = both_frames[-1].record
    view = record.images(record.scale(3))
    assert view["MVAR"] is record.runs["MVAR"].previews[0][2] and view["VAR"] is record.runs["VAR"].previews[0][2]
    last = record.images(record.scale(10.0))
    assert last["MVAR"] is record.final("MVAR")  # the last scale shows the final (blended) image
    assert edit_tab.edit_label(record, "VAR", 2) == "VAR baseline, scale 3 of 10 (3x3)"
    assert edit_tab.edit_label(record, "MVAR", 9) == "MVAR, scale 10 of 10 (16x16), blended"
    strips = edit_tab.edit_filmstrips(record, 5)
    assert strips["MVAR"].current == 5 and len(strips["MVAR"].frames) == 10
    assert strips["MVAR"].frames[-1] is record.final("MVAR") and strips["MVAR"].frames[2] is view["MVAR"]
    image = plots.filmstrip(strips["MVAR"].frames, strips["MVAR"].labels, strips["MVAR"].current)
    assert image.shape[0] > 200 and (image[..., 0] > 200).sum() > 100
    for bad in (0, 11, 5.5, None, "abc"):  # the slider's box: refused in its label's words, never rounded
        with pytest.raises(UserError, match=r"^Scale must be a whole number from 1 to 10, got "):
            record.scale(bad)


def test_edits_share_the_store_without_replacing_the_sessions_generation(both_frames, registry):
    record = both_frames[-1].record
    size = record_bytes(record)
    previews = sum(i.nbytes for run in record.runs.values() for i in run.previews[0])
    assert size == previews + 2 * 64 * 64 * 3  # the previews and the two final images
    generation = list(frames_of(registry, top_k=10, top_p=0.95))[-1].record
    store = GenerationStore(budget_bytes=10**9)
    token = store.put("alice", generation)
    edit_token = store.put("alice:edit", record)
    assert store.get(token) is generation and store.get(edit_token) is record
    store.drop_session("alice:edit")  # the page closed: the edit goes
    with pytest.raises(UserError, match="no longer kept"):
        store.get(edit_token)


# ----- the pyramid -------------------------------------------------------------------------------


def test_the_pyramid_has_a_reconstruction_and_psnr_per_scale(models, source):
    view = editing.pyramid_view(models, source)
    expected = image_pyramid(models.tokenizer, torch.from_numpy(source.pixels).permute(2, 0, 1).float().div(255))
    assert len(view.images) == 10 and view.images[0].shape == (64, 64, 3)
    assert view.psnr == expected.psnr and all(math.isfinite(v) for v in view.psnr)
    assert np.array_equal(view.images[4], to_uint8(expected.reconstructions[4:5])[0])
    assert view.captions[2] == f"scale 3 of 10 (3x3): {view.psnr[2]:.1f} dB"
    figure = plots.psnr_figure(view.psnr, view.patch_nums)
    trace = figure.data[0]
    assert list(trace.x)[9] == "10: 16x16" and list(trace.y) == pytest.approx(view.psnr)
    assert list(trace.text)[2] == f"{view.psnr[2]:.1f} dB"
    exact = plots.psnr_figure([10.0, math.inf], (1, 2))
    assert list(exact.data[0].text) == ["10.0 dB", "exact"] and exact.data[0].y[1] > 10  # drawn at the top
    with pytest.raises(UserError, match="load an image first"):
        editing.pyramid_view(models, None)


def test_the_tasks_run_the_edit_and_the_pyramid_also_across_a_zerogpu_boundary(registry, models, source):
    wanted = request(models, source, mode="MVAR only", keep=2)
    direct = model_tasks(registry, GpuTasks())
    frames = list(direct.edit("tiny", wanted))
    assert len(frames) == 11 and list(frames[-1].record.runs) == ["MVAR"]
    assert frames[-1].record.model_key == "tiny" and "first 2 scales kept whole" in frames[-1].status
    assert direct.pyramid("tiny", source).captions[0].startswith("scale 1 of 10 (1x1): ")
    calls = []
    zerogpu = model_tasks(registry, GpuTasks(fake_spaces(calls)))  # arguments and results pickled across
    crossed = list(zerogpu.edit("tiny", wanted))
    assert ("decorated", "edit", 60) in calls and ("call", "edit") in calls and len(crossed) == 11
    assert np.array_equal(crossed[-1].record.final("MVAR"), frames[-1].record.final("MVAR"))
    assert zerogpu.pyramid("tiny", source).psnr == direct.pyramid("tiny", source).psnr
