"""Property tests: random and extreme arguments to the sampler, memory jobs and the app handlers.

Whatever comes in, the result is a valid image (finite, in [0, 1], the right shape) or a readable
error naming the bad argument (a ValueError in the library, a UserError in the app): never another
exception, a NaN or a hang. Sized for one thread: tiny models, derandomized examples, well under a
minute for the file.

A test marked ``xfail(strict=True)`` describes a check the library does not make yet; once it
does, strict xfail turns the passing test into a failure, and the marker should go.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from app import attention
from app.registry import ModelEntry, ModelRegistry
from app.work import costs, statistics
from app.work.generation import GenerationRecord, generate_frames
from app.work.models import load_models
from app.work.settings import CFG_MAX, MAX_IMAGES, SEED_MAX, UserError, parse_settings
from mvar.config import MVAR_MODE, VAR_MODE
from mvar.memory import MemoryJob, measure
from mvar.sampling import SEED_MODULUS, SamplingConfig, filter_logits, generate, generate_steps, normalize_seed

BASE = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(BASE, max_examples=60)  # no generation, or only invalid input
SLOW = settings(BASE, max_examples=20)  # every valid example runs a generation
# the expected failures of xfail tests are not worth shrinking
NO_SHRINK = settings(BASE, max_examples=8, phases=[Phase.explicit, Phase.generate])

NUM_CLASSES, VOCAB, SIDE = 12, 32, 64  # the tiny preset
SETTINGS = SamplingConfig(cfg=1.5, top_k=0, top_p=0.9)

# ----- strategies ------------------------------------------------------------------------------

huge_ints = st.sampled_from([2**63 - 1, 2**63, 2**64 + 1, -(2**64), 10**30, -(10**30)])
any_ints = st.one_of(st.integers(-3, 40), st.integers(-(2**80), 2**80), huge_ints)
any_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([math.nan, math.inf, -math.inf, 0.5, 2.5, -0.0, 1e300]))
junk = st.sampled_from([None, "", "abc", "1e3", " 2 ", "nan", "-inf", [], {}, (1,), True, False, object()])
anything = st.one_of(any_ints, any_floats, junk)


def valid_or(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly plausible widget values, sometimes anything at all."""
    return st.one_of(valid, anything)




def images_ok(images: torch.Tensor, count: int) -> None:
    assert images.shape == (count, 3, SIDE, SIDE)
    assert torch.isfinite(images).all()
    assert float(images.min()) >= 0 and float(images.max()) <= 1


def uint8_image_ok(image, side: int | None = SIDE) -> None:
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    if side is not None:
        assert image.shape[:2] == (side, side)


