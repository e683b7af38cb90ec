"""Official models downloaded on demand: the app's registry offers the hub presets, selecting one
downloads its files once (with progress) and loads exactly what was downloaded; a failed download
is a readable error naming the preset and leaves no partial file behind.

A fake ``huggingface_hub`` module (no network) serves an official-size VAE with random weights
(109 M parameters, the real file's layout, checked against tests/data/official_layout.json) and,
under the name of mvar-d16.pth, a depth-2 transformer in the official layout (a real d16 would
add 1.3 GB and a minute on this machine without testing anything more). Files live in /dev/shm
when it is writable.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

from app.registry import IMAGENET_CLASSES, ModelRegistry
from mvar.checkpoints import CheckpointError, download_official, official_transformer_state_dict
from mvar.config import OFFICIAL_TOKENIZER, official_transformer
from mvar.tokenizer import MultiScaleVQVAE
from mvar.transformer import ScaleTransformer

VAE_FILE, MVAR_FILE = "vae_ch160v4096z32.pth", "mvar-d16.pth"
CHUNK = 16 * 2**20


@pytest.fixture(scope="module")
def memory_root():
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    folder = Path(tempfile.mkdtemp(dir=base, prefix="mvar-hub-test-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def random_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def hub_store(memory_root):
    """The fake hub's files (official layout) and the models they hold."""
    store = memory_root / "hub"
    store.mkdir()
    vae = random_weights(MultiScaleVQVAE.empty(OFFICIAL_TOKENIZER), seed=1)
    layout = json.loads((Path(__file__).parent / "data" / "official_layout.json").read_text())["tokenizer"]
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == layout  # the real file's keys and shapes
    torch.save(vae.state_dict(), store / VAE_FILE)
    transformer = random_weights(ScaleTransformer.empty(official_transformer(2)), seed=2)
    torch.save(official_transformer_state_dict(transformer), store / MVAR_FILE)
    return store, {VAE_FILE: vae, MVAR_FILE: transformer}


class FakeHub:
    """``hf_hub_download`` from a local folder, in chunks, reporting to ``tqdm_class`` like the real
    one. It writes straight at ``local_dir/filename`` (the real client writes a temp file first), so
    a failure mid-file leaves the worst kind of partial file. ``fail`` maps file names to the number
    of bytes written before the connection "drops"."""

    def __init__(self, store: Path, fail: dict[str, int] | None = None):
        self.store, self.fail, self.calls = store, dict(fail or {}), []

    def hf_hub_download(self, repo_id, filename, *, local_dir=None, tqdm_class=None, **kwargs):
        self.calls.append((repo_id, filename))
        source, target = self.store / filename, Path(local_dir) / filename
        size = source.stat().st_size
        bar = tqdm_class(total=size, initial=0, unit="B", unit_scale=True, desc=filename, disable=True) \
            if tqdm_class else None
        with open(source, "rb") as src, open(target, "wb") as dst:
            while chunk := src.read(CHUNK):
                limit = self.fail.get(filename)
                if limit is not None and dst.tell() + len(chunk) > limit:
                    dst.write(chunk[: limit - dst.tell()])
                    raise ConnectionError(f"connection to the fake hub dropped after {dst.tell()} bytes")
                dst.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return str(target)

    def install(self, monkeypatch) -> None:
        module = types.ModuleType("huggingface_hub")
        module.hf_hub_download = self.hf_hub_download
        monkeypatch.setitem(sys.modules, "huggingface_hub", module)


