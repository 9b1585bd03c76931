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

try:
    from slurm import launch
    from unicom_ds import config
except ModuleNotFoundError as e:  # a Python without the project's packages: say which one to use
    if __name__ != "__main__":
        raise
    sys.exit(f"error: {sys.executable} lacks the package {e.name!r}: activate the project's venv "
             "(. .venv/bin/activate) or run through `bash demo.sh`, which installs it")

# Mistakes a user can fix from the command line: one line each, no traceback.
USER_ERRORS = (config.ConfigError, ValueError, LookupError, OSError)
STAGE_HELP = {
    "embed": "CLIP image and text features of every shard (job array) -> RUN/embed/",
    "kmeans": "faiss k-means of the embedded features into kmeans.k pseudo classes -> RUN/kmeans/",
    "assign": "the pseudo class of every embedded row (job array) -> RUN/labels/",
    "train": "the ViT on the pseudo classes, DeepSpeed ZeRO-2 -> RUN/train/",
    "eval": "retrieval and linear-probe evaluation -> RUN/eval/",
    "report": "the HTML run report -> RUN/report/index.html",
    "detect": "COCO Mask R-CNN on the trained ViT (ViTDet), box and mask AP -> RUN/detect/, RUN/eval/",
    "finetune": "supervised retrieval fine-tuning (Tab. 4) of finetune.init on finetune.datasets -> RUN/finetune/, RUN/eval/",
    "quantize": "compact codes (PQ, OPQ, IVF-PQ, SCQ) of quantize.model's features on quantize.datasets -> RUN/quantize/, RUN/eval/",
}  # the composite stages (cluster, all) list their steps from launch.STEPS
USAGE = """usage: python slurm/submit.py stage=STAGE [config=FILE] [key=value ...]

Runs a stage of the Unicom pipeline: as SLURM jobs chained with afterok (launcher=slurm, the default;
run it on a login node) or with the same job functions on this machine (launcher=local).
Nothing runs when a check fails (exit 2); dry_run=true prints the sbatch scripts and submits nothing.

stages:
{stages}

common keys:
  run_dir=RUN            where every stage reads and writes (RUN/config.yaml is reused by later stages)
  launcher=slurm|local   data.shards='/data/{{00000..00099}}.tar'   kmeans.k=1000000   model=ViT-B-32
  slurm.partition=gpu    slurm.nodes=N   <stage>.slurm.*: one stage's resources   dry_run=true

precedence: the YAML defaults (slurm/configs/) < config=FILE < RUN/config.yaml < key=value
every key with its default, type and meaning: README.md, section "Config keys",
or `python docs/config_reference.py --show`

examples:
  python slurm/submit.py stage=all launcher=local config=slurm/configs/demo.yaml
  python slurm/submit.py stage=cluster run_dir=/scratch/run1 data.shards='/data/laion/{{00000..41455}}.tar'
"""


def usage() -> str:
    width = max(map(len, config.STAGES))
    lines = [f"  {s:<{width}}  {STAGE_HELP.get(s) or ' -> '.join(launch.STEPS[s])}" for s in config.STAGES]
    return USAGE.format(stages="\n".join(lines))


def error(e: Exception) -> None:
    for line in str(e).splitlines():
        print(f"error: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(usage(), end="")
        return 0
    try:
        cfg = config.resolve(argv)
        jobs = launch.plan(cfg)
        notes = launch.precheck(cfg)
    except USER_ERRORS as e:
        error(e)
        return 2
    run_dir = Path(str(cfg.run_dir)).resolve()
    if cfg.dry_run:
        print(f"dry run: nothing is {'run' if cfg.launcher == 'local' else 'submitted'}; run directory would be "
              f"{run_dir}")
        for line in notes:
            print(line)
        if cfg.launcher == "local":  # never an sbatch script next to a local plan
            print("launcher=local: this machine would run, in order: " + ", ".join(
                f"{job.step} ({len(job.tasks)} task(s))" for job in jobs))
            return 0
        from slurm.launch_slurm import dry_run_scripts
        for job, script in dry_run_scripts(cfg, jobs):
            print(f"\n# ---- {job.step}: {len(job.tasks)} task(s) ----\n{script}")
        return 0
    try:
        config.save(cfg)
    except OSError as e:
        error(e)
        return 2
    print(f"run directory: {run_dir}")
    for line in notes:
        print(line)
    if cfg.launcher == "local":
        from slurm import launch_local
        code = launch_local.run(cfg, jobs)
        if code == launch_local.REFUSED:  # nothing ran: RUN/config.yaml never records a refused command
            config.undo_save(cfg)
        return code
    from slurm import launch_slurm
    submitted = []
    try:
        for job, handles in launch_slurm.submit(cfg, jobs):
            print("\n".join(launch_slurm.describe(cfg, job, handles)), flush=True)
            submitted.append(job.step)
    except launch_slurm.SubmissionError as e:
        error(e)
        if submitted:
            print(f"already submitted: {', '.join(submitted)} (listed above); a rerun skips their finished work",
                  file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
