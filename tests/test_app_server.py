"""The app as people and programs meet it: a real server on loopback, gradio_client and a headless browser."""

import shutil
from pathlib import Path

import pytest

from .app_server import AppServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = AppServer(tmp_path_factory.mktemp("app"))
    yield app
    app.stop()


def test_gradio_client_generates_images(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    result = client.predict("custom", "class-2", 11, 1.0, 10, 0.95, False, 1, "fp32", api_name="/generate")
    mvar_image, var_image, status = result[0], result[1], result[2]
    from PIL import Image

    for path in (mvar_image, var_image):
        with Image.open(path) as image:
            assert image.size == (320, 320)  # 64 px previews shown enlarged
    assert status.startswith("done")
    downloads = [item for item in result if isinstance(item, list)][0]
    assert len(downloads) == 2
    for path in downloads:
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.format == "PNG"


def test_gradio_client_bad_class_gets_a_message_not_a_crash(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict("custom", "no-such-class", 1, 1.0, 10, 0.95, False, 1, "fp32", api_name="/generate")
    with pytest.raises(Exception, match="top_k must be an integer"):
        client.predict("custom", "class-1", 1, 1.0, -3, 0.95, False, 1, "fp32", api_name="/generate")
    # still up: a good request works afterwards
    assert client.predict("custom", "class-1", 1, 1.0, 10, 0.95, False, 1, "fp32", api_name="/generate")[2]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_browser_generate_step_click_and_charts(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(server.url)
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("done:").wait_for(timeout=120_000)
        # step the scale slider back: the previews change without a new generation
        mvar_image = page.locator("#mvar-image img")
        final_src = mvar_image.get_attribute("src")
        number = page.get_by_role("spinbutton", name="number input for Scale (step back and forth without recomputing)")
        number.fill("3")
        number.press("Enter")
        for _ in range(100):
            if mvar_image.get_attribute("src") != final_src:
                break
            page.wait_for_timeout(100)
        assert mvar_image.get_attribute("src") != final_src  # the scale-3 preview, from the stored record
        # open the attention tab and click a token on the overlay
        page.get_by_role("tab", name="Attention").click()
        overlay = page.locator("#attention-overlay img")
        overlay.wait_for(timeout=60_000)
        overlay.click(position={"x": 20, "y": 20})
        page.get_by_text("Token (0, 0) of scale").wait_for(timeout=60_000)
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        page.get_by_role("tab", name="Memory").click()
        page.get_by_role("button", name="Measure and plot").click()
        page.locator("#memory-plot .js-plotly-plot").wait_for(timeout=180_000)
        page.get_by_role("tab", name="Cost per scale").click()
        page.get_by_role("button", name="Show per-scale costs").click()
        page.locator("#latency-plot .js-plotly-plot").wait_for(timeout=60_000)
        shot = Path(tmp_path) / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        browser.close()
