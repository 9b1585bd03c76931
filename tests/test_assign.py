"""Assign stage: labels aligned with keys, batching, rerun skip, refusing other centroids, summary/PNG/TensorBoard."""
import os
import re

import numpy as np
import pytest
import torch

from cluster_job import assign
from embed_fixtures import write_embedded
from unicom_ds.atomic import read_json, write_json_atomic
from unicom_ds.config import ConfigError, resolve, select
from unicom_ds.progress import line
from unicom_ds.tblog import read_scalars

K, D = 5, 8
# torch's and faiss's OpenMP pools in one process spin against each other on a small machine (100x slower).
torch.set_num_threads(1)


def cfg_for(run_dir, *extra):
    return select(resolve([f"run_dir={run_dir}", "clip.model=ViT-Tiny-16", "clip.pretrained=random",
                           f"kmeans.k={K}", "assign.batch_size=3", "assign.gpu=false", "progress=off", *extra]))


def write_centroids(run_dir, centroids, mode="joint"):
    out = run_dir / "kmeans"
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "centroids.npy", centroids.astype(np.float32))
    write_json_atomic(out / "summary.json", {"k": len(centroids), "d": D, "mode": mode, "config": {"kmeans.k": K}})


def make_run(run_dir, mode="joint"):
    """Centroids are the first K axes; each row sits near a known axis in the feature `mode` clusters,
    and near another axis in the feature it does not use, so a wrong mode gives wrong labels."""
    rng = np.random.default_rng(0)
    write_centroids(run_dir, np.eye(D)[:K], mode)
    expected = {}
    for stem, n in (("00000", 10), ("00001", 7)):
        want = rng.integers(0, K, n)
        other = (want + 1 + rng.integers(0, K - 1, n)) % K
        near = np.eye(D)[want] + 0.1 * rng.standard_normal((n, D))
        far = np.eye(D)[other] + 0.1 * rng.standard_normal((n, D))
        img, txt = {"image": (near, far), "text": (far, near), "joint": (near, near)}[mode]
        keys = write_embedded(run_dir, stem, img, txt)
        expected[stem] = dict(zip(keys, want))
    return expected


@pytest.mark.parametrize("mode", ["joint", "image", "text"])
def test_labels_align_with_keys(tmp_path, mode):
    expected = make_run(tmp_path, mode)
    cfg = cfg_for(tmp_path)
    assert assign.assign_shards(cfg, ["00000"]) is None  # 00001 not labelled yet: no summary
    assert not (tmp_path / "labels" / "summary.json").exists()
    summary = assign.assign_shards(cfg, ["00001"])
    for stem, want in expected.items():
        labels = np.load(tmp_path / "labels" / f"{stem}.npy")
        keys = (tmp_path / "embed" / f"{stem}.keys.txt").read_text().split()
        assert labels.dtype == np.int64 and len(labels) == len(keys)
        assert dict(zip(keys, labels.tolist())) == {k: int(v) for k, v in want.items()}
    assert summary == read_json(tmp_path / "labels" / "summary.json")


