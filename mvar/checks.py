"""Argument checks shared by the library: one readable ``ValueError`` per bad argument.

Library functions are strict: an integer argument takes ints (numpy ints too), never bools,
floats or strings, so a typo fails where it is made rather than deep inside a forward pass.
Messages name the argument and its valid range. Lenient conversion of user input (an emptied
number box, "3" from a dropdown) is the app's job, see ``app/handlers.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import numpy as np
import torch

_SHOWN_CHARS = 40  # a 600-digit int or a long string is cut in messages


def shown(value) -> str:
    """repr of a value, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _range_text(low, high, low_open: bool = False) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low}"
    if low is None:
        return f" <= {high}"
    return f" in {'(' if low_open else '['}{low}, {high}]"


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (None = unbounded), else ValueError naming ``name``."""
    where = f" in {low}..{high}" if low is not None and high is not None else _range_text(low, high)
    if not is_integer(value):
        raise ValueError(f"{name} must be an integer{where}, got {shown(value)} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer{where}, got {shown(value)}")
    return value


def real(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] ((low, high] with ``low_open``), else ValueError."""
    where = _range_text(low, high, low_open)
    if not is_real(value):
        raise ValueError(f"{name} must be a number{where}, got {shown(value)} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range is out of any finite bound
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number{where}, got {shown(value)}")
    too_low = low is not None and (number <= low if low_open else number < low)
    if too_low or (high is not None and number > high):
        raise ValueError(f"{name} must be a number{where}, got {shown(value)}")
    return number


def boolean(name: str, value) -> bool:
    """True/False (numpy bools too); 0, 1, "yes" and the rest are refused."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {shown(value)} ({type(value).__name__})")
    return bool(value)


def positive_integers(name: str, values) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (grid sides, batch sizes...)."""
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of positive integers, got {shown(values)}")
    items = tuple(values)
    if not items:
        raise ValueError(f"{name} must name at least one value")
    return tuple(integer(f"{name}[{i}]", v, low=1) for i, v in enumerate(items))


def _integer_items(values) -> list | None:
    """The items of a list-like (not a string, bytes or mapping) or of a 1-D integer tensor or array, else None."""
    if torch.is_tensor(values):
        integral = not (values.is_floating_point() or values.is_complex() or values.dtype == torch.bool)
        return values.tolist() if values.ndim == 1 and integral else None
    if isinstance(values, np.ndarray):
        return values.tolist() if values.ndim == 1 and np.issubdtype(values.dtype, np.integer) else None
    if isinstance(values, Iterable) and not isinstance(values, str | bytes | Mapping):
        return list(values)
    return None


def integers(name: str, values, low: int | None = None, high: int | None = None, item: str | None = None
             ) -> tuple[int, ...]:
    """A non-empty sequence of ints in [low, high]: a list, tuple or range, or a 1-D integer tensor or array.

    ``item`` names one value in messages (default ``name[i]``)."""
    items = _integer_items(values)
    if items is None:
        what = (f"a {type(values).__name__} of shape {tuple(values.shape)} and dtype {values.dtype}"
                if torch.is_tensor(values) or isinstance(values, np.ndarray)
                else f"{shown(values)} ({type(values).__name__})")
        raise ValueError(f"{name} must be a sequence of integers (a list, a tuple or a 1-D integer tensor), "
                         f"got {what}")
    if not items:
        raise ValueError(f"{name} must name at least one value")
    return tuple(integer(item or f"{name}[{i}]", value, low, high) for i, value in enumerate(items))


def instance(name: str, value, kind: type, examples: str = ""):
    """``value`` if it is a ``kind``, else a ValueError naming ``name`` (``examples``: how to make one)."""
    if not isinstance(value, kind):
        hint = f" ({examples})" if examples else ""
        article = "an" if kind.__name__[0] in "AEIOU" else "a"
        raise ValueError(f"{name} must be {article} {kind.__name__}{hint}, got {shown(value)} "
                         f"({type(value).__name__})")
    return value
