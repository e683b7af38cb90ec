"""Where the app's model work runs: directly on the server's device, or inside ZeroGPU calls.

On Hugging Face's ZeroGPU hardware a GPU is attached to the Space only while a function decorated
with ``@spaces.GPU(duration=...)`` runs (``duration``: the longest the call may take, in seconds; a
shorter one is scheduled sooner). The call runs in a worker process forked from the server, with
its arguments and results pickled across, and ``spaces.GPU`` accepts generator functions (each
yielded value crosses as it comes, so a generation still streams scale by scale). So:

* the models are held on the CPU (the registry's device) and moved onto the call's GPU inside it
  (in the worker: the server's copies stay on the CPU);
* the decorated functions take and give plain values (widget values in; numpy images, CPU tensors
  and dataclasses out), never the registry or a ``gr.Request``;
* what the page keeps between events (the generation store) is filled by the server, outside.

Where ``spaces`` is not importable, :meth:`GpuTasks.task` returns the function itself and the
models stay where the registry loaded them. Outside ZeroGPU, ``spaces.GPU`` itself is documented
as a no-op, so a Space on ordinary hardware with ``spaces`` installed runs the same way (its models
then move to the GPU at the first call, if it has one).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType

from mvar.devices import describe_device, resolve_device

GENERATE_SECONDS = 60  # ZeroGPU's default; a d16 generation takes a few seconds on a GPU
ANALYSIS_SECONDS = 90  # up to 16 samples in VAR mode with every layer's attention captured


def spaces_module() -> ModuleType | None:
    """The ``spaces`` package (Hugging Face Spaces) when it can be imported, else None."""
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def call_device() -> str:
    """The device of a call inside ``spaces.GPU``: its GPU ("cuda:0"), or the CPU where none is attached."""
    return str(resolve_device("auto"))


class GpuTasks:
    """Runs the handlers that use the models: inside ``spaces.GPU`` calls when ``spaces`` is given, else as they are.

    A task function takes a ``device`` keyword: None outside ZeroGPU (use the registry's device), the
    call's device inside a ZeroGPU call (move the models there first).
    """

    def __init__(self, spaces: ModuleType | None = None):
        self.spaces = spaces

    @classmethod
    def detect(cls, enabled: bool = True) -> GpuTasks:
        """ZeroGPU-style tasks when ``enabled`` and ``spaces`` imports; plain calls otherwise."""
        return cls(spaces_module() if enabled else None)

    @property
    def active(self) -> bool:
        return self.spaces is not None

    def task(self, duration: int):
        """Decorator: ``fn(*args, device=None, **kwargs)`` -> the same function run under
        ``spaces.GPU(duration=duration)`` with ``device`` set to the call's device; unchanged without ``spaces``."""
        if not isinstance(duration, int) or isinstance(duration, bool) or duration < 1:
            raise ValueError(f"duration must be a whole number of seconds >= 1, got {duration!r}")

        def decorate(fn):
            if self.spaces is None:
                return fn
            if inspect.isgeneratorfunction(fn):  # spaces.GPU must see a generator function to stream it
                @functools.wraps(fn)
                def on_gpu(*args, **kwargs):
                    yield from fn(*args, **{**kwargs, "device": call_device()})
            else:
                @functools.wraps(fn)
                def on_gpu(*args, **kwargs):
                    return fn(*args, **{**kwargs, "device": call_device()})
            return self.spaces.GPU(duration=duration)(on_gpu)

        return decorate

    def precisions(self) -> tuple[str, ...] | None:
        """Precisions on ZeroGPU's GPUs (fp16 and bf16 besides fp32); None outside ZeroGPU (ask the device)."""
        return ("fp32", "bf16", "fp16") if self.active else None

    def describe(self, hold_device) -> str:
        """The page's line: "running on cuda:0 (NVIDIA H200)", "running on CPU (2 threads)", or ZeroGPU's."""
        if self.active:
            return ("running on ZeroGPU: a GPU is attached for each generation and analysis "
                    f"(at most {GENERATE_SECONDS} s / {ANALYSIS_SECONDS} s); the models are held on the CPU")
        return f"running on {describe_device(hold_device)}"