@pytest.fixture
def models_dir(memory_root):
    folder = Path(tempfile.mkdtemp(dir=memory_root, prefix="models-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different[:5]


def test_hub_preset_downloads_once_on_demand_with_progress_and_loads_what_was_served(
        hub_store, models_dir, tmp_path, monkeypatch):
    store, served = hub_store
    hub = FakeHub(store)
    hub.install(monkeypatch)
    assert "mvar-d16" not in {e.key for e in ModelRegistry(models_dir, assets_dir=tmp_path).entries()}  # no --download
    registry = ModelRegistry(models_dir, assets_dir=tmp_path, allow_download=True)
    entries = {e.key: e for e in registry.entries()}
    assert entries["mvar-d16"].source == "hub" and "download" in entries["mvar-d16"].label
    assert hub.calls == []  # listing downloads nothing

    events = []
    from app.handlers import load_models  # the page's path: the model dropdown's handler passes gr.Progress

    models = load_models(registry, "mvar-d16", progress=lambda fraction, desc="": events.append((fraction, desc)))
    assert hub.calls == [("FoundationVision/var", VAE_FILE), ("CVLUESTC/MVAR", MVAR_FILE)]
    assert sorted(p.name for p in models_dir.iterdir()) == sorted([VAE_FILE, MVAR_FILE])
    # the loaded models are exactly the files served
    assert_same_weights(models.tokenizer, served[VAE_FILE])
    assert_same_weights(models.transformer, served[MVAR_FILE])
    assert models.transformer.cfg == official_transformer(2)
    assert models.var_transformer is models.transformer and models.class_names == IMAGENET_CLASSES
    assert models.sampling["cfg"] == 2.7  # the official README's suggestion for mvar-d16
    # progress: from 0 to 1, never backwards, byte counts of both files, then loading
    fractions = [f for f, _ in events]
    assert fractions[0] == 0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    vae_mib = (store / VAE_FILE).stat().st_size / 2**20
    assert any(f"of {vae_mib:.0f} MiB (file 1 of 2)" in desc for _, desc in events), events[:5]
    assert any("mvar-d16.pth from CVLUESTC/MVAR" in desc and "(file 2 of 2)" in desc for _, desc in events)
    assert len([d for _, d in events if "MiB" in d]) >= vae_mib // (CHUNK / 2**20)  # one report per chunk
    assert any(desc.startswith("loading") for _, desc in events)

    # the second load uses the loaded models or, in a new registry, the files: no new download
    events.clear()
    assert registry.load("mvar-d16", progress=lambda f, desc="": events.append((f, desc))) is models
    assert events == [(1.0, "mvar-d16 is loaded")]
    again = ModelRegistry(models_dir, assets_dir=tmp_path, allow_download=True)
    assert again.entry("mvar-d16").source == "local"  # downloaded files are local files now
    assert_same_weights(again.load("mvar-d16").transformer, served[MVAR_FILE])
    assert download_official("mvar-d16", models_dir) == models_dir / MVAR_FILE
    assert len(hub.calls) == 2


def test_failed_download_names_the_preset_and_leaves_no_partial_file(hub_store, models_dir, tmp_path, monkeypatch):
    store, served = hub_store
    hub = FakeHub(store, fail={MVAR_FILE: 1000})  # drops after 1000 bytes of the transformer
    hub.install(monkeypatch)
    registry = ModelRegistry(models_dir, assets_dir=tmp_path, allow_download=True)
    with pytest.raises(CheckpointError) as err:
        registry.load("mvar-d16")
    message = str(err.value)
    for part in (str(models_dir / MVAR_FILE), "needed by the model 'mvar-d16'", "official file 'mvar-d16'",
                 "(mvar-d16.pth from the hub repo CVLUESTC/MVAR) failed",
                 "ConnectionError: connection to the fake hub dropped", "put mvar-d16.pth at this path by hand"):
        assert part in message, message
    assert sorted(p.name for p in models_dir.iterdir()) == [VAE_FILE]  # the complete VAE stays, no half file
    assert registry.entry("mvar-d16").source == "hub"  # still offered: the user can try again

    # a failure on the first file names the file and the preset that needed it
    other = Path(tempfile.mkdtemp(dir=models_dir.parent, prefix="models-"))
    try:
        FakeHub(store, fail={VAE_FILE: 3 * CHUNK}).install(monkeypatch)
        with pytest.raises(CheckpointError, match=r"needed by the model 'var-d20': download of the official file "
                                                  r"'vae' \(vae_ch160v4096z32.pth from the hub repo "
                                                  r"FoundationVision/var\) failed"):
            ModelRegistry(other, assets_dir=tmp_path, allow_download=True).load("var-d20")
        assert list(other.iterdir()) == []
    finally:
        shutil.rmtree(other, ignore_errors=True)

    # trying again once the network is back downloads the missing file only, and loads
    working = FakeHub(store)
    working.install(monkeypatch)
    models = registry.load("mvar-d16")
    assert working.calls == [("CVLUESTC/MVAR", MVAR_FILE)]
    assert_same_weights(models.transformer, served[MVAR_FILE])


def test_interrupted_download_leaves_no_partial_file(hub_store, models_dir, monkeypatch):
    """Ctrl-C (or the app shutting down) mid-download: the half file is removed, the interrupt goes on."""
    store, _ = hub_store
    hub = FakeHub(store)
    hub.install(monkeypatch)

    def interrupted(fraction, desc=""):
        if fraction > 0.3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_official("vae", models_dir, progress=interrupted)
    assert list(models_dir.iterdir()) == []


def test_without_huggingface_hub_the_error_says_what_to_do(models_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    assert ModelRegistry(models_dir, assets_dir=tmp_path, allow_download=True).entries()[0].source == "random"
    with pytest.raises(CheckpointError, match=r"official file 'var-d16' not found. Install huggingface_hub"):
        download_official("var-d16", models_dir)
