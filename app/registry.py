"""Which models the app can offer, and the loaded ones (the app's only global state).

Entries come from four places: the default models shipped in ``assets/``, explicit files from the
command line, official files found in the models folder (``--models-dir`` / ``MVAR_MODELS_DIR``), and,
with ``--download`` or on a Hugging Face Space, the official presets by name (downloaded on demand).
An official MVAR file is offered alone (its VAR side is the same weights in VAR mode) and paired with
the VAR release of the same depth. The browser only ever sends an entry's key; it can never name a
server path. A key always names the same files: once they are downloaded, its entry is a local one.

Loading never holds the registry's lock: one short lock guards the dict of loaded models, and each key
being loaded has its own pending slot, so a multi-GB download for one user never delays another user's
already loaded model, and two users asking for the same key load it once.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mvar.checkpoints import (
    OFFICIAL_FILES,
    OFFICIAL_SAMPLING,
    CheckpointError,
    download_official,
    load_any,
    official_file_path,
)
from mvar.config import AttentionMode, get_preset
from mvar.sampling import set_precision
from mvar.tokenizer import MultiScaleVQVAE
from mvar.transformer import ScaleTransformer

from .provenance import UNTRAINED, TrainedFor, baseline_note, mvar_label, trained_for, var_label

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
IMAGENET_CLASSES = json.loads((Path(__file__).parent / "imagenet_classes.json").read_text())

VAR_SAMPLING = OFFICIAL_SAMPLING["var-d16"]  # VAR's README setting: files without settings of their own
PAIR_SEPARATOR = "+"  # "mvar-d16+var-d16": the MVAR file with the VAR file of the same depth


@dataclass(frozen=True)
class ModelEntry:
    key: str
    label: str
    source: str  # "default" | "local" | "hub" | "random"
    tokenizer: str  # a file path, or an official file name for hub entries
    transformer: str
    var_transformer: str | None = None  # a separate VAR baseline; None = same weights in VAR mode
    sampling: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class LoadedModels:
    entry: ModelEntry
    tokenizer: MultiScaleVQVAE
    transformer: ScaleTransformer  # run in MVAR mode
    var_transformer: ScaleTransformer  # run in VAR mode (may be the same object)
    class_names: list[str]
    sampling: dict
    mvar_mode: AttentionMode
    mvar_trained: TrainedFor | None = None  # what the MVAR side's file was trained for (None: not known)
    var_trained: TrainedFor | None = None  # the same for the VAR side
    cache: dict = field(default_factory=dict)  # results computed once per loaded model (analysis, memory)
    _precision_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def in_precision(self, dtype: torch.dtype | None) -> tuple[MultiScaleVQVAE, ScaleTransformer, ScaleTransformer]:
        """(tokenizer, MVAR transformer, VAR transformer) with weights stored in ``dtype``.

        Low-precision copies are made once per model and kept: generating from fp32 weights under
        autocast would recast every weight at every scale.
        """
        if dtype is None or dtype == torch.float32:
            return self.tokenizer, self.transformer, self.var_transformer
        with self._precision_lock:
            key = ("weights", dtype)
            if key not in self.cache:
                tokenizer, transformer = copy.deepcopy(self.tokenizer), copy.deepcopy(self.transformer)
                var = transformer if self.var_transformer is self.transformer else copy.deepcopy(self.var_transformer)
                set_precision(transformer, tokenizer, dtype)
                if var is not transformer:
                    var.to(dtype)
                self.cache[key] = (tokenizer, transformer, var)
            return self.cache[key]

    def _sides(self) -> tuple[TrainedFor, TrainedFor]:
        unknown = TrainedFor(self.entry.key, None)
        mvar = self.mvar_trained or unknown
        var = mvar if self.var_transformer is self.transformer else (self.var_trained or unknown)
        return mvar, var

    @property
    def mvar_label(self) -> str:
        """What the MVAR column runs, e.g. "VAR weights with MVAR attention, not trained for it (var_d16.pth)"."""
        return mvar_label(self._sides()[0])

    @property
    def var_label(self) -> str:
        """What the VAR column runs, e.g. "VAR: var_d16.pth, trained with VAR attention, trained from scratch"."""
        return var_label(self._sides()[1])

    @property
    def baseline_note(self) -> str:
        return baseline_note(*self._sides(), same_weights=self.var_transformer is self.transformer)


# ----- Hugging Face Spaces ---------------------------------------------------------------------


def on_space(environ=None) -> bool:
    """True on a Hugging Face Space (the platform sets SPACE_ID)."""
    return bool((os.environ if environ is None else environ).get("SPACE_ID"))


def space_models_dir(data: Path = Path("/data"), fallback: Path = ROOT / "models") -> Path:
    """Where a Space keeps downloaded models: ``/data/models`` when the Space has persistent storage
    (``/data`` exists and is writable: the files survive restarts), else ``models/`` next to the code."""
    if data.is_dir() and os.access(data, os.W_OK):
        return data / "models"
    return fallback


# ----- official names ---------------------------------------------------------------------------


def official_entries_spec() -> list[tuple[str, str, str | None]]:
    """(key, transformer, VAR baseline or None) for every official entry, in listing order: each MVAR
    release alone and then with the VAR release of its depth, then the VAR releases alone."""
    transformers = [name for name, (_, _, kind) in OFFICIAL_FILES.items() if kind == "transformer"]
    spec = []
    for name in (n for n in transformers if n.startswith("mvar")):
        spec.append((name, name, None))
        var = f"var-d{name.rsplit('d', 1)[-1]}"
        if var in OFFICIAL_FILES:
            spec.append((f"{name}{PAIR_SEPARATOR}{var}", name, var))
    spec.extend((name, name, None) for name in transformers if name.startswith("var"))
    return spec


def _display(name: str) -> str:
    family, _, rest = name.partition("-")
    return f"{family.upper()}-{rest}"


def official_label(transformer: str, var: str | None, where: str) -> str:
    """The dropdown label of an official entry; ``where`` is "local files" or "download from the hub"."""
    if var is not None:
        text = f"{_display(transformer)} with the {_display(var)} baseline"
    elif transformer.startswith("var"):
        text = f"{_display(transformer)} alone (its MVAR side: VAR weights with MVAR attention, not trained for it)"
    else:
        text = f"{_display(transformer)} alone (its VAR side: the same weights with VAR attention)"
    return f"{text} ({where})"


# ----- the registry -----------------------------------------------------------------------------


class _PendingLoad:
    """One entry being loaded: the first caller loads it, later callers for the same key wait for that."""

    def __init__(self):
        self.done = threading.Event()
        self.result: LoadedModels | None = None
        self.error: BaseException | None = None
        self.latest: tuple[float, str] = (0.0, "")

    def relay(self, report):
        """The loader's progress callback: its own, and recorded for the waiting callers."""
        def relayed(fraction, desc=""):
            self.latest = (fraction, desc)
            report(fraction, desc=desc)
        return relayed

    def wait(self, key: str, report) -> LoadedModels:
        # each waiter reports from its own thread (a page's progress bar belongs to its request)
        report(self.latest[0], desc=f"waiting for {key}: another user is loading it")
        shown = None
        while not self.done.wait(0.5):
            if self.latest != shown and self.latest[1]:
                shown = self.latest
                report(shown[0], desc=shown[1])
        if isinstance(self.error, Exception):
            raise self.error
        if self.error is not None:
            raise ValueError(f"loading the model {key!r} was interrupted; try again")
        report(1.0, desc=f"{key} is loaded")
        return self.result


