"""A small real image-caption webdataset from the photos that ship with scikit-image.

    python -m cluster_job.demo_data --out data/demo

Each photo (captioned with the first sentence of its skimage.data docstring) is written once as is
and as seeded augmented copies (crop, flip, colour jitter), spread over img2dataset-style shards
`00000.tar ...` with KEY.jpg, KEY.txt and KEY.json (the json names the source photo and, as img2dataset
writes it, the sample's `url`: a made-up address under the reserved `.invalid` domain, one per sample, which
nothing fetches; released embeddings join a download by it, see cluster_job.demo_release). Deterministic; a
shard that already exists is left alone, unless an older demo wrote it without urls (then it is written again:
the same keys, images and captions).
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from webdataset import TarWriter

from unicom_ds.atomic import atomic_path

# Photos bundled with scikit-image itself (no download; `cat` is `chelsea` again, so left out).
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "horse",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "text", "clock", "retina",
          "brick", "grass", "gravel", "colorwheel", "logo", "microaneurysms", "cell")
PREFIXES = ("", "a photo of: ", "a crop of: ", "a picture of: ")
URL = "https://demo.unicom-ds.invalid/{source}/{copy}.jpg"  # .invalid: reserved, never resolves (RFC 2606)


def caption(name: str) -> str:
    """The first sentence of the photo's docstring, e.g. 'Color image of the astronaut Eileen Collins.'"""
    import skimage.data

    doc = (getattr(skimage.data, name).__doc__ or name).strip().split("\n\n")[0]  # the summary paragraph
    first = re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0]
    return first if first.endswith(".") else first + "."


def load_photo(name: str) -> Image.Image | None:
    """An RGB PIL image of a skimage.data photo, or None if this install cannot load it offline."""
    import skimage.data

    try:
        arr = np.asarray(getattr(skimage.data, name)())
    except Exception as exn:  # optional data files raise ModuleNotFoundError / OSError without pooch
        print(f"demo_data: skipping {name}: {type(exn).__name__}", file=sys.stderr)
        return None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]).astype(np.uint8)).convert("RGB")


def augment(img: Image.Image, rng: np.random.Generator, size: int) -> tuple[Image.Image, dict]:
    """A random crop (40-100% of each side), maybe a horizontal flip, brightness/contrast/colour jitter."""
    w, h = img.size
    cw, ch = (int(round(s * rng.uniform(0.4, 1.0))) for s in (w, h))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    flip = bool(rng.random() < 0.5)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    jitter = {k: round(float(rng.uniform(0.7, 1.3)), 3) for k in ("brightness", "contrast", "color")}
    out = ImageEnhance.Brightness(out).enhance(jitter["brightness"])
    out = ImageEnhance.Contrast(out).enhance(jitter["contrast"])
    out = ImageEnhance.Color(out).enhance(jitter["color"])
    return resize(out, size), {"crop": [x0, y0, cw, ch], "flip": flip, **jitter}


def resize(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, as img2dataset's default resize mode does."""
    w, h = img.size
    scale = size / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def samples(copies: int, seed: int, size: int) -> list[dict]:
    """All samples, in a fixed order: per photo the original then `copies` augmented versions."""
    rng = np.random.default_rng(seed)
    out = []
    for name in PHOTOS:
        photo = load_photo(name)
        if photo is None:
            continue
        text = caption(name)
        for i in range(copies + 1):
            img, aug = (resize(photo, size), None) if i == 0 else augment(photo, rng, size)
            prefix = "" if i == 0 else PREFIXES[int(rng.integers(len(PREFIXES)))]
            out.append({"img": img, "caption": prefix + text,
                        "meta": {"source": name, "copy": i, "augment": aug, "caption": prefix + text,
                                 "url": URL.format(source=name, copy=i)}})
    return out


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def has_urls(path: Path) -> bool:
    """Whether a shard's first sample's json has a url (older demos wrote none); an unreadable shard has not."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            member = next((m for m in tar if m.name.endswith(".json")), None)
            return member is not None and "url" in json.loads(tar.extractfile(member).read())
    except (OSError, tarfile.TarError, ValueError):
        return False


def write(out: str | Path, shards: int = 4, copies: int = 15, seed: int = 0, size: int = 128) -> list[Path]:
    """Write the demo shards (skipping ones present, except an older demo's without urls); returns their paths."""
    out = Path(out)
    paths = [out / f"{i:05d}.tar" for i in range(shards)]
    if all(p.is_file() and has_urls(p) for p in paths):
        print(f"demo_data: {len(paths)} shards already in {out}", file=sys.stderr)
        return paths
    older = [p for p in paths if p.is_file() and not has_urls(p)]
    if older:
        print(f"demo_data: {len(older)} shard(s) of an older demo in {out} have no urls: writing them again "
              "(the same keys, images and captions)", file=sys.stderr)
    rng = np.random.default_rng(seed + 1)
    items = samples(copies, seed, size)
    order = rng.permutation(len(items))  # mix photos across shards, as a crawl would
    for i, path in enumerate(paths):
        if path.is_file() and path not in older:
            continue
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            sink = TarWriter(f, mtime=0.0)  # fixed mtime: the same bytes on every run
            for j, idx in enumerate(order[i::shards]):
                s = items[idx]
                key = f"{i:05d}{j:04d}"  # img2dataset's key: shard id then row id
                sink.write({"__key__": key, "jpg": jpeg(s["img"]), "txt": s["caption"],
                            "json": json.dumps({"key": key, **s["meta"]}, sort_keys=True)})
            sink.close()
    print(f"demo_data: wrote {len(items)} samples from {len(items) // (copies + 1)} photos "
          f"into {len(paths)} shards in {out}", file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--copies", type=int, default=15, help="augmented copies per photo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="shorter image side in pixels")
    a = ap.parse_args(argv)
    write(a.out, a.shards, a.copies, a.seed, a.size)


if __name__ == "__main__":
    main()
