"""Small replicas of released CLIP embeddings and of a user's own img2dataset download of the same images.

Where each name and type comes from:
- LAION-400M's release (`layout="laion400m"`): folders `images/`, `texts/`, `metadata/` (LAION's release page,
  as issue 22 quotes it); files `img_emb_0.npy`, `metadata_0.parquet`, N not padded (rom1504/clip-retrieval
  `notebook/retrieval_example.ipynb` downloads `embeddings/img_emb/img_emb_0.npy` and
  `embeddings/metadata/metadata_0.parquet`); metadata columns and their order as that notebook prints a row:
  image_path '000000033' (string), caption, NSFW, similarity (float), LICENSE, url, key 33 (an integer),
  shard_id 19848 (an integer), status, error_message, width, height, exif, original_width, original_height.
- clip-retrieval's output (`layout="clip_retrieval"`): `img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy`,
  `metadata/metadata_N.parquet`, N zero-padded (clip_retrieval/clip_inference/writer.py: `zfill`); metadata
  `image_path` (the webdataset __key__), `caption`, then the fields of each sample's json written by img2dataset
  (url, key as a string, status, error_message, width, height, original_width, original_height) and the
  `--save_additional_columns '["NSFW","similarity","LICENSE"]'` of img2dataset's dataset_examples/laion400m.md.
- LAION-5B's subsets (`layout="laion5b"`): `img_emb/`, `text_emb/` (embedding-reader's README reads
  `laion5b/embeddings/laion2B-en/img_emb/`), the metadata in a folder named after the subset
  (`laion2B-en/laion2B-en-metadata/metadata_0000.parquet` beside `laion2B-en/img_emb/img_emb_0000.npy`, as
  vespa-engine/sample-apps' billion-scale-image-search README downloads them; embedding-reader takes it as a
  separate `metadata_folder`), N padded to 4 digits (clip-retrieval docs/laion5B_h14_back.md:
  `metadata_{0000..2313}.parquet`); columns as clip-retrieval's.
- Features: float16 rows of unit norm, as clip-retrieval's writer stores them.
- The download: img2dataset's webdataset writer (img2dataset/writer.py, downloader.py): tar members
  `KEY.jpg`, `KEY.txt`, `KEY.json` (the sample's metadata: url, caption, the additional columns, key, status,
  error_message, width, height, original_width, original_height), keys `SSSSSIIII` (shard id, row in the shard,
  img2dataset's compute_key), and `SSSSS.parquet` beside each tar holding every input row, failed ones too
  (status "failed_to_download", no sample in the tar).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from webdataset import TarWriter

FOLDERS = {"laion400m": ("images", "texts", "metadata"), "clip_retrieval": ("img_emb", "text_emb", "metadata"),
           "laion5b": ("img_emb", "text_emb", "laion2B-en-metadata")}
PAD = {"laion400m": 0, "clip_retrieval": 1, "laion5b": 4}


def unit16(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def pairs(n: int, dup_urls: int = 0) -> pd.DataFrame:
    """n image-text pairs of LAION's input (url, caption); the last `dup_urls` repeat earlier URLs with other
    captions, as LAION does."""
    urls = [f"http://img{i % max(1, n - dup_urls)}.example.org/p/{i % max(1, n - dup_urls)}.jpg" for i in range(n)]
    return pd.DataFrame({"url": urls, "caption": [f"a caption of pair {i}" for i in range(n)],
                         "NSFW": ["UNLIKELY"] * n, "similarity": np.linspace(0.3, 0.4, n), "LICENSE": ["?"] * n})


def write_release(folder: Path, layout: str, rows: pd.DataFrame, img: np.ndarray, txt: np.ndarray,
                  parts: list[np.ndarray], laion_shard: np.ndarray, laion_key: np.ndarray) -> None:
    """The release of `layout`: part N holds rows parts[N]; laion_shard/laion_key are LAION's own download."""
    names = FOLDERS[layout]
    for sub in names:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for n, r in enumerate(parts):
        num = str(n).zfill(PAD[layout])
        np.save(folder / names[0] / f"img_emb_{num}.npy", img[r])
        np.save(folder / names[1] / f"text_emb_{num}.npy", txt[r])
        k = len(r)
        src = rows.iloc[r]
        ints = dict(width=np.full(k, 256, np.int64), height=np.full(k, 256, np.int64))
        sizes = dict(original_width=np.full(k, 640, np.int64), original_height=np.full(k, 480, np.int64))
        if layout == "laion400m":
            meta = {"image_path": [f"{x:09d}" for x in laion_key[r]], "caption": src.caption.tolist(),
                    "NSFW": src.NSFW.tolist(), "similarity": src.similarity.to_numpy(), "LICENSE": src.LICENSE.tolist(),
                    "url": src.url.tolist(), "key": laion_key[r].astype(np.int64),
                    "shard_id": laion_shard[r].astype(np.int64), "status": ["success"] * k,
                    "error_message": [None] * k, **ints, "exif": ["{}"] * k, **sizes}
        else:
            keys = [f"{s:05d}{x:04d}" for s, x in zip(laion_shard[r], laion_key[r])]
            meta = {"image_path": keys, "caption": src.caption.tolist(), "url": src.url.tolist(), "key": keys,
                    "status": ["success"] * k, "error_message": [None] * k, **ints, **sizes,
                    "NSFW": src.NSFW.tolist(), "similarity": src.similarity.to_numpy(), "LICENSE": src.LICENSE.tolist()}
        pd.DataFrame(meta).to_parquet(folder / names[2] / f"metadata_{num}.parquet")


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_download(folder: Path, rows: pd.DataFrame, per_shard: int, failed: set[int], first_shard: int = 0,
                   parquet: bool = True, image=jpeg) -> list[str]:
    """img2dataset's webdataset output of `rows` (its input order), `per_shard` input rows a shard numbered from
    `first_shard`; rows in `failed` are failed downloads; `image(i)` is row i's JPEG (16 x 16 noise by default).
    Returns the tar paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, a in enumerate(range(0, len(rows), per_shard), start=first_shard):
        table, path = [], folder / f"{s:05d}.tar"
        with open(path, "wb") as f:
            sink = TarWriter(f, mtime=0.0)
            for i in range(a, min(a + per_shard, len(rows))):
                r = rows.iloc[i]
                key = f"{s:05d}{i - a:04d}"
                ok = i not in failed
                meta = {"url": r.url, "caption": r.caption, "NSFW": r.NSFW, "similarity": float(r.similarity),
                        "LICENSE": r.LICENSE, "key": key, "status": "success" if ok else "failed_to_download",
                        "error_message": None if ok else "HTTP Error 404", "width": 16 if ok else None,
                        "height": 16 if ok else None, "original_width": 64 if ok else None,
                        "original_height": 48 if ok else None}
                table.append(meta)
                if ok:
                    sink.write({"__key__": key, "jpg": image(i), "txt": r.caption, "json": json.dumps(meta, indent=4)})
            sink.close()
        if parquet:
            pd.DataFrame(table).astype({"width": "Int32", "height": "Int32", "original_width": "Int32",
                                        "original_height": "Int32"}).to_parquet(folder / f"{s:05d}.parquet")
        paths.append(str(path))
    return paths


def sample_urls(tar: str) -> dict[str, str]:
    """{__key__: url} of a tar, read from each sample's .json: the fingerprint of the image a key names."""
    import tarfile

    out = {}
    with tarfile.open(tar) as t:
        for m in t:
            if m.name.endswith(".json"):
                out[m.name.split(".", 1)[0]] = json.loads(t.extractfile(m).read())["url"]
    return out
