"""Compact codes (evaluation.quantize): the SCQ loss terms against loop references written here, the SCQ
codebook exported to faiss against the head's own ADC, the PQ/OPQ baselines against faiss called directly,
mAP@K against a brute-force reference, and stage=quantize run for real (locally and through SLURM)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from evaluation import demo_sets, metrics
from evaluation.quantize import baselines, job, pairs, scq
from unicom_ds.arrays import normalize
from unicom_ds.atomic import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """faiss' and torch's threads spin against each other on a loaded 2-core machine (OPQ: 3 s -> 36 s)."""
    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before[0])
    torch.set_num_threads(before[1])


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as L2-normalised 64-d pixel features and their labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return normalize(d.data.astype(np.float32)), d.target


# ---- reference helpers: plain loops over python floats ----------------------------------------------

def _cos(u, v) -> float:
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def _others_ref(a: np.ndarray, b: np.ndarray):
    """For each of the 2B rows of [a; b]: (similarity to its other view, [similarities to the rest])."""
    rows = np.concatenate([a, b])
    n = len(a)
    out = []
    for i in range(2 * n):
        pair = (i + n) % (2 * n)
        out.append((_cos(rows[i], rows[pair]), [_cos(rows[i], rows[j]) for j in range(2 * n) if j not in (i, pair)]))
    return out


def _lse(values) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float64))


# ---- SCQ loss terms --------------------------------------------------------------------------------

def test_instance_contrastive_matches_loop_reference():
    a, b, tau = _rand(6, 5), _rand(6, 5, seed=1), 0.5
    ref = np.mean([-(pos / tau) + _lse([pos / tau] + [s / tau for s in neg]) for pos, neg in _others_ref(a.numpy(), b.numpy())])
    assert float(scq.instance_contrastive(a, b, tau)) == pytest.approx(ref, rel=1e-9)


def test_part_neighbour_matches_loop_reference():
    books, top, tau = 3, 4, 0.5
    za, zb = _rand(7, 6), _rand(7, 6, seed=1)
    per_book = []
    for m in range(books):
        cols = slice(2 * m, 2 * m + 2)
        losses = []
        for _, neg in _others_ref(za.numpy()[:, cols], zb.numpy()[:, cols]):
            best = sorted(neg, reverse=True)[:top]
            losses.append(_lse([s / tau for s in neg]) - _lse([s / tau for s in best]))
        per_book.append(np.mean(losses))
    assert float(scq.part_neighbour(za, zb, books, top, tau)) == pytest.approx(np.mean(per_book), rel=1e-9)
    # Every other row among the top neighbours: nothing left to pull closer.
    assert float(scq.part_neighbour(za, zb, books, 12, tau)) == pytest.approx(0.0, abs=1e-12)


def test_codeword_diversity_is_negative_entropy_of_the_batch_marginal():
    cos_a, cos_b = _rand(5, 2, 4), _rand(5, 2, 4, seed=1)
    rows = np.concatenate([cos_a.numpy(), cos_b.numpy()])
    total = 0.0
    for m in range(2):
        marginal = [0.0] * 4
        for r in rows:
            e = [math.exp(v) for v in r[m]]
            for k in range(4):
                marginal[k] += e[k] / sum(e) / len(rows)
        total += sum(p * math.log(p + 1e-5) for p in marginal)
    assert float(scq.codeword_diversity(cos_a, cos_b)) == pytest.approx(total / 2, rel=1e-9)
    # Uniform assignment is the minimum, -log K (up to eps).
    flat = torch.zeros(5, 2, 4, dtype=torch.float64)
    assert float(scq.codeword_diversity(flat, flat)) == pytest.approx(-math.log(4), abs=1e-4)


def test_fused_consistency_is_symmetric_kl_of_the_views_distributions():
    fa, fb, za, zb, tau = _rand(5, 4), _rand(5, 4, seed=1), _rand(5, 4, seed=2), _rand(5, 4, seed=3), 0.2
    rows = _others_ref((fa + za).numpy(), (fb + zb).numpy())

    def dist(neg):
        e = [math.exp(s / tau) for s in neg]
        return [v / sum(e) for v in e]

    kl = 0.0
    for i in range(5):
        p, q = dist(rows[i][1]), dist(rows[i + 5][1])
        kl += 0.5 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) + 0.5 * sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    assert float(scq.fused_consistency(fa, fb, za, zb, tau)) == pytest.approx(kl / 5, rel=1e-9)
    assert float(scq.fused_consistency(fa, fa, za, za, tau)) == pytest.approx(0.0, abs=1e-12)


def test_soft_quantisation_approaches_the_nearest_codeword():
    codebooks = _rand(2, 4, 3, seed=5)
    f = _rand(6, 6, seed=6)
    hard = scq.sub_distances(f, codebooks).argmin(-1)
    nearest = torch.stack([codebooks[m, hard[:, m]] for m in range(2)], 1).reshape(6, 6)
    z, assign = scq.soft_quantize(f, codebooks, 1e-4)
    assert torch.allclose(z, nearest, atol=1e-6) and (assign.argmax(-1) == hard).all()
    for i in range(6):  # the temperature-0.2 assignment against a loop
        for m in range(2):
            d = [float(((f[i, 3 * m:3 * m + 3] - codebooks[m, k]) ** 2).sum()) for k in range(4)]
            e = [math.exp(-v / 0.2) for v in d]
            assert scq.soft_quantize(f, codebooks, 0.2)[1][i, m].tolist() == pytest.approx([v / sum(e) for v in e])


# ---- SCQ in faiss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("nbits", [4, 8])
def test_scq_exported_to_faiss_finds_the_heads_adc_neighbours(digits, nbits):
    x, _ = digits
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    head = scq.SCQHead(64, 32 // nbits, 2 ** nbits, 8, 64)
    # Codewords drawn from the projected data, so the codes spread over every book (as a trained head's do).
    picks = scq.embed(head, x[rng.choice(len(x), head.words, replace=False)])
    head.codebooks.data.copy_(torch.as_tensor(picks).view(head.words, head.books, -1).transpose(0, 1))
    f = scq.embed(head, x)
    codes = scq.hard_codes(head, f)
    index = scq.to_faiss(head, codes)
    assert index.ntotal == len(x) and index.sa_code_size() == 4
    # faiss decodes the packed codes to the head's codewords, and codes the embeddings the same way.
    words = head.codebooks.detach().numpy()[np.arange(head.books)[None, :], codes].reshape(len(x), -1)
    np.testing.assert_allclose(index.reconstruct_n(0, len(x)), words, atol=1e-6)
    assert (index.sa_encode(f) == scq.pack_codes(codes, nbits)).all()
    d_faiss, i_faiss = index.search(f[:50], 10)
    d_head, i_head = scq.adc_search(head, f[:50], codes, 10)
    np.testing.assert_allclose(d_faiss, d_head, rtol=1e-4, atol=1e-4)
    # The same neighbours up to ties (rows sharing a code): each returned row is at the distance reported,
    # and the rows strictly closer than the 10th distance are the same set.
    full = _adc_all(head, f[:50], codes)
    np.testing.assert_allclose(np.take_along_axis(full, i_faiss, 1), d_faiss, rtol=1e-4, atol=1e-4)
    for q in range(50):
        inside = lambda ids, d: {i for i, v in zip(ids, d) if v < d[-1] - 1e-4}  # noqa: E731
        assert inside(i_faiss[q], d_faiss[q]) == inside(i_head[q], d_head[q]), q


def _adc_all(head, q, codes):
    table = ((q.reshape(len(q), head.books, 1, -1) - head.codebooks.detach().numpy()[None]) ** 2).sum(-1)
    return sum(table[:, m, codes[:, m]] for m in range(head.books))


def test_plain_adc_ranks_by_the_sum_of_unsquared_sub_space_distances_as_the_authors_code(digits, monkeypatch):
    # The authors' pqDist_one, written as a loop: per database item, sum over books of ||q_m - c_m(code)||.
    x, y = digits
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    head = scq.SCQHead(64, 4, 16, 8, 64)
    picks = scq.embed(head, x[rng.choice(len(x), head.words, replace=False)])
    head.codebooks.data.copy_(torch.as_tensor(picks).view(head.words, head.books, -1).transpose(0, 1))
    f = scq.embed(head, x)
    codes = scq.hard_codes(head, f)
    books = head.codebooks.detach().numpy()
    q = f[:40]
    ref = np.zeros((len(q), len(x)))
    for a in range(len(q)):
        for b in range(len(x)):
            ref[a, b] = sum(np.sqrt(((q[a].reshape(head.books, -1)[m] - books[m, codes[b, m]]) ** 2).sum())
                            for m in range(head.books))
    d, ids = scq.adc_search(head, q, codes, 15, adc="plain")
    np.testing.assert_allclose(d, np.sort(ref, 1)[:, :15], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(ref, ids, 1), d, rtol=1e-4, atol=1e-5)
    # Through metrics.evaluate's search hook (queries chunked, self excluded): the same neighbours.
    search = scq.searcher(head, "plain")
    monkeypatch.setattr(scq.CodeSearch, "CHUNK", 7)
    _, got = search(x[:40], x, 15, "cpu", exclude_self=True)
    for a in range(40):
        row = ref[a].copy()
        row[a] = np.inf
        np.testing.assert_allclose(np.sort(row[got[a]]), np.sort(row)[:15], rtol=1e-4, atol=1e-5)
    # It is another ranking than faiss' squared ADC.
    _, squared = scq.searcher(head)(x[:40], x, 15, "cpu", exclude_self=True)
    assert (squared != got).any()
    with pytest.raises(ValueError, match="quantize.scq.adc='cosine': expected one of squared, plain"):
        scq.searcher(head, "cosine")


def test_view_pairs_draw_two_views_of_each_image_and_resume_mid_epoch():
    n, views = 48, 3
    # Feature value = 100 * view + image: the batch tells which view of which image each row holds.
    x = (100 * np.arange(views)[:, None, None] + np.arange(n)[None, :, None]).astype(np.float32).repeat(2, 2)
    data = pairs.ViewPairs(x)
    assert data.check(0, 1, torch.device("cpu")) == n
    kw = dict(epoch=1, accum=1, micro=8, world=2, seed=3)
    epoch = [[b for b in data.batches(in_epoch=0, count=3, rank=r, **kw)] for r in range(2)]
    images = []
    for a, b, skipped in (batch for rank in epoch for batch in rank):
        assert skipped.numel() == 0 and a.shape == (8, 2)
        assert (a[:, 0] % 100 == b[:, 0] % 100).all() and (a[:, 0] // 100 != b[:, 0] // 100).all()
        images += (a[:, 0] % 100).int().tolist()
    assert sorted(images) == list(range(n))  # both ranks together: every image once per epoch
    later = list(data.batches(in_epoch=1, count=2, rank=1, **kw))  # a resume at micro batch 1
    assert len(later) == 2
    for got, want in zip(later, epoch[1][1:]):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="at least 2 views"):
        pairs.ViewPairs(x[:1])


def test_scq_head_from_opq_codes_as_the_opq_index_does():
    """init=opq: before any step the head is the OPQ index (its rotation, its centroids): the same codes."""
    from evaluation.quantize import baselines
    x = normalize(np.random.default_rng(3).standard_normal((400, 32)).astype(np.float32))
    for bits, nbits in ((16, 4), (32, 8)):
        index = baselines.train("opq", x[:300], bits, nbits)
        head = scq.from_opq(index, 0.2)
        assert (head.books, head.words, head.sub_dim, head.hidden) == (bits // nbits, 2 ** nbits, 32 // (bits // nbits), 0)
        codes = scq.hard_codes(head, scq.embed(head, x[300:]))
        np.testing.assert_array_equal(scq.pack_codes(codes, nbits), index.sa_encode(x[300:]))


def _scq_cfg(run: Path, *extra: str):
    from unicom_ds import config
    return config.resolve(["stage=quantize", f"run_dir={run}", "device=cpu", "quantize.scq.batch_size=16",
                           "quantize.scq.epochs=3", "quantize.scq.warmup_epochs=1", "quantize.scq.sub_dim=4",
                           "quantize.scq.hidden=16", "quantize.scq.top_neighbours=4", "quantize.scq.log_every=1",
                           "quantize.scq.ckpt_every_steps=2", *extra])


@pytest.fixture
def one_process_group(monkeypatch):
    """The one-process rendezvous train_scq sets up, out of the environment after the test: later subprocesses
    must not inherit its port. The group itself stays for this process (DeepSpeed keeps hold of it)."""
    from unicom_ds import train
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(train.free_port()))):
        monkeypatch.setenv(key, value)


def test_scq_training_killed_after_its_first_checkpoint_resumes_there(tmp_path, monkeypatch, one_process_group):
    """Through the Trainer: checkpoints, a resume at the last one, the loss terms in TensorBoard, the head exported."""
    from evaluation.quantize import job
    from unicom_ds import config, train
    from unicom_ds.tblog import read_scalars
    rng = np.random.default_rng(0)
    base = rng.standard_normal((48, 12)).astype(np.float32)
    views = np.stack([normalize(base + 0.1 * rng.standard_normal(base.shape).astype(np.float32)) for _ in range(2)])
    run, folder = tmp_path / "run", tmp_path / "run" / "quantize" / "m" / "set" / "scq-4x2"
    folder.mkdir(parents=True)
    cfg = _scq_cfg(run)

    class Killed(Exception):
        pass

    save = train.Trainer.save

    def save_then_die(self):
        save(self)
        raise Killed(f"killed at step {self.step}")

    with monkeypatch.context() as m, pytest.raises(Killed, match="step 2"):
        m.setattr(train.Trainer, "save", save_then_die)
        job.train_scq(cfg, pairs.ViewPairs(views), 4, 2, folder, views[0])
    assert (folder / "ckpt" / "step_2").is_dir() and not folder.with_suffix(".pt").exists()
    head, summary = job.train_scq(cfg, pairs.ViewPairs(views), 4, 2, folder, views[0])
    assert summary["start_step"] == 2 and summary["steps"] == 9 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["loss"]) and summary["export"] == str(folder.with_suffix(".pt"))
    assert head.books == 4 and head.words == 4 and torch.isfinite(head.codebooks).all()
    scalars = read_scalars(str(run / "tensorboard"))
    for term in ("loss", "lr", "ic_embedding", "ic_quantised", "fused", "part_neighbour", "diversity"):
        assert sorted(s for s, _ in scalars[f"quantize.scq/{term}"]) == list(range(1, 10)), term
    # A rerun with other head keys refuses the unit's checkpoints.
    other = _scq_cfg(run, "quantize.scq.w_fused=0.1")
    with pytest.raises(config.ConfigError, match="w_fused"):
        job.train_scq(other, pairs.ViewPairs(views), 4, 2, folder, views[0])


def test_scq_step_with_a_non_finite_loss_is_skipped(tmp_path, monkeypatch, one_process_group):
    from evaluation.quantize import job
    views = np.stack([normalize(np.random.default_rng(v).standard_normal((32, 8)).astype(np.float32)) for v in (0, 1)])
    loss, calls = scq.Objective.loss, []

    def nan_at_second_step(self, model, batch):
        value, terms = loss(self, model, batch)
        calls.append(1)
        return (value * float("nan") if len(calls) == 2 else value), terms

    monkeypatch.setattr(scq.Objective, "loss", nan_at_second_step)
    head, summary = job.train_scq(_scq_cfg(tmp_path / "run", "quantize.scq.init=random"), pairs.ViewPairs(views),
                                  2, 2, tmp_path / "run" / "quantize" / "scq-2x2", views[0])
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in head.parameters())


def test_a_non_finite_loss_with_finite_gradients_does_not_move_the_weights(tmp_path, monkeypatch,
                                                                           one_process_group):
    """The fault seen once under load in test_faults_train: the loss is NaN but the gradients reach
    DeepSpeed finite (zero here), so its own overflow check does not skip the step. The Trainer's window
    check does, and the weights must stay as they were, not move by AdamW's momentum and decay."""
    from evaluation.quantize import job
    views = np.stack([normalize(np.random.default_rng(v).standard_normal((32, 8)).astype(np.float32)) for v in (0, 1)])
    loss, seen = scq.Objective.loss, []

    def nan_with_zero_gradients_at_third_step(self, model, batch):
        seen.append([p.detach().clone() for p in model.module.parameters()])  # the weights this step starts from
        value, terms = loss(self, model, batch)
        return (value * 0.0 + float("nan") if len(seen) == 3 else value), terms

    monkeypatch.setattr(scq.Objective, "loss", nan_with_zero_gradients_at_third_step)
    _, summary = job.train_scq(_scq_cfg(tmp_path / "run", "quantize.scq.init=random"), pairs.ViewPairs(views),
                               2, 2, tmp_path / "run" / "quantize" / "scq-2x2", views[0])
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    before, after, later = seen[2], seen[3], seen[4]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not all(torch.equal(a, b) for a, b in zip(after, later))  # the next step trains again


