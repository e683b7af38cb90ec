"""Measure sample quality against real images: VAR and MVAR attention, side by side, in one run.

    python -m train.evaluate --data /work/runs/emoji64 --tokenizer assets/tokenizer.safetensors \\
        --transformer assets/mvar.safetensors --var-transformer assets/var.safetensors \\
        --classifier assets/classifier.safetensors --per-class 20 --seed 0 --out report.json

For each mode it generates ``--per-class`` samples of every class (sample i gets seed ``--seed + i``
in both modes, so the two modes are compared on the same random numbers) and reports

* class accuracy: how often the classifier (``train/classifier.py``) recognises the requested class,
  overall and per class, and the mean probability it gives the requested class;
* Fréchet distance between Gaussians fitted to the classifier's penultimate features of the samples
  and of real images (a class-balanced draw of the "train" split, the distribution the models
  learned; as FID uses ImageNet's train statistics): FID's formula in a feature space that knows
  these images (Inception features know nothing of them);
* generation wall time.

Once per run it also reports the tokenizer's reconstruction PSNR on the held-out "val" split and
the class accuracy of those reconstructions (the ceiling any generator can reach through this
tokenizer), and a "real" reference row: the same metrics for as many real images as samples were
generated, disjoint from the ones the statistics come from (real against real). The Fréchet
distance is biased upwards for small sample counts, so compare a model's number with this
reference row at the same count, not with zero.

The pieces (``classifier_features``, ``gaussian_stats``, ``frechet_distance``, ``real_statistics``,
``evaluate_model``) are plain functions for other code, e.g. to choose sampling defaults by measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mvar.checkpoints import CheckpointError, load_model
from mvar.config import AttentionMode
from mvar.devices import DTYPES, add_device_flag, resolve_device
from mvar.files import atomic_write_bytes
from mvar.sampling import SamplingConfig, generate
from mvar.tokenizer import MultiScaleVQVAE
from mvar.transformer import ScaleTransformer

from .classifier import Classifier, load_classifier
from .data import ImageFolderDataset, balanced_images

# ---------------------------------------------------------------------------------------------
# Features and the Fréchet distance
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def classifier_features(classifier: Classifier, images: torch.Tensor, batch_size: int = 256,
                        unit_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) -> (features (N, D) float64, logits (N, classes) float32).

    Images are in [-1, 1], or in [0, 1] with ``unit_range=True`` (what ``generate`` returns).
    """
    classifier.eval()
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for part in images.split(batch_size):
        part = part.to(device, torch.float32)
        if unit_range:
            part = part * 2 - 1
        f = classifier.features(part)
        feats.append(f.double().cpu())
        logits.append(classifier.head(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


@dataclass
class FeatureStats:
    """A Gaussian fitted to features: mean (D,), covariance (D, D), both float64, from ``count`` vectors."""

    mu: torch.Tensor
    sigma: torch.Tensor
    count: int


def gaussian_stats(features: torch.Tensor) -> FeatureStats:
    """(N, D) features -> their mean and unbiased covariance (N >= 2)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {tuple(features.shape)}")
    features = features.double()
    return FeatureStats(features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], -1),
                        features.shape[0])


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition, V diag(sqrt(l)) V^T.

    Eigenvalues below zero can only come from round-off (or a singular covariance), so they are clamped to 0.
    """
    values, vectors = torch.linalg.eigh(_symmetric(matrix))
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), squared as in FID:

        d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1^1/2 S2 S1^1/2)^1/2 )

    FID writes the last term as tr((S1 S2)^1/2); S1 S2 is similar to the symmetric PSD matrix
    S1^1/2 S2 S1^1/2 (same eigenvalues l_i >= 0), so the term is 2 * sum_i sqrt(l_i), which we get
    from a symmetric eigendecomposition: stable, no complex round-off as with a general sqrtm.
    Accepts tensors or arrays; means (D,), covariances (D, D); computed in float64.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    dim = mu1.shape[0]
    if mu2.shape[0] != dim or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"shape mismatch: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
                         f"covariances {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    sigma1, sigma2 = _symmetric(sigma1), _symmetric(sigma2)
    root1 = psd_sqrt(sigma1)
    middle = _symmetric(root1 @ sigma2 @ root1)
    trace_root = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root
    return max(float(distance), 0.0)  # round-off can push identical Gaussians a hair below 0