def sampler_arguments_valid(labels, seeds, cfg, top_k, top_p, max_batch) -> bool:
    """The documented rules, written out independently of the library: ints are ints (no bools, floats or
    strings), numbers are finite reals, any integer seed (or a whole float) is fine."""
    def is_int(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def is_real(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    def real_in(value, low, high, low_open=False) -> bool:
        if not is_real(value):
            return False
        try:
            number = float(value)
        except OverflowError:
            return False
        return math.isfinite(number) and (low < number if low_open else low <= number) and number <= high

    def seed_ok(seed) -> bool:
        return is_int(seed) or (is_real(seed) and math.isfinite(seed) and float(seed).is_integer())

    labels_ok = 0 < len(labels) <= max_batch and all(0 <= label <= NUM_CLASSES for label in labels)
    seeds_ok = (all(seed_ok(x) for x in seeds) and len(seeds) == len(labels)) if isinstance(seeds, list) \
        else seed_ok(seeds)
    top_k_ok = is_int(top_k) and 0 <= top_k <= VOCAB
    # cfg: the documented 0..10 (mvar/ranges.py; the page's range too)
    return labels_ok and seeds_ok and real_in(cfg, 0, 10) and top_k_ok and real_in(top_p, 0, 1, low_open=True)


def names_one_of(message: str, words) -> None:
    """A readable message: short, and it names the argument at fault."""
    assert len(message) < 400, message
    assert any(word in message for word in words), f"{message!r} names none of {words}"


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------


@settings(SLOW, max_examples=40)  # most examples are refused before any work
@given(
    labels=st.lists(st.one_of(st.integers(-2, NUM_CLASSES + 1), st.integers(-(2**70), 2**70)), max_size=5),
    seeds=st.one_of(any_ints, st.lists(any_ints, max_size=5), any_floats, st.none()),
    cfg=st.one_of(st.floats(0, 100), any_floats, st.integers(-5, 200), st.sampled_from([None, "2"])),
    top_k=st.one_of(st.integers(-5, VOCAB + 5), st.sampled_from([2.0, None, True, 10**20])),
    top_p=st.one_of(st.floats(0, 1), any_floats, st.integers(-1, 2), st.none()),
    smooth=st.booleans(),
    max_batch=st.integers(1, 4),
    markov=st.booleans(),
)
@example(labels=[0], seeds=-1, cfg=10.0, top_k=1, top_p=1e-6, smooth=True, max_batch=1, markov=False)
@example(labels=[0], seeds=-1, cfg=100.0, top_k=1, top_p=1e-6, smooth=True, max_batch=1, markov=False)
@example(labels=[NUM_CLASSES] * 4, seeds=2**100, cfg=0.0, top_k=VOCAB, top_p=1.0, smooth=False, max_batch=4,
         markov=True)
def test_sampler_gives_valid_images_or_a_clear_value_error(tiny_transformer, tiny_tokenizer, labels, seeds, cfg,
                                                           top_k, top_p, smooth, max_batch, markov):
    sampling = SamplingConfig(cfg=cfg, top_k=top_k, top_p=top_p, smooth=smooth)
    mode = MVAR_MODE if markov else VAR_MODE
    valid = sampler_arguments_valid(labels, seeds, cfg, top_k, top_p, max_batch)
    try:
        result = generate(tiny_transformer, tiny_tokenizer, labels, seeds, sampling, mode, max_batch=max_batch)
    except ValueError as err:
        assert not valid, f"valid arguments refused: {err}"
        names_one_of(str(err), ("class", "label", "seed", "cfg", "top_k", "top_p", "batch"))
        return
    assert valid, "invalid arguments accepted"
    images_ok(result.images, len(labels))
    for tokens in result.tokens:
        assert int(tokens.min()) >= 0 and int(tokens.max()) < VOCAB


@settings(SLOW, max_examples=10)
@given(seed=st.one_of(st.integers(-(2**80), 2**80), huge_ints), label=st.integers(0, NUM_CLASSES),
       markov=st.booleans(), smooth=st.booleans())
def test_any_integer_seed_gives_the_same_images_as_its_folded_seed(tiny_transformer, tiny_tokenizer, seed, label,
                                                                    markov, smooth):
    sampling = SamplingConfig(cfg=1.5, top_k=8, top_p=0.9, smooth=smooth)
    mode = MVAR_MODE if markov else VAR_MODE
    folded = normalize_seed(seed)
    assert 0 <= folded < SEED_MODULUS and (folded - seed) % SEED_MODULUS == 0
    raw = generate(tiny_transformer, tiny_tokenizer, [label], seed, sampling, mode)
    same = generate(tiny_transformer, tiny_tokenizer, [label], folded, sampling, mode)
    assert all(torch.equal(a, b) for a, b in zip(raw.tokens, same.tokens, strict=True))
    assert torch.equal(raw.images, same.images)


@settings(SLOW, max_examples=10)
@given(data=st.data(), markov=st.booleans(), cfg=st.sampled_from([0.0, 2.0]), smooth=st.booleans(),
       base_seed=st.booleans())
def test_a_sample_in_a_batch_equals_the_same_sample_alone(tiny_transformer, tiny_tokenizer, data, markov, cfg,
                                                          smooth, base_seed):
    labels = data.draw(st.lists(st.integers(0, NUM_CLASSES), min_size=2, max_size=3), label="labels")
    if base_seed:  # one int: sample i uses seed + i
        seeds = data.draw(st.integers(-(2**64), 2**64), label="seed")
        own_seeds = [seeds + i for i in range(len(labels))]
    else:
        seeds = own_seeds = data.draw(st.lists(st.integers(-(2**64), 2**64), min_size=len(labels),
                                               max_size=len(labels)), label="seeds")
    i = data.draw(st.integers(0, len(labels) - 1), label="sample")
    sampling = SamplingConfig(cfg=cfg, top_k=6, top_p=0.95, smooth=smooth)
    mode = MVAR_MODE if markov else VAR_MODE
    batch = generate(tiny_transformer, tiny_tokenizer, labels, seeds, sampling, mode)
    alone = generate(tiny_transformer, tiny_tokenizer, [labels[i]], [own_seeds[i]], sampling, mode)
    assert all(torch.equal(b[i : i + 1], a) for b, a in zip(batch.tokens, alone.tokens, strict=True))
    # the decoder's batched convolutions may round differently: the tokens above are exact
    assert torch.allclose(batch.images[i : i + 1], alone.images, atol=1e-5)


# ----- strict argument types: no truncation, no bool for an int, no str for a sequence ----------


@NO_SHRINK
@given(top_p=st.sampled_from([1e-46, 1e-100, 1e-300, 5e-324]), smooth=st.booleans(), seed=st.integers(0, 99))
@example(top_p=1e-300, smooth=True, seed=0)
def test_a_tiny_top_p_keeps_the_most_likely_token(tiny_transformer, tiny_tokenizer, top_p, smooth, seed):
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(seed))
    kept = torch.isfinite(filter_logits(logits, 0, top_p))
    assert torch.equal(kept, torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).bool())
    result = generate(tiny_transformer, tiny_tokenizer, [1], seed, SamplingConfig(cfg=1.5, top_p=top_p, smooth=smooth))
    images_ok(result.images, 1)


