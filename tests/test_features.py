"""Feature extraction: DataLoader batches in order, the .npy cache, and sharding over real gloo ranks."""
import contextlib
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torchvision import transforms as T

from evaluation import features

torch.set_num_threads(1)


class Counting(torch.nn.Module):
    """Mean colour per channel and the image's mean, counting the images it sees."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return torch.cat([x.mean((2, 3)), x.mean((1, 2, 3))[:, None]], 1)


def make_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (8 + i % 3, 9, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def dataset(paths):
    return features.ImageFiles(paths, T.Compose([T.CenterCrop(8), T.ToTensor()]))


def expected_features_from_crops(paths):
    out = []
    for p in paths:
        image = T.CenterCrop(8)(Image.open(p).convert("RGB"))
        a = np.asarray(image, dtype=np.float32) / 255
        out.append(np.concatenate([a.mean((0, 1)), [a.mean()]]))
    return np.array(out, dtype=np.float32)


def test_extract_keeps_dataset_order_across_batches_and_workers(tmp_path):
    paths = make_images(tmp_path / "img", 11)
    got = features.extract(Counting(), dataset(paths), batch_size=4, workers=1, device="cpu")
    np.testing.assert_allclose(got, expected_features_from_crops(paths), rtol=1e-5, atol=1e-6)


def test_shard_rows_are_contiguous_blocks_covering_every_row():
    blocks = [features.shard_rows(11, r, 3) for r in range(3)]
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    with pytest.raises(ValueError, match="rank 3 is not in 0..2"):
        features.shard_rows(11, 3, 3)


def test_extract_of_one_rank_is_its_block(tmp_path):
    paths = make_images(tmp_path / "img", 7)
    got = features.extract(Counting(), dataset(paths), batch_size=2, workers=0, device="cpu", rank=1, world=2)
    np.testing.assert_allclose(got, expected_features_from_crops(paths[4:]), rtol=1e-5, atol=1e-6)


def test_progress_lines_name_the_data_set_and_count_images(tmp_path, capsys):
    paths = make_images(tmp_path / "img", 7)
    features.extract(Counting(), dataset(paths), batch_size=2, workers=0, device="cpu", rank=1, world=2,
                     progress_mode="lines", desc="eval m on sop")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("[eval m on sop, rank 1 of 2] 3/3 images, ")  # this rank's block, not 2 batches
    assert " images/s, " in lines[-1]


def test_unreadable_image_is_named(tmp_path):
    paths = make_images(tmp_path / "img", 2)
    (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match="bad.jpg: cannot read image"):
        features.extract(Counting(), dataset(paths + [str(tmp_path / "img" / "bad.jpg")]),
                         batch_size=2, workers=0, device="cpu")


def test_cache_is_reused_and_another_image_list_refused(tmp_path):
    paths = make_images(tmp_path / "img", 5)
    path = features.features_path(tmp_path / "run", "openclip:ViT-B/32@laion2b", "cub")
    assert path == tmp_path / "run/eval/features/openclip_ViT-B_32@laion2b/cub.npy"
    model = Counting()
    first = features.cached_extract(path, model, dataset(paths), batch_size=2, workers=0, device="cpu")
    assert model.seen == 5 and path.is_file() and path.with_suffix(".json").is_file()
    again = features.cached_extract(path, model, dataset(paths), batch_size=2, workers=0, device="cpu")
    assert model.seen == 5  # read from the cache, nothing extracted
    np.testing.assert_array_equal(first, again)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cub.json", "cub.npy"]  # parts removed
    with pytest.raises(ValueError, match="cub.npy: cached features were made from another image list"):
        features.cached_extract(path, model, dataset(paths[:4]), batch_size=2, workers=0, device="cpu")


def test_rerun_keeps_a_finished_part(tmp_path):
    paths = make_images(tmp_path / "img", 4)
    path = tmp_path / "f" / "set.npy"
    model = Counting()
    key = features.fingerprint(paths)  # the part a crashed run left behind:
    part = path.with_name(f"set.{key[:12]}.part0-of-1.npy")
    part.parent.mkdir(parents=True)
    np.save(part, np.full((4, 4), 7, dtype=np.float32))
    got = features.cached_extract(path, model, dataset(paths), batch_size=2, workers=0, device="cpu")
    assert model.seen == 0 and (got == 7).all()


def test_autocast_only_on_cuda():
    assert isinstance(features._autocast(torch.device("cpu")), contextlib.nullcontext)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        ctx = features._autocast(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16


def _rank_main(rank, world, port, paths, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = Counting()
        feats = features.cached_extract(path, model, dataset(paths), batch_size=2, workers=0,
                                        device="cpu", rank=rank, world=world, progress_mode="off")
        np.save(f"{out}.{rank}.npy", feats)
        np.save(f"{out}.{rank}.seen.npy", np.array(model.seen))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_share_the_extraction(tmp_path):
    paths = make_images(tmp_path / "img", 9)
    path = tmp_path / "run" / "set.npy"
    out = str(tmp_path / "out")
    # fork: the ranks inherit the imported torch instead of importing it again (CI has few cores).
    mp.start_processes(_rank_main, args=(2, free_port(), paths, path, out), nprocs=2, join=True, start_method="fork")
    expected = expected_features_from_crops(paths)
    for rank in range(2):
        np.testing.assert_allclose(np.load(f"{out}.{rank}.npy"), expected, rtol=1e-5, atol=1e-6)
    assert [int(np.load(f"{out}.{r}.seen.npy")) for r in range(2)] == [5, 4]  # each did its block only
    assert sorted(p.name for p in path.parent.iterdir()) == ["set.json", "set.npy"]
