"""MVAR Studio: parse flags, build the app, launch it.

    python app.py                                  # the default models in assets/, on this machine
    python app.py --models-dir models             # + official files found there (vae + var/mvar .pth)
    python app.py --tokenizer T --transformer M [--var-transformer V]   # explicit files

Host and port follow GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (and PORT), as on Hugging Face Spaces.
"""

from __future__ import annotations

import argparse
import os

from app.layout import build_app
from app.registry import ModelEntry, ModelRegistry


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MVAR Studio")
    parser.add_argument("--models-dir", default=os.environ.get("MVAR_MODELS_DIR"),
                        help="folder with official files (vae_ch160v4096z32.pth, var_d16.pth, mvar-*.pth)")
    parser.add_argument("--download", action="store_true",
                        help="offer the official presets for download (needs huggingface_hub and a network)")
    parser.add_argument("--tokenizer", help="a tokenizer file (ours or official) for an extra model entry")
    parser.add_argument("--transformer", help="a transformer file (ours or official) for an extra model entry")
    parser.add_argument("--var-transformer", help="a separate VAR baseline for the extra entry")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))))
    parser.add_argument("--queue-size", type=int, default=int(os.environ.get("MVAR_QUEUE_SIZE", "16")))
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("MVAR_CONCURRENCY", "2")))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    extra = []
    if args.transformer or args.tokenizer:
        if not (args.transformer and args.tokenizer):
            raise SystemExit("error: --tokenizer and --transformer go together")
        extra.append(ModelEntry("custom", f"{os.path.basename(args.transformer)} (command line)", "local",
                                args.tokenizer, args.transformer, args.var_transformer))
    registry = ModelRegistry(args.models_dir, allow_download=args.download, extra=extra)
    demo = build_app(registry)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