def _run(transformer, tokenizer, **kwargs):
    args = dict(labels=[1], seeds=0, sampling=SETTINGS, mode=MVAR_MODE) | kwargs
    return list(generate_steps(transformer, tokenizer, **args))


@NO_SHRINK
@given(labels=st.one_of(
    st.lists(st.sampled_from([1.5, math.inf, math.nan, None, "3", True, [1]]), min_size=1, max_size=2),
    st.sampled_from([3, None, "abc", torch.ones(2, 2, dtype=torch.long)]),
))
@example(labels=[1.5])
def test_class_ids_must_be_integers(tiny_transformer, tiny_tokenizer, labels):
    with pytest.raises(ValueError, match="class id"):
        _run(tiny_transformer, tiny_tokenizer, labels=labels)


@NO_SHRINK
@given(seeds=st.sampled_from(["12", True, False, [True], "7"]))
@example(seeds="12")
def test_seeds_must_be_integers_not_strings_or_bools(tiny_transformer, tiny_tokenizer, seeds):
    with pytest.raises(ValueError, match="seed must be an integer"):
        _run(tiny_transformer, tiny_tokenizer, seeds=seeds)


@NO_SHRINK
@given(case=st.sampled_from([("cfg", True), ("top_p", True), ("smooth", "no"), ("smooth", 1), ("smooth", None),
                             ("sampling", {"cfg": 1.0})]))
@example(case=("smooth", "no"))
def test_sampling_settings_refuse_bools_and_non_bool_smooth(tiny_transformer, tiny_tokenizer, case):
    field, value = case
    with pytest.raises(ValueError, match=field):
        if field == "sampling":
            _run(tiny_transformer, tiny_tokenizer, sampling=value)
        else:
            SamplingConfig(**{field: value}).validate(VOCAB)


@NO_SHRINK
@given(max_batch=st.sampled_from([0, -1, "4", None, 2.5, True, math.inf]))
@example(max_batch="4")
def test_max_batch_must_be_a_positive_integer(tiny_transformer, tiny_tokenizer, max_batch):
    with pytest.raises(ValueError, match="max_batch"):
        _run(tiny_transformer, tiny_tokenizer, max_batch=max_batch)


@NO_SHRINK
@given(case=st.sampled_from([("mode", "var"), ("mode", None), ("dtype", "bf16"), ("dtype", torch.int64),
                             ("previews", "yes"), ("previews", None), ("decode_chunk", 0), ("decode_chunk", "8")]))
