"""Fault injection into the cluster stage (issue 14, items 5-7): real truncated tars, NaN rows written
into RUN/embed files, NaN features out of a real (poisoned) CLIP model, refused reruns through the real
launcher. Only the I/O error itself (EIO) is simulated: nothing else can make a read fail on demand."""
import errno
import json
import os
import shlex

import numpy as np
import pytest
import torch

from cluster_job import assign, embed, features, kmeans, wds_reader
from embed_fixtures import good, member_offsets, write_embedded, write_tar
from slurm import submit
from unicom_ds.atomic import read_json
from unicom_ds.config import resolve, select

torch.set_num_threads(1)
TINY = ["clip.model=ViT-Tiny-16", "clip.pretrained=random", "embed.batch_size=2", "embed.workers=0", "device=cpu",
        "progress=off", "kmeans.gpu=false", "assign.gpu=false", "kmeans.niter=5"]


def cfg_for(run_dir, *extra):
    return select(resolve([f"run_dir={run_dir}", *TINY, *extra]))


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(wds_reader, "RETRY_BACKOFF_S", 0.01)


# ---- item 5: non-finite features --------------------------------------------------------------

def test_nonfinite_features_are_skipped_not_written(tmp_path, monkeypatch):
    """A real model whose embedding of one word is NaN: captions with that word give NaN text features."""
    model, preprocess, tokenizer = embed.load_clip("ViT-Tiny-16", "random", torch.device("cpu"), seed=0)
    poison = int(tokenizer(["zebra"])[0][1])  # [start-of-text, zebra, end-of-text, 0...]
    with torch.no_grad():
        model.token_embedding.weight[poison] = float("nan")
    monkeypatch.setattr(embed, "load_clip", lambda *a, **k: (model, preprocess, tokenizer))
    samples = [good(i) for i in range(6)]
    for i in (1, 4):
        samples[i]["txt"] = f"a zebra number {i}"
    path = write_tar(tmp_path / "00000.tar", samples)
    [done] = embed.embed_shards(cfg_for(tmp_path / "run"), [path])
    assert done["n"] == 4 and done["skipped"] == {"nonfinite_feature": 2} and done["damaged"] is None
    out = tmp_path / "run" / "embed"
    assert (out / "00000.keys.txt").read_text().split() == ["k000", "k002", "k003", "k005"]
    for side in ("img", "txt"):
        feats = np.load(out / f"00000.{side}.npy")
        assert feats.shape == (4, 64) and np.isfinite(feats).all()


def nan_rows(run_dir, stem, side, rows):
    """Overwrite rows of a stored feature file with NaN, as a foreign writer or bad disk would."""
    path = run_dir / "embed" / f"{stem}.{side}.npy"
    x = np.load(path)
    x[rows] = np.nan
    np.save(path, x)


def two_shards(run_dir):
    rng = np.random.default_rng(0)
    for s in ("00000", "00001"):
        write_embedded(run_dir, s, rng.standard_normal((12, 8)), rng.standard_normal((12, 8)))


def test_kmeans_names_the_file_with_nonfinite_rows(tmp_path):
    two_shards(tmp_path)
    nan_rows(tmp_path, "00001", "img", [3, 7])
    with pytest.raises(features.NonFiniteFeatures, match=r"embed/00001\.img\.npy: 2 of the rows read hold NaN "
                                                          r"or inf \(first: row 3\)"):
        kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=4"))
    assert not (tmp_path / "kmeans").exists()


def test_assign_never_writes_labels_for_nonfinite_rows(tmp_path):
    two_shards(tmp_path)
    kmeans.run_kmeans(cfg_for(tmp_path, "kmeans.k=4"))
    good_txt = np.load(tmp_path / "embed" / "00001.txt.npy")
    nan_rows(tmp_path, "00001", "txt", [11])
    cfg = cfg_for(tmp_path, "kmeans.k=4", "assign.batch_size=5")
    with pytest.raises(features.NonFiniteFeatures, match=r"00001\.txt\.npy: 1 of the rows read .*first: row 11"):
        assign.assign_shards(cfg, ["00000", "00001"])
    assert (tmp_path / "labels" / "00000.npy").is_file()       # the finite shard is labelled
    assert not (tmp_path / "labels" / "00001.npy").exists()    # no -1, no marker: a rerun will label it
    np.save(tmp_path / "embed" / "00001.txt.npy", good_txt)  # the file repaired, the rerun labels the shard
    summary = assign.assign_shards(cfg, ["00001"])
    labels = np.load(tmp_path / "labels" / "00001.npy")
    assert labels.min() >= 0 and len(labels) == 12 and summary["rows"] == 24


