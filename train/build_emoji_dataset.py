"""Build the default models' training set from licensed emoji artwork (build time only: npm).

    python -m train.build_emoji_dataset --out /work/runs/emoji64 --npm-dir /work/runs/npm --install \
        --app-samples assets/dataset_samples.png

Reads the artwork of four npm packages (installed into ``--npm-dir`` with ``--install``), picks
the emoji of each class in ``train/emoji_classes.py``, composites every style and single skin
tone on one background colour, fits the drawing into the frame, and writes an ImageNet-layout
folder that ``--data DIR`` of the training scripts reads:

    OUT/train/<NN-class>/<style>-<codepoints>[-flip].png, OUT/val/..., OUT/class_names.json,
    OUT/manifest.jsonl (one line per image: source package, style, licence), OUT/CREDITS.md,
    OUT/dataset.json (how it was built; ``random_flip: false``: the loaders add no mirrored copies)

Held-out images are whole emoji (every style and tone of an emoji sits in one split), so the
validation set holds drawings the models never saw. Names come from Unicode's
``emoji-test.txt`` (Debian's ``unicode-data``). Resumable: images already written are kept, and
images that the class table no longer holds are removed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from mvar.files import atomic_write_bytes

from .emoji_classes import CLASSES, EmojiClass

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")


@dataclass(frozen=True)
class Source:
    style: str
    package: str
    version: str
    licence: str
    credit: str


SOURCES = {
    "fluent-3d": Source("fluent-3d", "@lobehub/fluent-emoji-3d", "1.1.0", "MIT",
                        "Fluent Emoji 3D, © Microsoft Corporation (MIT), packaged by LobeHub"),
    "fluent-color": Source("fluent-color", "fluentui-emoji", "1.3.0", "MIT",
                           "Fluent Emoji Color, © Microsoft Corporation (MIT)"),
    "fluent-flat": Source("fluent-flat", "fluentui-emoji", "1.3.0", "MIT",
                          "Fluent Emoji Flat, © Microsoft Corporation (MIT)"),
    "noto": Source("noto", "emoji-datasource-google", "16.0.0", "Apache-2.0",
                   "Noto Emoji, © Google LLC (Apache License 2.0)"),
    "twemoji": Source("twemoji", "emoji-datasource-twitter", "16.0.0", "CC-BY-4.0",
                      "Twemoji graphics by Twitter, Inc. and other contributors (CC BY 4.0)"),
}
PACKAGES = sorted({f"{s.package}@{s.version}" for s in SOURCES.values()})
TONES = {"light": "light", "medium-light": "medium-light", "medium": "medium", "medium-dark": "medium-dark",
         "dark": "dark"}


@dataclass(frozen=True)
class Emoji:
    codepoints: str  # upper-case hex joined by '-', as in emoji-test.txt
    name: str  # CLDR short name with its tone, e.g. "thumbs up: dark skin tone"
    base: str  # the name without a skin tone
    tone: str  # "" or one of TONES
    subgroup: str


def read_emoji_test(path: Path) -> list[Emoji]:
    """The fully-qualified emoji of ``emoji-test.txt`` with subgroup and tone; multi-tone ones left out."""
    emoji, subgroup = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        if line.startswith("#") or "; fully-qualified" not in line:
            continue
        codes, rest = line.split(";", 1)
        name = rest.split("#", 1)[1].strip().split(" ", 2)[2]  # "👍🏻 E1.0 thumbs up: light skin tone"
        base, tone = name, ""
        if name.endswith("skin tone"):
            base, tones = name.rsplit(": ", 1)
            if "," in tones:
                continue
            tone = tones.removesuffix(" skin tone")
        emoji.append(Emoji("-".join(codes.split()), name, base, tone, subgroup))
    return emoji


def members(cls: EmojiClass, emoji: list[Emoji]) -> list[Emoji]:
    """The emoji of one class (with every single-tone variant of a chosen emoji)."""
    def chosen(e: Emoji) -> bool:
        return (e.subgroup in cls.subgroups or e.base in cls.names
                or any(e.subgroup == group and word in e.base for group, word in cls.name_contains))
    return [e for e in emoji if chosen(e) and e.base not in cls.exclude]


def fluent_slug(base: str) -> str:
    keep = "".join(ch for ch in base.lower() if ch.isalnum() or ch in " -")
    return "-".join(keep.split())


def strip_fe0f(codepoints: str) -> str:
    return "-".join(c for c in codepoints.upper().split("-") if c != "FE0F")


class Artwork:
    """Finds the file of one emoji in one style under ``npm_dir/node_modules``."""

    def __init__(self, npm_dir: Path):
        modules = npm_dir / "node_modules"
        missing = [p for p in PACKAGES if not (modules / p.rsplit("@", 1)[0] / "package.json").exists()]
        if missing:
            raise SystemExit(f"error: {modules} lacks {', '.join(missing)}; run with --install (needs npm) "
                             f"or `npm install --prefix {npm_dir} {' '.join(PACKAGES)}`")
        self.fluent_3d = {strip_fe0f(p.stem): p for p in (modules / "@lobehub/fluent-emoji-3d/assets").glob("*.webp")}
        self.fluent = {style: modules / "fluentui-emoji/icons" / folder
                       for style, folder in (("fluent-color", "modern"), ("fluent-flat", "flat"))}
        self.datasource = {}
        for style, package, folder in (("noto", "emoji-datasource-google", "google"),
                                       ("twemoji", "emoji-datasource-twitter", "twitter")):
            root = modules / package
            images = {}
            for entry in json.loads((root / "emoji.json").read_text()):
                for variant in [entry, *entry.get("skin_variations", {}).values()]:
                    if variant.get(f"has_img_{folder}"):
                        images[strip_fe0f(variant["unified"])] = root / "img" / folder / "64" / variant["image"]
            self.datasource[style] = images

    def find(self, emoji: Emoji, style: str) -> Path | None:
        key = strip_fe0f(emoji.codepoints)
        if style == "fluent-3d":
            path = self.fluent_3d.get(key)
        elif style in self.fluent:
            slug = fluent_slug(emoji.base)
            names = [f"{slug}-{TONES[emoji.tone]}.svg"] if emoji.tone else [f"{slug}-default.svg", f"{slug}.svg"]
            path = next((self.fluent[style] / n for n in names if (self.fluent[style] / n).exists()), None)
        else:
            path = self.datasource[style].get(key)
        return path if path is not None and path.exists() else None


def load_rgba(path: Path, size: int) -> Image.Image:
    if path.suffix == ".svg":
        import cairosvg  # build-time only

        png = cairosvg.svg2png(url=str(path), output_width=size * 4, output_height=size * 4)
        return Image.open(io.BytesIO(png)).convert("RGBA")
    with Image.open(path) as image:
        return image.convert("RGBA")


def render(path: Path, size: int, margin: int, background: tuple[int, int, int], flip: bool) -> Image.Image:
    """The drawing cropped to its opaque pixels, fitted into the frame less ``margin``, on the background."""
    image = load_rgba(path, size)
    box = image.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is not None:
        image = image.crop(box)
    inner = size - 2 * margin
    scale = inner / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (*background, 255))
    canvas.alpha_composite(image, ((size - image.width) // 2, (size - image.height) // 2))
    out = canvas.convert("RGB")
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def held_out(bases: list[str], fraction: float) -> set[str]:
    """A fixed share of a class's emoji (at least one), chosen by a hash of the name: stable across runs."""
    ranked = sorted(set(bases), key=lambda b: hashlib.sha256(b.encode()).hexdigest())
    return set(ranked[:max(1, round(len(ranked) * fraction))])


