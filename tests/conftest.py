"""Shared fixtures: the local SLURM test cluster, a tiny demo webdataset, a full disk; the guard that keeps
tests off the checkout's run state."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The checkout's run state (`bash demo.sh` leaves runs/demo): no test may read or write it.
RUNS = REPO / "runs"


def load_submit():
    """slurm/submit.py as a module (it is a script, not part of a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("submit_script", REPO / "slurm" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Where tests/slurm_cluster.sh keeps its generated slurm.conf (same default as the script).
SLURM_STATE = Path(os.environ.get("UNICOM_SLURM_DIR", "/tmp/unicom-ds-slurm"))


def _slurm_problem() -> str | None:
    """Why the local SLURM cluster cannot be used, or None when its node is idle or busy."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client tools (sinfo, sbatch) are not installed"
    conf = SLURM_STATE / "slurm.conf"
    if "SLURM_CONF" not in os.environ and conf.is_file():
        os.environ["SLURM_CONF"] = str(conf)  # inherited by sbatch and by the jobs
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    states = out.stdout.split()
    if out.returncode or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        return f"no usable SLURM node (sinfo: {(out.stdout + out.stderr).strip() or 'no output'})"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    """The one-node cluster of tests/slurm_cluster.sh must be up: skipped on a laptop, an error in CI."""
    problem = _slurm_problem()
    if problem is None:
        return
    hint = "start it with `sudo bash tests/slurm_cluster.sh start` (tests/install.sh installs SLURM)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the local SLURM cluster is not usable: {problem}; {hint}", pytrace=False)
    pytest.skip(f"local SLURM cluster not usable: {problem}; {hint}")


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> str:
    """A brace pattern of 3 small real demo shards (63 image-caption pairs at 64 px)."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "cluster_job.demo_data", "--out", str(out), "--shards", "3",
                    "--copies", "2", "--size", "64"], check=True, capture_output=True, cwd=REPO)
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    return f"{out}/{{00000..00002}}.tar"


def fresh_run() -> str:
    """`run_dir=` an empty temporary folder: for a test that resolves a config only to read it. The default
    (runs/demo) is the demo's, whose config.yaml would override the test's layers."""
    return f"run_dir={tempfile.mkdtemp(prefix='unicom-test-')}/run"


def _in_checkout_runs(path) -> bool:
    path = Path(str(path))
    return (path if path.is_absolute() else REPO / path).resolve().is_relative_to(RUNS)


@pytest.fixture(autouse=True)
def no_checkout_run_state(monkeypatch):
    """Fails a test whose config resolves to, reads or saves a run directory under the checkout's runs/.

    The default run_dir (runs/demo) is the demo's; a test that relied on it would read the demo's
    RUN/config.yaml, which ranks above config=FILE, and silently test the demo's config instead."""
    from unicom_ds import config

    resolve, load, save = config.resolve, config._load, config.save

    def guarded_resolve(*args, **kwargs):
        cfg = resolve(*args, **kwargs)
        if _in_checkout_runs(cfg.run_dir):
            pytest.fail(f"the test's config resolves to run_dir={cfg.run_dir}, the checkout's run state: "
                        "pass run_dir=<a tmp_path folder>", pytrace=False)
        return cfg

    def guarded_load(path):
        if _in_checkout_runs(path):
            pytest.fail(f"the test reads {path}, the checkout's run state: pass run_dir=<a tmp_path folder>",
                        pytrace=False)
        return load(path)

    def guarded_save(cfg):
        if _in_checkout_runs(cfg.run_dir):
            pytest.fail(f"the test writes {cfg.run_dir}/config.yaml, the checkout's run state", pytrace=False)
        return save(cfg)

    monkeypatch.setattr(config, "resolve", guarded_resolve)
    monkeypatch.setattr(config, "_load", guarded_load)
    monkeypatch.setattr(config, "save", guarded_save)


@pytest.fixture
def full_disk(tmp_path):
    """A real file system with no space left: a 1 MiB tmpfs, filled. Mounting needs root (CI runs as root)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode:
        why = f"cannot mount a small tmpfs to fill ({proc.stderr.strip() or 'mount failed'}); needs root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {why}", pytrace=False)
        pytest.skip(why)
    try:
        with open(mnt / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        assert shutil.disk_usage(mnt).free == 0
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
