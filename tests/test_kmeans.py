"""K-means stage: joint feature, spherical and two-level k-means, memory-mapped sampling, run_kmeans files."""
import os

import faiss
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cluster_job import features, kmeans
from embed_fixtures import CLIP, blobs, unit, write_embedded
from unicom_ds.atomic import read_json
from unicom_ds.config import ConfigError, resolve, select
from unicom_ds.tblog import read_scalars


def cfg_for(run_dir, *extra):
    return select(resolve([f"run_dir={run_dir}", "clip.model=ViT-Tiny-16", "clip.pretrained=random",
                           "kmeans.niter=20", "kmeans.gpu=false", "progress=off", *extra]))


def test_joint_feature_is_normalised_mean_direction():
    rng = np.random.default_rng(0)
    img, txt = unit(rng.standard_normal((5, 8))), unit(rng.standard_normal((5, 8)))
    got = features.joint(img, txt)
    # Reference: the bisector of img and txt, i.e. their sum divided by its length.
    s = img + txt
    ref = s / np.sqrt((s ** 2).sum(axis=1))[:, None]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features.joint(img, img), img, atol=1e-6)
    np.testing.assert_allclose(features.feature(img, txt, "text"), txt, atol=1e-6)
    with pytest.raises(ConfigError, match="kmeans.mode=both"):
        features.feature(img, txt, "both")


def test_spherical_kmeans_recovers_separated_groups():
    rng = np.random.default_rng(1)
    x, truth = blobs(np.eye(16)[:6], 30, 0.05, rng)
    x = unit(x).astype(np.float32)
    fit = kmeans.spherical_kmeans(x, 6, niter=20, seed=0)
    c, objective, iterations = fit.centroids, fit.objective, fit.iterations
    assert c.shape == (6, 16)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)  # spherical: unit centroids
    labels = kmeans.nearest(c, x)
    assert adjusted_rand_score(truth, labels) == 1.0
    # faiss's spherical objective is the summed cosine of each point to its centroid.
    assert objective == pytest.approx(float((x * c[labels]).sum()), rel=1e-4)
    assert iterations >= 1


def test_split_sizes_proportional_and_exact():
    counts = np.array([500, 3, 0, 120, 1, 76])
    sizes = kmeans.split_sizes(counts, 40)
    assert sizes.sum() == 40
    assert sizes[2] == 0 and (sizes[counts > 0] >= 1).all() and (sizes <= counts).all()
    quota = 40 * counts / counts.sum()
    assert np.abs(sizes - quota)[counts > 1].max() < 2  # proportional up to rounding and the >=1 floor
    np.testing.assert_array_equal(kmeans.split_sizes(np.array([2, 3]), 5), [2, 3])  # k == points
    with pytest.raises(ValueError, match="k=6"):
        kmeans.split_sizes(np.array([2, 3]), 6)


def test_two_level_recovers_groups_and_returns_k_centroids():
    rng = np.random.default_rng(2)
    x, truth = blobs(np.eye(32)[:16], 20, 0.03, rng)
    x = unit(x).astype(np.float32)
    fit, coarse = kmeans.two_level_kmeans(x, 16, niter=25, seed=0)
    c, objective, iterations = fit.centroids, fit.objective, fit.iterations
    assert c.shape == (16, 32)
    # k-means is a heuristic: a sub-problem may keep a local optimum, so not necessarily a perfect 1.0.
    assert adjusted_rand_score(truth, kmeans.nearest(c, x)) > 0.9
    assert iterations > 0 and 0 < objective <= len(x) + 1e-3