# ---- item 6: damaged shards ------------------------------------------------------------------

def truncated(tmp_path, stem, n, cut_in, successes=None):
    """A real tar of n good rows cut inside member `cut_in`; with img2dataset's _stats.json if given."""
    path = write_tar(tmp_path / f"{stem}.tar", [good(i) for i in range(n)])
    full = open(path, "rb").read()
    _, data_at = member_offsets(path)[cut_in]
    with open(path, "r+b") as f:
        f.truncate(data_at + 100)
    if successes is not None:
        (tmp_path / f"{stem}_stats.json").write_text(json.dumps({"successes": successes}))
    return path, full


def test_damaged_shard_recorded_task_fails_rerun_goes_on_and_redo_reads_exactly_it(tmp_path, capfd):
    run = tmp_path / "run"
    clean = write_tar(tmp_path / "00000.tar", [good(i) for i in range(4)])
    bad, full = truncated(tmp_path, "00001", 5, "k003.jpg", successes=5)
    cfg = cfg_for(run, f"data.shards={tmp_path}/{{00000..00001}}.tar", "kmeans.k=3")

    with pytest.raises(embed.DamagedShards, match=r"1 damaged shard \(00001\), 3 rows kept, 2 rows lost: "
                                                  r"00001: ReadError.*embed\.redo_damaged=true"):
        embed.embed_shards(cfg, [clean, bad])
    done = read_json(run / "embed" / "00001.done.json")
    assert done["n"] == 3 and done["damaged"]["rows_kept"] == 3 and done["damaged"]["rows_lost"] == 2
    assert "unexpected end of data" in done["damaged"]["reason"]
    assert read_json(run / "embed" / "00000.done.json")["damaged"] is None   # the task finished its other shard

    assert embed.embed_shards(cfg, [clean, bad]) == []    # rerun as is: goes on with the rows kept, says so
    assert "going on with 1 damaged shard (00001), 3 rows kept, 2 rows lost" in capfd.readouterr().err
    kmeans.run_kmeans(cfg)
    summary = assign.assign_shards(cfg, ["00000", "00001"])
    assert summary["rows"] == 7
    assert summary["damaged_shards"] == [{"shard": "00001", "reason": done["damaged"]["reason"],
                                          "rows_kept": 3, "rows_lost": 2}]
    assert read_json(run / "labels" / "summary.json")["damaged_shards"] == summary["damaged_shards"]

    with open(bad, "wb") as f:  # the shard is whole again (copied anew from its source)
        f.write(full)
    clean_marker = os.stat(run / "embed" / "00000.done.json").st_mtime_ns
    redo = cfg_for(run, f"data.shards={tmp_path}/{{00000..00001}}.tar", "kmeans.k=3", "embed.redo_damaged=true")
    [again] = embed.embed_shards(redo, [clean, bad])
    assert again["n"] == 5 and again["damaged"] is None
    assert os.stat(run / "embed" / "00000.done.json").st_mtime_ns == clean_marker  # exactly the damaged shard
    summary = assign.assign_shards(cfg, ["00000", "00001"])    # the stale labels of 00001 are redone
    assert len(np.load(run / "labels" / "00001.npy")) == 5
    assert summary["rows"] == 9 and summary["damaged_shards"] == []


class FlakyFile:
    """A real file whose reads fail with EIO when they reach byte `at`, `times` times (None: always)."""

    def __init__(self, path, at, times):
        self.f, self.at, self.left = open(path, "rb"), at, times

    def read(self, size=-1):
        pos = self.f.tell()
        end = pos + (size if size >= 0 else 1 << 62)
        if pos <= self.at < end and (self.left is None or self.left > 0):
            if self.left is not None:
                self.left -= 1
            self.f.read(min(size, 7) if size >= 0 else 7)  # a failed read may leave the position moved
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.f.read(size)

    def __getattr__(self, name):
        return getattr(self.f, name)


