"""Batch decoding (nvJPEG on a GPU) with its per-member CPU fallback, and the tensor transforms.

The dispatch and the fallback run on the CPU too (torchvision's decode_jpeg takes lists there), so
CI covers them; the GPU equality tests run only where CUDA is.
"""
import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from tests.test_decode import jpeg
from unicom_ds import train_data
from unicom_ds.decode import Augment, TensorPreprocess, TensorTrainCrop, decode_batch, open_for

torch.set_num_threads(1)
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def eval_preprocess(size=112):
    from torchvision import transforms as T
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def members():
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(jpeg(300, "astronaut"))).convert("CMYK").save(cmyk, "JPEG", quality=90)
    good = jpeg(400, "coffee")
    return {"jpeg": good, "png": jpeg(300, "chelsea", fmt="PNG"), "cmyk_jpeg": cmyk.getvalue(),
            "truncated_jpeg": good[: len(good) // 3], "not_an_image": b"\xff\xd8\xff garbage", "missing": None,
            "jpeg2": jpeg(640, "rocket")}


def pil_tensor(data):
    return torch.from_numpy(np.array(open_for(data, None))).permute(2, 0, 1)


def check_dispatch(device):
    batch = members()
    images, fallback = decode_batch(list(batch.values()), device)
    got = dict(zip(batch, images))
    assert got["missing"] is None and got["not_an_image"] is None and got["truncated_jpeg"] is None
    for name in ("jpeg", "jpeg2", "png", "cmyk_jpeg"):
        assert got[name].device.type == torch.device(device).type and got[name].dtype == torch.uint8
        assert got[name].shape == pil_tensor(batch[name]).shape
    # PNG and the two broken JPEGs always take the CPU; the CMYK JPEG where the batch decoder refuses it.
    assert fallback in (3, 4)
    return got, batch


def test_dispatch_and_per_member_fallback_on_cpu():
    got, batch = check_dispatch("cpu")
    # On the CPU, decode_jpeg and PIL share libjpeg-turbo: the same pixels.
    for name in ("jpeg", "jpeg2", "png"):
        assert torch.equal(got[name], pil_tensor(batch[name]))


def test_all_good_batch_takes_no_fallback():
    images, fallback = decode_batch([jpeg(300), jpeg(500, "astronaut")], "cpu")
    assert fallback == 0 and all(i is not None for i in images)


# Tolerance of torch's antialiased bicubic against PIL's, in 0-1 pixel units after the transform:
# measured at most 0.02, 0.004 at the 99th percentile, no bias, on the scikit-image photos.
PIXEL_MAX, PIXEL_P99 = 0.03, 0.006


def pixel_diff(a, b):
    return ((a - b) * torch.tensor(STD).view(-1, 1, 1).to(a.device)).abs()


@pytest.mark.parametrize("side", [300, 1024])
def test_tensor_preprocess_matches_the_pil_transform(side):
    pre = eval_preprocess()
    data = jpeg(side, "astronaut")
    image, = decode_batch([data], "cpu")[0]
    diff = pixel_diff(TensorPreprocess(pre)(image), pre(open_for(data, None)))
    assert diff.max() < PIXEL_MAX and diff.flatten().quantile(0.99) < PIXEL_P99


@pytest.mark.parametrize("augment", [Augment(), Augment(crop_scale_min=0.6, hflip=0.0), Augment(1.0, 1.0)])
def test_tensor_train_crop_draws_as_the_train_transform(augment):
    data = jpeg(500, "coffee")
    image = pil_tensor(data)
    crop, ref = TensorTrainCrop(64, MEAN, STD, augment), train_data.train_transform(64, augment)
    for seed in range(4):
        torch.manual_seed(seed)
        a = crop(image)
        torch.manual_seed(seed)
        b = ref(Image.open(io.BytesIO(data)).convert("RGB"))  # decoded: no draft, torchvision's crop
        diff = pixel_diff(a, b)
        assert a.shape == b.shape == (3, 64, 64)
        assert diff.max() < PIXEL_MAX and diff.flatten().quantile(0.99) < PIXEL_P99


def test_tensor_preprocess_refuses_what_it_cannot_mirror():
    from torchvision import transforms as T
    with pytest.raises(ValueError, match="no tensor version.*ColorJitter"):
        TensorPreprocess(T.Compose([T.Resize(10), T.ColorJitter(0.1), T.ToTensor()]))


def test_train_device_crops_decode_refill_and_count():
    """train.gpu_decode's batch step (here on the CPU): the batch decodes at once, each member is cropped with
    the train transform's draws, a member that decodes nowhere is counted undecodable and its place taken by
    another crop of a decodable member, so the micro batch keeps its size."""
    good, png, second = jpeg(300, "coffee"), jpeg(200, "chelsea", fmt="PNG"), jpeg(400, "astronaut")
    datas = [good, good[: len(good) // 3], png, second]
    labels, skipped = torch.tensor([5, 6, 7, 8]), torch.tensor([2, 1])
    torch.manual_seed(0)
    crops, out_labels, out_skipped = train_data.DeviceCrops(32, "cpu")((datas, labels, skipped))
    assert out_labels.tolist() == [5, 7, 8, 5] and out_skipped.tolist() == [2, 2] and skipped.tolist() == [2, 1]
    ref = TensorTrainCrop(32, MEAN, STD)
    torch.manual_seed(0)
    assert torch.equal(crops, torch.stack([ref(pil_tensor(d)) for d in (good, png, second, good)]))
    with pytest.raises(train_data.LabelError, match="none of the 2 images of a micro batch decodes"):
        train_data.DeviceCrops(32, "cpu")(([b"\xff\xd8\xff broken", None], torch.tensor([1, 2]), torch.zeros(2)))


def test_train_loader_with_decoding_on_the_device_matches_the_workers(tmp_path):
    """train.gpu_decode's data path (decoding forced onto the CPU): the workers' LabelJoin passes encoded
    images, the batches decode and crop on the device. On the same samples: the same labels and skip counts
    as the CPU workers' batches (a broken image is still counted in the worker), images within the
    resamplers' tolerance (the same draws); and epoch_batches(decode_on=...) gives full batches."""
    import webdataset as wds

    from tests.train_fixtures import make_run
    from unicom_ds import shards
    from unicom_ds.continuation import LabelSource

    run = make_run(tmp_path, [6, 9], k=5, unlabelled_every=4, broken=("000010004",), size=80)
    source = LabelSource(run["run"], run["run"] / "embed")
    urls = shards.expand(run["shards"])
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))

    def batches(transform, device=None):
        torch.manual_seed(0)
        items = list(train_data.LabelJoin(source, transform)(iter(samples)))
        assert sum(item[2] for item in items).tolist() == [3, 1]  # the unlabelled and the broken image
        out = [train_data.collate(items[i:i + 4]) for i in range(0, len(items) - 3, 4)]
        return out if device is None else [train_data.DeviceCrops(32, device)(b) for b in out]

    workers, device = batches(train_data.train_transform(32)), batches(None, "cpu")
    assert len(device) == len(workers) == 2
    for (a, la, sa), (b, lb, sb) in zip(device, workers):
        assert a.shape == b.shape == (4, 3, 32, 32)
        assert torch.equal(la, lb) and torch.equal(sa, sb)
        diff = pixel_diff(a, b)
        assert diff.max() < PIXEL_MAX and diff.flatten().quantile(0.99) < PIXEL_P99
    loaded = list(train_data.epoch_batches(urls, source, 32, 4, 3, seed=1, rank=0, workers=0,
                                           decode_on=torch.device("cpu")))
    assert len(loaded) == 3 and all(b[0].shape == (4, 3, 32, 32) and b[1].shape == (4,) for b in loaded)


def test_train_decodes_on_the_gpu_only_where_asked():
    from types import SimpleNamespace

    from unicom_ds.train import ShardData

    for setting, device, want in [(True, "cuda:1", "cuda:1"), (False, "cuda:1", None), (True, "cpu", None)]:
        data = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(gpu_decode=setting)),
                               device=torch.device(device))
        got = ShardData.decode_device(data)
        assert (got and str(got)) == want


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a level or two per pixel.
NVJPEG_MEAN, NVJPEG_P99 = 0.01, 0.05


