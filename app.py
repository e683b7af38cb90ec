"""MVAR Studio: parse flags, build the app, launch it.

    python app.py                                  # the default models in assets/, on this machine
    python app.py --models-dir models             # + official files found there (vae + var/mvar .pth)
    python app.py --tokenizer T --transformer M [--var-transformer V]   # explicit files

Host and port follow GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (and PORT), as on Hugging Face Spaces.
--device auto|cpu|cuda|cuda:N (MVAR_DEVICE, default auto: CUDA when present) is where the models run. Where the
`spaces` package imports (Hugging Face Spaces, ZeroGPU), the models are held on the CPU and each generation and
analysis runs inside a @spaces.GPU call on the GPU it lends (--device cpu turns that off).

Load limits: at most --concurrency model runs at once (MVAR_CONCURRENCY, default 2), at most --queue-size
requests waiting behind them (MVAR_QUEUE_SIZE, default 16; more are refused with Gradio's "busy" message),
a generation is stopped after --time-limit seconds (MVAR_TIME_LIMIT, default 300), and the generations kept
for the views (scale slider, attention) of all sessions together stay within --keep-mib (MVAR_KEEP_MIB, default
1024; least recently used first out, and a session's own when its page closes).
"""

from __future__ import annotations

import argparse
import logging
import os

from app.page import CSS, build_app
from app.policy import DEFAULT_KEEP_MIB, DEFAULT_TIME_LIMIT, ServerLimits
from app.registry import ModelEntry, ModelRegistry
from app.zerogpu import GpuTasks
from mvar.devices import DEVICE_HELP, resolve_device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MVAR Studio")
    parser.add_argument("--models-dir", default=os.environ.get("MVAR_MODELS_DIR"),
                        help="folder with official files (vae_ch160v4096z32.pth, var_d16.pth, mvar-*.pth)")
    parser.add_argument("--download", action="store_true",
                        help="offer the official presets for download (needs huggingface_hub and a network)")
    parser.add_argument("--tokenizer", help="a tokenizer file (ours or official) for an extra model entry")
    parser.add_argument("--transformer", help="a transformer file (ours or official) for an extra model entry")
    parser.add_argument("--var-transformer", help="a separate VAR baseline for the extra entry")
    parser.add_argument("--device", default=os.environ.get("MVAR_DEVICE", "auto"),
                        help=f"where the models run: {DEVICE_HELP} (default auto, or MVAR_DEVICE)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))))
    parser.add_argument("--queue-size", type=int, default=int(os.environ.get("MVAR_QUEUE_SIZE", "16")),
                        help="requests that may wait for a free slot; more are refused as busy (default 16)")
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("MVAR_CONCURRENCY", "2")),
                        help="generations (and analyses, memory measurements) running at once (default 2)")
    parser.add_argument("--time-limit", type=float,
                        default=float(os.environ.get("MVAR_TIME_LIMIT", str(DEFAULT_TIME_LIMIT))),
                        help=f"seconds a generation may take before it is stopped (default {DEFAULT_TIME_LIMIT:g})")
    parser.add_argument("--keep-mib", type=float, default=float(os.environ.get("MVAR_KEEP_MIB", DEFAULT_KEEP_MIB)),
                        help="memory (MiB) for past generations kept for the scale slider and attention views, "
                             f"all sessions together (default {DEFAULT_KEEP_MIB})")
    args = parser.parse_args(argv)
    if args.queue_size < 1:
        parser.error(f"--queue-size must be at least 1, got {args.queue_size}")
    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    try:
        args.limits = ServerLimits(args.time_limit, args.keep_mib)  # checked there, once
    except ValueError as err:
        parser.error(str(err))
    try:
        args.device = str(resolve_device(args.device))  # "cuda:0"; the error names --device
    except ValueError as err:
        parser.error(str(err))
    return args


def placement(device: str) -> tuple[str, GpuTasks]:
    """(the registry's device, how model work runs): ZeroGPU calls with the models held on the CPU where
    ``spaces`` imports (unless the device is the CPU anyway), else everything on ``device``."""
    gpu = GpuTasks.detect(enabled=device != "cpu")
    return ("cpu" if gpu.active else device), gpu


def main(argv=None) -> None:
    args = parse_args(argv)
    # one line per refused request or stopped generation (policy.py); tracebacks only for real failures
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    extra = []
    if args.transformer or args.tokenizer:
        if not (args.transformer and args.tokenizer):
            raise SystemExit("error: --tokenizer and --transformer go together")
        extra.append(ModelEntry("custom", f"{os.path.basename(args.transformer)} (command line)", "local",
                                args.tokenizer, args.transformer, args.var_transformer))
    device, gpu = placement(args.device)
    registry = ModelRegistry(args.models_dir, allow_download=args.download, extra=extra, device=device)
    demo = build_app(registry, args.limits, gpu=gpu)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, css=CSS)


if __name__ == "__main__":
    main()
