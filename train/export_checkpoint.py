"""Export the newest checkpoint of a transformer run in our safetensors format, before the run ends.

    python -m train.export_checkpoint --run-dir runs/var --out var.safetensors

For runs stopped early (a session ended, or enough is enough): the card says at which step of how
many the weights were taken, and the validation figures are measured on the exported weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mvar.checkpoints import load_any, save_model
from mvar.config import get_preset
from mvar.transformer import ScaleTransformer

from .common import RunFolder
from .data import build_dataset, token_cache
from .train_transformer import TransformerTraining, attention_mode, evaluate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    state = RunFolder(args.run_dir).load_latest()
    if state is None:
        raise SystemExit(f"error: no readable checkpoint in {args.run_dir}")
    run_args = TransformerTraining(**state["args"])
    tokenizer = load_any(run_args.tokenizer, "tokenizer").model.eval().requires_grad_(False)
    model = ScaleTransformer(get_preset(run_args.preset).transformer)
    model.load_state_dict(state["model"])
    if run_args.ema > 0 and state.get("ema"):
        model.load_state_dict({k: state["ema"].get(k, v).to(v.dtype) for k, v in model.state_dict().items()})
    model.eval()
    val_set, class_names = build_dataset(run_args.data, "val", tokenizer.cfg.image_size, run_args.val_size,
                                         run_args.seed, flip=False)
    cache_dir = Path(run_args.cache_dir) if run_args.cache_dir else Path(args.run_dir) / "token-cache"
    val_tokens, val_labels = token_cache(tokenizer, run_args.tokenizer, val_set, cache_dir, "val")
    mode = attention_mode(run_args)
    with torch.no_grad():
        metrics = evaluate(model, tokenizer, val_tokens, val_labels, mode, precision=run_args.precision)
    card = {"kind": "transformer", "trained_mode": run_args.mode, "steps": state["step"],
            "planned_steps": run_args.steps, "stopped_early": state["step"] < run_args.steps,
            "batch_size": run_args.batch_size, "wall_seconds": round(state["wall_seconds"], 1),
            "init_from": Path(run_args.init_from).name if run_args.init_from else None,
            "tokenizer": Path(run_args.tokenizer).name, "data": run_args.data, "run_args": state["args"], **metrics}
    extra = {"class_names": class_names, "trained_mode": run_args.mode, "card": card,
             "attention": {"refine_step": run_args.refine_step, "kernel_size": run_args.kernel_size}}
    save_model(args.out, model, extra=extra, dtype=torch.bfloat16)
    Path(args.out).with_suffix(".json").write_text(json.dumps(card, indent=2))
    print(f"exported step {state['step']} of {run_args.steps} to {args.out}: val loss {metrics['val_loss']:.3f}")


if __name__ == "__main__":
    main()
