"""The lr schedule against torch's own LinearLR + CosineAnnealingLR chained by SequentialLR."""
import math

import pytest
import torch

from unicom_ds.schedule import lr_at


def torch_reference(base: float, warmup: int, total: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=0.0)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[warmup])
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("base,warmup,total", [(1e-3, 5, 40), (0.5, 1, 7), (2e-4, 12, 100)])
def test_matches_torch_schedulers(base, warmup, total):
    ours = [lr_at(s, base, warmup, total) for s in range(total)]
    assert ours == pytest.approx(torch_reference(base, warmup, total), rel=1e-6, abs=1e-12)


def test_shape_of_the_curve():
    lrs = [lr_at(s, 1.0, 10, 50) for s in range(60)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # non-increasing after the warmup
    assert lrs[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[50:] == [0.0] * 10  # past the end (max_steps beyond total) stays at 0


def test_extension_continues_the_curve_low():
    # The compact recipe resumes a 32-epoch run with epochs=33: the last epoch's lr stays tiny.
    spe = 100
    last = [lr_at(s, 1e-3, spe, 33 * spe) for s in range(32 * spe, 33 * spe)]
    assert max(last) < 1e-3 * 0.01 and min(last) >= 0.0


def test_no_warmup_and_bad_total():
    assert lr_at(0, 3.0, 0, 10) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="total_steps=0"):
        lr_at(0, 1.0, 0, 0)


def test_constant_schedule_holds_the_rate_after_warmup():
    lrs = [lr_at(s, 1e-4, 3, 10, "constant") for s in range(12)]
    assert lrs[:3] == pytest.approx([1e-4 / 3, 2e-4 / 3, 1e-4]) and lrs[3:] == [1e-4] * 9
    with pytest.raises(ValueError, match="train.schedule=step: expected one of cosine, constant"):
        lr_at(0, 1.0, 0, 10, "step")
