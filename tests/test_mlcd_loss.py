"""MLCDPrototypes (MLCD's multi-label loss over sharded prototypes) on 1, 2 and 3 real gloo processes
against a dense float64 reference, its r1 selection (every positive plus a uniform sample of the other
classes, also at the paper's ratios where the positives outnumber r1 * block), its relation to the
single-label layer, -1 padding, NaN embeddings and the statistics the train stage logs."""
import datetime
import functools
import math
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy import stats

from unicom_ds import ShardedPrototypes
from unicom_ds import prototypes
from unicom_ds.margin import feature_subset, generator, select_sampled, select_slots
from unicom_ds.mlcd import MLCDPrototypes
from unicom_ds import config
from unicom_ds.objectives import PrototypeObjective
from unicom_ds.prototypes import block_range, init_block

from test_prototypes_sync import steps_without_sync

torch.set_num_threads(1)

SEED = 5
# Each case: layer arguments, labels per image and the global batch size (split unevenly over ranks).
CASES = {
    "full": dict(num_classes=12, dim=10, r1=1.0, r2=1.0, width=3, n=8, kind="additive", negatives="sampled"),
    # Real negative sampling: 90 classes, 18 / 30 / 45 per block with about 20 % sampled, half the features.
    "sampled": dict(num_classes=90, dim=10, r1=0.2, r2=0.5, width=4, n=8, kind="additive", negatives="sampled"),
    "angular": dict(num_classes=90, dim=10, r1=0.2, r2=1.0, width=2, n=8, kind="angular", negatives="sampled"),
    # PartialFC's convention: the other images' positives are negatives too.
    "selected": dict(num_classes=90, dim=10, r1=0.2, r2=0.5, width=4, n=8, kind="angular", negatives="selected"),
}
SIZES = {1: (8,), 2: (3, 5), 3: (2, 3, 3)}
# The paper's ratios (Sec. 4.1: l = 8, r = 0.1) at a small k: 262 x 8 labels put about 1,840 distinct positives in
# 8,000 classes, more than r1 * block on 1, 2 and 3 ranks, as 32,768 x 8 do in 1M classes over 8 ranks.
PAPER = dict(num_classes=8000, dim=8, r1=0.1, n=262, width=8, steps=120, checked=2)


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


def paper_inputs():
    gen = torch.Generator().manual_seed(30)
    emb = torch.randn(PAPER["n"], PAPER["dim"], generator=gen, dtype=torch.float64)
    return emb, torch.randint(0, PAPER["num_classes"], (PAPER["n"], PAPER["width"]), generator=gen)


def record(layer, loss, local):
    """What one forward leaves: the loss, its terms and gradients, the classes scored and sampled, the stats."""
    out = dict(loss=loss.detach(), terms=dict(layer.terms), selected=layer.selected, sampled=layer.sampled,
               features=layer.features, stats=layer.last_stats)
    if loss.requires_grad:
        loss.backward()
        out.update(emb_grad=local.grad, weight_grad=layer.weight.grad.clone())
    return out


