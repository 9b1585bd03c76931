"""unicom_ds/train.py as deepspeed runs it, with the prototype objective's loss NaN at the optimizer steps NAN_STEPS
(on every rank: the layer reduces its loss over them). test_faults_train's non-finite steps, injected rather than
left to a diverging learning rate's floating point path:

    python -m deepspeed.launcher.runner ... tests/nan_loss_train.py --deepspeed_config DS run_dir=RUN [key=value ...]
"""
import runpy
from pathlib import Path

from unicom_ds.objectives import PrototypeObjective

# Step (as the log counts it) -> what the NaN loss leaves of the gradients: NaN (DeepSpeed's overflow check skips
# the step) or zero (finite: only the Trainer's check of the loss skips it).
NAN_STEPS = {4: float("nan"), 6: 0.0, 7: float("nan")}
TRAIN_PY = Path(__file__).resolve().parents[1] / "unicom_ds" / "train.py"


def nan_at_steps(loss):
    def patched(self, engine, batch):
        value, terms = loss(self, engine, batch)
        times = NAN_STEPS.get(engine.global_steps + 1)  # the engine counts the optimizer steps done
        return (value if times is None else value * times + float("nan")), terms
    return patched


if __name__ == "__main__":
    PrototypeObjective.loss = nan_at_steps(PrototypeObjective.loss)
    runpy.run_path(str(TRAIN_PY), run_name="__main__")
