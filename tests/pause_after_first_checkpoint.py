"""A launch whose training ranks stand still once their first checkpoint is published, until the test kills them.

The kill-after-the-first-checkpoint tests (test_train_continuation, test_finetune's `tuned`) used to poll
`ckpt/latest` and kill whatever was running by then: on a fast machine the run could pass several checkpoints, or
end, before the kill. Run through this file, rank 0 publishes its first checkpoint (`checkpoint.commit`: the
step folder and `latest`), writes the marker file named by $UNICOM_TEST_PAUSE_MARKER ({"step", "checkpoint",
"pgid"}: the ranks' process group, which the launcher starts in a session of its own) and then sleeps until
killed; the other ranks wait for it in their next collective. The test waits for the marker and kills both process
groups, the launcher's and the ranks'. Always one checkpoint, always mid-run, however fast the machine.

    UNICOM_TEST_PAUSE_MARKER=PATH python tests/pause_after_first_checkpoint.py slurm/submit.py launcher=local ...

As the launcher (no $UNICOM_TEST_RANK_SCRIPT yet), it runs the given script with `unicom_ds.train.local_command`
starting this file under deepspeed in place of the stage's own script (train.py, or the finetune job), which it
names in $UNICOM_TEST_RANK_SCRIPT; as a rank, it patches `checkpoint.commit` and runs that script.
"""
import os
import runpy
import sys
import time
from pathlib import Path

MARKER = "UNICOM_TEST_PAUSE_MARKER"
RANK_SCRIPT = "UNICOM_TEST_RANK_SCRIPT"
THIS = Path(__file__).resolve()


def launcher(argv: list[str]) -> None:
    from unicom_ds import train
    local_command = train.local_command

    def through_this_file(cfg, script=train.TRAIN_PY, section="train"):
        os.environ[RANK_SCRIPT] = str(script)  # the ranks inherit the launcher's environment
        return local_command(cfg, script=THIS, section=section)

    train.local_command = through_this_file  # what launch_local calls, directly or through the finetune job's
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


def rank() -> None:
    from unicom_ds import checkpoint
    from unicom_ds.atomic import write_json_atomic
    commit = checkpoint.commit

    def commit_then_pause(root, step, meta, keep):
        published = commit(root, step, meta, keep)
        write_json_atomic(Path(os.environ[MARKER]), {"step": int(step), "checkpoint": str(published),
                                                     "pgid": os.getpgid(0)})
        while True:  # until the test kills the process group
            time.sleep(60)

    checkpoint.commit = commit_then_pause
    script = os.environ.pop(RANK_SCRIPT)
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    if not os.environ.get(MARKER):
        sys.exit(f"{THIS.name}: set {MARKER} to the marker file the paused rank writes")
    if os.environ.get(RANK_SCRIPT):
        rank()
    else:
        launcher(sys.argv[1:])
