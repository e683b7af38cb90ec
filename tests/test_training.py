"""The training scripts' guarantees: MVAR's iteration schedule, step-indexed data order and label
dropout that shard exactly over ranks, the LR schedule and EMA, end-to-end tokenizer training,
bit-exact resume after SIGKILL, fallback from a corrupt checkpoint, a clear error for an
unwritable run folder, and DDP (ranks agree; 2 x B samples == 1 x 2B samples).

Every run uses the tiny preset, a 64-image training set and one torch thread, so the whole file
takes well under two minutes of CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mvar.checkpoints import load_model
from mvar.config import AttentionMode, get_preset
from mvar.transformer import ScaleTransformer
from train import train_tokenizer, train_transformer
from train.common import EMA, DistInfo, RunFolder, batch_indices, check_output_dir, warmup_cosine
from train.train_transformer import drop_labels, iteration_scales

from .tiny_data import make_image_folder

REPO = Path(__file__).resolve().parent.parent
NULL_CLASS = 12  # tiny preset: 12 classes, the null class is row 12


@contextlib.contextmanager
def one_thread():
    """The training scripts set torch's thread count globally; give the other tests theirs back."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(before)


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in RunFolder(run_dir).list()]


def final_model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = RunFolder(run_dir).list()[-1]
    return torch.load(newest, map_location="cpu", weights_only=True)["model"]


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:8]}"


# ---------------------------------------------------------------------------------------------
# 1. MVAR's iteration schedule
# ---------------------------------------------------------------------------------------------


def test_iteration_scales_follow_mvar_cycle():
    mode = AttentionMode.mvar(refine_step=8, kernel_size=7)
    cycle = [(0, 7)] * 8 + [(8, 8), (9, 9)]
    got = [iteration_scales(step, mode, 10, ratio_k=8) for step in range(3 * len(cycle))]
    assert got == cycle * 3


def test_iteration_scales_var_is_always_every_scale():
    assert {iteration_scales(step, AttentionMode.var(), 10, ratio_k=8) for step in range(50)} == {(0, 9)}


def test_a_cycle_without_joint_iterations_is_refused(capsys):
    with pytest.raises(ValueError, match="ratio_k"):
        AttentionMode.mvar().training_cycle(10, ratio_k=0)
    with pytest.raises(SystemExit):
        train_transformer.parse_args(["--run-dir", "x", "--tokenizer", "t", "--ratio-k", "0"])
    assert "--ratio-k must be at least 1" in capsys.readouterr().err


def test_iteration_scales_edge_cases():
    # ratio_k 2: two joint iterations, then each windowed scale once
    mode = AttentionMode.mvar(refine_step=8)
    assert [iteration_scales(s, mode, 10, ratio_k=2) for s in range(8)] == [(0, 7), (0, 7), (8, 8), (9, 9)] * 2
    # refine_step beyond the last scale: nothing is windowed, every iteration is the joint block
    assert iteration_scales(5, AttentionMode.mvar(refine_step=12), 10, ratio_k=8) == (0, 9)
    # refine_step 0: every scale is windowed, so there is no joint block and each scale gets one iteration
    mode = AttentionMode.mvar(refine_step=0)
    assert [iteration_scales(s, mode, 10, ratio_k=8)[0] for s in range(20)] == list(range(10)) * 2


# ---------------------------------------------------------------------------------------------
# 2-3. Data order and label dropout: functions of (seed, step), sharded exactly over ranks
# ---------------------------------------------------------------------------------------------


def test_batch_indices_deterministic_and_epoch_permutations():
    one = DistInfo()
    size, batch = 22, 4  # 5 batches per epoch, the last 2 samples of each permutation are dropped
    assert batch_indices(3, size, batch, 7, one) == batch_indices(3, size, batch, 7, one)
    assert batch_indices(3, size, batch, 7, one) != batch_indices(3, size, batch, 8, one)
    epochs = []
    for epoch in range(3):
        seen = [i for step in range(epoch * 5, epoch * 5 + 5) for i in batch_indices(step, size, batch, 7, one)]
        assert len(seen) == len(set(seen)) == 20  # no repeats within an epoch
        assert set(seen) <= set(range(size))
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh permutation every epoch
    # an exact multiple covers the whole dataset every epoch
    for epoch in range(2):
        seen = [i for step in range(epoch * 4, epoch * 4 + 4) for i in batch_indices(step, 16, 4, 0, one)]
        assert sorted(seen) == list(range(16))