def test_two_level_on_a_float16_sample_equals_float32(monkeypatch):
    """The two-level fit holds its sample in float16 (half the memory at k = 1M): converted a coarse sample and a
    sub-problem at a time, it fits exactly what the same values in float32 fit; the coarse level sees at most
    COARSE_POINTS_PER_CENTROID points per coarse centroid (here 4 x 2 of 320)."""
    rng = np.random.default_rng(3)
    x, _ = blobs(np.eye(32)[:16], 20, 0.03, rng)
    half = unit(x).astype(np.float16)
    monkeypatch.setattr(kmeans, "COARSE_POINTS_PER_CENTROID", 2)
    monkeypatch.setattr(kmeans, "NEAREST_BATCH", 50)  # the coarse assignment in batches too
    seen = []
    fit_km = kmeans.spherical_kmeans

    def recorded(x, k, *args):
        seen.append((x.dtype, len(x), k))
        return fit_km(x, k, *args)

    monkeypatch.setattr(kmeans, "spherical_kmeans", recorded)
    fit16, coarse16 = kmeans.two_level_kmeans(half, 16, niter=10, seed=0)
    fit32, coarse32 = kmeans.two_level_kmeans(half.astype(np.float32), 16, niter=10, seed=0)
    assert np.array_equal(fit16.centroids, fit32.centroids) and fit16.objective == fit32.objective
    assert seen[0] == (np.float32, 8, 4) and all(dtype == np.float32 for dtype, _, _ in seen)


def flat_groups(n: int, k: int, d: int, seed: int = 0) -> np.ndarray:
    """k groups uniform on the sphere, mean cosine ~0.7 to their group: no hierarchy for a coarse level."""
    rng = np.random.default_rng(seed)
    groups = unit(rng.standard_normal((k, d)))
    return unit(groups[rng.integers(0, k, n)] + 0.127 * rng.standard_normal((n, d))).astype(np.float32)


def nearest_mean_cosine(x: np.ndarray, c: np.ndarray) -> float:
    return float((x @ c.T).max(axis=1).mean())  # each point against its nearest of all the centroids


def test_refining_closes_the_two_level_gap_to_one_level():
    """Where the coarse level cuts through groups, two levels fall well below one level; three refinement
    iterations over all centroids (IVF search, nprobe 8) come within 1 %, as a hand-written exact Lloyd does."""
    x = flat_groups(16384, 256, 64)
    one = nearest_mean_cosine(x, kmeans.spherical_kmeans(x, 256, 20, 0).centroids)
    two, _ = kmeans.two_level_kmeans(x, 256, 20, 0)
    refined = kmeans.refine(x, two, 3, 8, 0)
    c = two.centroids.copy()
    for _ in range(3):  # reference: Lloyd steps with every centroid scored
        ids = (x @ c.T).argmax(axis=1)
        sums = np.zeros_like(c)
        np.add.at(sums, ids, x)
        full = np.linalg.norm(sums, axis=1) > 0
        c[full] = sums[full] / np.linalg.norm(sums[full], axis=1, keepdims=True)
    before, after, lloyd = (nearest_mean_cosine(x, f) for f in (two.centroids, refined.centroids, c))
    assert before < 0.96 * one  # the gap the refinement exists for
    assert after > 0.99 * one and abs(after - lloyd) < 0.005
    assert refined.iterations == two.iterations + 3 and np.all(np.diff(refined.history[two.iterations - 1:]) > 0)
    assert refined.sizes.sum() == len(x) and np.allclose(np.linalg.norm(refined.centroids, axis=1), 1, atol=1e-5)


def test_a_refinement_that_does_not_raise_the_objective_is_not_kept():
    x = flat_groups(4096, 64, 32)
    fit = kmeans.spherical_kmeans(x, 64, 20, 0)
    claimed = fit._replace(objective=float(len(x)))  # no assignment can beat every point on its centroid
    kept = kmeans.refine(x, claimed, 3, 8, 0)
    assert kept.centroids is fit.centroids and kept.history == fit.history


def test_sample_rows_is_seeded_uniform_without_replacement():
    counts = np.array([10, 0, 25, 7])
    rows = features.sample_rows(counts, 20, seed=3)
    assert sum(len(r) for r in rows) == 20 and len(rows[1]) == 0
    for r, n in zip(rows, counts):
        assert (np.diff(r) > 0).all() and (r >= 0).all() and (r < n).all()
    again = features.sample_rows(counts, 20, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(rows, again))
    other = features.sample_rows(counts, 20, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(rows, other))
    assert [len(r) for r in features.sample_rows(counts, 99, seed=0)] == list(counts)  # capped at all rows


