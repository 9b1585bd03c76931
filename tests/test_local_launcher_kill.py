"""Killing the local launcher (SIGTERM, or Ctrl-C's SIGINT) ends the processes of the step it runs: they run in a
process group of their own, which the launcher ends (SIGTERM, then SIGKILL) before it exits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress

import psutil
import pytest

from conftest import REPO
from tests.train_fixtures import ds_config, make_run

LAUNCHER = "import sys; from slurm.launch_local import run_subprocess; run_subprocess(sys.argv[1:])"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # the launcher's lines reach us as written


@pytest.fixture
def start():
    """start(argv, ready): the launcher, once a line of its step holds `ready`, and the processes it has started by
    then; whatever the test asserts, they are killed after it."""
    started = []

    def launch(argv: list[str], ready: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
        launcher = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        started.append(psutil.Process(launcher.pid))
        seen = []
        for line in launcher.stdout:
            seen.append(line)
            if ready in line and not line.startswith("$ "):  # not the launcher's echo of the command
                started.extend(psutil.Process(launcher.pid).children(recursive=True))
                return launcher, started[1:]
        raise AssertionError(f"the launcher exited with {launcher.wait()} before printing {ready!r}:\n{''.join(seen)}")

    yield launch
    for p in started:
        with suppress(psutil.NoSuchProcess):
            p.kill()


def left_running(procs: list[psutil.Process], within_s: float) -> list[psutil.Process]:
    """Those of procs still running after within_s seconds."""
    deadline = time.monotonic() + within_s
    while (running := [p for p in procs if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running


def alive(p: psutil.Process) -> bool:
    """Running, and not a zombie waiting for its reaper (here perhaps a PID 1 that never reaps)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# The step: a process that starts a grandchild (exec'd once Popen returns) and waits for it; both take SIGTERM as
# `{}` says.
STEP = ("import signal, subprocess; signal.signal(signal.SIGTERM, {}); "
        "sleep = subprocess.Popen(['sleep', '600']); print('started', flush=True); sleep.wait()")


@pytest.mark.parametrize("sig, exit_code, on_term", [
    (signal.SIGTERM, 128 + signal.SIGTERM, "signal.SIG_DFL"),
    (signal.SIGINT, -signal.SIGINT, "signal.SIG_DFL"),  # KeyboardInterrupt re-raised: Python ends itself with SIGINT
    (signal.SIGTERM, 128 + signal.SIGTERM, "signal.SIG_IGN"),  # a group deaf to SIGTERM gets SIGKILL
])
def test_a_killed_launcher_ends_the_grandchildren_of_its_step(start, sig, exit_code, on_term):
    launcher, procs = start([sys.executable, "-c", LAUNCHER, sys.executable, "-c", STEP.format(on_term)], "started")
    assert len(procs) == 2 and "sleep" in [p.name() for p in procs]  # the step and its grandchild
    launcher.send_signal(sig)
    assert launcher.wait(timeout=30) == exit_code
    assert left_running(procs, within_s=5) == []


@pytest.mark.slow
def test_a_killed_local_train_stage_ends_its_deepspeed_ranks(start, tmp_path):
    """`submit.py stage=train launcher=local`, SIGTERM after its first step: deepspeed's runner and both ranks end."""
    data = make_run(tmp_path, [13, 9, 6], k=10)
    (data["run"] / "kmeans" / "summary.json").write_text(json.dumps({"k": 10}))
    launcher, procs = start(
        [sys.executable, "slurm/submit.py", "stage=train", "launcher=local", f"run_dir={data['run']}",
         f"data.shards={data['shards']}", "model=ViT-Tiny-16", "device=cpu",
         f"train.deepspeed_config={ds_config(tmp_path / 'ds.json')}", "train.epochs=100", "train.steps_per_epoch=4",
         "train.log_every=1", "train.workers=0", "train.local_processes=2", "loss.r1=1.0", "progress=off"],
        "] step 1/")
    assert sum(any(arg.startswith("--local_rank=") for arg in p.cmdline()) for p in procs) == 2  # the ranks
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
    assert left_running(procs, within_s=5) == []