def test_quantize_job_is_requeued_to_resume_its_scq_unit(tmp_path):
    from evaluation.quantize.job import QuantizeJob
    from slurm import launch
    from unicom_ds import config
    assert launch.target("quantize") is QuantizeJob  # the launchers submit an instance: submitit requeues it
    again = QuantizeJob().checkpoint(config.select(_scq_cfg(tmp_path, "quantize.scq.resume=none")))
    assert isinstance(again.function, QuantizeJob) and again.args[0]["quantize"]["scq"]["resume"] == "latest"


# ---- faiss baselines -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,text", [("pq", "PQ8x4"), ("opq", "OPQ8,PQ8x4")])
def test_baseline_equals_faiss_called_directly(digits, method, text):
    x, _ = digits
    train, gallery, queries = x[:1000], x[1000:], x[:40]
    ours = baselines.filled(baselines.train(method, train, 32, 4), gallery)
    ref = faiss.index_factory(64, text, faiss.METRIC_INNER_PRODUCT)
    if method == "opq":
        faiss.downcast_VectorTransform(ref.chain.at(0)).pq = faiss.downcast_index(ref.index).pq
    ref.train(train)
    ref.add(gallery)
    np.testing.assert_array_equal(ours.search(queries, 10)[1], ref.search(queries, 10)[1])
    assert baselines.code_bytes(ours) == 4
    # Through metrics.evaluate's search hook: the same neighbours as the index searched by hand.
    _, ids = baselines.searcher(baselines.train(method, train, 32, 4))(queries, gallery, 10)
    np.testing.assert_array_equal(ids, ref.search(queries, 10)[1])


