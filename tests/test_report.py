"""The run report and the cluster samples, on a synthetic run directory (no other stage's code)."""
import io
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import webdataset as wds
from PIL import Image

from cluster_job import cluster_samples as cs
from evaluation import report, results
from slurm import launch
from unicom_ds import config, tblog

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "clock", "moon"]
K = 6  # class 4 stays empty


def _photo(i: int) -> Image.Image:
    img = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])())
    return img.resize((80 + 8 * (i % 3), 64))  # not square: thumbnails must crop


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_run(root: Path, with_train=True, with_eval=True, shard_rows=(9, 7)) -> dict:
    """A run dir as the cluster, train and eval stages leave it, plus the truth to check against.

    Input shards hold real photos; row 2 of shard 1 is a corrupt JPEG and row 3 of shard 0 has no caption.
    """
    data, run = root / "data", root / "run"
    data.mkdir(parents=True)
    truth = {"label": {}, "caption": {}, "corrupt": set()}
    rng = np.random.default_rng(0)
    for s, n in enumerate(shard_rows):
        stem = f"{s:05d}"
        keys = [f"{stem}{i:04d}" for i in range(n)]
        labels = rng.choice([0, 1, 2, 3, 5], size=n).astype(np.int64)
        with wds.TarWriter(str(data / f"{stem}.tar")) as tw:
            for i, key in enumerate(keys):
                sample = {"__key__": key, "json": {"i": i}}
                if s == 1 and i == 2:
                    sample["jpg"] = b"\xff\xd8 not a jpeg"
                    truth["corrupt"].add(key)
                elif i % 4 == 1:
                    sample["png"] = _encode(_photo(i + s), "PNG")
                else:
                    sample["jpg"] = _encode(_photo(i + s), "JPEG")
                if not (s == 0 and i == 3):
                    sample["txt"] = f"photo <{i}> & shard {s}"
                    truth["caption"][key] = sample["txt"]
                tw.write(sample)
                truth["label"][key] = int(labels[i])
        (run / "embed").mkdir(parents=True, exist_ok=True)
        (run / "labels").mkdir(exist_ok=True)
        (run / "embed" / f"{stem}.keys.txt").write_text("".join(k + "\n" for k in keys))
        (run / "embed" / f"{stem}.done.json").write_text(json.dumps({"n": n, "skipped": {"corrupt image": 1}}))
        np.save(run / "labels" / f"{stem}.npy", labels)
    cfg = config.resolve([f"run_dir={run}", f"data.shards={data}/{{00000..00001}}.tar", "report.classes=3",
                          "report.per_class=4", "report.thumb_size=48", "progress=off"])
    config.save(cfg)
    (run / "kmeans").mkdir()
    # The summaries as the stages write them: Python literals, a hash, a nested config, seconds.
    (run / "kmeans" / "summary.json").write_text(json.dumps({
        "config": {"kmeans.niter": 20, "embed.from": None}, "d": 32, "damaged_shards": [], "gpus": 0,
        "iterations": 8, "k": K, "mean_cosine": 0.9436360313778832, "mode": "joint", "objective": 12.5,
        "points_embedded": 16, "points_used": 16, "seconds": 0.009, "two_level": False}))
    (run / "labels" / "summary.json").write_text(json.dumps({
        "centroids_sha256": "d33189ae8b998476d422a4a91da5b91ceb471f922d76e87e224457fdbca51498",
        "empty_classes": 1, "k": K, "max_size": 9, "mean_size": 3.2, "median_size": 3.0, "min_size": 1,
        "non_empty_classes": 5, "p99_size": 8.9, "rows": 16, "rows_skipped": {}, "shards": 2,
        "search": {"search": "exact", "top_l": 1}}))
    Image.new("RGB", (60, 40), (200, 30, 30)).save(run / "labels" / "class_sizes.png")
    if with_train:
        with tblog.writer(str(run), "train") as tb:
            for step in range(5):
                tb.add_scalar("train/loss", 5.0 - step, step)
                tb.add_scalar("train/lr", 1e-3 * step, step)
        (run / "train").mkdir()
        (run / "train" / "backbone.pt").write_bytes(b"x")
    if with_eval:
        (run / "eval").mkdir()
        (run / "eval" / "results.json").write_text(json.dumps({
            "run": {"cub": {"R@1": 0.5, "R@2": 0.6}, "cifar10": {"top1": 0.7}},
            "openclip:B32": {"cub": {"R@1": 0.8}, "sop": {"R@1": 0.4}}}))
        (run / "eval" / "results.md").write_text("| Model | CUB |\n| run | 50.0 |\n")
        Image.new("RGB", (30, 20), (0, 90, 0)).save(run / "eval" / "dims.png")
    return {"run": run, "data": data, "cfg": cfg, **truth}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report"))


