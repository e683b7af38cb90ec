"""Checkpoint files: our safetensors format, VAR's official .pth files, conversion and hub download.

Our format is a safetensors file whose metadata holds the model kind and its config (JSON),
plus free-form ``extra`` JSON (class names, sampling defaults, a model card), so a file loads
without knowing its config. Official ``.pth`` files are read with ``torch.load(weights_only=True)``,
which refuses pickles that would run code.

Every error is a :class:`CheckpointError` (a ``ValueError``) that names the file and the problem.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import checks
from .attention import block_causal_mask
from .config import (
    OFFICIAL_TOKENIZER,
    TokenizerConfig,
    TransformerConfig,
    get_preset,
)
from .schedule import OFFICIAL_PATCH_NUMS, ScaleSchedule
from .tokenizer import MultiScaleVQVAE
from .transformer import ScaleTransformer

FORMAT_NAME = "mvar-studio"
FORMAT_VERSION = "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODEL_KINDS = ("tokenizer", "transformer")

# Official files and where they live on the Hugging Face hub.
OFFICIAL_FILES: dict[str, tuple[str, str, str]] = {
    # name: (hub repo, file name, kind)
    "vae": ("FoundationVision/var", "vae_ch160v4096z32.pth", "tokenizer"),
    "var-d16": ("FoundationVision/var", "var_d16.pth", "transformer"),
    "var-d20": ("FoundationVision/var", "var_d20.pth", "transformer"),
    "var-d24": ("FoundationVision/var", "var_d24.pth", "transformer"),
    "var-d30": ("FoundationVision/var", "var_d30.pth", "transformer"),
    "mvar-d16": ("CVLUESTC/MVAR", "mvar-d16.pth", "transformer"),
    "mvar-finetune-d16": ("CVLUESTC/MVAR", "mvar-finetune-d16.pth", "transformer"),
    "mvar-finetune-d20": ("CVLUESTC/MVAR", "mvar-finetune-d20.pth", "transformer"),
    "mvar-finetune-d24": ("CVLUESTC/MVAR", "mvar-finetune-d24.pth", "transformer"),
}


class CheckpointError(ValueError):
    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


@dataclass
class LoadedModel:
    kind: str
    model: torch.nn.Module
    config: TokenizerConfig | TransformerConfig
    extra: dict = field(default_factory=dict)
    path: str = ""


# ---------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; checkpoints are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(path, model: MultiScaleVQVAE | ScaleTransformer, extra: dict | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Save a tokenizer or transformer in our safetensors format (optionally cast floats to ``dtype``)."""
    kind = _kind_of(model)
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point() and name != "quantize.ema_vocab_hit_SV":
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": model.cfg.to_json(),
        "extra": json.dumps(extra or {}),
    }
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _kind_of(model) -> str:
    if isinstance(model, MultiScaleVQVAE):
        return "tokenizer"
    if isinstance(model, ScaleTransformer):
        return "transformer"
    raise TypeError(f"cannot save a {type(model).__name__}")


def read_metadata(path) -> dict:
    """The metadata of one of our files (format, kind, config, extra), without loading tensors."""
    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(path, f"not a readable safetensors file (truncated or corrupt?): {err}") from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(path, "safetensors file without MVAR Studio metadata (format/kind/config)")
    try:
        return {**meta, "config": json.loads(meta["config"]), "extra": json.loads(meta.get("extra", "{}"))}
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(path, f"metadata is damaged: {err}") from None


def _check_kind(name: str, kind, optional: bool = False) -> None:
    """``kind`` names a model kind (or is None when ``optional``), else a ValueError naming ``name``."""
    if (optional and kind is None) or (isinstance(kind, str) and kind in MODEL_KINDS):
        return
    choices = "'tokenizer' or 'transformer'" + (" (or None)" if optional else "")
    raise ValueError(f"{name} must be {choices}, got {checks.shown(kind)}")


