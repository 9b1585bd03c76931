"""The fixed-shape (sync-free) prototype layer: the old selection semantics, padded slots that
stay exact, the asynchronous label check, and on a GPU a step that never waits on the host."""
import math

import pytest
import torch
import torch.nn.functional as F

from unicom_ds import ShardedPrototypes
from unicom_ds import prototypes
from unicom_ds.margin import STREAM_R1, fraction_count, generator, select_slots

torch.set_num_threads(1)


def old_selection(labels, block, r1, gen):
    """The layer's selection as it was written before the fixed shapes (nonzero, unique and a
    data-dependent size): every positive, filled up with the top uniform scores to ceil(r1 * block)."""
    local = labels[(labels >= 0) & (labels < block)]
    positives = local.unique()
    want = math.ceil(round(r1 * block, 6))
    if want >= block:
        return torch.arange(block)
    if positives.numel() >= want:
        return positives
    score = torch.rand(block, generator=gen)
    score[positives] = 2.0
    return score.topk(want).indices.sort().values


def dense_loss(emb, weight, labels, selected, dims, margin=0.3, scale=64.0):
    """Plain-autograd ArcFace over the selected classes and dims: the independent reference."""
    e, w = emb[:, dims], weight[selected][:, dims]
    cos = F.normalize(e, dim=1) @ F.normalize(w, dim=1).T
    y = torch.tensor([selected.tolist().index(v) for v in labels.tolist()], device=cos.device)
    pos = F.one_hot(y, len(selected)).bool()
    logits = scale * torch.where(pos, torch.cos(torch.acos(cos.clamp(-1 + 1e-12, 1 - 1e-12)) + margin), cos)
    return F.cross_entropy(logits, y)


# (classes, r1, labels): fewer positives than r1's count with a batch larger than it (padding
# slots unused), more positives than r1's count (padding partly used), batch below r1's count (no
# padding), and r1 = 1.
CASES = {
    "few_positives_padded": (40, 0.1, [3, 3, 7, 3, 7, 7, 3, 7, 3, 3, 7, 3]),
    "many_positives_padded": (40, 0.1, [0, 5, 9, 9, 13, 21, 22, 30, 5, 39, 0, 17]),
    "no_padding": (40, 0.25, [1, 2, 2, 30, 31, 1]),
    "full": (12, 1.0, [0, 11, 5, 5]),
}


@pytest.mark.parametrize("name", CASES)
def test_selection_equals_the_old_semantics_and_the_loss_the_dense_reference(name):
    classes, r1, labels = CASES[name]
    labels = torch.tensor(labels)
    torch.manual_seed(0)
    layer = ShardedPrototypes(classes, 16, r1=r1, r2=0.5, seed=3).double()
    for step in range(2):
        emb = torch.randn(len(labels), 16, dtype=torch.float64, requires_grad=True)
        layer.weight.grad = None
        loss = layer(emb, labels)
        loss.backward()
        expected = old_selection(labels, classes, r1, generator(3, STREAM_R1, step, 0, 0))
        assert layer.selected.tolist() == expected.tolist()
        assert layer.last_stats == {"selected_classes": len(expected), "positives": labels.unique().numel(),
                                    "features": 8, "global_batch": len(labels)}
        ref_emb = emb.detach().clone().requires_grad_()
        ref_w = layer.weight.detach().clone().requires_grad_()
        ref = dense_loss(ref_emb, ref_w, labels, expected, layer.features)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(emb.grad, ref_emb.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, ref_w.grad, rtol=1e-9, atol=1e-12)
        # Padding slots hold real rows but get no gradient: only the selection is touched.
        touched = (layer.weight.grad != 0).any(dim=1).nonzero().squeeze(1)
        assert touched.tolist() == expected.tolist()
        layer.advance()


def test_slots_have_a_shape_fixed_by_the_batch_not_the_labels():
    block, r1, batch = 50, 0.1, 16
    shapes = set()
    for n_classes in (1, 4, 9, 16):
        local = torch.arange(batch) % n_classes
        hit = torch.ones(batch, dtype=torch.bool)
        index, valid, count = select_slots(hit, local, block, r1, batch, generator(0, n_classes))
        shapes.add((tuple(index.shape), tuple(valid.shape)))
        assert int(count) == max(fraction_count(r1, block), n_classes) == int(valid.sum())
        assert valid[: int(count)].all() and set(range(n_classes)) <= set(index[: int(count)].tolist())
        assert index.min() >= 0 and index.max() < block
    assert shapes == {((16,), (16,))}
    # Rows of other blocks (hit False) never become positives, whatever their clamped id.
    local, hit = torch.tensor([0, 49, 7]), torch.tensor([False, False, True])
    index, valid, count = select_slots(hit, local, block, r1, 3, generator(1))
    assert valid is None and int(count) == 5 and 7 in index.tolist()