def test_factory_refuses_what_faiss_cannot_split():
    with pytest.raises(ValueError, match="do not divide the feature dimension 60"):
        baselines.factory("pq", 60, 64, 4)
    with pytest.raises(ValueError, match="cannot be split"):
        baselines.factory("pq", 64, 20, 8)


def test_ivfpq_sweep_recall_grows_with_nprobe(digits):
    x, _ = digits
    index = baselines.filled(baselines.train("ivfpq", x, 64, 4, nlist=16), x)
    _, exact = metrics.knn(x[:100], x, 10, "cpu")
    sweep = baselines.nprobe_sweep(index, x[:100], exact, [1, 16])
    assert sweep[1]["recall"] < sweep[16]["recall"] and sweep[16]["ms_per_query"] > 0


# ---- mAP@K -----------------------------------------------------------------------------------------

def test_map_at_k_matches_brute_force():
    rng = np.random.default_rng(3)
    hits = rng.random((30, 50)) < 0.2
    hits[0] = False  # a query with nothing relevant in its top K counts as 0
    for k in (1, 7, 50):
        aps = []
        for row in hits[:, :k]:
            precisions = [row[:i + 1].sum() / (i + 1) for i in range(k) if row[i]]
            aps.append(sum(precisions) / len(precisions) if precisions else 0.0)
        assert metrics.map_at_k(hits, k) == pytest.approx(np.mean(aps), rel=1e-12)
    with pytest.raises(ValueError, match="51 needed"):
        metrics.map_at_k(hits, 51)


