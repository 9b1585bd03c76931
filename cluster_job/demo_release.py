"""A stand-in for LAION's released embeddings, made from a finished demo run: the README's import command
(`stage=cluster embed.source=...`) then runs on the demo's data.

    python -m cluster_job.demo_release --run runs/demo --out data/demo_release

LAION published CLIP features of its pairs next to the data, in clip-retrieval's layout; a user re-downloads
the images with img2dataset and joins the two by URL (cluster_job.url_join). Here the demo run's own features
(`RUN/embed/S.img.npy`, `S.txt.npy`, copied bit for bit) are the release and the demo shards (`data/demo/`) the
download: each row's metadata holds the url and caption of its sample's `.json`, as clip-retrieval copies them
from img2dataset's output. What makes the join do its work as on LAION:
- the rows are shuffled and split into `--parts` parts (`img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy`,
  `metadata/metadata_N.parquet`), and their `image_path` / `key` are the release's own numbering, not the demo's
  `__key__`s: only the url (and caption) can find a row's image;
- `--missing` rows more (1 in 20 by default) name images the download lacks (made-up urls, random unit features),
  as LAION's URLs that failed for you: the import drops them as `not_in_download`.
Deterministic; a folder already holding this release is left alone (DEMO_SET.txt marks it), any other non-empty
folder is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

from unicom_ds.atomic import atomic_path, read_json, write_text_atomic
from unicom_ds.shards import stem

MARKER = "DEMO_SET.txt"
MISSING_URL = "https://demo.unicom-ds.invalid/not-downloaded/{i}.jpg"


def sample_meta(tar: str) -> dict[str, dict]:
    """{__key__: the sample's .json} of a demo shard."""
    out = {}
    with tarfile.open(tar) as t:
        for m in t:
            if m.name.endswith(".json"):
                out[m.name.split(".", 1)[0]] = json.loads(t.extractfile(m).read())
    return out


def rows_of(run: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(url and caption of every embedded row, image features, text features) of a finished run's embed/, in
    shard and row order; the shard of each S is the one its S.done.json names."""
    embed = run / "embed"
    stems = sorted(p.name[: -len(".done.json")] for p in embed.glob("*.done.json"))
    if not stems:
        raise SystemExit(f"demo_release: {embed} holds no embedded shard (S.done.json); run `bash demo.sh` first")
    meta, img, txt = [], [], []
    for s in stems:
        shard = read_json(embed / f"{s}.done.json")["config"]["data.shard"]
        if stem(shard) != s or not Path(shard).is_file():
            raise SystemExit(f"demo_release: {embed}/{s}.done.json names {shard}, which is not there; run it from "
                             "the folder the run was made in")
        samples = sample_meta(shard)
        keys = (embed / f"{s}.keys.txt").read_text().split()
        for key in keys:
            record = samples.get(key, {})
            if not record.get("url"):
                raise SystemExit(f"demo_release: {shard}: sample {key} has no url in its .json (an older demo's "
                                 "shards): `python -m cluster_job.demo_data --out DATA` writes them again with urls")
            meta.append({"url": record["url"], "caption": record.get("caption")})
        img.append(np.load(embed / f"{s}.img.npy"))
        txt.append(np.load(embed / f"{s}.txt.npy"))
        if not len(img[-1]) == len(txt[-1]) == len(keys):
            raise SystemExit(f"demo_release: {embed}/{s}.*: features and keys of different lengths")
    return meta, np.concatenate(img), np.concatenate(txt)


def unit16(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write(run: str | Path, out: str | Path, parts: int = 2, missing: float = 0.05, seed: int = 0) -> Path:
    """The release of `run`'s features in clip-retrieval's layout under `out`; returns `out`."""
    import pandas as pd

    run, out = Path(run), Path(out)
    if (out / MARKER).is_file():
        print(f"demo_release: a stand-in release is already in {out}", file=sys.stderr)
        return out
    if out.is_dir() and any(out.iterdir()):
        raise SystemExit(f"demo_release: {out} is not empty; write the release into a new or empty folder")
    meta, img, txt = rows_of(run)
    rng = np.random.default_rng(seed)
    extra = int(round(missing * len(meta)))
    meta += [{"url": MISSING_URL.format(i=i), "caption": f"an image the download lacks ({i})"} for i in range(extra)]
    img = np.concatenate([img, unit16(rng, extra, img.shape[1])])
    txt = np.concatenate([txt, unit16(rng, extra, txt.shape[1])])
    order = rng.permutation(len(meta))
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for n, rows in enumerate(np.array_split(order, parts)):
        for sub, x in (("img_emb", img), ("text_emb", txt)):
            with atomic_path(out / sub / f"{sub}_{n}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, x[rows])
        keys = [f"{n:05d}{i:04d}" for i in range(len(rows))]  # the release's own download, not the demo's keys
        table = pd.DataFrame({"image_path": keys, "caption": [meta[r]["caption"] for r in rows],
                              "url": [meta[r]["url"] for r in rows], "key": keys,
                              "status": ["success"] * len(rows), "error_message": [None] * len(rows)})
        with atomic_path(out / "metadata" / f"metadata_{n}.parquet") as tmp:
            table.to_parquet(tmp)
    write_text_atomic(out / MARKER, f"the features of {run}/embed in clip-retrieval's layout ({len(meta) - extra} "
                                    f"rows, and {extra} of images the download lacks) by python -m "
                                    "cluster_job.demo_release: the demo's stand-in for LAION's released embeddings\n")
    print(f"demo_release: {len(meta) - extra} rows of {run}/embed and {extra} the download lacks, shuffled into "
          f"{parts} parts in clip-retrieval's layout -> {out} (embed.source={out})", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="a finished demo run (default runs/demo)")
    ap.add_argument("--out", default="data/demo_release", help="output folder (default data/demo_release)")
    ap.add_argument("--parts", type=int, default=2)
    ap.add_argument("--missing", type=float, default=0.05,
                    help="rows of images the download lacks, as a share of the run's rows (default 0.05)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write(a.run, a.out, a.parts, a.missing, a.seed)


if __name__ == "__main__":
    main()