def test_labels_on_a_device_are_checked_asynchronously(monkeypatch):
    # The accelerator path on the CPU: no raise in the step, a NaN loss, and the error on check_labels().
    monkeypatch.setattr(prototypes, "_checks_at_once", lambda device: False)
    layer = ShardedPrototypes(10, 8, r1=0.5)
    emb = torch.randn(3, 8, requires_grad=True)
    good = layer(emb, torch.tensor([1, 2, 3]))
    assert torch.isfinite(good)
    layer.check_labels()  # nothing to report, and the flag is cleared
    assert layer.label_fault is None
    bad = layer(emb, torch.tensor([1, 12, 3]))
    layer(emb, torch.tensor([-2, 4, 3]))
    assert torch.isnan(bad)
    bad.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(layer.weight.grad).all()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), got labels from -2 to 12"):
        layer.check_labels()
    layer.check_labels()  # reported once


def test_max_positives_caps_the_slots_and_refuses_more(monkeypatch):
    # 12 rows, r1's count 4: without a cap 12 slots; with max_positives=6, 6 slots and still exact.
    classes, r1, labels = CASES["many_positives_padded"]  # 9 distinct classes
    labels = torch.tensor(labels)
    few = torch.tensor([3, 3, 7, 3, 7, 9, 3, 7, 3, 3, 7, 21])  # 4 distinct
    torch.manual_seed(0)
    layer = ShardedPrototypes(classes, 16, r1=r1, r2=1.0, seed=3, max_positives=6).double()
    emb = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    loss = layer(emb, few)
    loss.backward()
    assert layer._slots[0].numel() == 6
    expected = old_selection(few, classes, r1, generator(3, STREAM_R1, 0, 0, 0))
    assert layer.selected.tolist() == expected.tolist()
    ref_emb = emb.detach().clone().requires_grad_()
    ref = dense_loss(ref_emb, layer.weight.detach(), few, expected, torch.arange(16))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(emb.grad, ref_emb.grad, rtol=1e-9, atol=1e-12)
    # More positives than the room: an error on the CPU; NaN then the error on a device.
    with pytest.raises(ValueError, match="held 9 classes of one rank.s block, more than max_positives=6"):
        layer(emb, labels)
    monkeypatch.setattr(prototypes, "_checks_at_once", lambda device: False)
    assert torch.isfinite(layer(emb, few))
    assert torch.isnan(layer(emb, labels))
    with pytest.raises(ValueError, match="held 9 classes"):
        layer.check_labels()
    with pytest.raises(ValueError, match="max_positives=0 must be at least 1"):
        ShardedPrototypes(10, 4, max_positives=0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def steps_without_sync(layer, labels: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Four optimizer steps of a linear backbone and `layer` on the GPU (labels [4, batch, ...]); the last three
    under CUDA's sync debug mode, which raises on any host synchronisation. Returns their losses."""
    device = torch.device("cuda")
    backbone = torch.nn.Linear(dim, dim).to(device)
    layer = layer.to(device)
    opt = torch.optim.SGD([*backbone.parameters(), layer.weight], lr=0.1)
    inputs = torch.randn(4, labels.shape[1], dim, device=device)

    def step(i):
        opt.zero_grad(set_to_none=False)
        loss = layer(backbone(inputs[i]), labels[i])
        loss.backward()
        opt.step()
        layer.advance()
        return loss.detach()

    step(0)  # first use: allocations, generator setup
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return [step(i) for i in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda
@pytest.mark.parametrize("r1, r2, cap", [(0.1, 0.5, None), (1.0, 1.0, None), (0.01, 0.5, None), (0.01, 0.5, 24)])
def test_gpu_step_never_synchronises(r1, r2, cap):
    classes, dim, batch = 2000, 64, 32  # r1=0.01: 20 classes, fewer than the batch -> padded slots
    layer = ShardedPrototypes(classes, dim, r1=r1, r2=r2, max_positives=cap)
    losses = steps_without_sync(layer, torch.randint(0, classes, (4, batch), device="cuda"), dim)
    assert all(torch.isfinite(loss) for loss in losses)
    assert layer.last_stats["selected_classes"] >= min(classes, fraction_count(r1, classes))
    layer.check_labels()


@cuda
def test_gpu_bad_label_poisons_the_loss_and_is_reported():
    layer = ShardedPrototypes(100, 16, r1=0.2).cuda()
    loss = layer(torch.randn(4, 16, device="cuda"), torch.tensor([1, 2, 100, 3], device="cuda"))
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match=r"got labels from 1 to 100"):
        layer.check_labels()


@cuda
def test_gpu_layer_equals_dense_reference():
    torch.manual_seed(0)
    labels = torch.tensor([3, 3, 7, 9, 11, 3, 7, 30, 31, 3, 0, 39], device="cuda")
    layer = ShardedPrototypes(40, 16, r1=0.1, r2=0.5, seed=3).cuda().double()
    emb = torch.randn(len(labels), 16, dtype=torch.float64, device="cuda", requires_grad=True)
    loss = layer(emb, labels)
    loss.backward()
    sel = layer.selected - layer.class_range[0]
    assert set(labels.tolist()) <= set(sel.tolist())
    ref_emb = emb.detach().clone().requires_grad_()
    ref_w = layer.weight.detach().clone().requires_grad_()
    ref = dense_loss(ref_emb, ref_w, labels.cpu(), sel.cpu(), layer.features.cuda())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(emb.grad, ref_emb.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref_w.grad, rtol=1e-9, atol=1e-12)
