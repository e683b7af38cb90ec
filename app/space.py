"""Write a folder ready to push as a Hugging Face Space.

    python -m app.space --out DIR --hardware cpu|gpu|zerogpu [--force]

The folder holds the Space's README.md (its YAML metadata: Gradio SDK at the version requirements.txt
pins, the Python version and the suggested hardware), the app's entry ``app.py``, the code (``mvar/`` and
``app/``), the default models of ``assets/`` and the Edit tab's dataset samples
(``assets/dataset_samples.png`` and ``.json``), a ``.gitattributes`` that stores the weights with Git LFS,
and a requirements.txt pinned for that hardware. On the Space the page offers the default models at
once and the official presets for download (see ``app.registry``: SPACE_ID is set there).
"""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("mvar", "app")  # copied as their *.py and *.json files, subfolders included
CODE_SUFFIXES = (".py", ".json")
DEFAULT_MODELS = tuple(f"{name}.{suffix}" for name in ("tokenizer", "mvar", "var")
                       for suffix in ("safetensors", "json"))
DATASET_SAMPLES = ("dataset_samples.png", "dataset_samples.json")  # the Edit tab's "Sample from the dataset"
OFFICIAL_REPOS = ("FoundationVision/var", "CVLUESTC/MVAR")  # where the presets are downloaded from
CPU_WHEELS = "https://download.pytorch.org/whl/cpu"
# ZeroGPU runs a fixed list of torch versions (docs: "Spaces ZeroGPU", supported versions 2.1.0 ... 2.8.0)
# on Python 3.10.13; 2.8.0 is the newest listed and the version the official MVAR code was released with.
ZEROGPU_TORCH = "2.8.0"
ZEROGPU_PYTHON = "3.10.13"
PYTHON = "3.11"  # what this project is developed and tested on


@dataclass(frozen=True)
class Hardware:
    """What a Space of one kind needs: its hardware flavor, Python and the torch lines of requirements.txt."""

    name: str
    flavor: str  # the metadata's suggested_hardware (a Spaces hardware flavor)
    python_version: str
    torch_lines: tuple[str, ...]
    notes: tuple[str, ...]  # comments at the top of requirements.txt: why it differs from ours


def hardware_options(torch_version: str) -> dict[str, Hardware]:
    """The hardware kinds, for our pinned ``torch_version``."""
    return {
        "cpu": Hardware("cpu", "cpu-basic", PYTHON, ("--extra-index-url " + CPU_WHEELS, f"torch=={torch_version}+cpu"),
                        ("CPU Space: torch's CPU wheel (the default Linux wheel carries GBs of CUDA libraries).",)),
        "gpu": Hardware("gpu", "l4x1", PYTHON, (f"torch=={torch_version}",),
                        ("GPU Space: torch's default Linux wheel is the CUDA build.",
                         "NATTEN is not listed: it builds from source against CUDA; without it MVAR's windows "
                         "run on the gather path.")),
        "zerogpu": Hardware("zerogpu", "zero-a10g", ZEROGPU_PYTHON, (f"torch=={ZEROGPU_TORCH}",),
                            (f"ZeroGPU supports torch 2.1.0 ... {ZEROGPU_TORCH} (not our {torch_version}) on Python "
                             f"{ZEROGPU_PYTHON}; this code has not been tested on torch {ZEROGPU_TORCH}.",
                             "`spaces` is preinstalled on ZeroGPU and so not listed.")),
    }


HARDWARE_NAMES = tuple(hardware_options("0"))


class SpaceError(ValueError):
    """A refused request (unknown hardware, an occupied folder, our requirements.txt without a pin)."""


@dataclass(frozen=True)
class Pins:
    """What our requirements.txt pins and the other requirement lines (in order)."""

    torch: str
    gradio: str
    others: tuple[str, ...]


def read_pins(requirements: Path = ROOT / "requirements.txt") -> Pins:
    """torch and gradio pins (``name==version``) and the other lines of ``requirements``; a SpaceError
    names the file and the missing pin."""
    lines = [line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines()]
    pins, others = {}, []
    for line in filter(None, lines):
        match = re.fullmatch(r"(torch|gradio)\s*==\s*([\w.+-]+)", line)
        if match:
            pins[match[1]] = match[2]
        else:
            others.append(line)
    for name in ("torch", "gradio"):
        if name not in pins:
            raise SpaceError(f"{requirements}: expected a line '{name}==VERSION' (the version the Space pins), "
                             "found none")
    return Pins(pins["torch"], pins["gradio"], tuple(others))


def space_requirements(hardware: Hardware, pins: Pins) -> str:
    """requirements.txt of a Space on ``hardware``: our requirements with the torch lines it supports."""
    notes = [f"# written by python -m app.space --hardware {hardware.name} from MVAR Studio's requirements.txt",
             *(f"# {note}" for note in hardware.notes)]
    extra = ["huggingface_hub  # downloads the official models (gradio depends on it too)"]
    return "\n".join([*notes, *hardware.torch_lines, f"gradio=={pins.gradio}", *pins.others, *extra]) + "\n"


