"""A small CNN that recognises the training set's classes: the judge of generated samples.

    python -m train.classifier --data /work/runs/emoji64 --out assets/classifier.safetensors --steps 1500

It maps (B, 3, 64, 64) images in [-1, 1] (as the training data yields them) to logits over the
classes, and ``features`` returns its penultimate vector, the feature space of the Fréchet distance
in ``train/evaluate.py`` (our stand-in for Inception features, which know nothing of these images).

Training draws class-balanced batches of the folder's "train" split, with a small random
translation, blur and brightness/contrast jitter (no flip: the data carries its own mirrored
copies where a class allows them), and measures accuracy on the held-out "val" split: in the
emoji set, drawings the classifier never saw.

The file is a safetensors file whose metadata holds ``kind = "classifier"`` and the
``ClassifierConfig`` (JSON), so ``load_classifier`` needs nothing but the path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from mvar.checkpoints import FORMAT_NAME, FORMAT_VERSION, CheckpointError
from mvar.devices import device_from_flag, resolve_device

from .common import warmup_cosine
from .data import ImageFolderDataset

KIND = "classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """Stage widths (the resolution halves between stages), the feature size and the class count."""

    num_classes: int = 12
    channels: tuple[int, ...] = (16, 32, 64, 128)
    feature_dim: int = 128
    image_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.num_classes < 2 or self.feature_dim < 1 or not self.channels or min(self.channels) < 1:
            raise ValueError("num_classes >= 2, feature_dim >= 1 and positive channels are required")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^(stages - 1)")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ClassifierConfig has no field(s) {sorted(unknown)}")
        return cls(**data)


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """conv stem, then per stage a stride-2 conv and a conv; global average pool; fc -> features; fc -> logits."""

    def __init__(self, cfg: ClassifierConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ClassifierConfig()
        layers = [_conv_bn(3, cfg.channels[0])]
        for c_in, c_out in zip(cfg.channels[:-1], cfg.channels[1:], strict=True):
            layers += [_conv_bn(c_in, c_out, stride=2), _conv_bn(c_out, c_out)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cfg.channels[-1], cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def check_images(self, images: torch.Tensor) -> None:
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, feature_dim) penultimate features (after ReLU)."""
        self.check_images(images)
        pooled = self.body(images).mean(dim=(2, 3))
        return F.relu(self.fc(pooled))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self.features(images))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def save_classifier(path, model: Classifier, extra: dict | None = None, dtype: torch.dtype = torch.float16) -> None:
    """Write weights (floats cast to ``dtype``; fp16 halves the file) with config and ``extra`` in the metadata."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        tensors[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": KIND,
                "config": model.cfg.to_json(), "extra": json.dumps(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file + rename: an interrupted save never leaves a half-written classifier behind.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes the file owner-only; a shipped asset should be readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class LoadedClassifier:
    model: Classifier
    config: ClassifierConfig
    extra: dict
    path: str


def load_classifier(path, device: str | torch.device = "cpu") -> LoadedClassifier:
    """Load a file written by ``save_classifier``, in eval mode and fp32; every problem is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(path, f"not a readable safetensors file (truncated or corrupt?): {err}") from None
    if meta.get("format") != FORMAT_NAME or meta.get("kind") != KIND:
        raise CheckpointError(path, f"not an MVAR Studio classifier file (kind {meta.get('kind')!r})")
    try:
        config = ClassifierConfig.from_dict(json.loads(meta["config"]))
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(path, f"metadata is damaged: {err}") from None
    model = Classifier(config)
    expected = model.state_dict()
    problems = [f"missing {k}" for k in sorted(set(expected) - set(state))]
    problems += [f"unexpected {k}" for k in sorted(set(state) - set(expected))]
    problems += [f"{k}: shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems += [f"{k}: NaN or infinite values" for k, v in state.items()
                 if v.is_floating_point() and not torch.isfinite(v).all()]
    if problems:
        raise CheckpointError(path, "does not match the classifier: " + "; ".join(problems[:8]))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return LoadedClassifier(model.to(device).eval(), config, extra, str(path))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_split(data: str, split: str, image_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A whole split in memory: ((N, 3, S, S) in [-1, 1], (N,) labels, class names)."""
    dataset = ImageFolderDataset(data, split, image_size)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), dataset.class_names


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 4, jitter: float = 0.1) -> torch.Tensor:
    """Random translation by up to ``shift`` px (edge pixels repeat), a random amount of blur and
    brightness/contrast jitter: (B, 3, H, W) in [-1, 1] -> same.

    Why: generated samples are never pixel-aligned like the renders, come through a tokenizer that
    softens edges, and their colours drift a little; the judge must not depend on any of that.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (batch, 2), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets)])
    # Blend with a 3x3 binomial blur by a per-image amount in [0, 1] (0 for half of the images).
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(channels, 1, 3, 3)
    blurred = F.conv2d(F.pad(out, (1,) * 4, mode="replicate"), kernel, groups=channels)
    amount = torch.rand(batch, 1, 1, 1, generator=generator) * (torch.rand(batch, 1, 1, 1, generator=generator) < 0.5)
    out = out + amount * (blurred - out)
    gain = 1 + jitter * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1)
    bias = jitter * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1)
    return (out * gain + bias).clamp(-1, 1)


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N,) predicted class ids, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(part.to(device)).argmax(dim=1).cpu() for part in images.split(batch_size)])