# ---- pure parts -----------------------------------------------------------------------------

def test_class_sizes_count_every_row_over_shards():
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 20, size=n) for n in (0, 13, 40)] + [np.array([25])]
    expected = Counter(int(v) for p in parts for v in p)
    sizes = cs.class_sizes(parts)
    assert len(sizes) == 26
    assert {c: int(n) for c, n in enumerate(sizes) if n} == dict(expected)


def test_choose_classes_only_nonempty_distinct_and_seeded():
    sizes = np.zeros(100, dtype=np.int64)
    sizes[::3] = 5
    picked = cs.choose_classes(sizes, 10, seed=7)
    assert len(set(picked.tolist())) == 10 and all(sizes[picked] > 0)
    assert np.array_equal(picked, cs.choose_classes(sizes, 10, seed=7))
    assert not np.array_equal(picked, cs.choose_classes(sizes, 10, seed=8))
    assert sorted(cs.choose_classes(sizes, 1000, seed=0).tolist()) == list(range(0, 100, 3))


def test_choose_members_are_of_their_class_and_capped():
    labels = [np.array([0, 1, 1, 2, 1]), np.array([1, 3, 1, 1]), np.array([2])]
    members = cs.choose_members(np.array([1, 2]), labels, per_class=4, seed=0)
    assert set(members) == {1, 2}
    assert len(members[1]) == 4 and len(set(members[1])) == 4
    assert sorted(members[2]) == [(0, 3), (2, 0)]  # fewer than per_class: all of them
    for c, pairs in members.items():
        assert all(labels[s][r] == c for s, r in pairs)