@example(case=("mode", "var"))
def test_mode_dtype_previews_and_decode_chunk_are_checked(tiny_transformer, tiny_tokenizer, case):
    argument, value = case
    with pytest.raises(ValueError, match=argument):
        if argument == "decode_chunk":
            generate(tiny_transformer, tiny_tokenizer, [1], 0, SETTINGS, decode_chunk=value)
        else:
            _run(tiny_transformer, tiny_tokenizer, **{argument: value})


@NO_SHRINK
@given(capture=st.sampled_from([
    dict(capture_layers=["a"]), dict(capture_layers=[0.5]), dict(capture_layers=[True]),
    dict(capture_queries={99: None}), dict(capture_queries={-1: None}), dict(capture_queries={"0": None}),
    dict(capture_queries={0: [0.5]}), dict(capture_queries={1: "ab"}),
]))
@example(capture=dict(capture_queries={99: None}))
def test_capture_arguments_are_checked(tiny_transformer, tiny_tokenizer, capture):
    with pytest.raises(ValueError, match="capture"):
        _run(tiny_transformer, tiny_tokenizer, **capture)


# ---------------------------------------------------------------------------------------------
# Memory jobs: checked in the parent process, before a subprocess starts
# ---------------------------------------------------------------------------------------------

JOB = dict(mode="mvar", batch=2, preset="tiny")
BAD_JOB_FIELDS = dict(
    mode=st.one_of(st.sampled_from(["VAR", "MVAR", "markov", ""]), anything),
    batch=st.one_of(st.integers(-(2**70), 0), st.sampled_from([2.0, "2", True, None, math.inf, math.nan])),
    dtype=st.one_of(st.sampled_from(["float32", "bfloat16", "int8", torch.bfloat16]), anything),
    task=st.one_of(st.sampled_from(["Train", "training", "measure"]), anything),
    refine_step=st.one_of(st.integers(-(2**70), -1), st.sampled_from([8.0, "8", True, None])),
    kernel_size=st.one_of(st.integers(-(2**70), 0), st.sampled_from([6, 7.0, "7", True, None])),
    ratio_k=st.one_of(st.integers(-(2**70), 0), st.sampled_from([8.0, "8", True, None])),
    cfg=st.sampled_from([0, 1, "yes", None, 1.5]),
    decode=st.sampled_from([0, 1, "no", None]),
    device=st.one_of(st.sampled_from(["gpu", "", "cpu:x", torch.device("cpu"), None]), any_ints),
    preset=st.one_of(st.sampled_from(["d99", "Tiny", ""]), any_ints, any_floats),
)


@QUICK
@given(data=st.data(), field=st.sampled_from(sorted(BAD_JOB_FIELDS)))
def test_memory_jobs_refuse_bad_fields_with_a_value_error_naming_them(data, field):
    value = data.draw(BAD_JOB_FIELDS[field], label=field)
    with pytest.raises(ValueError) as err:
        MemoryJob(**JOB | {field: value})
    names_one_of(str(err.value), [field])


@pytest.mark.parametrize("files", [dict(), dict(tokenizer="t.safetensors"), dict(transformer="m.safetensors"),
                                   dict(tokenizer=None, transformer="m.pth")])
def test_memory_jobs_need_a_preset_or_both_model_files(files):
    with pytest.raises(ValueError, match="needs a preset, or both a tokenizer and a transformer file"):
        MemoryJob(mode="var", batch=1, **files)
    with pytest.raises(ValueError, match="tokenizer must be a file path"):
        MemoryJob(mode="var", batch=1, tokenizer=3, transformer="m.pth")


@QUICK
@given(batch=st.integers(1, 2**70), numpy_int=st.booleans(), use_path=st.booleans())
def test_valid_memory_jobs_keep_plain_types_for_their_subprocess(batch, numpy_int, use_path):
    if numpy_int:
        batch = np.int64(min(batch, 2**62))
    files = (dict(tokenizer=Path("t.safetensors"), transformer=Path("m.pth")) if use_path
             else dict(tokenizer="t.safetensors", transformer="m.pth"))
    job = MemoryJob(mode="var", batch=batch, refine_step=np.int32(3), **files)
    assert type(job.batch) is int and job.batch == batch and type(job.refine_step) is int
    assert MemoryJob(**json.loads(json.dumps(asdict(job)))) == job  # what the subprocess receives


