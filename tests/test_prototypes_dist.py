"""ShardedPrototypes and dist.gather_rows on 2 real gloo processes against 1 rank, and the block helpers."""
import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unicom_ds import ShardedPrototypes
from unicom_ds.dist import gather_rows
from unicom_ds.margin import feature_subset
from unicom_ds.prototypes import block_range, init_block, reslice

torch.set_num_threads(1)

# Each case: layer arguments and the local batch sizes of the two ranks (same global batch on 1 rank).
CASES = {
    "full": dict(num_classes=10, dim=12, r1=1.0, r2=1.0, sizes=(4, 4)),
    # Every class is a positive, so r1 < 1 selects everything on 1 and on 2 ranks alike.
    "all_positive": dict(num_classes=6, dim=12, r1=0.3, r2=0.5, sizes=(4, 4)),
    # Real negative sampling (10 of each 40-class block), unequal local batches.
    "sampled": dict(num_classes=80, dim=12, r1=0.25, r2=0.5, sizes=(3, 5)),
}


def case_inputs(name):
    """The global batch of a case, identical in every process."""
    c = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    n = sum(c["sizes"])
    emb = torch.randn(n, c["dim"], generator=gen, dtype=torch.float64)
    # Distinct classes when there are enough, else every class at least once.
    labels = torch.randperm(max(n, c["num_classes"]), generator=gen)[:n] % c["num_classes"]
    return emb, labels


def run_case(name, rank, world, equal_batches=False):
    """Two optimizer steps of a case on this rank's slice of the global batch."""
    c = CASES[name]
    emb, labels = case_inputs(name)
    sizes = c["sizes"] if world == 2 else (sum(c["sizes"]),)
    lo = sum(sizes[:rank])
    layer = ShardedPrototypes(c["num_classes"], c["dim"], r1=c["r1"], r2=c["r2"], seed=4,
                              equal_batches=equal_batches).double()
    steps = []
    for _ in range(2):
        local = emb[lo : lo + sizes[rank]].clone().requires_grad_()
        layer.weight.grad = None
        loss = layer(local, labels[lo : lo + sizes[rank]])
        loss.backward()
        steps.append(dict(loss=loss.detach(), emb_grad=local.grad, weight_grad=layer.weight.grad.clone(),
                          selected=layer.selected, features=layer.features, stats=dict(layer.last_stats)))
        layer.advance()
    return dict(class_range=layer.class_range, weight=layer.weight.detach(), steps=steps)


# gather_rows cases: (equal, local row counts of the two ranks).
GATHERS = [(True, (3, 3)), (False, (3, 3)), (False, (2, 5))]