@cuda
def test_gpu_dispatch_and_fallback():
    check_dispatch("cuda")


@cuda
@pytest.mark.parametrize("side", [500, 1024])
def test_gpu_path_matches_the_cpu_path(side):
    pre = eval_preprocess(224)
    datas = [jpeg(side, p) for p in ("astronaut", "coffee", "chelsea", "rocket")]
    images, fallback = decode_batch(datas, "cuda")
    assert fallback == 0
    tp = TensorPreprocess(pre)
    for data, image in zip(datas, images):
        decoded = (image.cpu().int() - pil_tensor(data).int()).abs() / 255
        assert decoded.float().mean() < NVJPEG_MEAN and decoded.float().flatten().quantile(0.99) < NVJPEG_P99
        diff = pixel_diff(tp(image).cpu(), pre(open_for(data, None)))
        assert diff.mean() < NVJPEG_MEAN and diff.flatten().quantile(0.99) < NVJPEG_P99


def test_embed_stage_device_path_equals_the_cpu_path(tmp_path, monkeypatch):
    """The embed stage with decoding handed to the device (forced onto the CPU here): the same rows,
    the same skip counts (a broken JPEG, a PNG through the fallback), features within tolerance."""
    from embed_fixtures import good, write_tar

    from cluster_job import embed
    from unicom_ds.config import as_config, resolve, select

    samples = [good(0), {"__key__": "corrupt", "jpg": b"\xff\xd8\xff not a jpeg", "txt": "broken"},
               {"__key__": "photo", "jpg": jpeg(300, "astronaut"), "txt": "a photo"},
               {"__key__": "png", "png": jpeg(200, "coffee", fmt="PNG"), "txt": "a png"}, good(3)]
    path = write_tar(tmp_path / "00000.tar", samples)
    torch.manual_seed(0)
    clip = embed.load_clip("ViT-Tiny-16", "random", torch.device("cpu"))
    done = {}
    for name in ("cpu", "device"):
        if name == "device":
            monkeypatch.setattr(embed, "device_preprocess", lambda pre, device: TensorPreprocess(pre))
        cfg = as_config(select(resolve([f"run_dir={tmp_path / name}", "clip.model=ViT-Tiny-16", "clip.pretrained=random",
                                        "embed.batch_size=3", "embed.workers=0", "device=cpu", "progress=off"])))
        done[name] = embed.embed_shard(cfg, path, *clip, torch.device("cpu"))
    assert done["device"]["n"] == done["cpu"]["n"] == 4
    assert done["device"]["skipped"] == done["cpu"]["skipped"] == {"corrupt_image": 1}
    out = {n: tmp_path / n / "embed" for n in done}
    assert (out["device"] / "00000.keys.txt").read_text() == (out["cpu"] / "00000.keys.txt").read_text()
    a, b = (np.load(out[n] / "00000.img.npy").astype(np.float32) for n in ("device", "cpu"))
    assert (a * b).sum(1).min() > 0.999  # unit rows: cosine


