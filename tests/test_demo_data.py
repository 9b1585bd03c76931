"""Demo data: real skimage photos as an img2dataset-style webdataset, deterministic and idempotent."""
import io
import json
import os

import numpy as np
import webdataset as wds
from PIL import Image

from cluster_job import demo_data


def read_all(paths):
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))


def test_demo_shards_content(tmp_path):
    paths = demo_data.write(tmp_path / "a", shards=2, copies=1, seed=0, size=32)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar"]
    samples = read_all(paths)
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) and len(keys) % 2 == 0 and len(keys) >= 2 * 15
    by_source = {}
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["source"] in demo_data.PHOTOS
        assert s["txt"].decode().endswith(demo_data.caption(meta["source"]))
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == 32
        by_source.setdefault(meta["source"], {})[meta["copy"]] = np.asarray(img, np.float32)
    assert demo_data.caption("astronaut") == "Color image of the astronaut Eileen Collins."
    # every photo: the original plus one augmented copy that differs from it
    for source, copies in by_source.items():
        assert sorted(copies) == [0, 1], source
        a, b = copies[0], copies[1]
        assert a.shape != b.shape or np.abs(a - b).mean() > 1.0, source


def test_demo_deterministic_and_idempotent(tmp_path):
    a = demo_data.write(tmp_path / "a", shards=2, copies=1, seed=0, size=32)
    b = demo_data.write(tmp_path / "b", shards=2, copies=1, seed=0, size=32)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    before = [os.stat(p).st_mtime_ns for p in a]
    demo_data.write(tmp_path / "a", shards=2, copies=1, seed=0, size=32)
    assert [os.stat(p).st_mtime_ns for p in a] == before
    c = demo_data.write(tmp_path / "c", shards=2, copies=1, seed=1, size=32)
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
