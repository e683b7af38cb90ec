"""What the app does with bad input and failures, and how long a request may run.

* **Refused input never costs the user their result.** A page event whose handler raises ``UserError``
  shows the message (a toast) and leaves every output as it was (``gr.skip()``); the server logs one
  line. Other failures do the same with a generic message, and the server logs the traceback.
  The named API endpoints instead raise ``gr.Error`` so a script sees the refusal.
* **Time limit.** A streaming handler is closed (no work continues) once a frame comes past the limit.
* **Stop.** A run that can be stopped arms its session when it is asked for (:class:`StopRequests`), the
  Stop button marks it, and the run checks between frames and ends in a state it names (Gradio's own
  cancelling would kill it between two outputs and leave the page half old, half new).

Handlers are module-level functions whose first parameter is the app's services (``services.Services``):
:func:`ui_event` and :func:`api_endpoint` bind it, and the event sees the rest of the signature (so Gradio
still finds ``gr.Request``, ``gr.Progress`` and ``gr.SelectData`` parameters by their annotations).
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from dataclasses import dataclass

import gradio as gr
import torch

from mvar import ranges

from .work.settings import UserError

log = logging.getLogger("mvar_studio")
DEFAULT_TIME_LIMIT = 300.0  # seconds per request, for streaming handlers
DEFAULT_KEEP_MIB = 1024  # memory for the generations kept for the views, all sessions together
_UNBOUND = object()


@dataclass(frozen=True)
class ServerLimits:
    """The server's limits, checked once (``app.py`` reports a refusal as an error of its flag)."""

    time_limit: float | None = DEFAULT_TIME_LIMIT  # seconds a generation may take (None: no limit)
    keep_mib: float = DEFAULT_KEEP_MIB  # memory for the generations kept for the views
    max_images: int = 4  # images per generation

    def __post_init__(self):
        if self.time_limit is not None and not (isinstance(self.time_limit, int | float) and self.time_limit > 0):
            raise ValueError(f"--time-limit must be positive seconds, got {self.time_limit!r}")
        if not (isinstance(self.keep_mib, int | float) and self.keep_mib >= 0):
            raise ValueError(f"--keep-mib must be >= 0, got {self.keep_mib!r}")
        if not (isinstance(self.max_images, int) and not isinstance(self.max_images, bool)
                and ranges.IMAGES_MIN <= self.max_images <= ranges.MAX_BATCH):
            raise ValueError(f"max_images must be a whole number from {ranges.IMAGES_MIN} to {ranges.MAX_BATCH}, "
                             f"got {self.max_images!r}")


class StopRequests:
    """Stop presses per session (a browser tab). ``arm`` when a run is asked for (an older press no longer
    counts), ``stop`` when Stop is pressed, ``requested`` between the run's frames."""

    def __init__(self):
        self._stopped: set[str | None] = set()
        self._lock = threading.Lock()

    def arm(self, session: str | None) -> None:
        with self._lock:
            self._stopped.discard(session)

    def stop(self, session: str | None) -> None:
        with self._lock:
            self._stopped.add(session)

    def requested(self, session: str | None) -> bool:
        with self._lock:
            return session in self._stopped


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


def skips(count: int):
    """Every output kept as it is."""
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


def _bound(fn, context):
    """``fn`` with its first parameter bound to ``context`` (unless it is ``_UNBOUND``), keeping the rest of
    its signature, its annotations and whether it is a generator function."""
    if context is _UNBOUND:
        return fn, inspect.signature(fn)
    signature = inspect.signature(fn)
    rest = signature.replace(parameters=list(signature.parameters.values())[1:])
    return functools.partial(fn, context), rest


def ui_event(fn, outputs: int, time_limit: float | None = None, services=_UNBOUND):
    """A page event: refusals and failures become a warning, and the outputs keep what they showed.

    For a generator, ``time_limit`` (seconds, None = none) bounds the whole request: checked each time it
    produces a frame; past it the handler is closed and the user is told (the frames shown so far stay).
    ``services``: passed as ``fn``'s first argument."""
    call, signature = _bound(fn, services)
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streamed(*args, **kwargs):
            frames = within_time_limit(call(*args, **kwargs), time_limit, fn.__name__)
            try:
                yield from frames
            except Exception as err:  # noqa: BLE001 - every failure becomes a message in the page
                gr.Warning(message_of(err, fn.__name__))
                yield skips(outputs)
            finally:
                frames.close()
        streamed.__signature__ = signature
        return streamed

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            gr.Warning(message_of(err, fn.__name__))
            return skips(outputs)
    wrapped.__signature__ = signature
    return wrapped


def api_endpoint(fn, services=_UNBOUND):
    """A named API endpoint: a refusal or failure reaches the script as ``gr.Error`` with the message."""
    call, signature = _bound(fn, services)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise gr.Error(message_of(err, fn.__name__), print_exception=False) from None
    wrapped.__signature__ = signature
    return wrapped
