#!/usr/bin/env bash
# THE test command (README): install what is missing, start the local one-node SLURM cluster,
# run the whole suite, stop the cluster again (also on failure or Ctrl-C) unless it was already up
# before; exits with pytest's code. Python: as in tests/install.sh (the active venv, PYTHON, or .venv).
# Arguments replace the default pytest target `tests`, e.g. `bash tests/run.sh tests/test_submit.py -x`.
set -uo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[[ $(id -u) == 0 ]] || SUDO=sudo
source tests/install.sh

INSTALL_SYSTEM=1
install_system_packages || exit $?
install_python_packages || exit $?
if $SUDO bash tests/slurm_cluster.sh status >/dev/null 2>&1; then
    echo "run: the local SLURM cluster is already up; it stays up afterwards"
else
    trap '$SUDO bash tests/slurm_cluster.sh stop' EXIT
    $SUDO bash tests/slurm_cluster.sh start || exit $?
fi
export SLURM_CONF=${UNICOM_SLURM_DIR:-/tmp/unicom-ds-slurm}/slurm.conf
if (( $# )); then targets=("$@"); else targets=(tests); fi
# Each test's name and result as it runs; at the end every failure, error and skip (with its reason), and
# every test that took >= 1 s.
"$PY" -m pytest -v -rfEs --durations=0 --durations-min=1.0 "${targets[@]}"
