"""K-means stage: joint feature, spherical and two-level k-means, memory-mapped sampling, run_kmeans files."""
import os

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cluster_job import features, kmeans
from embed_fixtures import CLIP, blobs, unit, write_embedded
from unicom_ds.atomic import read_json
from unicom_ds.config import ConfigError, resolve, select


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
    c, objective, iterations = kmeans.spherical_kmeans(x, 6, niter=20, seed=0)
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
    c, objective, iterations = kmeans.two_level_kmeans(x, 16, niter=25, seed=0)
    assert c.shape == (16, 32)
    # k-means is a heuristic: a sub-problem may keep a local optimum, so not necessarily a perfect 1.0.
    assert adjusted_rand_score(truth, kmeans.nearest(c, x)) > 0.9
    assert iterations > 0 and 0 < objective <= len(x) + 1e-3


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

    mtime = os.stat(tmp_path / "kmeans" / "centroids.npy").st_mtime_ns
    assert kmeans.run_kmeans(cfg) == summary
    assert os.stat(tmp_path / "kmeans" / "centroids.npy").st_mtime_ns == mtime
    with pytest.raises(ConfigError, match=r"summary.json.*kmeans\.k: 5 there, 6 now"):
        kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=6"))


def test_run_kmeans_two_level_and_modes(tmp_path):
    truth = make_run(tmp_path, groups=9, per=10)
    summary = kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=9", "kmeans.two_level=true", "kmeans.mode=text"))
    assert summary["two_level"] and summary["mode"] == "text"
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
