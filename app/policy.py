"""Server policy: what the app does with bad input and failures, how long a request may run, and what it
keeps (generations for the views, image files for the browser) within which budget.

* **Refused input never costs the user their result.** A page event whose handler raises ``UserError``
  shows the message (a toast) and leaves every output as it was (``gr.skip()``); the server logs one
  line. Other failures do the same with a generic message, and the server logs the traceback.
  The named API endpoints instead raise ``gr.Error`` so a script sees the refusal.
* **Time limit.** A streaming handler is closed (no work continues) once a frame comes past the limit.
* **Memory.** :class:`GenerationStore` keeps each session's last generation for the views, all sessions
  within one budget; a session's record goes when its page closes.
* **Files.** :class:`ImageFiles` writes the images the page shows as PNG files named by their content,
  atomically, and the downloads of a generation in a folder that goes with its record. Gradio serves
  files; writing a content-named file again while a browser reads it (Gradio's own numpy-image path
  rewrites it in place) made the server send a short body: h11's ``LocalProtocolError`` (Content-Length).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from .handlers import GenerationRecord, UserError

log = logging.getLogger("mvar_studio")
DEFAULT_TIME_LIMIT = 300.0  # seconds per request, for streaming handlers
DEFAULT_KEEP_MIB = 1024  # memory for the generations kept for the views, all sessions together
MAX_IMAGE_FILES = 2000  # page images kept on disk (content-named, so repeats cost nothing)
MAX_UPLOAD_BYTES = 20 * 2**20  # an uploaded image larger than this is refused


@dataclass(frozen=True)
class ServerLimits:
    time_limit: float | None = DEFAULT_TIME_LIMIT
    keep_mib: float = DEFAULT_KEEP_MIB
    max_images: int = 4

    def __post_init__(self):
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive seconds or None, got {self.time_limit!r}")
        if not self.keep_mib >= 0:
            raise ValueError(f"keep_mib must be >= 0, got {self.keep_mib!r}")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def message_of(err: Exception, where: str) -> str:
    """What the user reads for a failure; user errors log one line, the unexpected ones their traceback."""
    if isinstance(err, UserError | gr.Error):
        log.info("refused %s: %s", where, err)
        return str(err)
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        log.warning("%s ran out of memory", where)
        return "out of memory: try fewer images or bf16"
    if isinstance(err, ValueError):
        log.info("refused %s: %s", where, err)
        return str(err)
    log.exception("%s failed", where)
    return f"something went wrong ({type(err).__name__}); the app is still running"


def _skips(count: int):
    return gr.skip() if count == 1 else tuple(gr.skip() for _ in range(count))


class TimeLimitExceeded(UserError):
    pass


def within_time_limit(frames, time_limit: float | None, where: str):
    """The frames of a stream until ``time_limit`` seconds have passed; then the stream is closed (its
    ``finally`` blocks run, no more work is done) and :class:`TimeLimitExceeded` says why."""
    started = time.monotonic()
    try:
        for frame in frames:
            if time_limit is not None and time.monotonic() - started > time_limit:
                log.warning("%s stopped at the %g s time limit", where, time_limit)
                raise TimeLimitExceeded(f"this request took longer than the {time_limit:g} s limit and was "
                                        "stopped; try fewer images (or bf16)")
            yield frame
    finally:
        frames.close()  # also when Gradio closes us (the user left or pressed Stop)


def ui_event(fn, outputs: int, time_limit: float | None = None):
    """A page event: refusals and failures become a warning, and the outputs keep what they showed.

    For a generator, ``time_limit`` (seconds, None = none) bounds the whole request: checked each time it
    produces a frame; past it the handler is closed and the user is told (the frames shown so far stay)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streamed(*args, **kwargs):
            frames = within_time_limit(fn(*args, **kwargs), time_limit, fn.__name__)
            try:
                yield from frames
            except Exception as err:  # noqa: BLE001 - every failure becomes a message in the page
                gr.Warning(message_of(err, fn.__name__))
                yield _skips(outputs)
            finally:
                frames.close()
        return streamed

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            gr.Warning(message_of(err, fn.__name__))
            return _skips(outputs)
    return wrapped