def test_evaluate_adds_map_at_k_with_any_search(digits):
    from evaluation.retrieval_sets import RetrievalSet, Split
    x, y = digits
    ds = RetrievalSet("digits", [str(i) for i in range(len(x))], y, (1, 10), {"": Split(np.arange(len(x)))})
    plain = metrics.evaluate(x, ds, "cpu")
    out = metrics.evaluate(x, ds, "cpu", map_k=1000)
    assert {k: out[k] for k in plain} == plain  # the flat search's metrics stay as they were
    _, ids = metrics.knn(x, x, 1000, "cpu", exclude_self=True)
    assert out["mAP@1000"] == pytest.approx(metrics.map_at_k(y[ids] == y[:, None], 1000))
    coded = metrics.evaluate(x, ds, "cpu", search=baselines.searcher(baselines.train("pq", x, 16, 4)), map_k=1000)
    assert 0.1 < coded["mAP@1000"] < out["mAP@1000"]  # 16-bit codes lose to 64 floats, still far above chance


# ---- stage=quantize --------------------------------------------------------------------------------

def _stage_data(root: Path) -> tuple[Path, Path]:
    """Digits in CUB's layout (0-4: 300 train images, 5-9: 200 test images) and a random ViT-Tiny-16 release file."""
    from unicom_ds import unicom_vit
    x, y = demo_sets.digit_images()
    keep = np.concatenate([np.flatnonzero(y < 5)[:300], np.flatnonzero(y >= 5)[:200]])
    demo_sets.write_cub(root / "data", x[keep], y[keep], test_from=5)
    torch.manual_seed(0)
    torch.save(unicom_vit.build("ViT-Tiny-16").state_dict(), root / "init.pt")
    return root / "data", root / "init.pt"


