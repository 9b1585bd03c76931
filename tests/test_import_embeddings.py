"""Import stage: replicas of LAION's released embeddings (tests/release_fixtures.py says where each name comes
from) joined to an img2dataset download of the same images with other shard numbers, keys and failed URLs:
labels land on the image whose URL the released row names; duplicates, missing images and bad joins are
counted, refused or named."""
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cluster_job import import_embeddings as imp, release, url_join
from release_fixtures import pairs, sample_urls, unit16, write_download, write_release
from slurm import submit
from unicom_ds.atomic import read_json
from unicom_ds.continuation import LabelSource
from unicom_ds import train_data

D = 64  # ViT-Tiny-16's width
COMMON = ["launcher=local", "device=cpu", "progress=off", "kmeans.k=3", "kmeans.niter=3",
          "clip.model=ViT-Tiny-16", "clip.pretrained=random", "seed=0"]
N, FAILED = 60, {5, 17, 33}


def laion(tmp, layout="laion400m", rows=None, seed=0, nan_row=None):
    """A release of `rows` (LAION's own download: shard 19848 + i // 25, key i % 25), rows interleaved over
    two parts, row `nan_row`'s image features NaN; returns (folder, rows, img, txt)."""
    rows = pairs(N, dup_urls=4) if rows is None else rows
    rng = np.random.default_rng(seed)
    img, txt = unit16(rng, len(rows), D), unit16(rng, len(rows), D)
    if nan_row is not None:
        img[nan_row, 0] = np.nan
    order = rng.permutation(len(rows))
    folder = tmp / layout
    i = np.arange(len(rows))
    write_release(folder, layout, rows, img, txt, [order[:27], order[27:]], 19848 + i // 25, i % 25)
    return folder, rows, img, txt


def input_rows():
    """LAION's input: 4 URLs repeated with other captions (rows 56-59), and row 10 repeated exactly (row 55)."""
    rows = pairs(N, dup_urls=4)
    rows.iloc[55] = rows.iloc[10]
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import")
    rows = input_rows()
    src, rows, img, txt = laion(tmp, rows=rows, nan_row=20)  # row 20: the re-download's 00001, row 4
    # the user's re-download: 16 rows a shard (not LAION's 25), numbered from 0, three URLs failed
    tars = write_download(tmp / "download", rows, per_shard=16, failed=FAILED)
    pattern = str(tmp / "download" / "{00000..00003}.tar")
    run = tmp / "run"
    assert submit.main(["stage=cluster", f"run_dir={run}", f"data.shards={pattern}", f"embed.source={src}",
                        *COMMON]) == 0
    return {"tmp": tmp, "src": src, "rows": rows, "img": img, "txt": txt, "tars": tars, "pattern": pattern, "run": run}


def test_labels_land_on_the_image_whose_url_the_row_names(world):
    """Every embedded row of a shard: the URL in its sample's .json names the released row whose features it holds."""
    run, rows = world["run"], world["rows"]
    by_url_caption = {(u, c): i for i, (u, c) in enumerate(zip(rows.url, rows.caption))}
    seen = 0
    for tar in world["tars"]:
        s = tar.rsplit("/", 1)[1][:5]
        keys = (run / "embed" / f"{s}.keys.txt").read_text().split()
        urls = sample_urls(tar)
        captions = {k: rows.caption[rows.url == u].tolist() for k, u in urls.items()}
        img, txt = np.load(run / "embed" / f"{s}.img.npy"), np.load(run / "embed" / f"{s}.txt.npy")
        labels = np.load(run / "labels" / f"{s}.npy")
        assert len(labels) == len(keys) == len(img)
        for j, k in enumerate(keys):
            hits = [by_url_caption[(urls[k], c)] for c in captions[k]]
            assert any(np.array_equal(img[j], world["img"][i]) and np.array_equal(txt[j], world["txt"][i])
                       for i in hits), (s, k)
            seen += 1
    # all but: 3 failed downloads, row 10 and its exact repeat (ambiguous), row 20 (NaN features)
    assert seen == N - len(FAILED) - 2 - 1
    for tar in world["tars"]:  # the train stage's join reads them by __key__
        s = tar.rsplit("/", 1)[1][:5]
        assert len(train_data.read_label_table(LabelSource(run, run / "embed"), s)) > 0


def test_duplicates_and_missing_rows_counted(world):
    summary = read_json(world["run"] / "embed" / "parts" / "join.json")
    assert summary["on"] == ["match", "caption"]  # both sides have captions: repeated URLs still join
    assert summary["rows"] == N and summary["joined"] == N - 5
    assert summary["skipped"] == {"duplicate_url": 2, "not_in_download": 3}
    done = read_json(world["run"] / "embed" / "00000.done.json")
    assert done["source"]["join"] == "url" and done["config"]["embed.source"] == str(world["src"])
    assert done["skipped"] == {} and read_json(world["run"] / "embed" / "00001.done.json")["skipped"] == \
        {"nonfinite_feature": 1}
    assert "000010004" not in (world["run"] / "embed" / "00001.keys.txt").read_text().split()
    assert read_json(world["run"] / "labels" / "summary.json")["rows_skipped"] == {"nonfinite_feature": 1}


def test_join_bucket_rule():
    rel = pa.table({"match": ["a", "a", "b", "c", "d"], "caption": ["x", "y", "z", "z", "w"],
                    "part": pa.array([0, 0, 0, 1, 1], pa.int32()), "row": pa.array([0, 1, 2, 0, 1], pa.int64())})
    dl = pa.table({"match": ["a", "a", "b", "c", "c"], "caption": ["y", "x", "z", "z", "z"],
                   "key": ["k1", "k2", "k3", "k4", "k5"], "shard": pa.array([0, 0, 1, 1, 1], pa.int32())})
    joined, skipped = url_join.join_bucket(rel, dl, ["match", "caption"])
    got = sorted(zip(*(joined.column(c).to_pylist() for c in ("part", "row", "key"))))
    assert got == [(0, 0, "k2"), (0, 1, "k1"), (0, 2, "k3")]  # a by caption; c twice in the download: dropped
    assert skipped == {"duplicate_url": 1, "not_in_download": 1}
    joined, skipped = url_join.join_bucket(rel, dl, ["match"])  # without captions "a" is ambiguous
    assert sorted(joined.column("key").to_pylist()) == ["k3"] and skipped == {"duplicate_url": 3, "not_in_download": 1}


@pytest.mark.parametrize("layout", ["clip_retrieval", "laion5b"])
def test_other_layouts_detected_and_joined(tmp_path, layout, world):
    src, _, _, _ = laion(tmp_path, layout=layout, rows=world["rows"])
    rel = release.Release(str(src))
    assert [p.name for p in rel.parts] == [str(i).zfill(release_pad(layout)) for i in range(2)]
    meta = {"clip_retrieval": "metadata", "laion5b": "laion2B-en-metadata"}[layout]
    assert release.describe(rel.folders) == f"img img_emb/, text text_emb/, metadata {meta}/"
    run = tmp_path / "run"
    assert submit.main(["stage=embed", f"run_dir={run}", f"data.shards={world['pattern']}", f"embed.source={src}",
                        *COMMON]) == 0
    for s in ("00000", "00003"):
        for suffix in ("keys.txt", "img.npy"):
            name = f"{s}.{suffix}"
            assert (run / "embed" / name).read_bytes() == (world["run"] / "embed" / name).read_bytes()


def release_pad(layout):
    return {"clip_retrieval": 1, "laion5b": 4}[layout]


def test_folders_named_by_the_user(tmp_path, world, capsys):
    src, _, _, _ = laion(tmp_path, rows=world["rows"])
    (src / "images").rename(src / "vit_b32_image")
    (src / "texts").rename(src / "vit_b32_text")
    (src / "metadata").rename(src / "meta")
    shutil.copytree(src / "vit_b32_image", src / "vit_l14_image")  # two CLIPs' features side by side
    args = ["stage=embed", f"run_dir={tmp_path / 'run'}", f"data.shards={world['pattern']}", f"embed.source={src}",
            *COMMON]
    assert submit.main(args) == 2
    assert "no img folder" in capsys.readouterr().err  # two hold img_emb_N.npy: not guessed
    assert submit.main([*args, "import.folders.img=vit_b32_image", "import.folders.text=vit_b32_text",
                        "import.folders.metadata=meta"]) == 0
    assert "img vit_b32_image/, text vit_b32_text/, metadata meta/" in capsys.readouterr().err


def test_laions_own_download_by_shard_id_and_key(tmp_path, world):
    """LAION's own download: tars named by shard_id, keys as image_path; key=33 matches `000000033`."""
    rows = world["rows"]
    src, _, img, _ = laion(tmp_path, rows=rows)
    tars = []
    for shard in (19848, 19849, 19850):
        members = [i for i in range(N) if 19848 + i // 25 == shard]
        sub = rows.iloc[members].reset_index(drop=True)
        tars += write_download(tmp_path / "own", sub, per_shard=len(sub), failed=set(), first_shard=shard,
                               parquet=False)
    for t, shard in zip(tars, (19848, 19849, 19850)):  # LAION's keys: the row in its shard, 9 digits
        renamed = tmp_path / "own" / f"{shard}.tar.tmp"
        _rekey(t, renamed)
    pattern = str(tmp_path / "own" / "{19848..19850}.tar")
    for join in ("key", "image_path"):
        run = tmp_path / f"run_{join}"
        assert submit.main(["stage=embed", f"run_dir={run}", f"data.shards={pattern}", f"embed.source={src}",
                            f"import.key_column={join}", *COMMON]) == 0
        keys = (run / "embed" / "19849.keys.txt").read_text().split()
        assert keys[:2] == ["000000000", "000000001"]
        np.testing.assert_array_equal(np.load(run / "embed" / "19849.img.npy")[1], img[26])
        assert read_json(run / "embed" / "parts" / "join.json")["joined"] == N


def _rekey(tar, tmp):
    """Rename a tar's samples to LAION's own keys: the row in the shard, 9 digits."""
    import tarfile

    with tarfile.open(tar) as src, tarfile.open(tmp, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            base, ext = m.name.split(".", 1)
            m.name = f"{int(base[-4:]):09d}.{ext}"
            dst.addfile(m, __import__("io").BytesIO(data))
    shutil.move(tmp, tar)


def test_join_below_threshold_refused_before_kmeans(tmp_path, world, capsys):
    other = pairs(N).assign(url=lambda t: t.url.str.replace("example.org", "elsewhere.net"))
    tars = write_download(tmp_path / "other", pd.concat([world["rows"].iloc[:20], other.iloc[20:]]), per_shard=30,
                          failed=set())
    run = tmp_path / "run"
    args = ["stage=cluster", f"run_dir={run}", f"data.shards={tmp_path / 'other'}/{{00000..00001}}.tar",
            f"embed.source={world['src']}", *COMMON]
    assert submit.main(args) == 2  # refused in one line by the import's first step; nothing of it kept
    assert re.search(r"only 19 of 60 released rows \(31\.7%\) joined.*below import\.min_join=0\.5; likely "
                     r"data.shards is another download or another subset", capsys.readouterr().err)
    assert not list((run / "embed").glob("*.done.json")) and not (run / "kmeans").exists()
    assert not (run / "config.yaml").exists() and not (run / "embed" / "parts").exists()
    assert len(tars) == 2
    # the join on keys of a re-download: LAION's shard ids are not the download's
    assert submit.main(["stage=cluster", f"run_dir={tmp_path / 'run_key'}", f"data.shards={world['pattern']}",
                        f"embed.source={world['src']}", "import.key_column=key", *COMMON]) == 2
    assert re.search(r"only 0 of 60 .*import.key_column=key.*not LAION's own download", capsys.readouterr().err)


@pytest.mark.slurm
def test_join_refused_on_slurm_leaves_the_run_as_before(slurm, tmp_path, world):
    """On SLURM, RUN/config.yaml was saved at submission; the import job that refuses the join (long after)
    takes it back, with its scratch: the refused command leaves no trace outside the logs."""
    from test_slurm_cluster_stage import SLURM, job_states, log_tails, submit as sbatch, wait_for

    other = pairs(N).assign(url=lambda t: t.url.str.replace("example.org", "elsewhere.net"))
    write_download(tmp_path / "other", pd.concat([world["rows"].iloc[:20], other.iloc[20:]]), per_shard=30,
                   failed=set())
    run = tmp_path / "run"
    res = sbatch("stage=cluster", f"run_dir={run}", f"data.shards={tmp_path / 'other'}/{{00000..00001}}.tar",
                 f"embed.source={world['src']}", *COMMON, *SLURM)
    assert res.returncode == 0, res.stderr
    assert (run / "config.yaml").is_file()  # saved at submission: the join is not known yet
    ids = {m.group(1): m.group(2) for m in (re.match(r"(\w+): job (\d+)", ln) for ln in res.stdout.splitlines())
           if m}
    assert list(ids) == ["import", "kmeans", "assign"], res.stdout
    states = wait_for([ids["import"]])
    later = job_states([ids["kmeans"], ids["assign"]])
    __import__("subprocess").run(["scancel", ids["kmeans"], ids["assign"]])  # afterok never holds: they wait
    assert "FAILED" in states.values(), f"{states}\n{log_tails(run)}"
    assert set(later.values()) == {"PENDING"}, later
    assert "below import.min_join=0.5" in log_tails(run)
    assert sorted(p.name for p in run.iterdir()) == ["logs"], log_tails(run)  # no config.yaml, no embed/parts


def test_rows_without_finite_features_count_as_not_joined(tmp_path, capsys):
    """A part of NaN features: its rows join by URL, but the share checked is the rows that join *and* are
    finite (issue 29: 55 of 60 joined passed import.min_join, then k-means ran on 42 % of the data). The refused
    import leaves no scratch in the run."""
    rows = pairs(N)
    rng = np.random.default_rng(1)
    img, txt = unit16(rng, N, D), unit16(rng, N, D)
    img[:35] = np.nan  # part 0: rows 0..34, every one NaN
    i = np.arange(N)
    write_release(tmp_path / "src", "laion400m", rows, img, txt, [i[:35], i[35:]], 19848 + i // 25, i % 25)
    write_download(tmp_path / "dl", rows, per_shard=30, failed=set())
    run = tmp_path / "run"
    assert submit.main(["stage=cluster", f"run_dir={run}", f"data.shards={tmp_path / 'dl'}/{{00000..00001}}.tar",
                        f"embed.source={tmp_path / 'src'}", *COMMON]) == 2
    err = capsys.readouterr().err
    assert ("import: only 25 of 60 released rows (41.7%) joined an image of data.shards=" in err
            and "with finite features (35 more joined, with NaN, inf or zero features: damaged release files?), "
                "below import.min_join=0.5" in err), err
    assert not (run / "embed" / "parts").exists() and not list((run / "embed").glob("*.done.json"))
    assert sorted(p.name for p in run.iterdir()) == ["logs"]  # no config.yaml, no embed/parts, no kmeans
    assert "Traceback" not in err


def test_rerun_skips_finished_work(world, capsys):
    run = world["run"]
    before = {p: p.stat().st_mtime_ns for p in (run / "embed").rglob("*.done.json")}
    assert submit.main(["stage=cluster", f"run_dir={run}", *COMMON]) == 0  # config.yaml keeps the source
    err = capsys.readouterr().err
    assert err.count("import: 1 of 1 part already done") == 2  # one task per part
    assert err.count("every part was done before") == 1  # the other task finishes
    assert {p: p.stat().st_mtime_ns for p in (run / "embed").rglob("*.done.json")} == before
    # a shard lost after the parts were done (the finishing task killed): the rerun writes it again, alone
    img = (run / "embed" / "00001.img.npy").read_bytes()
    for f in ("00001.img.npy", "00001.done.json"):
        (run / "embed" / f).unlink()
    assert submit.main(["stage=embed", f"run_dir={run}", *COMMON]) == 0
    assert (run / "embed" / "00001.img.npy").read_bytes() == img
    after = {p: p.stat().st_mtime_ns for p in (run / "embed").rglob("*.done.json")}
    assert [p.name for p in after if after[p] != before.get(p)] == ["00001.done.json"]


def test_bad_source_named_before_anything_runs(tmp_path, world, capsys):
    src, _, _, _ = laion(tmp_path, rows=world["rows"])
    args = ["stage=cluster", f"run_dir={tmp_path / 'run'}", f"data.shards={world['pattern']}", f"embed.source={src}",
            *COMMON]
    (src / "metadata" / "metadata_1.parquet").unlink()
    assert submit.main(args) == 2
    err = capsys.readouterr().err
    assert "metadata_1.parquet missing from metadata/" in err and "img_emb_1.npy" in err
    shutil.rmtree(src)
    src, _, _, _ = laion(tmp_path, layout="clip_retrieval", rows=world["rows"])  # no shard_id column
    assert submit.main([*args[:3], f"embed.source={src}", *COMMON, "import.key_column=key"]) == 2
    assert "has no shard_id column" in capsys.readouterr().err
    np.save(src / "text_emb" / "text_emb_1.npy", np.zeros((3, D), np.float16))
    assert submit.main([*args[:3], f"embed.source={src}", *COMMON]) == 2
    assert "img_emb_1.npy holds 33 rows but text_emb_1.npy 3" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_unit_rows_keeps_unit_rows_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    unit = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    raw = unit.astype(np.float32)
    raw[1] *= 3.0          # not normalised
    raw[2, 0] = np.nan
    raw[3] = 0
    out, bad = imp.unit_rows(raw)
    assert bad.tolist() == [False, False, True, True, False, False]
    assert np.array_equal(out[[0, 4, 5]], unit[[0, 4, 5]])
    np.testing.assert_allclose(out[1].astype(np.float32), unit[1].astype(np.float32), atol=2e-3)


def test_download_table_from_parquet_else_json(tmp_path, world):
    rows = world["rows"].iloc[:6]
    with_table = write_download(tmp_path / "a", rows, per_shard=6, failed={2})[0]
    without = write_download(tmp_path / "b", rows, per_shard=6, failed={2}, parquet=False)[0]
    a, b = url_join.download_table(with_table, "url"), url_join.download_table(without, "url")
    assert a.to_pydict() == b.to_pydict() and a.num_rows == 5
    assert "http://img2.example.org/p/2.jpg" not in a["match"].to_pylist()  # the failed download


def test_key_column_auto_of_older_runs_joins_by_url(tmp_path):
    """RUN/config.yaml of runs made before the URL join holds import.key_column=auto: it still resolves, as url."""
    from unicom_ds.config import resolve

    (tmp_path / "config.yaml").write_text("import:\n  key_column: auto\n")
    assert imp.join_of(resolve([f"run_dir={tmp_path}"])) == "url"
    assert imp.join_of(resolve([f"run_dir={tmp_path / 'new'}"])) == "url"
