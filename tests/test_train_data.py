"""The train stage's data: labels joined by __key__, skipped samples counted, fixed batches per rank."""
import collections

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.train_fixtures import make_run
from unicom_ds import shards, train_data
from unicom_ds.continuation import LabelSource

torch.set_num_threads(1)
SIZE = 32  # output image side in these tests


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # Uneven shards (3 and 17 samples), every 4th sample unlabelled, one labelled image broken.
    out = make_run(tmp_path_factory.mktemp("train_data"), [3, 17], k=5, unlabelled_every=4, broken=("000010005",))
    return {**out, "source": source(out["run"])}


def source(run):
    return LabelSource(run, run / "embed")


def raw_samples(pattern):
    return list(wds.DataPipeline(wds.SimpleShardList(shards.expand(pattern)), wds.tarfile_to_samples()))


def test_join_gives_each_key_its_label(run):
    join = train_data.LabelJoin(run["source"], train_data.train_transform(SIZE))
    samples = raw_samples(run["shards"])
    reasons = collections.Counter()
    for s in samples:
        out = join.prepare(s)
        if isinstance(out, str):
            reasons[out] += 1
            expected = "undecodable" if s["__key__"] == "000010005" else "no_label"
            assert out == expected and (expected == "undecodable" or s["__key__"] not in run["labels"])
        else:
            image, label = out
            assert label == run["labels"][s["__key__"]]
            assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    n_unlabelled = sum(1 for s in samples if s["__key__"] not in run["labels"])
    assert n_unlabelled == 4  # 0 of shard 0's 3, 4 of shard 1's 17
    assert reasons == {"no_label": n_unlabelled, "undecodable": 1}


def test_stream_counts_every_skipped_sample(run):
    join = train_data.LabelJoin(run["source"], train_data.train_transform(SIZE))
    out = list(join(iter(raw_samples(run["shards"]))))
    skipped = torch.stack([o[2] for o in out]).sum(0).tolist()
    assert len(out) == 20 - 5 and skipped == [4, 1]
    assert [o[1] for o in out] == [run["labels"][k] for k in sorted(run["labels"]) if k != "000010005"]


def test_only_labelled_shards_are_used(run, tmp_path):
    checked = train_data.check_labels(run["source"], run["shards"], 5, progress_mode="off")
    assert [shards.stem(u) for u in checked.urls] == ["00000", "00001"] and checked.rows == 3 + 13
    assert checked.per_shard == {"00000": 3, "00001": 13}
    more = run["shards"].replace("00001}", "00002}")  # a third shard with no labels in the run dir
    assert train_data.check_labels(run["source"], more, 5, progress_mode="off").urls == checked.urls
    with pytest.raises(train_data.LabelError, match="run stage=cluster first"):
        train_data.check_labels(source(tmp_path), run["shards"], 5, progress_mode="off")


def copy_run(run, tmp_path):
    import shutil
    shutil.copytree(run["run"], tmp_path / "run")
    return source(tmp_path / "run")


def test_label_check_progress_counts_shards(run, capfd):
    train_data.check_labels(run["source"], run["shards"], 5, progress_mode="lines")
    err = capfd.readouterr().err
    assert "[train: checking labels] 2/2 shards," in err and "shardses" not in err


def test_labels_of_the_wrong_length_name_the_files(run, tmp_path):
    src = copy_run(run, tmp_path)
    np.save(src.labels("00001"), np.zeros(12, np.int64))  # keys.txt has 13 rows
    with pytest.raises(train_data.LabelError, match=r"00001\.npy holds int64 \(12,\) labels but .*00001\.keys\.txt "
                                                    r"has 13 keys"):
        train_data.check_labels(src, run["shards"], 5, progress_mode="off")
    with pytest.raises(train_data.LabelError, match=r"00001\.npy holds \(12,\) labels but .*00001\.keys\.txt has 13"):
        train_data.read_label_table(src, "00001")


def test_a_class_outside_k_names_the_file_before_training(run, tmp_path):
    src = copy_run(run, tmp_path)
    labels = np.load(src.labels("00000"))
    labels[1] = 5  # k = 5: classes 0..4
    np.save(src.labels("00000"), labels)
    with pytest.raises(train_data.LabelError, match=r"00000\.npy holds class 5, outside \[0, 5\) of .*summary\.json"):
        train_data.check_labels(src, run["shards"], 5, progress_mode="off")


