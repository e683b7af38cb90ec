"""Command line: generate class-conditional images and write them as a PNG grid.

    python -m mvar.sample --classes 0 1 2 --per-class 4 --mode both --out samples.png
    python -m mvar.sample --device cuda --dtype fp16 ...     # --device auto (default) | cpu | cuda | cuda:N

Models: ``--tokenizer`` / ``--transformer`` take our .safetensors files or official .pth files
(default: the models shipped in assets/). ``--random-init PRESET`` builds untrained models of a
preset instead (for smoke tests only: the images are noise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import CheckpointError, load_any
from .config import AttentionMode, get_preset
from .devices import DTYPES, add_device_flag, describe_device, device_from_flag
from .files import ASSETS, image_grid
from .sampling import SamplingConfig, decode_to_unit, generate_steps
from .tokenizer import MultiScaleVQVAE, to_uint8
from .transformer import ScaleTransformer


def load_models(args, device: torch.device) -> tuple[MultiScaleVQVAE, ScaleTransformer, dict]:
    if args.random_init:
        preset = get_preset(args.random_init)
        torch.manual_seed(0)  # built on the CPU, so the same seed gives the same weights on every device
        return (MultiScaleVQVAE(preset.tokenizer).to(device).eval(),
                ScaleTransformer(preset.transformer).to(device).eval(), {})
    tokenizer = load_any(args.tokenizer, "tokenizer", device=device)
    transformer = load_any(args.transformer, "transformer", preset=args.preset, device=device)
    return tokenizer.model, transformer.model, {**transformer.extra, "trained_mode": transformer.trained_mode}


def run_label(mode: AttentionMode, trained_mode: str | None, file_name: str) -> str:
    """What a run is, by the attention the weights were trained for: "MVAR" for MVAR-trained weights run
    with MVAR's attention, and exactly what it is otherwise (e.g. VAR weights with MVAR attention)."""
    if trained_mode is None:
        return f"{mode.name} attention ({file_name}: the file does not say what it was trained for)"
    trained = "VAR" if trained_mode == "var" else "MVAR"
    if trained == mode.name:
        return f"{mode.name} ({file_name}, trained with {trained} attention)"
    return f"{trained} weights with {mode.name} attention, not trained for it ({file_name})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mvar.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=str(ASSETS / "tokenizer.safetensors"))
    parser.add_argument("--transformer", default=str(ASSETS / "mvar.safetensors"))
    parser.add_argument("--preset", default=None, help="preset of an official .pth transformer (default: inferred)")
    parser.add_argument("--random-init", metavar="PRESET", default=None, help="untrained models (smoke test)")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (default: all)")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--smooth", action="store_true")
    parser.add_argument("--mode", choices=["var", "mvar", "both"], default="mvar")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--filmstrip", action="store_true", help="one row per sample with all scale previews")
    parser.add_argument("--out", default="samples.png")
    add_device_flag(parser)
    args = parser.parse_args(argv)
    device = device_from_flag(parser, args.device)
    try:
        tokenizer, transformer, extra = load_models(args, device)
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    defaults = extra.get("sampling_defaults", {})
    sampling = SamplingConfig(
        cfg=args.cfg if args.cfg is not None else defaults.get("cfg", 1.5),
        top_k=args.top_k if args.top_k is not None else defaults.get("top_k", 0),
        top_p=args.top_p if args.top_p is not None else defaults.get("top_p", 1.0),
        smooth=args.smooth,
    )
    classes = args.classes if args.classes is not None else list(range(transformer.cfg.num_classes))
    labels = [c for c in classes for _ in range(args.per_class)]
    mvar = AttentionMode.mvar_from_extra(extra)  # the file's kernel size and refine step, else the official ones
    modes = {"var": [AttentionMode.var()], "mvar": [mvar], "both": [AttentionMode.var(), mvar]}[args.mode]
    file_name = "random weights" if args.random_init else Path(args.transformer).name
    trained_mode = "untrained" if args.random_init else extra.get("trained_mode")
    rows = []
    try:
        for mode in modes:
            steps = list(generate_steps(transformer, tokenizer, labels, args.seed, sampling, mode,
                                        previews=args.filmstrip, dtype=DTYPES[args.dtype], max_batch=1024))
            if args.filmstrip:
                strip = torch.stack([s.preview for s in steps], dim=1)  # (B, S, 3, H, W)
                rows.append(to_uint8(strip.flatten(0, 1)))
            else:
                rows.append(to_uint8(decode_to_unit(tokenizer, steps[-1].f_hat)))
            seconds = sum(s.seconds for s in steps)
            label = f"{mode.name} attention on random weights" if trained_mode == "untrained" else run_label(
                mode, trained_mode, file_name)
            print(f"{label}: {len(labels)} images on {describe_device(device)}, tokens in {seconds:.2f} s")
    except ValueError as err:
        sys.exit(f"error: {err}")
    columns = len(transformer.cfg.patch_nums) if args.filmstrip else args.per_class
    Image.fromarray(image_grid(np.concatenate(rows), columns)).save(args.out)
    note = " (random weights: noise, for smoke tests only)" if args.random_init else ""
    print(f"wrote {args.out}{note}")


if __name__ == "__main__":
    main()