def test_batch_indices_two_ranks_equal_one_rank_with_double_batch():
    for step in range(12):
        single = batch_indices(step, 40, 8, 3, DistInfo(rank=0, world_size=1))
        shards = [batch_indices(step, 40, 8, 3, DistInfo(rank=r, world_size=2)) for r in range(2)]
        assert [len(s) for s in shards] == [4, 4]
        assert shards[0] + shards[1] == single
        four = [batch_indices(step, 40, 8, 3, DistInfo(rank=r, world_size=4)) for r in range(4)]
        assert sum(four, []) == single


def test_batch_indices_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        batch_indices(0, 40, 6, 0, DistInfo(rank=0, world_size=4))
    with pytest.raises(ValueError, match="smaller than one batch"):
        batch_indices(0, 5, 8, 0, DistInfo())


def test_drop_labels_shards_over_ranks_and_extremes():
    labels = torch.arange(16) % NULL_CLASS
    for step in range(5):
        single = drop_labels(labels, 0.5, NULL_CLASS, seed=1, step=step, info=DistInfo())
        shards = [drop_labels(labels[r * 8 : (r + 1) * 8], 0.5, NULL_CLASS, seed=1, step=step,
                              info=DistInfo(rank=r, world_size=2)) for r in range(2)]
        assert torch.equal(torch.cat(shards), single)
        assert torch.equal(single, drop_labels(labels, 0.5, NULL_CLASS, seed=1, step=step, info=DistInfo()))
        kept = single != NULL_CLASS
        assert torch.equal(single[kept], labels[kept])  # a label is either kept as is or nulled
    draws = torch.stack([drop_labels(labels, 0.5, NULL_CLASS, 1, s, DistInfo()) for s in range(40)])
    assert 0.3 < (draws == NULL_CLASS).float().mean() < 0.7
    assert not torch.equal(draws[0], draws[1])  # a new draw every step
    assert torch.equal(drop_labels(labels, 0.0, NULL_CLASS, 1, 0, DistInfo()), labels)
    assert (drop_labels(labels, 1.0, NULL_CLASS, 1, 0, DistInfo()) == NULL_CLASS).all()


# ---------------------------------------------------------------------------------------------
# 8. Learning-rate schedule and EMA
# ---------------------------------------------------------------------------------------------


def test_warmup_cosine_shape():
    peak, total, warmup, final = 2e-3, 110, 10, 0.1
    lrs = [warmup_cosine(s, total, warmup, peak, final) for s in range(total + 1)]
    assert lrs[:warmup] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])  # linear warmup
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    decay = lrs[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))  # monotone cosine decay
    assert lrs[warmup + 50] == pytest.approx(peak * (final + (1 - final) * 0.5))  # half way down
    assert lrs[total] == pytest.approx(final * peak)
    assert warmup_cosine(total + 50, total, warmup, peak, final) == pytest.approx(final * peak)  # clamped
    expected = peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * 0.3)))
    assert lrs[warmup + 30] == pytest.approx(expected)


def test_ema_update_and_copy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.9)
    assert "1.num_batches_tracked" not in ema.shadow  # integer buffers are not averaged
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(ema.shadow[name], 0.9 * start[name] + 0.1 * value)
    second = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    ema.update(model)
    weight = model.state_dict()["0.weight"]
    assert torch.allclose(ema.shadow["0.weight"], 0.9 * second["0.weight"] + 0.1 * weight)
    ema.copy_to(model)
    assert torch.equal(model.state_dict()["0.weight"], ema.shadow["0.weight"])


# ---------------------------------------------------------------------------------------------
# 6. Unwritable run folder and checkpoint fallback
# ---------------------------------------------------------------------------------------------


def test_check_output_dir_rejects_unwritable_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="not writable") as err:
        check_output_dir(blocker / "run")
    assert str(blocker / "run") in str(err.value)
    with pytest.raises(SystemExit, match="MiB free"):
        check_output_dir(tmp_path / "ok", need_bytes=2**62)
    check_output_dir(tmp_path / "ok")  # a writable folder passes and leaves no test file behind
    assert list((tmp_path / "ok").iterdir()) == []


