"""Reading ``torch.save`` files without running, importing or changing anything on a file's behalf.

The official VAR and MVAR scripts write checkpoints with ``torch.save`` of a dict that may hold, beside the
weights, pickled objects of their own classes (the run's ``args``, optimiser state). They load them with
``weights_only=False``, which lets a file run arbitrary code. We never hand a file to Python's or torch's
unpickler at all. :func:`load_without_code` reads every file, whatever it holds, with this module's own
interpreter of the pickle opcodes, in which a file can only describe data:

- A global the file names (``GLOBAL`` / ``STACK_GLOBAL``) is never imported nor looked up: it becomes a
  :class:`GlobalRef`, a name and nothing else.
- Calling a global (``REDUCE``, ``INST``, ``OBJ``) runs one of our own builders for the few things a
  checkpoint is made of: dense tensors over the file's own storages (``torch._utils._rebuild_tensor_v2`` and
  its relatives), ``OrderedDict``, ``set``, ``frozenset``, ``bytes``, ``bytearray``, ``complex``,
  ``torch.Size``, ``torch.device``, numpy scalars and arrays. Each checks its arguments and builds a new
  object. A call of anything else of a module that is installed here (``os.system``, ``builtins.eval``,
  ``builtins.setattr``, ...) is refused: a plain weights file never needs one. A call of a global whose
  module is not installed (the official ``Args``) gives an :class:`InertObject` that records the arguments.
- Creating an object (``NEWOBJ``, ``NEWOBJ_EX``) gives an :class:`InertObject` of that class name.
- ``BUILD``, ``SETITEM(S)``, ``APPEND(S)`` and ``ADDITEMS`` act only on objects this file created: its
  inert records, dicts, lists and sets. Aimed at a global (setting ``collections.Counter.most_common`` or
  a function's ``__defaults__``), they are refused before anything happens; nothing a file names can be
  reached from here, so nothing outside the result can change.
- Persistent ids must name a storage record of the file's own archive, with the size the archive holds.
  Tensors are views of the memory-mapped file (zip format) and must lie within their storage.
- Tuples may nest at most :data:`MAX_TUPLE_NESTING` deep (hashing a 200000-deep tuple crashes CPython).

Refusals raise :class:`FileRefused` (a ``pickle.UnpicklingError``), damaged or unsupported files
:class:`FileDamaged` (a ``ValueError``); callers turn both into errors naming the file. Messages quote
values from the file in at most about 80 characters (:func:`quote`).
"""

from __future__ import annotations

import _compat_pickle
import importlib.util
import itertools
import mmap
import pickle
import pickletools
import re
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

MAX_PICKLE_BYTES = 128 * 2**20  # an official training checkpoint's pickle is a few MB; its tensors are elsewhere
MAX_PICKLE_OPS = 4_000_000  # opcodes per pickle (a d30 training checkpoint, optimiser state included, has ~10**5)
MAX_MEMO = 1_000_000  # memo entries per pickle (each costs ~100 bytes; official files use ~10**4)
MAX_NAME_CHARS = 512  # module / class names a file may use ("module.name" of any real class is far shorter)
MAX_TUPLE_NESTING = 100  # CPython hashes nested tuples recursively in C: 200000 levels crash the process
MAX_TENSOR_DIMS = 64  # torch's own limit on tensor dimensions
MAX_TEXT_LINE = 2**20  # protocol-0 opcodes read up to a newline: no line of a sane pickle is longer
QUOTE_CHARS = 80  # messages quote a value from a file in at most this many characters

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of torch's pre-zip format
LEGACY_PROTOCOL_VERSION = 1001
STORAGE_TYPES = {  # torch.<name> storage globals in persistent ids -> dtype of their elements
    **{name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()
       if not name.startswith(("QInt", "QUInt"))},
    "UntypedStorage": torch.uint8,
}


class FileRefused(pickle.UnpicklingError):
    """The file asks to call something installed here, or to set or change something it did not create."""


class FileDamaged(ValueError):
    """Not a well-formed ``torch.save`` file, or one holding something this reader does not build."""


# ---------------------------------------------------------------------------------------------
# What a file's globals and unknown objects become
# ---------------------------------------------------------------------------------------------


class GlobalRef:
    """A global a file names (``module.name``): a name only. Nothing is imported or looked up."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<global {quote(self.dotted)}>"


class InertObject:
    """An object of a class that is not loaded: its constructor arguments and state, kept as plain data."""

    __slots__ = ("origin", "args", "kwargs", "state", "items", "elements")

    def __init__(self, origin: str, args: tuple = (), kwargs: dict | None = None):
        self.origin = origin  # "module.name" of the class it stands for
        self.args, self.kwargs = args, kwargs or {}
        self.state = None  # what BUILD gave it
        self.items: dict = {}  # what SETITEM(S) gave it (dict subclasses)
        self.elements: list = []  # what APPEND(S) gave it (list subclasses)

    def fields(self) -> dict:
        """The recorded attributes: a pickled object's ``__dict__`` (or its dict-like items)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | type(None)):
            state = {**(state[0] or {}), **(state[1] if isinstance(state[1], dict) else {})}  # (dict, slots)
        return {**self.items, **(state if isinstance(state, dict) else {})}

    def __repr__(self) -> str:
        return f"<inert {quote(self.origin)}>"