def load_model(path, device: str | torch.device = "cpu", expect: str | None = None) -> LoadedModel:
    """Load one of our files; the config comes from the file's metadata.

    ``expect``: "tokenizer" or "transformer" to refuse a file of the other kind, None for either.
    """
    _check_kind("expect", expect, optional=True)
    path = Path(path)
    meta = read_metadata(path)
    kind = meta.get("kind")
    if kind not in MODEL_KINDS:
        raise CheckpointError(path, f"unknown model kind {checks.shown(kind)}")
    if expect is not None and kind != expect:
        raise CheckpointError(path, f"expected a {expect} file, found a {kind} file")
    try:
        config = (TokenizerConfig if kind == "tokenizer" else TransformerConfig).from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(path, f"config in metadata is invalid: {err}") from None
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(path, f"tensor data unreadable (truncated or corrupt?): {err}") from None
    model = MultiScaleVQVAE.empty(config) if kind == "tokenizer" else ScaleTransformer.empty(config)
    _load_strict(path, model, state)
    return LoadedModel(kind, model.to(device).eval(), config, meta["extra"], str(path))


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(path, "file not found")
    if not path.is_file():
        raise CheckpointError(path, "not a regular file")


def _load_strict(path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load with an error that lists missing / unexpected keys and wrong shapes or values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    for name in sorted(set(expected) & set(state)):
        want, got = expected[name], state[name]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{name}: expected shape {tuple(want.shape)}, found {tuple(got.shape)}")
        elif want.is_floating_point() and got.dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: expected a floating-point tensor, found {got.dtype}")
        elif got.is_floating_point() and not torch.isfinite(got).all():
            problems.append(f"{name}: contains NaN or infinite values")
    if problems:
        raise CheckpointError(path, "does not match the model: " + "; ".join(problems[:8]) +
                              (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    converted = {name: tensor.to(expected[name].dtype) for name, tensor in state.items()}
    # assign: take the loaded tensors as the parameters instead of copying them (models here are fresh)
    model.load_state_dict(converted, strict=True, assign=True)


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"


# ---------------------------------------------------------------------------------------------
# Official .pth files
# ---------------------------------------------------------------------------------------------

# Buffers that VAR's official transformer files carry but that we derive instead.
OFFICIAL_DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
ZERO_K_BIAS = ".attn.zero_k_bias"


def read_official_state_dict(path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) with readable errors; unwraps common checkpoint wrappers."""
    path = Path(path)
    _check_exists(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            path, f"refused: the file needs to execute code to load (not a plain weights file): {err}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(path, f"cannot be read, truncated or corrupt: {err}") from None
    for key in ("model", "state_dict", "var_wo_ddp", "vae_wo_ddp", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if isinstance(obj, dict) and "trainer" in obj and isinstance(obj["trainer"], dict):
        inner = obj["trainer"]
        obj = inner.get("var_wo_ddp", inner.get("vae_wo_ddp", obj))
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(path, "does not hold a state dict (a mapping of names to tensors)")
    state = {}
    for name, tensor in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        state[name] = tensor
    return state


def _is_zip(path: Path) -> bool:
    """torch.save's zip format can be memory-mapped (fast, no copy); legacy pickles cannot."""
    return zipfile.is_zipfile(path)


def infer_transformer_config(state: dict[str, torch.Tensor], path="<state dict>") -> TransformerConfig:
    """Read depth, width, heads, classes, vocab, Cvae and the schedule off the tensor shapes."""
    try:
        width, latent = state["word_embed.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        heads = state["blocks.0.attn.scale_mul_1H11"].shape[1]
        num_classes = state["class_emb.weight"].shape[0] - 1
        vocab = state["head.weight"].shape[0]
        total = state["pos_1LC"].shape[1]
        hidden = state["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(path, f"not a VAR/MVAR transformer state dict (cannot read {err})") from None
    if total != ScaleSchedule(OFFICIAL_PATCH_NUMS).total_tokens:
        raise CheckpointError(path, f"has {total} positions; only the official 10-scale schedule (680) "
                                    "can be inferred, name a preset for others")
    return TransformerConfig(depth=depth, width=width, num_heads=heads, mlp_ratio=hidden / width,
                             num_classes=num_classes, vocab_size=vocab, latent_channels=latent,
                             drop_path_rate=0.1 * depth / 24)


def transformer_from_official(state: dict[str, torch.Tensor], config: TransformerConfig | None = None,
                              path="<state dict>") -> ScaleTransformer:
    """Build a transformer from a state dict in VAR's official layout, strictly.

    The official buffers are accounted for, not silently dropped: the level-index row and the
    training mask must equal what the schedule implies, and the key biases must be zero.
    """
    state = dict(state)
    config = config or infer_transformer_config(state, path)
    schedule = config.schedule
    levels = state.pop("lvl_1L", None)
    if levels is not None and not torch.equal(levels.reshape(-1).long(), schedule.scale_of_positions()):
        raise CheckpointError(path, "buffer lvl_1L does not match the scale schedule")
    mask = state.pop("attn_bias_for_masking", None)
    if mask is not None:
        allowed = block_causal_mask(schedule.patch_nums)
        if tuple(mask.shape[-2:]) != tuple(allowed.shape) or not torch.equal(mask.reshape(allowed.shape) == 0, allowed):
            raise CheckpointError(path, "buffer attn_bias_for_masking is not the block-causal mask of the schedule")
    for name in [k for k in state if k.endswith(ZERO_K_BIAS)]:
        if torch.count_nonzero(state.pop(name)):
            raise CheckpointError(path, f"{name} should be all zeros")
    model = ScaleTransformer.empty(config)
    _load_strict(path, model, state)
    return model.eval()


def official_transformer_state_dict(model: ScaleTransformer) -> dict[str, torch.Tensor]:
    """Our transformer's weights in VAR's official layout (buffers included), as var_dXX.pth holds them."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    schedule = model.schedule
    for i in range(model.cfg.depth):
        state[f"blocks.{i}{ZERO_K_BIAS}"] = torch.zeros(model.cfg.width)
    state["lvl_1L"] = schedule.scale_of_positions().unsqueeze(0)
    allowed = block_causal_mask(schedule.patch_nums)
    state["attn_bias_for_masking"] = torch.where(allowed, 0.0, float("-inf")).view(1, 1, *allowed.shape)
    return state


def load_official_transformer(path, preset: str | None = None) -> ScaleTransformer:
    """Load var_dXX.pth / mvar-*.pth strictly; the config is inferred from the shapes or named."""
    state = read_official_state_dict(path)
    config = get_preset(preset).transformer if preset else None
    return transformer_from_official(state, config, path)


def load_official_tokenizer(path, config: TokenizerConfig = OFFICIAL_TOKENIZER) -> MultiScaleVQVAE:
    """Load vae_ch160v4096z32.pth strictly."""
    state = read_official_state_dict(path)
    model = MultiScaleVQVAE.empty(config)
    hits = state.get("quantize.ema_vocab_hit_SV")
    if hits is not None and hits.shape[0] != len(config.patch_nums):
        # a usage statistic tied to the training schedule; keep ours when the count differs
        state["quantize.ema_vocab_hit_SV"] = torch.zeros(len(config.patch_nums), config.vocab_size)
    _load_strict(path, model, state)
    return model.eval()


def convert_official(src, dst, kind: str, preset: str | None = None, extra: dict | None = None) -> None:
    """Write an official .pth file in our safetensors format."""
    if kind == "tokenizer":
        model = load_official_tokenizer(src)
    elif kind == "transformer":
        model = load_official_transformer(src, preset)
    else:
        raise ValueError(f"kind must be 'tokenizer' or 'transformer', got {kind!r}")
    save_model(dst, model, extra={"converted_from": Path(src).name, **(extra or {})})


def load_any(path, kind: str, device="cpu", preset: str | None = None) -> LoadedModel:
    """Load ours (.safetensors) or an official file (.pth) of the given kind ("tokenizer" or "transformer")."""
    _check_kind("kind", kind)
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_model(path, device, expect=kind)
    model = load_official_tokenizer(path) if kind == "tokenizer" else load_official_transformer(path, preset)
    return LoadedModel(kind, model.to(device), model.cfg, {}, str(path))


# ---------------------------------------------------------------------------------------------
# Hub download (optional: needs huggingface_hub and a network)
# ---------------------------------------------------------------------------------------------


def official_file_path(name: str, models_dir) -> Path:
    if name not in OFFICIAL_FILES:
        raise ValueError(f"unknown official file {name!r}; choose one of {sorted(OFFICIAL_FILES)}")
    return Path(models_dir) / OFFICIAL_FILES[name][1]


def download_official(name: str, models_dir, progress=None) -> Path:
    """Fetch an official file into ``models_dir`` (or return it if it is already there).

    ``progress``, if given, is called as ``progress(fraction, desc=text)`` (the calling convention
    of Gradio's ``gr.Progress``) when the download starts and as bytes arrive. A failed or
    interrupted download leaves no file at the target path, so a later run never mistakes half a
    file for a model (huggingface_hub keeps its own resumable partial download under
    ``models_dir/.cache/huggingface``).
    """
    target = official_file_path(name, models_dir)
    if target.exists():
        return target
    repo, filename, _ = OFFICIAL_FILES[name]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(
            target, f"official file {name!r} not found. Install huggingface_hub to download it, or put "
                    f"{filename} from the hub repo {repo} at this path") from None
    kwargs = {}
    if progress is not None:
        desc = f"downloading {name} ({filename} from {repo})"
        progress(0.0, desc=desc)
        if _accepts_keyword(hf_hub_download, "tqdm_class"):
            kwargs["tqdm_class"] = _reporting_tqdm(progress, desc)
    try:
        Path(models_dir).mkdir(parents=True, exist_ok=True)
        got = Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=str(models_dir), **kwargs))
        if not target.exists() and got.is_file():  # a hub client that answered with a path elsewhere
            _atomic_write(target, lambda tmp: shutil.copyfile(got, tmp))
        if not target.exists():
            raise FileNotFoundError(f"the hub client returned {got}, but nothing was written at the target")
    except BaseException as err:  # Ctrl-C included: never leave half a file where a model is expected
        target.unlink(missing_ok=True)  # it did not exist before: whatever is there now is ours
        if not isinstance(err, Exception):
            raise
        raise CheckpointError(
            target, f"download of the official file {name!r} ({filename} from the hub repo {repo}) failed "
                    f"({type(err).__name__}: {err}); put {filename} at this path by hand") from None
    if progress is not None:
        progress(1.0, desc=f"downloaded {name}")
    return target


def _accepts_keyword(function, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _reporting_tqdm(progress, desc: str):
    """A tqdm class for huggingface_hub's ``tqdm_class`` that also reports bytes to ``progress``.

    It counts bytes itself: a bar that huggingface_hub disables (no terminal) does not count."""
    try:
        from huggingface_hub.utils import tqdm as base  # keeps the hub's own disable switches
    except ImportError:
        from tqdm import tqdm as base

    class ReportingTqdm(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.reported_bytes = kwargs.get("initial") or 0

        def update(self, n=1):
            self.reported_bytes += n or 0
            total = getattr(self, "total", None)
            if total:
                progress(min(1.0, self.reported_bytes / total),
                         desc=f"{desc}: {self.reported_bytes / 2**20:.0f} of {total / 2**20:.0f} MiB")
            return super().update(n)

    return ReportingTqdm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mvar.checkpoints", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert an official .pth file to our safetensors format")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--kind", choices=["tokenizer", "transformer"], required=True)
    convert.add_argument("--preset", default=None, help="transformer preset (default: inferred from shapes)")
    info = sub.add_parser("info", help="print the metadata of one of our files")
    info.add_argument("path")
    download = sub.add_parser("download", help="download an official file (needs a network)")
    download.add_argument("name", choices=sorted(OFFICIAL_FILES))
    download.add_argument("--models-dir", default="models")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert_official(args.src, args.dst, args.kind, args.preset)
            print(f"wrote {args.dst}")
        elif args.command == "info":
            print(json.dumps(read_metadata(args.path), indent=2))
        else:
            print(download_official(args.name, args.models_dir))
    except (CheckpointError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
