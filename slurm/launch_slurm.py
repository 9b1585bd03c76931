"""Submit a plan (`slurm.launch`) to SLURM with submitit, chained with afterok dependencies."""
from __future__ import annotations

from typing import Iterator

import submitit
from omegaconf import DictConfig
from submitit.core.utils import FailedJobError, JobPaths

from unicom_ds.config import select
from slurm.launch import Job, log_dir, target


class ScriptExecutor(submitit.SlurmExecutor):
    """Renders the sbatch scripts submitit would submit, without a cluster (dry_run): no srun needed."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def sbatch_parameters(job: Job, dependency: str | None) -> dict:
    """submitit SlurmExecutor parameters (sbatch option names) for one job."""
    res = job.resources
    params = {
        "job_name": f"unicom-{job.step}",
        "nodes": int(res["nodes"]),
        "ntasks_per_node": job.tasks_per_node,
        "cpus_per_task": int(res["cpus_per_task"]),
        "time": int(res["time_min"]),
        "mem": _mem(float(res["mem_gb"])),
        "array_parallelism": int(res["array_parallelism"]),
    }
    if res["gpus_per_node"]:  # a GPU-less cluster rejects any gres request, even of 0
        params["gpus_per_node"] = int(res["gpus_per_node"])
    params.update({k: res[k] for k in ("partition", "account", "qos", "constraint") if res[k] is not None})
    if dependency:
        params["dependency"] = dependency
    if int(res["nodes"]) * job.tasks_per_node > 1:
        # A task that fails (a full disk on one rank) ends the others, which would wait in a collective until
        # the process group's timeout: the job fails at once instead of hanging.
        params["srun_args"] = ["--kill-on-bad-exit=1"]
    return params


def _mem(gb: float) -> str:
    return f"{int(gb)}G" if gb.is_integer() else f"{round(gb * 1024)}M"


def dry_run_scripts(cfg: DictConfig, jobs: list[Job]) -> list[tuple[Job, str]]:
    """(job, sbatch script text) for each job; dependencies show placeholders for the unknown ids."""
    folder = log_dir(cfg) / "%j"
    scripts = []
    for job in jobs:
        ex = ScriptExecutor(folder)
        dependency = f"afterok:<{job.after} job id>" if job.after else None
        ex.update_parameters(**sbatch_parameters(job, dependency))
        if job.is_array and len(job.tasks) > 1:
            ex.parameters["map_count"] = len(job.tasks)  # exactly what submitit sets for an array
        scripts.append((job, ex._make_submission_file_text(ex._submitit_command_str, "dry_run")))
    return scripts


class SubmissionError(RuntimeError):
    """sbatch refused a job (bad partition, account, limits...); the message has sbatch's own words."""


def submit(cfg: DictConfig, jobs: list[Job]) -> Iterator[tuple[Job, list]]:
    """Submit the chain in order, yielding (job, submitit jobs) as each is accepted."""
    folder = log_dir(cfg) / "%j"
    cfg_dict = select(cfg)  # job functions get a plain dict: it pickles without omegaconf objects
    previous_id = None
    for job in jobs:
        ex = submitit.SlurmExecutor(folder)
        ex.update_parameters(**sbatch_parameters(job, f"afterok:{previous_id}" if previous_id else None))
        fn = target(job.step)
        if isinstance(fn, type):
            fn = fn()  # TrainJob, DetectJob: submitit Checkpointables, instances requeued on timeout
        try:
            if job.is_array:
                handles = ex.map_array(fn, [cfg_dict] * len(job.tasks), *zip(*job.tasks))
            else:
                handles = [ex.submit(fn, cfg_dict, *job.tasks[0])]
        except FailedJobError as e:
            raise SubmissionError(f"sbatch refused the {job.step} job: {'; '.join(str(e).splitlines())}") from None
        previous_id = master_id(handles[0].job_id)
        yield job, handles


def master_id(job_id: str) -> str:
    """`123` for array task `123_4`: afterok on the master id waits for every task."""
    return str(job_id).split("_")[0]


def describe(cfg: DictConfig, job: Job, handles: list) -> list[str]:
    """Lines naming the job id(s) and log paths of one submitted job."""
    first = handles[0]
    master = master_id(first.job_id)
    if len(handles) > 1:
        ids = f"job {master} (array {master}_[0-{len(handles) - 1}], {len(handles)} tasks)"
        paths = JobPaths(log_dir(cfg) / "%j", job_id=f"{master}_<task>", task_id=0)
    else:
        ids, paths = f"job {master}", first.paths
    after = f", afterok {job.after}" if job.after else ""
    return [f"{job.step}: {ids}{after}", f"  stdout {paths.stdout}", f"  stderr {paths.stderr}"]
