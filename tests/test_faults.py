"""Training survives faults: a DDP rank that dies or hangs makes the others exit with a readable
error within the collective timeout (``--dist-timeout``) instead of hanging.

Two launch modes: plain processes with MASTER_ADDR/PORT, RANK and WORLD_SIZE set (nothing but
our timeout and error handling saves the survivor) and torchrun (whose agent also tears the job
down when a worker dies). Faults are injected by tests/ddp_worker.py (``DDP_FAULT``). Every
subprocess has a hard deadline; on expiry its whole process group is killed and the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mvar.checkpoints import save_model
from train.common import is_collective_failure
from train.data import file_digest, token_cache

from .test_training import REPO, free_port, subprocess_env
from .tiny_data import make_image_folder

DIST_TIMEOUT = 5  # seconds: the collective timeout of the runs below
DEADLINE = 60  # seconds: a hard limit on any run; reaching it means something hung
SLACK = 15  # seconds: process teardown on a loaded 2-core machine


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, tiny_tokenizer):
    """A random tiny tokenizer is enough: the runs only need to produce tokens. The runs' data
    folder sits beside it (``train_args`` finds it there)."""
    folder = tmp_path_factory.mktemp("faults")
    make_image_folder(folder / "data")
    save_model(folder / "tokenizer.safetensors", tiny_tokenizer)
    return folder / "tokenizer.safetensors"


def train_args(run_dir: Path, tokenizer: Path) -> list[str]:
    return ["--run-dir", str(run_dir), "--preset", "tiny", "--mode", "mvar", "--ratio-k", "1",
            "--tokenizer", str(tokenizer), "--data", str(tokenizer.parent / "data"),
            "--batch-size", "8", "--steps", "6", "--save-every", "1", "--log-every", "1", "--eval-every", "0",
            "--precision", "fp32", "--num-threads", "1", "--dist-timeout", str(DIST_TIMEOUT)]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of a process we started (its own session), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path],
             until: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """Poll until ``until(ended)`` is true and return ``ended``: name -> end time (time.time()) of
    each process seen finished. Past DEADLINE every process group is killed and the test fails.

    Each round polls every process once and decides from what it recorded only: asking the
    processes again (``until(procs)``) could see one that ended after its poll, which would then
    be missing from ``ended``."""
    ended: dict[str, float] = {}
    started = time.monotonic()
    while True:
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.time()
        if until(ended):
            return ended
        if time.monotonic() - started > DEADLINE:
            for proc in procs.values():
                kill_group(proc)
            dump = "\n".join(f"--- {name}\n{path.read_text()[-3000:]}" for name, path in logs.items())
            pytest.fail(f"still running after {DEADLINE} s (a hang):\n{dump}")
        time.sleep(0.05)


def fault_time(ranks_dir: Path, logs: dict[str, Path]) -> float:
    marker = ranks_dir / "fault-time"
    assert marker.exists(), "the fault never fired:\n" + "\n".join(p.read_text()[-2000:] for p in logs.values())
    return float(marker.read_text())


def cleanup_ranks(ranks_dir: Path) -> None:
    """Kill a worker left hanging on purpose (SIGKILL by pid, only the ones we started).

    A worker that has already ended and been reaped may have its pid reused by someone else's
    process: only a pid whose command line is still our worker's is killed."""
    for pid_file in ranks_dir.glob("pid*"):
        with contextlib.suppress(ProcessLookupError, ValueError, OSError):
            pid = int(pid_file.read_text())
            if b"tests.ddp_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def run_plain(fault: str, tokenizer: Path, tmp_path: Path):
    """Two plain processes (no torchrun); returns (return codes, end times, logs, fault time)."""
    ranks_dir = tmp_path / "ranks"
    port = str(free_port())
    command = [sys.executable, "-m", "tests.ddp_worker", str(ranks_dir), *train_args(tmp_path / "run", tokenizer)]
    procs, logs = {}, {}
    try:
        for rank in (0, 1):
            env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "DDP_FAULT": fault}
            logs[f"rank{rank}"] = tmp_path / f"rank{rank}.log"
            with open(logs[f"rank{rank}"], "w") as out:
                procs[f"rank{rank}"] = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                                        stderr=subprocess.STDOUT, start_new_session=True)
        victim = f"rank{fault.split(':')[0]}"
        survivor = "rank1" if victim == "rank0" else "rank0"
        ended = wait_all(procs, logs, lambda ended: survivor in ended)
        fired = fault_time(ranks_dir, logs)
    finally:
        cleanup_ranks(ranks_dir)
        for proc in procs.values():
            kill_group(proc)
    return procs[survivor].returncode, ended[survivor] - fired, logs[survivor].read_text()


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "expect", "limit"), [
    ("1:2:kill", "another rank closed its connection: it has died", SLACK),
    ("0:2:exit", "another rank closed its connection: it has died", SLACK),  # rank 0 also hosts the store
    ("1:2:hang", "another rank did not answer within the collective timeout (5 s, --dist-timeout)",
     DIST_TIMEOUT + SLACK),
], ids=["rank1-sigkill", "rank0-exits", "rank1-hangs"])
def test_plain_processes_survivor_exits_with_readable_error(fault, expect, limit, tokenizer_file, tmp_path):
    code, seconds, log = run_plain(fault, tokenizer_file, tmp_path)
    assert code == 1, log[-3000:]
    survivor = 1 if fault.startswith("0") else 0
    assert f"error: rank {survivor} of 2: a collective operation failed; " in log, log[-3000:]
    assert expect in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]  # one readable line, not a stack trace
    assert seconds < limit, f"the survivor took {seconds:.1f} s after the fault"
    if fault.endswith("hang"):
        assert seconds > DIST_TIMEOUT - 1  # a hung peer is only noticed by the timeout


