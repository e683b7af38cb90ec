"""Writing files so that a crash never leaves half a file under its final name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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
