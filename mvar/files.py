"""Files: where the shipped models are, writing files so that a crash never leaves half a file under its
final name, and a grid of images for one PNG."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "assets"  # the default models, their cards, the pictures


def atomic_write(path, write: Callable[[str], None], mode: int = 0o644) -> Path:
    """Call ``write(tmp_path)`` on a temp file in ``path``'s folder, then rename it to ``path``.

    A reader sees the old file or the new one, never a part. The folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp makes owner-only files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return atomic_write(path, write, mode)


def image_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one grid image for a PNG, white padding between cells."""
    count, height, width, _ = images.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top : top + height, left : left + width] = image
    return grid
