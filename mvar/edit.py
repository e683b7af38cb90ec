"""Command line: zero-shot editing of an image file (in-painting, out-painting, class-conditional edits,
variations), in VAR or MVAR mode; the library is ``editing.py``.

    python -m mvar.edit --image photo.png --mask mask.png --class 3 --mode both --out edits/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import CheckpointError, load_any
from .config import VAR_MODE, AttentionMode
from .devices import DTYPES, add_device_flag, device_from_flag
from .editing import (  # the names marked F401 stay importable from here until app/ and tests/ import mvar.editing
    DEFAULT_THRESHOLD,
    NothingToEdit,  # noqa: F401
    blend,  # noqa: F401
    edit,
    edit_steps,  # noqa: F401
    image_pyramid,  # noqa: F401
    open_image,
    outpaint_mask,
    plan_edit,  # noqa: F401
    prepare_image,
    prepare_mask,
    token_masks,  # noqa: F401
)
from .files import ASSETS, image_grid
from .sampling import SamplingConfig
from .tokenizer import to_uint8


def _mode_choices(name: str, extra: dict) -> list[AttentionMode]:
    mvar = AttentionMode.mvar_from_extra(extra)
    return {"var": [VAR_MODE], "mvar": [mvar], "both": [VAR_MODE, mvar]}[name]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mvar.edit", description=__doc__.split("\n")[0])
    parser.add_argument("--image", required=True, help="the image to edit (any size, mode or aspect ratio)")
    parser.add_argument("--mask", default=None, help="mask image: white (or opaque paint) = regenerate")
    parser.add_argument("--keep-box", type=int, nargs=4, metavar=("L", "T", "R", "B"), default=None,
                        help="out-painting: keep this box (pixels of the model's input), regenerate the rest")
    parser.add_argument("--keep-scales", type=int, default=0,
                        help="keep the image's first N scales whole (variations; with no mask: regenerate the rest)")
    parser.add_argument("--class", dest="label", type=int, required=True, help="class id to generate under")
    parser.add_argument("--tokenizer", default=str(ASSETS / "tokenizer.safetensors"))
    parser.add_argument("--transformer", default=str(ASSETS / "mvar.safetensors"))
    parser.add_argument("--mode", choices=["var", "mvar", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="share of a token's area inside the mask that makes it regenerated (default 0.5)")
    parser.add_argument("--no-blend", action="store_true", help="keep the generation's own pixels outside the mask")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--out", default="edits")
    add_device_flag(parser)
    args = parser.parse_args(argv)
    device = device_from_flag(parser, args.device)
    try:
        tokenizer = load_any(args.tokenizer, "tokenizer", device=device).model.eval()
        loaded = load_any(args.transformer, "transformer", device=device)
        transformer = loaded.model.eval()
        size = tokenizer.cfg.image_size
        prepared = prepare_image(open_image(args.image), size)
        if prepared.note:
            print(f"image: {prepared.note}")
        if args.keep_box is not None:
            mask = outpaint_mask(size, tuple(args.keep_box))
        elif args.mask is not None:
            mask = prepare_mask(open_image(args.mask), size, prepared.crop)
        else:
            mask = torch.ones(size, size, dtype=torch.bool)
        if not mask.any():
            sys.exit("nothing to edit: the mask is empty (paint the region to regenerate in white)")
        if mask.all() and args.keep_scales == 0:
            print("the mask covers the whole image: this is plain generation of the class")
        defaults = loaded.extra.get("sampling_defaults", {})
        sampling = SamplingConfig(
            cfg=args.cfg if args.cfg is not None else defaults.get("cfg", 1.5),
            top_k=args.top_k if args.top_k is not None else defaults.get("top_k", 0),
            top_p=args.top_p if args.top_p is not None else defaults.get("top_p", 1.0))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for mode in _mode_choices(args.mode, loaded.extra):
            result = edit(transformer, tokenizer, prepared.pixels, mask, args.label, args.seeds, sampling, mode,
                          args.keep_scales, not args.no_blend, args.threshold, DTYPES[args.dtype])
            if not rows:
                rows.append(to_uint8(torch.cat([prepared.pixels[None], result.reconstruction.cpu()])))
            images = to_uint8(result.images)
            for seed, image in zip(args.seeds, images, strict=True):
                Image.fromarray(image).save(out / f"{mode.name.lower()}_class{args.label}_seed{seed}.png")
            rows.append(images)
            print(f"{mode.name}: regenerated {result.plan.regenerated_tokens} tokens per scale")
    except (CheckpointError, ValueError) as err:
        sys.exit(f"error: {err}")
    columns = max(2, len(args.seeds))
    cells = [np.concatenate([r, np.full((columns - len(r), *r.shape[1:]), 255, np.uint8)]) for r in rows]
    Image.fromarray(image_grid(np.concatenate(cells), columns)).save(out / "grid.png")
    print(f"wrote {out}/ (grid.png: input and reconstruction, then one row per mode)")


if __name__ == "__main__":
    main()