@QUICK
@given(timeout=st.one_of(st.sampled_from([0, -1, 0.0, -0.0, math.inf, math.nan, None, "60", True]),
                         st.floats(max_value=0), st.integers(max_value=0)))
def test_measure_needs_a_positive_timeout_and_starts_nothing_otherwise(timeout):
    with mock.patch("mvar.memory.subprocess.run") as run:
        with pytest.raises(ValueError, match="timeout must be"):
            measure(MemoryJob(**JOB), timeout=timeout)
        with pytest.raises(ValueError, match="job must be a MemoryJob"):
            measure(JOB)
    run.assert_not_called()


# ---------------------------------------------------------------------------------------------
# The app's model work and views
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry():
    """The tiny preset with its initial weights: no files, loads in a blink."""
    return ModelRegistry(None, assets_dir="/nonexistent", extra=[ModelEntry("tiny", "tiny", "random", "tiny", "tiny")])


def frames_of(registry, model_key="tiny", **values):
    """The page's path: parse once (a UserError before any work), then generate."""
    models = load_models(registry, model_key)
    return generate_frames(models, model_key, parse_settings(models, **(VALID_SETTINGS | values)))


@pytest.fixture(scope="module")
def record(registry):
    frames = list(frames_of(registry, num_images=2))
    return frames[-1].record


VALID_SETTINGS = dict(class_name="class 3", seed=7, cfg=1.5, top_k=0, top_p=0.9, smooth=False, num_images=1,
                      precision="fp32", kernel="7", refine_step=8)
WORDS = dict(class_name="Class", seed="Seed", cfg="CFG", top_k="top-k", top_p="top-p", smooth="Gumbel smoothing",
             num_images="Images", precision="Precision")
WILD_SETTINGS = dict(
    class_name=st.one_of(st.sampled_from(["class 0", "class 11", "class 12", "Class 1", "class 1 ", ""]),
                         st.text(max_size=6), anything),
    seed=valid_or(st.one_of(any_ints, st.sampled_from([3.0, " 42 ", "-7", 1e30]))),
    cfg=valid_or(st.one_of(st.floats(0, 10), st.sampled_from([0, 100, "2.5", 100.5, -0.1, 10]))),
    top_k=valid_or(st.one_of(st.integers(0, VOCAB), st.sampled_from([3.0, "5", VOCAB + 1, 2.5]))),
    top_p=valid_or(st.one_of(st.floats(0.01, 1), st.sampled_from([1, "0.5", 0, 1.0000001]))),
    smooth=valid_or(st.sampled_from([True, False, np.bool_(True), "no", 0, 1])),
    num_images=valid_or(st.sampled_from([1, 2, 2.0, "1", 0, MAX_IMAGES + 1, 1.5])),
    precision=st.sampled_from(["fp32", "bf16", "fp16", "FP32", "int8", "", None, 3]),
)


