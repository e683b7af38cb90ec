"""The Edit tab in a headless browser, on a real server with tiny random models: a dataset sample edited by
MVAR and VAR side by side (a preset mask, then a painted one), stepping through the edit, and bad input (an
empty mask, a file that is not an image, an upload over the limit, an odd-sized upload) answered with a
message in the page, never an error badge."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.work.editing import MAX_UPLOAD_BYTES

from .app_server import CHROMIUM, AppServer, open_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = AppServer(tmp_path_factory.mktemp("edit-app"))
    yield app
    app.stop()


@pytest.fixture()
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page = open_page(playwright, server.url)
        page.get_by_role("tab", name="Edit").click()
        yield page
        assert page.locator(".toast-body.error").count() == 0  # never an error badge
        browser.close()


def wait_until(page, condition, what: str, timeout_ms: int = 60_000) -> None:
    for _ in range(timeout_ms // 100):
        if condition():
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out waiting for {what}")


def image_src(page, elem_id: str) -> str | None:
    image = page.locator(f"#{elem_id} img")
    return image.first.get_attribute("src") if image.count() else None


def label_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} [data-testid='block-label']").inner_text()


def status(page) -> str:
    return page.locator("#edit-status [data-testid='markdown']").inner_text()  # the text, not the progress timer


def upload(page, path) -> None:
    with page.expect_file_chooser() as chooser:
        page.locator("#edit-upload").click()
    chooser.value.set_files(str(path))


def finish(page, previous: str | None) -> str:
    """Run the edit and wait for its outcome: done, or a refusal (an empty mask) reported at once."""
    page.locator("#edit-run").click()
    wait_until(page, lambda: status(page) != previous and ("done:" in status(page) or "othing to edit" in
                                                           status(page)), "the edit to finish", 180_000)
    assert "done:" in status(page), status(page)
    return status(page)


def test_an_edit_of_a_dataset_sample_by_both_models_and_stepping_through_it(page):
    page.locator("#edit-sample").click()  # the first of the interleaved samples, credited beside the image
    page.locator("#edit-source-note").get_by_text("dataset sample smiley face 1 (Fluent 3D)").wait_for(
        timeout=60_000)
    assert "Fluent Emoji 3D, © Microsoft Corporation (MIT)" in page.locator("#edit-source-note").inner_text()
    page.locator("#edit-pyramid img").nth(9).wait_for(timeout=60_000)  # the pyramid: ten reconstructions
    assert "scale 3 of 10 (3x3):" in page.locator("#edit-pyramid").inner_text()
    assert " dB" in page.locator("#edit-pyramid").inner_text()
    page.locator("#edit-psnr .js-plotly-plot").wait_for(timeout=60_000)
    # a preset mask, both models (the default)
    page.locator("#edit-mask-centre").click()
    page.wait_for_timeout(1000)
    done = finish(page, None)
    assert "done: MVAR and VAR edits of dataset sample smiley face 1 (Fluent 3D)" in done
    assert "64 of 256 tokens sampled at the last scale" in done  # the centre half of the side: 8x8 of 16x16
    mvar_src, var_src = image_src(page, "edit-mvar-image"), image_src(page, "edit-var-image")
    assert mvar_src and var_src and mvar_src != var_src  # both images, and they differ
    assert label_of(page, "edit-mvar-image") == "MVAR, scale 10 of 10 (16x16), blended"
    assert label_of(page, "edit-var-image") == "VAR baseline, scale 10 of 10 (16x16), blended"
    assert image_src(page, "edit-mvar-strip") and image_src(page, "edit-var-strip")
    assert image_src(page, "edit-regenerated")
    # step back: the stored previews come back without recomputing
    number = page.locator("#edit-scale input[type='number']")
    number.fill("3")
    number.press("Enter")
    wait_until(page, lambda: image_src(page, "edit-mvar-image") != mvar_src, "the scale-3 preview")
    wait_until(page, lambda: label_of(page, "edit-var-image") == "VAR baseline, scale 3 of 10 (3x3)", "its label")
    assert status(page) == done  # nothing ran again
    shown = image_src(page, "edit-mvar-image")
    for value, message in (("5.5", "got 5.5"), ("11", "got 11"), ("", "got no number")):  # no dead end
        number.fill(value)
        page.locator(".toast-body").get_by_text(f"Scale must be a whole number from 1 to 10, {message}").first.wait_for(
            timeout=60_000)
        assert image_src(page, "edit-mvar-image") == shown and page.get_by_text("Error", exact=True).count() == 0
    # a painted mask: clear, then a brush stroke across the middle of the image, MVAR only
    page.locator("#edit-mask-clear").click()
    page.wait_for_timeout(1000)
    canvas = page.locator("#edit-editor canvas").first.bounding_box()
    x, y = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(x - 60, y)
    page.mouse.down()
    for step in range(25):  # small steps with a pause: a loaded machine must not drop the stroke's events
        page.mouse.move(x - 60 + 5 * step, y + (step % 5), steps=3)
        page.wait_for_timeout(20)
    page.mouse.up()
    page.wait_for_timeout(500)
    page.get_by_text("MVAR only").click()
    done = finish(page, done)
    assert "done: MVAR edit of" in done
    sampled = int(done.split(" of 256 tokens sampled at the last scale")[0].rsplit(" ", 1)[1])
    assert 0 < sampled < 64  # the stroke, not the old preset
    assert label_of(page, "edit-var-image") == "VAR baseline: not run (Models: MVAR only)"
    assert image_src(page, "edit-var-image") is None and image_src(page, "edit-mvar-image")


def test_bad_input_gets_a_message_in_the_page(page, tmp_path):
    # no image yet
    page.locator("#edit-run").click()
    page.locator(".toast-body.warning").get_by_text("load an image first").wait_for(timeout=30_000)
    # an odd-sized, transparent upload is fitted and the page says how
    rgba = np.zeros((60, 100, 4), np.uint8)
    rgba[..., 2] = 220
    rgba[:, :50, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "wide.png")
    upload(page, tmp_path / "wide.png")
    note = page.locator("#edit-source-note")
    note.get_by_text("centre-cropped from 100x60 to 60x60").wait_for(timeout=60_000)
    assert "wide.png" in note.inner_text() and "transparent pixels put on white" in note.inner_text()
    # an empty mask is nothing to edit: said in the status, the results untouched
    page.locator("#edit-run").click()
    page.locator("#edit-status [data-testid='markdown']").get_by_text("Nothing to edit.").wait_for(timeout=30_000)
    assert "The mask is empty" in status(page)
    # a file that is not an image, and one over the upload limit
    (tmp_path / "notes.png").write_text("not pixels")
    upload(page, tmp_path / "notes.png")
    page.locator(".toast-body.warning").get_by_text("notes.png: not a readable image file").wait_for(timeout=30_000)
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:
        handle.truncate(MAX_UPLOAD_BYTES + 2**20)
    upload(page, big)
    page.locator(".toast-body.warning").get_by_text("big.png is 21.0 MB, over the upload limit of 20.0 MB").wait_for(
        timeout=60_000)
    assert "wide.png" in note.inner_text()  # the refused files changed nothing
    # a full mask is plain generation, and the page says so
    page.locator("#edit-mask-all").click()
    page.wait_for_timeout(1000)
    done = finish(page, status(page))
    assert "this is plain generation of 'class-0'" in done and "256 of 256 tokens sampled" in done