def api_endpoint(fn):
    """A named API endpoint: a refusal or failure reaches the script as ``gr.Error`` with the message."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise gr.Error(message_of(err, fn.__name__), print_exception=False) from None
    return wrapped


# ---------------------------------------------------------------------------------------------
# Generations kept for the views
# ---------------------------------------------------------------------------------------------


def record_bytes(record: GenerationRecord) -> int:
    """Memory held by a generation record: maps, previews, final images and captured attention."""
    total = 0
    for run in record.runs.values():
        total += sum(t.nbytes for t in run.f_hats) + sum(i.nbytes for i in run.finals)
        total += sum(i.nbytes for images in run.previews.values() for i in images)
        total += sum(w.nbytes for scales in run.attention.values() for scale in scales for w in scale.values())
    return total


class GenerationStore:
    """The generations kept for the views (scale slider, gallery, attention), within a memory budget.

    The page holds only a token (in ``gr.State``); the record stays here. Each session keeps one record (a
    new generation replaces its last one); past ``budget_bytes`` the least recently used records go (the
    newest is always kept); a session's record goes when its page closes (Gradio's unload event).
    ``on_forget(token)`` runs for every record that goes (its download files are deleted there).
    ``refresh(token)`` re-measures a record that grew (a sample decoded or captured later).
    """

    def __init__(self, budget_bytes: int, on_forget=None):
        self.budget_bytes = budget_bytes
        self.on_forget = on_forget
        self._records: OrderedDict[str, tuple[str | None, GenerationRecord, int]] = OrderedDict()
        self._latest: dict[str, str] = {}  # session -> its token
        self._lock = threading.Lock()

    def put(self, session: str | None, record: GenerationRecord) -> str:
        token = uuid.uuid4().hex
        forgotten = []
        with self._lock:
            if session is not None:
                old = self._latest.pop(session, None)
                if old in self._records:
                    forgotten.append(self._forget(old))
                self._latest[session] = token
            self._records[token] = (session, record, record_bytes(record))
            forgotten += self._trim()
        self._notify(forgotten)
        return token

    def get(self, token: str | None) -> GenerationRecord | None:
        """The record behind a token; None for no token; a message if it was dropped."""
        if token is None:
            return None
        with self._lock:
            if token not in self._records:
                raise UserError("this generation is no longer kept on the server (memory budget, or the page "
                                "was closed): generate again")
            self._records.move_to_end(token)
            return self._records[token][1]

    def refresh(self, token: str | None) -> None:
        with self._lock:
            if token not in self._records:
                return
            session, record, _ = self._records[token]
            self._records[token] = (session, record, record_bytes(record))
            forgotten = self._trim()
        self._notify(forgotten)

    def drop_session(self, session: str | None) -> None:
        with self._lock:
            token = self._latest.get(session)
            forgotten = [self._forget(token)] if token in self._records else []
        self._notify(forgotten)

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def _trim(self) -> list[str]:
        forgotten = []
        while self.nbytes > self.budget_bytes and len(self._records) > 1:
            forgotten.append(self._forget(next(iter(self._records))))
        return forgotten

    def _forget(self, token: str) -> str:
        session, _, _ = self._records.pop(token)
        if self._latest.get(session) == token:
            del self._latest[session]
        return token

    def _notify(self, tokens: list[str]) -> None:
        if self.on_forget is not None:
            for token in tokens:
                self.on_forget(token)


# ---------------------------------------------------------------------------------------------
# Files the browser fetches
# ---------------------------------------------------------------------------------------------


def _atomic_png(image: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        _atomic_png(image, path)
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
                _atomic_png(image, path)
            paths.append(str(path))
        return paths

    def forget(self, token: str) -> None:
        """Delete a generation's downloads (its record was dropped)."""
        shutil.rmtree(self.root / "downloads" / token, ignore_errors=True)

    def download_folders(self) -> list[str]:
        return sorted(p.name for p in (self.root / "downloads").iterdir())

    def _prune(self) -> None:
        with self._lock:
            files = list((self.root / "shown").glob("*.png"))
            if len(files) <= self.max_files:
                return
            files.sort(key=lambda p: p.stat().st_mtime)
            for path in files[: len(files) - self.max_files]:
                path.unlink(missing_ok=True)