def _stage_args(run: Path, data: Path, init: Path, *extra: str) -> list[str]:
    return ["stage=quantize", f"run_dir={run}", "model=ViT-Tiny-16", "device=cpu", "quantize.datasets=[cub]",
            f"quantize.model=unicom:ViT-Tiny-16@{init}", f"eval.data_root={data}", "eval.workers=0",
            "quantize.bits=[16,32]", "quantize.nbits=[4]", "quantize.scq.epochs=2", "quantize.scq.batch_size=64",
            "quantize.ivf.sweep=[1,4]", *extra]


def _local(*args: str):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "slurm/submit.py", "launcher=local", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    data, init = _stage_data(root)
    run = root / "run"
    res = _local(*_stage_args(run, data, init))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return run, data, init, res.stdout


def test_stage_writes_loadable_indexes_and_results(stage_run):
    from evaluation import results
    from evaluation.features import features_path
    from evaluation.retrieval_sets import read
    run, data, _, _ = stage_run
    label = "unicom:ViT-Tiny-16"
    found = json.loads((run / "eval" / "results.json").read_text())[label]["cub"]
    units = [f"{m}-{b // 4}x4" for m in ("pq", "opq", "ivfpq", "scq") for b in (16, 32)]
    gallery = len(read("cub", data / "cub").paths) - 1
    for unit in ["float", *units]:
        assert 0 <= found[f"{unit}/mAP@{gallery}"] <= 1 and 0 <= found[f"{unit}/R@1"] <= 1, unit
    assert found["pq-4x4/bytes"] == 2 and found["scq-8x4/bytes"] == 4 and found["float/bytes"] > 32
    assert found["ivfpq-8x4/nprobe1/recall@10_vs_float"] <= found["ivfpq-8x4/nprobe4/recall@10_vs_float"]
    test = normalize(np.load(features_path(run, label, "cub")))
    out = run / "quantize" / features_path(run, label, "cub").parent.name / "cub"
    # The saved PQ index is the gallery coded: searching it gives the neighbours behind the stored R@1.
    index = faiss.read_index(str(out / "pq-8x4.faiss"))
    assert index.ntotal == len(test)
    labels = read("cub", data / "cub").labels
    _, ids = metrics.index_search(index, test, 1, exclude_self=True)
    assert np.mean(labels[ids[:, 0]] == labels) == pytest.approx(found["pq-8x4/R@1"])
    # The SCQ index file holds the head's hard codes of the gallery; queries are the head's projections.
    saved = torch.load(out / "scq-8x4.pt", weights_only=True)
    head = scq.SCQHead(saved["in_dim"], saved["books"], saved["words"], saved["sub_dim"], saved["hidden"])
    head.load_state_dict(saved["state_dict"])
    index = faiss.read_index(str(out / "scq-8x4.faiss"))
    f = scq.embed(head, test)
    assert (index.sa_encode(f) == scq.pack_codes(scq.hard_codes(head, f), 4)).all()
    _, ids = metrics.index_search(index, f, 1, exclude_self=True)
    assert np.mean(labels[ids[:, 0]] == labels) == pytest.approx(found["scq-8x4/R@1"])
    table = (run / "eval" / "results.md").read_text()
    assert results.QUANTIZE_CAPTION in table and "| SCQ (4-bit codebooks) |" in table
    assert f"{label} on cub, mAP@{gallery} (percent):" in table  # the K it was scored at, as results.json
    assert (run / "eval" / "map_vs_bits.png").is_file()
    # the log in the table's units: percent at the K used (issue 32)
    log = stage_run[3]
    assert re.search(rf"pq-4x4: R@1 \d+\.\d%.*, mAP@{gallery} \d+\.\d%, 2 bytes, [\d.e-]+ ms per query", log), \
        log[-2000:]
    assert f"; mAP@{gallery}" in log and "8 units on cub; results in RUN/eval/results.md" in log