def test_gather_reads_only_sampled_rows_memory_mapped(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    for s in ("a", "b"):
        write_embedded(tmp_path, s, rng.standard_normal((50, 8)), rng.standard_normal((50, 8)))
    rows = features.sample_rows(np.array([50, 50]), 12, seed=0)

    opened, indexed = [], []
    real_load = np.load

    class Spy:
        def __init__(self, arr):
            self.arr = arr

        def __getitem__(self, idx):
            indexed.append(np.atleast_1d(idx))
            return self.arr[idx]

    def spy_load(path, *args, **kwargs):
        opened.append(kwargs.get("mmap_mode"))
        return Spy(real_load(path, *args, **kwargs))

    monkeypatch.setattr(features.np, "load", spy_load)
    got = features.gather(str(tmp_path), ["a", "b"], rows, "joint", 8)
    monkeypatch.undo()

    assert opened and set(opened) == {"r"}
    assert sum(len(i) for i in indexed) == 2 * 12  # image and text rows of the sample, nothing more
    ref = []
    for s, r in zip(("a", "b"), rows):
        img = np.load(tmp_path / "embed" / f"{s}.img.npy").astype(np.float64)[r]
        txt = np.load(tmp_path / "embed" / f"{s}.txt.npy").astype(np.float64)[r]
        ref.append(unit(img + txt))
    np.testing.assert_allclose(got, np.concatenate(ref), atol=1e-5)


def make_run(tmp_path, groups=5, per=12, shards=3, clip=CLIP):
    rng = np.random.default_rng(5)
    centers = np.eye(16)[:groups]
    truth = []
    for i in range(shards):
        x, t = blobs(centers, per, 0.05, rng)
        write_embedded(tmp_path, f"{i:05d}", x + 0.02 * rng.standard_normal(x.shape), x, clip)
        truth.append(t)
    return np.concatenate(truth)


def test_run_kmeans_writes_contract_and_skips_rerun(tmp_path):
    make_run(tmp_path)
    cfg = cfg_for(tmp_path, "kmeans.k=5", "kmeans.max_points_per_centroid=8")
    summary = kmeans.run_kmeans(cfg)
    cent = np.load(tmp_path / "kmeans" / "centroids.npy")
    assert cent.dtype == np.float32 and cent.shape == (5, 16)
    on_disk = read_json(tmp_path / "kmeans" / "summary.json")
    assert on_disk == summary
    assert summary["points_used"] == 40 and summary["points_embedded"] == 180  # capped at k * 8
    assert (summary["k"], summary["d"], summary["mode"], summary["shards"]) == (5, 16, "joint", 3)
    assert summary["config"]["kmeans.k"] == 5 and summary["iterations"] >= 1 and summary["seconds"] >= 0
    assert "kmeans.refine_iters" not in summary["config"]  # a one-level fit is not refined: older runs keep matching

    mtime = os.stat(tmp_path / "kmeans" / "centroids.npy").st_mtime_ns
    assert kmeans.run_kmeans(cfg) == summary
    assert os.stat(tmp_path / "kmeans" / "centroids.npy").st_mtime_ns == mtime
    with pytest.raises(ConfigError, match=r"summary.json.*kmeans\.k: 5 there, 6 now"):
        kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=6"))


def test_run_kmeans_two_level_and_modes(tmp_path):
    truth = make_run(tmp_path, groups=9, per=10)
    summary = kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=9", "kmeans.two_level=true", "kmeans.mode=text"))
    assert summary["two_level"] and summary["mode"] == "text"
    assert 0 <= summary["refined_iterations"] <= 5 and summary["mean_cosine"] >= summary["mean_cosine_before_refining"]
    assert summary["config"]["kmeans.refine_iters"] == 5  # part of a two-level fit's identity (not of one level's)
    cent = np.load(tmp_path / "kmeans" / "centroids.npy")
    x = np.concatenate([np.load(tmp_path / "embed" / f"{i:05d}.txt.npy") for i in range(3)]).astype(np.float32)
    assert adjusted_rand_score(truth, kmeans.nearest(cent, x)) == 1.0


def test_k_larger_than_points_refused(tmp_path):
    make_run(tmp_path, groups=2, per=3, shards=2)
    with pytest.raises(ConfigError, match=r"kmeans\.k=13 is larger than the 12 embedded points"):
        kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=13"))
    assert not (tmp_path / "kmeans" / "summary.json").exists()


def test_embeddings_of_another_clip_refused(tmp_path):
    make_run(tmp_path, groups=2, per=3, shards=1, clip={"clip.model": "ViT-Tiny-32", "clip.pretrained": "random"})
    with pytest.raises(ConfigError, match=r"00000.done.json.*clip\.model: 'ViT-Tiny-32' there, 'ViT-Tiny-16' now"):
        kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=2"))


def test_gpu_selection(monkeypatch):
    monkeypatch.setattr(kmeans.faiss, "get_num_gpus", lambda: 2)
    assert kmeans.use_gpu("auto") == 2 and kmeans.use_gpu(True) == 2 and kmeans.use_gpu(False) == 0
    monkeypatch.setattr(kmeans.faiss, "get_num_gpus", lambda: 0)
    assert kmeans.use_gpu("auto") == 0
    with pytest.raises(ConfigError, match="gpu=true"):
        kmeans.use_gpu(True)
    assert kmeans.use_two_level("auto", 65536) and not kmeans.use_two_level("auto", 1000)
    assert kmeans.use_two_level(True, 10) and not kmeans.use_two_level("false", 10 ** 6)


def test_tensorboard_objective_per_iteration_and_class_sizes(tmp_path):
    """The logged objectives are faiss's own per-iteration values on the same points; the histogram holds
    the class sizes of those points under the final centroids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_run(tmp_path, groups=5, per=12, shards=3)
    summary = kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=5", "kmeans.niter=7", "kmeans.init=kmeans++"))
    # Reference: every row is used (180 < 5 * 256), in shard order, clustered by faiss directly.
    img = np.concatenate([np.load(tmp_path / "embed" / f"{i:05d}.img.npy") for i in range(3)]).astype(np.float64)
    txt = np.concatenate([np.load(tmp_path / "embed" / f"{i:05d}.txt.npy") for i in range(3)]).astype(np.float64)
    x = unit(img + txt).astype(np.float32)
    ref = faiss.Kmeans(16, 5, niter=7, seed=0, spherical=True, max_points_per_centroid=36, verbose=False,
                       init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS)
    ref.train(x)
    logged = read_scalars(str(tmp_path / "tensorboard" / "kmeans"))
    assert 1 <= len(ref.obj) <= 7  # faiss stops early once the assignment no longer changes
    assert [s for s, _ in logged["kmeans/objective"]] == list(range(1, len(ref.obj) + 1))
    assert summary["iterations"] == len(ref.obj)
    np.testing.assert_allclose([v for _, v in logged["kmeans/objective"]], ref.obj, rtol=1e-5)

    cent = np.load(tmp_path / "kmeans" / "centroids.npy")
    sizes = np.bincount(np.argmax(x @ cent.T, axis=1), minlength=5)
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "kmeans"), size_guidance={"histograms": 0})
    acc.Reload()
    [hist] = acc.Histograms("kmeans/class_sizes")
    h = hist.histogram_value
    assert (h.num, h.sum, h.min, h.max) == (5, 180, sizes.min(), sizes.max())
    assert logged["kmeans/empty_classes"] == [(0, float((sizes == 0).sum()))]


def test_tensorboard_two_level_objectives(tmp_path):
    make_run(tmp_path, groups=9, per=10)
    kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=9", "kmeans.two_level=true", "kmeans.niter=6"))
    logged = read_scalars(str(tmp_path / "tensorboard" / "kmeans"))
    coarse = [s for s, _ in logged["kmeans/coarse_objective"]]
    assert 1 <= len(coarse) <= 6 and coarse == list(range(1, len(coarse) + 1))
    fine = [v for _, v in logged["kmeans/objective"]]
    assert 1 <= len(fine) <= 6 and all(0 < v <= 270 + 1e-3 for v in fine)  # summed cosines of 270 points
    # The last summed value is the fit's objective (the summary's), and splitting never scores worse.
    assert fine[-1] == pytest.approx(read_json(tmp_path / "kmeans" / "summary.json")["objective"], rel=1e-6)
    assert fine[-1] >= logged["kmeans/coarse_objective"][-1][1] - 1e-3