def test_grid_places_each_tile_with_padding():
    tiles = [np.full((3, 5, 3), 10 * (i + 1), dtype=np.uint8) for i in range(5)]
    g = cs.grid(tiles, ncol=2, pad=1, fill=255)
    assert g.shape == (1 + 3 * (3 + 1), 1 + 2 * (5 + 1), 3)  # 3 rows of 2 tiles, 1px gaps and border
    for i in range(5):
        y, x = 1 + (i // 2) * 4, 1 + (i % 2) * 6
        assert (g[y:y + 3, x:x + 5] == 10 * (i + 1)).all()
    assert (g == 255).sum() == g.size - 5 * 3 * 5 * 3  # everything else is padding


def test_thumbnail_is_square_rgb_crop():
    thumb = cs.thumbnail(Image.fromarray(skimage.data.camera()).resize((90, 30)), 24)
    assert thumb.size == (24, 24) and thumb.mode == "RGB"


# ---- reading shards and the run dir ---------------------------------------------------------

def test_read_members_reads_only_wanted_and_survives_truncation(run_dir, tmp_path):
    shard = run_dir["data"] / "00000.tar"
    skipped = Counter()
    got = cs.read_members(shard, {"000000004", "000000001", "nope"}, skipped)
    assert set(got) == {"000000004", "000000001"} and not skipped
    assert set(got["000000001"]) == {"png", "txt"}
    assert got["000000004"]["txt"].decode() == run_dir["caption"]["000000004"]

    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    keys = set(run_dir["label"]) & {f"00000{i:04d}" for i in range(9)}
    partial = cs.read_members(cut, keys, skipped)
    assert 0 < len(partial) < 9 and skipped == Counter({"unreadable or truncated shard": 1})


def test_collect_matches_labels_and_captions(run_dir):
    cfg = run_dir["cfg"]
    got = cs.collect(run_dir["run"], cfg.data.shards, classes=3, per_class=4, seed=0, size=48, mode="off")
    labels = run_dir["label"]
    sizes = Counter(labels.values())
    assert got.num_nonempty == len(sizes) == 5
    assert len(got.classes) == 3 and all(c in sizes for c in got.classes)
    assert got.sizes == {c: sizes[c] for c in got.classes}
    shown = [s for ss in got.classes.values() for s in ss]
    assert shown
    for s in shown:
        assert labels[s.key] == s.cls and s.key not in run_dir["corrupt"]
        assert s.caption == run_dir["caption"].get(s.key)
        assert s.thumb.size == (48, 48) and np.asarray(s.thumb).std() > 5
    # the picked rows that were not shown are exactly the counted ones
    assert sum(min(4, n) for c, n in sizes.items() if c in got.classes) == len(shown) + got.skipped["corrupt image"]
    again = cs.collect(run_dir["run"], cfg.data.shards, 3, 4, 0, 48, mode="off")
    assert {c: [s.key for s in ss] for c, ss in again.classes.items()} == \
        {c: [s.key for s in ss] for c, ss in got.classes.items()}


def test_collect_counts_missing_input_shards_and_none_before_labels(run_dir, tmp_path):
    got = cs.collect(run_dir["run"], f"{tmp_path}/{{00000..00001}}.tar", 3, 4, 0, 48, mode="off")
    assert not any(got.classes.values())
    assert got.skipped["input shard not found"] == sum(min(4, n) for c, n in got.sizes.items())
    assert cs.collect(tmp_path, "x.tar", 3, 4, 0, 48, mode="off") is None


def test_collect_refuses_misaligned_keys(tmp_path):
    run = make_run(tmp_path, with_train=False, with_eval=False, shard_rows=(5,))
    keys = run["run"] / "embed" / "00000.keys.txt"
    keys.write_text("".join(keys.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match=r"00000\.keys\.txt has 4 keys but .*00000\.npy has 5 labels"):
        cs.collect(run["run"], str(run["data"] / "00000.tar"), 5, 4, 0, 32, mode="off")


def test_log_grids_writes_images_tensorboard_reads_back(run_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    samples = cs.collect(run_dir["run"], run_dir["cfg"].data.shards, 3, 4, 0, 48, mode="off")
    tags = cs.log_grids(tmp_path, samples, max_grids=2)
    assert len(tags) == 2
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "cluster"), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == sorted(tags)
    c = int(tags[0].rsplit("_", 1)[1])
    event = acc.Images(tags[0])[0]
    n = len(samples.classes[c])
    assert (event.width, event.height) == (2 + min(4, n) * 50, 2 + -(-n // 4) * 50)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    assert decoded.std() > 5


def test_tensorboard_grids_hook_uses_report_keys(tmp_path):
    run = make_run(tmp_path, with_train=False, with_eval=False)
    cfg = config.select(run["cfg"])
    cfg["report"]["tensorboard_grids"] = 1
    shown = cs.collect(cfg["run_dir"], cfg["data"]["shards"], 3, 4, cfg["seed"], 48, mode="off").classes
    assert cs.tensorboard_grids(cfg) == [f"cluster_samples/class_{min(shown)}"]  # report.classes=3, seed
    cfg["run_dir"] = str(tmp_path / "nothing yet")
    assert cs.tensorboard_grids(cfg) == []


# ---- the page -------------------------------------------------------------------------------

class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.imgs = [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.imgs += tag == "img"
        for name in ("src", "href"):
            if name in a:
                self.refs.append(a[name])


def _refs(index: Path) -> _Refs:
    p = _Refs()
    p.feed(index.read_text())
    return p


def test_build_report_full_run(run_dir):
    run = run_dir["run"]
    index = report.build_report(run)
    assert index == run / "report" / "index.html"
    page = index.read_text()
    refs = _refs(index)
    for ref in refs.refs:
        assert not re.match(r"^[a-z]+:|^/", ref), f"not relative: {ref}"
        assert (index.parent / ref).is_file(), f"broken link {ref}"
    thumbs = sorted((run / "report" / "thumbs").glob("*.jpg"))
    assert thumbs and all(Image.open(t).size == (48, 48) for t in thumbs)
    assert sum(r.startswith("thumbs/") for r in refs.refs) == len(thumbs)
    escaped = [c for c in run_dir["caption"].values()
               if c.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in page]
    assert escaped and "photo <" not in page  # captions are shown as text, never as markup
    assert "curves/train_loss.png" in page and "curves/train_lr.png" in page
    loss = Image.open(run / "report" / "curves" / "train_loss.png")
    assert loss.size == (400, 260) and np.asarray(loss.convert("L")).std() > 5
    # The paper's two tables, in percent: a row per model, a column per data set, the row's average.
    assert "<th>CUB</th><th>SOP</th><th>Average</th>" in page
    assert "<td>openclip:B32</td><td>80.0</td><td>40.0</td><td>60.0</td>" in page
    assert "<td>run</td><td>50.0</td><td>&ndash;</td><td>50.0</td>" in page
    assert "<th>CIFAR10</th><th>Average</th></tr><tr><td>run</td><td>70.0</td><td>70.0</td>" in page
    assert "Tab. 1" in page and "Tab. 2" in page and 'href="../eval/results.md"' in page
    assert "report.per_class" not in page and "per_class: 4" in page  # config.yaml shown as written
    assert "shards embedded" in page and "objective" in page and "train/backbone.pt" in page
    assert "not run yet" not in page
    # The histogram is drawn from the labels themselves (6 classes, one empty), not copied.
    sizes_png = Image.open(run / "report" / "assets" / "class_sizes.png")
    assert sizes_png.size == (600, 400) and np.asarray(sizes_png.convert("L")).std() > 5
    assert "What was run" in page and "weights openai" in page and 'class="warn"' not in page


def test_rebuild_drops_stale_files_and_sections_degrade(tmp_path):
    run = make_run(tmp_path, with_train=False, with_eval=False)["run"]
    stale = run / "report" / "thumbs" / "old.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    page = report.build_report(run).read_text()
    assert not stale.exists()
    assert page.count("not run yet") == 4  # train and eval summaries, curves, eval tables
    for ref in _refs(run / "report" / "index.html").refs:
        assert (run / "report" / ref).is_file(), ref

    empty = tmp_path / "empty"
    config.save(config.resolve([f"run_dir={empty}"]))
    page = report.build_report(empty).read_text()
    assert page.count("not run yet") == 5 + 4  # five stage summaries, browser, histogram, curves, eval
    assert _refs(empty / "report" / "index.html").imgs == 0


def test_cli_prints_the_path(run_dir, capsys):
    index = report.main([f"run_dir={run_dir['run']}", "report.classes=1"])
    assert capsys.readouterr().out.strip() == str(index)
    assert len(re.findall(r'<div class="cls">', index.read_text())) == 1
    with pytest.raises(config.ConfigError, match="report.clases"):
        report.main([f"run_dir={run_dir['run']}", "report.clases=1"])


# ---- saying what was run, honest axes ----------------------------------------------------------

def _tick_labels(axis) -> list[str]:
    lo, hi = sorted(axis.get_view_interval())
    return [t.get_text() for t in axis.get_ticklabels() if lo <= t.get_position()[axis.axis_name == "y"] <= hi]


@pytest.mark.parametrize("sizes, scale", [
    (np.array([1, 2, 2, 3, 3, 3, 0, 1]), "linear"),        # counts 1-3: once labelled 10^0, 2x10^0
    (np.r_[np.full(5000, 2), np.arange(1, 40)], "log"),     # five thousand small classes and a tail
])
def test_class_size_axes_are_plain_integers(sizes, scale):
    import matplotlib.pyplot as plt

    fig = cs.class_size_figure(sizes, k=len(sizes))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_yscale() == scale
    for axis in (ax.xaxis, ax.yaxis):
        labels = _tick_labels(axis)
        assert labels and all(re.fullmatch(r"[\d,]+", t) for t in labels), labels
    if scale == "linear":
        assert _tick_labels(ax.yaxis)[:4] == ["0", "1", "2", "3"]
    else:
        assert {"1", "10", "100", "1,000"} <= set(_tick_labels(ax.yaxis))
    assert f"{np.count_nonzero(sizes):,} non-empty classes of k = {len(sizes):,}" in ax.get_title()
    plt.close(fig)


def test_recall_vs_dimension_plot_shows_the_whole_percent_scale(tmp_path, monkeypatch):
    """A 2-point change must not fill the plot: the y-axis runs from 0 to 100 %."""
    from matplotlib.figure import Figure

    seen = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (seen.append(fig.axes[0].get_ylim()),
                                                                   save(fig, *a, **kw))[1])
    res = {"run": {"sop": {"R@1": 0.52, "dim64/R@1": 0.51, "dim32/R@1": 0.50}}}
    assert results.plot_dims(res, tmp_path / "dims.png")
    assert seen == [(0.0, 100.0)]


def test_report_says_random_clip_and_digit_stand_ins(tmp_path):
    from evaluation import demo_sets

    made = make_run(tmp_path)
    eval_root = tmp_path / "demo_eval"
    demo_sets.main(["--out", str(eval_root), "--retrieval", "50"])
    (made["run"] / "eval" / "results.json").write_text(json.dumps(
        {"run": {"sop": {"R@1": 0.5}, "eurosat": {"top1": 0.7}, "cub": {"R@1": 0.1}}}))
    cfg = config.resolve([f"run_dir={made['run']}", "clip.pretrained=random", "clip.model=ViT-Tiny-16",
                          f"eval.data_root={eval_root}", "report.classes=1", "progress=off"])
    page = report.build_report(made["run"], cfg).read_text()
    warnings = re.findall(r'<p class="warn">(.*?)</p>', page)
    assert len(warnings) == 3, warnings
    assert "The CLIP weights were random (clip.pretrained=random)" in warnings[0]
    assert "untrained ViT-Tiny-16" in warnings[0]
    assert "&#x27;eurosat&#x27; is not the real one: scikit-learn digits written in the layout of EuroSAT" in warnings[1]
    assert "&#x27;sop&#x27; is not the real one" in warnings[2] and "Stanford Online Products" in warnings[2]
    assert "cub" not in " ".join(warnings)      # a real set (no marker) is not called a stand-in


def test_report_shows_damaged_shards(tmp_path):
    made = make_run(tmp_path, with_train=False, with_eval=False)
    run = made["run"]
    done = run / "embed" / "00001.done.json"
    done.write_text(json.dumps({"n": 7, "skipped": {}, "damaged": {"reason": "truncated tar", "rows_kept": 7,
                                                                    "rows_lost": None}}))
    page = report.build_report(run).read_text()   # before assign's summary knows: from the done markers
    assert "1 damaged input shard: 7 rows kept, 0 rows lost (unknown in 1)" in page
    assert "<td>00001</td><td>truncated tar</td><td>7</td><td>unknown</td>" in page
    (run / "labels" / "summary.json").write_text(json.dumps({"non_empty": 5, "damaged_shards": [
        {"shard": "00000", "reason": "read error", "rows_kept": 3, "rows_lost": 6},
        {"shard": "00001", "reason": "truncated tar", "rows_kept": 7, "rows_lost": 2}]}))
    page = report.build_report(run).read_text()
    assert "2 damaged input shards: 10 rows kept, 8 rows lost;" in page
    assert "<td>00000</td><td>read error</td><td>3</td><td>6</td>" in page
    (run / "labels" / "summary.json").write_text(json.dumps({"non_empty": 5, "damaged_shards": []}))
    done.write_text(json.dumps({"n": 7, "skipped": {}, "damaged": None}))
    assert "damaged input shard" not in report.build_report(run).read_text()


def _stages(page: str) -> str:
    return page[page.index("<h2>Stages</h2>"):page.index("<h2>Cluster browser</h2>")]


def test_stage_tables_name_quantities_with_units(tmp_path):
    """Named quantities with units, yes/no, thousands separators; no JSON, hashes, Python literals or config."""
    run = make_run(tmp_path)["run"]
    kmeans = json.loads((run / "kmeans" / "summary.json").read_text())
    kmeans.update(points_used=123456, points_embedded=1234567, seconds=754.2)
    (run / "kmeans" / "summary.json").write_text(json.dumps(kmeans))
    labels = json.loads((run / "labels" / "summary.json").read_text())
    labels.update(rows_skipped={"corrupt image": 2}, damaged_shards=[], search={
        "search": "auto", "top_l": 8, "nlist": 16, "nprobe_used": ["8"], "checked_rows": 1280,
        "top1_disagreement": 0.0025, "topl_recall": 0.99})
    (run / "labels" / "summary.json").write_text(json.dumps(labels))
    for done in (run / "embed").glob("*.done.json"):
        done.write_text(json.dumps({"n": 3000, "skipped": {}, "d": 32, "seconds": 0.05, "damaged": None}))
    stages = _stages(report.build_report(run).read_text())
    assert "{" not in stages and "[]" not in stages and "kmeans.niter" not in stages  # no raw JSON, no config
    for word in ("False", "True", "None", "null", "sha256", "gpus", "seconds", "_"):
        assert word not in stages, word
    assert not re.search(r"[0-9a-f]{64}", stages)
    for row in (("rows", "6,000"), ("rows skipped", "0"), ("time, all shards", "0.1 s"),
                ("rows clustered", "123,456 of 1,234,567 embedded"), ("two levels", "no"), ("device", "CPU"),
                ("time", "12.6 min"), ("mean cosine to the centroid", "0.9436"), ("features", "image + text (joint)"),
                ("class size (images)", "min 1, median 3, mean 3.2, 99th percentile 8.9, max 9"),
                ("search", "IVF of 16 lists, nprobe 8, 8 labels per row; 0.25 % of 1,280 rows checked against exact "
                           "search changed label"),
                ("rows skipped", "2 (corrupt image: 2)"), ("non-empty classes", "5 of 6"),
                ("backbone", "train/backbone.pt"), ("models", "run, openclip:B32")):
        assert f"<tr><td>{row[0]}</td><td>{row[1]}</td></tr>" in stages, row
    assert "<h3>detect</h3>" not in stages  # an optional stage shows once it has run
    metrics = run / "detect" / "run" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"steps": 1200, "metrics": {"box/AP": 0.044, "mask/AP": 0.072}}))
    assert ("<h3>detect</h3><table class=\"kv\"><tr><td>run</td><td>1,200 steps, box AP 4.4 %, mask AP 7.2 %</td>"
            in _stages(report.build_report(run).read_text()))


def test_text_says_none_and_times_in_words():
    assert [report._text(v) for v in (True, False, None, [], 1234567, 2.0, 0.94363, 12345.6, "x", ["a", "b"])] == \
        ["yes", "no", "\u2014", "\u2014", "1,234,567", "2", "0.9436", "12,346", "x", "a, b"]
    assert [report._seconds(s) for s in (0.02, 7.25, 99.0, 754.2, 7200.0)] == \
        ["under 0.1 s", "7.2 s", "99.0 s", "12.6 min", "2.0 h"]


def test_curves_titled_in_words_flat_ones_left_out(tmp_path):
    scalars = {"train/loss": [(s, 5.0 - s) for s in range(1, 6)], "train/beta1": [(s, 0.9) for s in range(1, 6)],
               "train/skipped_steps": [(s, 0.0) for s in range(1, 6)], "train/lr": [(2, 1e-3), (1, 5e-4)],
               "train/images_per_s": [(s, 100.0 + s) for s in range(1, 6)], "train/new_thing": [(1, 1.0), (2, 2.0)]}
    figures = report.curve_figures(scalars)
    assert [(stem, title, unit) for stem, title, unit, _ in figures] == [
        ("train/loss", "Training loss", ""), ("train/lr", "Learning rate", ""),
        ("train/images_per_s", "Images per second, all ranks", "images/s"), ("train/new_thing", "New thing", "")]
    assert figures[1][3] == {"Learning rate": [(1, 5e-4), (2, 1e-3)]}  # by step


def test_detection_curves_group_loss_terms_and_aps(tmp_path):
    run = make_run(tmp_path, with_eval=False)["run"]
    with tblog.writer(str(run), "detect") as tb:
        for step in (10, 20, 30):
            tb.add_scalar("detect/loss", 3.0 / step, step)
            tb.add_scalar("detect/loss_mask", 1.0 / step, step)
            tb.add_scalar("detect/loss_classifier", 2.0 / step, step)
            tb.add_scalar("detect/lr", 1e-3 if step > 10 else 1e-4, step)
        tb.add_scalar("detect/run/box/AP", 0.25, 30)
        tb.add_scalar("detect/run/mask/AP50", 0.5, 30)
    page = report.build_report(run).read_text()
    detection = page[page.index("<h2>Detection curves</h2>"):page.index("<h2>Evaluation</h2>")]
    assert re.findall(r'alt="([^"]*)"', detection) == [
        "Training loss", "Learning rate", "Loss terms", "Average precision on val, run"]
    for name in ("detect_loss_terms.png", "detect_run_AP.png"):
        png = Image.open(run / "report" / "curves" / name)
        assert png.size[0] == 400 and np.asarray(png.convert("L")).std() > 5
    assert Image.open(run / "report" / "curves" / "detect_loss_terms.png").size[1] > 260  # room for the legend
    assert "<h2>Detection curves</h2>" not in report.build_report(make_run(tmp_path / "b")["run"]).read_text()


def test_eval_headings_are_short_with_the_protocol_in_a_footnote(tmp_path):
    run = make_run(tmp_path)["run"]
    (run / "eval" / "results.json").write_text(json.dumps({"run": {
        "sop": {"R@1": 0.5, "dim32/R@1": 0.4, "dim64/R@1": 0.5}, "eurosat": {"top1": 0.7, "fixed_c/top1": 0.6},
        "shapes": {"box/AP": 0.04, "mask/AP": 0.07}}}))
    page = report.build_report(run).read_text()
    evaluation = page[page.index("<h2>Evaluation</h2>"):]
    assert re.findall(r"<h3>([^<]*)</h3>", evaluation) == [
        "Linear probe", "Linear probe at a fixed C", "Retrieval", "Detection on synthetic shapes",
        "Recall@1 by feature dimension"]
    notes = re.findall(r'<p class="foot">([^<]*)</p>', evaluation)
    assert notes[0].startswith("Top-1 accuracy (%). L-BFGS") and "Tab. 1" in notes[0]
    assert notes[2].startswith("Recall@1 (%), features L2-normalised") and "Tab. 2" in notes[2]
    assert "not comparable with the paper" in notes[3]
    assert notes[4].startswith("Recall@1 against feature dimension")
    for absent in ("VehicleID", "GLDv2", "Aircraft", "COCO detection", "APm"):  # sets and columns it does not have
        assert absent not in evaluation.replace("stand-in for COCO", ""), absent
    assert "<th>box AP</th><th>mask AP</th></tr><tr><td>run</td><td>4.0</td><td>7.0</td>" in evaluation
    dims = Image.open(run / "report" / "assets" / f"eval_{results.DIM_PLOT}")  # drawn from results.json
    assert np.asarray(dims.convert("L")).std() > 5
    (run / "eval" / "results.json").write_text(json.dumps({"run": {
        "vehicleid": {"800/R@1": 0.5, "800/R@5": 0.6}, "fgvc_aircraft": {"mean_per_class": 0.3}}}))
    evaluation = report.build_report(run).read_text().split("<h2>Evaluation</h2>")[1]
    assert "VehicleID: the 800 test list" in evaluation and "mean per-class accuracy for Aircraft" in evaluation
    assert "<h3>VehicleID, every test list</h3>" in evaluation


def test_detect_finetune_quantize_rebuild_an_existing_report(tmp_path):
    run = tmp_path / "run"

    def steps(*args):
        return launch.steps_of(config.resolve([f"run_dir={run}", *args]))

    assert steps("stage=detect") == ("detect",) and steps("stage=quantize") == ("quantize",)
    (run / "report").mkdir(parents=True)
    (run / "report" / "index.html").write_text("")
    assert steps("stage=detect") == ("detect", "report") and steps("stage=finetune") == ("finetune", "report")
    assert steps("stage=quantize") == ("quantize", "report") and steps("stage=eval") == ("eval",)
    assert steps("stage=eval", "detect.with_eval=true") == ("eval", "detect", "report")
    assert steps("stage=all", "finetune.datasets=[cub]")[-3:] == ("eval", "finetune", "report")
    assert steps("stage=report") == ("report",)
