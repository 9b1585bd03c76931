"""Run a plan (`slurm.launch`) on this machine: the same job functions, in order, no SLURM.

Each step's output goes to the console and to RUN/logs/local_<step>.log. A failed step stops the
chain; a rerun continues where it stopped because the job functions skip finished units.
"""
from __future__ import annotations

import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator, TextIO

from omegaconf import DictConfig

from unicom_ds.config import select
from slurm.launch import Job, log_dir, output_dir, target


class Tee:
    """A text stream writing to the console stream and a log file."""

    def __init__(self, console: TextIO, log: TextIO):
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.console.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:  # progress bars stay bars on a terminal
        return self.console.isatty()


@contextmanager
def tee_output(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} ===\n")
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, log), Tee(err, log)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            sys.stdout, sys.stderr = out, err


def run_subprocess(argv: list[str]) -> None:
    """Run argv, streaming its output line by line to sys.stdout (the tee)."""
    print("$ " + " ".join(argv), flush=True)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} exited with code {proc.returncode}")


def run_step(job: Job, cfg_dict: dict) -> None:
    if job.step == "train":  # deepspeed starts its own processes
        run_subprocess(target("train_local")(cfg_dict))
        return
    fn = target(job.step)
    for i, args in enumerate(job.tasks):
        if len(job.tasks) > 1:
            print(f"[{job.step}] task {i + 1}/{len(job.tasks)}", flush=True)
        fn(cfg_dict, *args)


def run(cfg: DictConfig, jobs: list[Job]) -> int:
    """Run the jobs in order; 0 when all succeed, 1 (after saying which step failed and where its log is)."""
    cfg_dict = select(cfg)
    summary = []
    for job in jobs:
        log = log_dir(cfg) / f"local_{job.step}.log"
        start = time.time()
        with tee_output(log):
            try:
                run_step(job, cfg_dict)
                ok = True
            except Exception:  # any failure stops the chain; the traceback goes to the log too
                traceback.print_exc()
                ok = False
        seconds = time.time() - start
        if not ok:
            print(f"stage {job.step} FAILED after {seconds:.1f}s; log: {log}", file=sys.stderr)
            print("fix the cause and rerun the same command: finished work is kept", file=sys.stderr)
            return 1
        what = f"{len(job.tasks)} task(s)" if job.is_array else "1 job"
        summary.append(f"{job.step:<7} done  {what:<11} {seconds:8.1f}s  -> {output_dir(cfg, job.step)}  (log {log})")
    print("\n".join(["", "summary:"] + summary))
    return 0
