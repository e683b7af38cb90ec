"""Hostile checkpoint files: nothing in a file may call, set or change anything of the running program.

Each file is written by hand, opcode by opcode, in torch's zip layout (``<name>/data.pkl`` beside
``<name>/data/<key>`` storage records) or as a bare pickle. For each, the load is refused with a
:class:`CheckpointError` that names the file, and a snapshot of the objects a file could aim at
(``collections.Counter``, ``OrderedDict``, torch's rebuild functions, ``torch.Tensor``, ``builtins``,
``os.environ``, ``sys.path``, ``sys.modules``...) is the same afterwards. Then the loader's limits:
configs beyond :data:`mvar.config.LIMITS` and deeply nested data are refused naming the file and the
field, and no message echoes more than about 80 characters of a value from the file.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import encodings.cp437  # noqa: F401 - zipfile imports it on first use to decode record names: not the file's doing
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mvar.inert_pickle as inert
from mvar.checkpoints import (
    CheckpointError,
    load_any,
    load_model,
    official_transformer_state_dict,
    read_official_file,
    save_model,
)
from mvar.config import LIMITS, AttentionMode, TokenizerConfig, TransformerConfig
from mvar.inert_pickle import MAX_TUPLE_NESTING, load_without_code

# ----- writing pickles by hand -----------------------------------------------------------------


def glob(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def number(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def tup(*parts: bytes) -> bytes:
    return pickle.MARK + b"".join(parts) + pickle.TUPLE


def dict_of(**items: bytes) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(text(k) + v for k, v in items.items()) + pickle.SETITEMS


def slot_state(**items: bytes) -> bytes:
    """BUILD's (dict state, slot state) pair: pickle's load_build calls setattr for each slot item."""
    return pickle.NONE + dict_of(**items) + pickle.TUPLE2


def program(*parts: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + b"".join(parts) + pickle.STOP


def storage_id(key: str, numel: int, storage_type: bytes = glob("torch", "FloatStorage")) -> bytes:
    return tup(text("storage"), storage_type, text(key), text("cpu"), number(numel)) + pickle.BINPERSID


def tensor(pid: bytes, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    return glob("torch._utils", "_rebuild_tensor_v2") + tup(
        pid, number(offset), tup(*map(number, size)), tup(*map(number, stride)), pickle.NEWFALSE,
        glob("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE) + pickle.REDUCE


def write_archive(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A file in torch.save's zip layout with the given data.pkl and storage records."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", b"little")
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", b"3\n")
    return path


# ----- what a file could aim at ----------------------------------------------------------------


def _ids(mapping) -> dict:
    return {key: id(value) for key, value in mapping.items()}


def snapshot() -> dict:
    """The state of every object a hostile file names, by identity and by value where it is plain."""
    rebuild = torch._utils._rebuild_tensor_v2
    return {
        "Counter": _ids(vars(collections.Counter)), "OrderedDict": _ids(vars(OrderedDict)),
        "rebuild defaults": rebuild.__defaults__, "rebuild code": rebuild.__code__,
        "rebuild dict": dict(rebuild.__dict__), "rebuild globals": id(rebuild.__globals__),
        "torch._utils": _ids(vars(torch._utils)), "parameter defaults": torch._utils._rebuild_parameter.__defaults__,
        "Tensor": _ids(vars(torch.Tensor)), "Parameter": _ids(vars(torch.nn.Parameter)),
        "builtins": _ids(vars(builtins)), "environ": dict(os.environ), "sys.path": list(sys.path),
        "modules": set(sys.modules), "copyreg": (dict(copyreg.dispatch_table), dict(copyreg._extension_registry)),
        "torch": _ids(vars(torch)), "collections": _ids(vars(collections)),
    }


SETATTR_COUNTER = (glob("builtins", "setattr") +
                   tup(glob("collections", "Counter"), text("most_common"), pickle.NONE) + pickle.REDUCE)

HOSTILE = {
    # BUILD on globals: classes, functions and their __defaults__ / __code__ / __globals__ / __dict__
    "build-counter-slots": (glob("collections", "Counter") + slot_state(most_common=pickle.NONE) + pickle.BUILD,
                            "sets attributes of 'collections.Counter'"),
    "build-counter-dict": (glob("collections", "Counter") + dict_of(most_common=pickle.NONE) + pickle.BUILD,
                           "sets attributes of 'collections.Counter'"),
    "build-defaults": (glob("torch._utils", "_rebuild_tensor_v2") +
                       slot_state(__defaults__=tup(text("poisoned"))) + pickle.BUILD,
                       "sets attributes of 'torch._utils._rebuild_tensor_v2'"),
    "build-code": (glob("torch._utils", "_rebuild_tensor_v2") +
                   slot_state(__code__=glob("torch._utils", "_rebuild_parameter")) + pickle.BUILD,
                   "sets attributes of 'torch._utils._rebuild_tensor_v2'"),
    "build-globals": (glob("torch._utils", "_rebuild_tensor_v2") +
                      dict_of(__globals__=pickle.EMPTY_DICT, marker=number(1)) + pickle.BUILD,
                      "sets attributes of 'torch._utils._rebuild_tensor_v2'"),
    "build-tensor-class": (glob("torch", "Tensor") + slot_state(__add__=pickle.NONE) + pickle.BUILD,
                           "sets attributes of 'torch.Tensor'"),
    "build-dotted-name": (pickle.PROTO + b"\x04" + text("collections") + text("Counter.most_common") +
                          pickle.STACK_GLOBAL + dict_of(__defaults__=pickle.NONE) + pickle.BUILD,
                          "sets attributes of 'collections.Counter.most_common'"),
    # items and elements of globals
    "setitem-environ": (glob("os", "environ") + text("MVAR_PWNED") + text("1") + pickle.SETITEM,
                        "sets items of 'os.environ'"),
    "setitems-modules": (glob("sys", "modules") + pickle.MARK + text("json") + pickle.NONE + pickle.SETITEMS,
                         "sets items of 'sys.modules'"),
    "append-path": (glob("sys", "path") + text("/tmp/evil") + pickle.APPEND, "appends to 'sys.path'"),
    "appends-path": (glob("sys", "path") + pickle.MARK + text("/tmp/evil") + pickle.APPENDS,
                     "appends to 'sys.path'"),
    "additems-global": (glob("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + number(1) + pickle.ADDITEMS,
                        "adds set items to 'torch._utils._rebuild_tensor_v2'"),
    # calls
    "reduce-setattr": (SETATTR_COUNTER, "calls 'builtins.setattr'"),
    "reduce-getattr": (glob("builtins", "getattr") + tup(glob("collections", "Counter"), text("most_common")) +
                       pickle.REDUCE, "calls 'builtins.getattr'"),
    "reduce-counter": (glob("collections", "Counter") + tup(dict_of(a=number(1))) + pickle.REDUCE,
                       "calls 'collections.Counter'"),
    "inst-counter": (pickle.MARK + pickle.INST + b"collections\nCounter\n" + dict_of(most_common=pickle.NONE) +
                     pickle.BUILD, "calls 'collections.Counter'"),
    "obj-parameter": (pickle.MARK + glob("torch.nn.parameter", "Parameter") + pickle.OBJ +
                      dict_of(data=pickle.NONE) + pickle.BUILD, "calls 'torch.nn.parameter.Parameter'"),
    "reduce-rebuild-with-hooks": (glob("torch._utils", "_rebuild_tensor_v2") +
                                  tup(number(0), number(0), pickle.EMPTY_TUPLE, pickle.EMPTY_TUPLE,
                                      pickle.NEWFALSE, glob("os", "system")) + pickle.REDUCE,
                                  "not a storage of the file"),
    # new objects of allowlisted / installed classes, with state: inert records, the classes untouched
    "inst-ordereddict-state": (pickle.MARK + pickle.INST + b"collections\nOrderedDict\n" +
                               dict_of(__class__=glob("collections", "Counter")) + pickle.BUILD,
                               "does not hold a transformer state dict"),
    "newobj-counter-state": (glob("collections", "Counter") + pickle.EMPTY_TUPLE + pickle.NEWOBJ +
                             slot_state(most_common=pickle.NONE) + pickle.BUILD,
                             "does not hold a transformer state dict"),
    "newobj-ex-tensor-state": (glob("torch", "Tensor") + pickle.EMPTY_TUPLE + dict_of(requires_grad=pickle.NEWTRUE) +
                               pickle.NEWOBJ_EX + slot_state(__class__=glob("os", "system")) + pickle.BUILD,
                               "does not hold a transformer state dict"),
    # persistent ids that point elsewhere
    "pid-missing-key": (tensor(storage_id("7", 4), (4,), (1,)), "storage '7' is not in the archive"),
    "pid-short-tuple": (tup(text("storage")) + pickle.BINPERSID, "is not a storage id of 5 entries"),
    "pid-not-a-tuple": (text("storage") + pickle.BINPERSID, "is not a storage id"),
    "pid-module-kind": (tup(text("module"), glob("os", "system"), text("0"), text("cpu"), number(4)) +
                        pickle.BINPERSID, "persistent id of kind 'module'"),
    "pid-storage-type": (storage_id("0", 4, glob("os", "system")), "not a storage type this reader knows"),
    "pid-traversal": (storage_id("../../etc/passwd", 4), "storage key '../../etc/passwd'"),
    "pid-too-large": (storage_id("0", 2**40), "declared as 4398046511104 bytes; the archive holds 16"),
    "pid-negative": (storage_id("0", -1), "storage size is -1"),
    "tensor-past-storage": (tensor(storage_id("0", 4), (100,), (1,)), "reaches element 100 of storage '0'"),
    "tensor-offset-past-storage": (tensor(storage_id("0", 4), (2, 2), (2, 1), offset=3),
                                   "reaches element 7 of storage '0'"),
    # a tuple key nested 200000 deep: hashing it would crash CPython
    "deep-tuple-key": (pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * 200_000 + pickle.NONE +
                       pickle.SETITEM, f"tuples nested deeper than {MAX_TUPLE_NESTING} levels"),
    "odd-protocol-0-persid": (pickle.PERSID + b"0\n", "not a storage id"),
    "extension-code": (pickle.EXT1 + b"\x01", "extension codes are not supported"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_and_changes_nothing(tmp_path, name):
    body, message = HOSTILE[name]
    data = body + pickle.STOP if body.startswith(pickle.PROTO) else program(body)  # protocol 4 brings its own
    path = write_archive(tmp_path / f"{name}.pth", data, {"0": bytes(16)})
    before = snapshot()
    with pytest.raises(CheckpointError) as err:
        load_any(path, "transformer")
    assert snapshot() == before
    assert err.value.path == str(path) and f"{name}.pth" in str(err.value)
    assert message in str(err.value)
    assert collections.Counter("abca").most_common(1) == [("a", 2)]
    assert torch._utils._rebuild_tensor_v2.__defaults__ == (None,)


@pytest.mark.parametrize("name", ["build-counter-slots", "build-defaults", "setitem-environ", "append-path",
                                  "reduce-setattr", "deep-tuple-key"])
def test_a_hostile_bare_pickle_is_refused_and_changes_nothing(tmp_path, name):
    """The same files as a bare pickle (read as torch's legacy format, whose first pickle is checked first)."""
    path = tmp_path / f"{name}.pth"
    path.write_bytes(program(HOSTILE[name][0]))
    before = snapshot()
    with pytest.raises(CheckpointError, match=f"{name}.pth") as err:
        read_official_file(path)
    assert snapshot() == before
    assert HOSTILE[name][1] in str(err.value)


def test_refusals_say_code_or_changes_and_damage_says_corrupt(tmp_path):
    for name, words in (("build-defaults", "would execute code or change this program"),
                        ("reduce-setattr", "would execute code or change this program"),
                        ("pid-missing-key", "truncated or corrupt")):
        path = write_archive(tmp_path / f"{name}.pth", program(HOSTILE[name][0]), {"0": bytes(16)})
        with pytest.raises(CheckpointError, match=words):
            load_any(path, "transformer")


def test_the_attack_of_the_report_inside_a_real_checkpoint(tmp_path, tiny_transformer, monkeypatch):
    """issue 20: a .pth whose pickle sets Counter.most_common and _rebuild_tensor_v2.__defaults__ beside real
    weights. Torch's unpickler is never used (torch.load is replaced by a trap), the attack is refused and both
    objects are as they were."""
    path = tmp_path / "poisoned.pth"
    torch.save({"mvar_wo_ddp": official_transformer_state_dict(tiny_transformer), "args": "PLACEHOLDER"}, path)
    attack = (glob("collections", "Counter") + slot_state(most_common=pickle.NONE) + pickle.BUILD + pickle.POP +
              glob("torch._utils", "_rebuild_tensor_v2") + slot_state(__defaults__=tup(text("poisoned"))) +
              pickle.BUILD)
    splice(path, text("PLACEHOLDER"), attack)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not read a file"))
    before = snapshot()
    with pytest.raises(CheckpointError, match="poisoned.pth: refused: .*sets attributes of 'collections.Counter'"):
        load_any(path, "transformer")
    assert snapshot() == before


def splice(path: Path, placeholder: bytes, replacement: bytes) -> None:
    """Replace one piece of a torch.save file's data.pkl (keeping its storage records)."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in records if n.endswith("/data.pkl"))
    assert records[name].count(placeholder) == 1
    records[name] = records[name].replace(placeholder, replacement)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for record, data in records.items():
            archive.writestr(record, data)


# ----- honest files read exactly as torch reads them -------------------------------------------


def same(a, b, where="") -> None:
    assert type(a) is type(b), (where, type(a), type(b))
    if torch.is_tensor(a):
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_honest_files_read_as_torch_reads_them(tmp_path, zip_format, protocol):
    base = torch.arange(24.0).reshape(4, 6)
    state = OrderedDict(f32=base, f16=base.half(), bf16=base.bfloat16(), i64=torch.arange(5),
                        flags=torch.tensor([True, False]), u8=torch.arange(3, dtype=torch.uint8),
                        c64=torch.ones(2, dtype=torch.complex64), f64=torch.ones(2, dtype=torch.float64),
                        scalar=torch.tensor(3.5), empty=torch.zeros(0, 4), view=base[1:, ::2], transposed=base.t(),
                        param=torch.nn.Parameter(torch.ones(2)))
    obj = {"state": state, "epoch": 3, "data": [1, 2.5, "x", b"raw", bytearray(b"ba"), {1, 2}, frozenset({3}),
                                                (1, (2, 3)), None, True, complex(1, 2), 2**100, torch.Size([2, 3])],
           "device": torch.device("cpu"),
           "optimiser": torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).state_dict()}
    path = tmp_path / "honest.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format, pickle_protocol=protocol)
    same(torch.load(path, weights_only=False), load_without_code(path))  # our own file: trusted here


def test_a_truncated_legacy_file_is_damaged_not_half_read(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(100.0)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="legacy.pth: cannot be read, truncated or corrupt.*cut short"):
        read_official_file(path)


# ----- limits before allocation ----------------------------------------------------------------


def rewrite_metadata(path: Path, **changes) -> None:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    save_file(state, str(path), metadata={**meta, **changes})


def config_json(model, **fields) -> str:
    import json
    data = json.loads(model.cfg.to_json())
    data.update(fields)
    return json.dumps(data)


@pytest.fixture
def never_allocates(monkeypatch):
    """Building a model from a refused config is an error of the test: the check must come first."""
    from mvar.tokenizer import MultiScaleVQVAE
    from mvar.transformer import ScaleTransformer

    def trap(cls, *args, **kwargs):
        raise AssertionError("a model was allocated before its config was checked")
    monkeypatch.setattr(ScaleTransformer, "empty", classmethod(trap))
    monkeypatch.setattr(MultiScaleVQVAE, "empty", classmethod(trap))


TRANSFORMER_FIELDS = {
    "vocab_size": 2**31, "width": 10**6, "depth": 10**5, "num_heads": 4096, "num_classes": 10**9,
    "latent_channels": 10**7, "mlp_ratio": 10**6, "patch_nums": list(range(1, 101)),
}
TOKENIZER_FIELDS = {
    "vocab_size": 2**31, "image_size": 10**6, "channels": 2**20, "channel_mult": [1] * 100,
    "num_res_blocks": 10**6, "num_phi": 10**6, "latent_channels": 10**7,
}


@pytest.mark.parametrize("kind,field", [("transformer", f) for f in TRANSFORMER_FIELDS] +
                         [("tokenizer", f) for f in TOKENIZER_FIELDS])
def test_a_config_beyond_the_limits_is_refused_before_allocation(tmp_path, tiny_transformer, tiny_tokenizer,
                                                                 never_allocates, kind, field):
    model = tiny_transformer if kind == "transformer" else tiny_tokenizer
    path = tmp_path / f"{kind}-{field}.safetensors"
    save_model(path, model)
    value = (TRANSFORMER_FIELDS if kind == "transformer" else TOKENIZER_FIELDS)[field]
    rewrite_metadata(path, config=config_json(model, **{field: value}))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert f"{kind}-{field}.safetensors" in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("patch_nums,message", [([1, 2, 500], "patch_nums\\[2\\] must be an integer in 1..128"),
                                                 (list(range(1, 65)), "tokens over all scales")])
def test_schedule_sides_and_tokens_are_bounded(tmp_path, tiny_transformer, never_allocates, patch_nums, message):
    path = tmp_path / "schedule.safetensors"
    save_model(path, tiny_transformer)
    rewrite_metadata(path, config=config_json(tiny_transformer, patch_nums=patch_nums))
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_fields_within_bounds_that_multiply_to_terabytes_are_refused(tmp_path, tiny_transformer, never_allocates):
    path = tmp_path / "huge.safetensors"
    save_model(path, tiny_transformer)
    rewrite_metadata(path, config=config_json(tiny_transformer, width=8192, num_heads=64, depth=128,
                                              vocab_size=2**17))
    with pytest.raises(CheckpointError, match="huge.safetensors: its config describes a model of .* weights"):
        load_model(path)


def test_every_official_model_and_preset_is_within_the_limits():
    from mvar.checkpoints import _check_model_size
    from mvar.config import OFFICIAL_TOKENIZER, PRESETS, official_transformer

    d36 = TransformerConfig(depth=36, width=2304, num_heads=36, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
    for config in (d36, OFFICIAL_TOKENIZER, *(official_transformer(d) for d in (16, 20, 24, 30)),
                   *(p.transformer for p in PRESETS.values()), *(p.tokenizer for p in PRESETS.values()),
                   TokenizerConfig(image_size=512, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32))):
        _check_model_size("official", config)  # raises if not
    assert AttentionMode.mvar(refine_step=8, kernel_size=7)


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("entry", ["config", "extra"])
@pytest.mark.parametrize("depth", [LIMITS["nesting"] + 1, 100_000])
def test_deeply_nested_metadata_is_refused_naming_the_entry(tmp_path, tiny_transformer, entry, depth):
    path = tmp_path / "nested.safetensors"
    save_model(path, tiny_transformer)
    value = (config_json(tiny_transformer, patch_nums=f"@{depth}@").replace(f'"@{depth}@"', nested_json(depth))
             if entry == "config" else '{"card": ' + nested_json(depth) + "}")
    rewrite_metadata(path, **{entry: value})
    with pytest.raises(CheckpointError, match=f"nested.safetensors: metadata '{entry}' is nested deeper than "):
        load_model(path)


def test_an_integer_of_thousands_of_digits_in_metadata_is_damage_not_a_crash(tmp_path, tiny_transformer):
    path = tmp_path / "digits.safetensors"
    save_model(path, tiny_transformer)
    rewrite_metadata(path, config=config_json(tiny_transformer).replace('"depth": 2', '"depth": ' + "9" * 5000))
    with pytest.raises(CheckpointError, match="digits.safetensors: metadata is damaged: 'config' is not valid JSON"):
        load_model(path)


def official_file_with_args(path: Path, model, args_pickle: bytes) -> Path:
    """A training checkpoint {"trainer": {"mvar_wo_ddp": weights}, "args": <hand-written pickle>}."""
    torch.save({"trainer": {"mvar_wo_ddp": official_transformer_state_dict(model, "block-diagonal")},
                "args": "PLACEHOLDER"}, path)
    splice(path, text("PLACEHOLDER"), args_pickle)
    return path


def nested_lists(depth: int) -> bytes:
    """[[[...]]] ``depth`` deep, built without recursion: push the lists, then append each to the one below."""
    return pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)


@pytest.mark.parametrize("depth", [LIMITS["nesting"] + 2, 100_000])
def test_deeply_nested_official_args_are_refused_naming_the_field(tmp_path, tiny_transformer, depth):
    path = official_file_with_args(tmp_path / "deep-args.pth", tiny_transformer,
                                   dict_of(extra=nested_lists(depth)))
    with pytest.raises(CheckpointError, match=r"deep-args.pth: args.extra\[0\].* is nested deeper than 16 levels"):
        load_any(path, "transformer")


def test_cyclic_official_args_are_refused_not_looped(tmp_path, tiny_transformer):
    cycle = pickle.EMPTY_LIST + pickle.BINPUT + b"\xf0" + pickle.BINGET + b"\xf0" + pickle.APPEND
    path = official_file_with_args(tmp_path / "cycle.pth", tiny_transformer, dict_of(loop=cycle))
    with pytest.raises(CheckpointError, match="cycle.pth: args.loop.* is nested deeper"):
        load_any(path, "transformer")


@pytest.mark.parametrize("args,message", [
    (dict_of(pn=text("1_" * 1000 + "2")), "args.pn is not a scale schedule"),
    (dict_of(patch_nums=tup(*map(number, range(1, 80)))), "args.patch_nums must name 1..64 scales, got 79"),
    (dict_of(depth=pickle.LONG4 + struct.pack("<i", 4000) + b"\x7f" * 4000), "args.depth is <an integer of about"),
    (dict_of(kernel_size=number(10**9 + 1)), "args: kernel_size must be an integer in 1..255"),
    (dict_of(refine_step=number(10**6)), "args: refine_step must be an integer in 0..64"),
])
def test_official_args_beyond_the_limits_are_refused_naming_the_field(tmp_path, tiny_transformer, args, message):
    path = official_file_with_args(tmp_path / "bad-args.pth", tiny_transformer, args)
    with pytest.raises(CheckpointError, match="bad-args.pth") as err:
        load_any(path, "transformer")
    assert message in str(err.value)
    assert len(str(err.value)) < 400


def test_shapes_from_an_official_file_are_bounded_too(tmp_path, never_allocates):
    """A state dict whose empty tensors claim a vocabulary of 2**31 (no bytes needed for 0 x 2**31)."""
    config = TransformerConfig(depth=1, width=64, num_heads=1, num_classes=4, vocab_size=8, latent_channels=4)
    from mvar.transformer import ScaleTransformer
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in official_transformer_state_dict(ScaleTransformer(config, False)).items()}
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    state["head.weight"] = torch.zeros(2**31, 0)
    path = tmp_path / "shapes.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="shapes.pth: the tensor shapes give an invalid config: vocab_size"):
        load_any(path, "transformer")


# ----- echoes are short ------------------------------------------------------------------------

LONG = "x" * 20_000_000


def assert_short(message: str) -> None:
    assert len(message) < 600, len(message)
    assert "x" * 100 not in message


def test_a_20_mb_value_from_a_file_is_never_echoed_whole(tmp_path, tiny_transformer, tiny_tokenizer):
    messages = []
    ours = tmp_path / "ours.safetensors"
    save_model(ours, tiny_transformer)
    for meta in ({"kind": LONG}, {"config": config_json(tiny_transformer, **{LONG: 1})},
                 {"config": config_json(tiny_transformer, depth=LONG)},
                 {"config": config_json(tiny_transformer, patch_nums=[1, 2, LONG])},
                 {"extra": '{"attention": {"kernel_size": "' + LONG + '"}}'}):
        save_model(ours, tiny_transformer)
        rewrite_metadata(ours, **meta)
        with pytest.raises(CheckpointError) as err:
            load_model(ours)
        messages.append(str(err.value))
    for name, body in {"key.pth": dict_of(**{LONG: tensor(storage_id("0", 4), (4,), (1,))}),
                       "global.pth": glob("a" * 1_000_000, "b") + pickle.EMPTY_TUPLE + pickle.REDUCE,
                       "args.pth": None}.items():
        path = tmp_path / name
        if body is None:
            official_file_with_args(path, tiny_transformer, dict_of(pn=text(LONG)))
        else:
            write_archive(path, program(body), {"0": bytes(16)})
        with pytest.raises(CheckpointError) as err:
            load_any(path, "transformer")
        messages.append(str(err.value))
    state = official_transformer_state_dict(tiny_transformer)
    state[LONG] = torch.zeros(1)
    unexpected = tmp_path / "unexpected.pth"
    torch.save(state, unexpected)
    with pytest.raises(CheckpointError, match="unexpected keys") as err:
        load_any(unexpected, "transformer")
    messages.append(str(err.value))
    for message in messages:
        assert_short(message)


def test_a_long_path_is_shown_by_its_start_and_its_file_name():
    with pytest.raises(CheckpointError) as err:
        load_any("/tmp/" + "d" * 20_000 + "/var_d16.pth", "transformer")
    assert str(err.value).startswith("/tmp/ddd") and "var_d16.pth: file not found" in str(err.value)
    assert len(str(err.value)) < 400


def test_quote_is_short_and_never_raises():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for value in (LONG, LONG.encode(), 10**5000, deep, {LONG: LONG}, (1,) * 10**6, inert.GlobalRef("m" * 10**6, "n"),
                  inert.InertObject("o" * 10**6), torch.zeros([1] * 64)):
        assert len(inert.quote(value)) <= 80
    assert inert.quote((1,)) == "(1,)" and inert.quote({"a": [1, 2]}) == "{'a': [1, 2]}"


def test_numpy_values_in_official_args_are_read_as_numbers(tmp_path, tiny_transformer):
    """An official run may log numpy scalars in its args; they come out as plain numbers, and an object array
    (which only pickle's own numpy code could rebuild) is described, not built, without refusing the file."""
    import numpy as np

    args = OrderedDict(depth=np.int64(2), tblr=np.float64(1e-4), fp16=np.bool_(True),
                       resos=np.array([16, 32], dtype=np.int32), names=np.array(["a"], dtype=object))
    path = tmp_path / "numpy-args.pth"
    torch.save({"trainer": {"mvar_wo_ddp": official_transformer_state_dict(tiny_transformer, "block-diagonal")},
                "args": args}, path)
    file = read_official_file(path)
    assert file.args == {"depth": 2, "tblr": 1e-4, "fp16": True, "resos": [16, 32], "names": "numpy.ndarray"}
    assert type(file.args["depth"]) is int and type(file.args["tblr"]) is float
    assert load_any(path, "transformer").extra["official_args"] == {"depth": 2, "tblr": 1e-4, "fp16": True}
