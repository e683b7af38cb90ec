"""Checkpoint files: our safetensors format, VAR's official .pth files, conversion and hub download.

Our format is a safetensors file whose metadata holds the model kind and its config (JSON),
plus free-form ``extra`` JSON (class names, sampling defaults, a model card), so a file loads
without knowing its config. Official ``.pth`` files are read by :mod:`mvar.inert_pickle`, which never runs,
imports or changes anything on a file's behalf.

Every error is a :class:`CheckpointError` (a ``ValueError``) that names the file and the problem; it quotes a
value from the file in at most about 80 characters. A config from a file (our metadata, an official file's
``config`` / ``args``, its tensor shapes) is checked against :data:`mvar.config.LIMITS` before any tensor is
allocated.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import checks
from .attention import block_causal_mask, block_diagonal_mask
from .config import (
    LIMITS,
    OFFICIAL_TOKENIZER,
    AttentionMode,
    TokenizerConfig,
    TransformerConfig,
    check_patch_nums,
    get_preset,
)
from .files import atomic_write
from .inert_pickle import (
    DataTooLarge,
    FileDamaged,
    FileRefused,
    load_without_code,
    plain_data,
    quote,
    short_error,
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

# Suggested sampling settings of the official READMEs (cfg, top_p, top_k): MVAR's per release file; VAR's
# one setting for all its models.
OFFICIAL_SAMPLING: dict[str, dict[str, float]] = {
    "mvar-d16": {"cfg": 2.7, "top_p": 0.99, "top_k": 1200},
    "mvar-finetune-d16": {"cfg": 2.0, "top_p": 0.99, "top_k": 1200},
    "mvar-finetune-d20": {"cfg": 1.5, "top_p": 0.96, "top_k": 900},
    "mvar-finetune-d24": {"cfg": 1.4, "top_p": 0.96, "top_k": 900},
    **{f"var-d{d}": {"cfg": 1.5, "top_p": 0.96, "top_k": 900} for d in (16, 20, 24, 30)},
}


def official_name_of(path) -> str | None:
    """The official name ("mvar-d16", "var-d20", ...) of a file named as the official release names it."""
    filename = Path(path).name
    return next((name for name, (_, official, _) in OFFICIAL_FILES.items() if official == filename), None)


class CheckpointError(ValueError):
    def __init__(self, path, problem: str):
        super().__init__(f"{_shown_path(path)}: {problem}")
        self.path, self.problem = str(path), problem


def _shown_path(path, limit: int = 160) -> str:
    """The path for a message: whole unless absurdly long, then its start and its end (the file name)."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:40]}...{text[-(limit - 43):]}"


@dataclass
class LoadedModel:
    kind: str
    model: torch.nn.Module
    config: TokenizerConfig | TransformerConfig
    extra: dict = field(default_factory=dict)
    path: str = ""

    @property
    def trained_mode(self) -> str | None:
        """"var" or "mvar": the attention a transformer file was trained with (our files' card, or an official
        file's entry name and training mask); None when the file does not say."""
        mode = self.extra.get("trained_mode")
        return mode if mode in ("var", "mvar") else None


# ---------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------


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
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


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
        raise CheckpointError(path, "not a readable safetensors file (truncated or corrupt?): "
                                    f"{short_error(err)}") from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(path, "safetensors file without MVAR Studio metadata (format/kind/config)")
    if "config" not in meta:
        raise CheckpointError(path, "metadata is damaged: it has no 'config'")
    parsed = {name: _json_field(path, name, meta.get(name, "{}")) for name in ("config", "extra")}
    if not isinstance(parsed["extra"], dict):
        raise CheckpointError(path, "metadata 'extra' is not a JSON object")
    return {**meta, **parsed}


