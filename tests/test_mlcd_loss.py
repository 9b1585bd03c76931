"""MLCDPrototypes (MLCD's multi-label loss over sharded prototypes) on 1, 2 and 3 real gloo processes
against a dense single-process reference, its r1 selection, its relation to the single-label layer,
-1 padding and NaN embeddings."""
import datetime
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unicom_ds import ShardedPrototypes
from unicom_ds import prototypes
from unicom_ds.margin import feature_subset
from unicom_ds.mlcd import MLCDPrototypes
from unicom_ds.prototypes import init_block

from test_prototypes_sync import steps_without_sync

torch.set_num_threads(1)

SEED = 5
# Each case: layer arguments, labels per image and the global batch size (split unevenly over ranks).
CASES = {
    "full": dict(num_classes=12, dim=10, r1=1.0, r2=1.0, width=3, n=8, kind="additive"),
    # Real negative sampling: 90 classes, 18 / 30 / 45 per block with 20 % kept, half the features.
    "sampled": dict(num_classes=90, dim=10, r1=0.2, r2=0.5, width=4, n=8, kind="additive"),
    "angular": dict(num_classes=90, dim=10, r1=0.2, r2=1.0, width=2, n=8, kind="angular"),
}
SIZES = {1: (8,), 2: (3, 5), 3: (2, 3, 3)}


def case_inputs(name):
    """The global batch of a case (identical in every process): shared positives, pads, a duplicate."""
    c = CASES[name]
    gen = torch.Generator().manual_seed(len(name) + 11)
    emb = torch.randn(c["n"], c["dim"], generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c["num_classes"], (c["n"], c["width"]), generator=gen)
    labels[1, 0] = labels[0, 0]  # two images share a positive
    labels[2, -1] = -1  # a padded (missing) positive
    labels[3, :] = -1  # an image without any positive
    labels[4, -1] = labels[4, 0]  # a repeated positive counts once
    return emb, labels


def make_layer(name):
    c = CASES[name]
    return MLCDPrototypes(c["num_classes"], c["dim"], r1=c["r1"], r2=c["r2"], seed=SEED,
                          margin_kind=c["kind"]).double()


