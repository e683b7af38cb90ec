"""Official models downloaded on demand: the app's registry offers the hub presets, selecting one
downloads its files once (with progress) and loads exactly what was downloaded; a failed download
is a readable error naming the preset and leaves no partial file behind.

A fake ``huggingface_hub`` module (no network) serves an official-size VAE with random weights
(109 M parameters, the real file's layout, checked against tests/data/official_layout.json) and,
under the names mvar-d16.pth and var_d16.pth, depth-2 transformers in the official layouts (MVAR's
release ``{"mvar_wo_ddp": state dict}`` with its block-diagonal training mask, VAR's plain state dict
with the block-causal one; a real d16 would add 1.3 GB and a minute on this machine without testing
anything more). Files live in /dev/shm when it is writable.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import types
from pathlib import Path

import pytest
import torch

from app.registry import IMAGENET_CLASSES, ModelEntry, ModelRegistry
from mvar.checkpoints import CheckpointError, download_official, official_transformer_state_dict
from mvar.config import OFFICIAL_TOKENIZER, AttentionMode, official_transformer
from mvar.sampling import SamplingConfig, generate
from mvar.tokenizer import MultiScaleVQVAE
from mvar.transformer import ScaleTransformer

VAE_FILE, MVAR_FILE, VAR_FILE = "vae_ch160v4096z32.pth", "mvar-d16.pth", "var_d16.pth"
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
    torch.save({"mvar_wo_ddp": official_transformer_state_dict(transformer, "block-diagonal")}, store / MVAR_FILE)
    var = random_weights(ScaleTransformer.empty(official_transformer(2)), seed=3)
    torch.save(official_transformer_state_dict(var), store / VAR_FILE)
    return store, {VAE_FILE: vae, MVAR_FILE: transformer, VAR_FILE: var}


class FakeHub:
    """``hf_hub_download`` from a local folder, in chunks, reporting to ``tqdm_class`` like the real
    one. It writes straight at ``local_dir/filename`` (the real client writes a temp file first), so
    a failure mid-file leaves the worst kind of partial file. ``fail`` maps file names to the number
    of bytes written before the connection "drops". ``hold``: the name of a file whose download stops
    after its first chunk, setting ``held``, until ``release`` is set (a slow download, without sleeps)."""

    def __init__(self, store: Path, fail: dict[str, int] | None = None, hold: str | None = None):
        self.store, self.fail, self.calls = store, dict(fail or {}), []
        self.hold, self.held, self.release = hold, threading.Event(), threading.Event()

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
                if filename == self.hold and not self.release.is_set():
                    self.held.set()
                    assert self.release.wait(120), "the test never released the held download"
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
    from app.work.models import load_models  # the page's path: the model dropdown's handler passes gr.Progress

    models = load_models(registry, "mvar-d16", progress=lambda fraction, desc="": events.append((fraction, desc)))
    assert hub.calls == [("FoundationVision/var", VAE_FILE), ("CVLUESTC/MVAR", MVAR_FILE)]
    assert sorted(p.name for p in models_dir.iterdir()) == sorted([VAE_FILE, MVAR_FILE])
    # the loaded models are exactly the files served
    assert_same_weights(models.tokenizer, served[VAE_FILE])
    assert_same_weights(models.transformer, served[MVAR_FILE])
    assert models.transformer.cfg == official_transformer(2)
    assert models.var_transformer is models.transformer and models.class_names == IMAGENET_CLASSES
    assert models.sampling["cfg"] == 2.7  # the official README's suggestion for mvar-d16
    # MVAR's release layout and mask: labelled as an MVAR model, run in VAR mode for the baseline
    assert models.mvar_label == "MVAR: mvar-d16.pth, trained with MVAR attention, trained from scratch"
    assert models.var_label == "MVAR weights with VAR attention, not trained for it (mvar-d16.pth)"
    assert models.baseline_note.startswith("VAR baseline = the same weights run with VAR's block-causal attention")
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


def test_mvar_with_its_var_baseline_downloads_all_three_files_in_one_step(hub_store, models_dir, tmp_path,
                                                                          monkeypatch):
    store, served = hub_store
    hub = FakeHub(store)
    hub.install(monkeypatch)
    registry = ModelRegistry(models_dir, assets_dir=tmp_path, allow_download=True)
    entry = registry.entry("mvar-d16+var-d16")
    assert entry.source == "hub" and entry.label == "MVAR-d16 with the VAR-d16 baseline (download from the hub)"
    events = []
    models = registry.load("mvar-d16+var-d16", progress=lambda fraction, desc="": events.append((fraction, desc)))
    assert hub.calls == [("FoundationVision/var", VAE_FILE), ("CVLUESTC/MVAR", MVAR_FILE),
                         ("FoundationVision/var", VAR_FILE)]
    assert_same_weights(models.tokenizer, served[VAE_FILE])
    assert_same_weights(models.transformer, served[MVAR_FILE])
    assert_same_weights(models.var_transformer, served[VAR_FILE])
    # one progress bar over the three files: each file takes a third of the download's 0..0.9
    fractions = [f for f, _ in events]
    assert fractions[0] == 0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    starts = [min(f for f, d in events if f"(file {i} of 3)" in d) for i in (1, 2, 3)]
    assert starts == pytest.approx([0.0, 0.3, 0.6])
    assert any("var-d16 (var_d16.pth from FoundationVision/var)" in d and "(file 3 of 3)" in d for _, d in events)
    # what the page says about the pairing: mvar-d16 was trained from scratch, not fine-tuned from var_d16
    assert models.baseline_note == ("VAR baseline = a separate checkpoint, var_d16.pth; the MVAR side "
                                    "(mvar-d16.pth) was trained from scratch, not from it")
    assert models.mvar_label == "MVAR: mvar-d16.pth, trained with MVAR attention, trained from scratch"
    assert models.var_label == "VAR: var_d16.pth, trained with VAR attention, trained from scratch"
    # the files are local entries now, under the same keys (alone and paired), and load without the hub
    again = ModelRegistry(models_dir, assets_dir=tmp_path, allow_download=True)
    assert [e.key for e in again.entries() if e.source == "local"] == ["mvar-d16", "mvar-d16+var-d16", "var-d16"]
    assert_same_weights(again.load("mvar-d16+var-d16").var_transformer, served[VAR_FILE])
    assert len(hub.calls) == 3


def test_a_download_never_blocks_the_users_of_loaded_models(hub_store, models_dir, tmp_path, monkeypatch):
    """While one user's download is held mid-file, another user loads a model that is loaded already and
    generates with it; a third asking for the model being downloaded waits for that download (no second one)."""
    store, served = hub_store
    hub = FakeHub(store, hold=VAE_FILE)
    hub.install(monkeypatch)
    registry = ModelRegistry(models_dir, assets_dir=tmp_path, allow_download=True,
                             extra=[ModelEntry("tiny", "tiny", "random", "tiny", "tiny")])
    tiny = registry.load("tiny")
    results = {}

    def user(name, key, progress=None):
        try:
            results[name] = registry.load(key, progress=progress)
        except BaseException as err:  # shown by the asserts below
            results[name] = err

    def use_loaded():
        models = registry.load("tiny")
        results["images"] = generate(models.transformer, models.tokenizer, labels=[1], seeds=0,
                                     sampling=SamplingConfig(cfg=1.0, top_k=10, top_p=0.95),
                                     mode=AttentionMode.mvar()).images
        results["other"] = models

    waiting = threading.Event()
    downloader = threading.Thread(target=user, args=("download", "mvar-d16"), daemon=True)
    third = threading.Thread(target=user, daemon=True, args=(
        "third", "mvar-d16", lambda f, desc="": desc.startswith("waiting for mvar-d16") and waiting.set()))
    downloader.start()
    try:
        assert hub.held.wait(120)  # the download has begun and is held after its first chunk
        other = threading.Thread(target=use_loaded, daemon=True)
        other.start()
        other.join(120)  # only a safety net: with a lock held through the download this never ends
        assert not other.is_alive(), "a user of a loaded model waited for another user's download"
        assert results["other"] is tiny and len(results["images"]) == 1
        assert downloader.is_alive() and hub.calls == [("FoundationVision/var", VAE_FILE)]  # still downloading
        third.start()
        assert waiting.wait(120)
    finally:
        hub.release.set()
    downloader.join(300)
    third.join(300)
    assert not isinstance(results["download"], BaseException), results["download"]
    assert results["third"] is results["download"]  # loaded once, for both
    assert hub.calls == [("FoundationVision/var", VAE_FILE), ("CVLUESTC/MVAR", MVAR_FILE)]
    assert_same_weights(results["download"].transformer, served[MVAR_FILE])


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
