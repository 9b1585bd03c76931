"""Checks made before submitting a cluster-stage job: each failure names the key."""
import json
import shutil

import numpy as np
import pytest
from webdataset import TarWriter

from cluster_job import assign, kmeans
from cluster_job.checks import precheck
from embed_fixtures import write_embedded
from unicom_ds.config import ConfigError, resolve, select


def write_tar(path, n):
    with open(path, "wb") as f:
        sink = TarWriter(f)
        for i in range(n):
            sink.write({"__key__": f"{path.stem}{i:03d}", "jpg": b"x", "txt": "c", "json": "{}"})
        sink.close()


def cfg_for(tmp_path, *extra):
    return select(resolve([f"run_dir={tmp_path / 'run'}", f"data.shards={tmp_path}/{{00000..00001}}.tar",
                           "clip.model=ViT-Tiny-16", "clip.pretrained=random", "kmeans.k=6", *extra]))


@pytest.fixture
def shards(tmp_path):
    for s in ("00000", "00001"):
        write_tar(tmp_path / f"{s}.tar", 3)
    return tmp_path


def test_inputs_ok(shards, capsys):
    """Good inputs pass every stage's checks with nothing to say: no note, no line on stderr (the 6 samples were
    counted from the tar headers, and kmeans.k=6 is exactly as many), and nothing written."""
    before = sorted(p.relative_to(shards) for p in shards.rglob("*"))
    for stage in ("embed", "cluster", "all", "train"):
        assert precheck(cfg_for(shards), stage) == [], stage
    assert capsys.readouterr() == ("", "")
    assert sorted(p.relative_to(shards) for p in shards.rglob("*")) == before  # no run directory, no file
    with pytest.raises(ConfigError, match=r"kmeans.k=7 is larger than the 6 samples"):  # the count was made
        precheck(cfg_for(shards, "kmeans.k=7"), "cluster")


def test_missing_shard_named(shards):
    (shards / "00001.tar").unlink()
    with pytest.raises(ConfigError, match=r"data.shards: 1 of 2 shard\(s\) missing or unreadable: .*00001.tar"):
        precheck(cfg_for(shards), "embed")


def test_model_and_weights_named(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"clip.model=ViT-B-32x: not an open_clip model; did you mean ViT-B-32"):
        precheck(cfg_for(shards, "clip.model=ViT-B-32x"), "embed")
    with pytest.raises(ConfigError, match=r"clip.pretrained=openia: neither a local file nor an open_clip tag"):
        precheck(cfg_for(shards, "clip.model=ViT-B-32", "clip.pretrained=openia"), "embed")
    precheck(cfg_for(shards, "clip.model=ViT-B-32", "clip.pretrained=openai"), "embed")  # a tag: nothing fetched
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    precheck(cfg_for(shards, f"clip.pretrained={weights}"), "embed")


def test_kmeans_init_named(shards):
    with pytest.raises(ConfigError, match=r"kmeans.init=kmeans\+: expected .*afkmc2.*kmeans\+\+.*random"):
        precheck(cfg_for(shards, "kmeans.init=kmeans+"), "cluster")


def test_k_against_samples_in_tars(shards):
    with pytest.raises(ConfigError, match=r"kmeans.k=7 is larger than the 6 samples in data.shards"):
        precheck(cfg_for(shards, "kmeans.k=7"), "cluster")
    precheck(cfg_for(shards, "kmeans.k=7"), "embed")  # embed alone does not need k


def test_k_against_img2dataset_stats(shards):
    for s in ("00000", "00001"):  # img2dataset's stats count more than the (tiny) tars: they are used
        (shards / f"{s}_stats.json").write_text(json.dumps({"successes": 500}))
    precheck(cfg_for(shards, "kmeans.k=1000"), "all")
    with pytest.raises(ConfigError, match=r"kmeans.k=1001 is larger than the 1000 samples"):
        precheck(cfg_for(shards, "kmeans.k=1001"), "all")


def test_kmeans_needs_embedded_points(tmp_path):
    with pytest.raises(ConfigError, match=r"stage=kmeans: no embedded shard"):
        precheck(cfg_for(tmp_path), "kmeans")
    rng = np.random.default_rng(0)
    write_embedded(tmp_path / "run", "00000", rng.standard_normal((4, 8)), rng.standard_normal((4, 8)))
    write_embedded(tmp_path / "run", "00001", rng.standard_normal((1, 8)), rng.standard_normal((1, 8)))
    precheck(cfg_for(tmp_path, "kmeans.k=5"), "kmeans")
    with pytest.raises(ConfigError, match=r"kmeans.k=6 is larger than the 5 embedded rows"):
        precheck(cfg_for(tmp_path), "kmeans")
    with pytest.raises(ConfigError, match=r"clip.model: 'ViT-Tiny-16' there, 'ViT-Tiny-32' now"):
        precheck(cfg_for(tmp_path, "kmeans.k=5", "clip.model=ViT-Tiny-32"), "kmeans")