class StorageRef:
    """One storage record of the file, typed as a persistent id declared it."""

    __slots__ = ("key", "dtype", "numel", "untyped")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, untyped: torch.UntypedStorage):
        self.key, self.dtype, self.numel, self.untyped = key, dtype, numel, untyped

    def __repr__(self) -> str:
        return f"<storage {quote(self.key)}: {self.numel} x {self.dtype}>"


class _NumpyDtype:
    """``numpy.dtype(name, align, copy)`` as a file gives it (a BUILD adds the byte order)."""

    __slots__ = ("name", "state")

    def __init__(self, name: str):
        self.name, self.state = name, None

    def resolve(self):
        import numpy

        order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else "="
        if order not in ("<", ">", "=", "|"):
            raise FileDamaged(f"numpy dtype with byte order {quote(order)}")
        dtype = numpy.dtype(self.name)
        return dtype.newbyteorder(order) if order in "<>" else dtype


class _NumpyArray:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` + BUILD (version, shape, dtype, fortran, raw)."""

    __slots__ = ("state",)

    def __init__(self):
        self.state = None


# ---------------------------------------------------------------------------------------------
# Short, safe quotes of values from a file
# ---------------------------------------------------------------------------------------------


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """A value read from a file, for a message: at most ``limit`` characters; never raises, never walks deep
    structures, never renders a huge number or string whole."""
    try:
        text = _render(value, limit, 0)
    except Exception:  # noqa: BLE001 - a message must never fail because of what it quotes
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: max(limit - 3, 1)] + "..."


def _render(value, limit: int, depth: int) -> str:
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 256:
            return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
        return repr(int(value))
    if isinstance(value, float | complex):
        return repr(value)
    if isinstance(value, str):
        return repr(value[: limit + 1])
    if isinstance(value, bytes | bytearray):
        return repr(bytes(value[: limit + 1]))
    if isinstance(value, GlobalRef):
        return value.dotted[: limit + 1]
    if isinstance(value, InertObject):
        return f"<{value.origin[:limit]} object>"
    if torch.is_tensor(value):
        return f"<tensor of shape {_render(tuple(value.shape), limit, depth)}>"
    if isinstance(value, list | tuple | set | frozenset | dict):
        opening, closing = {list: "[]", tuple: "()", dict: "{}"}.get(type(value), "{}")
        if isinstance(value, set | frozenset):
            opening = f"{type(value).__name__}({{"
            closing = "})"
        if depth >= 2 or not value:
            return opening + ("..." if value else "") + closing
        entries = value.items() if isinstance(value, dict) else value
        parts, used = [], len(opening) + len(closing)
        for entry in itertools.islice(entries, 16):
            if isinstance(value, dict):
                part = f"{_render(entry[0], limit, depth + 1)}: {_render(entry[1], limit, depth + 1)}"
            else:
                part = _render(entry, limit, depth + 1)
            if used + len(part) > limit:
                parts.append("...")
                break
            parts.append(part)
            used += len(part) + 2
        else:
            if len(value) > 16:
                parts.append("...")
        if isinstance(value, tuple) and len(value) == 1 and parts != ["..."]:
            parts[0] += ","
        return opening + ", ".join(parts) + closing
    return f"<{type(value).__name__}>"


def short_error(err: BaseException, limit: int = 200) -> str:
    """``str(err)`` cut to ``limit`` characters (third-party errors may quote a file's content)."""
    try:
        text = str(err)
    except Exception:  # noqa: BLE001
        text = type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The interpreter
# ---------------------------------------------------------------------------------------------


class _Window:
    """A file-like view of bytes for ``pickletools.genops``: reads never ask for more than is there."""

    def __init__(self, buffer, position: int = 0):
        self.buffer, self.position = buffer, position

    def read(self, n: int = -1) -> bytes:
        end = len(self.buffer) if n is None or n < 0 else min(len(self.buffer), self.position + n)
        data = bytes(self.buffer[self.position:end])
        self.position = end
        return data

    def readline(self) -> bytes:
        end = self.buffer.find(b"\n", self.position, self.position + MAX_TEXT_LINE)
        end = min(len(self.buffer), self.position + MAX_TEXT_LINE) if end < 0 else end + 1
        return self.read(end - self.position)

    def tell(self) -> int:
        return self.position


def module_is_importable(module: str) -> bool:
    """Whether the top-level package of ``module`` exists here, found without importing anything."""
    top = module.split(".")[0]
    if not top.isidentifier():
        return False
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _own(value) -> bool:
    return isinstance(value, InertObject | _NumpyDtype | _NumpyArray)


class _Interpreter:
    """Runs one pickle's opcodes over data and the file's own records only (see the module doc)."""

    def __init__(self, window: _Window, persistent_load=None):
        self.window = window
        self.persistent_load = persistent_load
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict[int, object] = {}
        self.nesting: dict[int, tuple[int, object]] = {}  # id of each tuple / frozenset -> (depth, the object)

    # -- helpers ---------------------------------------------------------------------------------

    def pop_mark(self) -> list:
        if not self.metastack:
            raise FileDamaged("a pickle opcode needs a MARK that is not there")
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def pop(self):
        if not self.stack:
            raise FileDamaged("a pickle opcode needs a value that is not there")
        return self.stack.pop()

    def top(self):
        if not self.stack:
            raise FileDamaged("a pickle opcode needs a value that is not there")
        return self.stack[-1]

    def nested(self, kind: type, items) -> tuple | frozenset:
        """A tuple / frozenset of ``items``, refused when nested deeper than MAX_TUPLE_NESTING."""
        depth = 1 + max((self.nesting.get(id(i), (0,))[0] for i in items
                         if isinstance(i, tuple | frozenset)), default=0)
        if depth > MAX_TUPLE_NESTING:
            raise FileDamaged(f"tuples nested deeper than {MAX_TUPLE_NESTING} levels")
        value = kind(items)
        if value:  # () and frozenset() are shared singletons: their depth is 1 wherever they are
            self.nesting[id(value)] = (depth, value)
        return value

    def global_ref(self, module, name) -> GlobalRef:
        if not isinstance(module, str) or not isinstance(name, str):
            raise FileDamaged("a global whose module or name is not a string")
        if len(module) > MAX_NAME_CHARS or len(name) > MAX_NAME_CHARS:
            raise FileDamaged(f"a global name longer than {MAX_NAME_CHARS} characters ({quote(module + '.' + name)})")
        # Python 2 names, as pickle's fix_imports reads them (__builtin__.set is builtins.set)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        return GlobalRef(module, name)

    # -- the opcodes -----------------------------------------------------------------------------

    def load(self):
        try:
            for count, (opcode, arg, position) in enumerate(pickletools.genops(self.window)):
                if count >= MAX_PICKLE_OPS or len(self.memo) > MAX_MEMO:
                    raise FileDamaged(f"a pickle of more than {MAX_PICKLE_OPS} opcodes or {MAX_MEMO} memo entries")
                try:
                    result = self.step(opcode.name, arg)
                except (FileRefused, FileDamaged) as err:
                    raise type(err)(f"{err} (pickle opcode {opcode.name} at byte {position})") from None
                if opcode.name == "STOP":
                    return result
        except (FileRefused, FileDamaged):
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error, EOFError,
                RecursionError, AssertionError) as err:  # genops' reading errors, unhashable keys, ...
            raise FileDamaged(f"damaged pickle ({type(err).__name__}: {short_error(err, 120)})") from None
        raise FileDamaged("the pickle ends before its STOP opcode")

    def step(self, op: str, arg):  # noqa: C901, PLR0912, PLR0915 - one branch per opcode, as pickle.py
        stack = self.stack
        if op in ("PROTO", "FRAME"):
            if op == "PROTO" and not 0 <= arg <= pickle.HIGHEST_PROTOCOL:
                raise FileDamaged(f"unsupported pickle protocol {quote(arg)}")
        elif op in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
                    "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES",
                    "BINBYTES8", "STRING", "BINSTRING", "SHORT_BINSTRING"):
            stack.append(arg)
        elif op == "BYTEARRAY8":
            stack.append(bytearray(arg))
        elif op == "NONE":
            stack.append(None)
        elif op == "NEWTRUE":
            stack.append(True)
        elif op == "NEWFALSE":
            stack.append(False)
        elif op == "EMPTY_LIST":
            stack.append([])
        elif op == "EMPTY_DICT":
            stack.append({})
        elif op == "EMPTY_SET":
            stack.append(set())
        elif op == "EMPTY_TUPLE":
            stack.append(())
        elif op == "MARK":
            self.metastack.append(stack)
            self.stack = []
        elif op == "POP":
            if stack:
                stack.pop()
            else:
                self.pop_mark()
        elif op == "POP_MARK":
            self.pop_mark()
        elif op == "DUP":
            stack.append(self.top())
        elif op == "TUPLE":
            items = self.pop_mark()
            self.stack.append(self.nested(tuple, items))
        elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(op[-1])
            if len(stack) < count:
                raise FileDamaged("a pickle opcode needs a value that is not there")
            items = stack[-count:]
            del stack[-count:]
            stack.append(self.nested(tuple, items))
        elif op == "LIST":
            items = self.pop_mark()
            self.stack.append(items)
        elif op == "DICT":
            items = self.pop_mark()
            if len(items) % 2:
                raise FileDamaged("DICT with an odd number of keys and values")
            self.stack.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})
        elif op == "FROZENSET":
            items = self.pop_mark()
            self.stack.append(self.nested(frozenset, items))
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise FileDamaged(f"memo entry {quote(arg)} read before it was written")
            stack.append(self.memo[arg])
        elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not isinstance(arg, int) or arg < 0:
                raise FileDamaged("negative memo index")
            self.memo[arg] = self.top()
        elif op == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif op == "APPEND":
            value = self.pop()
            self.extend(self.top(), [value])
        elif op == "APPENDS":
            items = self.pop_mark()
            self.extend(self.top(), items)
        elif op == "SETITEM":
            value, key = self.pop(), self.pop()
            self.set_items(self.top(), [key, value])
        elif op == "SETITEMS":
            items = self.pop_mark()
            self.set_items(self.top(), items)
        elif op == "ADDITEMS":
            items = self.pop_mark()
            target = self.top()
            if type(target) is not set:
                self.not_ours(target, "adds set items to")
            target.update(items)
        elif op == "GLOBAL":
            module, _, name = arg.partition(" ")
            stack.append(self.global_ref(module, name))
        elif op == "STACK_GLOBAL":
            name, module = self.pop(), self.pop()
            stack.append(self.global_ref(module, name))
        elif op in ("EXT1", "EXT2", "EXT4"):
            raise FileDamaged("copyreg extension codes are not supported")
        elif op == "REDUCE":
            args = self.pop()
            stack[-1:] = [self.call(self.top(), args)]
        elif op == "INST":
            module, _, name = arg.partition(" ")
            args = tuple(self.pop_mark())
            self.stack.append(self.call(self.global_ref(module, name), args))
        elif op == "OBJ":
            items = self.pop_mark()
            if not items:
                raise FileDamaged("OBJ without a class")
            self.stack.append(self.call(items[0], tuple(items[1:])))
        elif op == "NEWOBJ":
            args = self.pop()
            stack[-1:] = [self.new_object(self.top(), args, {})]
        elif op == "NEWOBJ_EX":
            kwargs, args = self.pop(), self.pop()
            stack[-1:] = [self.new_object(self.top(), args, kwargs)]
        elif op == "BUILD":
            state = self.pop()
            self.build(self.top(), state)
        elif op in ("PERSID", "BINPERSID"):
            pid = arg if op == "PERSID" else self.pop()
            if self.persistent_load is None:
                raise FileDamaged("a persistent id outside a torch archive")
            stack.append(self.persistent_load(pid))
        elif op in ("NEXT_BUFFER", "READONLY_BUFFER"):
            raise FileDamaged("out-of-band pickle buffers are not supported")
        elif op == "STOP":
            result = self.pop()
            if self.stack or self.metastack:
                raise FileDamaged("values left over at the pickle's STOP")
            return result
        else:  # an opcode pickletools knows and this reader does not
            raise FileDamaged(f"unsupported pickle opcode {op}")
        return None

    # -- what opcodes may do to objects ----------------------------------------------------------

    def not_ours(self, target, action: str):
        if isinstance(target, GlobalRef):
            raise FileRefused(f"the file {action} {quote(target.dotted)}, a class or function of a module; "
                              "a file may only build its own data")
        raise FileDamaged(f"the file {action} a {type(target).__name__} value, which pickle never does")

    def extend(self, target, items: list) -> None:
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, InertObject):
            target.elements.extend(items)
        else:
            self.not_ours(target, "appends to")

    def set_items(self, target, items: list) -> None:
        if len(items) % 2:
            raise FileDamaged("SETITEMS with an odd number of keys and values")
        if type(target) in (dict, OrderedDict):
            holder = target
        elif isinstance(target, InertObject):
            holder = target.items
        else:
            self.not_ours(target, "sets items of")
        for i in range(0, len(items), 2):
            holder[items[i]] = items[i + 1]

    def build(self, target, state) -> None:
        if _own(target):
            target.state = state
        elif type(target) is OrderedDict:  # torch's state dicts carry `_metadata`: not needed, dropped
            parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
            if not all(part is None or isinstance(part, dict) for part in parts):
                raise FileDamaged("the state of an OrderedDict is not a dict")
        else:
            self.not_ours(target, "sets attributes of")

    def new_object(self, cls, args, kwargs):
        if not isinstance(cls, GlobalRef):
            raise FileDamaged(f"NEWOBJ of {quote(cls)}, which is not a class the file named")
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise FileDamaged("NEWOBJ arguments that are not a tuple (and a dict)")
        return InertObject(cls.dotted, args, kwargs)

    def call(self, function, args):
        if not isinstance(function, GlobalRef):
            raise FileDamaged(f"the file calls {quote(function)}, which is not a global it named")
        if not isinstance(args, tuple):
            raise FileDamaged(f"arguments of {quote(function.dotted)} that are not a tuple")
        builder = BUILDERS.get(function.dotted)
        if builder is not None:
            return builder(self, args)
        if function.module.split(".")[0] == "torch" and function.name.startswith("_rebuild"):
            raise FileDamaged(f"{quote(function.dotted)}: only dense tensors are read")
        if module_is_importable(function.module):
            raise FileRefused(f"the file calls {quote(function.dotted)} to load, which could run code; only "
                              "tensors, plain data and objects of classes that are not installed here are read")
        return InertObject(function.dotted, args)  # the class is not installed here: record what it was given


# ---------------------------------------------------------------------------------------------
# Builders: what a call of a known global builds, from checked arguments
# ---------------------------------------------------------------------------------------------


def _count(name: str, value, high: int = 2**62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise FileDamaged(f"{name} is {quote(value)}; expected an integer in 0..{high}")
    return value


def _dims(name: str, value) -> tuple[int, ...]:
    if not isinstance(value, tuple | list | torch.Size) or len(value) > MAX_TENSOR_DIMS:
        raise FileDamaged(f"{name} is {quote(value)}; expected at most {MAX_TENSOR_DIMS} integers")
    return tuple(_count(name, v) for v in value)


def _tensor(storage, offset, size, stride) -> torch.Tensor:
    if not isinstance(storage, StorageRef):
        raise FileDamaged(f"a tensor over {quote(storage)}, which is not a storage of the file")
    offset, size, stride = _count("storage offset", offset), _dims("size", size), _dims("stride", stride)
    if len(size) != len(stride):
        raise FileDamaged(f"a tensor of size {quote(size)} with strides {quote(stride)}")
    end = offset if 0 in size else offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if end > storage.numel:
        raise FileDamaged(f"a tensor of size {quote(size)} reaches element {end} of storage "
                          f"{quote(storage.key)}, which holds {storage.numel}")
    return torch.empty((0,), dtype=storage.dtype).set_(storage.untyped, offset, size, stride)


def _rebuild_tensor_v2(reader, args):
    if len(args) not in (6, 7):  # storage, offset, size, stride, requires_grad, hooks[, metadata]
        raise FileDamaged(f"_rebuild_tensor_v2 with {len(args)} arguments")
    return _tensor(*args[:4])  # requires_grad, backward hooks and metadata: not needed to read weights


def _rebuild_tensor(reader, args):
    if len(args) != 4:
        raise FileDamaged(f"_rebuild_tensor with {len(args)} arguments")
    return _tensor(*args)


def _rebuild_parameter(reader, args):
    if len(args) not in (3, 4) or not torch.is_tensor(args[0]):  # data, requires_grad, hooks[, state]
        raise FileDamaged("_rebuild_parameter without a tensor")
    return torch.nn.Parameter(args[0], requires_grad=False)


TENSOR_TYPES = {"torch.Tensor": False, "torch.nn.parameter.Parameter": True}


def _rebuild_from_type_v2(reader, args):
    if len(args) != 4 or not isinstance(args[0], GlobalRef) or not isinstance(args[1], GlobalRef):
        raise FileDamaged("_rebuild_from_type_v2 without a function and a type")
    function, new_type, inner = args[:3]
    if new_type.dotted not in TENSOR_TYPES or function.dotted not in TENSOR_BUILDERS:
        raise FileDamaged(f"a tensor of type {quote(new_type.dotted)}: only plain tensors and parameters are read")
    if not isinstance(inner, tuple):
        raise FileDamaged("_rebuild_from_type_v2 arguments that are not a tuple")
    tensor = TENSOR_BUILDERS[function.dotted](reader, inner)
    return torch.nn.Parameter(tensor, requires_grad=False) if TENSOR_TYPES[new_type.dotted] else tensor


def _ordered_dict(reader, args):
    if args == ():
        return OrderedDict()
    if len(args) == 1 and isinstance(args[0], list | tuple):
        if not all(isinstance(p, list | tuple) and len(p) == 2 for p in args[0]):
            raise FileDamaged("OrderedDict of items that are not pairs")
        return OrderedDict(args[0])
    raise FileDamaged(f"OrderedDict{quote(args)}")


def _items_of(name: str, args) -> tuple:
    if args == ():
        return ()
    if len(args) == 1 and isinstance(args[0], list | tuple | set | frozenset):
        return tuple(args[0])
    raise FileDamaged(f"{name}{quote(args)}")


def _set(reader, args):
    return set(_items_of("set", args))


def _frozenset(reader, args):
    return reader.nested(frozenset, _items_of("frozenset", args))


def _encode(reader, args):  # protocol 2 writes bytes as _codecs.encode(text, "latin1")
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    raise FileDamaged(f"_codecs.encode{quote(args)}")


def _bytes(reader, args):
    if args == ():
        return b""
    if len(args) == 1 and isinstance(args[0], bytes):
        return args[0]
    raise FileDamaged(f"bytes{quote(args)}")


def _bytearray(reader, args):
    return bytearray(_bytes(reader, args))


def _complex(reader, args):
    if 1 <= len(args) <= 2 and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        return complex(*(float(a) for a in args))
    raise FileDamaged(f"complex{quote(args)}")


def _size(reader, args):
    if len(args) == 1:
        return torch.Size(_dims("torch.Size", args[0]))
    raise FileDamaged(f"torch.Size{quote(args)}")


def _device(reader, args):
    if 1 <= len(args) <= 2 and isinstance(args[0], str) and len(args[0]) <= 32 and (
            len(args) == 1 or (isinstance(args[1], int) and not isinstance(args[1], bool) and 0 <= args[1] < 2**16)):
        try:
            return torch.device(*args)
        except (RuntimeError, ValueError, TypeError):
            pass
    raise FileDamaged(f"torch.device{quote(args)}")


def _reconstructor(reader, args):  # protocol 0/1: copyreg._reconstructor(cls, object, state)
    if len(args) == 3 and isinstance(args[0], GlobalRef) and isinstance(args[1], GlobalRef):
        return InertObject(args[0].dotted, () if args[2] is None else (args[2],))
    raise FileDamaged(f"copyreg._reconstructor{quote(args)}")


NUMPY_NAME = re.compile(r"^[biufc]\d{1,2}$")


def _numpy_dtype(reader, args):
    if 1 <= len(args) <= 3 and isinstance(args[0], str) and NUMPY_NAME.match(args[0]):
        return _NumpyDtype(args[0])
    return InertObject("numpy.dtype", args)  # object, string, record dtypes: kept as a record, never built


def _numpy_scalar(reader, args):
    if len(args) == 2 and isinstance(args[0], _NumpyDtype) and isinstance(args[1], bytes):
        try:
            import numpy

            return numpy.frombuffer(args[1], dtype=args[0].resolve(), count=1)[0].item()
        except (ImportError, TypeError, ValueError) as err:
            raise FileDamaged(f"numpy scalar: {short_error(err, 80)}") from None
    raise FileDamaged("numpy scalar without a numeric dtype and its bytes")


def _numpy_reconstruct(reader, args):
    if len(args) == 3 and isinstance(args[0], GlobalRef) and args[0].dotted == "numpy.ndarray":
        return _NumpyArray()
    raise FileDamaged("numpy _reconstruct of something other than an ndarray")


TENSOR_BUILDERS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
}
BUILDERS = {
    **TENSOR_BUILDERS,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _set,
    "builtins.frozenset": _frozenset,
    "builtins.bytes": _bytes,
    "builtins.bytearray": _bytearray,
    "builtins.complex": _complex,
    "_codecs.encode": _encode,
    "torch.Size": _size,
    "torch.device": _device,
    "copyreg._reconstructor": _reconstructor,
    "numpy.dtype": _numpy_dtype,
    **{f"numpy.{core}.multiarray.scalar": _numpy_scalar for core in ("core", "_core")},
    **{f"numpy.{core}.multiarray._reconstruct": _numpy_reconstruct for core in ("core", "_core")},
}


# ---------------------------------------------------------------------------------------------
# Files: torch's zip format and its legacy format
# ---------------------------------------------------------------------------------------------


def _storage_id(pid, length: int) -> tuple:
    """('storage', storage type, key, location, numel[, view metadata]) -> (dtype, key, numel, rest)."""
    if not isinstance(pid, tuple) or len(pid) != length:
        raise FileDamaged(f"persistent id {quote(pid)} is not a storage id of {length} entries")
    kind, storage_type, key, location, numel = pid[:5]
    if not isinstance(kind, str | bytes) or kind not in ("storage", b"storage"):
        raise FileDamaged(f"persistent id of kind {quote(kind)}; only storages are read")
    if not isinstance(storage_type, GlobalRef) or storage_type.module not in ("torch", "torch.cuda") \
            or storage_type.name not in STORAGE_TYPES:
        raise FileDamaged(f"storage of type {quote(storage_type)}: not a storage type this reader knows")
    if not isinstance(key, str) or not 0 < len(key) <= 64 or "/" in key or "\\" in key:
        raise FileDamaged(f"storage key {quote(key)}")
    if not isinstance(location, str | bytes) or len(location) > 64:
        raise FileDamaged(f"storage location {quote(location)}")
    return STORAGE_TYPES[storage_type.name], key, _count("storage size", numel), pid[5:]


def _load_archive(path: Path, handle, size: int):
    """torch.save's zip format: ``<name>/data.pkl`` and one ``<name>/data/<key>`` record per storage."""
    try:
        archive = zipfile.ZipFile(handle)
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError,
            OverflowError, struct.error) as err:
        raise FileDamaged(f"damaged zip archive ({short_error(err, 120)})") from None
    records = {info.filename: info for info in infos}
    pickles = [name for name in records if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(records) != len(infos) or len(pickles) != 1:
        raise FileDamaged("not a torch.save archive (expected one <name>/data.pkl and unique record names)")
    prefix = pickles[0][: -len("data.pkl")]

    def read_record(name: str, limit: int) -> bytes:
        try:
            with archive.open(records[name]) as record:
                data = record.read(limit + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError,
                struct.error) as err:
            raise FileDamaged(f"record {quote(name)} unreadable ({short_error(err, 120)})") from None
        if len(data) > limit:
            raise FileDamaged(f"record {quote(name)} is larger than {limit} bytes")
        return data

    if prefix + "byteorder" in records:
        order = read_record(prefix + "byteorder", 16)
        if order != b"little":
            raise FileDamaged(f"byte order {quote(order)}: only little-endian files are read")
    data = read_record(pickles[0], MAX_PICKLE_BYTES)
    storages: dict[str, tuple[int, torch.UntypedStorage]] = {}
    whole: list[torch.UntypedStorage] = []

    def record_storage(key: str, nbytes: int) -> torch.UntypedStorage:
        info = records.get(f"{prefix}data/{key}")
        if info is None:
            raise FileDamaged(f"storage {quote(key)} is not in the archive")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1 or info.file_size != info.compress_size:
            raise FileDamaged(f"storage {quote(key)} is compressed or encrypted; torch.save stores them plain")
        if info.file_size != nbytes:
            raise FileDamaged(f"storage {quote(key)} is declared as {nbytes} bytes; the archive holds "
                              f"{info.file_size}")
        handle.seek(info.header_offset)
        header = handle.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise FileDamaged(f"storage {quote(key)}: damaged zip header")
        start = info.header_offset + 30 + sum(struct.unpack("<HH", header[26:30]))
        if start + nbytes > size:
            raise FileDamaged(f"storage {quote(key)} reaches past the end of the file")
        if nbytes == 0:
            return torch.UntypedStorage(0)
        if not whole:  # the file, mapped copy-on-write: tensors are views of it, nothing is read up front
            whole.append(torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size))
        return whole[0][start:start + nbytes]

    def persistent_load(pid) -> StorageRef:
        dtype, key, numel, _ = _storage_id(pid, 5)
        nbytes = numel * dtype.itemsize
        if key not in storages:
            storages[key] = (nbytes, record_storage(key, nbytes))
        elif storages[key][0] != nbytes:
            raise FileDamaged(f"storage {quote(key)} is declared with two different sizes")
        return StorageRef(key, dtype, numel, storages[key][1])

    return _Interpreter(_Window(data), persistent_load).load()


def _load_legacy(window: _Window, size: int):
    """torch.save's format before zip (``_use_new_zipfile_serialization=False``): pickles of the magic
    number, the protocol version, system info, the object and its storage keys, then each storage's bytes."""
    not_torch = "not a torch.save file (neither its zip format nor its legacy format)"
    try:
        magic = _Interpreter(window).load()
    except FileDamaged as err:
        raise FileDamaged(f"{not_torch}: {err}") from None
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        raise FileDamaged(not_torch)
    version = _Interpreter(window).load()
    if type(version) is not int or version != LEGACY_PROTOCOL_VERSION:
        raise FileDamaged("unknown legacy torch.save protocol version")
    info = _Interpreter(window).load()
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise FileDamaged("written on a big-endian machine: only little-endian files are read")
    storages: dict[str, StorageRef] = {}
    declared = 0

    def persistent_load(pid) -> StorageRef:
        nonlocal declared
        dtype, key, numel, (view,) = _storage_id(pid, 6)
        if view is not None:
            raise FileDamaged("legacy storage views are not supported")
        if key in storages:
            if storages[key].dtype != dtype or storages[key].numel != numel:
                raise FileDamaged(f"storage {quote(key)} is declared twice, differently")
            return storages[key]
        nbytes = numel * dtype.itemsize
        declared += nbytes
        if declared > size:  # each storage's bytes follow in the file: more than it holds is a lie
            raise FileDamaged("the storages declared are larger than the file")
        storages[key] = StorageRef(key, dtype, numel, torch.UntypedStorage(nbytes))
        return storages[key]

    result = _Interpreter(window, persistent_load).load()
    keys = _Interpreter(window).load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or sorted(keys) != sorted(storages):
        raise FileDamaged("the storage keys at the end do not match the storages the object uses")
    for key in keys:
        storage = storages[key]
        header = window.read(8)
        nbytes = storage.untyped.nbytes()
        if len(header) != 8 or struct.unpack("<q", header)[0] != storage.numel:
            raise FileDamaged(f"storage {quote(key)}: its size in the data does not match its declaration")
        data = window.read(nbytes)
        if len(data) != nbytes:
            raise FileDamaged(f"storage {quote(key)} is cut short (truncated file?)")
        if nbytes:
            target = torch.empty((0,), dtype=torch.uint8).set_(storage.untyped)
            target.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return result


def load_without_code(path: str | Path):
    """The object a ``torch.save`` file holds, its tensors on the CPU, read as the module doc describes.

    Raises :class:`FileRefused` if the file asks to call or change anything beyond its own data,
    :class:`FileDamaged` for a file that is not a well-formed ``torch.save`` file (or holds a kind of tensor
    this reader does not build), and ``OSError`` if it cannot be opened."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = path.stat().st_size
        if size == 0:
            raise FileDamaged("the file is empty")
        if handle.read(4) == b"PK\x03\x04":
            return _load_archive(path, handle, size)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _load_legacy(_Window(mapped), size)


# ---------------------------------------------------------------------------------------------
# Plain data
# ---------------------------------------------------------------------------------------------


class DataTooLarge(ValueError):
    """Auxiliary data nested too deep, or holding too many values, to copy as plain data."""


def plain_data(value, where: str = "value", max_depth: int = 16, max_values: int = 100_000):
    """JSON-friendly copy of loaded auxiliary data: inert objects become dicts of their fields.

    Raises :class:`DataTooLarge`, naming the place (``where`` and the path below it), for data nested deeper
    than ``max_depth`` (cycles included) or holding more than ``max_values`` values."""
    budget = [max_values]

    def field(path: str, key) -> str:
        name = key if isinstance(key, str) and len(key) <= 24 else quote(key, 24)
        joined = f"{path}.{name}" if isinstance(key, str) else f"{path}[{name}]"
        return joined if len(joined) <= QUOTE_CHARS else joined[:20] + "..." + joined[-(QUOTE_CHARS - 23):]

    def convert(item, depth: int, path: str):
        budget[0] -= 1
        if budget[0] < 0:
            raise DataTooLarge(f"{where} holds more than {max_values} values")
        if depth > max_depth:
            raise DataTooLarge(f"{path} is nested deeper than {max_depth} levels")
        if isinstance(item, InertObject):
            return {"__class__": item.origin, **{(k if isinstance(k, str) else quote(k)): convert(
                v, depth + 1, field(path, k)) for k, v in item.fields().items()}}
        if isinstance(item, dict):
            return {(k if isinstance(k, str) else quote(k)): convert(v, depth + 1, field(path, k))
                    for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [convert(v, depth + 1, field(path, i)) for i, v in enumerate(item)]
        if isinstance(item, bool | int | float | str) or item is None:
            return item
        if torch.is_tensor(item):
            number = item.item() if item.numel() == 1 else None
            return number if isinstance(number, bool | int | float) else f"tensor{tuple(item.shape)}"
        if isinstance(item, GlobalRef):
            return item.dotted
        if isinstance(item, _NumpyArray):
            return _numpy_array(item)
        if isinstance(item, _NumpyDtype):
            try:
                return str(item.resolve())
            except (ImportError, TypeError, ValueError, FileDamaged):
                return item.name
        return quote(item)

    return convert(value, 0, where)


def _numpy_array(record: _NumpyArray):
    """A small numeric numpy array as (nested) lists, a larger one as a description."""
    state = record.state
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _NumpyDtype)
            and isinstance(state[4], bytes) and isinstance(state[1], tuple)):
        return "numpy.ndarray"
    shape = _dims("numpy shape", state[1])
    try:
        import numpy

        dtype = state[2].resolve()
        count = 1
        for n in shape:
            count *= n
        if count > 4096 or count * dtype.itemsize != len(state[4]):
            return f"numpy.ndarray{shape}"
        return numpy.frombuffer(state[4], dtype=dtype).reshape(shape, order="F" if state[3] else "C").tolist()
    except (ImportError, TypeError, ValueError):
        return f"numpy.ndarray{shape}"
