#!/usr/bin/env bash
# The README's first command: the whole Unicom pipeline (cluster -> train -> eval -> report) on the
# bundled demo data, on this machine. Extra key=value arguments go to slurm/submit.py.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

echo "demo: installing the pinned requirements (the first time takes a few minutes: torch is large)"
"$PYTHON" -m pip install -q --disable-pip-version-check -r requirements.txt
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps -e .
"$PYTHON" -m cluster_job.demo_data --out data/demo
"$PYTHON" -m evaluation.demo_sets --out data/demo_eval
echo "demo: tiny, randomly initialised models (nothing is downloaded): real use passes pretrained CLIP weights"
"$PYTHON" slurm/submit.py config=slurm/configs/demo.yaml "$@"
run_dir=$("$PYTHON" -c 'import sys; from unicom_ds import config; print(config.resolve(sys.argv[1:]).run_dir)' \
          config=slurm/configs/demo.yaml "$@")
cat <<MSG

demo finished. Look at:
  $run_dir/report/index.html     the run report: cluster browser, class sizes, training curves, tables
  $run_dir/eval/results.md       the results tables (the eval sets are scikit-learn digits in SOP's and EuroSAT's layouts)
  tensorboard --logdir $run_dir  every stage's curves, statistics and sample grids
MSG
