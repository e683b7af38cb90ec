"""The app as people and programs meet it: a real server on loopback, gradio_client and a headless browser.

Also its limits: a full queue refuses politely, a generation past the time limit is stopped, and what
the app keeps per session stays within its budget.
"""

import re
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

from app.image_files import ImageFiles
from app.policy import ui_event
from app.store import GenerationStore, record_bytes
from app.work.generation import GenerationRecord, ModelRun
from app.work.settings import Settings, UserError
from mvar.config import VAR_MODE
from mvar.sampling import SamplingConfig

from .app_server import CHROMIUM, AppServer, open_page

BUSY_PAGE = "This application is currently busy"  # what Gradio's page says when the queue refuses a request
BUSY_CLIENT = "Queue is full! Please try again."  # what gradio_client raises (QueueError) then


def generate_args(seed: int = 1, images: int = 1, class_name: str = "class-1") -> tuple:
    # model, class_name, seed, cfg, top_k, top_p, images, precision
    return "custom", class_name, seed, 1.0, 10, 0.95, images, "fp32"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = AppServer(tmp_path_factory.mktemp("app"))
    yield app
    app.stop()


def test_gradio_client_generates_images(server):
    from gradio_client import Client
    from PIL import Image

    client = Client(server.url, verbose=False)
    mvar, var, generation = client.predict(*generate_args(seed=11, images=2), api_name="/generate")
    assert len(mvar) == len(var) == 2
    for item in mvar + var:
        with Image.open(item["image"]) as image:
            assert image.size == (64, 64) and image.format == "PNG"
    assert generation["seed"] == 11 and generation["class_name"] == "class-1"
    assert generation["mvar"]["generation_ms"] > 0 and generation["generation_id"]
    attention = client.predict(generation["generation_id"], 10, 15, 15, 2, api_name="/attention")
    assert len(attention["mvar_grid"]) == 16 and attention["window"] == [9, 9, 7, 7]
    assert abs(sum(attention["var_mass_per_scale"]) - 1) < 1e-3 and "Token (15, 15)" in attention["caption"]
    models = client.predict(api_name="/models")
    assert models[0]["key"] == "custom"
    client.close()