def flaky(monkeypatch, path, member, times):
    at = member_offsets(path)[member][1] + 10
    real = wds_reader._open_raw
    monkeypatch.setattr(wds_reader, "_open_raw", lambda p: FlakyFile(p, at, times) if p == path else real(p))


def test_transient_read_error_is_retried(tmp_path, monkeypatch, capfd):
    path = write_tar(tmp_path / "00000.tar", [good(i) for i in range(5)])
    flaky(monkeypatch, path, "k002.jpg", times=2)
    [done] = embed.embed_shards(cfg_for(tmp_path / "run"), [path])
    assert done["n"] == 5 and done["damaged"] is None
    err = capfd.readouterr().err
    assert "Input/output error; retry 1/3" in err and "retry 2/3" in err and "retry 3/3" not in err
    ref = tmp_path / "ref"  # the same shard read without faults gives the same rows
    monkeypatch.undo()
    embed.embed_shards(cfg_for(ref), [path])
    for name in ("00000.img.npy", "00000.keys.txt"):
        assert (tmp_path / "run" / "embed" / name).read_bytes() == (ref / "embed" / name).read_bytes()


def test_persistent_read_error_is_damage(tmp_path, monkeypatch):
    path = write_tar(tmp_path / "00000.tar", [good(i) for i in range(5)])
    flaky(monkeypatch, path, "k002.jpg", times=None)
    with pytest.raises(embed.DamagedShards, match=r"1 damaged shard \(00000\), \d rows? kept, 0 rows lost "
                                                  r"\(\+ unknown in 1\): 00000: OSError: \[Errno 5\]"):
        embed.embed_shards(cfg_for(tmp_path / "run"), [path])
    done = read_json(tmp_path / "run" / "embed" / "00000.done.json")
    keys = (tmp_path / "run" / "embed" / "00000.keys.txt").read_text().split()
    # tarfile reads 10 KB records: the rows wholly in the records before the failing one are kept
    assert 1 <= len(keys) <= 2 and keys == ["k000", "k001"][:len(keys)]
    assert done["n"] == done["damaged"]["rows_kept"] == len(keys) and done["damaged"]["rows_lost"] is None


# ---- item 7: a refused rerun leaves the run as it was; embed.from reuses the embeddings ------------

def test_refused_rerun_keeps_config_and_its_way_on_reuses_embeddings(tmp_path, capsys):
    for s in ("00000", "00001"):
        write_tar(tmp_path / f"{s}.tar", [good(i) for i in range(6)])
    run, new = tmp_path / "run", tmp_path / "new"
    base = [f"data.shards={tmp_path}/{{00000..00001}}.tar", "launcher=local", *TINY]
    assert submit.main(["stage=cluster", f"run_dir={run}", "kmeans.k=3", *base]) == 0
    saved = (run / "config.yaml").read_bytes()
    capsys.readouterr()

    assert submit.main(["stage=kmeans", f"run_dir={run}", "kmeans.k=4"]) == 2
    err = capsys.readouterr().err
    assert f"{run}/kmeans/summary.json was made with a different config (kmeans.k: 3 there, 4 now)" in err
    assert (run / "config.yaml").read_bytes() == saved       # not poisoned: nothing was written
    assert submit.main(["stage=cluster", f"run_dir={run}"]) == 0   # the plain rerun still works
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and "logs" not in p.parts}

    way_on = err[err.index("python slurm/submit.py"):].split(";")[0]
    assert f"embed.from={run}" in way_on and "kmeans.k=4" in way_on
    argv = [a.replace("NEW_RUN", str(new)) for a in shlex.split(way_on)[2:]]
    assert submit.main(argv) == 0, capsys.readouterr().err
    assert not (new / "embed").exists()                       # read in place, nothing copied
    assert read_json(new / "kmeans" / "summary.json")["k"] == 4
    assert read_json(new / "kmeans" / "summary.json")["embeddings"] == str(run / "embed")
    keys = (run / "embed" / "00001.keys.txt").read_text().split()
    assert len(np.load(new / "labels" / "00001.npy")) == len(keys) == 6
    assert read_json(new / "labels" / "summary.json")["rows"] == 12
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before                                    # the old run is untouched
