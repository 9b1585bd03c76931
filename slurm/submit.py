"""The one launcher for every stage: `python slurm/submit.py stage=cluster|train|eval|all key=value ...`.

Resolves the config, runs the up-front checks (nothing starts when one fails: exit 2), saves
RUN/config.yaml, then submits the stage's jobs to SLURM with submitit (launcher=slurm) or runs the
same job functions here (launcher=local). `dry_run=true` prints the sbatch scripts only.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, slurm/ would come first on sys.path; the repository root must, so that
    # `slurm`, `unicom_ds` and the stage packages import the same way in every process.
    _root = str(Path(__file__).resolve().parents[1])
    sys.path = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from slurm import launch
from unicom_ds import config

# Mistakes a user can fix from the command line: one line, no traceback.
USER_ERRORS = (config.ConfigError, ValueError, LookupError, OSError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config.resolve(argv)
        jobs = launch.plan(cfg)
        launch.precheck(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(str(cfg.run_dir)).resolve()
    if cfg.dry_run:
        from slurm.launch_slurm import dry_run_scripts
        print(f"dry run: nothing is submitted; run directory would be {run_dir}")
        for job, script in dry_run_scripts(cfg, jobs):
            print(f"\n# ---- {job.step}: {len(job.tasks)} task(s) ----\n{script}")
        return 0
    config.save(cfg)
    print(f"run directory: {run_dir}")
    if cfg.launcher == "local":
        from slurm import launch_local
        return launch_local.run(cfg, jobs)
    from slurm import launch_slurm
    submitted = []
    try:
        for job, handles in launch_slurm.submit(cfg, jobs):
            print("\n".join(launch_slurm.describe(cfg, job, handles)), flush=True)
            submitted.append(job.step)
    except launch_slurm.SubmissionError as e:
        print(f"error: {e}", file=sys.stderr)
        if submitted:
            print(f"already submitted: {', '.join(submitted)} (listed above); a rerun skips their finished work",
                  file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