def _as_number(value):
    """The rule the page documents, written out apart from the handlers: a widget sends a number, a numeric
    string (spaces allowed) or nothing usable; bools are not numbers."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except (ValueError, OverflowError):
                pass
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        return value
    return None


def _whole_in(value, low, high) -> bool:
    number = _as_number(value)
    return number is not None and math.isfinite(number) and float(number).is_integer() and low <= number <= high


def _real_in(value, low, high, low_open=False) -> bool:
    number = _as_number(value)
    if number is None or not math.isfinite(number):
        return False
    return (low < number if low_open else low <= number) and number <= high


SETTING_RULES = dict(
    class_name=lambda v: isinstance(v, str) and v in [f"class {i}" for i in range(NUM_CLASSES)],
    seed=lambda v: _whole_in(v, 0, SEED_MAX),
    cfg=lambda v: _real_in(v, 0, CFG_MAX),
    top_k=lambda v: _whole_in(v, 0, VOCAB),
    top_p=lambda v: _real_in(v, 0, 1, low_open=True),
    smooth=lambda v: isinstance(v, bool),
    num_images=lambda v: _whole_in(v, 1, MAX_IMAGES),
    precision=lambda v: v in ("fp32", "bf16", "fp16"),
)


@settings(SLOW, max_examples=16)
@given(data=st.data())
def test_generate_frames_runs_exactly_the_valid_settings_and_names_the_bad_one(registry, data):
    wild = data.draw(st.sets(st.sampled_from(sorted(WILD_SETTINGS)), max_size=3), label="wild fields")
    values = VALID_SETTINGS | {name: data.draw(WILD_SETTINGS[name], label=name) for name in sorted(wild)}
    bad = [name for name in sorted(wild) if not SETTING_RULES[name](values[name])]
    if bad:
        with pytest.raises(UserError) as err:
            frames_of(registry, **values)  # refused before any work
        names_one_of(str(err.value), [WORDS[name] for name in bad])
        return
    frames = list(frames_of(registry, **values))
    assert len(frames) == 2 * 10 + 1 and frames[-1].record is not None
    assert frames[0].var_image is None  # MVAR's first scale comes first
    for frame in frames[1:]:
        uint8_image_ok(frame.mvar_image)
        uint8_image_ok(frame.var_image)
    runs = frames[-1].record.runs
    assert 1 <= len(runs["MVAR"].finals) == len(runs["VAR"].finals) <= MAX_IMAGES


@QUICK
@given(model_key=st.one_of(st.text(max_size=8), anything))
def test_unknown_models_are_user_errors(registry, model_key):
    if model_key == "tiny":
        return  # the one valid key: covered above
    with pytest.raises(UserError, match="model|Model"):
        frames_of(registry, model_key)


@QUICK
@given(num_images=st.integers(-2, 12), max_images=st.integers(1, 3))
def test_the_image_limit_is_configurable(registry, num_images, max_images):
    values = VALID_SETTINGS | dict(num_images=num_images)
    models = registry.load("tiny")
    if 1 <= num_images <= max_images:
        assert parse_settings(models, **values, max_images=max_images).num_images == num_images
    else:
        with pytest.raises(UserError, match=f"Images must be a whole number from 1 to {max_images}"):
            parse_settings(models, **values, max_images=max_images)


scale_values = valid_or(st.one_of(st.integers(-2, 11), st.sampled_from([3.0, "4", 9.5])))


@QUICK
@given(scale=scale_values)
def test_the_scale_box_gives_a_scale_exactly_for_the_scales_shown(record, scale):
    if _whole_in(scale, 1, 10):
        assert record.scale(scale) == int(float(scale)) - 1
        images = record.runs["MVAR"].previews[0][record.scale(scale)], record.runs["VAR"].previews[0][
            record.scale(scale)]
        for image in images:
            uint8_image_ok(image)
    else:
        with pytest.raises(UserError) as err:
            record.scale(scale)
        names_one_of(str(err.value), ["Scale"])


@settings(BASE, max_examples=40)
@given(scale=scale_values,
       layer=valid_or(st.sampled_from(["mean", "0", "1", 0, 1, 1.0, "2", 5, "Mean"])),
       head=valid_or(st.sampled_from(["mean", "0", "1", 0, 1, "2", -1])),
       row=valid_or(st.integers(-1, 16)), col=valid_or(st.integers(-1, 16)))
@example(scale=10, layer="mean", head="mean", row=15, col=0)
@example(scale=1, layer="1", head="0", row=0, col=0)
def test_attention_view_gives_a_view_or_a_user_error(record, scale, layer, head, row, col):
    try:
        view = attention.attention_view(record, scale, layer, head, row, col)
    except UserError as err:
        names_one_of(str(err), ["Scale", "Layer", "Head", "Token"])
        return
    uint8_image_ok(view.mvar_preview)
    assert view.mvar_grid.shape == (view.side, view.side) and np.isfinite(view.mvar_grid).all()
    assert len(view.var_grids) == view.scale + 1 and view.var_mass.sum() == pytest.approx(1.0, abs=1e-2)
    assert isinstance(view.caption, str) and "nan" not in view.caption


@QUICK
@given(bad=st.one_of(junk, any_ints, st.just({"runs": {}})))
def test_views_without_a_record_ask_for_a_generation(bad):
    assert not isinstance(bad, GenerationRecord)
    for call in (lambda: attention.attention_view(bad, 1, "mean", "mean", 0, 0),
                 lambda: attention.token_from_click(bad, 1, 1, 1, 384)):
        with pytest.raises(UserError, match="generate an image first"):
            call()


@QUICK
@given(scale=scale_values, x=valid_or(st.floats(-10, 400)), y=valid_or(st.integers(-10, 400)),
       size=valid_or(st.sampled_from([384, 320, 1, 0, -5, 384.0, "384", 10**9])))
def test_token_from_click_gives_a_cell_of_the_grid_or_a_user_error(record, scale, x, y, size):
    try:
        row, col = attention.token_from_click(record, scale, x, y, size)
    except UserError as err:
        names_one_of(str(err), ["Scale", "click", "displayed image"])
        return
    side = record.patch_nums[int(float(scale)) - 1]
    assert type(row) is int and type(col) is int and 0 <= row < side and 0 <= col < side


@settings(BASE, max_examples=12)
@given(samples=st.sampled_from([0, 1, "1", 1.0, 17, -1, 1.5, None, math.nan, math.inf, True, 10**30]),
       seed=st.one_of(st.sampled_from([0, -1, 2**63 - 1, 2**64]), junk))
def test_attention_statistics_gives_statistics_or_a_user_error(registry, samples, seed):
    models = registry.load("tiny")
    try:
        stats = statistics.attention_statistics(models, samples, seed)
    except UserError as err:
        names_one_of(str(err), ["Samples", "Seed"])
        return
    assert np.isfinite(stats.mass_by_distance).all()
    assert stats.mass_by_distance.sum() == pytest.approx(1.0, abs=1e-3)


dtype_names = st.sampled_from(["fp32", "bf16", "fp16", "float32", "int8", "", None, 3, torch.bfloat16])


@QUICK
@given(batch=valid_or(st.integers(1, 64)), dtype=dtype_names, with_record=st.sampled_from([None, "record", "junk"]))
def test_per_scale_costs_give_finite_numbers_or_a_user_error(registry, record, batch, dtype, with_record):
    rec = {"record": record, "junk": "junk", None: None}[with_record]
    try:
        figures = costs.per_scale_costs(registry.load("tiny"), rec, batch, dtype)
    except UserError as err:
        names_one_of(str(err), ["batch", "dtype", "generate an image first"])
        return
    for per_model in (figures["kv_cache_mib"], figures["attention_mflops"]):
        assert all(len(v) == 10 and all(math.isfinite(x) and x >= 0 for x in v) for v in per_model.values())


@QUICK
@given(batches=st.one_of(st.lists(valid_or(st.integers(1, 64)), max_size=4), anything), dtype=dtype_names)
def test_analytic_memory_gives_positive_sizes_or_a_user_error(registry, batches, dtype):
    cfg = registry.load("tiny").transformer.cfg
    try:
        memory = costs.analytic_memory_mib(cfg, MVAR_MODE, batches, dtype)
    except UserError as err:
        names_one_of(str(err), ["Batch size", "batch size", "dtype"])
        return
    assert memory and all(math.isfinite(v) and v > 0 for v in memory.values())


@QUICK
@given(batches=st.one_of(st.lists(valid_or(st.integers(1, 80)), max_size=10), anything), dtype=dtype_names)
def test_memory_measurements_check_their_batches_before_starting(registry, batches, dtype):
    models = registry.load("tiny")
    models.cache.clear()
    with mock.patch("mvar.memory.measure", return_value={"peak_bytes": 2**20}) as measure:
        try:
            measured = costs.measured_memory_mib(models, batches, dtype)
        except UserError as err:
            names_one_of(str(err), ["Batch size", "batch size", "Precision"])
            measure.assert_not_called()
            return
    asked = {int(float(b)) for b in batches}
    assert all(set(measured[name]) == asked for name in ("VAR", "MVAR"))
    assert all(1 <= job.args[0].batch <= costs.MAX_MEASURED_BATCH for job in measure.call_args_list)
