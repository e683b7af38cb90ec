"""Device choice everywhere, ZeroGPU wrapping and the GPU check, on a CPU-only machine.

CUDA is faked where only the choice logic runs (``torch.cuda.is_available`` / ``device_count`` /
``get_device_name`` monkeypatched); nothing here touches a GPU. ``spaces`` is faked by a module in
``sys.modules`` whose ``GPU`` decorator pickles arguments and results the way ZeroGPU's worker
boundary does.
"""

from __future__ import annotations

import inspect
import json
import pickle
import sys
import types
from dataclasses import asdict, dataclass
from unittest import mock

import pytest
import torch

from app import tasks, zerogpu
from app.page import build_app
from app.registry import ModelRegistry
from app.work import costs as app_costs
from app.work import models as app_models
from app.work.settings import UserError, parse_settings
from mvar import devices
from mvar.memory import MemoryJob, measure_label

from .conftest import registry_of


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Hopper


# ---------------------------------------------------------------------------------------------
# resolve_device and friends
# ---------------------------------------------------------------------------------------------


def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused(no_gpu):
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    for value in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"--device {value}: no CUDA device is available") as err:
            devices.resolve_device(value)
        assert "--device cpu" in str(err.value)


def test_auto_and_cuda_take_the_first_gpu_and_an_index_is_checked(two_gpus):
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:3: this machine has 2 CUDA devices \(cuda:0 .. cuda:1\)"):
        devices.resolve_device("cuda:3")


@pytest.mark.parametrize("value", ["tpu", "gpu", "", "CUDA", "cuda:", "cuda:-1", "cuda:01", "cuda:x", "cpu:0",
                                   "mps", " cuda", None, 0, 1.5, True, torch.device("cpu")])
def test_anything_else_is_refused_naming_the_flag_and_the_choices(two_gpus, value):
    with pytest.raises(ValueError) as err:
        devices.resolve_device(value, flag="--gpu-flag")
    assert str(err.value).startswith("--gpu-flag must be one of auto, cpu, cuda or cuda:N")


def test_torchrun_ranks_take_their_local_gpu(two_gpus):
    assert devices.distributed_device("auto", 1) == torch.device("cuda", 1)
    assert devices.distributed_device("cuda", 0) == torch.device("cuda", 0)
    assert devices.distributed_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:1 names one GPU, but under torchrun"):
        devices.distributed_device("cuda:1", 0)
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2 has no GPU.*--nproc_per_node 2"):
        devices.distributed_device("cuda", 2)


def test_torchrun_without_gpus_uses_the_cpu_for_auto_only(no_gpu):
    assert devices.distributed_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        devices.distributed_device("cuda", 0)


