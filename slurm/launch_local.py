"""Run a plan (`slurm.launch`) on this machine: the same job functions, in order, no SLURM.

Each step's output goes to the console and to RUN/logs/local_<step>.log. A failed step stops the
chain; a rerun continues where it stopped because the job functions skip finished units.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Iterator, TextIO

from omegaconf import DictConfig

from unicom_ds import quiet, shards
from unicom_ds.atomic import read_json
from unicom_ds.config import ConfigError, select
from unicom_ds.disk import DiskFull
from slurm.launch import Job, log_dir, output_dir, target


class Tee:
    """A text stream writing to the console stream and a log file."""

    def __init__(self, console: TextIO, log: TextIO):
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.console.write(text)
        self._to_log(self.log.write, text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self._to_log(self.log.flush)

    def _to_log(self, method, *args) -> None:
        """A log that cannot be written (a full disk) is dropped, said once: the console still shows it all."""
        if self.log is None:
            return
        try:
            method(*args)
        except OSError as e:
            self.log = None
            self.console.write(f"(no more output to the log file: {e})\n")

    def isatty(self) -> bool:  # progress bars stay bars on a terminal
        return self.console.isatty()


@contextmanager
def tee_output(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a")
    try:
        log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} ===\n")
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, log), Tee(err, log)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            sys.stdout, sys.stderr = out, err
    finally:
        with suppress(OSError):  # a full disk: the console already has every line
            log.close()


def run_subprocess(argv: list[str]) -> None:
    """Run argv, streaming its output line by line to sys.stdout (the tee), less the known noise (unicom_ds.quiet).

    argv runs in a process group of its own (deepspeed's runner and the ranks it starts), which ends with the
    launcher: on SIGTERM (exit 128+15), Ctrl-C (KeyboardInterrupt) or any other exception.
    """
    print("$ " + " ".join(argv), flush=True)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          start_new_session=True, env=quiet.child_env()) as proc, ended_with_launcher(proc):
        for line in proc.stdout:
            if not quiet.is_noise(line):
                sys.stdout.write(line)
    if proc.returncode:
        raise SubprocessFailed(f"the step's processes exited with code {proc.returncode} (their output above says why)")


@contextmanager
def ended_with_launcher(proc: subprocess.Popen) -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(128+15) and SIGINT KeyboardInterrupt; any exception
    leaving the block ends proc's process group first."""
    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    handlers = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, terminated), (signal.SIGINT, signal.default_int_handler))}
    try:
        yield
    except BaseException:
        end_group(proc)
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def end_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to proc's process group, SIGKILL to what is left of it after grace_s."""
    with suppress(ProcessLookupError):  # raised once no process of the group is left
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reaps proc: a zombie would still count as a member
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)


class SubprocessFailed(RuntimeError):
    """A step's own processes failed; they printed why, so no traceback of the launcher is shown."""


def run_step(job: Job, cfg_dict: dict) -> None:
    if job.step in ("train", "finetune"):  # deepspeed starts its own processes
        argv = target(f"{job.step}_local")(cfg_dict)
        if "--num_gpus" in argv:  # their first line comes after torch and DeepSpeed are imported in each
            print(f"starting {_n(int(argv[argv.index('--num_gpus') + 1]), 'DeepSpeed rank')} (about 20 s)...",
                  flush=True)
        run_subprocess(argv)
        return
    fn = target(job.step)
    if isinstance(fn, type):  # a submitit Checkpointable (DetectJob): its instance is the job function
        fn = fn()
    for i, args in enumerate(job.tasks):
        if len(job.tasks) > 1:
            print(f"[{job.step}] task {i + 1}/{len(job.tasks)}: "
                  f"{_n(len(args[0]), 'part' if job.step == 'import' else 'shard')}", flush=True)
        fn(cfg_dict, *args)