def plan(artwork: Artwork, emoji: list[Emoji], val_fraction: float, max_per_class: int, seed: int) -> list[dict]:
    """Every image to write, as manifest rows (class, split, style, source file, flip)."""
    rows = []
    for index, cls in enumerate(CLASSES):
        chosen = members(cls, emoji)
        if not chosen:
            raise SystemExit(f"error: class {cls.name!r} matches no emoji in emoji-test.txt")
        val_bases = held_out([e.base for e in chosen], val_fraction)
        class_rows = []
        for e in chosen:
            for style, source in SOURCES.items():
                path = artwork.find(e, style)
                if path is None:
                    continue
                split = "val" if e.base in val_bases else "train"
                for flipped in (False, True) if (cls.flip and split == "train") else (False,):
                    stem = f"{style}-{e.codepoints.lower()}{'-flip' if flipped else ''}"
                    class_rows.append({
                        "file": f"{split}/{index:02d}-{cls.name.replace(' ', '-')}/{stem}.png", "class": cls.name,
                        "label": index, "split": split, "emoji": e.name, "codepoints": e.codepoints,
                        "style": style, "package": f"{source.package}@{source.version}",
                        "licence": source.licence, "credit": source.credit, "flipped": flipped,
                        "source": str(path),
                    })
        train = [r for r in class_rows if r["split"] == "train"]
        if max_per_class and len(train) > max_per_class:  # balance: a class of 3,000 tones would drown the rest
            keep = set(map(id, random.Random(f"{seed}:{cls.name}").sample(train, max_per_class)))
            class_rows = [r for r in class_rows if r["split"] == "val" or id(r) in keep]
        rows.extend(class_rows)
    return rows


def write_credits(out: Path) -> None:
    lines = ["# Credits of the artwork in this dataset", ""]
    lines += [f"- {s.style}: {s.credit}; npm package `{s.package}` {s.version}" for s in SOURCES.values()]
    atomic_write_bytes(out / "CREDITS.md", ("\n".join(lines) + "\n").encode())