def test_all_unlabelled_rows_fail_fast(run, tmp_path):
    src = copy_run(run, tmp_path)
    for stem in ("00000", "00001"):
        np.save(src.labels(stem), -np.ones_like(np.load(src.labels(stem))))
    with pytest.raises(train_data.LabelError, match="every label of the 2 labelled shard\\(s\\) is -1"):
        train_data.check_labels(src, run["shards"], 5, progress_mode="off")


def test_keys_that_match_no_sample_of_the_shards_fail_fast(run, tmp_path):
    src = copy_run(run, tmp_path)
    for stem in ("00000", "00001"):  # keys of another crawl, labels of the right length
        n = len(src.keys(stem).read_text().splitlines())
        src.keys(stem).write_text("".join(f"other{i:05d}\n" for i in range(n)))
    with pytest.raises(train_data.LabelError, match=r"none of the first 3 samples of .*00000\.tar has a key in "
                                                    r"'?.*00000\.keys\.txt.*tar: '000000000', keys file: 'other"):
        train_data.check_labels(src, run["shards"], 5, progress_mode="off")


def test_a_loader_that_finds_no_label_raises_instead_of_spinning(run, tmp_path):
    src = copy_run(run, tmp_path)
    for stem in ("00000", "00001"):
        src.keys(stem).write_text("".join(f"other{i:05d}\n" for i in range(len(np.load(src.labels(stem))))))
    urls = shards.expand(run["shards"])
    batches = train_data.epoch_batches(urls, src, SIZE, 4, 2, seed=0, rank=0, workers=0, timeout_s=0.5)
    with pytest.raises(train_data.LabelError, match=r"no trainable sample for 0\.5s \(train\.loader_timeout_s\): "
                                                    r"skipped \d+ no_label.*do the labels in .*labels belong"):
        next(iter(batches))


@pytest.mark.parametrize("workers", [0, 2])
def test_fixed_number_of_full_batches_on_every_rank(run, workers):
    urls = train_data.check_labels(run["source"], run["shards"], 5, progress_mode="off").urls
    streams = []
    for rank in (0, 1):
        batches = list(train_data.epoch_batches(urls, run["source"], SIZE, 4, 7, seed=3, rank=rank, workers=workers))
        # 7 full batches although shard 0 holds 3 samples and the whole set only 15 usable ones.
        assert len(batches) == 7
        for images, labels, skipped in batches:
            assert images.shape == (4, 3, SIZE, SIZE) and labels.shape == (4,)
            assert labels.min() >= 0 and labels.max() < 5 and skipped.shape == (2,)
        streams.append(torch.cat([b[1] for b in batches]).tolist())
    assert streams[0] != streams[1]  # ranks draw differently seeded shard streams


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_seed_draws_the_same_batches(run, workers):
    """Shards, the shuffle buffer and the crops all follow the seed: a rerun at a fixed seed sees the same data."""
    urls = train_data.check_labels(run["source"], run["shards"], 5, progress_mode="off").urls

    def draw(seed: int) -> list:
        torch.manual_seed(0)  # the crops' draws, as the train stage seeds them
        return list(train_data.epoch_batches(urls, run["source"], SIZE, 4, 6, seed=seed, rank=0, workers=workers))

    first, again, other = draw(3), draw(3), draw(4)
    for (a_img, a_lab, _), (b_img, b_lab, _) in zip(first, again):
        assert torch.equal(a_lab, b_lab) and torch.equal(a_img, b_img)
    assert torch.cat([b[1] for b in first]).tolist() != torch.cat([b[1] for b in other]).tolist()


def halves(size: int = 64) -> bytes:
    """A PNG whose left half is black and right half white: a mirror swaps the halves' means."""
    import io
    from PIL import Image
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:, size // 2:] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def crops_of(augment, draws: int = 200) -> torch.Tensor:
    """`draws` crops of halves() by the train transform with `augment`, as the workers cut them from a tar member."""
    import io
    from PIL import Image
    transform, data = train_data.train_transform(SIZE, augment), halves()
    torch.manual_seed(0)
    return torch.stack([transform(Image.open(io.BytesIO(data))) for _ in range(draws)])


