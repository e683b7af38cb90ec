"""Training data: ImageNet-layout folders, and the token cache.

``--data DIR`` is a folder in ImageNet layout, ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*``
(the default models' emoji set is one: ``python -m train.build_emoji_dataset``). Class names come
from the folder names or from ``DIR/class_names.json`` (a list, or a mapping from folder name to
readable name). A folder whose ``DIR/dataset.json`` says ``"random_flip": false`` carries its own
mirrored copies where its classes allow them (a mirrored clock is no clock), so the loader adds none.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}


class ImageFolderDataset(torch.utils.data.Dataset):
    """Resize the short side, centre crop, optional horizontal flip (fixed per index, for exact resume)."""

    def __init__(self, root, split: str, image_size: int, flip: bool = False, seed: int = 0):
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise SystemExit(f"error: no folder {self.root} (expected ImageNet layout root/{split}/<class>/...)")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise SystemExit(f"error: {self.root} has no class folders")
        self.items = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        self.image_size, self.seed = image_size, seed
        self.flip = flip and read_dataset_info(Path(root)).get("random_flip", True)
        self.class_names = read_class_names(Path(root), self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with Image.open(path) as image:
            image = center_crop_resize(image.convert("RGB"), self.image_size)
        array = np.asarray(image)
        if self.flip and (hash((self.seed, index)) & 1):
            array = array[:, ::-1]
        return to_tensor(array), label


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1] (the range the tokenizer trains on)."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_dataset_info(root: Path) -> dict:
    info = root / "dataset.json"
    return json.loads(info.read_text()) if info.exists() else {}


def read_class_names(root: Path, folders: list[str]) -> list[str]:
    mapping_file = root / "class_names.json"
    if not mapping_file.exists():
        return list(folders)
    mapping = json.loads(mapping_file.read_text())
    if isinstance(mapping, list):
        return [str(x) for x in mapping]
    return [str(mapping.get(folder, folder)) for folder in folders]


def build_dataset(data: str, split: str, image_size: int, flip: bool = False, seed: int = 0):
    """(dataset, class names) of an ImageNet-layout folder's split."""
    if not data:
        raise SystemExit("error: --data DIR is required: an ImageNet-layout folder (the default models' emoji set "
                         "is built by python -m train.build_emoji_dataset)")
    dataset = ImageFolderDataset(data, split, image_size, flip=flip, seed=seed)
    return dataset, dataset.class_names


def balanced_images(dataset: ImageFolderDataset, per_class: int, seed: int = 0,
                    skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of every class (fewer where a class has fewer), drawn in a fixed shuffled
    order after skipping the first ``skip`` of each class: ((N, 3, H, W) in [-1, 1], (N,) labels).

    Two calls with skips that do not overlap give disjoint draws (a real-against-real baseline).
    """
    generator = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(dataset.items):
        by_class.setdefault(label, []).append(index)
    chosen = []
    for label in sorted(by_class):
        order = generator.permutation(by_class[label])
        chosen.extend(order[skip:skip + per_class].tolist())
    if not chosen:
        raise ValueError(f"no images left after skipping {skip} per class")
    items = [dataset[i] for i in chosen]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@torch.no_grad()
def token_cache(tokenizer, tokenizer_path, dataset, cache_dir, split: str, batch_size: int = 128,
                log=print, is_main: bool = True, stall_seconds: float = 600.0,
                wait_seconds: float = 24 * 3600, poll_seconds: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """All tokens of a dataset as one (N, L) int16 tensor plus labels (N,), cached on disk.

    The cache file is named by the tokenizer file's digest, so a changed tokenizer never reuses
    stale tokens. Only the main rank encodes; the others wait for the file (a file wait rather
    than a collective, whose timeout is meant for dead ranks, not for a long encoding pass).

    While it encodes, the main rank rewrites a heartbeat file next to the cache after every
    batch. A waiting rank gives up with an error when the heartbeat has not changed for
    ``stall_seconds`` (rank 0 died or hung; the training scripts pass ``--dist-timeout``), or
    after ``wait_seconds`` in all. Staleness is judged by the heartbeat's content, seen through
    the waiter's own clock, so clocks of other machines do not matter.
    """
    digest = file_digest(tokenizer_path)
    path = Path(cache_dir) / f"tokens-{split}-{len(dataset)}-{digest}.pt"
    heartbeat = path.with_name(path.name + ".heartbeat")
    if not is_main:
        wait_for_cache(path, heartbeat, stall_seconds, wait_seconds, poll_seconds)
    if path.exists():
        cached = torch.load(path, weights_only=True)
        return cached["tokens"].long(), cached["labels"]
    path.parent.mkdir(parents=True, exist_ok=True)
    beat = _Heartbeat(heartbeat)
    beat(0)
    log(f"encoding {len(dataset)} {split} images into {path.name} ...")
    tokens, labels = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            images = torch.stack([image for image, _ in items])
            # the images come from the CPU loader; the tokenizer may sit on a GPU
            device = next(tokenizer.parameters()).device if isinstance(tokenizer, torch.nn.Module) else "cpu"
            tokens.append(torch.cat(tokenizer.encode(images.to(device)), dim=1).to(torch.int16).cpu())
            labels.extend(label for _, label in items)
            beat(len(labels))
        result = {"tokens": torch.cat(tokens), "labels": torch.tensor(labels)}
        tmp = path.with_suffix(".tmp")
        torch.save(result, tmp)
        tmp.replace(path)
    finally:
        heartbeat.unlink(missing_ok=True)
    return result["tokens"].long(), result["labels"]


class _Heartbeat:
    """Rewrites a small file with a new counter each call (atomic replace: readers never see half a line)."""

    def __init__(self, path: Path):
        self.path, self.count = path, 0
        self.tag = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"

    def __call__(self, encoded: int) -> None:
        self.count += 1
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(f"{self.tag} beat {self.count} encoded {encoded}\n")
        tmp.replace(self.path)


def wait_for_cache(path: Path, heartbeat: Path, stall_seconds: float, wait_seconds: float,
                   poll_seconds: float = 1.0) -> None:
    """Wait for rank 0 to write ``path``; raise SystemExit if its heartbeat stalls or time runs out."""
    started = last_change = time.monotonic()
    last_seen = None
    while not path.exists():
        now = time.monotonic()
        try:
            seen = heartbeat.read_text()
        except OSError:
            seen = None
        if seen != last_seen:
            last_seen, last_change = seen, now
        if now - last_change > stall_seconds:
            state = (f"its progress file {heartbeat.name} last changed {now - last_change:.0f} s ago ({seen.strip()})"
                     if seen else f"it has not started encoding ({heartbeat.name} never appeared; on several "
                                  "machines the cache folder must be shared, --cache-dir)")
            raise SystemExit(f"error: gave up waiting for rank 0 to write the token cache {path}: {state}; "
                             f"rank 0 has probably died or hung (limit {stall_seconds:g} s, --dist-timeout)")
        if now - started > wait_seconds:
            raise SystemExit(f"error: gave up waiting for the token cache {path} from rank 0 after {wait_seconds:g} s")
        time.sleep(poll_seconds)