def test_summary_png_and_tensorboard(tmp_path):
    expected = make_run(tmp_path)
    summary = assign.assign_shards(cfg_for(tmp_path), ["00000", "00001"])
    sizes = np.bincount(np.concatenate([list(w.values()) for w in expected.values()]), minlength=K)
    used = sizes[sizes > 0]
    assert summary["k"] == K and summary["rows"] == 17 and summary["shards"] == 2
    assert summary["non_empty_classes"] == len(used) and summary["empty_classes"] == K - len(used)
    assert (summary["min_size"], summary["max_size"]) == (used.min(), used.max())
    assert summary["median_size"] == pytest.approx(np.median(used))
    png = (tmp_path / "labels" / "class_sizes.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    scalars = read_scalars(str(tmp_path / "tensorboard" / "assign"))
    assert scalars["labels/non_empty_classes"] == [(0, float(len(used)))]
    assert scalars["labels/max_size"] == [(0, float(used.max()))]


def test_rerun_skips_done_shards(tmp_path):
    make_run(tmp_path)
    cfg = cfg_for(tmp_path)
    assign.assign_shards(cfg, ["00000", "00001"])
    label = tmp_path / "labels" / "00000.npy"
    before = os.stat(label).st_mtime_ns
    label_bytes = label.read_bytes()
    assert assign.assign_shards(cfg, ["00000"])["rows"] == 17  # all labelled: this task writes the summary
    assert os.stat(label).st_mtime_ns == before and label.read_bytes() == label_bytes


def test_refuses_labels_of_other_centroids(tmp_path):
    make_run(tmp_path)
    cfg = cfg_for(tmp_path)
    assign.assign_shards(cfg, ["00000"])
    write_centroids(tmp_path, np.eye(D)[1:K + 1])  # a new k-means run in the same run_dir
    with pytest.raises(ConfigError, match="holds labels of other centroids"):
        assign.assign_shards(cfg, ["00001"])
    assert not (tmp_path / "labels" / "00001.npy").exists()


def test_missing_inputs_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="kmeans/summary.json missing"):
        assign.assign_shards(cfg_for(tmp_path), ["00000"])
    make_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="shard 00007 has no .*00007.done.json"):
        assign.assign_shards(cfg_for(tmp_path), ["00007"])


def test_size_stats_reference():
    sizes = np.array([0, 4, 1, 0, 9, 2])
    assert assign.size_stats(sizes) == {
        "k": 6, "rows": 16, "non_empty_classes": 4, "empty_classes": 2, "min_size": 1, "median_size": 3.0,
        "mean_size": 4.0, "max_size": 9, "p99_size": pytest.approx(9 - 0.03 * 5)}


def test_progress_lines_say_shards_and_rows(tmp_path, capfd):
    make_run(tmp_path)
    capfd.readouterr()
    assign.assign_shards(cfg_for(tmp_path, "progress=lines"), ["00000", "00001"])
    err = capfd.readouterr().err
    assert re.search(r"\[assign\] 2/2 shards, 17 rows, [\d.,]+ shards/s, [\d,]+ rows/s, \d+s elapsed", err), err
    assert "assign: 2 shards, 17 rows labelled" in err
    assert line("x", 1, None, "batch", 1, 2.0) == "[x] 1 batch, 1 row, 0.5 batches/s, 0 rows/s, 2s elapsed"
    assert line("x", 3, 4, "shard", 1234, 1.0) == "[x] 3/4 shards, 1,234 rows, 3.0 shards/s, 1,234 rows/s, 1s elapsed"


def test_summary_carries_damage_and_skipped_rows(tmp_path):
    make_run(tmp_path)
    marker = tmp_path / "embed" / "00001.done.json"
    damage = {"reason": "ReadError: unexpected end of data", "rows_kept": 7, "rows_lost": 5}
    write_json_atomic(marker, {**read_json(marker), "damaged": damage, "skipped": {"corrupt_image": 2}})
    summary = assign.assign_shards(cfg_for(tmp_path), ["00000", "00001"])
    assert summary["damaged_shards"] == [{"shard": "00001", **damage}]
    assert summary["rows_skipped"] == {"corrupt_image": 2}
    assert read_scalars(str(tmp_path / "tensorboard" / "assign"))["labels/damaged_shards"] == [(0, 1.0)]


