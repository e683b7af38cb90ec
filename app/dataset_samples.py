"""The Edit tab's dataset samples: held-out images of the default models' classes, shipped as one asset.

``assets/dataset_samples.png`` is a grid with one row per class and ``per_class`` cells of ``cell_size``
pixels; ``assets/dataset_samples.json`` lists each cell (row-major): its class, the emoji's name, its
artwork style, package, licence and the credit its licence asks for. Each sample has a readable name
("heart 2 (Fluent Flat)") and a credit line the page shows next to the image (Twemoji's CC BY licence
requires "Twemoji graphics by Twitter, Inc. and other contributors" beside its images).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parent.parent / "assets"
GRID, INDEX = "dataset_samples.png", "dataset_samples.json"
STYLE_NAMES = {"fluent-3d": "Fluent 3D", "fluent-color": "Fluent Color", "fluent-flat": "Fluent Flat",
               "noto": "Noto", "twemoji": "Twemoji"}


@dataclass(frozen=True)
class DatasetSample:
    """One cell of the grid and what it shows."""

    name: str  # "heart 2 (Fluent Flat)": the class, its number within the class, the style
    class_name: str
    emoji: str  # the emoji's own name ("grey heart")
    style: str
    licence: str
    credit: str
    row: int
    column: int

    def describe(self) -> str:
        """The origin line the page shows: what the image is and whose artwork it is."""
        return f"dataset sample {self.name}: the {self.emoji} emoji, {self.credit}"


@dataclass(frozen=True)
class DatasetSamples:
    """The samples of one grid (by default the shipped asset)."""

    folder: Path = ASSETS

    @functools.cached_property
    def _index(self) -> dict:
        return json.loads((self.folder / INDEX).read_text())

    @functools.cached_property
    def samples(self) -> tuple[DatasetSample, ...]:
        per_class, cells = self._index["per_class"], self._index["cells"]
        out = []
        for i, cell in enumerate(cells):
            row, column = divmod(i, per_class)
            style = STYLE_NAMES.get(cell["style"], cell["style"])
            out.append(DatasetSample(f"{cell['class']} {column + 1} ({style})", cell["class"], cell["emoji"],
                                     cell["style"], cell["licence"], cell["credit"], row, column))
        return tuple(out)

    def names(self) -> list[str]:
        """Every sample's readable name, in the grid's order (class by class)."""
        return [sample.name for sample in self.samples]

    def sample(self, name: str) -> DatasetSample:
        for sample in self.samples:
            if sample.name == name:
                return sample
        raise KeyError(name)

    def image(self, sample: DatasetSample) -> np.ndarray:
        """The sample's pixels: (cell_size, cell_size, 3) uint8 RGB."""
        size = self._index["cell_size"]
        with Image.open(self.folder / GRID) as grid:
            box = (sample.column * size, sample.row * size, (sample.column + 1) * size, (sample.row + 1) * size)
            return np.asarray(grid.convert("RGB").crop(box)).copy()

    def interleaved(self) -> list[str]:
        """The names one class after another (the first of every class, then the second, ...): what the
        "next sample" button steps through, so consecutive samples show different classes."""
        return [s.name for s in sorted(self.samples, key=lambda s: (s.column, s.row))]


SHIPPED = DatasetSamples()
