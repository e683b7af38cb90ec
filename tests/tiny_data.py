"""A small ImageNet-layout folder the tests draw for themselves: 12 classes (4 colours x 3 shapes),
64 px, with the same layout and files as the emoji set (``train/``, ``val/``, ``class_names.json``,
``dataset.json``), so no test needs npm, the network or the real artwork."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CLASS_NAMES = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def draw(class_index: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of a class: its shape in its colour, of random size and place, on white."""
    colour = COLOURS[CLASS_NAMES[class_index].split()[0]]
    shape = CLASS_NAMES[class_index].split()[1]
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    side = int(rng.integers(size // 3, size * 3 // 4))
    x, y = (int(v) for v in rng.integers(0, size - side, 2))
    if shape == "circle":
        pen.ellipse((x, y, x + side, y + side), fill=colour)
    elif shape == "square":
        pen.rectangle((x, y, x + side, y + side), fill=colour)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=colour)
    return image


def make_image_folder(root, train_per_class: int = 8, val_per_class: int = 2, size: int = 64, seed: int = 0) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = {}
    for index, name in enumerate(CLASS_NAMES):
        folder = f"{index:02d}-{name.replace(' ', '-')}"
        names[folder] = name
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(index, rng, size).save(root / split / folder / f"{i:03d}.png")
    (root / "class_names.json").write_text(json.dumps(names))
    (root / "dataset.json").write_text(json.dumps({"random_flip": False}))
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """The tests' 12-class folder (8 train and 2 val images per class), drawn once per session."""
    return make_image_folder(tmp_path_factory.mktemp("tiny-data"))
