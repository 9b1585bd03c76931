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

Where a GPU is at hand, `decode_batch` decodes a batch's JPEGs there at once (nvJPEG), falling
back to PIL on the CPU for each member it cannot take, and `TensorPreprocess` / `TensorTrainCrop`
apply the eval and train transforms to the decoded tensors on the GPU.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F2


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


# --- Batch decoding on an accelerator (nvJPEG through torchvision), with a per-member CPU fallback.

JPEG_MAGIC = b"\xff\xd8\xff"


def decode_batch(datas: list[bytes | None], device: torch.device | str) -> tuple[list[torch.Tensor | None], int]:
    """uint8 RGB [3, H, W] tensors on `device`, one per member, None where a member does not decode.

    JPEGs decode together with torchvision's decode_jpeg (nvJPEG on CUDA). A batch that fails as a
    whole is retried member by member; members that are not JPEG (PNG, WebP) or that the batch
    decoder refuses decode with PIL on the CPU. Returns (images, members that took the CPU).
    """
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if d and d[:3] == JPEG_MAGIC]
    if jpegs:
        raw = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad member fails the whole call: find it
            decoded = [_decode_one(r, device) for r in raw]
        for i, image in zip(jpegs, decoded):
            out[i] = image
    fallback = 0
    for i, data in enumerate(datas):
        if out[i] is None and data:
            fallback += 1
            try:
                out[i] = TF.pil_to_tensor(open_for(data, None)).to(device, non_blocking=True)
            except Exception:  # PIL raises many types for broken files; all mean "undecodable"
                pass
    return out, fallback


def _decode_one(raw: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


class TensorPreprocess:
    """An eval preprocess (Resize shorter side or (h, w), CenterCrop, ToTensor, Normalize) on uint8
    image tensors, on whatever device they are: the same steps as the PIL transform it is built
    from, with torch's antialiased resampling instead of PIL's (close, not equal: see tests)."""

    def __init__(self, transform):
        steps = getattr(transform, "transforms", [transform])
        resize = next((t for t in steps if isinstance(t, T.Resize)), None)
        crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
        norm = next((t for t in steps if isinstance(t, T.Normalize)), None)
        known = (T.Resize, T.CenterCrop, T.Normalize, T.ToTensor)
        unknown = [type(t).__name__ for t in steps
                   if not isinstance(t, known) and type(t).__name__ not in ("MaybeToTensor", "MaybeConvertMode")]
        if resize is None or unknown:
            raise ValueError(f"no tensor version of the transform: it needs a Resize and only Resize, "
                             f"CenterCrop, ToTensor, Normalize steps (has {', '.join(unknown) or 'no Resize'})")
        self.size, self.interpolation = resize.size, resize.interpolation
        self.crop = crop.size if crop is not None else None
        self.mean = torch.tensor(norm.mean if norm else (0.0, 0.0, 0.0)).view(3, 1, 1)
        self.std = torch.tensor(norm.std if norm else (1.0, 1.0, 1.0)).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = F2.resize(image.float(), _size_list(self.size), self.interpolation, antialias=True)
        if self.crop is not None:
            x = F2.center_crop(x, _size_list(self.crop))
        x = x.clamp_(0, 255).round_().div_(255)  # as PIL: the resized image is 8-bit again
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def _size_list(size) -> list[int]:
    return [size] if isinstance(size, int) else list(size)


@dataclass(frozen=True)
class Augment:
    """The train transform's random steps (the train.augment keys): RandomResizedCrop's smallest area
    fraction (the largest is 1) and the horizontal flip's probability; torchvision's defaults."""
    crop_scale_min: float = 0.08
    hflip: float = 0.5

    @classmethod
    def of(cls, section) -> "Augment":
        """From a config section holding the keys (train.augment)."""
        return cls(float(section.crop_scale_min), float(section.hflip))


class TensorTrainCrop:
    """The train transform (RandomResizedCrop, horizontal flip, CLIP normalisation) on a uint8 image
    tensor, on its device: the same random draws as `train_data.train_transform` with the same
    `augment`, torch's antialiased bicubic resampling instead of PIL's."""

    def __init__(self, size: int, mean, std, augment: Augment = Augment()):
        self.crop = T.RandomResizedCrop(size, scale=(augment.crop_scale_min, 1.0),
                                        interpolation=T.InterpolationMode.BICUBIC)
        self.hflip = augment.hflip
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean, std: copied once per device

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        x = F2.resized_crop(image.float(), top, left, h, w, list(self.crop.size), self.crop.interpolation,
                            antialias=True)
        if torch.rand(1) < self.hflip:  # RandomHorizontalFlip's draw
            x = x.flip(-1)
        x = x.clamp_(0, 255).round_().div_(255)
        if x.device not in self._on:
            self._on[x.device] = self.mean.to(x.device), self.std.to(x.device)
        mean, std = self._on[x.device]
        return (x - mean) / std
