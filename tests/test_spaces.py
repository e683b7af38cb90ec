"""``python -m app.space``: the Space folder it writes (metadata, requirements per hardware, code, default
models, an entry that imports and serves from the copy) and what it refuses. Nothing here reaches Hugging
Face: a Space build itself is not tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.space import ROOT, SpaceError, main, read_pins, write_space

EXPECTED = {  # hardware: (suggested_hardware, python_version, torch lines)
    "cpu": ("cpu-basic", "3.11", ["--extra-index-url https://download.pytorch.org/whl/cpu", "torch==2.13.0+cpu"]),
    "gpu": ("l4x1", "3.11", ["torch==2.13.0"]),
    "zerogpu": ("zero-a10g", "3.10.13", ["torch==2.8.0"]),
}
DEFAULT_MODELS = [f"{n}.{s}" for n in ("tokenizer", "mvar", "var") for s in ("safetensors", "json")]
DATASET_SAMPLES = ["dataset_samples.png", "dataset_samples.json"]


def metadata(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def requirement_lines(path: Path) -> list[str]:
    return [line.split("  #")[0].strip() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_our_requirements_stay_pinned():
    lines = requirement_lines(ROOT / "requirements.txt")
    assert "torch==2.13.0" in lines and "gradio==6.31.0" in lines
    assert read_pins().torch == "2.13.0" and read_pins().gradio == "6.31.0"


@pytest.mark.parametrize("hardware", sorted(EXPECTED))
def test_the_space_folder_for_each_hardware(hardware, tmp_path):
    out = tmp_path / "space"
    written = write_space(out, hardware)
    assert len(written) == len({p.resolve() for p in written})
    flavor, python, torch_lines = EXPECTED[hardware]
    # metadata: the Spaces configuration keys, Gradio at the version requirements.txt pins
    meta = metadata(out)
    gradio_pin = re.search(r"^gradio==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)[1]
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio_pin
    assert meta["app_file"] == "app.py" and (out / meta["app_file"]).is_file()
    assert meta["python_version"] == python and isinstance(meta["python_version"], str)
    assert meta["suggested_hardware"] == flavor
    from huggingface_hub import SpaceHardware  # the client's list of hardware flavors

    assert flavor in {h.value for h in SpaceHardware}
    assert meta["models"] == ["FoundationVision/var", "CVLUESTC/MVAR"] and meta["title"] == "MVAR Studio"
    # requirements: torch as this hardware supports it, everything else as ours
    lines = requirement_lines(out / "requirements.txt")
    ours = [line for line in requirement_lines(ROOT / "requirements.txt") if not line.startswith("torch")]
    assert lines[:len(torch_lines)] == torch_lines
    assert set(ours) <= set(lines) and "huggingface_hub" in lines
    assert [line for line in lines if line.startswith("torch")] == torch_lines[-1:]
    assert "spaces" not in lines  # ZeroGPU preinstalls it; elsewhere the app runs without it
    # the code (subfolders too), the default models and the Edit tab's samples, byte for byte; nothing else
    for folder in ("mvar", "app"):
        sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*")
                         if p.suffix in (".py", ".json") and "__pycache__" not in p.parts)
        copied = sorted(str(p.relative_to(out)) for p in (out / folder).rglob("*") if p.is_file())
        assert copied == sources
        assert all((out / n).read_bytes() == (ROOT / n).read_bytes() for n in sources)
    assert (out / "app" / "work" / "settings.py").is_file()  # the app's subfolder came along
    shipped = sorted(DEFAULT_MODELS + DATASET_SAMPLES)
    assert sorted(p.name for p in (out / "assets").iterdir()) == shipped
    assert all((out / "assets" / n).read_bytes() == (ROOT / "assets" / n).read_bytes() for n in shipped)
    assert (out / "app.py").read_bytes() == (ROOT / "app.py").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(  # no train/: the app never imports it
        [".gitattributes", "README.md", "app", "app.py", "assets", "mvar", "requirements.txt"])
    assert "*.safetensors filter=lfs" in (out / ".gitattributes").read_text()  # the Hub refuses plain binaries


def test_the_entry_imports_from_the_copy_and_serves_the_default_models_first(tmp_path):
    """In a fresh interpreter in the written folder, as on a Space (SPACE_ID set, no flags): the entry's
    flags parse, the registry is the copy's, the default models load, and the official presets follow."""
    out = tmp_path / "space"
    write_space(out, "cpu")
    script = """
import json, runpy
entry = runpy.run_path("app.py")  # imported, not run as __main__
args = entry["parse_args"]([])
import app.registry
registry = app.registry.ModelRegistry(args.models_dir, allow_download=args.download)
entries = registry.entries()
models = registry.load(entries[0].key)
from app.work.editing import dataset_image
sample = dataset_image("heart 2 (Fluent Flat)", 64)  # the Edit tab's samples, from the copy's assets
print(json.dumps({"registry": app.registry.__file__, "models_dir": str(registry.models_dir),
                  "entries": [[e.key, e.source] for e in entries], "mvar_label": models.mvar_label,
                  "baseline_note": models.baseline_note, "sample": [list(sample.pixels.shape), sample.origin]}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVAR_", "PYTHON", "GRADIO_"))}
    env.update(SPACE_ID="someone/mvar-studio", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=out, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["registry"]).resolve() == (out / "app" / "registry.py").resolve()
    expected_dir = Path("/data/models") if Path("/data").is_dir() and os.access("/data", os.W_OK) else out / "models"
    assert Path(found["models_dir"]) == expected_dir
    assert found["entries"][0] == ["default", "default"]
    assert ["mvar-d16+var-d16", "hub"] in found["entries"] and ["var-d30", "hub"] in found["entries"]
    assert found["mvar_label"].startswith("MVAR: mvar.safetensors, trained with MVAR attention")
    assert found["baseline_note"].endswith("was fine-tuned from it")
    assert found["sample"] == [[64, 64, 3], "dataset sample heart 2 (Fluent Flat): the grey heart emoji, "
                                            "Fluent Emoji Flat, © Microsoft Corporation (MIT)"]


def test_a_non_empty_folder_is_refused_unless_forced(tmp_path):
    out = tmp_path / "space"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "old.txt").write_text("from an earlier version")
    with pytest.raises(SpaceError, match=r"--out .*space: the folder is not empty \(2 entries\); pass --force"):
        write_space(out, "cpu")
    assert (out / "old.txt").exists() and not (out / "README.md").exists()  # untouched
    write_space(out, "gpu", force=True)
    assert not (out / "old.txt").exists() and (out / ".git" / "HEAD").exists()  # a cloned Space stays one
    assert metadata(out)["suggested_hardware"] == "l4x1"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpaceError, match="is a file; expected a folder"):
        write_space(tmp_path / "file", "cpu", force=True)


def test_unknown_hardware_and_our_own_folders_are_refused(tmp_path, capsys):
    with pytest.raises(SpaceError, match=r"--hardware 'tpu': unknown; expected one of cpu, gpu, zerogpu"):
        write_space(tmp_path / "space", "tpu")
    assert not (tmp_path / "space").exists()
    with pytest.raises(SystemExit, match=r"error: --hardware 'ZeroGPU': unknown; expected one of cpu, gpu, zerogpu"):
        main(["--out", str(tmp_path / "space"), "--hardware", "ZeroGPU"])
    for ours in (ROOT, ROOT.parent, ROOT / "mvar", ROOT / "assets" / "space"):
        with pytest.raises(SpaceError, match="refusing to write over this repository's own code"):
            write_space(ours, "cpu", force=True)
    main(["--out", str(tmp_path / "ok"), "--hardware", "zerogpu"])
    assert "wrote" in capsys.readouterr().out and metadata(tmp_path / "ok")["python_version"] == "3.10.13"


def test_requirements_without_a_pin_name_the_file(tmp_path):
    broken = tmp_path / "requirements.txt"
    broken.write_text("torch>=2.0\ngradio==6.31.0\n")
    with pytest.raises(SpaceError, match=r"requirements.txt: expected a line 'torch==VERSION'"):
        read_pins(broken)