def _json_field(path, name: str, text: str):
    """One JSON entry of our metadata, nested at most LIMITS["nesting"] levels."""
    limit = LIMITS["nesting"]
    try:
        value = json.loads(text)
    except RecursionError:
        raise CheckpointError(path, f"metadata {name!r} is nested deeper than {limit} levels") from None
    except ValueError as err:  # JSONDecodeError, or an integer of more than 4300 digits
        raise CheckpointError(path, f"metadata is damaged: {name!r} is not valid JSON ({short_error(err)})") from None
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                raise CheckpointError(path, f"metadata {name!r} is nested deeper than {limit} levels")
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


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
        raise CheckpointError(path, f"unknown model kind {quote(kind)}")
    if expect is not None and kind != expect:
        raise CheckpointError(path, f"expected a {expect} file, found a {kind} file")
    try:
        config = (TokenizerConfig if kind == "tokenizer" else TransformerConfig).from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(path, f"config in metadata is invalid: {short_error(err)}") from None
    saved = meta["extra"].get("attention")
    if isinstance(saved, dict):  # MVAR's kernel_size / refine_step as trained, checked like our own flags
        _check_attention(path, "extra.attention", saved)
    _check_model_size(path, config)
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(path, f"tensor data unreadable (truncated or corrupt?): {short_error(err)}") from None
    model = MultiScaleVQVAE.empty(config) if kind == "tokenizer" else ScaleTransformer.empty(config)
    _load_strict(path, model, state)
    return LoadedModel(kind, model.to(device).eval(), config, meta["extra"], str(path))


def _check_exists(path: Path) -> None:
    try:
        exists, regular = path.exists(), path.is_file()
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte
        raise CheckpointError(path, f"file not found ({short_error(err, 80)})") from None
    if not exists:
        raise CheckpointError(path, "file not found")
    if not regular:
        raise CheckpointError(path, "not a regular file")


def _check_model_size(path, config: TokenizerConfig | TransformerConfig) -> None:
    """Refuse a config whose model would hold more than LIMITS["model_elements"] weights and buffers, counted on
    the meta device (nothing is allocated). Each field is already within its own bound; this bounds them
    together (a width and a vocabulary that are each fine can still multiply to terabytes)."""
    with torch.device("meta"):
        probe = MultiScaleVQVAE(config) if isinstance(config, TokenizerConfig) else ScaleTransformer(
            config, initialize=False)
    elements = sum(t.numel() for t in itertools.chain(probe.parameters(), probe.buffers()))
    if elements > LIMITS["model_elements"]:
        raise CheckpointError(path, f"its config describes a model of {elements:,} weights; at most "
                                    f"{LIMITS['model_elements']:,} are loaded")


def _check_attention(path, where: str, saved: dict) -> dict:
    """MVAR's kernel_size / refine_step as a file states them, checked like our own flags."""
    saved = {name: saved[name] for name in ("refine_step", "kernel_size") if saved.get(name) is not None}
    try:
        AttentionMode.mvar(**saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(path, f"{where}: {short_error(err)}") from None
    return saved


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
            problems.append(f"{name}: expected shape {tuple(want.shape)}, found {quote(tuple(got.shape))}")
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
    shown = ", ".join(_name(name) for name in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"


def _name(key) -> str:
    """A key from a file as a message shows it: a short string as it is, anything else quoted short."""
    return key if isinstance(key, str) and len(key) <= 60 and key.isprintable() else quote(key, 60)


# ---------------------------------------------------------------------------------------------
# Official .pth files
# ---------------------------------------------------------------------------------------------

# Buffers that VAR's official transformer files carry but that we derive instead.
OFFICIAL_DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
ZERO_K_BIAS = ".attn.zero_k_bias"

# Where the official scripts put a model's state dict inside the dict they torch.save:
# release files {"mvar_wo_ddp": sd, ...}; training checkpoints {"epoch", "iter", "trainer": {"config",
# "mvar_wo_ddp" | "var_wo_ddp", "vae_local", "mvar_opt" | "var_opt"}, "args"}.
STATE_ENTRIES = {
    "transformer": ("mvar_wo_ddp", "var_wo_ddp"),
    "tokenizer": ("vae_wo_ddp", "vae_local"),
}
WRAPPER_ENTRIES = ("model", "state_dict", "module")  # other common checkpoint wrappers
# The run arguments we keep from an official checkpoint's ``args`` (the rest is paths and logging).
KEPT_ARGS = ("depth", "pn", "patch_nums", "kernel_size", "refine_step", "ratio_k", "ls", "ep", "bs", "tblr",
             "twd", "tclip", "alng", "fp16", "finetune_from_var", "saln", "anorm")


@dataclass
class OfficialFile:
    """What an official ``.pth`` file holds: the state dict and, for training checkpoints, plain-data copies
    of the trainer's ``config`` and the run's ``args`` (objects of unknown classes become dicts)."""

    state: dict[str, torch.Tensor]
    layout: str  # "state dict", "mvar_wo_ddp", "trainer.var_wo_ddp", ...
    config: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)

    @property
    def entry(self) -> str | None:
        """The official entry name the state dict came from (mvar_wo_ddp, var_wo_ddp, ...), if any."""
        name = self.layout.rsplit(".", 1)[-1]
        return name if any(name in names for names in STATE_ENTRIES.values()) else None


def read_official_file(path, kind: str | None = None) -> OfficialFile:
    """Read an official ``.pth`` file (any layout the official scripts write) without running code from it.

    ``kind`` ("tokenizer" / "transformer") picks the state dict in a training checkpoint that holds both;
    None takes the transformer's when present."""
    _check_kind("kind", kind, optional=True)
    path = Path(path)
    _check_exists(path)
    try:
        obj = load_without_code(path)
    except FileRefused as err:
        raise CheckpointError(
            path, "refused: loading it would execute code or change this program (not a plain weights file): "
                  f"{short_error(err)}") from None
    except (FileDamaged, RuntimeError, OSError) as err:
        raise CheckpointError(path, f"cannot be read, truncated or corrupt: {short_error(err)}") from None
    state, layout = _find_state_dict(path, obj, kind)
    trainer = obj.get("trainer") if isinstance(obj, dict) else None
    try:
        config = plain_data(trainer.get("config"), "trainer.config", LIMITS["nesting"]) \
            if isinstance(trainer, dict) else None
        args = plain_data(obj.get("args"), "args", LIMITS["nesting"]) if isinstance(obj, dict) else None
    except DataTooLarge as err:
        raise CheckpointError(path, str(err)) from None
    return OfficialFile(_strip_prefixes(state), layout, config if isinstance(config, dict) else {},
                        args if isinstance(args, dict) else {})


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items())


