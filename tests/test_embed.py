"""Embed stage on small hand-made webdataset tars: features vs the model, bad rows, truncated tars, reruns."""
import io
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cluster_job import embed
from embed_fixtures import good, jpeg, member_offsets, write_tar
from cluster_job.wds_reader import TarSamples, rows
from unicom_ds.arrays import torch_device
from unicom_ds.atomic import read_json
from unicom_ds.config import ConfigError, as_config, resolve, select
from unicom_ds.tblog import read_scalars

torch.set_num_threads(1)


def cfg_for(tmp_path, *extra):
    return select(resolve([f"run_dir={tmp_path / 'run'}", "clip.model=ViT-Tiny-16", "clip.pretrained=random",
                           "embed.batch_size=2", "embed.workers=0", "device=cpu", "progress=off", *extra]))


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return embed.load_clip("ViT-Tiny-16", "random", torch.device("cpu"))


def test_features_match_model_rows_in_tar_order(tmp_path, clip):
    model, preprocess, tokenizer = clip
    path = write_tar(tmp_path / "00000.tar", [good(i) for i in range(7)])
    cfg = as_config(cfg_for(tmp_path, "embed.workers=2"))  # 4 batches over 2 decode workers
    done = embed.embed_shard(cfg, path, model, preprocess, tokenizer, torch.device("cpu"))
    out = tmp_path / "run" / "embed"
    keys = (out / "00000.keys.txt").read_text().split("\n")
    assert keys == [f"k{i:03d}" for i in range(7)] + [""]
    img, txt = np.load(out / "00000.img.npy"), np.load(out / "00000.txt.npy")
    assert img.dtype == txt.dtype == np.float16 and img.shape == txt.shape == (7, 64)
    with torch.no_grad():  # reference: each row computed on its own, straight from the sample
        ref_img = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(jpeg(i))).convert("RGB"))
                                                  for i in range(7)]))
        ref_txt = model.encode_text(tokenizer([f"caption number {i}" for i in range(7)]))
    ref_img = (ref_img / ref_img.norm(dim=-1, keepdim=True)).numpy()
    ref_txt = (ref_txt / ref_txt.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(img.astype(np.float32), ref_img, atol=2e-3)
    np.testing.assert_allclose(txt.astype(np.float32), ref_txt, atol=2e-3)
    assert done == read_json(out / "00000.done.json")
    assert done["n"] == 7 and done["skipped"] == {} and done["damaged"] is None
    assert done["config"] == {"clip.model": "ViT-Tiny-16", "clip.pretrained": "random", "seed": 0, "data.shard": path}


def test_bad_rows_skipped_and_counted(tmp_path, clip):
    samples = [good(0),
               {"__key__": "corrupt", "jpg": b"\xff\xd8 not a jpeg", "txt": "broken"},
               {"__key__": "nocap", "jpg": jpeg(1)},
               {"__key__": "emptycap", "png": jpeg(2), "txt": "   "},
               {"__key__": "noimg", "txt": "caption without image", "json": "{}"},
               good(0),  # the same key again, not adjacent: a second row would break the join by key
               good(3)]
    path = write_tar(tmp_path / "00001.tar", samples)
    done = embed.embed_shard(as_config(cfg_for(tmp_path)), path, *clip, torch.device("cpu"))
    assert done["n"] == 2 and done["damaged"] is None
    assert done["skipped"] == {"corrupt_image": 1, "missing_caption": 2, "missing_image": 1, "duplicate_key": 1}
    assert (tmp_path / "run" / "embed" / "00001.keys.txt").read_text() == "k000\nk003\n"
    assert np.load(tmp_path / "run" / "embed" / "00001.img.npy").shape == (2, 64)


def test_truncated_tar_keeps_rows_before_fault(tmp_path, clip):
    path = write_tar(tmp_path / "00002.tar", [good(i) for i in range(5)])
    _, data_at = member_offsets(path)["k003.jpg"]
    with open(path, "r+b") as f:
        f.truncate(data_at + 100)  # inside k003's image
    done = embed.embed_shard(as_config(cfg_for(tmp_path)), path, *clip, torch.device("cpu"))
    assert done["n"] == 3
    assert "ReadError" in done["damaged"]["reason"] and "unexpected end of data" in done["damaged"]["reason"]
    assert done["damaged"]["rows_kept"] == 3 and done["damaged"]["rows_lost"] is None  # no _stats.json: unknown
    assert (tmp_path / "run" / "embed" / "00002.keys.txt").read_text() == "k000\nk001\nk002\n"


def test_tar_cut_at_a_header_is_reported(tmp_path):
    path = write_tar(tmp_path / "x.tar", [good(i) for i in range(3)])
    header_at, _ = member_offsets(path)["k002.jpg"]
    with open(path, "r+b") as f:
        f.truncate(header_at)  # Python's tarfile ends quietly here
    samples = TarSamples(path)
    got = list(rows(samples))
    assert [r[0] for r in got] == ["k000", "k001"] and all(r[3] is None for r in got)
    assert "no end-of-archive marker" in samples.fault

    path = write_tar(tmp_path / "y.tar", [good(i) for i in range(3)])
    txt_at, _ = member_offsets(path)["k002.txt"]
    with open(path, "r+b") as f:
        f.truncate(txt_at + 100)  # inside the header of k002's caption: the row is cut, its caption not missing
    samples = TarSamples(path)
    assert [r[3] for r in rows(samples)] == [None, None, "truncated"] and samples.fault


def test_rerun_skips_and_config_change_refused(tmp_path, capfd):
    path = write_tar(tmp_path / "00003.tar", [good(i) for i in range(3)])
    cfg = cfg_for(tmp_path)
    [done] = embed.embed_shards(cfg, [path])
    assert done["n"] == 3
    assert "randomly initialised" in capfd.readouterr().err
    marker = tmp_path / "run" / "embed" / "00003.done.json"
    before = os.stat(marker).st_mtime_ns
    assert embed.embed_shards(cfg, [path]) == []
    assert os.stat(marker).st_mtime_ns == before
    with pytest.raises(ConfigError, match=r"00003.done.json.*clip\.model: 'ViT-Tiny-16' there, 'ViT-Tiny-32' now"):
        embed.embed_shards(cfg_for(tmp_path, "clip.model=ViT-Tiny-32"), [path])


def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("auto").type == "cuda"
    assert torch_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("auto").type == "cpu"


def test_random_weights_seeded_from_seed(tmp_path):
    """clip.pretrained=random draws its weights from `seed`: two runs (or two tasks) embed alike."""
    path = write_tar(tmp_path / "00000.tar", [good(i) for i in range(3)])
    for i, (name, seed) in enumerate((("a", 0), ("b", 0), ("c", 1))):
        torch.manual_seed(100 + i)  # whatever the global RNG holds must not matter
        embed.embed_shards(cfg_for(tmp_path / name, f"seed={seed}"), [path])
    feats = {n: (tmp_path / n / "run" / "embed" / "00000.img.npy").read_bytes() for n in "abc"}
    assert feats["a"] == feats["b"] and feats["a"] != feats["c"]
    assert read_json(tmp_path / "c" / "run" / "embed" / "00000.done.json")["config"]["seed"] == 1
    with pytest.raises(ConfigError, match=r"00000.done.json.*seed: 0 there, 1 now"):
        embed.embed_shards(cfg_for(tmp_path / "a", "seed=1"), [path])


def test_tensorboard_and_progress_lines(tmp_path, capfd):
    samples = [good(0), {"__key__": "corrupt", "jpg": b"not a jpeg", "txt": "x"}, {"__key__": "nocap", "jpg": jpeg(1)},
               good(2), good(3)]
    paths = [write_tar(tmp_path / "00000.tar", samples), write_tar(tmp_path / "00001.tar", [good(4)])]
    cfg = cfg_for(tmp_path, f"data.shards={tmp_path}/{{00000..00001}}.tar", "progress=lines")
    capfd.readouterr()
    embed.embed_shards(cfg, paths[1:])  # the task of the second shard first: steps are places in data.shards
    embed.embed_shards(cfg, paths)
    err = capfd.readouterr().err
    assert re.search(r"\[embed 00000, shard 1/1\] 3 batches, 5 rows, [\d.]+ batches/s, [\d,]+ rows/s, \d+s elapsed",
                     err), err
    assert "[embed 00001, shard 1/1] 1 batch, 1 row, " in err
    assert "embed: 1 shard, 3 rows embedded, 2 rows skipped (corrupt_image: 1, missing_caption: 1)" in err
    scalars = read_scalars(str(tmp_path / "run" / "tensorboard" / "embed"))
    assert scalars["embed/rows"] == [(1, 1.0), (0, 3.0)]
    assert scalars["embed/skipped/corrupt_image"] == [(0, 1.0)]
    assert scalars["embed/skipped/missing_caption"] == [(0, 1.0)]
    assert scalars["embed/shards_done"] == [(1, 1.0), (0, 2.0)]
    assert scalars["embed/damaged"] == [(1, 0.0), (0, 0.0)]
    seconds = read_json(tmp_path / "run" / "embed" / "00000.done.json")["seconds"]
    assert scalars["embed/images_per_s"][1] == (0, pytest.approx(3 / seconds, rel=1e-3))