def gather_inputs(sizes, rank):
    """This rank's rows (distinct values on every rank) and the weights of its own loss over the gathered rows."""
    x = torch.arange(sizes[rank] * 2, dtype=torch.float64).view(-1, 2) + 100 * rank
    weights = torch.randn(sum(sizes), 2, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    return x, weights


def gather_case(rank):
    out = {}
    for equal, sizes in GATHERS:
        x, weights = gather_inputs(sizes, rank)
        x.requires_grad_()
        y = gather_rows(x, equal)
        (y * weights).sum().backward()  # each rank its own loss: x's gradient sums every rank's
        out[equal, sizes] = (y.detach(), x.grad)
    return out


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        results = {name: run_case(name, rank, 2) for name in CASES}
        results.update({f"{name}_equal": run_case(name, rank, 2, equal_batches=True)
                        for name in CASES if len(set(CASES[name]["sizes"])) == 1})
        results["gather"] = gather_case(rank)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def dense_reference(name, step, classes):
    """Plain-autograd ArcFace over the given global classes and the step's feature dims."""
    c = CASES[name]
    emb, labels = case_inputs(name)
    full = init_block(0, c["num_classes"], c["dim"], seed=4).double().requires_grad_()
    emb = emb.clone().requires_grad_()
    dims = feature_subset(c["dim"], c["r2"], 4, step)
    e, w = emb[:, dims], full[classes][:, dims]
    unit = (e / e.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    y = torch.tensor([classes.tolist().index(v) for v in labels.tolist()])
    pos = torch.nn.functional.one_hot(y, len(classes)).bool()
    logits = 64.0 * torch.where(pos, torch.cos(torch.acos(unit.clamp(-1 + 1e-12, 1 - 1e-12)) + 0.3), unit)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    return loss.detach(), emb.grad, full.grad


@pytest.mark.parametrize("name", ["full", "all_positive"])
@pytest.mark.slow
def test_two_ranks_equal_one_rank(two_ranks, name):
    one = run_case(name, 0, 1)
    sizes = CASES[name]["sizes"]
    for step in range(2):
        ref = one["steps"][step]
        for rank, res in enumerate(two_ranks):
            got = res[name]["steps"][step]
            start, end = res[name]["class_range"]
            lo = sum(sizes[:rank])
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got["emb_grad"], ref["emb_grad"][lo : lo + sizes[rank]], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["weight_grad"], ref["weight_grad"][start:end], rtol=1e-10, atol=1e-12)
        assert torch.cat([r[name]["steps"][step]["selected"] for r in two_ranks]).tolist() == ref["selected"].tolist()
    # Blocks of the 2-rank run are the rows of the 1-rank matrix: init does not depend on the world size.
    torch.testing.assert_close(torch.cat([r[name]["weight"] for r in two_ranks]), one["weight"])


@pytest.mark.slow
def test_gather_rows_with_and_without_the_size_exchange(two_ranks):
    """equal=True (no size exchange) and the padded path gather the same rows and return the same
    gradients, both equal to the concatenation and the summed gradient; the padded path also takes unequal sizes."""
    for equal, sizes in GATHERS:
        inputs = [gather_inputs(sizes, r) for r in range(2)]
        want = torch.cat([x for x, _ in inputs])
        grad = sum(w for _, w in inputs)
        for rank, res in enumerate(two_ranks):
            y, x_grad = res["gather"][equal, sizes]
            assert torch.equal(y, want)
            assert torch.equal(x_grad, grad[sum(sizes[:rank]): sum(sizes[:rank + 1])])
    for rank, res in enumerate(two_ranks):
        assert all(torch.equal(a, b) for a, b in zip(res["gather"][True, (3, 3)], res["gather"][False, (3, 3)]))


@pytest.mark.slow
def test_layer_with_equal_batches_equals_the_padded_gather(two_ranks):
    """ShardedPrototypes(equal_batches=True), as the train loop builds it, gives the same steps bit for bit."""
    for name in ("full", "all_positive"):
        for res in two_ranks:
            for got, ref in zip(res[f"{name}_equal"]["steps"], res[name]["steps"]):
                for key in ("loss", "emb_grad", "weight_grad", "selected"):
                    assert torch.equal(got[key], ref[key]), (name, key)


@pytest.mark.slow
def test_sampled_negatives_keep_positives_and_match_dense_reference(two_ranks):
    c = CASES["sampled"]
    _, labels = case_inputs("sampled")
    for step in range(2):
        steps = [r["sampled"]["steps"][step] for r in two_ranks]
        for rank, got in enumerate(steps):
            start, end = two_ranks[rank]["sampled"]["class_range"]
            positives = {v for v in labels.tolist() if start <= v < end}
            chosen = got["selected"].tolist()
            assert positives <= set(chosen) and all(start <= v < end for v in chosen)
            assert len(chosen) == len(set(chosen)) == max(10, len(positives)) == got["stats"]["selected_classes"]
            assert got["stats"]["positives"] == len(positives) and got["stats"]["global_batch"] == 8
        classes = torch.cat([s["selected"] for s in steps])
        loss, emb_grad, weight_grad = dense_reference("sampled", step, classes)
        for rank, got in enumerate(steps):
            start, end = two_ranks[rank]["sampled"]["class_range"]
            lo = sum(c["sizes"][:rank])
            torch.testing.assert_close(got["loss"], loss, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(got["emb_grad"], emb_grad[lo : lo + c["sizes"][rank]], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got["weight_grad"], weight_grad[start:end], rtol=1e-9, atol=1e-12)
    # Fresh negatives each step.
    assert not torch.equal(two_ranks[0]["sampled"]["steps"][0]["selected"], two_ranks[0]["sampled"]["steps"][1]["selected"])


@pytest.mark.slow
def test_r2_subset_same_on_all_ranks_and_new_each_step(two_ranks):
    feats = [[r["sampled"]["steps"][s]["features"] for s in range(2)] for r in two_ranks]
    assert feats[0][0].numel() == 6
    assert torch.equal(feats[0][0], feats[1][0]) and torch.equal(feats[0][1], feats[1][1])
    assert not torch.equal(feats[0][0], feats[0][1])


def test_block_range_covers_evenly():
    for classes, world in [(10, 3), (7, 7), (1_000_000, 8), (5, 1)]:
        blocks = [block_range(classes, world, r) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        sizes = [e - s for s, e in blocks]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="num_classes=2 is smaller than the world size 3"):
        block_range(2, 3, 0)


def test_reslice_round_trip_across_world_sizes():
    full = torch.randn(11, 4)
    moments = torch.rand(11, 4)  # optimizer state re-slices the same way
    for tensor in (full, moments):
        saved = [(s, e, tensor[s:e].clone()) for s, e in (block_range(11, 3, r) for r in range(3))]
        for world in (2, 1, 4):
            for rank in range(world):
                start, end = block_range(11, world, rank)
                assert torch.equal(reslice(saved, start, end), tensor[start:end])
    saved = [(s, e, full[s:e]) for s, e in (block_range(11, 3, r) for r in range(3))]
    with pytest.raises(ValueError, match=r"do not cover classes \[4, 8\)"):
        reslice([saved[0], saved[2]], 0, 11)
    with pytest.raises(ValueError, match=r"block \[0, 4\) holds 3 rows, expected 4"):
        reslice([(0, 4, full[:3])], 0, 4)


def test_init_block_independent_of_world_size():
    whole = init_block(0, 9000, 3, seed=1)
    parts = [init_block(*block_range(9000, 3, r), 3, seed=1) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    assert 0.009 < whole.std() < 0.011
    assert not torch.equal(init_block(0, 10, 3, seed=2), whole[:10])


def test_train_loop_refuses_a_micro_batch_of_another_size():
    """The train loop builds its layer with equal_batches=True: a micro batch of another size than every
    rank's would hang the gather, so it stops first, naming the sizes."""
    from types import SimpleNamespace

    from unicom_ds.objectives import PrototypeObjective

    objective = SimpleNamespace(micro=4, rank=1)  # fails before touching the engine
    with pytest.raises(RuntimeError, match=r"rank 1: a micro batch of 3 rows, not the 4 of every rank"):
        PrototypeObjective.loss(objective, None, (torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.long)))