def _find_state_dict(path, obj, kind: str | None) -> tuple[dict, str]:
    if _is_state_dict(obj):
        return obj, "state dict"
    names = STATE_ENTRIES[kind] if kind else STATE_ENTRIES["transformer"] + STATE_ENTRIES["tokenizer"]
    if isinstance(obj, dict):
        trainer = obj.get("trainer")
        places = [(obj, ""), *([(trainer, "trainer.")] if isinstance(trainer, dict) else [])]
        for name in (*names, *WRAPPER_ENTRIES):
            for holder, prefix in places:
                if _is_state_dict(holder.get(name)):
                    return holder[name], prefix + name
    found = f"top-level entries {_preview(sorted(_name(k) for k in obj))}" if isinstance(obj, dict) \
        else type(obj).__name__
    expected = " or ".join(f"'{n}'" for n in names)
    raise CheckpointError(path, f"does not hold a {kind or 'model'} state dict (a mapping of names to tensors): "
                                f"found {found}; expected a plain state dict, or one under {expected} "
                                "(at the top level or in 'trainer', as the official scripts write them)")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes off every name."""
    stripped = {}
    for name, tensor in state.items():
        for prefix in ("module.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        stripped[name] = tensor
    return stripped


def read_official_state_dict(path, kind: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of an official ``.pth`` file, whatever its layout (see :func:`read_official_file`)."""
    return read_official_file(path, kind).state


