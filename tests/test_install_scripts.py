"""demo.sh, tests/install.sh and tests/run.sh: which Python they use and what they show.

Each runs the real scripts in a sandbox folder with a PATH made for the case (no python3 at all; a
python3 without ensurepip, as Debian's without python3-venv; a plain python3), so nothing here can
install into, or create a venv for, the interpreter that runs the tests.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BASH = shutil.which("bash")


def sandbox(tmp_path: Path, python3: bool = True) -> tuple[Path, dict]:
    """A copy of the scripts and an environment whose PATH holds only `dirname`, `grep` (and python3)."""
    box = tmp_path / "box"
    (box / "tests").mkdir(parents=True)
    for name in ("demo.sh", "tests/install.sh", "requirements.txt"):
        shutil.copy(REPO / name, box / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "grep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if python3:
        (bin_dir / "python3").symlink_to(sys._base_executable)  # the base interpreter, never a venv's
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHON", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "PYTHONPATH")}
    env["PATH"] = str(bin_dir)
    return box, env


def bash(box: Path, env: dict, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, "-c", script], cwd=box, env=env, capture_output=True, text=True, timeout=300)


def test_demo_without_any_python_refuses_with_the_commands(tmp_path):
    box, env = sandbox(tmp_path, python3=False)
    res = subprocess.run([BASH, "demo.sh"], cwd=box, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "no python3 on PATH" in res.stderr and "apt-get install python3 python3-venv" in res.stderr
    assert "command not found" not in res.stderr and not (box / ".venv").exists()


def test_demo_with_a_python3_that_cannot_make_venvs_refuses_with_the_commands(tmp_path):
    box, env = sandbox(tmp_path)
    shadow = tmp_path / "shadow" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ensurepip is not available (Debian: python3-venv)')\n")
    env["PYTHONPATH"] = str(shadow.parent)
    res = subprocess.run([BASH, "demo.sh"], cwd=box, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "sudo apt-get install python3-venv" in res.stderr
    assert "python3 -m venv .venv && . .venv/bin/activate" in res.stderr
    assert not (box / ".venv").exists()


def test_without_an_active_env_the_project_venv_is_created_then_reused(tmp_path):
    box, env = sandbox(tmp_path)
    show = 'source tests/install.sh && project_python && echo "PY=$PY" && echo "python=$(command -v python)"'
    res = bash(box, env, show)
    assert res.returncode == 0, res.stderr
    assert "creating the project venv .venv" in res.stdout and "--system-site-packages" in res.stdout
    venv = box / ".venv"
    assert f"PY={venv}/bin/python" in res.stdout
    assert f"python={venv}/bin/python" in res.stdout       # activated: child processes get it too
    cfg = (venv / "pyvenv.cfg").read_text()
    assert re.search(r"^include-system-site-packages = true$", cfg, flags=re.M)
    # The base interpreter's packages are visible from the venv (on its path), without being installed into it.
    code = "import site, sys; print(sys.prefix); print(*site.getsitepackages(), sep='\\n')"
    inside = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True).stdout
    base = subprocess.run([sys._base_executable, "-I", "-c", code], capture_output=True, text=True).stdout
    assert inside.splitlines()[0] == str(venv)
    assert set(base.splitlines()[1:]) <= set(inside.splitlines()[1:])

    again = bash(box, env, show)
    assert "using the project venv .venv" in again.stdout and "creating" not in again.stdout


def test_an_active_virtualenv_or_python_is_used_as_is(tmp_path):
    box, env = sandbox(tmp_path)
    env["VIRTUAL_ENV"] = str(tmp_path / "myenv")
    res = bash(box, env, 'source tests/install.sh && project_python && echo "PY=$PY"')
    assert "using the active virtualenv" in res.stdout and f"PY={tmp_path}/myenv/bin/python" in res.stdout
    del env["VIRTUAL_ENV"]
    env["PYTHON"] = "python3"
    res = bash(box, env, 'source tests/install.sh && project_python && echo "PY=$PY"')
    assert f"PY={tmp_path}/bin/python3" in res.stdout
    assert not (box / ".venv").exists()


@pytest.fixture(scope="module")
def venv_box(tmp_path_factory):
    """A sandbox with its project .venv made by the script (pip inside it, whatever the base python lacks)."""
    box, env = sandbox(tmp_path_factory.mktemp("venv"))
    res = bash(box, env, "source tests/install.sh && project_python")
    assert res.returncode == 0, res.stderr
    pip = subprocess.run([str(box / ".venv" / "bin" / "python"), "-c", "import pip; print(pip.__version__)"],
                         capture_output=True, text=True).stdout.strip()
    return box, env, pip


def test_missing_requirements_are_named_before_pip_runs(venv_box):
    box, env, pip = venv_box
    (box / "requirements.txt").write_text(f"# pins\npip=={pip}\nno-such-pkg-x==1.0  # why\npip<1\n")
    res = bash(box, env, "source tests/install.sh && project_python >/dev/null && missing_requirements")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["no-such-pkg-x==1.0", "pip<1"]


def test_pip_output_is_shown_without_the_satisfied_lines_and_its_status_kept(venv_box, tmp_path):
    box, env, _ = venv_box
    ok = bash(box, env, "source tests/install.sh && project_python >/dev/null && pip_install --no-index pip; "
                        "echo rc=$?")
    assert "rc=0" in ok.stdout and "Requirement already satisfied" not in ok.stdout
    bad = bash(box, env, f"source tests/install.sh && project_python >/dev/null && "
                         f"pip_install --no-index {tmp_path}/nothing-here; echo rc=$?")
    assert "rc=0" not in bad.stdout and "nothing-here" in bad.stdout   # pip's own error, not hidden


def test_run_sh_shows_test_names_times_and_skip_reasons(tmp_path):
    """The pytest options of tests/run.sh, applied to a small suite: names, skip reasons, durations."""
    line = next(line for line in (REPO / "tests" / "run.sh").read_text().splitlines() if " -m pytest " in line)
    options = [a for a in shlex.split(line.split(" -m pytest ", 1)[1]) if not a.startswith(("$", '"$'))
               and a != "${targets[@]}"]
    (tmp_path / "test_tiny.py").write_text(
        "import time, pytest\n"
        "def test_slow():\n    time.sleep(1.1)\n"
        "@pytest.mark.skip(reason='needs the moon')\ndef test_skipped():\n    pass\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *options, "test_tiny.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "test_tiny.py::test_slow PASSED" in res.stdout
    assert re.search(r"SKIPPED \[1\] test_tiny.py:\d+: needs the moon", res.stdout)
    assert re.search(r"^1\.\d\ds call +test_tiny.py::test_slow$", res.stdout, flags=re.M)


def test_submit_help_without_the_packages_says_to_activate_the_venv():
    # -S: no site-packages, as a system python3 without the requirements
    res = subprocess.run([sys.executable, "-S", "slurm/submit.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "lacks the package" in res.stderr and ". .venv/bin/activate" in res.stderr and "demo.sh" in res.stderr


@pytest.mark.parametrize("preset, seen", [(None, "1"), ("3", "3")])
def test_demo_runs_one_thread_per_process_unless_told(tmp_path, preset, seen):
    box, env = sandbox(tmp_path)
    fake = tmp_path / "bin" / "fakepython"  # records the environment the demo's Python gets, then fails
    fake.write_text(f'#!{BASH}\necho "$OMP_NUM_THREADS" >> {tmp_path}/omp\nexit 1\n')
    fake.chmod(0o755)
    env["PYTHON"] = "fakepython"
    if preset:
        env["OMP_NUM_THREADS"] = preset
    subprocess.run([BASH, "demo.sh"], cwd=box, env=env, capture_output=True, text=True, timeout=60)
    assert set((tmp_path / "omp").read_text().split()) == {seen}
