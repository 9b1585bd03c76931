"""Retrieval metrics: hand-computed cases and an independent brute-force numpy computation."""
import numpy as np
import pytest

from evaluation import metrics
from evaluation.retrieval_sets import RetrievalSet, Split


def single_set(labels, ks=(1, 2, 4)):
    labels = np.asarray(labels)
    return RetrievalSet("t", [f"{i}.jpg" for i in range(len(labels))], labels, ks, {"": Split(np.arange(len(labels)))})


def circle(degrees):
    a = np.deg2rad(degrees)
    return np.stack([np.cos(a), np.sin(a)], 1) * 3.0  # not unit length: evaluate normalises


def test_hand_computed_single_set():
    # Angles 0, 10, 30, 100, 105 degrees. Neighbour labels, self excluded:
    # q0: 0 1 1 0 (R=2) q1: 0 1 1 0 (R=2) q2: 0 0 1 0 (R=1) q3: 0 1 0 0 (R=1) q4: 1 1 0 0 (R=2)
    got = metrics.evaluate(circle([0, 10, 30, 100, 105]), single_set([0, 0, 1, 1, 0]), device="cpu")
    assert got["R@1"] == pytest.approx(2 / 5)
    assert got["R@2"] == pytest.approx(3 / 5)
    assert got["R@4"] == pytest.approx(1.0)
    assert got["MAP@R"] == pytest.approx((0.5 + 0.5 + 0 + 0 + 0) / 5)


