"""Choose a model's sampling defaults (cfg, top-k, top-p) by measurement, and store them in the file.

    python -m train.choose_sampling --data /work/runs/emoji64 --tokenizer assets/tokenizer.safetensors \
        --transformer assets/mvar.safetensors --mode mvar --per-class 6

Every setting of a small grid generates ``per-class`` samples per class; each is scored by the
shipped classifier (class accuracy) and by the Fréchet distance of its features to real
training images (a class-balanced draw). The winner has the lowest Fréchet distance among the
settings within 2 points of the best accuracy. The file is rewritten (atomically) with
``sampling_defaults`` and the whole grid in its metadata, so the app and ``mvar.sample`` pick them up.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from mvar.checkpoints import load_model, save_model
from mvar.config import AttentionMode
from mvar.devices import add_device_flag, device_from_flag
from mvar.sampling import SamplingConfig

from .classifier import load_classifier
from .evaluate import evaluate_model, real_statistics

CFGS = (0.0, 1.0, 2.0, 3.0, 4.0)
TOP_KS = (0, 64)
TOP_PS = (1.0, 0.9)


def choose(results: list[dict], accuracy_slack: float = 0.02) -> dict:
    """The setting with the lowest Fréchet distance among those within ``accuracy_slack`` of the best accuracy."""
    best_accuracy = max(r["accuracy"] for r in results)
    eligible = [r for r in results if r["accuracy"] >= best_accuracy - accuracy_slack]
    return min(eligible, key=lambda r: r["frechet_distance"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.choose_sampling", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--transformer", required=True)
    parser.add_argument("--mode", choices=["var", "mvar"], required=True, help="the mode the defaults are for")
    parser.add_argument("--classifier", default="assets/classifier.safetensors")
    parser.add_argument("--per-class", type=int, default=6)
    parser.add_argument("--data", required=True, help="the ImageNet-layout folder the models were trained on")
    parser.add_argument("--real-per-class", type=int, default=100, help="training images per class for the "
                        "real statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    add_device_flag(parser)
    args = parser.parse_args(argv)
    device = device_from_flag(parser, args.device)

    tokenizer = load_model(args.tokenizer, device, expect="tokenizer").model
    loaded = load_model(args.transformer, device, expect="transformer")
    transformer = loaded.model
    classifier = load_classifier(args.classifier, device).model
    mode = AttentionMode.var() if args.mode == "var" else AttentionMode.mvar_from_extra(loaded.extra)
    real = real_statistics(classifier, args.data, args.real_per_class, seed=args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    results = []
    for cfg, top_k, top_p in itertools.product(CFGS, TOP_KS, TOP_PS):
        sampling = SamplingConfig(cfg=cfg, top_k=min(top_k, transformer.cfg.vocab_size), top_p=top_p)
        scored = evaluate_model(transformer, tokenizer, classifier, mode, real, args.per_class, sampling,
                                args.seed, dtype, class_names=loaded.extra.get("class_names"))
        row = {"cfg": cfg, "top_k": sampling.top_k, "top_p": top_p, "accuracy": scored["accuracy"],
               "frechet_distance": scored["frechet_distance"]}
        results.append(row)
        print(json.dumps(row), flush=True)
    best = choose(results)
    defaults = {k: best[k] for k in ("cfg", "top_k", "top_p")}
    extra = dict(loaded.extra)
    extra["sampling_defaults"] = defaults
    extra["sampling_search"] = {"mode": args.mode, "per_class": args.per_class, "seed": args.seed,
                                "dtype": args.dtype, "grid": results, "chosen": best}
    save_model(args.transformer, transformer, extra=extra, dtype=_stored_dtype(args.transformer, torch.float32))
    card = Path(args.transformer).with_suffix(".json")
    if card.exists():
        data = json.loads(card.read_text())
        data["sampling_defaults"] = defaults
        data["sampling_search"] = extra["sampling_search"]
        card.write_text(json.dumps(data, indent=2))
    print(f"chosen for {args.mode}: {defaults} (accuracy {best['accuracy']:.3f}, FD {best['frechet_distance']:.3f})")


def _stored_dtype(path, fallback: torch.dtype) -> torch.dtype:
    """Keep the file's storage dtype (our exports store bf16)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = [name for name in handle.keys() if name.endswith(".weight")]  # noqa: SIM118
        return handle.get_tensor(names[0]).dtype if names else fallback


if __name__ == "__main__":
    main()