def test_assign_needs_centroids(tmp_path):
    with pytest.raises(ConfigError, match=r"stage=assign: .*kmeans/summary.json missing"):
        precheck(cfg_for(tmp_path), "assign")


def embedded_run(run, rows=(4, 3)):
    """RUN/embed of the `shards` fixture's two tars (which sit in run's parent folder)."""
    rng = np.random.default_rng(0)
    for stem, n in zip(("00000", "00001"), rows):
        write_embedded(run, stem, rng.standard_normal((n, 8)), rng.standard_normal((n, 8)),
                       shard=str(run.parent / f"{stem}.tar"))


def test_kmeans_of_another_config_refused_before_submission(shards):
    run = shards / "run"
    embedded_run(run)
    kmeans.run_kmeans(cfg_for(shards, "kmeans.k=3", "kmeans.gpu=false"))
    for stage in ("kmeans", "cluster", "all"):
        with pytest.raises(ConfigError) as err:
            precheck(cfg_for(shards, "kmeans.k=4", f"stage={stage}"), stage)
        msg = str(err.value)
        assert f"{run}/kmeans/summary.json was made with a different config (kmeans.k: 3 there, 4 now)" in msg
        assert f"run_dir=NEW_RUN embed.from={run} kmeans.k=4" in msg
        assert f"delete {run}/kmeans and {run}/labels to redo them here" in msg
    precheck(cfg_for(shards, "kmeans.k=3"), "cluster")  # the same config: the finished k-means is reused


def test_labels_of_other_centroids_refused_before_submission(shards):
    run = shards / "run"
    embedded_run(run)
    cfg = cfg_for(shards, "kmeans.k=3", "kmeans.gpu=false", "assign.gpu=false", "report.tensorboard_grids=0")
    kmeans.run_kmeans(cfg)
    assign.assign_shards(cfg, ["00000", "00001"])
    precheck(cfg, "assign")
    np.save(run / "kmeans" / "centroids.npy", np.eye(8, dtype=np.float32)[:3])  # other centroids, same config
    with pytest.raises(ConfigError, match=r"labels holds labels of other centroids .*; or delete .*labels"):
        precheck(cfg, "assign")
    shutil.rmtree(run / "kmeans")   # k-means deleted to redo it, labels forgotten
    with pytest.raises(ConfigError, match=r"labels/centroids.json: .*labels holds labels of centroids that are gone"):
        precheck(cfg, "cluster")


def test_embeddings_of_another_clip_refused_before_submission(shards):
    embedded_run(shards / "run")
    with pytest.raises(ConfigError, match=r"00000.done.json was made with a different config "
                                          r"\(clip.model: 'ViT-Tiny-16' there, 'ViT-Tiny-32' now\); features made another way "
                                          r"cannot be mixed with these: use a new run_dir"):
        precheck(cfg_for(shards, "clip.model=ViT-Tiny-32"), "embed")


def test_embed_from_checked_before_submission(shards):
    old = shards / "old"
    with pytest.raises(ConfigError, match=rf"embed.from={old}: {old}/embed does not exist"):
        precheck(cfg_for(shards, f"embed.from={old}"), "cluster")
    embedded_run(old)
    precheck(cfg_for(shards, f"embed.from={old}"), "cluster")
    precheck(cfg_for(shards, f"embed.from={old}", "kmeans.k=7"), "all")
    with pytest.raises(ConfigError, match=r"kmeans.k=8 is larger than the 7 embedded rows in .*old/embed"):
        precheck(cfg_for(shards, f"embed.from={old}", "kmeans.k=8"), "cluster")
    with pytest.raises(ConfigError, match=r"embed.redo_damaged=true with embed.from=.*redo them there"):
        precheck(cfg_for(shards, f"embed.from={old}", "embed.redo_damaged=true"), "embed")
    (old / "embed" / "00001.done.json").unlink()
    with pytest.raises(ConfigError, match=rf"embed.from={old}: 1 of the 2 shards of data.shards are not embedded "
                                          rf"there \(first: {old}/embed/00001.done.json missing\)"):
        precheck(cfg_for(shards, f"embed.from={old}"), "cluster")
