"""Import stage: our own embeddings of the demo shards, rewritten in clip-retrieval's layout (LAION's metadata
columns, rows shuffled over parts as clip-retrieval's readers interleave tars), imported through the launcher,
cluster exactly as the originals; rows without an image are counted and dropped; mixes are refused."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cluster_job import demo_data, import_embeddings as imp
from slurm import submit
from unicom_ds.atomic import read_json
from unicom_ds.continuation import LabelSource
from unicom_ds import train_data

CLIP = ["clip.model=ViT-Tiny-16", "clip.pretrained=random", "seed=0"]
COMMON = ["launcher=local", "device=cpu", "progress=off", "embed.workers=0", "embed.batch_size=32",
          "kmeans.k=5", "kmeans.niter=5", *CLIP]
# LAION-400M's metadata parquet columns (clip-retrieval's, with img2dataset's enable_metadata fields)
LAION_COLUMNS = ("image_path", "caption", "NSFW", "similarity", "LICENSE", "url", "key", "status",
                 "error_message", "width", "height", "original_width", "original_height", "exif", "md5")


def write_clip_retrieval(folder: Path, img, txt, keys, parts: list[np.ndarray], key_column=True) -> None:
    """clip-retrieval's layout: part N = rows parts[N] (float16 img/text npy, metadata parquet)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for n, rows in enumerate(parts):
        np.save(folder / "img_emb" / f"img_emb_{n}.npy", img[rows])
        np.save(folder / "text_emb" / f"text_emb_{n}.npy", txt[rows])
        k = [keys[i] for i in rows]
        meta = {"image_path": [f"{x[:5]}/{x}.jpg" for x in k], "caption": [f"caption {x}" for x in k],
                "NSFW": ["UNLIKELY"] * len(k), "similarity": np.linspace(0.3, 0.4, len(k)),
                "LICENSE": ["?"] * len(k), "url": [f"http://example.com/{x}.jpg" for x in k], "key": k,
                "status": ["success"] * len(k), "error_message": [None] * len(k),
                "width": [64] * len(k), "height": [64] * len(k), "original_width": [640] * len(k),
                "original_height": [480] * len(k), "exif": ["{}"] * len(k), "md5": ["0" * 32] * len(k)}
        if not key_column:
            meta.pop("key")
        pd.DataFrame(meta).to_parquet(folder / "metadata" / f"metadata_{n}.parquet")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    demo_data.write(root / "shards", shards=3, copies=2, size=64)
    pattern = str(root / "shards" / "{00000..00002}.tar")
    own = root / "own"
    assert submit.main(["stage=cluster", f"run_dir={own}", f"data.shards={pattern}", *COMMON]) == 0
    # The same features as clip-retrieval would have written them, plus rows without an image.
    stems = ["00000", "00001", "00002"]
    img = np.concatenate([np.load(own / "embed" / f"{s}.img.npy") for s in stems])
    txt = np.concatenate([np.load(own / "embed" / f"{s}.txt.npy") for s in stems])
    keys = sum(((own / "embed" / f"{s}.keys.txt").read_text().split() for s in stems), [])
    extra = ["000090000", "000090001", "000009999"]  # a shard not in data.shards; a key its tar lacks
    rng = np.random.default_rng(0)
    img = np.concatenate([img, img[:3]])
    txt = np.concatenate([txt, txt[:3]])
    # 00000 and 00001 interleaved over both parts (merged on import), 00002 whole in part 1 (linked)
    whole = np.flatnonzero([k.startswith("00002") for k in keys])
    split = rng.permutation(np.setdiff1d(np.arange(len(keys) + len(extra)), whole))
    src = root / "laion"
    write_clip_retrieval(src, img, txt, keys + extra, [split[:25], rng.permutation(np.r_[split[25:], whole])])
    imported = root / "imported"
    assert submit.main(["stage=cluster", f"run_dir={imported}", f"data.shards={pattern}", f"embed.source={src}",
                        *COMMON]) == 0
    return {"own": own, "imported": imported, "src": src, "pattern": pattern, "stems": stems, "root": root,
            "n_extra": len(extra)}


def test_imported_run_clusters_exactly_as_own_embedding(runs):
    own, imported = runs["own"], runs["imported"]
    np.testing.assert_array_equal(np.load(own / "kmeans" / "centroids.npy"),
                                  np.load(imported / "kmeans" / "centroids.npy"))
    for s in runs["stems"]:
        assert (imported / "embed" / f"{s}.keys.txt").read_text() == (own / "embed" / f"{s}.keys.txt").read_text()
        for side in ("img", "txt"):
            a, b = np.load(own / "embed" / f"{s}.{side}.npy"), np.load(imported / "embed" / f"{s}.{side}.npy")
            assert b.dtype == np.float16 and np.array_equal(a, b)
        np.testing.assert_array_equal(np.load(own / "labels" / f"{s}.npy"), np.load(imported / "labels" / f"{s}.npy"))
    # the train stage's join sees the same {__key__: class} in both runs
    for s in runs["stems"]:
        assert train_data.read_label_table(LabelSource(imported, imported / "embed"), s) == \
            train_data.read_label_table(LabelSource(own, own / "embed"), s)
    k = read_json(imported / "kmeans" / "summary.json")["k"]
    train_data.check_labels(LabelSource(imported, imported / "embed"), runs["pattern"], k)