def test_hand_computed_map_at_r_and_recall():
    hits = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=bool)
    # q0: P(1)=1 of R=2 -> 0.5 (rank 3 lies beyond R); q1: P(2)=1/2 of R=2 -> 0.25; q2: 0; q3: R=0, left out.
    assert metrics.map_at_r(hits, np.array([2, 2, 1, 0])) == pytest.approx((0.5 + 0.25 + 0) / 3)
    assert metrics.recall_at_k(hits, (1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 0.75}


def test_hand_computed_map_at_100():
    ids = np.array([[5, 3, 7, 1], [2, 4, 6, 8]])
    # q0: hits at ranks 2 and 4 -> (1/2 + 2/4) / 2; q1: hit at rank 1 of 3 relevant -> 1/3.
    got = metrics.map_at_100(ids, [np.array([3, 1]), np.array([2, 9, 10])])
    assert got == pytest.approx((0.5 + 1 / 3) / 2)


def brute_force(q, g, q_labels, g_labels, ks, self_excluded):
    """Full similarity sort, then Recall@K and MAP@R straight from their definitions."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = qn @ gn.T
    if self_excluded:
        np.fill_diagonal(sim, -np.inf)
    recalls = {k: [] for k in ks}
    aps = []
    for i in range(len(q)):
        order = np.argsort(-sim[i], kind="stable")
        if self_excluded:
            order = order[order != i]
        rel = g_labels[order] == q_labels[i]
        for k in ks:
            recalls[k].append(rel[:k].any())
        r = rel.sum()
        if r:
            aps.append(sum(rel[:j + 1].sum() / (j + 1) for j in range(r) if rel[j]) / r)
    out = {f"R@{k}": float(np.mean(v)) for k, v in recalls.items()}
    out["MAP@R"] = float(np.mean(aps))
    return out


def test_single_set_matches_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 80)
    x = rng.normal(size=(80, 8)) + labels[:, None] * 0.3
    got = metrics.evaluate(x, single_set(labels, ks=(1, 2, 4, 8)), device="cpu")
    ref = brute_force(x, x, labels, labels, (1, 2, 4, 8), self_excluded=True)
    assert got == pytest.approx(ref)


def test_query_gallery_matches_brute_force_and_uses_only_listed_rows():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 70)
    x = rng.normal(size=(70, 6)) + labels[:, None] * 0.4
    query, gallery = np.arange(0, 70, 3), np.setdiff1d(np.arange(70), np.arange(0, 70, 3))[:-5]
    ds = RetrievalSet("t", [""] * 70, labels, (1, 5, 10), {"": Split(query, gallery)})
    got = metrics.evaluate(x, ds, device="cpu")
    ref = brute_force(x[query], x[gallery], labels[query], labels[gallery], (1, 5, 10), self_excluded=False)
    assert got == pytest.approx(ref)


def test_named_splits_prefix_their_metrics():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 3)
    x = rng.normal(size=(12, 4))
    ds = RetrievalSet("t", [""] * 12, labels, (1,), {"a": Split(np.arange(6), np.arange(6, 12)),
                                                     "b": Split(np.arange(6, 12), np.arange(6))})
    got = metrics.evaluate(x, ds, device="cpu")
    assert set(got) == {"a/R@1", "a/MAP@R", "b/R@1", "b/MAP@R"}


def official_gldv2_map(scores, query_solutions, index_ids):
    """GLDv2 mAP@100 as the challenge's metric code defines it, written out here: per query the top 100 index
    ids by score, ids already predicted skipped, AP divided by min(#relevant, 100), averaged over queries."""
    total = 0.0
    for row, solution in zip(scores, query_solutions):
        predicted = [index_ids[j] for j in np.argsort(-row, kind="stable")[:100]]
        seen, correct, ap = set(), 0, 0.0
        for i, p in enumerate(predicted):
            if p not in seen:
                if p in solution:
                    correct += 1
                    ap += correct / (i + 1)
                seen.add(p)
        total += ap / min(len(solution), 100)
    return total / len(query_solutions)


def gldv2_case(seed=3):
    rng = np.random.default_rng(seed)
    n_index, n_query = 150, 12
    # Norms that vary a lot, as a model's un-normalised outputs do: raw dot products and cosines rank differently.
    x = rng.normal(size=(n_index + n_query, 5)) * rng.uniform(0.2, 3.0, size=(n_index + n_query, 1))
    relevant = [rng.choice(n_index, size=rng.integers(1, 130), replace=False) for _ in range(n_query)]
    query = np.arange(n_index, n_index + n_query)
    ds = RetrievalSet("gldv2", [""] * len(x), np.full(len(x), -1), (),
                      {"private": Split(query, np.arange(n_index), relevant)})
    ids = [f"{j:016x}" for j in range(n_index)]  # index image ids, as index.csv names them
    solutions = [{ids[j] for j in rel} for rel in relevant]
    return x, query, n_index, ds, ids, solutions


def test_gldv2_map_at_100_on_raw_dot_products_as_the_official_code():
    x, query, n_index, ds, ids, solutions = gldv2_case()
    got = metrics.evaluate(x, ds, device="cpu")
    raw = official_gldv2_map(x[query] @ x[:n_index].T, solutions, ids)
    assert got == {"private/mAP@100": pytest.approx(raw)}
    # The cosine variant is an option: it matches the same loop on normalised features, and differs here.
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = metrics.evaluate(x, ds, device="cpu", cosine=True)
    assert cos == {"private/mAP@100": pytest.approx(official_gldv2_map(xn[query] @ xn[:n_index].T, solutions, ids))}
    assert abs(cos["private/mAP@100"] - raw) > 1e-3
    # Truncated: the first dims of the raw outputs, still raw dot products.
    assert metrics.evaluate(x, ds, device="cpu", dim=3) == {
        "private/mAP@100": pytest.approx(official_gldv2_map(x[query, :3] @ x[:n_index, :3].T, solutions, ids))}


def test_knn_excludes_the_query_itself_but_keeps_its_duplicates():
    g = np.array([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    sims, ids = metrics.knn(g, g, 2, device="cpu", exclude_self=True)
    assert ids[0].tolist() == [1, 2] and ids[1].tolist() == [0, 2]
    assert ids[3].tolist() == [2, 0] or ids[3].tolist() == [2, 1]
    np.testing.assert_allclose(sims[0], [1.0, 0.8], rtol=1e-6)
    assert not (ids == np.arange(4)[:, None]).any()


def test_knn_clips_k_to_the_gallery_and_rejects_an_empty_one():
    x = np.eye(3, dtype=np.float32)
    assert metrics.knn(x, x, 10, device="cpu", exclude_self=True)[1].shape == (3, 2)
    with pytest.raises(ValueError, match="gallery of 1 rows has no neighbours"):
        metrics.knn(x[:1], x[:1], 1, device="cpu", exclude_self=True)


def test_knn_in_chunks_equals_one_search(monkeypatch):
    rng = np.random.default_rng(4)
    x = metrics.normalize(rng.normal(size=(50, 6)))
    whole = metrics.knn(x, x, 5, device="cpu", exclude_self=True)
    monkeypatch.setattr(metrics, "QUERY_CHUNK", 7)
    chunked = metrics.knn(x, x, 5, device="cpu", exclude_self=True)
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_truncation_normalises_then_cuts_and_renormalises_only_when_asked():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10, 8))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(metrics.truncate(x, 3), unit[:, :3], rtol=1e-6)  # official num_feat
    np.testing.assert_allclose(metrics.truncate(x, 3, renormalize=True),
                               x[:, :3] / np.linalg.norm(x[:, :3], axis=1, keepdims=True), rtol=1e-6)


def official_rank1(q, q_labels, g=None, g_labels=None, num_feat=None, renormalize=False):
    """Recall@1 as the official get_metric computes it, written as a plain loop: normalise, keep the first
    num_feat dims, nearest by Euclidean distance (on a single set: the nearest other row)."""
    def prep(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        a = a[:, :num_feat]
        return a / np.linalg.norm(a, axis=1, keepdims=True) if renormalize else a
    single = g is None
    q = prep(q)
    g, g_labels = (q, q_labels) if single else (prep(g), g_labels)
    correct = 0
    for i in range(len(q)):
        best, best_d = None, np.inf
        for j in range(len(g)):
            d = np.sqrt(np.sum((q[i] - g[j]) ** 2))
            if (single and i == j) or d >= best_d:
                continue
            best, best_d = j, d
        correct += g_labels[best] == q_labels[i]
    return correct / len(q)


@pytest.mark.parametrize("single", [True, False])
def test_truncated_recall_at_1_is_the_official_euclidean_on_the_unrenormalised_prefix(single):
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 8, 120)
    x = rng.normal(size=(120, 16)) + np.eye(16)[labels] * 1.5
    if single:
        ds, ref_args = single_set(labels, ks=(1,)), (x, labels)
    else:
        q, g = np.arange(40), np.arange(40, 120)
        ds = RetrievalSet("t", [""] * 120, labels, (1,), {"": Split(q, g)})
        ref_args = (x[q], labels[q], x[g], labels[g])
    for dim in (16, 6, 3):
        got = metrics.evaluate(x, ds, device="cpu", dim=dim)
        assert got["R@1"] == pytest.approx(official_rank1(*ref_args, num_feat=dim))
        renorm = metrics.evaluate(x, ds, device="cpu", dim=dim, renormalize=True)
        assert renorm["R@1"] == pytest.approx(official_rank1(*ref_args, num_feat=dim, renormalize=True))
    # On a cut prefix the two protocols rank differently (MAP@R sees the whole ranking).
    assert metrics.evaluate(x, ds, device="cpu", dim=3)["MAP@R"] != pytest.approx(
        metrics.evaluate(x, ds, device="cpu", dim=3, renormalize=True)["MAP@R"])


def test_knn_l2_returns_nearest_by_euclidean_distance():
    rng = np.random.default_rng(9)
    q, g = rng.normal(size=(7, 4)), rng.normal(size=(30, 4)) * rng.uniform(0.1, 3, size=(30, 1))
    d, ids = metrics.knn(q, g, 5, device="cpu", metric="l2")
    full = ((q[:, None, :] - g[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, np.argsort(full, 1)[:, :5])
    np.testing.assert_allclose(d, np.sort(full, 1)[:, :5], rtol=1e-4)
    with pytest.raises(ValueError, match="knn metric 'cos': expected one of ip, l2"):
        metrics.knn(q, g, 5, device="cpu", metric="cos")


def test_evaluate_dims_scores_each_prefix():
    # Class information only in the first 2 dims; the other 30 are strong noise.
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(4), 10)
    centres = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]]) * 10.0
    x = np.hstack([centres[labels] + rng.normal(size=(40, 2)), rng.normal(size=(40, 30)) * 10])
    got = metrics.evaluate_dims(x, single_set(labels), dims=[64, 32, 16, 2])
    assert sorted(got) == [2, 16, 32]  # 64 > feature size is skipped
    assert got[2]["R@1"] == 1.0
    assert got[32]["R@1"] < 0.8
    assert got[32] == metrics.evaluate(x, single_set(labels))


