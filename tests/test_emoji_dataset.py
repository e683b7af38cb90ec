"""The dataset builder (train/build_emoji_dataset.py) on a fake npm tree: no npm, no network.

The fake tree has the four packages' layouts with small RGBA drawings (the Fluent SVG styles are
left empty: rendering SVG needs cairosvg, a build-time tool), and a fake ``emoji-test.txt`` with
three emoji for every class of the real class table, one of them with skin tones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import build_emoji_dataset as builder
from train.emoji_classes import CLASSES

PACKAGES = ("@lobehub/fluent-emoji-3d", "fluentui-emoji", "emoji-datasource-google", "emoji-datasource-twitter")
TONES = (("1F3FB", "light"), ("1F3FF", "dark"))


def class_emoji(cls) -> list[tuple[str, str]]:
    """Three (subgroup, name) pairs the class table selects."""
    if cls.names:
        return [("any", name) for name in cls.names[:3]]
    if cls.subgroups:
        return [(cls.subgroups[0], f"{cls.name} thing {i}") for i in range(3)]
    group, word = cls.name_contains[0]
    return [(group, f"{word} {i}") for i in range(3)]


def drawing(colour: tuple[int, int, int], size: int) -> Image.Image:
    """A coloured disc on a transparent square: what an emoji file looks like."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    pixels = np.zeros((size, size, 4), np.uint8)
    pixels[disc] = (*colour, 255)
    image.paste(Image.fromarray(pixels), (0, 0))
    return image


def make_tree(root: Path, skip_class: str = "") -> tuple[Path, Path]:
    """(npm dir, emoji-test.txt) of fake packages holding every class's three emoji."""
    npm, modules = root / "npm", root / "npm" / "node_modules"
    for package in PACKAGES:
        (modules / package).mkdir(parents=True, exist_ok=True)
        (modules / package / "package.json").write_text("{}")
    (modules / "@lobehub/fluent-emoji-3d/assets").mkdir()
    for style in ("modern", "flat"):
        (modules / "fluentui-emoji/icons" / style).mkdir(parents=True)
    lines, entries, code = [], [], 0xE000
    for index, cls in enumerate(CLASSES):
        if cls.name == skip_class:
            continue
        for group, name in class_emoji(cls):
            code += 1
            points = f"{code:04X}"
            lines += [f"# subgroup: {group}", f"{points} ; fully-qualified # x E1.0 {name}"]
            variants = {}
            if index == 0:  # skin tones (and a two-tone sequence, which is left out)
                for tone, label in TONES:
                    lines.append(f"{points} {tone} ; fully-qualified # x E1.0 {name}: {label} skin tone")
                    variants[tone] = {"unified": f"{points}-{tone}", "image": f"{points}-{tone}.png".lower(),
                                      "has_img_google": True, "has_img_twitter": True}
                lines.append(f"{points} 1F3FB 200D {points} 1F3FF ; fully-qualified # x E1.0 {name}: "
                             "light skin tone, dark skin tone")
            entries.append({"unified": points, "image": f"{points}.png".lower(), "has_img_google": True,
                            "has_img_twitter": True, "skin_variations": variants})
            colour = (40 + 17 * index, 200 - 13 * index, 90)
            for stem in [points, *(f"{points}-{tone}" for tone in variants)]:
                drawing(colour, 256).save(modules / "@lobehub/fluent-emoji-3d/assets" / f"{stem.lower()}.webp")
                for package, folder in (("emoji-datasource-google", "google"),
                                        ("emoji-datasource-twitter", "twitter")):
                    target = modules / package / "img" / folder / "64"
                    target.mkdir(parents=True, exist_ok=True)
                    drawing(colour, 64).save(target / f"{stem.lower()}.png")
    for package in ("emoji-datasource-google", "emoji-datasource-twitter"):
        (modules / package / "emoji.json").write_text(json.dumps(entries))
    emoji_test = root / "emoji-test.txt"
    emoji_test.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return npm, emoji_test


def build(root: Path, npm: Path, emoji_test: Path, *extra: str) -> Path:
    out = root / "data"
    builder.main(["--out", str(out), "--npm-dir", str(npm), "--emoji-test", str(emoji_test), "--size", "32",
                  "--max-per-class", "0", *extra])
    return out