def test_rows_without_image_counted_and_dropped_with_source_recorded(runs):
    imported, src = runs["imported"], runs["src"]
    markers = [read_json(p) for p in sorted((imported / "embed" / "parts").glob("*.done.json"))]
    assert sum(m["shard_not_in_data_shards"] for m in markers) == 2
    done = read_json(imported / "embed" / "00000.done.json")
    assert done["skipped"] == {"image_absent": 1}
    assert done["config"]["embed.source"] == str(src) and done["config"]["clip.model"] == "ViT-Tiny-16"
    assert sorted(done["source"]["parts"]) == ["0", "1"] and done["source"]["folder"] == str(src)
    assert "000009999" not in (imported / "embed" / "00000.keys.txt").read_text().split()
    summary = read_json(imported / "labels" / "summary.json")
    assert summary["rows_skipped"] == {"image_absent": 1}
    assert summary["rows"] == read_json(runs["own"] / "labels" / "summary.json")["rows"]
    assert not (imported / "embed" / "00009.done.json").exists()
    assert read_json(imported / "embed" / "00002.done.json")["source"]["parts"] == ["1"]
    assert (imported / "embed" / "00002.img.npy").stat().st_nlink == 2  # the part's fragment, not a copy


def test_mix_with_own_embeddings_refused(runs, capsys):
    own, imported = runs["own"], runs["imported"]
    common = [f"data.shards={runs['pattern']}", *COMMON]
    # importing into a run that embedded its own
    assert submit.main(["stage=cluster", f"run_dir={own}", f"embed.source={runs['src']}", *common]) == 2
    assert "00000.done.json" in capsys.readouterr().err
    # k-means over a directory holding both
    mixed = runs["root"] / "mixed"
    (mixed / "embed").mkdir(parents=True)
    for s, run in (("00000", own), ("00001", imported)):
        for f in (run / "embed").glob(f"{s}.*"):
            shutil.copy(f, mixed / "embed" / f.name)
    assert submit.main(["stage=kmeans", f"run_dir={mixed}", *common]) == 2
    err = capsys.readouterr().err
    assert "00001.done.json" in err and "embed.source" in err


def test_rerun_skips_finished_parts_and_shards(runs, capsys):
    imported = runs["imported"]
    before = {p: p.stat().st_mtime_ns for p in (imported / "embed").rglob("*.done.json")}
    assert submit.main(["stage=cluster", f"run_dir={imported}", *COMMON]) == 0  # config.yaml keeps the source
    assert capsys.readouterr().err.count("import: 1 of 1 part already done") == 2  # one task per part
    assert {p: p.stat().st_mtime_ns for p in (imported / "embed").rglob("*.done.json")} == before


def test_key_rule_image_path_without_key_column(tmp_path):
    assert imp.row_keys(["00042/000420017.jpg", "000420018.jpg"], "image_path") == ["000420017", "000420018"]
    keys = np.asarray(["000010002", "000000001", "000010002", "000020000", "000000000", "000000003"])
    wanted = {"00000": "/d/00000.tar", "00001": "/d/00001.tar"}
    present = {"/d/00000.tar": {"000000000", "000000001"}, "/d/00001.tar": {"000010002"}}
    p = imp.plan_part(keys, 5, wanted, present=present.get)
    assert p.shards == ["00000", "00001"] and p.not_in_shards == 1
    assert p.keys["00000"].tolist() == ["000000000", "000000001"] and p.keys["00001"].tolist() == ["000010002"]
    assert p.skipped == {"00000": {"image_absent": 1}, "00001": {"duplicate_key": 1}}
    # row -> (fragment, row in it): key order within each shard, -1 for every dropped row
    assert p.frag.tolist() == [1, 0, -1, -1, 0, -1] and p.pos[[0, 1, 4]].tolist() == [0, 1, 0]


def test_image_keys_from_img2dataset_parquet_else_tar(tmp_path, runs):
    tar = tmp_path / "00007.tar"
    pd.DataFrame({"key": ["000070000", "000070001"], "status": ["success", "failed_to_download"]}).to_parquet(
        tmp_path / "00007.parquet")
    assert imp.image_keys(str(tar)) == {"000070000"}  # the tar itself is not read
    shard = runs["pattern"].replace("{00000..00002}", "00001")
    assert imp.image_keys(shard) == set((runs["own"] / "embed" / "00001.keys.txt").read_text().split())


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
    np.testing.assert_allclose(np.linalg.norm(out[1].astype(np.float32)), 1, atol=2e-3)
    np.testing.assert_allclose(out[1].astype(np.float32), unit[1].astype(np.float32), atol=2e-3)


def test_bad_source_named_before_anything_runs(tmp_path, capsys, runs):
    src = tmp_path / "laion"
    write_clip_retrieval(src, np.zeros((2, 8), np.float16), np.zeros((3, 8), np.float16)[:2], ["000000000", "x"],
                         [np.arange(2)], key_column=False)
    (src / "text_emb" / "text_emb_0.npy").unlink()
    np.save(src / "text_emb" / "text_emb_0.npy", np.zeros((3, 8), np.float16))
    args = ["stage=cluster", f"run_dir={tmp_path / 'run'}", f"data.shards={runs['pattern']}", f"embed.source={src}",
            *COMMON]
    assert submit.main(args) == 2
    assert "img_emb_0.npy holds 2 rows but" in capsys.readouterr().err
    assert submit.main([*args[:-len(COMMON)], *COMMON, "import.key_column=key"]) == 2
    assert "no key column" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()