def test_the_api_is_small_named_and_typed(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    info = client.view_api(return_format="dict", print_info=False)
    assert sorted(info["named_endpoints"]) == ["/attention", "/generate", "/models"]
    assert not info["unnamed_endpoints"]
    generate = info["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in generate["parameters"]]
    assert names == ["model", "class_name", "seed", "cfg", "top_k", "top_p", "images", "precision"]
    types = {p["parameter_name"]: p["python_type"]["type"] for p in generate["parameters"]}
    assert types["seed"] == types["images"] == types["top_k"] == "int" and types["cfg"] == "float"
    assert [r["label"] for r in generate["returns"]] == ["mvar_images", "var_images", "generation"]
    client.close()


def test_gradio_client_bad_input_gets_a_message_not_a_crash(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    with pytest.raises(Exception, match="Class must be one of the 12 in the list, got 'no-such-class'"):
        client.predict("custom", "no-such-class", 1, 1.0, 10, 0.95, 1, "fp32", api_name="/generate")
    with pytest.raises(Exception, match="top-k must be a whole number from 0 to 32, got -3"):
        client.predict("custom", "class-1", 1, 1.0, -3, 0.95, 1, "fp32", api_name="/generate")
    # still up: a good request works afterwards
    assert client.predict(*generate_args(), api_name="/generate")[2]["seed"] == 1
    client.close()
    log = Path(server.log.name).read_text()
    assert "refused generate: top-k must be" in log and "Traceback" not in log  # one line per refusal


def wait_until(page, condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(100)


def no_error_badges(page) -> bool:
    """Gradio marks an output whose event failed with an "Error" status badge."""
    return page.locator(".error, .status-error").count() == 0 and page.get_by_text("Error", exact=True).count() == 0


def set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input").first
    box.fill(str(value))
    box.press("Enter")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_browser_flows_of_a_first_time_user(server, tmp_path):
    """Generate 2 images, step the scale, pick a sample, refuse a typo without losing the result, keep the
    selected token across scales, refuse a bad row without an error badge, run the ablation, draw the charts."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page = open_page(playwright, server.url, 1400, 1800)
        page.locator("#images").get_by_text("2", exact=True).click()
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("done: 2 images").wait_for(timeout=120_000)
        mvar_image = page.locator("#mvar-image img")
        final_src = mvar_image.get_attribute("src")
        assert page.locator("#mvar-gallery img").count() == 2 and page.locator("#var-gallery img").count() == 2
        # 7: one numbering, images labelled with their scale, the filmstrip follows
        strip = page.locator("#mvar-strip img")
        strip_src = strip.get_attribute("src")
        set_number(page, "#scale-slider", 3)
        wait_until(page, lambda: mvar_image.get_attribute("src") != final_src, "the scale-3 preview")
        page.get_by_text("MVAR, scale 3 of 10 (3x3)").first.wait_for(timeout=30_000)
        wait_until(page, lambda: strip.get_attribute("src") != strip_src, "the filmstrip's marker to move")
        set_number(page, "#scale-slider", 10)
        wait_until(page, lambda: mvar_image.get_attribute("src") == final_src, "the final image again")
        # 4: selecting the second sample makes the views follow it
        page.locator("#mvar-gallery img").nth(1).click()
        wait_until(page, lambda: mvar_image.get_attribute("src") != final_src, "sample 2 in the big image")
        second_src = mvar_image.get_attribute("src")
        # 2: a typo is refused with a message and the result stays
        set_number(page, "#top-k", 100000)
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("top-k must be a whole number from 0 to 32, got 100000").first.wait_for(timeout=30_000)
        assert mvar_image.get_attribute("src") == second_src and page.locator("#mvar-gallery img").count() == 2
        assert no_error_badges(page)
        set_number(page, "#top-k", 10)
        # 1: the corner token of the 16x16 scale, then scale 3: the token moves to the same place, no error
        page.get_by_role("tab", name="Attention").click()
        set_number(page, "#token-row", 15)
        set_number(page, "#token-col", 15)
        page.get_by_text("Token (15, 15) of scale 10 of 10 (16x16), sample 2").wait_for(timeout=60_000)
        set_number(page, "#scale-slider", 3)
        page.get_by_text("Token (2, 2) of scale 3 of 10 (3x3), sample 2").wait_for(timeout=60_000)
        assert no_error_badges(page)
        set_number(page, "#token-row", 16)  # outside the 3x3 grid: a message, and the last good view stays
        page.get_by_text("Token row must be a whole number from 0 to 2, got 16").first.wait_for(timeout=30_000)
        assert page.get_by_text("Token (2, 2) of scale 3 of 10 (3x3)").count() == 1 and no_error_badges(page)
        overlay = page.locator("#attention-overlay img")
        overlay.click(position={"x": 5, "y": 5})  # a click on the map picks a token
        page.get_by_text("Token (0, 0) of scale 3 of 10 (3x3)").wait_for(timeout=60_000)
        page.locator("#var-maps .js-plotly-plot").wait_for(timeout=60_000)
        # 14: the ablation on the same weights
        page.get_by_role("tab", name="Ablation").click()
        page.get_by_role("button", name="Run the ablation").click()
        page.locator("#ablation-costs").get_by_role("cell", name="full MVAR").wait_for(timeout=120_000)
        assert page.locator("#ablation img").count() == 3
        page.get_by_role("tab", name="Memory").click()
        page.get_by_role("button", name="Measure and plot").click()
        page.locator("#memory-plot .js-plotly-plot").wait_for(timeout=180_000)
        page.get_by_role("tab", name="Cost per scale").click()
        page.get_by_role("button", name="Show per-scale costs").click()
        page.locator("#latency-plot .js-plotly-plot").wait_for(timeout=60_000)
        assert no_error_badges(page)
        shot = Path(tmp_path) / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        browser.close()
    log = Path(server.log.name).read_text()
    assert "LocalProtocolError" not in log and "Traceback" not in log


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_browser_on_a_phone_the_page_fits_and_the_filmstrips_read(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page = open_page(playwright, server.url, 400, 900)
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("done:").wait_for(timeout=120_000)
        overflow = page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= 400 + 2, f"the page is {overflow} px wide on a 400 px screen"
        model = page.locator("#model-row").bounding_box()
        assert model["x"] >= 0 and model["x"] + model["width"] <= 402  # the model dropdown is not cut off
        strip = page.locator("#mvar-strip img")
        strip.scroll_into_view_if_needed()
        wait_until(page, lambda: (strip.bounding_box() or {}).get("height", 0) > 0, "the filmstrip to load")
        assert strip.bounding_box()["height"] >= 100  # two rows of five, not a 35 px sliver
        page.screenshot(path=str(Path(server.log.name).parent / "phone.png"), full_page=True)
        browser.close()


SEED_RANGE = "from 0 to 2^53 - 1 (9007199254740991)"


def toast(page, text: str):
    """A toast with this text (the first, should there be several)."""
    return page.locator(".toast-body").get_by_text(text).first


def log_lines(server, text: str) -> int:
    return Path(server.log.name).read_text().count(text)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_browser_nothing_is_changed_silently(server):
    """A fractional seed, top-k, refine step or token row is refused, not rounded; an empty box is refused like
    the others, named as no number; the seed used is the seed typed up to the label's 2^53 - 1."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page = open_page(playwright, server.url, 1400, 1800)
        set_number(page, "#seed", 9007199254740991)  # the label's maximum: used as typed
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("done: 1 image of 'class-0', seed 9007199254740991;").wait_for(timeout=300_000)
        assert "mvar-class-0-seed9007199254740991\n.png" in page.locator("#downloads").inner_text()  # its file
        shown = page.locator("#mvar-image img").get_attribute("src")
        refusals = [("#seed", "1.5", f"Seed must be a whole number {SEED_RANGE}, got 1.5"),
                    ("#seed", "", f"Seed must be a whole number {SEED_RANGE}, got no number"),
                    ("#top-k", "2.5", "top-k must be a whole number from 0 to 32, got 2.5"),
                    ("#top-k", "", "top-k must be a whole number from 0 to 32, got no number"),
                    ("#refine-step", "2.5", "Refine step must be a whole number from 0 to 10, got 2.5")]
        page.locator("#mvar-attention .label-wrap").click()  # open the accordion holding the refine step
        for selector, value, message in refusals:
            set_number(page, selector, value)
            page.get_by_role("button", name="Generate").click()
            toast(page, message).wait_for(timeout=60_000)
            set_number(page, selector, {"#seed": 0, "#top-k": 10, "#refine-step": 8}[selector])
        assert page.locator("#mvar-image img").get_attribute("src") == shown and no_error_badges(page)
        page.get_by_role("tab", name="Attention").click()
        set_number(page, "#token-row", 3.7)
        toast(page, "Token row must be a whole number from 0 to 15, got 3.7").wait_for(timeout=60_000)
        assert no_error_badges(page)
        browser.close()
    for _, _, message in refusals:
        assert log_lines(server, f"refused on_generate: {message}") == 1, message  # one line per refusal
    assert log_lines(server, "refused on_view: Token row must be a whole number from 0 to 15, got 3.7") == 1
    log = Path(server.log.name).read_text()
    assert "Traceback" not in log and "ComponentProcessingError" not in log


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_browser_the_scale_box_has_no_dead_end(server):
    """A fractional, out-of-range or empty value in the Scale slider's box: one message in the label's words,
    the images stay, no Error badge, no request repeated, one line in the log."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page = open_page(playwright, server.url, 1400, 1800)
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("done: 1 image").wait_for(timeout=300_000)
        sent = []  # the values the page sent for the scale
        page.on("request", lambda r: sent.append(r.post_data) if "queue/join" in r.url else None)
        image = page.locator("#mvar-image img")
        final = image.get_attribute("src")
        box = page.locator("#scale-slider input[type='number']")
        for value, shown in (("5.5", "5.5"), ("0", "0"), ("11", "11"), ("", "no number")):
            box.fill(value)  # what a visitor types, sent at once
            toast(page, f"Scale must be a whole number from 1 to 10, got {shown}").wait_for(timeout=60_000)
            assert image.get_attribute("src") == final and no_error_badges(page)
        box.click()  # typed key by key: 7, 7. (still 7), 7.5 (the page may skip the values typed in between)
        box.press("Control+a")
        page.keyboard.type("7.5")
        toast(page, "Scale must be a whole number from 1 to 10, got 7.5").wait_for(timeout=60_000)
        box.fill("4")  # and the box works on: a round trip after which any repeated request would have come
        page.get_by_text("MVAR, scale 4 of 10 (4x4)").first.wait_for(timeout=60_000)
        assert no_error_badges(page)
        def sends(value: str) -> int:  # the slider's event sends (record, scale)
            return sum(f'"data":[null,{value}]' in (data or "") for data in sent)

        for value in ("5.5", "11"):  # filled at once: each value sent once, no loop
            assert sends(value) == 1, value
        # typed key by key: once, or twice where Gradio's always_last trigger re-sends the value that was
        # pending while "7" / "7." ran (seen once in a loaded full run; not pinned down); never a loop:
        typed = sends("7.5")
        assert 1 <= typed <= 2
        page.wait_for_timeout(2000)
        assert sends("7.5") == typed  # nothing more after the round trip to scale 4
        browser.close()
    for shown, times in (("5.5", 1), ("0", 1), ("11", 1), ("no number", 1), ("7.5", typed)):  # one line a request
        assert log_lines(server, f"refused on_scale: Scale must be a whole number from 1 to 10, got {shown}\n") == times
    log = Path(server.log.name).read_text()
    assert "Traceback" not in log and "ComponentProcessingError" not in log


def test_the_api_refuses_what_it_would_change_with_the_pages_words(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    args = list(generate_args())
    for index, value, message in ((2, "abc", f"Seed must be a whole number {SEED_RANGE}, got 'abc'"),
                                  (2, 2.5, f"Seed must be a whole number {SEED_RANGE}, got 2.5"),
                                  (6, 2.5, "Images must be a whole number from 1 to 4, got 2.5"),
                                  (4, 2.5, "top-k must be a whole number from 0 to 32, got 2.5")):
        with pytest.raises(Exception, match=re.escape(message)):
            client.predict(*args[:index], value, *args[index + 1:], api_name="/generate")
    generation = client.predict(*generate_args(seed=2**53 - 1), api_name="/generate")[2]
    assert generation["seed"] == 2**53 - 1  # the seed used is the seed sent
    with pytest.raises(Exception, match=re.escape("Scale must be a whole number from 1 to 10, got 2.5")):
        client.predict(generation["generation_id"], 2.5, 0, 0, 1, api_name="/attention")
    client.close()
    log = Path(server.log.name).read_text()
    assert "refused generate: Seed must be" in log and "refused attention: Scale must be" in log
    assert "Traceback" not in log and "ComponentProcessingError" not in log


# ---------------------------------------------------------------------------------------------
# Stop: every generation of this server is held before its 7th frame (MVAR's scale 4) until a file exists
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held")
    app = AppServer(folder, hold=(folder / "go", 6))
    app.go = folder / "go"
    yield app
    app.stop()


def sources(page, selector: str) -> list:
    return [img.get_attribute("src") for img in page.locator(f"{selector} img").all()]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_browser_stop_names_where_it_stopped_and_shows_the_previous_result_whole(held_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page = open_page(playwright, held_server.url, 1400, 1800)
        held_server.go.touch()  # the first generation runs through
        page.locator("#images").get_by_text("4", exact=True).click()
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("done: 4 images of 'class-0'").wait_for(timeout=300_000)
        before = {name: sources(page, name) for name in ("#mvar-image", "#var-image", "#mvar-gallery",
                                                         "#var-gallery", "#mvar-strip", "#var-strip")}
        downloads = page.locator("#downloads").inner_text()
        held_server.go.unlink()  # the next one is held at MVAR's scale 4, streaming
        page.locator("#examples").get_by_text("class-5", exact=True).click()  # another class
        wait_until(page, lambda: page.locator("#class input").input_value() == "class-5", "the example's class")
        page.get_by_role("button", name="Generate").click()
        page.locator("#status").get_by_text("scale 3 of 10 (3x3)").wait_for(timeout=300_000)
        assert sources(page, "#mvar-image") != before["#mvar-image"]  # the new run's preview was shown
        with page.expect_response(lambda response: "/gradio_api/run/" in response.url):  # Stop is done
            page.get_by_role("button", name="Stop").click()
        held_server.go.touch()  # the run goes on to its next frame, and finds Stop pressed
        page.locator("#status").get_by_text("Stopped at scale").wait_for(timeout=300_000)
        status = page.locator("#status").inner_text()
        assert status.startswith("Stopped at scale 3 of 10 (3x3). The page shows the previous result: done: 4 "
                                 "images of 'class-0'"), status
        after = {name: sources(page, name) for name in before}
        assert after == before  # images, galleries and filmstrips: all the previous result, none of the new run
        assert page.locator("#downloads").inner_text() == downloads
        assert page.locator("#scale-slider input[type='number']").input_value() == "10"
        assert page.locator("#mvar-image [data-testid='block-label']").inner_text() == "MVAR, scale 10 of 10 (16x16)"
        set_number(page, "#scale-slider", 3)  # the slider steps through what is shown
        page.get_by_text("MVAR, scale 3 of 10 (3x3)").first.wait_for(timeout=60_000)
        assert sources(page, "#mvar-gallery") == before["#mvar-gallery"] and no_error_badges(page)
        browser.close()
    log = Path(held_server.log.name).read_text()
    assert "Traceback" not in log


# ---------------------------------------------------------------------------------------------
# A full queue: --queue-size 1 --concurrency 1, so one generation running and one waiting fill it
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    app = AppServer(tmp_path_factory.mktemp("busy"), ["--queue-size", "1", "--concurrency", "1"])
    yield app
    app.stop()


def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def fill_queue(url: str):
    """Start a slow generation and queue a second one behind it: the queue (size 1) is then full."""
    from gradio_client import Client
    from gradio_client.utils import Status

    holders = [Client(url, verbose=False) for _ in range(2)]
    running = holders[0].submit(*generate_args(seed=5, images=4), api_name="/generate")
    wait_for(lambda: running.status().code in (Status.PROCESSING, Status.ITERATING, Status.PROGRESS),
             what="the first generation to start")
    waiting = holders[1].submit(*generate_args(seed=6, images=4), api_name="/generate")
    wait_for(lambda: waiting.status().code == Status.IN_QUEUE, what="the second generation to wait in the queue")
    return holders, [running, waiting]


def test_full_queue_refuses_extra_requests_with_a_busy_message(busy_server):
    from gradio_client import Client
    from gradio_client.utils import QueueError

    extra_clients = [Client(busy_server.url, verbose=False) for _ in range(3)]  # ready before the queue fills
    holders, held = fill_queue(busy_server.url)
    extra = [client.submit(*generate_args(seed=10 + i), api_name="/generate") for i, client in enumerate(extra_clients)]
    for job in extra:
        with pytest.raises(QueueError, match="Queue is full"):
            job.result(timeout=60)
    for job in held:  # the accepted ones are served
        assert job.result(timeout=180)[2]["generation_id"]
    assert busy_server.process.poll() is None
    # the server is free again: a new request goes through
    assert extra_clients[0].predict(*generate_args(seed=20), api_name="/generate")[2]["seed"] == 20
    for client in extra_clients + holders:
        client.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_full_queue_shows_busy_in_the_page(busy_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page = open_page(playwright, busy_server.url, 1400, 1200)
        page.get_by_role("button", name="Generate").wait_for()
        holders, held = fill_queue(busy_server.url)
        page.get_by_role("button", name="Generate").click()
        page.get_by_text(BUSY_PAGE).first.wait_for(timeout=30_000)
        for job in held:
            job.result(timeout=180)
        for client in holders:
            client.close()
        # once the queue has room, the same page generates
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("done:").wait_for(timeout=120_000)
        browser.close()


# ---------------------------------------------------------------------------------------------
# The time limit
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    # 1 ms: far less than the 20 frames of any generation take, so the limit is always reached
    app = AppServer(tmp_path_factory.mktemp("limited"), ["--time-limit", "0.001"])
    yield app
    app.stop()


def test_generation_past_the_time_limit_is_stopped_with_a_message(limited_server):
    from gradio_client import Client

    client = Client(limited_server.url, verbose=False)
    for seed in (1, 2):  # and the server keeps serving
        with pytest.raises(Exception, match=r"took longer than the 0\.001 s limit"):
            client.predict(*generate_args(seed=seed), api_name="/generate")
    client.close()
    assert limited_server.process.poll() is None
    log = Path(limited_server.log.name).read_text()
    assert "stopped at the 0.001 s time limit" in log


def test_time_limit_closes_the_handler_between_frames():
    produced, closed = [], []

    def slow_frames():
        try:
            for i in range(100):
                time.sleep(0.05)
                produced.append(i)
                yield i
        finally:
            closed.append(True)

    wrapped = ui_event(slow_frames, outputs=1, time_limit=0.2)
    with pytest.warns(UserWarning, match="took longer than the 0.2 s limit"):
        received = list(wrapped())
    assert closed == [True]  # the handler's own cleanup ran
    frames = [r for r in received if isinstance(r, int)]
    assert len(produced) == len(frames) + 1  # the late frame was dropped
    assert isinstance(received[-1], type(gr.skip()))  # and the outputs keep what they showed
    time.sleep(0.2)
    assert len(produced) == len(frames) + 1  # nothing ran after the stop


def test_closing_the_wrapper_closes_the_handler():
    closed = []

    def frames():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    gen = ui_event(frames, outputs=1, time_limit=60)()
    assert next(gen) == 0
    gen.close()  # what Gradio does when the user cancels (Stop) or leaves
    assert closed == [True]


def test_a_refusal_keeps_the_outputs_and_says_why():
    def frames():
        yield 1
        raise UserError("Class must be one of the 12 in the list")

    with pytest.warns(UserWarning, match="Class must be one of the 12"):
        received = list(ui_event(frames, outputs=3)())
    assert received[0] == 1 and received[1] == tuple(gr.skip() for _ in range(3))

    def handler(value):
        raise UserError(f"Token row must be a whole number from 0 to 15, got {value}")

    with pytest.warns(UserWarning, match="got 16"):
        assert ui_event(handler, outputs=2)(16) == (gr.skip(), gr.skip())


# ---------------------------------------------------------------------------------------------
# What the app keeps per session
# ---------------------------------------------------------------------------------------------


def fake_record(seed: int, attention_bytes: int) -> GenerationRecord:
    run = ModelRun(mode=VAR_MODE, previews={0: [np.zeros((4, 4, 3), np.uint8)]},
                   attention={0: [{0: torch.zeros(attention_bytes // 2, dtype=torch.float16)}]})
    settings = Settings("c", 0, seed, SamplingConfig(), 1, "fp32", VAR_MODE)
    return GenerationRecord("m", settings, (1,), (0,), 1, {"MVAR": run, "VAR": ModelRun(mode=VAR_MODE)})


def test_generation_store_keeps_one_record_per_session_within_its_budget():
    assert record_bytes(fake_record(0, 1000)) == 1000 + 48
    forgotten = []
    store = GenerationStore(budget_bytes=3 * 1048, on_forget=forgotten.append)
    first = store.put("alice", fake_record(1, 1000))
    assert store.get(first).seed == 1 and store.get(None) is None
    second = store.put("alice", fake_record(2, 1000))  # a new generation replaces the session's last one
    assert len(store) == 1 and store.get(second).seed == 2 and forgotten == [first]
    with pytest.raises(UserError, match="no longer kept"):
        store.get(first)
    bob, carol = store.put("bob", fake_record(3, 1000)), store.put("carol", fake_record(4, 1000))
    store.get(second)  # alice's is now the most recently used
    store.put("dave", fake_record(5, 1000))  # over budget: the least recently used (bob's) goes
    assert store.nbytes <= 3 * 1048 and forgotten[-1] == bob
    with pytest.raises(UserError):
        store.get(bob)
    assert store.get(carol).seed == 4 and store.get(second).seed == 2
    store.drop_session("carol")  # the page closed
    assert forgotten[-1] == carol
    with pytest.raises(UserError):
        store.get(carol)
    huge = store.put("erin", fake_record(6, 10_000))  # bigger than the budget: the newest is still kept
    assert len(store) == 1 and store.get(huge).seed == 6


def test_image_files_are_written_once_atomically_and_downloads_go_with_their_record(tmp_path):
    files = ImageFiles(tmp_path / "files", max_files=3)
    image = np.full((8, 8, 3), 7, np.uint8)
    path = files.shown(image)
    inode = Path(path).stat().st_ino
    assert files.shown(image.copy()) == path and Path(path).stat().st_ino == inode  # the same file, not rewritten
    assert not list((tmp_path / "files" / "shown").glob(".*"))  # no temp files left
    for value in range(5):
        files.shown(np.full((8, 8, 3), value, np.uint8))
    assert len(list((tmp_path / "files" / "shown").glob("*.png"))) == 3  # bounded
    store = GenerationStore(budget_bytes=10**9, on_forget=files.forget)
    token = store.put("alice", fake_record(1, 10))
    paths = files.downloads(token, {"mvar-c-seed1.png": image})
    downloads = tmp_path / "files" / "downloads"
    assert Path(paths[0]).exists() and [p.name for p in downloads.iterdir()] == [token]
    store.drop_session("alice")  # the page closed: its downloads go with its record
    assert not any(downloads.iterdir()) and not Path(paths[0]).exists()
    newer = store.put("bob", fake_record(2, 10))
    files.downloads(newer, {"a.png": image})
    store.put("bob", fake_record(3, 10))  # bob's next generation replaces the record, and its files
    assert newer not in [p.name for p in downloads.iterdir()]
