#!/usr/bin/env bash
# The README's first command: the whole Unicom pipeline (cluster -> train -> eval -> report) on the
# bundled demo data, on this machine. Extra key=value arguments go to slurm/submit.py.
#
# Python: the active virtualenv (or conda env), PYTHON=/path/to/python, or else the project's own
# .venv, created on first use (tests/install.sh explains how); nothing is installed into a global Python.
set -euo pipefail
cd "$(dirname "$0")"
source tests/install.sh
# One intra-op thread per process (unless you set OMP_NUM_THREADS): the demo's models are tiny, and on a small
# or busy machine torch's threads spin against each other and against the two train ranks (docs/benchmarks.md).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "demo: setting up Python (the first time installs the pinned requirements: a few GB, torch is large)"
install_python_packages
"$PY" -m cluster_job.demo_data --out data/demo
"$PY" -m evaluation.demo_sets --out data/demo_eval
"$PY" -m evaluation.detection.synthetic --out data/demo_coco --train 64 --val 24 --size 96
echo "demo: tiny, randomly initialised models (nothing is downloaded): real use passes pretrained CLIP weights"
"$PY" slurm/submit.py config=slurm/configs/demo.yaml "$@"
run_dir=$("$PY" -c 'import sys; from unicom_ds import config; print(config.resolve(sys.argv[1:]).run_dir)' \
          config=slurm/configs/demo.yaml "$@")
cat <<MSG

demo finished. Look at:
  $run_dir/report/index.html     the run report: stage tables, cluster browser, class sizes, training and detection
                                 curves, results tables
  $run_dir/eval/results.md       the results tables (the eval sets are scikit-learn digits in SOP's and EuroSAT's layouts,
                                 the detection set rendered shapes in COCO's)
  tensorboard --logdir $run_dir  every stage's curves and statistics; images of sampled pseudo classes under cluster/
MSG
if [[ ${VIRTUAL_ENV:-} == "$PWD/.venv" ]]; then
    echo "  (the demo ran with .venv/bin/python: '. .venv/bin/activate' to use it in your shell)"
fi