def stats_distance(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ---------------------------------------------------------------------------------------------
# Real images and the tokenizer
# ---------------------------------------------------------------------------------------------


def real_statistics(classifier: Classifier, data: str, per_class: int, seed: int = 0, skip: int = 0,
                    batch_size: int = 256) -> FeatureStats:
    """Feature statistics of ``per_class`` training images of every class (see ``balanced_images``)."""
    images, _ = balanced_images(ImageFolderDataset(data, "train", classifier.cfg.image_size), per_class, seed, skip)
    return gaussian_stats(classifier_features(classifier, images, batch_size)[0])


def smallest_class(data: str, split: str = "train") -> int:
    dataset = ImageFolderDataset(data, split, 64)
    return min(sum(1 for _, label in dataset.items if label == c) for c in range(len(dataset.class_names)))


@torch.no_grad()
def reconstruct(tokenizer: MultiScaleVQVAE, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Encode -> all scales -> decode in fp32: (N, 3, H, W) in [-1, 1] -> same, on CPU."""
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    return torch.cat([tokenizer.reconstruct(part.to(device)).float().cpu() for part in images.split(batch_size)])


def psnr(images: torch.Tensor, references: torch.Tensor) -> float:
    """Mean per-image PSNR in dB with peak 1 on [0, 1] pixels; inputs (N, 3, H, W) in [-1, 1]."""
    mse = ((images.float() - references.float()) / 2).square().flatten(1).mean(dim=1)  # /2: [-1, 1] -> [0, 1]
    return float((-10 * torch.log10(mse.clamp(min=1e-10))).mean())


# ---------------------------------------------------------------------------------------------
# Generation and scoring
# ---------------------------------------------------------------------------------------------


def generate_samples(
    transformer: ScaleTransformer, tokenizer: MultiScaleVQVAE, per_class: int, sampling: SamplingConfig,
    mode: AttentionMode, seed: int = 0, dtype: torch.dtype | None = None, batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``per_class`` samples of every class: (images (N, 3, H, W) in [0, 1] on CPU, labels (N,), wall seconds).

    Sample i (class-major order) uses seed ``seed + i``, so two modes see the same random numbers.
    """
    labels = [c for c in range(transformer.cfg.num_classes) for _ in range(per_class)]
    seeds = [seed + i for i in range(len(labels))]
    images, started = [], time.perf_counter()
    for begin in range(0, len(labels), batch_size):
        out = generate(transformer, tokenizer, labels[begin:begin + batch_size], seeds[begin:begin + batch_size],
                       sampling=sampling, mode=mode, dtype=dtype, max_batch=batch_size)
        images.append(out.images.float().cpu())
    return torch.cat(images), torch.tensor(labels), time.perf_counter() - started


def score_images(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, real: FeatureStats,
                 class_names: list[str], unit_range: bool) -> dict:
    """Class accuracy (overall, per class), mean probability of the requested class, Fréchet distance to ``real``."""
    features, logits = classifier_features(classifier, images, unit_range=unit_range)
    correct = (logits.argmax(dim=1) == labels).float()
    confidence = logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    per_class = {name: round(float(correct[labels == c].mean()), 4)
                 for c, name in enumerate(class_names) if (labels == c).any()}
    return {
        "num_samples": int(labels.numel()),
        "accuracy": round(float(correct.mean()), 4),
        "mean_confidence": round(float(confidence.mean()), 4),
        "frechet_distance": round(stats_distance(gaussian_stats(features), real), 6),
        "per_class_accuracy": per_class,
    }


def evaluate_model(transformer: ScaleTransformer, tokenizer: MultiScaleVQVAE, classifier: Classifier,
                   mode: AttentionMode, real: FeatureStats, per_class: int = 10,
                   sampling: SamplingConfig | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                   batch_size: int = 32, class_names: list[str] | None = None) -> dict:
    """Generate ``per_class`` samples per class in ``mode`` and score them (see ``score_images``).

    ``real``: statistics of held-out real images (``real_statistics``). Needs per_class * classes >= 2.
    """
    sampling = (sampling or SamplingConfig()).validate(transformer.cfg.vocab_size)
    num_classes = transformer.cfg.num_classes
    if classifier.cfg.num_classes != num_classes:
        raise ValueError(f"the classifier knows {classifier.cfg.num_classes} classes, "
                         f"the transformer generates {num_classes}")
    if per_class < 1 or per_class * num_classes < 2:
        raise ValueError(f"per_class must be >= 1 and give at least 2 samples, got {per_class}")
    names = list(class_names or [str(c) for c in range(num_classes)])
    images, labels, seconds = generate_samples(transformer, tokenizer, per_class, sampling, mode, seed, dtype,
                                               batch_size)
    result = {"mode": mode.name, "attention": asdict(mode)}
    result.update(score_images(classifier, images, labels, real, names, unit_range=True))
    result["generation_seconds"] = round(seconds, 2)
    result["seconds_per_image"] = round(seconds / len(labels), 4)
    return result


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer .safetensors")
    parser.add_argument("--transformer", required=True, help="transformer .safetensors (MVAR mode, and VAR mode "
                                                             "unless --var-transformer is given)")
    parser.add_argument("--var-transformer", default="", help="separate weights for VAR mode")
    parser.add_argument("--classifier", default="assets/classifier.safetensors")
    parser.add_argument("--per-class", type=int, default=10, help="samples per class and mode")
    parser.add_argument("--cfg", type=float, default=None, help="guidance strength (0 = off); unset: each file's "
                        "sampling_defaults (as the app and mvar.sample use them), else the library's")
    parser.add_argument("--top-k", type=int, default=None, help="0 = off; unset: as --cfg")
    parser.add_argument("--top-p", type=float, default=None, help="1 = off; unset: as --cfg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="transformer autocast dtype (fp16 on CUDA only)")
    parser.add_argument("--refine-step", type=int, default=None, help="MVAR: first windowed scale "
                                                                      "(default: the file's, else 8)")
    parser.add_argument("--kernel-size", type=int, default=None, help="MVAR: window side (default: the file's, else 7)")
    parser.add_argument("--data", required=True, help="the ImageNet-layout folder the models were trained on")
    parser.add_argument("--real-per-class", type=int, default=0, help="training images per class for the real "
                        "statistics (0 = all the smallest class has beside the reference draw)")
    parser.add_argument("--psnr-images", type=int, default=512, help="held-out images for the tokenizer PSNR")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the class-balanced real draws")
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch size")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out", default="", help="write the report here as JSON")
    parser.add_argument("--cards", action="store_true", help="also write each model's result into its card "
                        "(the .json beside its .safetensors) under 'evaluation'")
    add_device_flag(parser)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad arguments before any model is loaded, naming the flag."""
    if args.per_class < 1:
        parser.error(f"--per-class must be at least 1, got {args.per_class}")
    if args.cfg is not None and not (math.isfinite(args.cfg) and 0 <= args.cfg <= 100):
        parser.error(f"--cfg must be in [0, 100], got {args.cfg}")
    if args.top_k is not None and args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.real_per_class < 0:
        parser.error(f"--real-per-class must be 0 (auto) or positive, got {args.real_per_class}")
    if not Path(args.data, "train").is_dir() or not Path(args.data, "val").is_dir():
        parser.error(f"--data {args.data}: expected an ImageNet-layout folder with train/ and val/")
    if args.psnr_images < 1 or args.batch_size < 1 or args.num_threads < 0 or args.data_seed < 0:
        parser.error("--psnr-images and --batch-size must be >= 1, --num-threads and --data-seed >= 0")
    for flag in ("tokenizer", "transformer", "var_transformer", "classifier"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            parser.error(f"--{flag.replace('_', '-')}: no such file {path}")
    if args.out and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a folder; name a .json file")
    try:
        args.device = str(resolve_device(args.device))
    except ValueError as err:
        parser.error(str(err))
    if args.dtype == "fp16" and not args.device.startswith("cuda"):
        parser.error(f"--dtype fp16 is for CUDA devices, this run is on {args.device}; use bf16 or fp32")


def sampling_for(args: argparse.Namespace, extra: dict, vocab_size: int) -> SamplingConfig:
    """The flags where given, else the file's chosen ``sampling_defaults``, else the library's defaults."""
    chosen = {**asdict(SamplingConfig()), **extra.get("sampling_defaults", {})}
    given = {name: getattr(args, name) for name in ("cfg", "top_k", "top_p") if getattr(args, name) is not None}
    return SamplingConfig(**{**chosen, **given}).validate(vocab_size)


def mvar_mode(args: argparse.Namespace, extra: dict) -> AttentionMode:
    """MVAR attention from the flags, else from the transformer file's training settings, else the defaults."""
    return AttentionMode.mvar_from_extra(extra, args.refine_step, args.kernel_size)


def format_table(report: dict) -> str:
    """Side-by-side text table of the modes (and the real reference), with per-class accuracy."""
    columns = {**report["modes"], "real": report["real_reference"]}
    width = max(12, *(len(n) + 2 for n in columns))
    rows = [("", list(columns))]
    rows.append(("class accuracy", [f"{c['accuracy']:.3f}" for c in columns.values()]))
    rows.append(("mean confidence", [f"{c['mean_confidence']:.3f}" for c in columns.values()]))
    rows.append(("Fréchet distance", [f"{c['frechet_distance']:.3f}" for c in columns.values()]))
    rows.append(("seconds / image", [f"{c['seconds_per_image']:.3f}" if "seconds_per_image" in c else "-"
                                     for c in columns.values()]))
    for name in report["class_names"]:
        rows.append((f"  {name}", [f"{c['per_class_accuracy'].get(name, float('nan')):.2f}" for c in columns.values()]))
    label_width = max(len(r[0]) for r in rows) + 2
    lines = [r[0].ljust(label_width) + "".join(v.rjust(width) for v in r[1]) for r in rows]
    tok = report["tokenizer"]
    lines.append(f"tokenizer reconstructions of {tok['num_images']} held-out images: PSNR {tok['psnr_db']:.2f} dB, "
                 f"classifier accuracy {tok['classifier_accuracy_on_reconstructions']:.3f}")
    lines.append(f"{report['num_samples_per_mode']} samples per mode vs {report['real']['num_images']} "
                 "held-out real images; 'real' = the same metrics for held-out real images (a floor)")
    return "\n".join(lines)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Load everything named by ``args``, evaluate both modes and return the report (a JSON-able dict)."""
    device = torch.device(args.device)  # resolved by check_args
    dtype = DTYPES[args.dtype]
    tokenizer = load_model(args.tokenizer, device, expect="tokenizer").model
    mvar_file = load_model(args.transformer, device, expect="transformer")
    var_file = load_model(args.var_transformer, device, expect="transformer") if args.var_transformer else mvar_file
    classifier = load_classifier(args.classifier, device).model
    if tokenizer.cfg.image_size != classifier.cfg.image_size:
        raise ValueError(f"the tokenizer makes {tokenizer.cfg.image_size} px images, "
                         f"the classifier reads {classifier.cfg.image_size} px")
    num_classes = mvar_file.model.cfg.num_classes
    if var_file.model.cfg.num_classes != num_classes:
        raise ValueError("--transformer and --var-transformer have different class counts")
    if num_classes != classifier.cfg.num_classes:
        raise ValueError(f"the classifier knows {classifier.cfg.num_classes} classes, "
                         f"the transformer generates {num_classes}")
    samplings = {id(f): sampling_for(args, f.extra, f.model.cfg.vocab_size) for f in (var_file, mvar_file)}
    names = mvar_file.extra.get("class_names") or ImageFolderDataset(args.data, "train", 64).class_names
    if len(names) != num_classes:
        raise ValueError(f"the transformer generates {num_classes} classes, {args.data} holds {len(names)}")

    # real statistics and the real-against-real reference are disjoint class-balanced draws of train
    real_per_class = args.real_per_class or smallest_class(args.data) - args.per_class
    if real_per_class < 2:
        raise ValueError(f"the smallest class has too few training images for {args.per_class} per class "
                         "plus real statistics; lower --per-class")
    real = real_statistics(classifier, args.data, real_per_class, args.data_seed, skip=args.per_class)
    # The tokenizer's ceiling: how faithful its reconstructions are, and whether the judge still knows them.
    val = ImageFolderDataset(args.data, "val", tokenizer.cfg.image_size)
    originals, original_labels = balanced_images(val, max(1, args.psnr_images // num_classes), args.data_seed)
    reconstructions = reconstruct(tokenizer, originals)
    _, recon_logits = classifier_features(classifier, reconstructions)
    tokenizer_report = {
        "path": args.tokenizer, "num_images": len(original_labels),
        "psnr_db": round(psnr(reconstructions, originals), 3),
        "classifier_accuracy_on_reconstructions": round(float((recon_logits.argmax(1) == original_labels)
                                                              .float().mean()), 4),
    }

    modes = {}
    for loaded, mode in ((var_file, AttentionMode.var()), (mvar_file, mvar_mode(args, mvar_file.extra))):
        print(f"generating {args.per_class} x {num_classes} samples in {mode.name} mode ...", file=sys.stderr)
        sampling = samplings[id(loaded)]
        result = evaluate_model(loaded.model, tokenizer, classifier, mode, real, args.per_class, sampling,
                                args.seed, dtype, args.batch_size, names)
        modes[mode.name] = {"transformer": str(loaded.path), "sampling": asdict(sampling), **result}

    # The same metrics for held-out real images that the statistics did not use: the floor to compare with.
    count = args.per_class * num_classes
    ref_images, ref_labels = balanced_images(ImageFolderDataset(args.data, "train", tokenizer.cfg.image_size),
                                             args.per_class, args.data_seed)
    reference = score_images(classifier, ref_images, ref_labels, real, names, unit_range=False)

    return {
        "command": " ".join(["python", "-m", "train.evaluate", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"seed": args.seed,
                     "dtype": args.dtype, "per_class": args.per_class, "batch_size": args.batch_size,
                     "device": str(device), "torch_threads": torch.get_num_threads()},
        "classifier": {"path": args.classifier, "feature_dim": classifier.cfg.feature_dim},
        "class_names": names,
        "num_samples_per_mode": count,
        "real": {"split": "train", "data": args.data, "data_seed": args.data_seed,
                 "num_images": real_per_class * num_classes, "per_class": real_per_class},
        "tokenizer": tokenizer_report,
        "modes": modes,
        "real_reference": reference,
    }


def write_cards(report: dict, args: argparse.Namespace) -> None:
    """Into each model's card, under ``evaluation``: its result per mode it ran in, the real reference
    (real against real at the same count), the tokenizer's ceiling and the settings."""
    files = {"MVAR": args.transformer, "VAR": args.var_transformer or args.transformer}
    for path in dict.fromkeys(files.values()):
        card_path = Path(path).with_suffix(".json")
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        card["evaluation"] = {
            "command": report["command"], "settings": report["settings"],
            "classifier": report["classifier"]["path"], "tokenizer": report["tokenizer"],
            "real_statistics": report["real"],
            "real_reference": {k: report["real_reference"][k] for k in ("accuracy", "frechet_distance")},
            **{mode: {k: report["modes"][mode][k]
                      for k in ("sampling", "accuracy", "per_class_accuracy", "frechet_distance")}
               for mode, file in files.items() if file == path},
        }
        atomic_write_bytes(card_path, (json.dumps(card, indent=2) + "\n").encode())
        print(f"wrote the evaluation into {card_path}")


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        report = run(args, argv)
    except (CheckpointError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(format_table(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    if args.cards:
        write_cards(report, args)
    return report


if __name__ == "__main__":
    main()