def test_eval_extraction_device_path_equals_the_cpu_path(tmp_path, monkeypatch):
    """evaluation.features.extract with decoding handed to the device (forced onto the CPU here):
    the preprocessed pixels within tolerance of PIL's, and an undecodable file is an error naming it."""
    from evaluation import features

    paths = []
    for i, (side, photo, fmt) in enumerate([(300, "astronaut", "JPEG"), (500, "coffee", "JPEG"), (200, "rocket", "PNG")]):
        paths.append(str(tmp_path / f"{i}.{fmt.lower()}"))
        open(paths[-1], "wb").write(jpeg(side, photo, fmt=fmt))
    pre = eval_preprocess(32)
    model = torch.nn.Flatten()  # the features are the preprocessed pixels
    cpu = features.extract(model, features.ImageFiles(paths, pre), batch_size=2, workers=0, device="cpu",
                           progress_mode="off")
    monkeypatch.setattr(features, "device_preprocess", lambda dataset, device: TensorPreprocess(dataset.transform))
    dev = features.extract(model, features.ImageFiles(paths, pre), batch_size=2, workers=0, device="cpu",
                           progress_mode="off")
    assert dev.shape == cpu.shape == (3, 3 * 32 * 32)
    # Against PIL's full decode (the CPU path drafts the 500-px JPEG: that difference is test_decode's).
    full = torch.stack([pre(Image.open(p).convert("RGB")) for p in paths])
    diff = pixel_diff(torch.from_numpy(dev).view(3, 3, 32, 32), full)
    assert 0 < diff.max() < PIXEL_MAX and diff.flatten().quantile(0.99) < PIXEL_P99
    open(paths[1], "wb").write(b"\xff\xd8\xff broken")
    with pytest.raises(OSError, match=r"1\.jpeg: cannot read image"):
        features.extract(model, features.ImageFiles(paths, pre), batch_size=2, workers=0, device="cpu",
                         progress_mode="off")


@cuda
def test_gpu_decode_trains_steps(tmp_path):
    """train.gpu_decode=true on one GPU: the workers only read, the rank decodes and crops on its GPU and
    trains; the broken image is counted as undecodable, as the CPU workers count it. One shard of 4 samples, one
    of them broken, read over and over: 3 micro batches of 16 draw it about 12 times (none: 0.75^48 ~ 1e-6) and
    never fill a whole batch with it (0.25^16 a batch), which would stop the run."""
    import re
    import subprocess
    from pathlib import Path

    from tests.train_fixtures import ds_config, make_run
    from unicom_ds import config, train

    data = make_run(tmp_path, [4], k=10, broken=("000000001",), size=300)
    ds = ds_config(tmp_path / "ds.json", batch=16, micro=16)
    cfg = config.resolve([f"run_dir={data['run']}", f"data.shards={data['shards']}", "model=ViT-Tiny-16",
                          "stage=train", "device=cuda", f"train.deepspeed_config={ds}", "train.epochs=1",
                          "train.steps_per_epoch=3", "train.max_steps=3", "train.log_every=1", "train.workers=1",
                          "train.local_processes=1", "train.gpu_decode=true", "progress=off"])
    proc = subprocess.run(train.local_command(cfg), cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "images decode and crop on cuda:0 (train.gpu_decode)" in log
    assert "step 3/3" in log and (data["run"] / "train" / "backbone.pt").is_file()
    counted = re.search(r"done: steps 0 -> 3 .*skipped \{'no_label': 0, 'undecodable': (\d+)\}", log)
    assert counted and 1 <= int(counted[1]) < 48, log[-4000:]
