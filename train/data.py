"""Training data: the embedded dataset or ImageNet-layout folders, and the token cache.

``--data embedded`` draws the project's own dataset (``embedded_data.py``); any other value is
a folder in ImageNet layout, ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*``, whose
class names come from the folder names or from ``root/class_names.json`` (a list, or a mapping
from folder name to readable name).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import embedded_data

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
        self.image_size, self.flip, self.seed = image_size, flip, seed
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
        return embedded_data.to_tensor(np.ascontiguousarray(array)), label


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_class_names(root: Path, folders: list[str]) -> list[str]:
    mapping_file = root / "class_names.json"
    if not mapping_file.exists():
        return list(folders)
    mapping = json.loads(mapping_file.read_text())
    if isinstance(mapping, list):
        return [str(x) for x in mapping]
    return [str(mapping.get(folder, folder)) for folder in folders]


def build_dataset(data: str, split: str, image_size: int, size: int, seed: int, flip: bool):
    """(dataset, class names) for ``--data embedded`` or an ImageNet-layout folder."""
    if data == "embedded":
        if image_size != embedded_data.IMAGE_SIZE:
            raise SystemExit(f"error: the embedded dataset is {embedded_data.IMAGE_SIZE} px, "
                             f"the tokenizer expects {image_size} px")
        dataset = embedded_data.EmbeddedDataset(split=split, size=size, seed=seed, flip=flip)
        return dataset, list(embedded_data.CLASS_NAMES)
    dataset = ImageFolderDataset(data, split, image_size, flip=flip, seed=seed)
    return dataset, dataset.class_names


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@torch.no_grad()
def token_cache(tokenizer, tokenizer_path, dataset, cache_dir, split: str, batch_size: int = 128,
                log=print, is_main: bool = True, wait_seconds: float = 24 * 3600) -> tuple[torch.Tensor, torch.Tensor]:
    """All tokens of a dataset as one (N, L) int16 tensor plus labels (N,), cached on disk.

    The cache file is named by the tokenizer file's digest, so a changed tokenizer never reuses
    stale tokens. Only the main rank encodes; the others wait for the file (a file wait rather
    than a collective, whose timeout is meant for dead ranks, not for a long encoding pass).
    """
    digest = file_digest(tokenizer_path)
    path = Path(cache_dir) / f"tokens-{split}-{len(dataset)}-{digest}.pt"
    if not is_main:
        deadline = time.monotonic() + wait_seconds
        while not path.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"error: gave up waiting for the token cache {path} from rank 0")
            time.sleep(2)
    if path.exists():
        cached = torch.load(path, weights_only=True)
        return cached["tokens"].long(), cached["labels"]
    log(f"encoding {len(dataset)} {split} images into {path.name} ...")
    tokens, labels = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        images = torch.stack([image for image, _ in items])
        tokens.append(torch.cat(tokenizer.encode(images), dim=1).to(torch.int16))
        labels.extend(label for _, label in items)
    result = {"tokens": torch.cat(tokens), "labels": torch.tensor(labels)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    tmp.replace(path)
    return result["tokens"].long(), result["labels"]
