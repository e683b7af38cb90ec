"""What each loaded transformer was trained for, and the labels the page shows for it.

The labels follow the file, not the entry's name: a transformer trained with VAR's attention and run
with MVAR's is called exactly that, and the baseline note says how the two sides of a pairing relate
only when a file's card or an official release says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mvar.checkpoints import OFFICIAL_FILES, official_name_of

MODES = ("var", "mvar", "untrained")

# How the official transformers were trained (the MVAR README and paper): the fine-tuned MVAR models start
# from the VAR release of the same depth, mvar-d16 and every VAR release from random weights.
OFFICIAL_TRAINING: dict[str, tuple[str, str | None]] = {
    # official name: (trained mode, official name of the starting weights; None = from scratch)
    **{name: ("var", None) for name in OFFICIAL_FILES if name.startswith("var-")},
    "mvar-d16": ("mvar", None),
    **{f"mvar-finetune-d{d}": ("mvar", f"var-d{d}") for d in (16, 20, 24)},
}


@dataclass(frozen=True)
class TrainedFor:
    """What one transformer file was trained for, as far as the file (or its official release) says."""

    name: str  # the file's name, for labels
    mode: str | None  # "var" | "mvar" | "untrained" (random weights) | None (not recorded)
    init_from: str | None = None  # name of the file it was fine-tuned from
    from_scratch: bool | None = None  # True: trained from random weights; None: not recorded

    def __post_init__(self):
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {self.mode!r}")


UNTRAINED = TrainedFor("random weights", "untrained")


def trained_for(loaded) -> TrainedFor:
    """The :class:`TrainedFor` of a ``mvar.checkpoints.LoadedModel`` (a transformer).

    The mode comes from the file (its card, or an official file's training mask as ``load_any`` reads it);
    an official release's file name adds where it started from, unless the file contradicts the release."""
    extra = loaded.extra or {}
    card = extra.get("card") if isinstance(extra.get("card"), dict) else {}
    mode = getattr(loaded, "trained_mode", None) or extra.get("trained_mode") or card.get("trained_mode")
    mode = mode if mode in ("var", "mvar") else None
    name = Path(loaded.path).name if loaded.path else "unnamed file"
    if "init_from" in card:  # our training cards: the file it was fine-tuned from, or null for from scratch
        init = card["init_from"]
        return TrainedFor(name, mode, Path(str(init)).name if init else None, init is None)
    release = OFFICIAL_TRAINING.get(official_name_of(name))
    if release is not None and mode in (None, release[0]):
        released_mode, start = release
        return TrainedFor(name, released_mode, OFFICIAL_FILES[start][1] if start else None, start is None)
    return TrainedFor(name, mode)


def _history(side: TrainedFor) -> str:
    if side.init_from:
        return f", fine-tuned from {side.init_from}"
    return ", trained from scratch" if side.from_scratch else ""


def mvar_label(side: TrainedFor) -> str:
    """What the MVAR column shows: the weights and whether they were trained for MVAR's attention."""
    if side.mode == "mvar":
        return f"MVAR: {side.name}, trained with MVAR attention{_history(side)}"
    if side.mode == "var":
        return f"VAR weights with MVAR attention, not trained for it ({side.name})"
    if side.mode == "untrained":
        return "random weights (untrained) with MVAR attention"
    return f"{side.name} with MVAR attention (the file does not say what it was trained for)"


def var_label(side: TrainedFor) -> str:
    """What the VAR column shows: the weights and whether they were trained for VAR's attention."""
    if side.mode == "var":
        return f"VAR: {side.name}, trained with VAR attention{_history(side)}"
    if side.mode == "mvar":
        return f"MVAR weights with VAR attention, not trained for it ({side.name})"
    if side.mode == "untrained":
        return "random weights (untrained) with VAR attention"
    return f"{side.name} with VAR attention (the file does not say what it was trained for)"


def baseline_note(mvar: TrainedFor, var: TrainedFor, same_weights: bool) -> str:
    """One sentence on what the VAR baseline is and how it relates to the MVAR side; true for every pairing."""
    if same_weights:
        note = "VAR baseline = the same weights run with VAR's block-causal attention and KV cache"
        if mvar.mode == "mvar":
            return note + " (they were trained for MVAR's attention, not VAR's)"
        if mvar.mode == "var":
            return note + " (they were trained for VAR's attention; the MVAR side was not)"
        return note
    note = f"VAR baseline = a separate checkpoint, {var.name}"
    if var.mode == "mvar":
        note += " (itself trained with MVAR attention)"
    if mvar.init_from == var.name:
        return note + f"; the MVAR side ({mvar.name}) was fine-tuned from it"
    if mvar.init_from:
        return note + f"; the MVAR side ({mvar.name}) was fine-tuned from {mvar.init_from}, not from it"
    if mvar.from_scratch:
        return note + f"; the MVAR side ({mvar.name}) was trained from scratch, not from it"
    return note + f"; how the MVAR side ({mvar.name}) relates to it is not recorded"
