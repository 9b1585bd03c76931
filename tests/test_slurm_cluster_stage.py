"""End to end: `python slurm/submit.py stage=cluster` on the demo shards, through the local SLURM
cluster (tests/slurm_cluster.sh) and through launcher=local, then the run directory against
the contract in docs/design.md ("Stage contracts"), recomputed independently from the tars and the saved
arrays."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from unicom_ds.shards import expand

K = 8
TINY = ["clip.model=ViT-Tiny-16", "clip.pretrained=random", f"kmeans.k={K}", "kmeans.niter=5",
        "embed.batch_size=16", "embed.workers=1", "embed.shards_per_task=2", "assign.shards_per_task=2"]
SLURM = ["launcher=slurm", "slurm.cpus_per_task=1", "slurm.mem_gb=1", "slurm.gpus_per_node=0",
         "slurm.time_min=30", "slurm.partition=debug"]
WAIT_S = 900


def tar_keys(path: str) -> list[str]:
    """The webdataset __key__ of every sample with an image, in tar order (read with tarfile, not webdataset)."""
    keys = []
    with tarfile.open(path) as tar:
        for m in tar:
            base, _, ext = m.name.partition(".")
            if ext in ("jpg", "jpeg", "png", "webp") and base not in keys:
                keys.append(base)
    return keys


def embed_dim() -> int:
    return json.loads((REPO / "unicom_ds/model_configs/ViT-Tiny-16.json").read_text())["embed_dim"]


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def check_cluster_run(run: Path, shard_paths: list[str]) -> None:
    """Every file docs/design.md promises for the cluster stage, with dtypes, shapes and meaning."""
    d = embed_dim()
    stems = [Path(p).name[: -len(".tar")] for p in shard_paths]
    assert (run / "config.yaml").is_file()

    embed = run / "embed"
    want = {f"{s}.{ext}" for s in stems for ext in ("img.npy", "txt.npy", "keys.txt", "done.json")}
    assert {p.name for p in embed.iterdir()} == want          # nothing missing, no temp files left
    joint = {}
    for s, path in zip(stems, shard_paths):
        keys = (embed / f"{s}.keys.txt").read_text().splitlines()
        assert keys == tar_keys(path)                           # every demo sample is valid: all rows kept
        img, txt = np.load(embed / f"{s}.img.npy"), np.load(embed / f"{s}.txt.npy")
        for feats in (img, txt):
            assert feats.dtype == np.float16 and feats.shape == (len(keys), d)
            np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert not np.allclose(img, txt)                        # two towers, two features
        done = json.loads((embed / f"{s}.done.json").read_text())
        assert done["n"] == len(keys) and sum(done["skipped"].values()) == 0
        joint[s] = normalize((img.astype(np.float32) + txt.astype(np.float32)) / 2)

    kmeans = run / "kmeans"
    centroids = np.load(kmeans / "centroids.npy")
    assert centroids.dtype == np.float32 and centroids.shape == (K, d)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-4)  # spherical k-means
    summary = json.loads((kmeans / "summary.json").read_text())
    total = sum(len(v) for v in joint.values())
    assert (summary["k"], summary["d"], summary["mode"], summary["points_used"]) == (K, d, "joint", total)
    assert summary["iterations"] >= 1 and summary["seconds"] >= 0 and np.isfinite(summary["objective"])

    labels_dir = run / "labels"
    extra = {"summary.json", "class_sizes.png", "centroids.json", "search.json"}  # which centroids, which search
    assert {p.name for p in labels_dir.iterdir()} == {f"{s}.npy" for s in stems} | extra
    sha = hashlib.sha256((kmeans / "centroids.npy").read_bytes()).hexdigest()
    assert json.loads((labels_dir / "centroids.json").read_text())["centroids_sha256"] == sha
    assert json.loads((labels_dir / "search.json").read_text()) == {"search": "exact", "top_l": 1}  # K < IVF_FROM_K
    all_labels = []
    for s in stems:
        labels = np.load(labels_dir / f"{s}.npy")
        assert labels.dtype == np.int64 and labels.shape == (len(joint[s]),)
        assert labels.min() >= 0 and labels.max() < K
        scores = joint[s] @ centroids.T                          # nearest centroid by inner product
        chosen = scores[np.arange(len(labels)), labels]
        assert np.all(chosen >= scores.max(axis=1) - 1e-4), f"labels of {s} are not the nearest centroids"
        all_labels.append(labels)
    sizes = np.bincount(np.concatenate(all_labels), minlength=K)
    stats = json.loads((labels_dir / "summary.json").read_text())
    nonempty = sizes[sizes > 0]
    assert (stats["k"], stats["rows"], stats["non_empty_classes"]) == (K, total, len(nonempty))
    assert (stats["min_size"], stats["max_size"]) == (nonempty.min(), nonempty.max())
    assert stats["median_size"] == pytest.approx(float(np.median(nonempty)))
    assert (labels_dir / "class_sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"


def submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "slurm/submit.py", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=WAIT_S)


def job_states(job_ids: list[str]) -> dict[str, str]:
    """{job or array-task id: state} from slurmctld (finished jobs are kept for MinJobAge)."""
    states = {}
    for jid in job_ids:
        out = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True).stdout
        for line in out.splitlines():
            task = re.search(r"ArrayTaskId=(\d+)", line)
            name = re.search(r"JobId=(\d+)", line).group(1)
            array = re.search(r"ArrayJobId=(\d+)", line)
            key = f"{array.group(1)}_{task.group(1)}" if task and array else name
            states[key] = re.search(r"JobState=(\w+)", line).group(1)
    return states


def wait_for(job_ids: list[str]) -> dict[str, str]:
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
                                capture_output=True, text=True).stdout.split()
        if not queued:
            return job_states(job_ids)
        time.sleep(3)
    subprocess.run(["scancel", *job_ids])
    pytest.fail(f"SLURM jobs {job_ids} still queued after {WAIT_S}s")


def log_tails(run: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((run / "logs").rglob("*_log.*")))


@pytest.mark.slurm
@pytest.mark.slow
def test_cluster_stage_on_slurm(slurm, tmp_path, demo_shards):
    run = tmp_path / "run"
    res = submit("stage=cluster", f"run_dir={run}", f"data.shards={demo_shards}", *TINY, *SLURM)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    ids = {m.group(1): m.group(2) for m in (re.match(r"(\w+): job (\d+)", ln) for ln in lines) if m}
    assert list(ids) == ["embed", "kmeans", "assign"], res.stdout
    assert f"run directory: {run}" in res.stdout
    for job_id in ids.values():  # each job's stdout and stderr paths are printed
        for stream in ("stdout", "stderr"):
            assert any(ln.split() and ln.split()[0] == stream and f"{run / 'logs'}/{job_id}" in ln for ln in lines)

    states = wait_for(list(ids.values()))
    # 3 shards by 2 -> an embed array of 2 tasks; 3 stems by 2 -> an assign array of 2 tasks.
    embed, assign = ids["embed"], ids["assign"]
    assert set(states) == {f"{embed}_0", f"{embed}_1", ids["kmeans"], f"{assign}_0", f"{assign}_1"}, states
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{log_tails(run)}"

    check_cluster_run(run, expand(demo_shards))
    assert (run / "logs" / f"{embed}_1" / f"{embed}_1_0_log.out").is_file()   # the printed log paths are real


@pytest.mark.slow
def test_cluster_stage_local_then_rerun_skips(tmp_path, demo_shards):
    run = tmp_path / "run"
    res = submit("stage=cluster", "launcher=local", f"run_dir={run}", f"data.shards={demo_shards}", *TINY)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_cluster_run(run, expand(demo_shards))
    summary = res.stdout[res.stdout.index("summary:"):].splitlines()[1:]
    assert [ln.split()[0] for ln in summary] == ["embed", "kmeans", "assign"]

    before = {p: p.stat().st_mtime_ns for p in (run / "embed").iterdir()}
    before[run / "kmeans/centroids.npy"] = (run / "kmeans/centroids.npy").stat().st_mtime_ns
    again = submit("stage=cluster", f"run_dir={run}")   # everything else from RUN/config.yaml
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before   # finished work was skipped, not redone


@pytest.mark.slurm
def test_sbatch_refusal_is_one_clear_error(slurm, tmp_path, demo_shards):
    res = submit("stage=cluster", f"run_dir={tmp_path / 'run'}", f"data.shards={demo_shards}", *TINY, *SLURM,
                 "slurm.partition=no_such_partition")
    assert res.returncode == 2
    assert "error: sbatch refused the embed job" in res.stderr and "partition" in res.stderr
    assert "Traceback" not in res.stderr