def run_case(name, rank, world):
    """Two optimizer steps of a case on this rank's slice of the global batch."""
    emb, labels = case_inputs(name)
    sizes = SIZES[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    layer = make_layer(name)
    steps = []
    for _ in range(2):
        local = emb[lo:hi].clone().requires_grad_()
        layer.weight.grad = None
        loss = layer(local, labels[lo:hi])
        loss.backward()
        steps.append(dict(loss=loss.detach(), emb_grad=local.grad, weight_grad=layer.weight.grad.clone(),
                          selected=layer.selected, features=layer.features, terms=dict(layer.terms)))
        layer.advance()
    # A NaN in one rank's embeddings: every rank's loss must be non-finite.
    bad = emb[lo:hi].clone()
    if rank == world - 1:
        bad[-1, 0] = float("nan")
    nan_loss = layer(bad, labels[lo:hi]).detach()
    return dict(class_range=layer.class_range, steps=steps, nan_loss=nan_loss)


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        torch.save({name: run_case(name, rank, world) for name in CASES}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    world = request.param
    if world == 1:
        return [{name: run_case(name, 0, 1) for name in CASES}]
    out = tmp_path_factory.mktemp(f"mlcd{world}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def dense_reference(name, classes, dims):
    """Plain autograd over the full prototype matrix restricted to `classes`, the formula by hand:
    mean_i log(1 + sum_{j neg} e^{s cos_ij}) + log(1 + sum_{p pos} e^{-s (cos_ip - m)}) (or cos(theta + m))."""
    c = CASES[name]
    s, m = 64.0, 0.3
    emb, labels = case_inputs(name)
    full = init_block(0, c["num_classes"], c["dim"], seed=SEED).double().requires_grad_()
    emb = emb.clone().requires_grad_()
    e = emb if dims is None else emb[:, dims]
    w = full[classes] if dims is None else full[classes][:, dims]
    cos = (e / e.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    zero = torch.zeros(1, dtype=torch.float64)
    negative = positive = 0.0
    for i, row in enumerate(labels.tolist()):
        positives = {v for v in row if v >= 0}
        pos = [j for j, k in enumerate(classes) if k in positives]
        neg = [j for j, k in enumerate(classes) if k not in positives]
        assert len(pos) == len(positives)  # every positive is among the classes
        cp = cos[i, pos]
        if c["kind"] == "additive":
            pos_logits = -s * (cp - m)
        else:
            pos_logits = -s * torch.cos(torch.acos(cp) + m)
        negative = negative + torch.logsumexp(torch.cat([zero, s * cos[i, neg]]), 0)
        positive = positive + torch.logsumexp(torch.cat([zero, pos_logits]), 0)
    loss = (negative + positive) / len(labels)
    loss.backward()
    return loss.detach(), emb.grad, full.grad, (negative.detach() / len(labels), positive.detach() / len(labels))


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradients_equal_the_dense_reference(ranks, name):
    world = len(ranks)
    c = CASES[name]
    for step in range(2):
        got = [r[name]["steps"][step] for r in ranks]
        classes = torch.cat([g["selected"] for g in got]).tolist()
        if c["r1"] == 1.0:
            assert classes == list(range(c["num_classes"]))
        else:  # really sampled: fewer classes than all
            assert len(classes) < c["num_classes"]
        dims = feature_subset(c["dim"], c["r2"], SEED, step)
        for g in got:
            assert (g["features"] is None) == (dims is None)
            if dims is not None:
                assert torch.equal(g["features"], dims)
        loss, emb_grad, weight_grad, (negative, positive) = dense_reference(name, classes, dims)
        for g in got:  # the same loss on every rank, and the same two terms it sums (logged by the train stage)
            torch.testing.assert_close(g["loss"], loss, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(g["terms"]["loss_negative"], negative, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(g["terms"]["loss_positive"], positive, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.cat([g["emb_grad"] for g in got]), emb_grad, rtol=1e-8, atol=1e-10)
        stitched = torch.cat([g["weight_grad"] for g in got])
        assert stitched.shape == weight_grad.shape, world
        torch.testing.assert_close(stitched, weight_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_every_positive_is_selected_on_its_rank(ranks, name):
    _, labels = case_inputs(name)
    positives = set(labels[labels >= 0].tolist())
    for r in ranks:
        lo, hi = r[name]["class_range"]
        for step in r[name]["steps"]:
            selected = set(step["selected"].tolist())
            assert all(lo <= k < hi for k in selected)
            assert {k for k in positives if lo <= k < hi} <= selected


@pytest.mark.parametrize("name", list(CASES))
def test_a_nan_embedding_gives_a_non_finite_loss_on_every_rank(ranks, name):
    for r in ranks:
        assert not torch.isfinite(r[name]["nan_loss"])


@pytest.mark.parametrize("r1,r2", [(1.0, 1.0), (0.2, 0.5)])
def test_one_label_with_angular_margin_is_the_single_label_loss_plus_the_exact_gap(r1, r2):
    """l = 1, margin_kind="angular", same seed: same selection and logits as ShardedPrototypes, and
    L_mlcd = L_softmax + mean_i log(1 + (1 + N_i P_i) / (N_i + P_i)), N_i = sum_neg e^{s cos}, P_i = e^{s cos(theta+m)}."""
    k, d, n, s, m = 60, 10, 9, 64.0, 0.3
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=gen)
    single = ShardedPrototypes(k, d, r1=r1, r2=r2, seed=SEED).double()
    multi = MLCDPrototypes(k, d, r1=r1, r2=r2, seed=SEED, margin_kind="angular").double()
    for _ in range(2):
        loss_single = single(emb, labels)
        loss_multi = multi(emb, labels[:, None])
        assert torch.equal(single.selected, multi.selected)
        classes = single.selected.tolist()
        w = init_block(0, k, d, SEED).double()[classes]
        e = emb
        if single.features is not None:
            w, e = w[:, single.features], emb[:, single.features]
        cos = F.normalize(e, dim=1) @ F.normalize(w, dim=1).T
        y = torch.tensor([classes.index(v) for v in labels.tolist()])
        at = cos[torch.arange(n), y]
        pos_exp = torch.exp(s * torch.cos(torch.acos(at) + m))
        neg_sum = torch.exp(s * cos).sum(1) - torch.exp(s * at)
        gap = torch.log1p((1 + neg_sum * pos_exp) / (neg_sum + pos_exp))
        assert (gap > 0).all()
        torch.testing.assert_close(loss_multi, loss_single + gap.mean(), rtol=1e-10, atol=1e-10)
        single.advance()
        multi.advance()


def test_padding_is_ignored():
    """Labels with -1 pads give the loss and gradients of the same labels without them."""
    k, d = 20, 8
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(5, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, k, (5, 2), generator=gen)
    padded = torch.cat([labels, torch.full((5, 2), -1)], 1)
    padded[1] = padded[1, [2, 0, 3, 1]]  # pads anywhere in the row
    results = []
    for lab in (labels, padded):
        layer = MLCDPrototypes(k, d, r1=1.0, seed=1).double()
        x = emb.clone().requires_grad_()
        loss = layer(x, lab)
        loss.backward()
        results.append((loss.detach(), x.grad, layer.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # An image whose labels are all pads has no positive term: its loss is log(1 + sum_j e^{s cos_j}).
    layer = MLCDPrototypes(k, d, r1=1.0, seed=1).double()
    only = layer(emb[:1], torch.full((1, 3), -1))
    cos = F.normalize(emb[:1], dim=1) @ F.normalize(layer.weight.detach(), dim=1).T
    torch.testing.assert_close(only.detach(), torch.log1p(torch.exp(64.0 * cos).sum()), rtol=1e-12, atol=1e-12)


def test_a_nan_embedding_gives_a_non_finite_loss():
    layer = MLCDPrototypes(30, 8, r1=0.3, seed=0)
    emb = torch.randn(4, 8)
    emb[2, 3] = float("nan")
    assert not torch.isfinite(layer(emb, torch.randint(0, 30, (4, 3))))


def test_bad_labels_and_shapes_are_refused():
    layer = MLCDPrototypes(30, 8, seed=0)
    emb = torch.randn(2, 8)
    for bad in (-2, 30):
        with pytest.raises(ValueError, match="or -1"):
            layer(emb, torch.tensor([[0, 1], [bad, 2]]))
    with pytest.raises(ValueError, match="labels must be"):
        layer(emb, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="margin_kind"):
        MLCDPrototypes(30, 8, margin_kind="cos")


def test_max_positives_caps_the_slots():
    """More positives of a global batch on a rank than max_positives leaves room for: a ValueError."""
    layer = MLCDPrototypes(100, 8, r1=0.05, seed=0, max_positives=6)
    layer(torch.randn(2, 8), torch.tensor([[0, 1, 2], [3, 4, 5]]))
    with pytest.raises(ValueError, match="max_positives"):
        layer(torch.randn(2, 8), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))


def test_no_python_branch_on_label_values_changes_shapes():
    """The scored matrix has a shape fixed by (global batch, l, block, r1): labels never change it."""
    layer = MLCDPrototypes(200, 8, r1=0.1, seed=0)
    shapes = set()
    for labels in (torch.zeros(4, 3, dtype=torch.long), torch.arange(12).view(4, 3), torch.full((4, 3), -1)):
        layer(torch.randn(4, 8), labels)
        shapes.add(layer._slots[0].numel())
    assert shapes == {min(200, max(math.ceil(0.1 * 200), 12))}


def test_labels_on_a_device_are_checked_asynchronously(monkeypatch):
    """The accelerator path on the CPU: no raise in the step, a NaN loss, and the error on check_labels()."""
    monkeypatch.setattr(prototypes, "_checks_at_once", lambda device: False)
    layer = MLCDPrototypes(10, 8, r1=0.5)
    emb = torch.randn(3, 8, requires_grad=True)
    good = layer(emb, torch.tensor([[1, -1], [2, 5], [3, 3]]))
    assert torch.isfinite(good)
    layer.check_labels()  # -1 is padding, not a fault
    assert layer.label_fault is None
    bad = layer(emb, torch.tensor([[1, 12], [2, 5], [3, -1]]))
    layer(emb, torch.tensor([[-2, 4], [3, 3], [1, 1]]))
    assert torch.isnan(bad)
    bad.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(layer.weight.grad).all()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\) or -1 \(padding\), got labels from -2 to 12"):
        layer.check_labels()
    layer.check_labels()  # reported once


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("r1, r2, kind", [(0.1, 0.5, "additive"), (1.0, 1.0, "angular"), (0.01, 0.5, "additive")])
def test_gpu_step_never_synchronises(r1, r2, kind):
    classes, dim, batch, width = 2000, 64, 32, 8  # r1=0.01: 20 classes, fewer than the positives -> padded slots
    layer = MLCDPrototypes(classes, dim, r1=r1, r2=r2, margin_kind=kind)
    losses = steps_without_sync(layer, torch.randint(-1, classes, (4, batch, width), device="cuda"), dim)
    assert all(torch.isfinite(loss) for loss in losses)
    layer.check_labels()


@cuda
def test_gpu_layer_equals_the_cpu_layer():
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(12, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(-1, 40, (12, 4), generator=gen)
    results = []
    for device in ("cpu", "cuda"):
        layer = MLCDPrototypes(40, 16, r1=1.0, r2=0.5, seed=3).to(device).double()
        x = emb.to(device).requires_grad_()
        loss = layer(x, labels.to(device))
        loss.backward()
        results.append([t.cpu() for t in (loss.detach(), x.grad, layer.weight.grad)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
