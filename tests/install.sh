#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian 12 machine (tests/run.sh runs this first):
# SLURM and munge for the local one-node cluster, headless Chromium for the report check, then the
# pinned Python requirements and this package (editable). Steps already done are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SUDO=""
[[ $(id -u) == 0 ]] || SUDO=sudo

PACKAGES=(slurmctld slurmd slurm-client munge chromium chromium-driver)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
    echo "install: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    # Package scripts may try to start services; there is no init system in a CI container.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ -f $("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED \
      && -z ${VIRTUAL_ENV:-} ]]; then
    echo "install: $PYTHON is the system's externally managed Python: activate a venv first" \
         "(python3 -m venv .venv && . .venv/bin/activate)" >&2
    exit 1
fi
echo "install: pip install -r requirements.txt && pip install -e ."
"$PYTHON" -m pip install -q --disable-pip-version-check -r requirements.txt
"$PYTHON" -m pip install -q --disable-pip-version-check -e .