def test_augment_keys_reach_the_crops(tmp_path):
    """train.augment.crop_scale_min / hflip (resolved as a user types them) set the workers' crops: hflip=0 never
    mirrors; crop_scale_min=1 keeps the whole image; the defaults do both, as torchvision's transform does."""
    from unicom_ds import config
    from unicom_ds.decode import Augment

    cfg = config.resolve([f"run_dir={tmp_path}", "train.augment.crop_scale_min=1.0", "train.augment.hflip=0"])
    kept = Augment.of(cfg.train.augment)
    assert kept == Augment(crop_scale_min=1.0, hflip=0.0)
    assert Augment.of(config.resolve([f"run_dir={tmp_path}"]).train.augment) == Augment(0.08, 0.5)
    whole, default = crops_of(kept), crops_of(Augment())
    half = SIZE // 2
    left, right = (lambda x: x[..., :half].mean((1, 2, 3)), lambda x: x[..., half:].mean((1, 2, 3)))
    # Not mirrored: the left half stays darker in every crop. Whole image: each half is (nearly) one colour,
    # and the two halves hold the same ink as the image does (no zoom into one half).
    assert (left(whole) < right(whole)).all()
    columns = whole[:, 0].mean(1)  # [draws, SIZE] mean of each column
    assert (columns[:, : half - 1] < -1).all() and (columns[:, half + 1:] > 1).all()
    # Defaults: about half are mirrored, and some crops zoom into one half only (every column one colour).
    mirrored = (left(default) > right(default)).float().mean()
    assert 0.35 < mirrored < 0.65
    one_colour = (default[:, 0].amax((1, 2)) - default[:, 0].amin((1, 2))) < 0.1
    assert one_colour.any()


@pytest.mark.parametrize("key,value", [("train.augment.crop_scale_min", "0"), ("train.augment.crop_scale_min", "1.5"),
                                       ("train.augment.hflip", "-0.1"), ("train.augment.hflip", "2")])
def test_augment_keys_out_of_range_are_named(tmp_path, key, value):
    from unicom_ds import config
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.resolve([f"run_dir={tmp_path}", f"{key}={value}"])


def test_the_train_stages_loader_crops_with_the_runs_augment_keys(run):
    """The train stage's data (ShardData) crops as the run's train.augment keys say; epoch_batches as its `augment`
    argument says. make_run's images hold their inverted corner at the top left: whole-image crops show it at the
    top left unflipped (hflip=0), at the top right always flipped (hflip=1)."""
    from unicom_ds import config
    from unicom_ds.decode import Augment
    from unicom_ds.train import ShardData
    checked = train_data.check_labels(run["source"], run["shards"], 5, progress_mode="off")

    def train_stage(*keys):
        data = ShardData(config.resolve([f"run_dir={run['run']}", f"data.shards={run['shards']}", "progress=off",
                                         *keys]))
        data.check(0, 1, torch.device("cpu"))
        return data.batches(epoch=0, in_epoch=0, accum=1, count=3, micro=4, image_size=SIZE, rank=0, world=1,
                            seed=1, workers=0, timeout_s=60.0)

    def corners(batches):  # [images, 4, 3]: top-left, top-right, bottom-left, bottom-right pixels
        images = torch.cat([b[0] for b in batches])
        return torch.stack([images[:, :, y, x] for y, x in ((1, 1), (1, SIZE - 2), (SIZE - 2, 1),
                                                                   (SIZE - 2, SIZE - 2))], 1)

    def corner_at(c):  # which top corner differs from the one below it
        left, right = (c[:, 0] - c[:, 2]).abs().sum(1) > 0.5, (c[:, 1] - c[:, 3]).abs().sum(1) > 0.5
        return "left" if (left & ~right).all() else "right" if (right & ~left).all() else "mixed"

    whole = "train.augment.crop_scale_min=1.0"
    assert corner_at(corners(train_stage(whole, "train.augment.hflip=0"))) == "left"
    assert corner_at(corners(train_stage(whole, "train.augment.hflip=1"))) == "right"
    assert corner_at(corners(train_stage())) == "mixed"  # the defaults crop and flip
    assert corner_at(corners(train_data.epoch_batches(checked.urls, run["source"], SIZE, 4, 3, seed=1, rank=0,
                                                      augment=Augment(1.0, 1.0)))) == "right"
