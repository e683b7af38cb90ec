"""FID-ready sampling (mvar/sample_fid.py): exact and balanced, the same images on any number of ranks,
and a run killed with SIGKILL resumes to the same final .npz."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mvar.checkpoints import save_model
from mvar.config import VAR_MODE
from mvar.sample_fid import main, sampling_settings
from mvar.sampling import SamplingConfig, generate
from mvar.tokenizer import to_uint8

from .test_training import REPO, free_port, subprocess_env

DEADLINE = 240  # seconds for any subprocess here; reaching it means a hang


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_tokenizer, tiny_transformer):
    folder = tmp_path_factory.mktemp("fid-models")
    save_model(folder / "tok.safetensors", tiny_tokenizer)
    save_model(folder / "mvar.safetensors", tiny_transformer, extra={"trained_mode": "mvar"})
    return folder


def flags(models: Path, out: Path, *extra: str) -> list[str]:
    return ["--tokenizer", str(models / "tok.safetensors"), "--transformer", str(models / "mvar.safetensors"),
            "--out", str(out), "--cfg", "1.5", "--top-k", "0", "--top-p", "0.9", "--device", "cpu", *extra]


def test_n_is_exact_the_labels_are_balanced_and_each_image_is_its_index(model_files, tmp_path, tiny_tokenizer,
                                                                       tiny_transformer):
    out = tmp_path / "run"
    main(flags(model_files, out, "--per-class", "2", "--batch-size", "5", "--mode", "var", "--seed", "100"))
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (24, 64, 64, 3) and npz["arr_0"].dtype == np.uint8
    assert np.bincount(npz["labels"]).tolist() == [2] * 12
    assert len(list((out / "images").glob("*.png"))) == 24 and not list((out / "images").glob(".*"))
    # image 13 is class 13 // 2 = 6 with seed 100 + 13, whatever batch it was drawn in
    alone = generate(tiny_transformer, tiny_tokenizer, [6], [113], SamplingConfig(1.5, 0, 0.9), VAR_MODE)
    assert np.abs(to_uint8(alone.images)[0].astype(int) - npz["arr_0"][13].astype(int)).max() <= 1


def test_two_ranks_under_torchrun_write_the_same_images_as_one_process(model_files, tmp_path):
    one = tmp_path / "one"
    main(flags(model_files, one, "--per-class", "1", "--batch-size", "4"))
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "mvar.sample_fid", *flags(model_files, two, "--per-class", "1",
                                                               "--batch-size", "3")]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
    assert np.array_equal(a["labels"], b["labels"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # batch round-off only


def test_a_run_killed_with_sigkill_resumes_to_the_same_npz(model_files, tmp_path):
    reference = tmp_path / "reference"
    main(flags(model_files, reference, "--per-class", "1", "--batch-size", "2"))
    out = tmp_path / "killed"
    worker = subprocess.Popen([sys.executable, "-m", "tests.fid_worker",
                               *flags(model_files, out, "--per-class", "1", "--batch-size", "2")],
                              cwd=REPO, env={**subprocess_env(), "FID_STOP_AFTER": "3"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _, status = os.waitpid(worker.pid, os.WUNTRACED)  # returns once the worker has stopped itself
        assert os.WIFSTOPPED(status), worker.stdout.read().decode()[-3000:]
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=DEADLINE)
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert not (out / "samples.npz").exists()
    main(flags(model_files, out, "--per-class", "1", "--batch-size", "2"))
    a, b = np.load(reference / "samples.npz"), np.load(out / "samples.npz")
    assert np.array_equal(a["labels"], b["labels"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
    assert len(list((out / "images").glob("*.png"))) == 12


def test_resuming_with_other_settings_or_bad_classes_is_refused(model_files, tmp_path):
    out = tmp_path / "run"
    main(flags(model_files, out, "--per-class", "1", "--classes", "0", "1"))
    with pytest.raises(SystemExit, match="holds a run with other settings \\(cfg differ\\)"):
        main([*flags(model_files, out, "--per-class", "1", "--classes", "0", "1"), "--cfg", "2.0"])
    with pytest.raises(SystemExit, match="--classes \\[12\\] out of range 0..11"):
        main(flags(model_files, tmp_path / "other", "--classes", "12"))
    with pytest.raises(SystemExit):
        main(flags(model_files, tmp_path / "other", "--per-class", "0"))


def test_official_files_get_the_official_suggested_settings():
    def args(name, **given):
        return argparse.Namespace(transformer=f"models/{name}", cfg=None, top_k=None, top_p=None, **given)

    assert sampling_settings(args("mvar-d16.pth"), {}) == {"cfg": 2.7, "top_k": 1200, "top_p": 0.99}
    assert sampling_settings(args("mvar-finetune-d24.pth"), {}) == {"cfg": 1.4, "top_k": 900, "top_p": 0.96}
    assert sampling_settings(args("var_d30.pth"), {}) == {"cfg": 1.5, "top_k": 900, "top_p": 0.96}
    ours = {"sampling_defaults": {"cfg": 4.0, "top_k": 0, "top_p": 0.9}}
    assert sampling_settings(args("mvar.safetensors"), ours) == {"cfg": 4.0, "top_k": 0, "top_p": 0.9}
    chosen = argparse.Namespace(transformer="models/mvar-d16.pth", cfg=1.0, top_k=None, top_p=None)
    assert sampling_settings(chosen, {})["cfg"] == 1.0
