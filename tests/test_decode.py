"""Draft (DCT-scaled) JPEG decoding: close to full decoding where it shrinks, identical where it cannot."""
import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms as T

from unicom_ds.decode import DraftRandomResizedCrop, Need, draft, needed_size, open_for

torch.set_num_threads(1)


def jpeg(long_side: int, photo: str = "coffee", fmt: str = "JPEG") -> bytes:
    img = Image.fromarray(getattr(skimage.data, photo)())
    scale = long_side / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def eval_transform(size):
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor()])


def test_needed_size_reads_the_resize():
    assert needed_size(eval_transform(224)) == Need(short=224)
    assert Need(short=224)((600, 400)) == (336, 224)
    assert needed_size(T.Compose([T.Resize((100, 50)), T.ToTensor()]))((640, 480)) == (50, 100)
    assert needed_size(T.Compose([T.CenterCrop(10), T.Resize(20)])) is None  # crops first: all pixels count
    assert needed_size(T.ToTensor()) is None and needed_size(T.Resize(20, max_size=30)) is None


def test_draft_picks_the_smallest_covering_scale():
    for side, want, scale in [(1024, 224, 2.0), (2048, 224, 4.0), (2048, 100, 8.0), (300, 224, 1.0), (447, 224, 1.0)]:
        image = Image.open(io.BytesIO(jpeg(side)))
        need = Need(short=want)(image.size)
        assert draft(image, need) == scale
        image.load()
        assert scale == 1.0 or want <= min(image.size) < 2 * want
    png = Image.open(io.BytesIO(jpeg(1024, fmt="PNG")))
    assert draft(png, (10, 10)) == 1.0 and png.size == (1024, 683)


# Tolerance (0-1 pixel scale): libjpeg's scaled IDCT low-passes unlike a bicubic antialiased
# resize, so fine texture differs by a few levels, unbiased (measured 0.2-2.2 % on average per
# photo, up to 20 % at the 99th percentile on the coffee foam at 1/8 scale); features stay at
# cosine >= 0.999 (benchmarks/bench_decode.py, docs/benchmarks.md).
MEAN_TOL, P99_TOL, BIAS_TOL = 0.03, 0.25, 0.003


@pytest.mark.parametrize("side", [1024, 2048])
def test_drafted_eval_tensor_is_close_to_full_decoding(side):
    data, tf = jpeg(side), eval_transform(112)
    full, drafted = tf(open_for(data, None)), tf(open_for(data, needed_size(tf)))
    diff = (full - drafted).abs()
    assert full.shape == drafted.shape == (3, 112, 112)
    assert diff.mean() < MEAN_TOL and diff.flatten().quantile(0.99) < P99_TOL
    assert (full - drafted).mean(dim=(1, 2)).abs().max() < BIAS_TOL  # no colour or brightness shift
    assert diff.max() > 0  # it did decode differently


@pytest.mark.parametrize("data", [jpeg(200), jpeg(1024, fmt="PNG")], ids=["jpeg_near_size", "png"])
def test_images_that_cannot_shrink_are_untouched(data):
    tf = eval_transform(112)
    assert torch.equal(tf(open_for(data, None)), tf(open_for(data, needed_size(tf))))


def test_train_crop_equals_torchvision_where_it_cannot_shrink_and_is_close_where_it_does():
    small, large = jpeg(160), jpeg(1024)
    crop, ref = DraftRandomResizedCrop(128), T.RandomResizedCrop(128, interpolation=T.InterpolationMode.BICUBIC)
    to_tensor = T.ToTensor()
    for seed in range(4):
        torch.manual_seed(seed)
        a = to_tensor(crop(Image.open(io.BytesIO(small))))
        torch.manual_seed(seed)
        b = to_tensor(ref(Image.open(io.BytesIO(small)).convert("RGB")))
        assert torch.equal(a, b)
    crop, ref = DraftRandomResizedCrop(64, scale=(0.5, 1.0)), T.RandomResizedCrop(
        64, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    for seed in range(4):
        torch.manual_seed(seed)
        a = to_tensor(crop(Image.open(io.BytesIO(large))))
        torch.manual_seed(seed)
        b = to_tensor(ref(Image.open(io.BytesIO(large)).convert("RGB")))
        diff = (a - b).abs()
        assert a.shape == b.shape == (3, 64, 64)
        assert 0 < diff.mean() < MEAN_TOL and diff.flatten().quantile(0.99) < P99_TOL
    # An image decoded already is cropped as torchvision does.
    decoded = Image.open(io.BytesIO(large)).convert("RGB")
    torch.manual_seed(0)
    a = to_tensor(crop(decoded))
    torch.manual_seed(0)
    assert torch.equal(a, to_tensor(ref(decoded)))


def test_broken_jpegs_fail_in_the_decoder():
    data = jpeg(1024)
    cut = data[: len(data) // 2]
    with pytest.raises(OSError):
        open_for(cut, Need(short=112))
    with pytest.raises(OSError):
        DraftRandomResizedCrop(64)(Image.open(io.BytesIO(cut))).tobytes()
    with pytest.raises(OSError):
        open_for(b"not an image", None)
    assert np.asarray(open_for(data, Need(short=112))).shape[2] == 3
