"""``python -m tests.fid_worker ARGS``: ``mvar.sample_fid`` that stops itself (SIGSTOP) after writing
``FID_STOP_AFTER`` images, so a test can SIGKILL it at a known point instead of racing it."""

from __future__ import annotations

import os
import signal
import sys

from mvar import sample_fid

STOP_AFTER = int(os.environ["FID_STOP_AFTER"])
real_save = sample_fid.save_png
saved = 0


def save_then_maybe_stop(image, path) -> None:
    global saved
    real_save(image, path)
    saved += 1
    if saved == STOP_AFTER:
        os.kill(os.getpid(), signal.SIGSTOP)


sample_fid.save_png = save_then_maybe_stop
sample_fid.main(sys.argv[1:])
