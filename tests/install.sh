#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian 12 machine (tests/run.sh runs this first):
# SLURM and munge for the local one-node cluster, headless Chromium for the report check, then the
# pinned Python requirements, this package (editable) and DeepSpeed's CPU communication op (built once into the
# environment). Steps already done are skipped.
#
#   bash tests/install.sh            # system packages (apt) + Python packages
#   bash tests/install.sh --python   # Python packages only
#
# Python packages never go into a global interpreter: they go into the active virtualenv (or conda
# env), into $PYTHON's environment when PYTHON is set, or else into the project's own .venv, created
# on first use with --system-site-packages: packages already installed for python3 are reused (never
# changed) and only what is missing is installed, into .venv. Sourced (demo.sh, tests/run.sh), this
# file only defines the functions; `project_python` then sets PY and puts .venv/bin first on PATH.

log() { echo "install: $*"; }

# Sets PY to the interpreter the project runs with, creating .venv when that is the choice.
project_python() {
    if [[ -n ${PYTHON:-} ]]; then
        PY=$(command -v "$PYTHON") || { log "error: PYTHON=$PYTHON is not an executable" >&2; return 1; }
        log "using PYTHON=$PY"
        return 0
    fi
    if [[ -n ${VIRTUAL_ENV:-} ]]; then
        PY=$VIRTUAL_ENV/bin/python
        log "using the active virtualenv $VIRTUAL_ENV"
        return 0
    fi
    if [[ -n ${CONDA_PREFIX:-} && ${CONDA_DEFAULT_ENV:-base} != base ]]; then
        PY=$CONDA_PREFIX/bin/python
        log "using the active conda env $CONDA_DEFAULT_ENV ($CONDA_PREFIX)"
        return 0
    fi
    if [[ -x .venv/bin/python ]]; then
        log "using the project venv .venv"
    else
        make_venv || return 1
    fi
    PY=$PWD/.venv/bin/python
    # As `. .venv/bin/activate` would: child processes (deepspeed's launcher, SLURM jobs) find this Python.
    export VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH
}

make_venv() {
    local base
    base=$(command -v python3 || command -v python) || {
        log "error: no python3 on PATH; install Python >= 3.11 (Debian: apt-get install python3 python3-venv)" >&2
        return 1
    }
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        log "error: $base is Python $("$base" -c 'import platform; print(platform.python_version())'); this project" \
            "needs >= 3.11: create .venv with one (e.g. python3.11 -m venv .venv) and rerun" >&2
        return 1
    fi
    if ! "$base" -c 'import ensurepip, venv' 2>/dev/null; then
        if [[ ${INSTALL_SYSTEM:-0} == 1 ]] && command -v apt-get >/dev/null; then
            log "apt-get install python3-venv (to create .venv; this can take a minute)"
            ${SUDO:-} apt-get update -qq || return 1
            ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null || return 1
        else
            log "error: $base cannot create a venv (no ensurepip). Either install it and rerun:" >&2
            log "    sudo apt-get install python3-venv" >&2
            log "or create and activate an environment of your own, then rerun:" >&2
            log "    python3 -m venv .venv && . .venv/bin/activate" >&2
            return 1
        fi
    fi
    log "creating the project venv .venv: $base -m venv --system-site-packages .venv"
    log "(packages already installed for $base are reused and never changed; the rest goes into .venv)"
    "$base" -m venv --system-site-packages .venv
}

# pip with its own output (what it downloads and how big, build steps), minus the long list of
# "Requirement already satisfied" lines of a rerun. Call it as `pip_install ... || return 1`:
# errexit is off in such a call, so pip's own status survives the pipe.
pip_install() {
    "$PY" -m pip install --disable-pip-version-check "$@" 2>&1 | grep -v --line-buffered '^Requirement already satisfied'
    return "${PIPESTATUS[0]}"
}

# The pinned requirements that are missing or at another version in PY's environment.
missing_requirements() {
    "$PY" - requirements.txt <<'PYEOF'
import sys
from importlib import metadata
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
todo = []
for line in Path(sys.argv[1]).read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        if req.specifier.contains(metadata.version(req.name), prereleases=True):
            continue
    except metadata.PackageNotFoundError:
        pass
    todo.append(line)
print(" ".join(todo))
PYEOF
}

# True when this checkout is installed editable in PY's environment (a copy elsewhere would import other code).
installed_here() {
    "$PY" -I - "$PWD" 2>/dev/null <<'PYEOF'  # -I: not the in-tree *.egg-info of the cwd
import json, sys
from importlib import metadata
from pathlib import Path
url = json.loads(metadata.distribution("unicom-ds").read_text("direct_url.json") or "{}").get("url")
sys.exit(url != Path(sys.argv[1]).resolve().as_uri())
PYEOF
}

# DeepSpeed's CPU communication op, built once per environment into the folder every CPU launch reuses
# (unicom_ds.dist.prepare_cpu_comm_op: the environment's torch_extensions/ unless TORCH_EXTENSIONS_DIR is set), the
# way DeepSpeed builds it (its ShareMemCommBuilder), so that no test, timed run or demo stage waits for it.
build_cpu_comm_op() {
    local folder
    folder=$("$PY" - 2>/dev/null <<'PYEOF'
from unicom_ds import dist
folder = dist.prepare_cpu_comm_op(local_rank=1)  # as the ranks resolve it; rank 1 says nothing
print("" if folder is None or any(folder.glob(dist.CPU_COMM_OP + "*.so")) else folder)
PYEOF
) || return 0  # the package does not import yet: the first launch builds the op, as before
    [[ -n $folder ]] || return 0
    log "building DeepSpeed's CPU communication op once, into $folder (1-2 minutes on 2 cores)"
    DS_ACCELERATOR=cpu "$PY" - <<'PYEOF' || return 1
from unicom_ds import quiet
quiet.install()  # before torch's extension builder is imported: its "No CUDA runtime is found" on a CPU machine
from unicom_ds import dist
dist.prepare_cpu_comm_op(local_rank=1)
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("ShareMemCommBuilder").load()
PYEOF
}

install_python_packages() {
    project_python || return 1
    local missing prefix
    missing=$(missing_requirements) || missing="(could not check; pip decides)"
    prefix=$("$PY" -c 'import sys; print(sys.prefix)')
    if [[ -n $missing ]]; then
        log "pip install -r requirements.txt into $prefix; missing or another version: $missing"
        log "(this can take minutes: the first install downloads a few GB, torch and deepspeed above all;" \
            "pip names each file and its size)"
        pip_install -r requirements.txt || return 1
    else
        log "the pinned requirements are installed in $prefix"
    fi
    if ! installed_here; then
        log "pip install --no-deps -e . (this checkout, editable: pip builds its metadata, up to a minute)"
        pip_install --no-deps -e . || return 1
    fi
    build_cpu_comm_op
}

install_system_packages() {
    local packages=(slurmctld slurmd slurm-client munge chromium chromium-driver) missing=() pkg
    for pkg in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if (( ${#missing[@]} )); then
        log "apt-get install ${missing[*]} (downloads and installs them: this can take minutes)"
        ${SUDO:-} apt-get update -qq || return 1
        # Package scripts may try to start services; there is no init system in a CI container.
        ${SUDO:-} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || return 1
    fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    cd "$(dirname "$0")/.."
    SUDO=""
    [[ $(id -u) == 0 ]] || SUDO=sudo
    if [[ ${1:-} != --python ]]; then
        INSTALL_SYSTEM=1
        install_system_packages
    fi
    install_python_packages
fi
