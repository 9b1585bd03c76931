"""Image decoding that does no more work than the transform needs.

JPEG's DCT lets libjpeg decode at 1/2, 1/4 or 1/8 scale for a fraction of the cost (PIL's
`Image.draft`). Every stage resizes photos down, so each decodes at the smallest scale that still
covers what its transform will sample:

- embed and eval: the preprocess's `Resize` (shorter side to S, or a fixed (h, w)): `needed_size`
  reads it from the transform, `open_for(data, need)` decodes at the smallest scale that keeps the
  image at least that large;
- training: `DraftRandomResizedCrop` draws the crop on the full-size header first, then decodes at
  the smallest scale at which the crop still has the output size in both directions.

Images that cannot shrink by 2 or more (already near the input size, PNG, WebP) decode as before,
to the same pixels.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF


@dataclass(frozen=True)
class Need:
    """The smallest (width, height) a torchvision Resize samples from at full detail: `short` for
    a shorter-side resize, else the fixed `(height, width)`. Picklable, for DataLoader workers."""
    short: int | None = None
    fixed: tuple[int, int] | None = None

    def __call__(self, wh: tuple[int, int]) -> tuple[int, int]:
        if self.fixed is not None:
            return self.fixed[1], self.fixed[0]
        ratio = self.short / min(wh)
        return math.ceil(round(wh[0] * ratio, 6)), math.ceil(round(wh[1] * ratio, 6))  # 224.00000000000003 -> 224


def needed_size(transform: Callable) -> Need | None:
    """The `Need` of a transform whose first geometric step is a torchvision `Resize`; None when
    it has no such Resize (then nothing is drafted)."""
    steps = getattr(transform, "transforms", [transform])
    resize = next((t for t in steps if isinstance(t, (T.Resize, T.CenterCrop, T.RandomResizedCrop))), None)
    if not isinstance(resize, T.Resize) or resize.max_size is not None:
        return None
    size = resize.size
    if isinstance(size, int) or len(size) == 1:
        return Need(short=size if isinstance(size, int) else size[0])
    return Need(fixed=(int(size[0]), int(size[1])))


def draft(image: Image.Image, size: tuple[int, int]) -> float:
    """Let a not yet decoded JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it at
    least `size` (width, height); returns the scale (1.0 where nothing changes)."""
    if image.format != "JPEG" or size[0] < 1 or size[1] < 1:
        return 1.0
    width = image.size[0]
    if min(width // size[0], image.size[1] // size[1]) < 2:
        return 1.0
    drafted = image.draft("RGB", size)  # None once decoded; else (mode, (0, 0, w / s, h / s))
    return 1.0 if drafted is None else width / drafted[1][2]


def open_for(data: bytes, need: Need | None) -> Image.Image:
    """The RGB image in `data`, decoded now (so a corrupt file fails here), drafted for `need`."""
    image = Image.open(io.BytesIO(data))
    if need is not None:
        draft(image, need(image.size))
    image.load()
    return image.convert("RGB")


class DraftRandomResizedCrop(T.RandomResizedCrop):
    """RandomResizedCrop that decodes a JPEG at the smallest scale still covering its crop.

    Takes an image straight from `Image.open` (not decoded yet). The crop is drawn on the full
    size, with the same random draws as torchvision's; when the crop is at least twice the output
    size the JPEG decodes at 1/2, 1/4 or 1/8 scale and the crop box is resampled from there at
    sub-pixel precision. Otherwise, and for other formats, the output is torchvision's to the pixel.
    """

    def __init__(self, size: int, **kwargs):
        kwargs.setdefault("interpolation", T.InterpolationMode.BICUBIC)
        super().__init__(size, **kwargs)

    def forward(self, image: Image.Image) -> Image.Image:
        top, left, h, w = self.get_params(image, self.scale, self.ratio)
        out_h, out_w = self.size
        full = image.size
        scale = draft(image, (math.ceil(full[0] * out_w / w), math.ceil(full[1] * out_h / h)))
        image = image.convert("RGB")
        if scale == 1.0:
            return TF.resized_crop(image, top, left, h, w, self.size, self.interpolation, antialias=True)
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        return image.resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)