class ModelRegistry:
    def __init__(self, models_dir: str | Path | None = None, assets_dir: str | Path = ASSETS,
                 allow_download: bool = False, extra: list[ModelEntry] | None = None, max_loaded: int = 2,
                 device: str = "cpu", space: bool | None = None):
        """``space``: running on a Hugging Face Space (None: detect it from SPACE_ID). There the official
        presets are offered for download without ``allow_download``, into ``space_models_dir()`` unless
        ``models_dir`` is given."""
        self.space = on_space() if space is None else bool(space)
        if models_dir is None and self.space:
            models_dir = space_models_dir()
        self.models_dir = Path(models_dir) if models_dir else None
        self.assets_dir = Path(assets_dir)
        self.allow_download = bool(allow_download) or self.space
        self.extra = list(extra or [])
        self.max_loaded = max_loaded
        self.device = str(device)
        self._loaded: dict[tuple[str, str], LoadedModels] = {}  # (key, device), least recently used first
        self._loading: dict[tuple[str, str], _PendingLoad] = {}
        self._lock = threading.Lock()  # guards the two dicts only; never held while loading

    # ----- listing -----------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        """Every entry, in the page's order: explicit files, the default models, official files here, then
        the official presets to download (when offered)."""
        found = list(self.extra)
        default = self.default_entry()
        if default is not None:
            found.append(default)
        found.extend(self.local_entries())
        if not found:
            # development stand-in until trained defaults are in assets/: clearly labelled, never shipped as default
            found.append(ModelEntry("untrained-small", "UNTRAINED small models (random weights: noise)", "random",
                                    "small", "small"))
        if self.allow_download and self.models_dir is not None and _hub_available():
            known = {e.key for e in found}
            found.extend(e for e in self.hub_entries() if e.key not in known)
        return found

    def default_entry(self) -> ModelEntry | None:
        tokenizer, mvar, var = (self.assets_dir / f"{n}.safetensors" for n in ("tokenizer", "mvar", "var"))
        if not (tokenizer.exists() and mvar.exists()):
            return None
        return ModelEntry("default", "Default small models (trained on emoji artwork, CPU)", "default", str(tokenizer),
                          str(mvar), str(var) if var.exists() else None)

    def local_entries(self) -> list[ModelEntry]:
        """Official files found in the models folder under their official names (the VAE is needed)."""
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        vae = official_file_path("vae", self.models_dir)
        if not vae.exists():
            return []
        entries = []
        for key, name, var in official_entries_spec():
            path = official_file_path(name, self.models_dir)
            var_path = official_file_path(var, self.models_dir) if var else None
            if path.is_file() and (var_path is None or var_path.is_file()):
                entries.append(ModelEntry(key, official_label(name, var, "local files"), "local", str(vae), str(path),
                                          str(var_path) if var_path else None,
                                          OFFICIAL_SAMPLING.get(name, VAR_SAMPLING)))
        return entries

    def hub_entries(self) -> list[ModelEntry]:
        """Every official entry as a download (files already here are not downloaded again)."""
        return [ModelEntry(key, official_label(name, var, "download from the hub"), "hub", "vae", name, var,
                           OFFICIAL_SAMPLING.get(name, VAR_SAMPLING))
                for key, name, var in official_entries_spec()]

    def entry(self, key: str) -> ModelEntry:
        for entry in self.entries():
            if entry.key == key:
                return entry
        raise ValueError(f"unknown model {key!r}")

    # ----- loading -----------------------------------------------------------------------------

    def load(self, key: str, device: str | None = None, progress=None) -> LoadedModels:
        """Load (or return the already loaded) models of an entry on ``device`` (default: the registry's);
        the least recently used are evicted (a caller holding them keeps working objects).

        A hub entry downloads its missing files first (once: later loads use the files). ``progress``,
        if given, is called as ``progress(fraction, desc=text)``, like Gradio's ``gr.Progress``, with
        the bytes downloaded and the loading steps; a caller waiting for another's load of the same key
        sees that load's progress.
        """
        report = progress if progress is not None else _no_progress
        slot = (key, str(device or self.device))
        with self._lock:
            loaded = self._loaded.pop(slot, None)
            if loaded is not None:
                self._loaded[slot] = loaded  # most recently used last
            pending = None if loaded is not None else self._loading.get(slot)
            leader = loaded is None and pending is None
            if leader:
                pending = self._loading[slot] = _PendingLoad()
        if loaded is not None:
            report(1.0, desc=f"{key} is loaded")
            return loaded
        if not leader:
            return pending.wait(key, report)
        relay = pending.relay(report)
        try:
            entry = self.entry(key)
            pending.result = self._load_entry(entry, slot[1], relay)
        except BaseException as err:  # Ctrl-C included: the waiters must not wait forever
            pending.error = err
            raise
        finally:
            with self._lock:
                del self._loading[slot]
                if pending.result is not None:
                    self._loaded[slot] = pending.result
                    while len(self._loaded) > self.max_loaded:
                        self._loaded.pop(next(iter(self._loaded)))  # dropped here only: holders keep theirs
            pending.done.set()
        relay(1.0, desc=f"loaded {entry.label}")
        return pending.result

    def loaded_keys(self) -> list[str]:
        """Keys of the loaded entries, least recently used first (public: what a caller or a test may ask of
        the registry's memory; the page itself never needs it)."""
        with self._lock:
            return [key for key, _ in self._loaded]

    def _resolve(self, entry: ModelEntry, report) -> tuple[str, str, str | None]:
        """The entry's (tokenizer, transformer, VAR baseline) files; a hub entry's missing ones are downloaded,
        taking progress 0..0.9 over all its files (the loading takes the rest)."""
        if entry.source != "hub":
            return entry.tokenizer, entry.transformer, entry.var_transformer
        names = [n for n in (entry.tokenizer, entry.transformer, entry.var_transformer) if n is not None]
        paths = []
        for i, name in enumerate(names):
            def scaled(fraction, desc="", i=i):
                report(0.9 * (i + fraction) / len(names), desc=f"{desc} (file {i + 1} of {len(names)})")

            try:
                paths.append(str(download_official(name, self.models_dir, progress=scaled)))
            except CheckpointError as err:
                raise CheckpointError(err.path, f"needed by the model {entry.key!r}: {err.problem}") from None
        return paths[0], paths[1], paths[2] if len(paths) > 2 else None

    def _load_entry(self, entry: ModelEntry, device: str, report=None) -> LoadedModels:
        report = report or _no_progress
        if entry.source == "random":
            return self._random_models(entry, device)
        tokenizer_path, transformer_path, var_path = self._resolve(entry, report)
        report(0.9, desc=f"loading {entry.label}")
        tokenizer = load_any(tokenizer_path, "tokenizer", device=device).model.eval().requires_grad_(False)
        mvar = load_any(transformer_path, "transformer", device=device)
        transformer = mvar.model.eval().requires_grad_(False)
        mvar_side = trained_for(mvar)
        var_model, var_side = transformer, mvar_side
        if var_path:
            var = load_any(var_path, "transformer", device=device)
            var_model, var_side = var.model.eval().requires_grad_(False), trained_for(var)
        names = mvar.extra.get("class_names")
        if not names:
            names = IMAGENET_CLASSES if transformer.cfg.num_classes == 1000 else [
                f"class {i}" for i in range(transformer.cfg.num_classes)]
        mode = AttentionMode.mvar_from_extra(mvar.extra)
        sampling = {**VAR_SAMPLING, **entry.sampling, **mvar.extra.get("sampling_defaults", {})}
        sampling["top_k"] = min(int(sampling["top_k"]), transformer.cfg.vocab_size)  # 900 means nothing at vocab 32
        return LoadedModels(entry, tokenizer, transformer, var_model, list(names), sampling, mode,
                            mvar_side, var_side)

    def _random_models(self, entry: ModelEntry, device: str) -> LoadedModels:
        preset = get_preset(entry.transformer)
        torch.manual_seed(0)
        tokenizer = MultiScaleVQVAE(preset.tokenizer).to(device).eval().requires_grad_(False)
        transformer = ScaleTransformer(preset.transformer).to(device).eval().requires_grad_(False)
        names = [f"class {i}" for i in range(preset.transformer.num_classes)]
        sampling = {**VAR_SAMPLING, "top_k": min(VAR_SAMPLING["top_k"], preset.transformer.vocab_size)}
        return LoadedModels(entry, tokenizer, transformer, transformer, names, sampling, AttentionMode.mvar(),
                            UNTRAINED, UNTRAINED)


def _no_progress(fraction, desc=""):
    pass


def _hub_available() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True