def accuracy_report(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Overall and per-class accuracy of predictions (N,) against labels (N,)."""
    correct = (predicted == labels).float()
    per_class = [float(correct[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    return {"accuracy": float(correct.mean()), "per_class": per_class}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassifierTraining:
    out: str
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.05
    data: str = ""  # ImageNet-layout folder (required)
    seed: int = 0  # model init, batches and augmentation
    eval_every: int = 200  # 0 = only at the end
    num_threads: int = 0  # 0 = torch's default
    min_accuracy: float = 0.8  # exit with an error below this held-out accuracy (the file is still written)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    card: str = ""  # default: --out with a .json suffix


def parse_args(argv=None) -> ClassifierTraining:
    parser = argparse.ArgumentParser(prog="python -m train.classifier", description=__doc__.split("\n")[0])
    for f in fields(ClassifierTraining):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("out", "data"):
            parser.add_argument(flag, required=True, help="output .safetensors file" if f.name == "out"
                                else "ImageNet-layout folder with train/ and val/")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    args = ClassifierTraining(**vars(parser.parse_args(argv)))
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps >= 1 and --batch-size >= 2 are required")
    if args.lr <= 0 or args.warmup < 0 or args.num_threads < 0 or args.eval_every < 0:
        parser.error("--lr must be positive; --warmup, --num-threads and --eval-every non-negative")
    device_from_flag(parser, args.device)
    return args


def balanced_batches(labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless index batches in which every class is equally likely (classes of 120 and 700 images alike)."""
    by_class = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    by_class = [members for members in by_class if len(members)]
    while True:
        classes = torch.randint(0, len(by_class), (batch_size,), generator=generator)
        yield torch.stack([by_class[c][torch.randint(0, len(by_class[c]), (1,), generator=generator)][0]
                           for c in classes.tolist()])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    device = resolve_device(args.device)  # checked by parse_args
    train_images, train_labels, class_names = load_split(args.data, "train")
    val_images, val_labels, _ = load_split(args.data, "val")
    config = ClassifierConfig(num_classes=len(class_names), image_size=train_images.shape[-1])
    model = Classifier(config).to(device)  # initialised on the CPU: the same weights everywhere
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    batches = balanced_batches(train_labels, args.batch_size, generator)

    def evaluate() -> dict:
        report = accuracy_report(predict(model, val_images), val_labels, model.cfg.num_classes)
        model.train()
        return report

    progress = tqdm(range(args.steps), desc="classifier", smoothing=0.1)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, args.steps, args.warmup, args.lr, final_ratio=0.02)
        chosen = next(batches)
        images, labels = train_images[chosen], train_labels[chosen]
        model.train()
        loss = F.cross_entropy(model(augment(images, generator).to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            tqdm.write(f"step {step + 1}: held-out accuracy {evaluate()['accuracy']:.4f}")
    progress.close()

    # Measure the weights as shipped: rounded to fp16 like save_classifier stores them.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    report = evaluate()
    model.eval()
    card = {
        "kind": KIND,
        "command": " ".join(["python", "-m", "train.classifier", *(sys.argv[1:] if argv is None else argv)]),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_images_seen": args.steps * args.batch_size,
        "seed": args.seed,
        "data": Path(args.data).name,
        "train_images": len(train_labels),
        "num_threads": torch.get_num_threads(),
        "device": str(device),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "val_split": "val",
        "val_images": len(val_labels),
        "val_accuracy": round(report["accuracy"], 5),
        "val_accuracy_per_class": dict(zip(class_names,
                                           [round(a, 4) for a in report["per_class"]], strict=True)),
        "parameters": model.num_parameters(),
        "feature_dim": model.cfg.feature_dim,
        "storage_dtype": "float16",
        "config": asdict(model.cfg),
        "torch": torch.__version__,
    }
    save_classifier(args.out, model, extra={"class_names": class_names, "card": card})
    card["file_bytes"] = Path(args.out).stat().st_size
    card_path = Path(args.card or Path(args.out).with_suffix(".json"))
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} ({card['file_bytes'] / 1e6:.2f} MB) and {card_path}: held-out accuracy "
          f"{report['accuracy']:.4f} on {len(val_labels)} val images, {card['wall_seconds']:.0f} s")
    if report["accuracy"] < args.min_accuracy:
        raise SystemExit(f"error: held-out accuracy {report['accuracy']:.4f} is below --min-accuracy "
                         f"{args.min_accuracy}; train longer")


if __name__ == "__main__":
    main()