def test_stage_rerun_skips_done_units_and_refuses_other_keys(stage_run):
    run, data, init, _ = stage_run
    again = _local(*_stage_args(run, data, init))
    assert again.returncode == 0 and again.stdout.count("done before") == 8, again.stdout[-3000:]
    other = _local(*_stage_args(run, data, init, "quantize.scq.w_fused=0.1"))
    assert other.returncode != 0 and "w_fused" in other.stdout + other.stderr


def test_stage_trains_scq_end_to_end_with_the_backbone_at_its_lr_mult(tmp_path):
    """scq_e2e: a copy of the backbone trains with the head on the images (at the
    head's lr x quantize.scq.backbone_lr_mult, in TensorBoard), UNIT.pt holds both, and the unit codes the tuned copy's features."""
    from evaluation.features import ImageFiles, extract, features_path
    from evaluation.retrieval_sets import read
    from unicom_ds.loading import load
    from unicom_ds.tblog import read_scalars
    data, init = _stage_data(tmp_path)
    run, label = tmp_path / "run", "unicom:ViT-Tiny-16"
    res = _local(*_stage_args(run, data, init, "quantize.methods=[scq_e2e]", "quantize.bits=[16]", "quantize.views=1",
                              "quantize.scq.backbone_lr_mult=0.5", "quantize.scq.max_steps=3",
                              "quantize.scq.workers=1", "quantize.scq.log_every=1",
                              "quantize.scq.precision=bf16"))  # the engine's copy in bf16; the unit codes in fp32
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "scq_e2e trains a copy end to end with its head, at lr x 0.5" in res.stdout
    scalars = read_scalars(str(run / "tensorboard"))
    lr, lr_backbone = dict(scalars["quantize.scq/lr"]), dict(scalars["quantize.scq/lr_backbone"])
    assert sorted(lr) == [1, 2, 3] and lr[3] > 0
    assert all(lr_backbone[step] == pytest.approx(0.5 * value) for step, value in lr.items())
    out = run / "quantize" / features_path(run, label, "cub").parent.name / "cub"
    model, preprocess = load(label, init)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = scq.Objective.load_backbone(out / "scq_e2e-4x4.pt", model)
    assert any(not torch.equal(start[k], v) for k, v in tuned.state_dict().items())  # the backbone trained
    ds = read("cub", data / "cub")
    f = normalize(extract(tuned, ImageFiles(ds.paths, preprocess), 64, 0, "cpu", progress_mode="off"))
    assert not np.allclose(f, normalize(np.load(features_path(run, label, "cub"))), atol=1e-4)
    # The index holds the head's codes of the tuned features; its search gives the stored R@1.
    head = scq.Objective.load(out / "scq_e2e-4x4.pt")
    index = faiss.read_index(str(out / "scq_e2e-4x4.faiss"))
    q = scq.embed(head, f)
    np.testing.assert_array_equal(faiss.vector_to_array(index.codes).reshape(len(f), -1),
                                  scq.pack_codes(scq.hard_codes(head, q), 4))
    found = json.loads((run / "eval" / "results.json").read_text())[label]["cub"]
    _, ids = metrics.index_search(index, q, 1, exclude_self=True)
    assert np.mean(ds.labels[ids[:, 0]] == ds.labels) == pytest.approx(found["scq_e2e-4x4/R@1"])
    assert "| SCQ end to end (4-bit codebooks) |" in (run / "eval" / "results.md").read_text()