def _read(path: Path) -> dict | None:
    try:
        return read_json(path) if path.is_file() else None
    except ValueError:  # a summary being rewritten or damaged: the summary line just says less
        return None


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def outcome(cfg: DictConfig, job: Job) -> str:
    """What a finished step produced, in shards, rows, classes and data sets, read from the run directory."""
    out = output_dir(cfg, job.step)
    if job.step == "embed":
        from cluster_job.features import source_run
        source = source_run(cfg)  # embed.from: the shards of another run, read in place
        stems = [shards.stem(p) for args in job.tasks for p in args[0]]
        done = [d for d in (_read(Path(source) / "embed" / f"{s}.done.json") for s in stems) if d is not None]
        rows = _n(sum(int(d.get("n", 0)) for d in done), "row")
        if source != str(cfg.run_dir):
            return f"{_n(len(done), 'shard')} reused from {source} (embed.from), {rows}"
        skipped = sum(int(v) for d in done for v in d.get("skipped", {}).values())
        damaged = sum(bool(d.get("damaged")) for d in done)
        return f"{len(done)} of {_n(len(stems), 'shard')}, {rows} " \
               f"({skipped} skipped)" + (f", {damaged} damaged" if damaged else "")
    if job.step == "import":
        done = [d for d in map(_read, sorted(out.glob("*.done.json"))) if d is not None]
        # dropped in the join (not in the download, ambiguous) and as non-finite rows when the shards were written
        join = (_read(out / "parts" / "join.json") or {}).get("skipped", {})
        skipped = sum(int(v) for v in join.values()) + sum(int(v) for d in done for v in d.get("skipped", {}).values())
        parts = sum(1 for args in job.tasks for _ in args[0])
        return f"{_n(parts, 'part')} -> {_n(len(done), 'shard')}, {_n(sum(int(d.get('n', 0)) for d in done), 'row')} " \
               f"({skipped} released rows dropped)"
    if job.step == "kmeans":
        s = _read(out / "summary.json") or {}
        return f"k={s.get('k', '?')} on {s.get('points_used', '?')} of {s.get('points_embedded', '?')} rows"
    if job.step == "assign":
        s = _read(out / "summary.json")
        labelled = sum((out / f"{stem}.npy").is_file() for args in job.tasks for stem in args[0])
        if s is None:
            return f"{_n(labelled, 'shard')} labelled"
        return f"{_n(int(s.get('shards', labelled)), 'shard')}, {_n(int(s.get('rows', 0)), 'row')}, " \
               f"{s.get('non_empty_classes', '?')} non-empty classes"
    if job.step == "train":
        steps = [int(p.name.rsplit("_", 1)[1]) for p in (out / "ckpt").glob("step_*") if p.name[5:].isdigit()]
        exported = "backbone.pt" if (out / "backbone.pt").is_file() else "no backbone.pt"
        return f"{_n(max(steps), 'step')}, {exported}" if steps else exported
    if job.step == "eval":
        results = _read(out / "results.json") or {}
        datasets = sorted({d for sets in results.values() for d in sets})
        return f"{_n(len(results), 'model')} x {_n(len(datasets), 'data set')} ({', '.join(datasets)})"
    if job.step == "finetune":
        done = [p.parent.name for p in sorted(out.glob("*/backbone.pt"))]
        return f"fine-tuned on {', '.join(done)}; results in RUN/eval/results.md" if done else "no backbone.pt"
    if job.step == "detect":
        done = {p.parent.name: (_read(p) or {}).get("metrics", {}) for p in sorted(out.glob("*/metrics.json"))}
        return "; ".join(f"{model}: box AP {100 * m.get('box/AP', 0):.1f}, mask AP {100 * m.get('mask/AP', 0):.1f}"
                         for model, m in done.items()) or "no metrics.json"
    if job.step == "quantize":
        units = list(out.glob("*/*/*.json"))  # MODEL/SET/UNIT.json, each written last
        sets = sorted({p.parent.name for p in units})
        return f"{_n(len(units), 'unit')} on {', '.join(sets)}; results in RUN/eval/results.md" if units else "no unit"
    return "index.html" if (out / "index.html").is_file() else "no index.html"


REFUSED = 2  # the first step refused the command (a check that needs a pass over the data): nothing ran


def run(cfg: DictConfig, jobs: list[Job]) -> int:
    """Run the jobs in order; 0 when all succeed, REFUSED when the first step refuses the config (ConfigError,
    said in one line), 1 (after saying which step failed and where its log is) for any other failure."""
    cfg_dict = select(cfg)
    quiet.install()  # the steps below run in this process
    summary = []
    for i, job in enumerate(jobs):
        log = log_dir(cfg) / f"local_{job.step}.log"
        start = time.time()
        refused = False
        with tee_output(log):
            try:
                run_step(job, cfg_dict)
                ok = True
            except (DiskFull, SubprocessFailed, ConfigError) as e:  # they say what they are in one line
                print(f"error: {e}", file=sys.stderr)
                ok, refused = False, isinstance(e, ConfigError) and i == 0
            except Exception:  # any failure stops the chain; the traceback goes to the log too
                traceback.print_exc()
                ok = False
        seconds = time.time() - start
        if refused:
            print(f"stage {job.step} refused the command after {seconds:.1f}s; nothing of it was kept", file=sys.stderr)
            return REFUSED
        if not ok:
            print(f"stage {job.step} FAILED after {seconds:.1f}s; log: {log}", file=sys.stderr)
            print("fix the cause and rerun the same command: finished work is kept", file=sys.stderr)
            return 1
        summary.append(f"{job.step:<7} done {seconds:8.1f}s  {outcome(cfg, job)}  -> {output_dir(cfg, job.step)}"
                       f"  (log {log})")
    print("\n".join(["", "summary:"] + summary))
    return 0