def front_matter(readme: Path = ROOT / "README.md") -> dict:
    """The YAML metadata block at the top of ``readme`` ({} without one)."""
    text = readme.read_text() if readme.exists() else ""
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    return (yaml.safe_load(match[1]) or {}) if match else {}


def space_metadata(hardware: Hardware, pins: Pins) -> dict:
    """The Space's README metadata (Spaces configuration reference keys)."""
    ours = front_matter()
    return {
        "title": ours.get("title", "MVAR Studio"),
        "emoji": ours.get("emoji", "🔭"),
        "colorFrom": ours.get("colorFrom", "blue"),
        "colorTo": ours.get("colorTo", "red"),
        "sdk": "gradio",
        "sdk_version": pins.gradio,  # the Gradio the app is tested with
        "python_version": hardware.python_version,
        "app_file": "app.py",
        "suggested_hardware": hardware.flavor,
        "models": list(OFFICIAL_REPOS),
        "pinned": False,
    }


def space_readme(hardware: Hardware, pins: Pins) -> str:
    meta = yaml.safe_dump(space_metadata(hardware, pins), sort_keys=False, allow_unicode=True)
    where = {"cpu": "on the CPU", "gpu": "on the Space's GPU", "zerogpu": "on ZeroGPU (a GPU lent per request)"}
    return (f"---\n{meta}---\n\n# MVAR Studio\n\n"
            "MVAR (Markovian Visual AutoRegressive modeling, arXiv 2505.12742) next to its VAR baseline, "
            f"generated scale by scale {where[hardware.name]}.\n\n"
            "The page offers the default small models at once and the official presets (VAR d16-d30, MVAR d16 "
            f"and the fine-tuned d16/d20/d24, alone or with the VAR baseline of their depth) from {OFFICIAL_REPOS[0]}"
            f" and {OFFICIAL_REPOS[1]}, downloaded on first use into /data/models when the Space has persistent "
            "storage, else into models/ (lost on restart).\n\n"
            f"Written by `python -m app.space --hardware {hardware.name}` from the MVAR Studio repository.\n")


GITATTRIBUTES = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.pth filter=lfs diff=lfs merge=lfs -text\n"


def _check_out(out: Path, force: bool) -> None:
    """Refuse a folder that holds our own code, a file, or a non-empty folder without ``force``."""
    resolved = out.resolve()
    if resolved == ROOT or resolved in ROOT.parents or any(
            resolved.is_relative_to(ROOT / name) for name in (*CODE_FOLDERS, "assets")):
        raise SpaceError(f"--out {out}: refusing to write over this repository's own code; choose a folder "
                         "outside it (or a new subfolder such as space/)")
    if out.exists() and not out.is_dir():
        raise SpaceError(f"--out {out}: is a file; expected a folder (new, empty, or any folder with --force)")
    if out.is_dir() and any(out.iterdir()) and not force:
        count = sum(1 for _ in out.iterdir())
        raise SpaceError(f"--out {out}: the folder is not empty ({count} entries); pass --force to replace its "
                         "contents (a .git folder in it is kept)")


def _clear(out: Path) -> None:
    for item in out.iterdir():
        if item.name == ".git":  # a cloned Space repository stays one
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


def write_space(out, hardware: str, force: bool = False, root: Path = ROOT) -> list[Path]:
    """Write the Space folder ``out`` for ``hardware`` ("cpu", "gpu" or "zerogpu"); returns the files written."""
    pins = read_pins(root / "requirements.txt")
    options = hardware_options(pins.torch)
    if hardware not in options:
        raise SpaceError(f"--hardware {hardware!r}: unknown; expected one of {', '.join(options)}")
    target = options[hardware]
    out = Path(out)
    _check_out(out, force)
    missing = [name for name in DEFAULT_MODELS + DATASET_SAMPLES if not (root / "assets" / name).is_file()]
    if missing:
        raise SpaceError(f"{root / 'assets'}: files the app opens with are missing ({', '.join(missing)}); expected "
                         "the trained default models and the Edit tab's dataset samples")
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    written = []
    for folder in CODE_FOLDERS:
        for source in sorted((root / folder).rglob("*")):
            if source.is_file() and source.suffix in CODE_SUFFIXES and "__pycache__" not in source.parts:
                written.append(_copy(source, out / source.relative_to(root)))
    written.extend(_copy(root / "assets" / name, out / "assets" / name) for name in DEFAULT_MODELS + DATASET_SAMPLES)
    written.append(_copy(root / "app.py", out / "app.py"))
    for name, text in (("README.md", space_readme(target, pins)),
                       ("requirements.txt", space_requirements(target, pins)),
                       (".gitattributes", GITATTRIBUTES)):
        (out / name).write_text(text)
        written.append(out / name)
    return written


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.space", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the folder to write (new or empty; see --force)")
    parser.add_argument("--hardware", required=True, help=f"one of {', '.join(HARDWARE_NAMES)}")
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty folder "
                                                             "(a .git folder is kept)")
    args = parser.parse_args(argv)
    try:
        written = write_space(args.out, args.hardware, args.force)
    except (SpaceError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {len(written)} files to {args.out} (hardware {args.hardware}); push it to a Gradio Space")


if __name__ == "__main__":
    main()
