"""Start the app on loopback with tiny random models, for the browser and client tests."""

from __future__ import annotations

import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as root, without a screen, with no network: no sandbox, no GPU, no background connections
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]


def open_page(playwright, url: str, width: int = 1400, height: int = 1800):
    """(browser, page): Debian's chromium, headless, showing ``url`` in a ``width`` x ``height`` window."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    return browser, page


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_tiny_models(folder: Path) -> tuple[Path, Path]:
    from mvar.checkpoints import save_model
    from mvar.config import get_preset
    from mvar.tokenizer import MultiScaleVQVAE
    from mvar.transformer import ScaleTransformer
    from tests.conftest import scramble

    preset = get_preset("tiny")
    tokenizer, transformer = folder / "tok.safetensors", folder / "mvar.safetensors"
    save_model(tokenizer, scramble(MultiScaleVQVAE(preset.tokenizer), seed=3))
    save_model(transformer, scramble(ScaleTransformer(preset.transformer), seed=4),
               extra={"class_names": [f"class-{i}" for i in range(12)], "sampling_defaults": {"cfg": 1.0}})
    return tokenizer, transformer


def run_held(hold_file: str, hold_before: int, argv: list[str]) -> None:
    """app.py's main, with every generation held before its frame ``hold_before`` until ``hold_file`` exists:
    a test can then act while a run is certainly streaming (press Stop), however fast the machine is."""
    import app.work.generation as generation

    original = generation.generate_frames

    def held(*args, **kwargs):
        for index, frame in enumerate(original(*args, **kwargs)):
            while index == hold_before and not Path(hold_file).exists():
                time.sleep(0.05)  # waits for the test's file, not for time to pass
            yield frame

    generation.generate_frames = held
    sys.argv = ["app.py", *argv]
    runpy.run_path(str(ROOT / "app.py"), run_name="__main__")


# Gradio's launch asks its own page for a HEAD with a 3 s timeout and exits with this message when the answer
# comes later, as it does on a machine busy with other work: then the server is started again.
SELF_CHECK_FAILED = "When localhost is not accessible, a shareable link must be created"
SELF_CHECK_ATTEMPTS = 3


class AppServer:
    """The app on a free loopback port with the tiny models; ``hold``: (file, frame) to hold every generation
    before that frame until the file exists (see :func:`run_held`)."""

    def __init__(self, folder: Path, extra_args: list[str] | None = None, hold: tuple[Path, int] | None = None):
        tokenizer, transformer = save_tiny_models(folder)
        env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        for attempt in range(SELF_CHECK_ATTEMPTS):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}/"
            self.log = open(folder / f"server{attempt or ''}.log", "w")  # noqa: SIM115 - closed in stop()
            args = ["--tokenizer", str(tokenizer), "--transformer", str(transformer), "--port", str(self.port),
                    *(extra_args or [])]
            command = [sys.executable, str(ROOT / "app.py"), *args] if hold is None else [
                sys.executable, "-c", "import sys; from tests.app_server import run_held; "
                "run_held(sys.argv[1], int(sys.argv[2]), sys.argv[3:])", str(hold[0]), str(hold[1]), *args]
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
            try:
                return self.wait_ready()
            except RuntimeError:
                self.stop()
                if SELF_CHECK_FAILED not in Path(self.log.name).read_text() or attempt + 1 == SELF_CHECK_ATTEMPTS:
                    raise

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if (code := self.process.poll()) is not None:
                raise RuntimeError(f"app exited early (exit code {code}); see {self.log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"app did not start within {timeout} s; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    pass
            except OSError:
                time.sleep(0.5)
                continue
            # an answer counts only if our server is still up after it: had it died just before,
            # the answer came from whoever took the free port since
            if self.process.poll() is None:
                return

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