def test_feature_rows_must_match_the_images():
    with pytest.raises(ValueError, match="t: 3 feature rows for 5 images"):
        metrics.evaluate(np.ones((3, 2)), single_set([0, 0, 1, 1, 0]))


@pytest.mark.parametrize("device,gpus,k,expected", [
    ("cpu", 1, 10, False), ("auto", 0, 10, False), ("auto", 1, 10, True), ("cuda", 1, 10, True),
    ("cuda:0", 2, 10, True), ("auto", 1, 5000, False), ("cuda", 1, 2049, False)])
def test_gpu_selection(device, gpus, k, expected):
    assert metrics.use_gpu(device, gpus, k) is expected


def test_gpu_selection_errors():
    with pytest.raises(RuntimeError, match="device=cuda but faiss sees no GPU"):
        metrics.use_gpu("cuda", 0, 10)
    with pytest.raises(ValueError, match="device 'tpu': expected auto, cpu, cuda"):
        metrics.use_gpu("tpu", 1, 10)


@pytest.mark.skipif(metrics.faiss.get_num_gpus() == 0, reason="faiss sees no GPU")
def test_gpu_search_equals_cpu_search():
    rng = np.random.default_rng(7)
    x = metrics.normalize(rng.normal(size=(500, 32)))
    cpu = metrics.knn(x, x, 20, device="cpu", exclude_self=True)
    gpu = metrics.knn(x, x, 20, device="cuda", exclude_self=True)
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-5)
    assert (gpu[1] == cpu[1]).mean() > 0.99  # only near-ties may swap


def test_knn_query_not_among_its_tied_duplicates_keeps_k_neighbours():
    g = np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (5, 1))  # five identical rows
    _, ids = metrics.knn(g, g, 2, device="cpu", exclude_self=True)
    assert ids.shape == (5, 2)
    assert not (ids == np.arange(5)[:, None]).any()
    assert all(len(set(row)) == 2 for row in ids.tolist())