def test_damage_of_markers_written_before_the_damage_record(tmp_path):
    """done.json of the earlier embed stage said only "fault"; such a shard still counts as damaged."""
    make_run(tmp_path)
    marker = tmp_path / "embed" / "00000.done.json"
    old = {k: v for k, v in read_json(marker).items() if k != "damaged"}
    write_json_atomic(marker, {**old, "fault": "OSError: [Errno 5] Input/output error"})
    summary = assign.assign_shards(cfg_for(tmp_path), ["00000", "00001"])
    assert summary["damaged_shards"] == [{"shard": "00000", "reason": "OSError: [Errno 5] Input/output error",
                                          "rows_kept": 10, "rows_lost": None}]


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("blocks", [(None, None), (61, 37), (128, 300), (1000, 64), (400, 1)])
def test_blocked_torch_search_equals_faiss(blocks):
    """nearest.nearest_ip on the CPU against faiss's IndexFlatIP (assign's index), whole and in blocks that do
    not divide the 1,000 rows or the 300 centroids."""
    import faiss

    from cluster_job import nearest

    rng = np.random.default_rng(1)
    centroids, x = unit_rows(rng, 300, 32), unit_rows(rng, 1000, 32)
    # Ties-free: rows whose best two centroids are within float32 rounding of each other are left out.
    top2 = np.sort(x.astype(np.float64) @ centroids.T.astype(np.float64), axis=1)[:, -2:]
    x = x[top2[:, 1] - top2[:, 0] > 1e-5]
    assert len(x) > 950
    index = faiss.IndexFlatIP(32)
    index.add(centroids)
    want_scores, want = index.search(x, 1)
    rows, cols = blocks
    if rows is None:  # TorchFlatIP, blocks sized by a budget of 4,000 scores
        scores, got = nearest.TorchFlatIP(centroids, "cpu", budget_bytes=16000).search(x, 1)
        rows, cols = nearest.block_sizes(len(x), 300, 16000)
        assert rows * cols <= 4000 and cols < 300  # it did block
    else:
        s, g = nearest.nearest_ip(torch.from_numpy(centroids), torch.from_numpy(x), rows, cols)
        scores, got = s.numpy()[:, None], g.numpy()[:, None]
    assert got.dtype == np.int64 and np.array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


def test_block_sizes_fit_the_budget():
    from cluster_job import nearest

    for n, k, budget in [(65536, 1_000_000, 2 << 30), (65536, 100_000, 2 << 30), (10, 5, 1 << 20), (3000, 7, 400),
                         (5, 10**6, 4)]:
        rows, cols = nearest.block_sizes(n, k, budget)
        assert 1 <= rows <= n and 1 <= cols <= k and rows * cols * 4 <= max(budget, 4)
    assert nearest.block_sizes(65536, 100_000, 2 << 30) == (5368, 100_000)  # every centroid at once


@pytest.mark.parametrize("budget", [None, 16000])
def test_blocked_torch_top_l_equals_faiss(budget):
    """Top-5 by TorchFlatIP (whole, and in centroid blocks of a 4,000-score budget) against faiss's IndexFlatIP,
    on rows whose best six centroids are apart by more than float32 rounding."""
    import faiss

    from cluster_job import nearest

    rng = np.random.default_rng(2)
    centroids, x = unit_rows(rng, 300, 32), unit_rows(rng, 1000, 32)
    top = np.sort(x.astype(np.float64) @ centroids.T.astype(np.float64), axis=1)[:, -6:]
    x = x[(np.diff(top, axis=1) > 1e-5).all(axis=1)]
    index = faiss.IndexFlatIP(32)
    index.add(centroids)
    want_scores, want = index.search(x, 5)
    scores, got = nearest.TorchFlatIP(centroids, "cpu", budget_bytes=budget).search(x, 5)
    assert got.shape == (len(x), 5) and np.array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


