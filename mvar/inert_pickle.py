"""Reading ``torch.save`` files that hold more than tensors, without running any code from them.

The official VAR and MVAR scripts write checkpoints with ``torch.save`` of a dict that may hold, beside the
weights, pickled objects of their own classes (the run's ``args``, optimiser state). Such files are loaded
there with ``weights_only=False``, which lets a file run arbitrary code. We never do that:

1. ``torch.load(weights_only=True)`` first: tensors, containers and plain numbers only.
2. If the file names other globals, a second pass with :class:`InertUnpickler`. Globals on torch's
   weights-only allowlist (plus numpy's scalar and array constructors) resolve to the real objects; every
   other global becomes an :class:`InertObject` class that only records what it is given. Rebuilding an
   object of an unknown class (pickle's NEWOBJ) gives an inert record. *Calling* a global (pickle's REDUCE)
   is allowed only where nothing can run: the module is not even importable here. Calling anything of an
   importable module that is not allowlisted (``os.system``, ``builtins.eval``, ``subprocess.Popen``...)
   is refused. No module is ever imported on a file's behalf.

Refusals raise ``pickle.UnpicklingError``; callers turn them into errors naming the file.
"""

from __future__ import annotations

import functools
import importlib.util
import pickle
import types
import warnings
import zipfile
from pathlib import Path

import torch

# numpy's data constructors: an official run may have logged numpy scalars in its args.
NUMPY_DATA_GLOBALS = (
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
)


@functools.cache
def _allowed_globals() -> dict[str, object]:
    """``"module.name"`` -> object for the globals a file may use for real (torch's weights-only allowlist)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    for obj in torch.serialization.get_safe_globals():
        if not isinstance(obj, tuple):
            allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    try:
        import numpy
    except ImportError:
        return allowed
    for module_name, name in NUMPY_DATA_GLOBALS:
        module = _loaded_module(module_name, numpy)
        if module is not None and hasattr(module, name):
            allowed[f"{module_name}.{name}"] = getattr(module, name)
    return allowed


def _loaded_module(dotted: str, numpy) -> types.ModuleType | None:
    """A numpy submodule reached by attribute access from the imported package (never a new import)."""
    module = numpy
    with warnings.catch_warnings():  # numpy 2 warns on numpy.core, which old pickles still name
        warnings.simplefilter("ignore", DeprecationWarning)
        for part in dotted.split(".")[1:]:
            module = getattr(module, part, None)
            if module is None:
                return None
    return module


def module_is_importable(module: str) -> bool:
    """Whether the top-level package of ``module`` exists here, found without importing anything."""
    top = module.split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


class InertObject:
    """An object of a class that is not loaded: its constructor arguments and state, kept as plain data."""

    origin = "?"  # "module.name" of the class it stands for (set on each generated subclass)

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "state", None)
        object.__setattr__(obj, "items", {})
        object.__setattr__(obj, "elements", [])
        return obj

    def __init__(self, *args, **kwargs):  # a real class's __init__ would run code; ours records nothing more
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __setitem__(self, key, value):  # dict subclasses are rebuilt item by item
        self.items[key] = value

    def append(self, value):  # list subclasses are rebuilt element by element
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)

    def fields(self) -> dict:
        """The recorded attributes: a pickled object's ``__dict__`` (or its dict-like items)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | type(None)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) state
        return {**self.items, **(state if isinstance(state, dict) else {})}

    def __repr__(self) -> str:
        return f"<inert {self.origin}>"


class _InertClassMeta(type):
    def __call__(cls, *args, **kwargs):
        # pickle calls a global (REDUCE / INST / OBJ) to rebuild an object with a custom __reduce__: with the
        # real module present that would run its code, so only the globals of absent modules stay inert
        if module_is_importable(cls.origin):
            raise pickle.UnpicklingError(
                f"the file calls {cls.origin} to load, which could run code; only tensors, plain data and "
                "objects of classes that are not installed here are read")
        return super().__call__(*args, **kwargs)


@functools.cache
def inert_class(module: str, name: str) -> type:
    """The stand-in class for the global ``module.name`` (one per name, so isinstance checks line up)."""
    return _InertClassMeta(name, (InertObject,), {"origin": f"{module}.{name}", "__module__": "mvar.inert"})


class InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        real = _allowed_globals().get(f"{module}.{name}")
        return real if real is not None else inert_class(module, name)


def _load(file, **kwargs):
    return InertUnpickler(file, **kwargs).load()


def _loads(data: bytes, **kwargs):
    import io

    return InertUnpickler(io.BytesIO(data), **kwargs).load()


# torch.load takes a "pickle module": anything with an Unpickler class and load / loads functions
INERT_PICKLE_MODULE = types.SimpleNamespace(
    __name__="mvar.inert_pickle", Unpickler=InertUnpickler, load=_load, loads=_loads,
    UnpicklingError=pickle.UnpicklingError,
)


def load_without_code(path: str | Path):
    """``torch.load`` of a file onto the CPU, weights-only first, then with inert stand-ins (see module doc).

    Raises ``pickle.UnpicklingError`` if the file would run code, and torch's / zipfile's errors for a
    truncated or corrupt file."""
    mmap = zipfile.is_zipfile(path)  # torch.save's zip format maps without copying; legacy pickles can't
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": such files still load or are refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        pass  # globals outside the weights-only allowlist: read them as inert records
    return torch.load(str(path), map_location="cpu", weights_only=False, mmap=mmap,
                      pickle_module=INERT_PICKLE_MODULE)


def plain_data(value, depth: int = 0):
    """JSON-friendly copy of loaded auxiliary data: inert objects become dicts of their fields."""
    if depth > 8:
        return repr(value)
    if isinstance(value, InertObject):
        return {"__class__": value.origin, **{str(k): plain_data(v, depth + 1) for k, v in value.fields().items()}}
    if isinstance(value, dict):
        return {str(k): plain_data(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_data(v, depth + 1) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else f"tensor{tuple(value.shape)}"
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return repr(value)