def write_app_samples(out: Path, rows: list[dict], per_class: int, target: Path) -> None:
    """A few held-out images per class as one PNG grid (a row per class) plus a JSON of their
    class and credit: all the app needs of the data (the Edit tab's "Sample from the dataset")."""
    chosen = []
    for index, cls in enumerate(CLASSES):
        held = [r for r in rows if r["label"] == index and r["split"] == "val"]
        by_emoji = {}
        for r in held:  # different emoji first, each in another style, so the samples show the range of looks
            by_emoji.setdefault(r["emoji"].split(":")[0], []).append(r)
        styles = list(SOURCES)
        picks = []
        for turn, group in enumerate(by_emoji.values()):
            wanted = styles[(turn + index) % len(styles)]
            picks.append(next((r for r in group if r["style"] == wanted), group[0]))
        picks = picks[:per_class] + [r for r in held if r not in picks][:max(0, per_class - len(picks))]
        if len(picks) < per_class:
            raise SystemExit(f"error: class {cls.name!r} has only {len(picks)} held-out images")
        chosen.append(picks)
    side = Image.open(out / chosen[0][0]["file"]).width
    grid = Image.new("RGB", (side * per_class, side * len(chosen)), "white")
    cells = []
    for row, picks in enumerate(chosen):
        for column, r in enumerate(picks):
            grid.paste(Image.open(out / r["file"]), (column * side, row * side))
            cells.append({k: r[k] for k in ("class", "emoji", "style", "package", "licence", "credit")})
    buffer = io.BytesIO()
    grid.save(buffer, "PNG", optimize=True)
    atomic_write_bytes(target, buffer.getvalue())
    info = {"cell_size": side, "per_class": per_class, "cells": cells,
            "credits": {s.style: s.credit for s in SOURCES.values()}}
    atomic_write_bytes(target.with_suffix(".json"), (json.dumps(info, indent=1, ensure_ascii=False) + "\n").encode())


def ensure_packages(npm_dir: Path, install: bool) -> None:
    if all((npm_dir / "node_modules" / p.rsplit("@", 1)[0] / "package.json").exists() for p in PACKAGES) or not install:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("error: --install needs npm (Node.js), which is not on PATH")
    npm_dir.mkdir(parents=True, exist_ok=True)
    print(f"npm install into {npm_dir} (about 176 MB) ...", flush=True)
    subprocess.run([npm, "install", "--prefix", str(npm_dir), "--no-audit", "--no-fund", *PACKAGES], check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.build_emoji_dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the dataset folder (outside git)")
    parser.add_argument("--npm-dir", default="", help="folder holding node_modules (default: OUT/../npm)")
    parser.add_argument("--install", action="store_true", help="npm install the packages when missing")
    parser.add_argument("--emoji-test", default=str(EMOJI_TEST), help="Unicode's emoji-test.txt")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--margin", type=int, default=3, help="pixels between the drawing and the frame")
    parser.add_argument("--background", default="255,255,255", help="R,G,B of the background")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of each class's emoji held out")
    parser.add_argument("--max-per-class", type=int, default=700, help="training images per class at most (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--app-samples", default="", help="also write this PNG grid (+ .json) of held-out "
                        "images for the app, e.g. assets/dataset_samples.png")
    parser.add_argument("--app-samples-per-class", type=int, default=3)
    args = parser.parse_args(argv)
    out = Path(args.out)
    npm_dir = Path(args.npm_dir) if args.npm_dir else out.parent / "npm"
    emoji_test = Path(args.emoji_test)
    if not emoji_test.exists():
        raise SystemExit(f"error: no {emoji_test}; install Debian's unicode-data or pass --emoji-test")
    background = tuple(int(v) for v in args.background.split(","))
    ensure_packages(npm_dir, args.install)
    rows = plan(Artwork(npm_dir), read_emoji_test(emoji_test), args.val_fraction, args.max_per_class, args.seed)
    written = 0
    for row in rows:
        target = out / row["file"]
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        render(Path(row["source"]), args.size, args.margin, background, row["flipped"]).save(buffer, "PNG")
        atomic_write_bytes(target, buffer.getvalue())
        written += 1
    stale = [p for split in ("train", "val") for p in (out / split).glob("*/*.png")
             if str(p.relative_to(out)) not in {r["file"] for r in rows}]
    for path in stale:  # left by an earlier class table: the loaders read every file of a class folder
        path.unlink()
    names = {f"{i:02d}-{c.name.replace(' ', '-')}": c.name for i, c in enumerate(CLASSES)}
    atomic_write_bytes(out / "class_names.json", json.dumps(names, indent=1).encode())
    manifest = "".join(json.dumps({k: v for k, v in r.items() if k != "source"}) + "\n" for r in rows)
    atomic_write_bytes(out / "manifest.jsonl", manifest.encode())
    atomic_write_bytes(out / "dataset.json", json.dumps({"random_flip": False, "args": vars(args), "images": len(rows),
                                                       "sources": [asdict(s) for s in SOURCES.values()]},
                                                      indent=1).encode())
    write_credits(out)
    if args.app_samples:
        write_app_samples(out, rows, args.app_samples_per_class, Path(args.app_samples))
    print(f"{len(rows)} images ({written} new, {len(stale)} stale removed) in {out}", flush=True)
    for index, cls in enumerate(CLASSES):
        counts = {s: sum(1 for r in rows if r["label"] == index and r["split"] == s) for s in ("train", "val")}
        print(f"  {cls.name:12s} train {counts['train']:5d}  val {counts['val']:4d}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