def test_torch_search_where_faiss_sees_no_gpu(tmp_path, monkeypatch):
    """assign.gpu=auto/true with a faiss-cpu build and a CUDA GPU: the stage searches with TorchFlatIP
    (here moved onto the CPU) and writes the labels faiss would; off, or with faiss on a GPU, it does not."""
    from cluster_job import nearest

    monkeypatch.setattr(assign.faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(assign.torch.cuda, "is_available", lambda: True)
    assert assign.torch_gpu("auto") and assign.torch_gpu(True) and not assign.torch_gpu(False)
    made = []

    def on_cpu(centroids, device):
        made.append(device)
        return nearest.TorchFlatIP(centroids, "cpu", budget_bytes=8)  # one row x two centroids per block

    monkeypatch.setattr(assign, "TorchFlatIP", on_cpu)
    expected = make_run(tmp_path)
    assign.assign_shards(cfg_for(tmp_path, "assign.gpu=true"), ["00000", "00001"])
    assert made == ["cuda"]
    for stem, want in expected.items():
        keys = (tmp_path / "embed" / f"{stem}.keys.txt").read_text().split()
        labels = np.load(tmp_path / "labels" / f"{stem}.npy")
        assert labels.dtype == np.int64 and dict(zip(keys, labels.tolist())) == {k: int(v) for k, v in want.items()}
    monkeypatch.setattr(assign.faiss, "get_num_gpus", lambda: 1)
    assert not assign.torch_gpu("auto")
    monkeypatch.setattr(assign.faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(assign.torch.cuda, "is_available", lambda: False)
    assert not assign.torch_gpu("auto")


def clustered(rng, centroids, n, noise):
    """Rows around random centroids: each near one centre, some near the border of two."""
    x = centroids[rng.integers(0, len(centroids), n)] + noise * rng.standard_normal((n, centroids.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_search_in_faiss_and_torch_agree_and_track_exact_search():
    """The IVF over the centroids: faiss's IndexIVFFlat and the torch grouped products return the same top-5 on
    ties-free rows; with every list probed both equal exact search (numpy), and with few lists probed they
    still find most nearest centroids."""
    from cluster_job import centroid_ivf

    rng = np.random.default_rng(3)
    centroids = unit_rows(rng, 1024, 32)
    x = clustered(rng, centroids, 3000, 0.15)
    exact = np.argsort(-(x.astype(np.float64) @ centroids.T.astype(np.float64)), axis=1)[:, :5]
    nlist = centroid_ivf.default_nlist(1024)
    assert nlist == 128
    centres = centroid_ivf.list_centres(centroids, nlist, seed=0)
    assert centres.shape == (nlist, 32)
    for nprobe in (nlist, 8):
        sims_f, ids_f = centroid_ivf.faiss_ivf(centroids, centres, nprobe).search(x, 5)
        sims_t, ids_t = centroid_ivf.TorchIVF(centroids, centres, nprobe, "cpu").search(x, 5)
        clear = (np.abs(np.diff(sims_f, axis=1)) > 1e-5).all(axis=1) & (ids_f >= 0).all(axis=1)
        assert clear.mean() > 0.95 and np.array_equal(ids_t[clear], ids_f[clear])
        np.testing.assert_allclose(sims_t[clear], sims_f[clear], atol=1e-5)
        agree = (ids_f[:, 0] == exact[:, 0]).mean()
        if nprobe == nlist:
            assert np.array_equal(ids_f[clear], exact[clear])  # every list probed: exact search
        else:
            assert 0.9 < agree < 1.0  # an approximation, and a good one


def ivf_run(run_dir, k=64, noise=0.3):
    rng = np.random.default_rng(4)
    centroids = unit_rows(rng, k, D)
    write_centroids(run_dir, centroids)
    for stem, n in (("00000", 300), ("00001", 200)):
        x = clustered(rng, centroids, n, noise)
        write_embedded(run_dir, stem, x, x)
    return centroids


def test_assign_ivf_writes_top_l_and_measures_its_disagreement(tmp_path, capfd):
    """assign.search=ivf with few lists probed: labels and top-3 (nearest first, with their similarities) are
    written, every row is checked against exact search (check_rows above the shard sizes), and the summary,
    TensorBoard and the log state the share of changed labels, computed here with numpy."""
    from cluster_job import features

    run = tmp_path / "run"
    centroids = ivf_run(run)
    cfg = cfg_for(run, "kmeans.k=64", "assign.search=ivf", "assign.nlist=16", "assign.nprobe=1", "assign.top_l=3",
                  "assign.check_rows=1000", "assign.batch_size=128")
    summary = assign.assign_shards(cfg, ["00000", "00001"])
    changed = checked = 0
    for stem in ("00000", "00001"):
        x = np.concatenate(list(features.iter_batches(str(run), stem, "joint", 1000)))
        scores = x.astype(np.float64) @ centroids.T.astype(np.float64)
        labels = np.load(run / "labels" / f"{stem}.npy")
        top, sims = np.load(run / "labels" / f"{stem}.topl.npy"), np.load(run / "labels" / f"{stem}.topl_sim.npy")
        assert top.shape == (len(x), 3) and top.dtype == np.int64 and np.array_equal(top[:, 0], labels)
        np.testing.assert_allclose(sims, np.take_along_axis(scores, top, 1), atol=1e-5)
        assert (np.diff(sims, axis=1) <= 1e-6).all()  # nearest first
        changed += int((labels != scores.argmax(1)).sum())
        checked += len(x)
    search = summary["search"]
    assert search["checked_rows"] == checked == 500 and (search["nlist"], search["nprobe"]) == (16, 1)
    assert search["top1_disagreement"] == pytest.approx(changed / checked) and changed > 0
    assert read_scalars(str(run / "tensorboard" / "assign"))["labels/top1_disagreement"][0][1] == \
        pytest.approx(changed / checked)
    err = capfd.readouterr().err
    assert f"{100 * changed / checked:.2f}% of 500 rows checked against exact search changed label" in err
    assert "assign: search=ivf (IVF of nlist 16; nprobe used: 1)" in err
    assert "WARNING: above 0.5%: raise assign.nprobe" in err
    assert (run / "labels" / "ivf_lists.npy").is_file() and np.load(run / "labels" / "ivf_lists.npy").shape == (16, D)


def test_assign_refuses_labels_of_another_search(tmp_path):
    run = tmp_path / "run"
    ivf_run(run)
    assign.assign_shards(cfg_for(run, "kmeans.k=64", "assign.search=ivf", "assign.nlist=16", "assign.nprobe=2"),
                         ["00000"])
    with pytest.raises(ConfigError, match=r"holds labels of another search .*nprobe 2 there, 4 now"):
        assign.assign_shards(cfg_for(run, "kmeans.k=64", "assign.search=ivf", "assign.nlist=16", "assign.nprobe=4"),
                             ["00001"])
    assert not (run / "labels" / "00001.npy").exists()


def test_assign_auto_chooses_the_smallest_nprobe_that_keeps_the_labels(tmp_path, monkeypatch, capfd):
    """assign.search=auto (here from k=64 on) doubles nprobe from assign.nprobe until a sample of the task's own
    rows (all 300 of shard 00000 here) keeps >= 99.5% of exact search's labels: the nprobe it picks is the one
    found here by faiss's IVF against numpy's exact argmax, and the run's measured disagreement stays within."""
    from cluster_job import centroid_ivf, features

    run = tmp_path / "run"
    centroids = ivf_run(run, noise=0.12)
    monkeypatch.setattr(assign, "IVF_FROM_K", 64)
    summary = assign.assign_shards(cfg_for(run, "kmeans.k=64", "assign.search=auto", "assign.nlist=16",
                                           "assign.nprobe=1", "assign.check_rows=1000"), ["00000", "00001"])
    x = np.concatenate(list(features.iter_batches(str(run), "00000", "joint", 1000)))
    want = (x.astype(np.float64) @ centroids.T.astype(np.float64)).argmax(1)
    centres = np.load(run / "labels" / "ivf_lists.npy")
    expected = next((str(p) for p in (1, 2, 4) if (centroid_ivf.faiss_ivf(centroids, centres, p).search(x, 1)[1][:, 0]
                                                  != want).mean() <= 0.005), "exact")
    assert expected not in ("1", "exact")  # the start alone is not enough: the doubling is tested
    assert summary["search"]["nprobe_used"] == [expected]
    assert summary["search"]["top1_disagreement"] <= 0.005
    assert "search=auto: " in capfd.readouterr().err


def test_calibration_falls_back_to_exact_search():
    """No nprobe up to nlist / 4 keeps the labels: exact search (None)."""
    from cluster_job import centroid_ivf

    rng = np.random.default_rng(5)
    centroids, x = unit_rows(rng, 256, 32), unit_rows(rng, 500, 32)  # random rows: no structure to exploit
    centres = centroid_ivf.list_centres(centroids, 64, seed=0)
    exact = assign.search_index(centroids)
    assert assign.calibrate(exact, lambda p: centroid_ivf.faiss_ivf(centroids, centres, p), x, 1, 64) is None
    assert assign.calibrate(exact, lambda p: centroid_ivf.faiss_ivf(centroids, centres, p), x, 64, 256) == 64
