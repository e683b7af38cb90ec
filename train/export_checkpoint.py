"""Export the newest checkpoint of a transformer run in our safetensors format, before the run ends.

    python -m train.export_checkpoint --run-dir runs/var --out var.safetensors

For runs stopped early (a session ended, or enough is enough): the card says at which step of how
many the weights were taken, and the validation figures are measured on the exported weights.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mvar.checkpoints import load_any
from mvar.config import get_preset
from mvar.transformer import ScaleTransformer

from .common import RunFolder, load_averages
from .data import build_dataset, token_cache
from .train_transformer import TransformerTraining, attention_mode, evaluate, export_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    state = RunFolder(args.run_dir).load_latest()
    if state is None:
        raise SystemExit(f"error: no readable checkpoint in {args.run_dir}")
    known = {f.name for f in dataclasses.fields(TransformerTraining)}  # runs of older versions carry more fields
    run_args = TransformerTraining(**{k: v for k, v in state["args"].items() if k in known})
    tokenizer = load_any(run_args.tokenizer, "tokenizer").model.eval().requires_grad_(False)
    model = ScaleTransformer(get_preset(run_args.preset).transformer)
    model.load_state_dict(state["model"])
    if run_args.ema > 0 and state.get("ema"):
        load_averages(model, state["ema"])
    model.eval()
    val_set, class_names = build_dataset(run_args.data, "val", tokenizer.cfg.image_size)
    cache_dir = Path(run_args.cache_dir) if run_args.cache_dir else Path(args.run_dir) / "token-cache"
    val_tokens, val_labels = token_cache(tokenizer, run_args.tokenizer, val_set, cache_dir, "val")
    mode = attention_mode(run_args)
    metrics = evaluate(model, tokenizer, val_tokens, val_labels, mode, precision=run_args.precision)
    export_model(args.out, model, run_args, class_names, metrics, steps=state["step"],
                 planned_steps=run_args.steps, stopped_early=state["step"] < run_args.steps,
                 wall_seconds=round(state["wall_seconds"], 1), run_args=state["args"])
    print(f"exported step {state['step']} of {run_args.steps} to {args.out}: val loss {metrics['val_loss']:.3f}")


if __name__ == "__main__":
    main()
