"""The train stage's data: labels joined by __key__, skipped samples counted, fixed batches per rank."""
import collections

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.train_fixtures import make_run
from unicom_ds import shards, train_data

torch.set_num_threads(1)
SIZE = 32  # output image side in these tests


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # Uneven shards (3 and 17 samples), every 4th sample unlabelled, one labelled image broken.
    return make_run(tmp_path_factory.mktemp("train_data"), [3, 17], k=5, unlabelled_every=4, broken=("000010005",))


def raw_samples(pattern):
    return list(wds.DataPipeline(wds.SimpleShardList(shards.expand(pattern)), wds.tarfile_to_samples()))


def test_join_gives_each_key_its_label(run):
    join = train_data.LabelJoin(run["run"], train_data.train_transform(SIZE))
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
    join = train_data.LabelJoin(run["run"], train_data.train_transform(SIZE))
    out = list(join(iter(raw_samples(run["shards"]))))
    skipped = torch.stack([o[2] for o in out]).sum(0).tolist()
    assert len(out) == 20 - 5 and skipped == [4, 1]
    assert [o[1] for o in out] == [run["labels"][k] for k in sorted(run["labels"]) if k != "000010005"]


def test_only_labelled_shards_are_used(run, tmp_path):
    urls, rows = train_data.labelled_shards(run["run"], run["shards"])
    assert [shards.stem(u) for u in urls] == ["00000", "00001"] and rows == 3 + 13
    more = run["shards"].replace("00001}", "00002}")  # a third shard with no labels in the run dir
    assert train_data.labelled_shards(run["run"], more)[0] == urls
    with pytest.raises(FileNotFoundError, match="run stage=cluster first"):
        train_data.labelled_shards(tmp_path, run["shards"])


def test_label_count_mismatch_names_the_files(run, tmp_path):
    bad = tmp_path / "run"
    (bad / "embed").mkdir(parents=True)
    (bad / "labels").mkdir()
    (bad / "embed" / "00000.keys.txt").write_text("a\nb\n")
    np.save(bad / "labels" / "00000.npy", np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"00000\.npy holds \(3,\) labels but .*00000\.keys\.txt has 2 keys"):
        train_data.read_label_table(bad, "00000")


@pytest.mark.parametrize("workers", [0, 2])
def test_fixed_number_of_full_batches_on_every_rank(run, workers):
    urls, _ = train_data.labelled_shards(run["run"], run["shards"])
    streams = []
    for rank in (0, 1):
        batches = list(train_data.epoch_batches(urls, run["run"], SIZE, 4, 7, seed=3, rank=rank, workers=workers))
        # 7 full batches although shard 0 holds 3 samples and the whole set only 15 usable ones.
        assert len(batches) == 7
        for images, labels, skipped in batches:
            assert images.shape == (4, 3, SIZE, SIZE) and labels.shape == (4,)
            assert labels.min() >= 0 and labels.max() < 5 and skipped.shape == (2,)
        streams.append(torch.cat([b[1] for b in batches]).tolist())
    assert streams[0] != streams[1]  # ranks draw differently seeded shard streams