@pytest.mark.parametrize("script", [train_transformer, train_tokenizer], ids=["transformer", "tokenizer"])
def test_training_exits_before_starting_on_unwritable_run_dir(tmp_path, script):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = ["--run-dir", str(blocker / "run"), "--preset", "tiny", "--num-threads", "1"]
    if script is train_transformer:
        argv += ["--tokenizer", str(tmp_path / "missing.safetensors")]  # never reached
    with one_thread(), pytest.raises(SystemExit, match="not writable"):
        script.main(argv)


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path):
    run = RunFolder(tmp_path / "run", keep=3)
    for step in (1, 2, 3):
        run.save(step, {"step": step, "w": torch.full((4,), float(step))})
    assert checkpoint_steps(run.path) == [1, 2, 3]
    newest = run.list()[-1]
    newest.write_bytes(newest.read_bytes()[:40])  # truncated, as after a crash mid-copy
    with pytest.warns(UserWarning, match="step-0000003.pt is unreadable"):
        state = run.load_latest()
    assert state["step"] == 2 and torch.equal(state["w"], torch.full((4,), 2.0))
    for path in run.list():
        path.write_bytes(b"garbage")
    with pytest.warns(UserWarning):
        assert run.load_latest() is None
    assert RunFolder(tmp_path / "empty").load_latest() is None


def test_run_folder_keeps_newest_and_leaves_no_temp_files(tmp_path):
    run = RunFolder(tmp_path / "run", keep=2)
    for step in range(1, 6):
        run.save(step, {"step": step})
    assert checkpoint_steps(run.path) == [4, 5]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-0000004.pt", "step-0000005.pt"]


# ---------------------------------------------------------------------------------------------
# 4. Tokenizer training end to end (its export feeds the transformer tests)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """A tiny tokenizer trained on the tests' image folder, which sits beside it (``data_beside``)."""
    root = tmp_path_factory.mktemp("tokenizer")
    export = root / "tokenizer.safetensors"
    make_image_folder(root / "data")
    argv = ["--run-dir", str(root / "run"), "--preset", "tiny", "--data", str(root / "data"),
            "--val-size", "16", "--batch-size", "8", "--steps", "6", "--save-every", "3", "--log-every", "2",
            "--reseed-every", "3", "--num-threads", "1", "--export", str(export)]
    with one_thread():
        train_tokenizer.main(argv)
    return root / "run", export


def test_tokenizer_training_end_to_end(tokenizer_run):
    run_dir, export = tokenizer_run
    loaded = load_model(export, expect="tokenizer")
    assert loaded.config.vocab_size == 32 and loaded.config.image_size == 64
    assert len(loaded.extra["class_names"]) == NULL_CLASS
    card = json.loads(export.with_suffix(".json").read_text())
    assert card["steps"] == 6 and card["kind"] == "tokenizer"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in losses)
    assert [r["step"] for r in records if "dead_codes_reseeded" in r] == [3, 6]
    assert any("val_psnr" in r for r in records)
    assert checkpoint_steps(run_dir) == [3, 6]
    with torch.no_grad():  # the exported tokenizer round-trips an image through its token maps
        tokens = loaded.model.encode(torch.zeros(1, 3, 64, 64))
    assert len(tokens) == 10 and all(int(t.max()) < 32 for t in tokens)


# ---------------------------------------------------------------------------------------------
# 5. Exact resume of the transformer after SIGKILL
# ---------------------------------------------------------------------------------------------

STEPS = 8


def data_beside(tokenizer: Path) -> str:
    return str(Path(tokenizer).parent / "data")


def transformer_argv(run_dir: Path, tokenizer: Path, mode: str, *extra: str) -> list[str]:
    argv = ["--run-dir", str(run_dir), "--preset", "tiny", "--mode", mode, "--tokenizer", str(tokenizer),
            "--data", data_beside(tokenizer), "--val-size", "16", "--batch-size", "8",
            "--steps", str(STEPS), "--save-every", "2", "--log-every", "2", "--eval-every", "0",
            "--num-threads", "1", "--export", str(run_dir / "model.safetensors"), *extra]
    if mode == "mvar":
        argv += ["--ratio-k", "2"]  # 8 steps = two cycles of joint, joint, scale 8, scale 9
    return argv


