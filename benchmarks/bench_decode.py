"""PIL draft decoding against full decoding, side by side, on real photos at several sizes.

    python benchmarks/bench_decode.py                  # sizes 300 500 1024 2048, ViT-B-32 @224
    python benchmarks/bench_decode.py --sizes 500 1024 --repeat 5

The scikit-image photos are scaled so that their longer side is each size (500 is about a LAION
500 x 400 JPEG, 1024 and 2048 originals as img2dataset keeps them with resize_mode=no; photos
smaller than a size are upscaled, which makes them smoother than real photos of that size) and
re-encoded as JPEG quality 90. For each size and both paths it times, per image, decode + the
transform of the stage, one process, one thread:

- eval / embed: open_clip's ViT-B-32 preprocess (Resize 224 bicubic, CenterCrop, Normalize),
  full decode vs `unicom_ds.decode.open_for` drafted to the Resize;
- train: torchvision's RandomResizedCrop(224) on the full image vs `DraftRandomResizedCrop`, the
  same crops (same seed);

and the difference of the outputs: pixel (max and mean |diff| on the 0-255 scale) and the cosine of
a random-init ViT-B-32's features (with, for scale, the mean cosine between different photos).
"""
from __future__ import annotations

import argparse
import io
import platform
import time

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from cluster_job import demo_data
from unicom_ds import train_data
from unicom_ds.decode import needed_size, open_for

STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


def photo_jpegs(long_side: int, quality: int = 90) -> list[bytes]:
    """Every offline scikit-image photo (colour, >= 256 px), longer side scaled to `long_side`, as JPEG bytes."""
    out = []
    for name in demo_data.PHOTOS:
        img = demo_data.load_photo(name)
        if img is None or min(img.size) < 256:
            continue
        scale = long_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def timed(fns, items, repeat: int) -> tuple[list[list[torch.Tensor]], list[float]]:
    """Outputs of each fn over items, and each fn's best of `repeat` passes in ms per item; the
    fns take turns within each pass, so a busy machine slows all of them alike."""
    best = [float("inf")] * len(fns)
    outs: list = [None] * len(fns)
    for r in range(repeat):
        for i, fn in enumerate(fns):
            torch.manual_seed(r)  # the same crops for every fn
            t = time.perf_counter()
            outs[i] = [fn(x) for x in items]
            best[i] = min(best[i], (time.perf_counter() - t) / len(items) * 1e3)
    return outs, best


def compare(model, full: list[torch.Tensor], draft: list[torch.Tensor]) -> dict:
    a, b = torch.stack(full), torch.stack(draft)
    pixel = ((a - b) * STD * 255).abs()
    with torch.no_grad():
        fa, fb = F.normalize(model(a), dim=1), F.normalize(model(b), dim=1)
    cos = (fa * fb).sum(1)
    others = fa @ fa.T
    n = len(full)
    return {"px_max": float(pixel.max()), "px_mean": float(pixel.mean()), "cos_min": float(cos.min()),
            "cos_mean": float(cos.mean()), "cos_other_photos": float((others.sum() - n) / max(1, n * n - n))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 500, 1024, 2048])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", default="ViT-B-32")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
    model = model.visual.eval()
    size = preprocess.transforms[1].size[0]
    need = needed_size(preprocess)
    full_crop = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
    draft_crop = train_data.train_transform(size)
    draft_crop.transforms.pop(1)  # no flip: both sides draw the same crops and nothing else

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, {args.model} @{size}")
    print("| longer side | photos | path | full ms/img | draft ms/img | speed-up | px max | px mean | "
          "cos min | cos mean | cos other photos |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for side in args.sizes:
        jpegs = photo_jpegs(side)
        paths = {
            "eval/embed": (lambda d: preprocess(open_for(d, None)), lambda d: preprocess(open_for(d, need))),
            "train": (lambda d: full_crop(Image.open(io.BytesIO(d)).convert("RGB")),
                      lambda d: draft_crop(Image.open(io.BytesIO(d)))),
        }
        for name, (full_fn, draft_fn) in paths.items():
            (full, draft), (t_full, t_draft) = timed((full_fn, draft_fn), jpegs, args.repeat)
            d = compare(model, full, draft)
            print(f"| {side} | {len(jpegs)} | {name} | {t_full:.2f} | {t_draft:.2f} | {t_full / t_draft:.2f}x | "
                  f"{d['px_max']:.1f} | {d['px_mean']:.2f} | {d['cos_min']:.5f} | {d['cos_mean']:.5f} | "
                  f"{d['cos_other_photos']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