def test_builds_an_imagenet_layout_folder_with_a_manifest_and_credits(tmp_path):
    npm, emoji_test = make_tree(tmp_path)
    out = build(tmp_path, npm, emoji_test, "--app-samples", str(tmp_path / "samples.png"),
                "--app-samples-per-class", "1")
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["style"] for r in rows} == {"fluent-3d", "noto", "twemoji"}  # no SVG in the fake tree
    for row in rows:
        assert (out / row["file"]).exists()
        source = builder.SOURCES[row["style"]]
        assert row["licence"] == source.licence and row["package"] == f"{source.package}@{source.version}"
    assert json.loads((out / "dataset.json").read_text())["random_flip"] is False
    names = json.loads((out / "class_names.json").read_text())
    assert list(names.values()) == [c.name for c in CLASSES]
    assert "Twemoji graphics by Twitter, Inc. and other contributors" in (out / "CREDITS.md").read_text()
    # every class: one held-out emoji (in every style) and two in train; mirrored copies only where allowed
    for index, cls in enumerate(CLASSES):
        mine = [r for r in rows if r["label"] == index]
        assert len({r["emoji"].split(":")[0] for r in mine if r["split"] == "val"}) == 1
        assert not any(r["flipped"] for r in mine if r["split"] == "val")
        assert any(r["flipped"] for r in mine) == cls.flip
    # skin tones: the single-tone variants are taken, the two-tone sequence is not
    tones = {r["emoji"] for r in rows if r["label"] == 0}
    assert any(t.endswith("dark skin tone") for t in tones) and not any("," in t for t in tones)
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (32, 32 * len(CLASSES))
    assert len(json.loads((tmp_path / "samples.json").read_text())["cells"]) == len(CLASSES)


def test_drawings_are_fitted_to_the_frame_on_the_background(tmp_path):
    npm, emoji_test = make_tree(tmp_path)
    out = build(tmp_path, npm, emoji_test, "--margin", "2", "--background", "255,255,255")
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    pixels = np.asarray(Image.open(out / row["file"]))
    assert pixels.shape == (32, 32, 3)
    assert (pixels[0, 0] == 255).all()  # transparent corners became the background, not black
    assert (pixels[16, 2:30] != 255).any(axis=-1).all()  # the disc was cropped and fills the frame less margin


def test_a_rerun_writes_nothing_new_and_removes_what_the_table_no_longer_holds(tmp_path, capsys):
    npm, emoji_test = make_tree(tmp_path)
    out = build(tmp_path, npm, emoji_test)
    count = len(list(out.glob("*/*/*.png")))
    capsys.readouterr()
    build(tmp_path, npm, emoji_test)
    assert "(0 new, 0 stale removed)" in capsys.readouterr().out
    stale = next(out.glob("train/00-*")) / "left-by-an-older-table.png"
    Image.new("RGB", (32, 32)).save(stale)
    build(tmp_path, npm, emoji_test)
    assert "(0 new, 1 stale removed)" in capsys.readouterr().out
    assert not stale.exists() and len(list(out.glob("*/*/*.png"))) == count


def test_a_class_that_matches_no_emoji_is_refused_by_name(tmp_path):
    npm, emoji_test = make_tree(tmp_path, skip_class="fruit")
    with pytest.raises(SystemExit, match="'fruit' matches no emoji"):
        build(tmp_path, npm, emoji_test)


def test_missing_packages_or_npm_are_refused_by_name(tmp_path, monkeypatch):
    npm, emoji_test = make_tree(tmp_path)
    (npm / "node_modules/emoji-datasource-twitter/package.json").unlink()
    with pytest.raises(SystemExit, match=r"lacks emoji-datasource-twitter@16\.0\.0.*--install"):
        build(tmp_path, npm, emoji_test)
    monkeypatch.setattr(builder.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="--install needs npm"):
        build(tmp_path, npm, emoji_test, "--install")
    with pytest.raises(SystemExit, match="unicode-data"):
        build(tmp_path, npm, tmp_path / "missing.txt")