def infer_transformer_config(state: dict[str, torch.Tensor], path="<state dict>",
                             patch_nums: tuple[int, ...] | None = None) -> TransformerConfig:
    """Read depth, width, heads, classes, vocab and Cvae off the tensor shapes.

    The schedule is ``patch_nums`` when the file states it (a training checkpoint's config / args), else the
    official 10-scale one, which the position table must then match."""
    try:
        width, latent = state["word_embed.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        heads = state["blocks.0.attn.scale_mul_1H11"].shape[1]
        num_classes = state["class_emb.weight"].shape[0] - 1
        vocab = state["head.weight"].shape[0]
        total = state["pos_1LC"].shape[1]
        hidden = state["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError, TypeError) as err:
        raise CheckpointError(path, f"not a VAR/MVAR transformer state dict (cannot read {short_error(err, 80)})"
                              ) from None
    schedule = ScaleSchedule(patch_nums or OFFICIAL_PATCH_NUMS)
    if total != schedule.total_tokens:
        if patch_nums:
            raise CheckpointError(path, f"the file's schedule {schedule.patch_nums} has {schedule.total_tokens} "
                                        f"positions, but its position table pos_1LC has {total}")
        raise CheckpointError(path, f"has {total} positions; only the official 10-scale schedule (680) "
                                    "can be inferred, name a preset for others")
    try:
        return TransformerConfig(depth=depth, width=width, num_heads=heads, mlp_ratio=hidden / max(width, 1),
                                 num_classes=num_classes, vocab_size=vocab, latent_channels=latent,
                                 patch_nums=schedule.patch_nums, drop_path_rate=min(1.0, 0.1 * depth / 24))
    except ValueError as err:
        raise CheckpointError(path, f"the tensor shapes give an invalid config: {short_error(err)}") from None


# The two training masks an official transformer file may carry, by the mode that trains with them.
TRAINING_MASKS = {"block-causal": block_causal_mask, "block-diagonal": block_diagonal_mask}


def training_mask_of(state: dict[str, torch.Tensor], patch_nums: tuple[int, ...], path="<state dict>") -> str | None:
    """Which training mask the file's ``attn_bias_for_masking`` buffer is: "block-causal" (VAR's),
    "block-diagonal" (MVAR's: each scale attends only to itself), or None when the file has none."""
    mask = state.get("attn_bias_for_masking")
    if mask is None:
        return None
    total = ScaleSchedule(patch_nums).total_tokens
    if mask.numel() != total * total:
        raise CheckpointError(path, f"buffer attn_bias_for_masking has shape {quote(tuple(mask.shape))}; expected "
                                    f"(1, 1, {total}, {total}) for the schedule {tuple(patch_nums)}")
    allowed = mask.reshape(total, total) == 0
    for name, build in TRAINING_MASKS.items():
        if torch.equal(allowed, build(patch_nums)):
            return name
    raise CheckpointError(path, "buffer attn_bias_for_masking is neither VAR's block-causal mask nor MVAR's "
                                "block-diagonal mask of the schedule (expected one of them: 0 where a token may "
                                "attend, -inf elsewhere)")


def transformer_from_official(state: dict[str, torch.Tensor], config: TransformerConfig | None = None,
                              path="<state dict>") -> ScaleTransformer:
    """Build a transformer from a state dict in the official VAR / MVAR layout, strictly.

    The official buffers are accounted for, not silently dropped: the level-index row must equal what the
    schedule implies, the training mask must be VAR's or MVAR's (:func:`training_mask_of`), and the key
    biases must be zero."""
    state = dict(state)
    config = config or infer_transformer_config(state, path)
    schedule = config.schedule
    levels = state.pop("lvl_1L", None)
    if levels is not None and not torch.equal(levels.reshape(-1).long(), schedule.scale_of_positions()):
        raise CheckpointError(path, "buffer lvl_1L does not match the scale schedule")
    training_mask_of(state, schedule.patch_nums, path)
    state.pop("attn_bias_for_masking", None)
    for name in [k for k in state if k.endswith(ZERO_K_BIAS)]:
        if torch.count_nonzero(state.pop(name)):
            raise CheckpointError(path, f"{_name(name)} should be all zeros")
    _check_model_size(path, config)
    model = ScaleTransformer.empty(config)
    _load_strict(path, model, state)
    return model.eval()


def official_transformer_state_dict(model: ScaleTransformer, mask: str = "block-causal") -> dict[str, torch.Tensor]:
    """Our transformer's weights in the official layout (buffers included): ``mask`` "block-causal" as
    var_dXX.pth holds them, "block-diagonal" as MVAR's training code writes its own."""
    if mask not in TRAINING_MASKS:
        raise ValueError(f"mask must be one of {sorted(TRAINING_MASKS)}, got {checks.shown(mask)}")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    schedule = model.schedule
    for i in range(model.cfg.depth):
        state[f"blocks.{i}{ZERO_K_BIAS}"] = torch.zeros(model.cfg.width)
    state["lvl_1L"] = schedule.scale_of_positions().unsqueeze(0)
    allowed = TRAINING_MASKS[mask](schedule.patch_nums)
    state["attn_bias_for_masking"] = torch.where(allowed, 0.0, float("-inf")).view(1, 1, *allowed.shape)
    return state


def _file_patch_nums(file: OfficialFile, path) -> tuple[int, ...] | None:
    """The schedule a training checkpoint states (trainer config, else args.patch_nums, else args.pn)."""
    for where, value in (("trainer.config.patch_nums", file.config.get("patch_nums")),
                         ("args.patch_nums", file.args.get("patch_nums")), ("args.pn", file.args.get("pn"))):
        if value is None:
            continue
        try:
            if isinstance(value, str):  # the official flag's spelling: "1_2_3_4_5_6_8_10_13_16"
                if len(value) > 4 * LIMITS["scales"]:
                    raise ValueError(f"{len(value)} characters, more than {LIMITS['scales']} scales can need")
                value = [int(v) for v in value.replace("-", "_").split("_")]
            return check_patch_nums(value, where)
        except (TypeError, ValueError) as err:
            raise CheckpointError(path, f"{where} is not a scale schedule ({quote(value)}): {short_error(err)}"
                                  ) from None
    return None


def _file_attention(file: OfficialFile, path) -> dict:
    """MVAR's kernel_size / refine_step from the run's args, checked like our own flags."""
    return _check_attention(path, "args", file.args)


def _trained_mode(entry: str | None, mask: str | None) -> str | None:
    """"mvar" for MVAR's own files (its entry name or its block-diagonal mask), "var" for VAR's."""
    if mask == "block-diagonal" or entry == "mvar_wo_ddp":
        return "mvar"
    if entry == "var_wo_ddp" or mask == "block-causal":
        return "var"
    return None


def load_official(path, kind: str, preset: str | None = None) -> LoadedModel:
    """Load an official ``.pth`` file of ``kind`` strictly, with what it says about its training in ``extra``.

    A transformer's config comes from its tensor shapes and, for training checkpoints, the schedule in its
    config / args (``preset`` overrides both); ``extra`` records the file's layout, the training mask it
    carries, the mode it was trained in, MVAR's kernel_size / refine_step when its args name them, and a few
    of its run arguments."""
    _check_kind("kind", kind)
    file = read_official_file(path, kind)
    extra = {"official_layout": file.layout}
    if kind == "tokenizer":
        model = _tokenizer_from_official(file.state, OFFICIAL_TOKENIZER, path)
        return LoadedModel(kind, model, model.cfg, extra, str(path))
    patch_nums = _file_patch_nums(file, path)
    config = get_preset(preset).transformer if preset else infer_transformer_config(file.state, path, patch_nums)
    _check_model_size(path, config)
    depth = file.args.get("depth")
    if isinstance(depth, int) and depth != config.depth:
        raise CheckpointError(path, f"args.depth is {quote(depth)}, but the weights have {config.depth} blocks")
    mask = training_mask_of(file.state, config.patch_nums, path)
    model = transformer_from_official(file.state, config, path)
    extra.update(trained_mode=_trained_mode(file.entry, mask), training_mask=mask)
    attention = _file_attention(file, path)
    if attention:
        extra["attention"] = attention
    kept = {name: file.args[name] for name in KEPT_ARGS if name in file.args}
    if kept:
        extra["official_args"] = kept
    if file.config:
        extra["official_config"] = file.config
    return LoadedModel(kind, model, config, extra, str(path))


def load_official_transformer(path, preset: str | None = None) -> ScaleTransformer:
    """Load var_dXX.pth / mvar-*.pth (any official layout) strictly; the config is inferred or named."""
    return load_official(path, "transformer", preset).model


def _tokenizer_from_official(state: dict[str, torch.Tensor], config: TokenizerConfig, path) -> MultiScaleVQVAE:
    state = dict(state)
    _check_model_size(path, config)
    model = MultiScaleVQVAE.empty(config)
    hits = state.get("quantize.ema_vocab_hit_SV")
    if hits is not None and hits.shape[0] != len(config.patch_nums):
        # a usage statistic tied to the training schedule; keep ours when the count differs
        state["quantize.ema_vocab_hit_SV"] = torch.zeros(len(config.patch_nums), config.vocab_size)
    _load_strict(path, model, state)
    return model.eval()


def load_official_tokenizer(path, config: TokenizerConfig = OFFICIAL_TOKENIZER) -> MultiScaleVQVAE:
    """Load vae_ch160v4096z32.pth (or a VAR training checkpoint's tokenizer) strictly."""
    return _tokenizer_from_official(read_official_state_dict(path, "tokenizer"), config, path)


def convert_official(src, dst, kind: str, preset: str | None = None, extra: dict | None = None) -> None:
    """Write an official .pth file (any layout) in our safetensors format, with what it says of its training."""
    loaded = load_official(src, kind, preset)
    card = {"converted_from": Path(src).name, **{k: v for k, v in loaded.extra.items() if v is not None}}
    save_model(dst, loaded.model, extra={**card, **(extra or {})})


def load_any(path, kind: str, device="cpu", preset: str | None = None) -> LoadedModel:
    """Load ours (.safetensors) or an official file (.pth) of the given kind ("tokenizer" or "transformer")."""
    _check_kind("kind", kind)
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_model(path, device, expect=kind)
    loaded = load_official(path, kind, preset)
    loaded.model.to(device)
    return loaded


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
            atomic_write(target, lambda tmp: shutil.copyfile(got, tmp))
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