@pytest.mark.slow
def test_plain_processes_rank0_dies_while_encoding_token_cache(tokenizer_file, tmp_path):
    """Rank 1 waits for rank 0's token cache on the file system (not in a collective); rank 0's
    heartbeat stops, and rank 1 gives up after --dist-timeout seconds instead of 24 hours."""
    code, seconds, log = run_plain("0:cache:kill", tokenizer_file, tmp_path)
    assert code == 1, log[-3000:]
    assert "error: gave up waiting for rank 0 to write the token cache" in log, log[-3000:]
    assert "rank 0 has probably died or hung (limit 5 s, --dist-timeout)" in log
    assert "Traceback" not in log
    assert DIST_TIMEOUT - 1 < seconds < DIST_TIMEOUT + SLACK, f"{seconds:.1f} s"


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["1:2:kill", "1:2:hang"], ids=["rank1-sigkill", "rank1-hangs"])
def test_torchrun_job_ends_when_a_rank_dies_or_hangs(fault, tokenizer_file, tmp_path):
    """torchrun's agent tears the job down as soon as one worker exits; a hung worker does not
    exit, so there the survivor's collective timeout is what ends the job."""
    ranks_dir, log = tmp_path / "ranks", tmp_path / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "tests.ddp_worker", str(ranks_dir),
               *train_args(tmp_path / "run", tokenizer_file)]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env={**subprocess_env(), "DDP_FAULT": fault}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ended = wait_all({"torchrun": proc}, {"torchrun": log}, lambda ended: "torchrun" in ended)
        fired = fault_time(ranks_dir, {"torchrun": log})
        workers_alive = [p.name for p in ranks_dir.glob("pid*") if _alive(int(p.read_text()))]
    finally:
        cleanup_ranks(ranks_dir)
        kill_group(proc)
    text = log.read_text()
    seconds = ended["torchrun"] - fired
    assert proc.returncode != 0, text[-3000:]
    assert not workers_alive, f"torchrun left workers running: {workers_alive}"
    assert "Root Cause (first observed failure)" in text, text[-3000:]
    if fault.endswith("kill"):
        # the agent reports the killed worker; the survivor is either stopped by the agent's SIGTERM
        # or has already exited with our error (gloo sees the closed connection at once): a race
        root_cause = text.split("Root Cause")[1]
        assert "rank      : 1" in root_cause and "Signal 9 (SIGKILL)" in root_cause, text[-3000:]
        assert seconds < SLACK, f"{seconds:.1f} s"
    else:
        # the hung worker is still alive: only the survivor's timeout ends the job
        assert "error: rank 0 of 2: a collective operation failed; another rank did not answer" in text, text[-3000:]
        root_cause = text.split("Root Cause")[1]
        assert "rank      : 0" in root_cause and "exitcode  : 1" in root_cause, text[-3000:]
        assert DIST_TIMEOUT - 1 < seconds < DIST_TIMEOUT + SLACK, f"{seconds:.1f} s"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running; our own children are reaped by Popen, others by torchrun
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The token-cache wait and error recognition, in process
# ---------------------------------------------------------------------------------------------


class SlowDataset(torch.utils.data.Dataset):
    """Blank images that take ``delay`` seconds each to load (a slow disk)."""

    def __init__(self, size: int, delay: float):
        self.size, self.delay = size, delay

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        time.sleep(self.delay)
        return torch.zeros(3, 4, 4), index % 3


