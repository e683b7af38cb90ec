"""The image files the browser fetches.

:class:`ImageFiles` writes the images the page shows as PNG files named by their content, atomically, and
the downloads of a generation in a folder that goes with its record. Gradio serves files; writing a
content-named file again while a browser reads it (Gradio's own numpy-image path rewrites it in place) made
the server send a short body: h11's ``LocalProtocolError`` (Content-Length).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from mvar.files import atomic_write_bytes

MAX_IMAGE_FILES = 2000  # page images kept on disk (content-named, so repeats cost nothing)



def _write_png(image: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


class ImageFiles:
    """PNG files for the page: shown images named by their content (written once, atomically), and the
    downloads of each generation in a folder of their own, deleted with the generation's record."""

    def __init__(self, root: str | Path | None = None, max_files: int = MAX_IMAGE_FILES):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="mvar-studio-"))
        self.max_files = max_files
        (self.root / "shown").mkdir(parents=True, exist_ok=True)
        (self.root / "downloads").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def shown(self, image: np.ndarray | None) -> str | None:
        """The path of a PNG holding ``image`` (uint8 (H, W, 3)); the same image always gives the same file."""
        if image is None:
            return None
        image = np.ascontiguousarray(image)
        digest = hashlib.sha256(image.tobytes() + str(image.shape).encode()).hexdigest()[:32]
        path = self.root / "shown" / f"{digest}.png"
        if path.exists():
            os.utime(path)  # recently used: pruned last
            return str(path)
        _write_png(image, path)
        self._prune()
        return str(path)

    def downloads(self, token: str, named: dict[str, np.ndarray]) -> list[str]:
        """Write a generation's final images under ``downloads/<token>/`` (file name -> image)."""
        folder = self.root / "downloads" / token
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, image in named.items():
            path = folder / name
            if not path.exists():
                _write_png(image, path)
            paths.append(str(path))
        return paths

    def forget(self, token: str) -> None:
        """Delete a generation's downloads (its record was dropped)."""
        shutil.rmtree(self.root / "downloads" / token, ignore_errors=True)

    def _prune(self) -> None:
        with self._lock:
            files = list((self.root / "shown").glob("*.png"))
            if len(files) <= self.max_files:
                return
            files.sort(key=lambda p: p.stat().st_mtime)
            for path in files[: len(files) - self.max_files]:
                path.unlink(missing_ok=True)