def run_case(name, rank, world):
    """Two optimizer steps of a case on this rank's slice of the global batch."""
    c = CASES[name]
    emb, labels = case_inputs(name)
    sizes = SIZES[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    layer = MLCDPrototypes(c["num_classes"], c["dim"], r1=c["r1"], r2=c["r2"], seed=SEED, margin_kind=c["kind"],
                           negatives=c["negatives"]).double()
    steps = []
    for _ in range(2):
        local = emb[lo:hi].clone().requires_grad_()
        layer.weight.grad = None
        steps.append(record(layer, layer(local, labels[lo:hi]), local))
        layer.advance()
    # A NaN in one rank's embeddings: every rank's loss must be non-finite.
    bad = emb[lo:hi].clone()
    if rank == world - 1:
        bad[-1, 0] = float("nan")
    nan_loss = layer(bad, labels[lo:hi]).detach()
    return dict(class_range=layer.class_range, steps=steps, nan_loss=nan_loss)


def run_paper(rank, world):
    """PAPER["steps"] forwards on this rank's half (or third) of one fixed global batch; gradients in the first
    PAPER["checked"]."""
    emb, labels = paper_inputs()
    lo, hi = block_range(PAPER["n"], world, rank)  # even local batches
    layer = MLCDPrototypes(PAPER["num_classes"], PAPER["dim"], r1=PAPER["r1"], seed=SEED).double()
    steps = []
    for step in range(PAPER["steps"]):
        local = emb[lo:hi].clone().requires_grad_(step < PAPER["checked"])
        layer.weight.grad = None
        with torch.set_grad_enabled(step < PAPER["checked"]):
            steps.append(record(layer, layer(local, labels[lo:hi]), local))
        layer.advance()
    return dict(class_range=layer.class_range, steps=steps)


def run_all(rank, world):
    return {**{name: run_case(name, rank, world) for name in CASES}, "paper": run_paper(rank, world)}


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        torch.save(run_all(rank, world), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@functools.cache
def one_rank():
    return [run_all(0, 1)]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    world = request.param
    if world == 1:
        return one_rank()
    out = tmp_path_factory.mktemp(f"mlcd{world}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def dense_reference(emb, labels, num_classes, dim, classes, pool, dims, kind):
    """Plain autograd over the full prototype matrix restricted to `classes`, the formula by hand: row i's
    positives P_i are its labels, its negatives the classes of `pool` outside P_i;
    mean_i log(1 + sum_{j neg} e^{s cos_ij}) + log(1 + sum_{p in P_i} e^{-s cos(theta_ip + m)}) (or -s (cos - m))."""
    s, m = 64.0, 0.3
    full = init_block(0, num_classes, dim, seed=SEED).double().requires_grad_()
    emb = emb.clone().requires_grad_()
    classes = torch.as_tensor(classes)
    e = emb if dims is None else emb[:, dims]
    w = full[classes] if dims is None else full[classes][:, dims]
    cos = F.normalize(e, dim=1) @ F.normalize(w, dim=1).T
    pos = (labels[:, :, None] == classes[None, None, :]).any(1)
    wanted = torch.tensor([len({v for v in row if v >= 0}) for row in labels.tolist()])
    assert torch.equal(pos.sum(1), wanted)  # every positive is among the classes
    neg = torch.isin(classes, torch.as_tensor(pool))[None, :] & ~pos
    pos_logits = -s * (cos - m) if kind == "additive" else -s * torch.cos(torch.acos(cos) + m)
    ninf, zero = torch.tensor(float("-inf"), dtype=cos.dtype), torch.zeros(len(labels), 1, dtype=cos.dtype)
    negative = torch.logsumexp(torch.cat([zero, torch.where(neg, s * cos, ninf)], 1), 1).mean()
    positive = torch.logsumexp(torch.cat([zero, torch.where(pos, pos_logits, ninf)], 1), 1).mean()
    loss = negative + positive
    loss.backward()
    return loss.detach(), emb.grad, full.grad, (negative.detach(), positive.detach())


def assert_equals_dense_reference(got, emb, labels, num_classes, dim, dims, kind, negatives):
    """`got`: one step of every rank. Its loss, two terms and gradients against `dense_reference` over the
    classes the ranks scored together, each row's negatives from the sample (or every scored class)."""
    classes = torch.cat([g["selected"] for g in got]).tolist()
    pool = torch.cat([g["sampled" if negatives == "sampled" else "selected"] for g in got]).tolist()
    loss, emb_grad, weight_grad, (negative, positive) = dense_reference(emb, labels, num_classes, dim, classes,
                                                                        pool, dims, kind)
    for g in got:  # the same loss on every rank, and the same two terms it sums (logged by the train stage)
        torch.testing.assert_close(g["loss"], loss, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g["terms"]["loss_negative"], negative, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g["terms"]["loss_positive"], positive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([g["emb_grad"] for g in got]), emb_grad, rtol=1e-8, atol=1e-10)
    stitched = torch.cat([g["weight_grad"] for g in got])
    assert stitched.shape == weight_grad.shape
    torch.testing.assert_close(stitched, weight_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradients_equal_the_dense_reference(ranks, name):
    c = CASES[name]
    emb, labels = case_inputs(name)
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
        assert_equals_dense_reference(got, emb, labels, c["num_classes"], c["dim"], dims, c["kind"], c["negatives"])


@pytest.mark.parametrize("name", list(CASES))
def test_every_positive_is_selected_on_its_rank(ranks, name):
    _, labels = case_inputs(name)
    positives = set(labels[labels >= 0].tolist())
    for r in ranks:
        lo, hi = r[name]["class_range"]
        for step in r[name]["steps"]:
            selected = set(step["selected"].tolist())
            assert all(lo <= k < hi for k in selected) and set(step["sampled"].tolist()) <= selected
            assert {k for k in positives if lo <= k < hi} <= selected


@pytest.mark.parametrize("name", list(CASES))
def test_a_nan_embedding_gives_a_non_finite_loss_on_every_rank(ranks, name):
    for r in ranks:
        assert not torch.isfinite(r[name]["nan_loss"])


def paper_positives(lo, hi):
    _, labels = paper_inputs()
    return {v for v in labels.flatten().tolist() if lo <= v < hi}


def test_paper_ratios_score_every_positive_though_they_outnumber_r1_of_the_block(ranks):
    for r in ranks:
        lo, hi = r["paper"]["class_range"]
        positives = paper_positives(lo, hi)
        assert len(positives) > 2 * PAPER["r1"] * (hi - lo)  # the paper's regime (there 231k against 100k)
        for step in r["paper"]["steps"]:
            assert positives <= set(step["selected"].tolist())
            assert step["stats"]["positives"] == len(positives)


def test_paper_ratios_sample_about_r1_of_the_other_classes(ranks):
    """selected_classes - positives (what TensorBoard shows as sampled_negatives) is the sample outside the
    positives: per step within 5 sd of r1 * (block - positives), on average within 1 %."""
    r1 = PAPER["r1"]
    for r in ranks:
        lo, hi = r["paper"]["class_range"]
        positives = paper_positives(lo, hi)
        expected = r1 * (hi - lo - len(positives))
        counts = []
        for step in r["paper"]["steps"]:
            negatives = set(step["sampled"].tolist()) - positives
            assert step["stats"]["selected_classes"] - step["stats"]["positives"] == len(negatives)
            assert set(step["selected"].tolist()) == positives | negatives
            counts.append(len(negatives))
        assert all(abs(c - expected) < 5 * math.sqrt(expected * (1 - r1)) for c in counts), (counts, expected)
        assert abs(sum(counts) / len(counts) - expected) < 0.01 * expected


def test_paper_ratios_sampled_negatives_are_uniform(ranks):
    """How often each non-positive class was sampled over 120 steps (12 times expected): uniform by a
    chi-square test (loose: p > 1e-4), no class drawn at every other step."""
    for r in ranks:
        lo, hi = r["paper"]["class_range"]
        others = sorted(set(range(lo, hi)) - paper_positives(lo, hi))
        counts = torch.zeros(hi - lo)
        for step in r["paper"]["steps"]:
            counts[step["sampled"] - lo] += 1
        counts = counts[torch.tensor(others) - lo]
        assert stats.chisquare(counts.numpy()).pvalue > 1e-4
        assert counts.max() < PAPER["steps"] / 2


def test_paper_ratios_draw_is_the_same_on_every_rank(ranks):
    """Every rank draws from the same stream over all k classes: together the ranks sample and score exactly
    what one rank does."""
    alone = one_rank()[0]["paper"]["steps"]
    for step, ref in enumerate(alone):
        for key in ("sampled", "selected"):
            assert torch.cat([r["paper"]["steps"][step][key] for r in ranks]).tolist() == ref[key].tolist()


def test_paper_ratios_loss_equals_the_dense_reference(ranks):
    emb, labels = paper_inputs()
    for step in range(PAPER["checked"]):
        got = [r["paper"]["steps"][step] for r in ranks]
        assert_equals_dense_reference(got, emb, labels, PAPER["num_classes"], PAPER["dim"], None, "angular", "sampled")


def test_the_issues_setting_samples_negatives_where_partialfcs_rule_samples_none():
    """Issue 30's measurement, the paper's ratios scaled down 20x on one process (k = 50,000, 1,638 x 8 labels,
    r1 = 0.1): PartialFC's rule scores the ~11,500 positives and nothing else; MLCD's adds r1 of the rest."""
    k, r1 = 50_000, 0.1
    labels = torch.randint(0, k, (1638 * 8,), generator=torch.Generator().manual_seed(0))
    hit = torch.ones_like(labels, dtype=torch.bool)
    positives = labels.unique().numel()
    assert positives > r1 * k
    _, _, count = select_slots(hit, labels, k, r1, labels.numel(), generator(0, 1))
    assert int(count) == positives  # no negative at all
    u = torch.rand(k, generator=torch.Generator().manual_seed(1))
    index, valid, sampled, count = select_sampled(hit, labels, u, r1, labels.numel())
    chosen = set(index[: int(count)].tolist())
    assert set(labels.tolist()) <= chosen and int(valid.sum()) == int(count) == len(chosen)
    negatives = len(chosen) - positives
    assert abs(negatives - r1 * (k - positives)) < 0.03 * r1 * (k - positives)
    assert set(index[sampled].tolist()) == {c for c in range(k) if u[c] < r1}


def test_select_sampled_shape_is_fixed_and_overflow_is_counted():
    block, r1 = 50, 0.1
    u = torch.rand(block, generator=torch.Generator().manual_seed(2))
    for n_classes in (1, 4, 9, 16):
        local = torch.arange(16) % n_classes
        index, valid, sampled, count = select_sampled(torch.ones(16, dtype=torch.bool), local, u, r1, 16)
        assert index.shape == valid.shape == sampled.shape == (21,)  # room 16 + ceil(0.1 * 50)
        assert set(range(n_classes)) <= set(index[: int(count)].tolist()) and valid[: int(count)].all()
        assert index.min() >= 0 and index.max() < block
    # Rows of other blocks (hit False) never become positives, whatever their clamped id.
    index, valid, sampled, count = select_sampled(torch.tensor([False, True]), torch.tensor([0, 7]), u, r1, 20)
    assert set(index[: int(count)].tolist()) == {7} | {c for c in range(block) if u[c] < r1}
    # More positives than the slots: count is their number (the layer's overflow error); a sample larger than
    # its room keeps the draws nearest 0.
    index, valid, sampled, count = select_sampled(torch.ones(12, dtype=torch.bool), torch.arange(12), u, r1, 6)
    assert index.numel() == 11 and int(count) == 12 and valid.all()
    few, everything = torch.arange(20, 30), torch.arange(block) * 0.001  # every class drawn below r1
    index, _, sampled, count = select_sampled(torch.ones(10, dtype=torch.bool), few, everything, r1, 10)
    assert int(count) == 15 and set(index.tolist()) == set(few.tolist()) | {0, 1, 2, 3, 4} and sampled.all()


@pytest.mark.parametrize("r1,r2", [(1.0, 1.0), (0.2, 0.5)])
def test_one_label_with_angular_margin_is_the_softmax_loss_plus_the_exact_gap(r1, r2):
    """l = 1, margin_kind="angular", negatives="selected": the logits of the ArcFace softmax over the same classes,
    and L_mlcd = L_softmax + mean_i log(1 + (1 + N_i P_i) / (N_i + P_i)), N_i = sum_neg e^{s cos},
    P_i = e^{s cos(theta+m)}. With r1 = 1 that softmax is ShardedPrototypes' own loss."""
    k, d, n, s, m = 60, 10, 9, 64.0, 0.3
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=gen)
    single = ShardedPrototypes(k, d, r1=r1, r2=r2, seed=SEED).double()
    multi = MLCDPrototypes(k, d, r1=r1, r2=r2, seed=SEED, margin_kind="angular", negatives="selected").double()
    for _ in range(2):
        loss_single = single(emb, labels)
        loss_multi = multi(emb, labels[:, None])
        classes = multi.selected.tolist()
        w = init_block(0, k, d, SEED).double()[classes]
        e = emb
        if multi.features is not None:
            w, e = w[:, multi.features], emb[:, multi.features]
        cos = F.normalize(e, dim=1) @ F.normalize(w, dim=1).T
        y = torch.tensor([classes.index(v) for v in labels.tolist()])
        at = cos[torch.arange(n), y]
        pos_exp = torch.exp(s * torch.cos(torch.acos(at) + m))
        neg_sum = torch.exp(s * cos).sum(1) - torch.exp(s * at)
        softmax = (torch.log(neg_sum + pos_exp) - torch.log(pos_exp)).mean()
        if r1 == 1.0:
            torch.testing.assert_close(loss_single, softmax, rtol=1e-10, atol=1e-10)
        gap = torch.log1p((1 + neg_sum * pos_exp) / (neg_sum + pos_exp))
        assert (gap > 0).all()
        torch.testing.assert_close(loss_multi, softmax + gap.mean(), rtol=1e-10, atol=1e-10)
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
    with pytest.raises(ValueError, match="negatives='all': expected one of sampled, selected"):
        MLCDPrototypes(30, 8, negatives="all")


def test_max_positives_caps_the_slots():
    """max_positives=6 and ceil(0.05 * 100) = 5: 11 slots; 8 positives still fit (the sample shrinks), 12 are a
    ValueError."""
    layer = MLCDPrototypes(100, 8, r1=0.05, seed=0, max_positives=6)
    layer(torch.randn(2, 8), torch.tensor([[0, 1, 2], [3, 4, 5]]))
    layer(torch.randn(2, 8), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
    assert layer._slots[0].numel() == 11 and set(range(8)) <= set(layer.selected.tolist())
    with pytest.raises(ValueError, match="held 12 classes of one rank.s block, more than max_positives=6"):
        layer(torch.randn(2, 8), torch.arange(12).view(2, 6))


def test_no_python_branch_on_label_values_changes_shapes():
    """The scored matrix has a shape fixed by (global batch, l, block, r1): labels never change it."""
    layer = MLCDPrototypes(200, 8, r1=0.1, seed=0)
    shapes = set()
    for labels in (torch.zeros(4, 3, dtype=torch.long), torch.arange(12).view(4, 3), torch.full((4, 3), -1)):
        layer(torch.randn(4, 8), labels)
        shapes.add(layer._slots[0].numel())
    assert shapes == {min(200, 12 + math.ceil(0.1 * 200))}


def test_the_train_stage_logs_positives_and_sampled_negatives_beside_the_selected_classes(tmp_path):
    """The objective's window of scalars (TensorBoard's train/*): per-step means of the layer's counts, and the
    sampled negatives (selected - positives) about r1 of the classes that are no positive."""
    loss = SimpleNamespace(r1=0.1, r2=1.0, margin=0.3, scale=64.0, margin_grad="straight_through")
    objective = PrototypeObjective("MLCD-ViT-Tiny-16", None, classes=2000, kind="mlcd", loss_cfg=loss, lr_mult=1.0,
                                   seed=0, micro=64, rank=0, world=1, out=tmp_path)
    objective.start(torch.device("cpu"), 0.05)
    seen = []
    for _ in range(3):
        objective.layer(torch.randn(64, 64), torch.randint(0, 2000, (64, 8)))
        objective.boundary()
        seen.append(objective.layer.last_stats)
        objective.layer.advance()
    got = objective.scalars(3)
    selected, positives = (sum(s[key] for s in seen) / 3 for key in ("selected_classes", "positives"))
    assert got == pytest.approx({"selected_classes": selected, "positives": positives,
                                 "sampled_negatives": selected - positives})
    assert positives > 0.1 * 2000 and abs(got["sampled_negatives"] - 0.1 * (2000 - positives)) < 0.25 * 0.1 * 2000
    assert objective.scalars(1)["selected_classes"] == 0  # the window starts again


@pytest.mark.parametrize("margin_kind, negatives", [("angular", "sampled"), ("additive", "selected")])
def test_the_loss_form_keys_reach_the_layer(tmp_path, margin_kind, negatives):
    """loss.margin_kind and loss.negatives build the layer; the paper's form without them (fine-tuning's section)."""
    cfg = config.resolve([f"run_dir={tmp_path}", "loss.kind=mlcd", f"loss.margin_kind={margin_kind}",
                          f"loss.negatives={negatives}"])
    objective = PrototypeObjective("MLCD-ViT-Tiny-16", None, classes=100, kind="mlcd", loss_cfg=cfg.loss, lr_mult=1.0,
                                   seed=0, micro=4, rank=0, world=1, out=tmp_path)
    objective.start(torch.device("cpu"), 0.05)
    assert (objective.layer.margin_kind, objective.layer.negatives) == (margin_kind, negatives)
    bare = SimpleNamespace(r1=0.1, r2=1.0, margin=0.3, scale=64.0, margin_grad="straight_through")
    objective = PrototypeObjective("MLCD-ViT-Tiny-16", None, classes=100, kind="mlcd", loss_cfg=bare, lr_mult=1.0,
                                   seed=0, micro=4, rank=0, world=1, out=tmp_path)
    objective.start(torch.device("cpu"), 0.05)
    assert (objective.layer.margin_kind, objective.layer.negatives) == ("angular", "sampled")
    with pytest.raises(config.ConfigError, match="loss.negatives"):
        config.resolve([f"run_dir={tmp_path}", "loss.negatives=all"])


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
    classes, dim, batch, width = 2000, 64, 32, 8  # 256 labels: more positives than r1 * 2000, padded slots
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