def test_descriptions_and_precisions(two_gpus, monkeypatch):
    assert devices.describe_device("cuda:1") == "cuda:1 (NVIDIA H200)"
    assert devices.describe_device("cpu") == f"CPU ({torch.get_num_threads()} threads)"
    assert devices.autocast_precisions("cpu") == ("fp32", "bf16")
    assert devices.autocast_precisions("cuda:0") == ("fp32", "bf16", "fp16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no native bf16
    assert devices.autocast_precisions("cuda:0") == ("fp32", "fp16")


# ---------------------------------------------------------------------------------------------
# Every entry point takes --device and refuses a bad one by name
# ---------------------------------------------------------------------------------------------


def _cli_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return str(exit_info.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("entry", ["sample", "benchmark", "evaluate", "choose_sampling", "app", "classifier",
                                   "train_transformer", "train_tokenizer"])
def test_entry_points_refuse_a_missing_gpu_by_flag(entry, no_gpu, capsys, tmp_path):
    from mvar import benchmark, sample
    from train import choose_sampling, classifier, evaluate, train_tokenizer, train_transformer

    app_main = _load_app_script()
    files = ["--tokenizer", "assets/tokenizer.safetensors", "--transformer", "assets/mvar.safetensors"]
    for split in ("train", "val"):  # an (empty) ImageNet-layout folder: the device is refused before the data is read
        (tmp_path / split).mkdir()
    cases = {
        "sample": (sample.main, ["--random-init", "tiny"]),
        "benchmark": (benchmark.main, ["--presets", "tiny", "--out", str(tmp_path)]),
        "evaluate": (evaluate.main, [*files, "--data", str(tmp_path)]),
        "choose_sampling": (choose_sampling.main, [*files, "--data", str(tmp_path), "--mode", "mvar"]),
        "app": (app_main.parse_args, []),
        "classifier": (classifier.parse_args, ["--data", str(tmp_path), "--out", str(tmp_path / "c.safetensors")]),
        "train_transformer": (train_transformer.main, ["--run-dir", str(tmp_path / "r")]),
        "train_tokenizer": (train_tokenizer.main, ["--run-dir", str(tmp_path / "r")]),
    }
    main, argv = cases[entry]
    message = _cli_error(main, [*argv, "--device", "cuda"], capsys)
    assert "--device cuda: no CUDA device is available" in message
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def _load_app_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "app.py"
    spec = importlib.util.spec_from_file_location("mvar_studio_app_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_runs_on_the_named_device(tmp_path, capsys):
    from mvar import sample

    out = tmp_path / "grid.png"
    sample.main(["--random-init", "tiny", "--classes", "0", "--per-class", "1", "--device", "cpu", "--out", str(out)])
    assert out.stat().st_size > 0 and "on CPU (" in capsys.readouterr().out


@dataclass
class _TrainingFlags:
    run_dir: str
    precision: str = "bf16"


def test_training_refuses_fp16_off_cuda_and_scales_only_fp16(no_gpu, capsys):
    from train import common

    with pytest.raises(SystemExit, match="--precision fp16 is for CUDA devices, this run is on cpu"):
        common.check_precision(torch.device("cpu"), "fp16")
    assert not common.loss_scaler(torch.device("cpu"), "bf16").is_enabled()
    message = _cli_error(lambda argv: common.parse_dataclass_args(_TrainingFlags, "train", "", argv),
                         ["--run-dir", "r", "--precision", "fp8"], capsys)
    assert "--precision must be one of fp32, bf16, fp16, got 'fp8'" in message


def test_setup_distributed_puts_each_rank_on_its_local_gpu(two_gpus, monkeypatch):
    from train import common

    chosen, groups = [], []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(common.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(common.dist, "init_process_group", lambda backend, timeout: groups.append(backend))
    assert common.setup_distributed(30, "cuda:1").device == torch.device("cuda", 1)  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = common.setup_distributed(30, "auto")
    assert (info.rank, info.local_rank, info.device) == (1, 1, torch.device("cuda", 1))
    assert chosen == [torch.device("cuda", 1)] * 2 and groups == ["nccl"]
    assert common.setup_distributed(30, "cpu").device == torch.device("cpu") and groups[-1] == "gloo"
    with pytest.raises(SystemExit, match="error: rank 1: --device cuda:0 names one GPU"):
        common.setup_distributed(30, "cuda:0")


# ---------------------------------------------------------------------------------------------
# The memory job
# ---------------------------------------------------------------------------------------------


def test_memory_jobs_resolve_and_check_their_device(two_gpus):
    assert MemoryJob(mode="var", batch=1, preset="tiny", device="auto").device == "cuda:0"
    assert MemoryJob(mode="var", batch=1, preset="tiny", device="cuda").device == "cuda:0"
    job = MemoryJob(mode="var", batch=1, preset="tiny", device="cuda:1")
    assert MemoryJob(**json.loads(json.dumps(asdict(job)))) == job  # what its subprocess receives
    with pytest.raises(ValueError, match=r"device cuda:2: this machine has 2 CUDA devices"):
        MemoryJob(mode="var", batch=1, preset="tiny", device="cuda:2")


def test_memory_labels_say_what_was_measured(no_gpu):
    assert MemoryJob(mode="var", batch=1, preset="tiny", device="auto").device == "cpu"
    assert measure_label("cpu") == "peak RSS above the weights"
    assert measure_label("cuda:0") == "GPU memory (CUDA allocator peak)"


def test_the_memory_tab_measures_on_the_servers_device(tiny_registry):
    models = tiny_registry.load("tiny")
    jobs = []
    with mock.patch("mvar.memory.measure", side_effect=lambda job: jobs.append(job) or {"peak_bytes": 2**20}):
        app_costs.measured_memory_mib(models, [1], "bf16", device="cpu")
        with pytest.raises(UserError, match=r"Precision must be one of fp32, bf16, got 'fp16'"):
            app_costs.measured_memory_mib(models, [1], "fp16", device="cpu")  # fp16 is offered on CUDA only
    assert {job.device for job in jobs} == {"cpu"} and len(jobs) == 2
    assert app_costs.memory_label("cpu") == "peak RSS above the weights"


# ---------------------------------------------------------------------------------------------
# ZeroGPU
# ---------------------------------------------------------------------------------------------


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


def test_without_spaces_the_wrapper_is_a_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # "import spaces" now raises ImportError
    assert zerogpu.spaces_module() is None and not zerogpu.GpuTasks.detect().active

    def work(x, device=None):
        return x, device

    assert zerogpu.GpuTasks.detect().task(30)(work) is work
    assert zerogpu.GpuTasks.detect().describe("cpu") == f"running on CPU ({torch.get_num_threads()} threads)"


def test_with_spaces_the_call_runs_in_spaces_gpu_with_its_duration_and_device(monkeypatch, two_gpus):
    calls = []
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces(calls))

    def work(x, device=None):
        return x, device

    def stream(n, device=None):
        yield from ((i, device) for i in range(n))

    gpu = zerogpu.GpuTasks.detect()
    wrapped, streamed = gpu.task(45)(work), gpu.task(20)(stream)
    assert ("decorated", "work", 45) in calls and ("decorated", "stream", 20) in calls
    assert wrapped(7) == (7, "cuda:0")  # the call's GPU (faked here)
    assert inspect.isgeneratorfunction(stream)
    assert list(streamed(2)) == [(0, "cuda:0"), (1, "cuda:0")]
    assert zerogpu.GpuTasks.detect(enabled=False).task(45)(work) is work
    assert "ZeroGPU" in zerogpu.GpuTasks.detect().describe("cpu")
    with pytest.raises(ValueError, match="duration must be a whole number of seconds"):
        gpu.task(0)


@pytest.fixture(scope="module")
def tiny_files(tiny_model_files):
    return tiny_model_files


def _registry(folder) -> ModelRegistry:
    return registry_of(folder, device="cpu")


@pytest.fixture
def tiny_registry(tiny_files):
    return _registry(tiny_files)


def test_zerogpu_generation_streams_across_the_boundary_with_the_models_moved(tiny_registry, monkeypatch):
    calls, placed = [], []
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces(calls))
    monkeypatch.setattr(zerogpu, "call_device", lambda: "cpu")  # the call's device: a CPU stands in here
    real_place = app_models.place_models
    monkeypatch.setattr(app_models, "place_models", lambda models, device: placed.append(device)
                        or real_place(models, device))
    model_tasks = tasks.model_tasks(tiny_registry, zerogpu.GpuTasks.detect())
    assert ("decorated", "frames", zerogpu.GENERATE_SECONDS) in calls
    assert ("decorated", "statistics", zerogpu.ANALYSIS_SECONDS) in calls
    assert model_tasks.precisions == ("fp32", "bf16", "fp16")  # ZeroGPU lends GPUs

    def settings(precision: str, images: int = 2, offered=None):
        return parse_settings(tiny_registry.load("tiny"), "class-3", 7, 1.0, 10, 0.95, False, images, precision,
                              "7", 8, precisions=offered)

    frames = list(model_tasks.frames("tiny", settings("bf16")))
    assert len(frames) == 21 and placed == ["cpu"] and ("call", "frames") in calls
    record = frames[-1].record  # came back through pickle: numpy images and CPU tensors only
    assert len(record.runs["MVAR"].finals) == 2
    assert all(w.device.type == "cpu" for run in record.runs.values() for scales in run.attention.values()
               for s in scales for w in s.values())
    stats, kernel_size = model_tasks.statistics("tiny", 1)
    assert kernel_size == 7 and stats.mass_by_distance.sum() == pytest.approx(1.0, abs=1e-3)
    assert placed == ["cpu", "cpu"]
    direct = tasks.model_tasks(tiny_registry, zerogpu.GpuTasks())  # no spaces: the registry's device, no move
    again = list(direct.frames("tiny", settings("bf16")))[-1].record
    assert placed == ["cpu", "cpu"] and direct.precisions == ("fp32", "bf16")
    assert (again.runs["MVAR"].finals[1] == record.runs["MVAR"].finals[1]).all()
    with pytest.raises(UserError, match=r"Precision must be one of fp32, bf16, got 'fp16'"):
        settings("fp16", 1, direct.precisions)


def test_placing_moves_the_models_and_their_low_precision_copies(tiny_files):
    models = _registry(tiny_files).load("tiny")
    copies = models.in_precision(torch.bfloat16)
    app_models.place_models(models, "meta")  # a device this machine has besides the CPU: nothing is computed there
    modules = [models.tokenizer, models.transformer, models.var_transformer, *copies]
    assert {p.device.type for m in modules for p in m.parameters()} == {"meta"}


def test_the_page_says_where_it_runs_and_offers_that_devices_precisions(tiny_registry, monkeypatch):
    def props(demo):
        return [c.get("props", {}) for c in demo.config["components"]]

    page = props(build_app(tiny_registry))
    (line,) = [p["value"] for p in page if p.get("elem_id") == "device-line"]
    assert line == f"running on CPU ({torch.get_num_threads()} threads)"
    (memory,) = [p["value"] for p in page if p.get("elem_id") == "memory-measure"]
    assert "Measured here on cpu: **peak RSS above the weights**" in memory
    radios = [p for p in page if p.get("label") == "Precision"]
    assert [[c[1] for c in r["choices"]] for r in radios][:2] == [["fp32", "bf16"], ["fp32", "bf16"]]
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces([]))
    page = props(build_app(tiny_registry, gpu=zerogpu.GpuTasks.detect()))
    assert any("running on ZeroGPU" in str(p.get("value")) for p in page if p.get("elem_id") == "device-line")
    generation = [p for p in page if p.get("label") == "Precision"][0]
    assert [c[1] for c in generation["choices"]] == ["fp32", "bf16", "fp16"]


def test_the_app_holds_models_on_the_cpu_when_spaces_imports(monkeypatch):
    script = _load_app_script()
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces([]))
    device, gpu = script.placement("cuda:0")
    assert device == "cpu" and gpu.active
    device, gpu = script.placement("cpu")  # --device cpu: no GPU calls at all
    assert device == "cpu" and not gpu.active
    monkeypatch.setitem(sys.modules, "spaces", None)
    device, gpu = script.placement("cuda:0")
    assert device == "cuda:0" and not gpu.active


