"""Which models the app can offer, and the loaded ones (the app's only global state).

Entries come from three places: the default models shipped in ``assets/``, official files found
in the models folder (``--models-dir`` / ``MVAR_MODELS_DIR``), and, when ``huggingface_hub`` is
installed, the official presets by name (downloaded on demand). The browser only ever sends an
entry's key; it can never name a server path.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mvar.checkpoints import OFFICIAL_FILES, CheckpointError, download_official, load_any, official_file_path
from mvar.config import AttentionMode, get_preset
from mvar.sampling import set_precision
from mvar.tokenizer import MultiScaleVQVAE
from mvar.transformer import ScaleTransformer

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
IMAGENET_CLASSES = json.loads((Path(__file__).parent / "imagenet_classes.json").read_text())

# Suggested sampling settings of the official MVAR README (cfg, top_p, top_k).
OFFICIAL_SAMPLING = {
    "mvar-d16": {"cfg": 2.7, "top_p": 0.99, "top_k": 1200},
    "mvar-finetune-d16": {"cfg": 2.0, "top_p": 0.99, "top_k": 1200},
    "mvar-finetune-d20": {"cfg": 1.5, "top_p": 0.96, "top_k": 900},
    "mvar-finetune-d24": {"cfg": 1.4, "top_p": 0.96, "top_k": 900},
}
VAR_SAMPLING = {"cfg": 1.5, "top_p": 0.96, "top_k": 900}


@dataclass(frozen=True)
class ModelEntry:
    key: str
    label: str
    source: str  # "default" | "local" | "hub"
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

    @property
    def baseline_note(self) -> str:
        if self.var_transformer is self.transformer:
            return "VAR baseline = the same weights run with VAR's block-causal attention and KV cache"
        return "VAR baseline = a separate VAR checkpoint (the MVAR model was fine-tuned from it)"


class ModelRegistry:
    def __init__(self, models_dir: str | Path | None = None, assets_dir: str | Path = ASSETS,
                 allow_download: bool = False, extra: list[ModelEntry] | None = None, max_loaded: int = 2):
        self.models_dir = Path(models_dir) if models_dir else None
        self.assets_dir = Path(assets_dir)
        self.allow_download = allow_download
        self.extra = list(extra or [])
        self.max_loaded = max_loaded
        self._loaded: dict[str, LoadedModels] = {}
        self._lock = threading.Lock()

    # ----- listing -----------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        found = list(self.extra)
        default = self.default_entry()
        if default is not None:
            found.append(default)
        found.extend(self.local_entries())
        if not found:
            # development stand-in until trained defaults are in assets/: clearly labelled, never shipped as default
            found.append(ModelEntry("untrained-small", "UNTRAINED small models (random weights: noise)", "random",
                                    "small", "small"))
        known = {e.key for e in found}
        if self.allow_download and self.models_dir is not None and _hub_available():
            found.extend(e for e in self.hub_entries() if e.key not in known)
        return found

    def default_entry(self) -> ModelEntry | None:
        tokenizer, mvar, var = (self.assets_dir / f"{n}.safetensors" for n in ("tokenizer", "mvar", "var"))
        if not (tokenizer.exists() and mvar.exists()):
            return None
        return ModelEntry("default", "Default small models (embedded dataset, CPU)", "default", str(tokenizer),
                          str(mvar), str(var) if var.exists() else None)

    def local_entries(self) -> list[ModelEntry]:
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        vae = official_file_path("vae", self.models_dir)
        if not vae.exists():
            return []
        entries = []
        for name, (_, filename, kind) in OFFICIAL_FILES.items():
            path = self.models_dir / filename
            if kind != "transformer" or not path.exists():
                continue
            depth = name.rsplit("d", 1)[-1]
            var_path = self.models_dir / f"var_d{depth}.pth"
            separate_var = str(var_path) if name.startswith("mvar") and var_path.exists() else None
            entries.append(ModelEntry(name, f"{name} (local file)", "local", str(vae), str(path), separate_var,
                                      OFFICIAL_SAMPLING.get(name, VAR_SAMPLING)))
        return entries

    def hub_entries(self) -> list[ModelEntry]:
        return [ModelEntry(name, f"{name} (download from the hub)", "hub", "vae", name, None,
                           OFFICIAL_SAMPLING.get(name, VAR_SAMPLING))
                for name, (_, _, kind) in OFFICIAL_FILES.items() if kind == "transformer"]

    def entry(self, key: str) -> ModelEntry:
        for entry in self.entries():
            if entry.key == key:
                return entry
        raise ValueError(f"unknown model {key!r}")

    # ----- loading -----------------------------------------------------------------------------

    def load(self, key: str, device: str = "cpu", progress=None) -> LoadedModels:
        """Load (or return the already loaded) models of an entry; least recently used are evicted.

        A hub entry downloads its missing files first (once: later loads use the files). ``progress``,
        if given, is called as ``progress(fraction, desc=text)``, like Gradio's ``gr.Progress``, with
        the bytes downloaded and the loading steps.
        """
        report = progress if progress is not None else _no_progress
        with self._lock:
            if key in self._loaded:
                loaded = self._loaded.pop(key)
                self._loaded[key] = loaded  # most recently used last
                report(1.0, desc=f"{key} is loaded")
                return loaded
            entry = self.entry(key)
            loaded = self._load_entry(entry, device, report)
            self._loaded[key] = loaded
            while len(self._loaded) > self.max_loaded:
                self._loaded.pop(next(iter(self._loaded)))
            report(1.0, desc=f"loaded {entry.label}")
            return loaded

    def _resolve(self, entry: ModelEntry, report) -> tuple[str, str]:
        """The entry's (tokenizer, transformer) files; a hub entry's missing ones are downloaded,
        taking progress 0..0.9 (the loading takes the rest)."""
        if entry.source != "hub":
            return entry.tokenizer, entry.transformer
        names = [entry.tokenizer, entry.transformer]
        paths = []
        for i, name in enumerate(names):
            def scaled(fraction, desc="", i=i):
                report(0.9 * (i + fraction) / len(names), desc=f"{desc} (file {i + 1} of {len(names)})")

            try:
                paths.append(str(download_official(name, self.models_dir, progress=scaled)))
            except CheckpointError as err:
                raise CheckpointError(err.path, f"needed by the model {entry.key!r}: {err.problem}") from None
        return paths[0], paths[1]

    def _load_entry(self, entry: ModelEntry, device: str, report=None) -> LoadedModels:
        report = report or _no_progress
        if entry.source == "random":
            return self._random_models(entry, device)
        tokenizer_path, transformer_path = self._resolve(entry, report)
        report(0.9, desc=f"loading {entry.label}")
        tokenizer = load_any(tokenizer_path, "tokenizer", device=device).model.eval().requires_grad_(False)
        mvar = load_any(transformer_path, "transformer", device=device)
        transformer = mvar.model.eval().requires_grad_(False)
        var_model = transformer
        if entry.var_transformer:
            var_model = load_any(entry.var_transformer, "transformer", device=device).model.eval()
            var_model.requires_grad_(False)
        names = mvar.extra.get("class_names")
        if not names:
            names = IMAGENET_CLASSES if transformer.cfg.num_classes == 1000 else [
                f"class {i}" for i in range(transformer.cfg.num_classes)]
        mode = AttentionMode.mvar_from_extra(mvar.extra)
        sampling = {**VAR_SAMPLING, **entry.sampling, **mvar.extra.get("sampling_defaults", {})}
        sampling["top_k"] = min(int(sampling["top_k"]), transformer.cfg.vocab_size)  # 900 means nothing at vocab 32
        return LoadedModels(entry, tokenizer, transformer, var_model, list(names), sampling, mode)


    def _random_models(self, entry: ModelEntry, device: str) -> LoadedModels:
        preset = get_preset(entry.transformer)
        torch.manual_seed(0)
        tokenizer = MultiScaleVQVAE(preset.tokenizer).to(device).eval().requires_grad_(False)
        transformer = ScaleTransformer(preset.transformer).to(device).eval().requires_grad_(False)
        names = [f"class {i}" for i in range(preset.transformer.num_classes)]
        sampling = {**VAR_SAMPLING, "top_k": min(VAR_SAMPLING["top_k"], preset.transformer.vocab_size)}
        return LoadedModels(entry, tokenizer, transformer, transformer, names, sampling, AttentionMode.mvar())


def _no_progress(fraction, desc=""):
    pass


def _hub_available() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