def _sop_stage(tmp_path: Path, images: int) -> list[str]:
    """The stage's keys over `images` digits in SOP's layout (a test list only) and an empty weights file, as the
    launcher's checks need them (no feature is extracted)."""
    x, y = demo_sets.digit_images(images)
    demo_sets.write_sop(tmp_path / "data", x, y)
    init = tmp_path / "init.pt"
    torch.save({}, init)
    return ["stage=quantize", f"run_dir={tmp_path / 'run'}", f"eval.data_root={tmp_path / 'data'}",
            f"quantize.model=unicom:ViT-Tiny-16@{init}"]


def test_stage_refuses_bad_input_before_running(tmp_path):
    from slurm import launch
    from unicom_ds import config
    base = _sop_stage(tmp_path, 100)
    cases = {"quantize.datasets is empty": [],
             "quantize.train_split=train: sop: expected": ["quantize.datasets=[sop]"],
             "quantize.views=1": ["quantize.datasets=[sop]", "quantize.train_split=test", "quantize.views=1"],
             "quantize.bits: pq cannot make 6-bit codes with quantize.nbits=[4] (6 bits is not a multiple of 4-bit "
             "codebooks); drop 6 from quantize.bits": ["quantize.datasets=[sop]", "quantize.bits=[6]", "quantize.nbits=[4]"],
             # the issue's case: 5 sub-quantisers of 4 bits cannot split ViT-Tiny-16's 64-d feature for faiss OPQ
             "quantize.bits: opq cannot make 20-bit codes with quantize.nbits=[4, 8] (faiss OPQ needs the 5 "
             "sub-quantisers to divide the 64-d feature; 20 bits is not a multiple of 8-bit codebooks)":
                 ["quantize.datasets=[sop]", "quantize.methods=[opq,scq]", "quantize.bits=[16,20]", "quantize.nbits=[4,8]"],
             # budgets against the training images, before any feature is extracted (issue 29)
             "quantize.nbits=8: sop has 100 training images for the 256 codewords per sub-space of pq-2x8; drop 8 "
             "from quantize.nbits": ["quantize.datasets=[sop]", "quantize.train_split=test", "quantize.methods=[pq]",
                                     "quantize.bits=[16]", "quantize.nbits=[8]"],
             "quantize.ivf.nlist=500: more lists than the 100 training images of sop":
                 ["quantize.datasets=[sop]", "quantize.train_split=test", "quantize.methods=[ivfpq]",
                  "quantize.bits=[8]", "quantize.nbits=[4]", "quantize.ivf.nlist=500"]}
    for message, extra in cases.items():
        with pytest.raises((ValueError, OSError), match=re.escape(message)):
            launch.precheck(config.resolve([*base, *extra]))
    plan = launch.precheck(config.resolve([*base, "quantize.datasets=[sop]", "quantize.train_split=test",
                                           "quantize.nbits=[4]"]))
    assert "  sop: 100 test images, codes trained on 100 images; mAP@99" in plan
    plan = launch.precheck(config.resolve([*base, "quantize.datasets=[sop]", "quantize.train_split=test",
                                           "quantize.methods=[scq]", "quantize.bits=[12]", "quantize.nbits=[4,8]"]))
    assert "  not run: scq at 12 bits with 8-bit codebooks (12 bits is not a multiple of 8-bit codebooks)" in plan


