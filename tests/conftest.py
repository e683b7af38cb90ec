"""Shared fixtures: tiny models with weights scrambled away from the near-identity init."""

from __future__ import annotations

import inspect
import pickle
import types

import pytest
import torch

from mvar.config import get_preset
from mvar.tokenizer import MultiScaleVQVAE
from mvar.transformer import ScaleTransformer

from .tiny_data import image_folder  # noqa: F401 (the tests' 12-class image folder, a fixture)

torch.set_num_threads(2)


def scramble(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random weights of a healthy size everywhere, so that every block matters in a test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_preset():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_preset):
    return scramble(MultiScaleVQVAE(tiny_preset.tokenizer), seed=1)


@pytest.fixture(scope="session")
def tiny_transformer(tiny_preset):
    return scramble(ScaleTransformer(tiny_preset.transformer), seed=2)


def random_tokens(schedule_patch_nums, vocab: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, p * p), generator=generator) for p in schedule_patch_nums]


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory):
    """The app's tiny test models as files (tok.safetensors, mvar.safetensors with class names), made once."""
    from .app_server import save_tiny_models

    folder = tmp_path_factory.mktemp("tiny-models")
    save_tiny_models(folder)
    return folder


def registry_of(folder, **kwargs):
    """A registry offering only the tiny models of ``folder`` under the key "tiny"."""
    from app.registry import ModelEntry, ModelRegistry

    entry = ModelEntry("tiny", "tiny test models", "local", str(folder / "tok.safetensors"),
                       str(folder / "mvar.safetensors"))
    return ModelRegistry(None, assets_dir=folder / "no-assets", extra=[entry], **kwargs)


@pytest.fixture
def ram_dir(tmp_path):
    """A folder in RAM when the machine has one: the d16 tests write files of 1.2 GB."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(dir=shm, prefix="mvar-test-"))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path


def fake_spaces(calls: list) -> types.ModuleType:
    """A stand-in for ``spaces``: GPU(duration=...) records the call and pickles what crosses the boundary."""
    module = types.ModuleType("spaces")

    def GPU(duration=None):  # noqa: N802 - the real name
        def decorate(fn):
            calls.append(("decorated", fn.__name__, duration))
            crossed = lambda value: pickle.loads(pickle.dumps(value))  # noqa: E731

            if inspect.isgeneratorfunction(fn):
                def worker(*args, **kwargs):
                    calls.append(("call", fn.__name__))
                    for item in fn(*crossed(args), **crossed(kwargs)):
                        yield crossed(item)
            else:
                def worker(*args, **kwargs):
                    calls.append(("call", fn.__name__))
                    return crossed(fn(*crossed(args), **crossed(kwargs)))
            return worker
        return decorate

    module.GPU = GPU
    return module
