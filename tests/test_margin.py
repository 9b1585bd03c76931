"""Single-process checks of the margin softmax math and of ShardedPrototypes as one rank."""
import math

import pytest
import torch
import torch.nn.functional as F

from unicom_ds import ShardedPrototypes
from unicom_ds.margin import (add_angle, cosine, feature_subset, fraction_count, generator, select_classes,
                              sharded_cross_entropy)

torch.set_num_threads(1)


def dense_arcface(emb, weight, labels, margin, scale):
    """Plain-autograd ArcFace softmax over every row of `weight`: the independent reference."""
    unit_e = emb / emb.norm(dim=1, keepdim=True)
    unit_w = weight / weight.norm(dim=1, keepdim=True)
    cos = unit_e @ unit_w.T
    theta = torch.acos(cos.clamp(-1 + 1e-12, 1 - 1e-12))
    positive = F.one_hot(labels, weight.shape[0]).bool()
    logits = scale * torch.where(positive, torch.cos(theta + margin), cos)
    return F.cross_entropy(logits, labels)


def layer_and_reference(num_classes, dim, batch, r1, r2, margin=0.3, scale=64.0, seed=0):
    """Run the layer in float64 and the reference on the classes and dims the layer selected."""
    torch.manual_seed(seed)
    layer = ShardedPrototypes(num_classes, dim, r1=r1, r2=r2, margin=margin, scale=scale, seed=seed).double()
    emb = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch,))
    loss = layer(emb, labels)
    loss.backward()

    ref_emb = emb.detach().clone().requires_grad_()
    ref_w = layer.weight.detach().clone().requires_grad_()
    sel = layer.selected
    dims = torch.arange(dim) if layer.features is None else layer.features
    ref_labels = torch.tensor([sel.tolist().index(c) for c in labels.tolist()])
    ref = dense_arcface(ref_emb[:, dims], ref_w[sel][:, dims], ref_labels, margin, scale)
    ref.backward()
    return layer, loss, emb.grad, ref, ref_emb.grad, ref_w.grad, labels


def test_full_selection_equals_dense_arcface():
    layer, loss, g_emb, ref, ref_g_emb, ref_g_w, _ = layer_and_reference(12, 16, 10, r1=1.0, r2=1.0)
    assert layer.selected.tolist() == list(range(12)) and layer.features is None
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_emb, ref_g_emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref_g_w, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad.abs().sum(1).min() > 0


@pytest.mark.parametrize("r1, r2", [(0.25, 1.0), (0.3, 0.5), (1.0, 0.4)])
def test_selected_subproblem_equals_dense_arcface(r1, r2):
    layer, loss, g_emb, ref, ref_g_emb, ref_g_w, labels = layer_and_reference(40, 16, 6, r1=r1, r2=r2, seed=3)
    assert layer.last_stats["selected_classes"] == max(fraction_count(r1, 40), labels.unique().numel())
    assert layer.last_stats["features"] == math.ceil(r2 * 16 - 1e-9)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_emb, ref_g_emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref_g_w, rtol=1e-5, atol=1e-5)
    # Only selected rows get gradient.
    touched = (layer.weight.grad != 0).any(dim=1).nonzero().squeeze(1)
    assert set(touched.tolist()) == set(layer.selected.tolist())


def test_fp32_layer_matches_float64_reference():
    torch.manual_seed(1)
    layer = ShardedPrototypes(30, 16, r1=1.0, r2=1.0)
    emb = torch.randn(8, 16, requires_grad=True)
    labels = torch.randint(0, 30, (8,))
    layer(emb, labels).backward()
    ref_emb = emb.detach().double().requires_grad_()
    ref_w = layer.weight.detach().double().requires_grad_()
    dense_arcface(ref_emb, ref_w, labels, 0.3, 64.0).backward()
    torch.testing.assert_close(emb.grad.double(), ref_emb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-5)


