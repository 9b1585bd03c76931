#!/usr/bin/env bash
# THE test command (README): install what is missing, start the local one-node SLURM cluster,
# run the whole suite, stop the cluster again (also on failure or Ctrl-C); exits with pytest's code.
# Arguments replace the default pytest target `tests`, e.g. `bash tests/run.sh tests/test_submit.py -x`.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SUDO=""
[[ $(id -u) == 0 ]] || SUDO=sudo

bash tests/install.sh || exit $?
trap '$SUDO bash tests/slurm_cluster.sh stop' EXIT
$SUDO bash tests/slurm_cluster.sh start || exit $?
export SLURM_CONF=${UNICOM_SLURM_DIR:-/tmp/unicom-ds-slurm}/slurm.conf
if (( $# )); then targets=("$@"); else targets=(tests); fi
"$PYTHON" -m pytest -q "${targets[@]}"
status=$?
exit $status
