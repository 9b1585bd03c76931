"""Assign stage: labels aligned with keys, batching, rerun skip, refusing other centroids, summary/PNG/TensorBoard."""
import os
import re

import numpy as np
import pytest

from cluster_job import assign
from embed_fixtures import write_embedded
from unicom_ds.atomic import read_json, write_json_atomic
from unicom_ds.config import ConfigError, resolve, select
from unicom_ds.progress import line
from unicom_ds.tblog import read_scalars

K, D = 5, 8


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
    scalars = read_scalars(str(tmp_path / "tensorboard" / "cluster"))
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
    assert re.search(r"\[assign\] 2/2 shards, 17 rows, [\d.]+ shards/s, [\d,]+ rows/s, \d+s elapsed", err), err
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
    assert read_scalars(str(tmp_path / "tensorboard" / "cluster"))["labels/damaged_shards"] == [(0, 1.0)]


def test_damage_of_markers_written_before_the_damage_record(tmp_path):
    """done.json of the earlier embed stage said only "fault"; such a shard still counts as damaged."""
    make_run(tmp_path)
    marker = tmp_path / "embed" / "00000.done.json"
    old = {k: v for k, v in read_json(marker).items() if k != "damaged"}
    write_json_atomic(marker, {**old, "fault": "OSError: [Errno 5] Input/output error"})
    summary = assign.assign_shards(cfg_for(tmp_path), ["00000", "00001"])
    assert summary["damaged_shards"] == [{"shard": "00000", "reason": "OSError: [Errno 5] Input/output error",
                                          "rows_kept": 10, "rows_lost": None}]