def test_opq_with_fewer_training_images_than_dimensions_is_refused_before_running(tmp_path):
    """faiss' OPQ aborts the process (double free, or a failed assertion in its k-means) when it trains its
    rotation on fewer rows than the feature has dimensions: the plan refuses it, for SCQ's OPQ start too."""
    from slurm import launch
    from unicom_ds import config
    base = [*_sop_stage(tmp_path, 40), "quantize.datasets=[sop]", "quantize.train_split=test", "quantize.bits=[16]",
            "quantize.nbits=[4]"]
    for method, hint in (("opq", ""), ("scq", "; or quantize.scq.init=random")):
        with pytest.raises(ValueError, match=re.escape(f"quantize.methods: {method}-4x4 trains OPQ's 64 x 64 rotation, "
                                                       f"which needs at least 64 training images; sop has 40{hint}")):
            launch.precheck(config.resolve([*base, f"quantize.methods=[{method}]"]))
    launch.precheck(config.resolve([*base, "quantize.methods=[pq,scq]", "quantize.scq.init=random"]))


def test_a_rerun_into_units_of_other_keys_is_refused_before_running(tmp_path):
    """A finished unit (UNIT.json) and an unfinished SCQ unit's checkpoints (UNIT/made_with.json) belong to the keys
    they were made with: the launcher refuses a command with others, naming the file (issue 29)."""
    from slurm import launch
    from unicom_ds import config
    args = [*_sop_stage(tmp_path, 300), "quantize.datasets=[sop]", "quantize.train_split=test",
            "quantize.methods=[pq,scq]", "quantize.bits=[16]", "quantize.nbits=[4]"]
    cfg = config.resolve(args)
    out = job.unit_dir(cfg, job.model_spec(cfg).label, "sop")
    out.mkdir(parents=True)
    write_json_atomic(out / "pq-4x4.json", {"made_with": job._made_with(cfg, "pq"), "metrics": {}})
    (out / "scq-4x4").mkdir()
    write_json_atomic(out / "scq-4x4" / "made_with.json", {"made_with": job._made_with(cfg, "scq")})
    launch.precheck(cfg)  # its own units: a rerun goes on
    with pytest.raises(ValueError, match=re.escape(f"{out / 'pq-4x4.json'} was made with a different config")):
        launch.precheck(config.resolve([*args, "quantize.map_k=10"]))
    with pytest.raises(ValueError, match=re.escape(f"{out / 'scq-4x4' / 'made_with.json'} was made with a different "
                                                   "config (quantize.scq: ")):
        launch.precheck(config.resolve([*args, "quantize.scq.tau_sq=0.5"]))


@pytest.mark.slurm
@pytest.mark.slow
def test_quantize_runs_on_slurm(slurm, tmp_path):
    from test_slurm_cluster_stage import SLURM, log_tails, submit, wait_for
    data, init = _stage_data(tmp_path)
    run = tmp_path / "run"
    res = submit(*_stage_args(run, data, init, "quantize.methods=[pq,scq,scq_e2e]", "quantize.bits=[16]",
                              "quantize.scq.workers=2"), *SLURM)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = re.findall(r"quantize: job (\d+)", res.stdout)
    assert ids, res.stdout
    states = wait_for(ids)
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{log_tails(run)}"
    found = json.loads((run / "eval" / "results.json").read_text())["unicom:ViT-Tiny-16"]["cub"]
    assert {"pq-4x4/R@1", "scq-4x4/R@1", "scq_e2e-4x4/R@1", "float/R@1"} <= set(found)