def test_add_angle_gradient_is_exact_and_finite_at_the_ends():
    c = torch.linspace(-0.99, 0.99, 41, dtype=torch.float64, requires_grad=True)
    add_angle(c, 0.3).sum().backward()
    ref_c = c.detach().clone().requires_grad_()
    torch.cos(torch.acos(ref_c) + 0.3).sum().backward()
    torch.testing.assert_close(c.grad, ref_c.grad, rtol=1e-10, atol=1e-10)

    ends = torch.tensor([-1.0, 1.0, 1.0000001], requires_grad=True)
    out = add_angle(ends, 0.3)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), torch.tensor([-math.cos(0.3), math.cos(0.3), math.cos(0.3)]))
    assert torch.isfinite(ends.grad).all()


def test_sharded_cross_entropy_is_cross_entropy_on_one_rank():
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (7,))
    rows = torch.arange(7)
    sharded_cross_entropy(logits, rows, labels).backward()
    ref = logits.detach().clone().requires_grad_()
    F.cross_entropy(ref, labels).backward()
    torch.testing.assert_close(sharded_cross_entropy(logits, rows, labels), F.cross_entropy(ref, labels))
    torch.testing.assert_close(logits.grad, ref.grad)


def test_cosine_gradient_matches_finite_differences():
    emb = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(4, 6, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(cosine, (emb, weight))
    expected = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    torch.testing.assert_close(cosine(emb, weight), expected)


def test_select_classes_keeps_positives_and_count():
    gen = generator(0, 7)
    for block, r1, n_pos in [(100, 0.1, 3), (100, 0.1, 10), (100, 0.1, 25), (7, 0.3, 1), (50, 0.5, 0)]:
        positives = torch.randperm(block, generator=gen)[:n_pos].sort().values
        chosen = select_classes(positives, block, r1, gen)
        want = max(math.ceil(r1 * block - 1e-9), n_pos)
        assert chosen.numel() == want == chosen.unique().numel()
        assert set(positives.tolist()) <= set(chosen.tolist())
        assert chosen.tolist() == sorted(chosen.tolist()) and 0 <= chosen.min() and chosen.max() < block
    assert select_classes(torch.tensor([1]), 5, 1.0, gen) is None
    assert fraction_count(0.3, 10) == 3 and fraction_count(0.1, 125_000) == 12_500


def test_negatives_are_uniform():
    counts = torch.zeros(20)
    positives = torch.tensor([0, 1])
    for draw in range(400):
        counts[select_classes(positives, 20, 0.2, generator(0, draw))] += 1
    assert counts[:2].tolist() == [400, 400]
    # 2 of 18 negatives per draw: expected 400 * 2 / 18 = 44.4 each, sd about 6.3.
    assert counts[2:].min() > 25 and counts[2:].max() < 65


def test_feature_subset_same_per_step_and_new_across_steps():
    a, b = feature_subset(64, 0.5, seed=5, step=3), feature_subset(64, 0.5, seed=5, step=3)
    assert torch.equal(a, b) and a.numel() == 32 and a.unique().numel() == 32
    assert not torch.equal(a, feature_subset(64, 0.5, seed=5, step=4))
    assert not torch.equal(a, feature_subset(64, 0.5, seed=6, step=3))
    assert feature_subset(64, 1.0, seed=5, step=3) is None


def test_layer_r2_follows_step():
    layer = ShardedPrototypes(10, 32, r1=1.0, r2=0.5, seed=2)
    emb, labels = torch.randn(4, 32), torch.tensor([0, 1, 2, 3])
    layer(emb, labels)
    first = layer.features
    layer(emb, labels)
    assert torch.equal(first, layer.features)  # micro-batches of one step share the subset
    layer.advance()
    layer(emb, labels)
    assert layer.step == 1 and not torch.equal(first, layer.features)
    assert torch.equal(layer.features, feature_subset(32, 0.5, seed=2, step=1))


def test_bf16_autocast_stays_finite():
    torch.manual_seed(0)
    layer = ShardedPrototypes(50, 32, r1=0.2, r2=0.5)
    emb = torch.randn(16, 32).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(emb, torch.randint(0, 50, (16,)))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert emb.grad.dtype == torch.bfloat16 and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert torch.isfinite(layer.weight.grad).all()


def test_loss_falls_on_separable_data():
    torch.manual_seed(0)
    classes, dim = 8, 16
    centers = torch.randn(classes, dim) * 3
    labels = torch.arange(classes).repeat(8)
    inputs = centers[labels] + 0.3 * torch.randn(labels.numel(), dim)
    backbone = torch.nn.Linear(dim, dim)
    layer = ShardedPrototypes(classes, dim, r1=0.5, r2=1.0, seed=0)
    opt = torch.optim.Adam([*backbone.parameters(), layer.weight], lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = layer(backbone(inputs), labels)
        loss.backward()
        opt.step()
        layer.advance()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        cos = F.normalize(backbone(inputs), dim=1) @ F.normalize(layer.weight, dim=1).T
    assert (cos.argmax(1) == labels).float().mean() == 1.0


def test_bad_labels_and_shapes_are_named():
    layer = ShardedPrototypes(10, 8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), got \[10\]"):
        layer(torch.randn(2, 8), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"embeddings must be \[batch, 8\]"):
        layer(torch.randn(2, 7), torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="r1=0"):
        ShardedPrototypes(10, 8, r1=0)


def test_state_dict_keeps_step_and_refuses_another_block():
    layer = ShardedPrototypes(10, 8)
    layer.advance(), layer.advance()
    other = ShardedPrototypes(10, 8, seed=1)
    other.load_state_dict(layer.state_dict())
    assert other.step == 2 and torch.equal(other.weight, layer.weight)
    state = layer.state_dict()
    state["_extra_state"] = {**state["_extra_state"], "class_range": (0, 5)}
    with pytest.raises(ValueError, match=r"saved prototypes are classes \(0, 5\) of 10.*reslice"):
        other.load_state_dict(state)


def official_straight_through_arcface(emb, weight, labels, margin, scale):
    """The official partial_fc.py CombinedMarginLoss + cross-entropy, written the same way: the
    margin is applied in place under no_grad, so the gradient passes straight through it."""
    logits = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    rows = torch.arange(len(labels))
    with torch.no_grad():
        target = logits[rows, labels].arccos() + margin
        logits.arccos_()
        logits[rows, labels] = target
        logits.cos_()
    return F.cross_entropy(logits * scale, labels)


@pytest.mark.parametrize("r1, r2", [(1.0, 1.0), (0.3, 0.5)])
def test_straight_through_margin_matches_the_official_formulation(r1, r2):
    torch.manual_seed(5)
    layer = ShardedPrototypes(40, 16, r1=r1, r2=r2, seed=2, margin_grad="straight_through").double()
    emb = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (6,))
    loss = layer(emb, labels)
    loss.backward()
    sel, dims = layer.selected, (torch.arange(16) if layer.features is None else layer.features)
    ref_emb = emb.detach().clone().requires_grad_()
    ref_w = layer.weight.detach().clone().requires_grad_()
    ref_labels = torch.tensor([sel.tolist().index(c) for c in labels.tolist()])
    ref = official_straight_through_arcface(ref_emb[:, dims], ref_w[sel][:, dims], ref_labels, 0.3, 64.0)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb.grad, ref_emb.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(layer.weight.grad, ref_w.grad, rtol=1e-6, atol=1e-8)
    # The same loss value as the exact gradient's, but another gradient.
    exact_emb = emb.detach().clone().requires_grad_()
    exact = dense_arcface(exact_emb[:, dims], ref_w.detach()[sel][:, dims], ref_labels, 0.3, 64.0)
    exact.backward()
    torch.testing.assert_close(exact, ref, rtol=1e-6, atol=1e-6)
    assert (exact_emb.grad - emb.grad).abs().max() > 1e-3


def test_unknown_margin_grad_is_refused():
    with pytest.raises(ValueError, match="margin_grad='exactly': expected one of exact, straight_through"):
        ShardedPrototypes(10, 4, margin_grad="exactly")