@pytest.fixture(scope="module")
def uninterrupted(tokenizer_run, tmp_path_factory):
    """One uninterrupted in-process run per mode, shared by the resume tests."""
    runs = {}

    def get(mode: str) -> Path:
        if mode not in runs:
            run_dir = tmp_path_factory.mktemp(f"uninterrupted-{mode}")
            with one_thread():
                train_transformer.main(transformer_argv(run_dir, tokenizer_run[1], mode))
            runs[mode] = run_dir
        return runs[mode]

    return get


def run_logged(command: list[str], log: Path, deadlock_seconds: float = 900) -> None:
    """Run a command to completion with its output in ``log``. The generous limit only turns a
    deadlock (e.g. a collective that one rank never joins) into a failure instead of a hang; on
    expiry the whole process group we started (torchrun and its workers) is killed."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=deadlock_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{command[:4]} did not finish in {deadlock_seconds} s:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-4000:]


def run_script(argv: list[str], log: Path) -> None:
    run_logged([sys.executable, "-m", "train.train_transformer", *argv], log)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["var", "mvar"])
def test_resume_after_sigkill_is_bit_exact(mode, tokenizer_run, uninterrupted, tmp_path):
    reference = uninterrupted(mode)
    run_dir = tmp_path / "killed"
    argv = transformer_argv(run_dir, tokenizer_run[1], mode)

    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "train.train_transformer", *argv], cwd=REPO,
                                env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        # one poll per round, and the decision from that poll: a run that ended between a check and
        # the kill would otherwise be "killed" after its exit (and os.kill could hit a reused pid)
        while (exited := proc.poll()) is None and not [s for s in checkpoint_steps(run_dir) if s >= 2]:
            time.sleep(0.005)
        if exited is None:
            proc.send_signal(signal.SIGKILL)  # Popen skips the signal if the run has been reaped since
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed:\n" + log.read_text()[-2000:]
    killed_at = checkpoint_steps(run_dir)[-1]
    assert 2 <= killed_at < STEPS
    assert not (run_dir / "model.safetensors").exists()

    resumed_log = tmp_path / "resumed.log"
    run_script(argv, resumed_log)
    assert f"resumed from step {killed_at}" in resumed_log.read_text()
    assert checkpoint_steps(run_dir)[-1] == STEPS

    assert_states_equal(final_model_state(run_dir), final_model_state(reference))
    ours = load_model(run_dir / "model.safetensors", expect="transformer").model.state_dict()
    theirs = load_model(reference / "model.safetensors", expect="transformer").model.state_dict()
    assert_states_equal(ours, theirs)
    # the metrics log has every logged step of the uninterrupted run with the same loss (a step logged
    # after the last checkpoint and before the kill is logged twice, with the same value)
    def losses(folder):
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    assert losses(run_dir) == losses(reference)


def test_resume_falls_back_past_a_corrupt_checkpoint(tokenizer_run, uninterrupted, tmp_path):
    """Stop at step 6 (checkpoints 4 and 6 kept), truncate step 6, rerun: resumes from 4, same weights."""
    reference = uninterrupted("var")
    run_dir = tmp_path / "run"
    argv = transformer_argv(run_dir, tokenizer_run[1], "var")
    with one_thread():
        train_transformer.main([*argv, "--stop-after", "6"])
        assert checkpoint_steps(run_dir) == [4, 6]
        newest = RunFolder(run_dir).list()[-1]
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        with pytest.warns(UserWarning, match="step-0000006.pt is unreadable"):
            train_transformer.main(argv)
    assert checkpoint_steps(run_dir) == [6, 8]
    assert_states_equal(final_model_state(run_dir), final_model_state(reference))


# ---------------------------------------------------------------------------------------------
# 7. DDP on CPU (gloo): ranks agree, and 2 ranks x B == 1 process x 2B
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_match_single_process(tokenizer_run, tmp_path):
    # fp32 so that bf16 rounding does not blur the comparison; a real learning rate from step 0 (no
    # warm-up) so that the step moves the weights far more than the tolerance; mvar with ratio_k 1 so that step
    # 0 is the joint block and step 1 a windowed scale alone (DDP with unused parameters)
    common = ["--preset", "tiny", "--mode", "mvar", "--ratio-k", "1", "--tokenizer", str(tokenizer_run[1]),
              "--data", data_beside(tokenizer_run[1]), "--val-size", "16", "--batch-size", "8", "--steps", "2",
              "--save-every", "1", "--log-every", "1", "--eval-every", "0", "--precision", "fp32",
              "--lr", "1e-3", "--warmup", "0", "--num-threads", "1"]
    ddp_dir, single_dir, ranks_dir = tmp_path / "ddp", tmp_path / "single", tmp_path / "ranks"
    log = tmp_path / "ddp.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "tests.ddp_worker", str(ranks_dir),
               "--run-dir", str(ddp_dir), *common]
    run_logged(command, log)
    with one_thread():
        train_transformer.main(["--run-dir", str(single_dir), *common])

    # (a) after two steps both ranks hold bit-identical weights, equal to rank 0's checkpoint
    rank0, rank1 = (torch.load(ranks_dir / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert_states_equal(rank0, rank1)
    assert_states_equal(rank0, final_model_state(ddp_dir))

    # (b) 2 ranks x 4 samples == 1 process x 8 samples, after one AdamW step and after two
    for step in (1, 2):
        ddp = torch.load(ddp_dir / "checkpoints" / f"step-{step:07d}.pt", weights_only=True)["model"]
        single = torch.load(single_dir / "checkpoints" / f"step-{step:07d}.pt", weights_only=True)["model"]
        assert ddp.keys() == single.keys()
        for name in ddp:
            torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=0, msg=f"{step}: {name}")
    # the comparison has teeth: one step moved the weights by far more than the tolerance
    torch.manual_seed(0)
    start = ScaleTransformer(get_preset("tiny").transformer).state_dict()  # the scripts' init: seed 0
    moved = max(float((single[k] - start[k]).abs().max()) for k in start if start[k].is_floating_point())
    assert moved > 5e-4
    # and the logged (all-reduced) losses agree
    def losses(folder):
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    assert losses(ddp_dir) == pytest.approx(losses(single_dir), abs=1e-5)


@pytest.mark.parametrize("flag", ["--log-every", "--save-every", "--steps", "--batch-size"])
def test_non_positive_intervals_are_refused_up_front(flag, capsys):
    from train import train_transformer

    with pytest.raises(SystemExit):
        train_transformer.parse_args(["--run-dir", "/tmp/unused", flag, "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_export_checkpoint_takes_the_newest_checkpoint_of_an_unfinished_run(tokenizer_run, uninterrupted, tmp_path):
    """export_checkpoint turns a run's newest checkpoint into a loadable file with an honest card."""
    import shutil

    from train import export_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted("mvar"), run_dir)
    (run_dir / "checkpoints" / f"step-{STEPS:07d}.pt").unlink()  # as if the run had stopped at step 6
    out = tmp_path / "exported.safetensors"
    with one_thread():
        export_checkpoint.main(["--run-dir", str(run_dir), "--out", str(out)])
    loaded = load_model(out, expect="transformer")
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["steps"] == STEPS - 2 and card["planned_steps"] == STEPS and card["stopped_early"]
    assert card["trained_mode"] == "mvar" and math.isfinite(card["val_loss"])
    assert loaded.extra["attention"] == {"refine_step": 8, "kernel_size": 7}
    assert len(loaded.extra["class_names"]) == NULL_CLASS
    state = RunFolder(run_dir).load_latest()  # the step-6 checkpoint: its EMA weights if it kept them
    expected = state["ema"] if state.get("ema") else state["model"]
    exported = loaded.model.state_dict()
    for name, value in state["model"].items():
        torch.testing.assert_close(exported[name].float(), expected.get(name, value).bfloat16().float())
    with pytest.raises(SystemExit, match="no readable checkpoint"):
        export_checkpoint.main(["--run-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x.safetensors")])