class InstantTokenizer:
    """Token maps in no time, so that the dataset alone sets the pace of encoding."""

    @staticmethod
    def encode(images):
        return [torch.full((len(images), 1), 5), torch.full((len(images), 4), 7)]


FOUR_IMAGES = [(torch.zeros(3, 64, 64), label) for label in range(4)]  # a dataset of 4 (image, label) pairs


def test_token_cache_wait_gives_up_when_rank0_never_starts(tmp_path, tiny_tokenizer):
    path = tmp_path / "tok.safetensors"
    save_model(path, tiny_tokenizer)
    started = time.monotonic()
    with pytest.raises(SystemExit, match=r"rank 0 to write the token cache .* never appeared.*limit 0.5 s"):
        token_cache(tiny_tokenizer, path, FOUR_IMAGES, tmp_path / "cache", "val", is_main=False,
                    stall_seconds=0.5, poll_seconds=0.05)
    assert time.monotonic() - started < 5


def test_token_cache_wait_gives_up_on_a_stale_heartbeat_and_a_total_limit(tmp_path, tiny_tokenizer):
    path = tmp_path / "tok.safetensors"
    save_model(path, tiny_tokenizer)
    data = FOUR_IMAGES
    cache = tmp_path / "cache"
    cache.mkdir()
    name = f"tokens-val-4-{file_digest(path)}.pt"
    (cache / (name + ".heartbeat")).write_text("host:1:2 beat 3 encoded 256\n")  # left by a dead rank 0
    with pytest.raises(SystemExit, match=r"last changed 0 s ago \(host:1:2 beat 3 encoded 256\)"):
        token_cache(tiny_tokenizer, path, data, cache, "val", is_main=False, stall_seconds=0.3, poll_seconds=0.05)
    with pytest.raises(SystemExit, match="after 0.3 s"):  # the overall limit holds even with a live heartbeat
        stop = threading.Event()

        def beat():
            count = 0
            while not stop.is_set():
                count += 1
                (cache / (name + ".heartbeat")).write_text(f"beat {count}")
                time.sleep(0.02)

        thread = threading.Thread(target=beat)
        thread.start()
        try:
            token_cache(tiny_tokenizer, path, data, cache, "val", is_main=False, stall_seconds=10, wait_seconds=0.3,
                        poll_seconds=0.05)
        finally:
            stop.set()
            thread.join()


def test_token_cache_wait_follows_a_slow_but_live_rank0(tmp_path):
    """Encoding takes ~2x the stall limit, but every batch renews the heartbeat: the waiter waits."""
    path = tmp_path / "tok.bin"
    path.write_bytes(b"tokenizer")
    data = SlowDataset(size=12, delay=0.15)  # 6 batches of 2 images, 0.3 s each: 1.8 s in all
    cache = tmp_path / "cache"
    result = {}

    def rank0():
        result["main"] = token_cache(InstantTokenizer(), path, data, cache, "val", batch_size=2, log=lambda *_: None)

    thread = threading.Thread(target=rank0)
    started = time.monotonic()
    thread.start()
    try:
        waited = token_cache(InstantTokenizer(), path, data, cache, "val", is_main=False, stall_seconds=1.0,
                             poll_seconds=0.02)
    finally:
        thread.join()
    assert time.monotonic() - started > 1.0  # longer than the stall limit: the heartbeat kept it waiting
    assert torch.equal(waited[0], result["main"][0]) and torch.equal(waited[1], result["main"][1])
    assert waited[0].shape == (12, 5) and waited[1].tolist() == [i % 3 for i in range(12)]
    assert sorted(p.name for p in cache.iterdir()) == [f"tokens-val-12-{file_digest(path)}.pt"]  # no heartbeat left


def test_collective_failures_are_recognised():
    gloo_dead = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                             "closed by peer [127.0.0.1]:63618")
    assert is_collective_failure(gloo_dead)
    assert is_collective_failure(RuntimeError("Application timeout caused pair closure"))
    assert is_collective_failure(torch.distributed.DistBackendError("NCCL watchdog"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("timed out"))


def test_dist_timeout_flag(capsys):
    from train import train_tokenizer, train_transformer

    assert train_transformer.parse_args(["--run-dir", "x"]).dist_timeout == 600
    assert train_tokenizer.parse_args(["--run-dir", "x", "--dist-timeout", "30"]).dist_timeout == 30
    for script in (train_transformer, train_tokenizer):
        with pytest.raises(SystemExit):
            script.parse_args(["--run-dir", "x", "--dist-timeout", "0"])
        assert "--dist-timeout must be a positive number of seconds" in capsys.readouterr().err
