import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mvar.checkpoints import (
    CheckpointError,
    infer_transformer_config,
    load_any,
    load_model,
    load_official_tokenizer,
    load_official_transformer,
    official_transformer_state_dict,
    read_metadata,
    save_model,
    transformer_from_official,
)
from mvar.config import official_transformer
from mvar.transformer import ScaleTransformer


def test_d16_official_layout_loads_strictly_and_round_trips_bit_exactly(ram_dir):
    tmp_path = ram_dir
    model = ScaleTransformer.empty(official_transformer(16))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    official = official_transformer_state_dict(model)
    pth = tmp_path / "var_d16.pth"
    torch.save(official, pth)
    del official
    loaded = load_official_transformer(pth)
    assert loaded.cfg == official_transformer(16)  # preset inferred from the shapes
    ours = tmp_path / "d16.safetensors"
    save_model(ours, loaded, extra={"note": "round trip"})
    back = load_model(ours)
    assert back.kind == "transformer" and back.extra == {"note": "round trip"}
    reference = model.state_dict()
    for name, tensor in back.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_tiny_tokenizer_and_transformer_round_trip(tmp_path, tiny_tokenizer, tiny_transformer):
    for model in (tiny_tokenizer, tiny_transformer):
        path = tmp_path / f"{type(model).__name__}.safetensors"
        save_model(path, model, extra={"class_names": ["a", "b"]})
        meta = read_metadata(path)
        assert meta["config"] == {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in model.cfg.__dict__.items()}
        loaded = load_model(path)
        assert loaded.config == model.cfg and loaded.extra["class_names"] == ["a", "b"]
        for name, tensor in loaded.model.state_dict().items():
            assert torch.equal(tensor, model.state_dict()[name])


def test_official_tokenizer_layout_loads(tmp_path, tiny_tokenizer):
    path = tmp_path / "vae.pth"
    torch.save(tiny_tokenizer.state_dict(), path)
    loaded = load_official_tokenizer(path, tiny_tokenizer.cfg)
    assert torch.equal(loaded.quantize.embedding.weight, tiny_tokenizer.quantize.embedding.weight)


def test_wrapped_and_prefixed_state_dicts_are_unwrapped(tmp_path, tiny_transformer):
    state = {f"module.{k}": v for k, v in official_transformer_state_dict(tiny_transformer).items()}
    path = tmp_path / "wrapped.pth"
    torch.save({"model": state, "epoch": 3}, path)
    from mvar.checkpoints import read_official_state_dict
    assert "head.weight" in read_official_state_dict(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mvar_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"head.weight": _Exploit()}, handle)
    if os.path.exists("/tmp/mvar_pwned"):
        os.unlink("/tmp/mvar_pwned")
    with pytest.raises(CheckpointError, match="execute code") as err:
        load_official_transformer(path)
    assert str(path) in str(err.value)
    assert not os.path.exists("/tmp/mvar_pwned")


def test_truncated_and_missing_files_name_the_file(tmp_path, tiny_transformer):
    pth = tmp_path / "cut.pth"
    torch.save(official_transformer_state_dict(tiny_transformer), pth)
    pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_official_transformer(pth)
    assert "cut.pth" in str(err.value)
    ours = tmp_path / "cut.safetensors"
    save_model(ours, tiny_transformer)
    ours.write_bytes(ours.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_model(ours)
    with pytest.raises(CheckpointError, match="file not found"):
        load_model(tmp_path / "nothing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(garbage)


def test_wrong_shapes_missing_keys_dtype_and_nan_are_named(tmp_path, tiny_transformer):
    base = official_transformer_state_dict(tiny_transformer)
    cases = {
        "missing": ({k: v for k, v in base.items() if k != "head.bias"}, "missing keys \\[head.bias\\]"),
        "unexpected": ({**base, "extra.weight": torch.zeros(2)}, "unexpected keys \\[extra.weight\\]"),
        "shape": ({**base, "head.bias": torch.zeros(7)}, "head.bias: expected shape"),
        "dtype": ({**base, "head.bias": base["head.bias"].long()}, "expected a floating-point"),
        "nan": ({**base, "head.bias": base["head.bias"].clone().fill_(float("nan"))}, "NaN"),
    }
    config = tiny_transformer.cfg
    for name, (state, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            transformer_from_official(state, config, path=f"{name}.pth")


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="without MVAR Studio metadata"):
        load_model(path)


def test_kind_mismatch_is_refused(tmp_path, tiny_tokenizer):
    path = tmp_path / "tok.safetensors"
    save_model(path, tiny_tokenizer)
    with pytest.raises(CheckpointError, match="expected a transformer file"):
        load_model(path, expect="transformer")


@pytest.mark.parametrize("kind", ["tok", "Transformer", "", None, 1, True, ["transformer"]])
def test_load_any_refuses_an_unknown_kind_before_reading(tmp_path, tiny_transformer, kind):
    pth = tmp_path / "model.pth"
    torch.save(official_transformer_state_dict(tiny_transformer), pth)  # kind="tok" loaded it as a transformer
    for path in (pth, tmp_path / "absent.safetensors", tmp_path / "absent.pth"):
        with pytest.raises(ValueError, match="kind must be 'tokenizer' or 'transformer'") as err:
            load_any(path, kind)
        assert not isinstance(err.value, CheckpointError)  # the argument is at fault, not the file


@pytest.mark.parametrize("expect", ["tok", "Tokenizer", "", 0, False])
def test_load_model_checks_expect(tmp_path, tiny_tokenizer, expect):
    path = tmp_path / "tok.safetensors"
    save_model(path, tiny_tokenizer)
    with pytest.raises(ValueError, match="expect must be 'tokenizer' or 'transformer' \\(or None\\)"):
        load_model(path, expect=expect)
    assert load_model(path, expect=None).kind == load_any(path, "tokenizer").kind == "tokenizer"


def test_an_unknown_kind_in_the_metadata_is_named(tmp_path, tiny_tokenizer):
    path = tmp_path / "odd.safetensors"
    save_model(path, tiny_tokenizer)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    save_file(state, str(path), metadata={**meta, "kind": "decoder"})
    with pytest.raises(CheckpointError, match="unknown model kind 'decoder'"):
        load_model(path)


def test_infer_config_refuses_foreign_state_dicts():
    with pytest.raises(CheckpointError, match="not a VAR/MVAR transformer"):
        infer_transformer_config({"conv.weight": torch.zeros(3)})


def test_hub_download_without_huggingface_hub_says_what_to_put_where(tmp_path, monkeypatch):
    import sys

    from mvar.checkpoints import download_official, official_file_path
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match="put var_d16.pth from the hub repo FoundationVision/var"):
        download_official("var-d16", tmp_path)
    existing = official_file_path("mvar-d16", tmp_path)
    existing.write_bytes(b"x")
    assert download_official("mvar-d16", tmp_path) == existing  # present: no download attempted
    with pytest.raises(ValueError, match="unknown official file"):
        download_official("var-d99", tmp_path)