# ---------------------------------------------------------------------------------------------
# The GPU check
# ---------------------------------------------------------------------------------------------


def test_the_gpu_check_refuses_a_machine_without_cuda(no_gpu, capsys):
    from mvar import gpu_check

    for argv in ([], ["--device", "cpu"], ["--quick"]):
        message = _cli_error(gpu_check.main, argv, capsys)
        assert "this check is for a CUDA machine" in message and "--device cpu --quick" in message


def test_the_gpu_check_skips_natten_with_a_reason(monkeypatch):
    from mvar import gpu_check

    monkeypatch.setattr(gpu_check, "natten_available", lambda: False)
    rows = gpu_check.attention_rows(gpu_check.CheckPlan.quick(), torch.device("cpu"))
    skipped = [r for r in rows if r.verdict == "skipped"]
    assert len(skipped) == 1 and "natten is not installed" in skipped[0].result
    assert all(r.verdict == "ok" for r in rows if r.check == "attention: gather vs dense")


@pytest.mark.slow
def test_the_gpu_check_dry_run_fills_its_table(tmp_path, capsys):
    from mvar import gpu_check

    rows = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "check.json")])
    table = capsys.readouterr().out.splitlines()
    assert table[1] == "| check | setting | result | verdict |" and len(table) == 3 + len(rows)
    checks = [r.check for r in rows]
    assert checks.count("generation: fp16 vs fp32") == 2 and checks.count("generation: bf16 vs fp32") == 2
    assert checks[-2:] == ["peak memory: MVAR vs VAR", "time: one image"]
    assert "peak RSS above the weights" in rows[-2].setting and rows[-2].values["peak_bytes"]["var"] > 0
    assert all(r.verdict != "FAIL" for r in rows)
    trained = [r for r in rows if r.check.startswith("generation") and "trained" in r.setting]
    assert all(r.values["finite"] and min(r.values["equal_tokens"].values()) >= gpu_check.TRAINED_AGREEMENT
               for r in trained)
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["plan"]["preset"] == "tiny" and len(saved["rows"]) == len(rows)
