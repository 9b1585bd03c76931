"""Assign stage: the nearest centroid of every embedded row -> RUN/labels/S.npy, then class-size statistics.

Labels are only valid with the centroids that made them: RUN/labels/centroids.json records the
centroids' fingerprint before any label is written, and a task meeting other centroids refuses to go on.
A shard's labels are also only valid for the rows they label: a labels file whose length is not the
shard's row count (the shard was embedded again, e.g. with embed.redo_damaged) is labelled again.
Every label written is a real class: faiss answers -1 only for a non-finite query, and a non-finite
row stops the task before its shard is written, naming the file (features.NonFiniteFeatures).
The search runs on faiss's GPU index where faiss sees a GPU; where it does not (a faiss-cpu build) but
torch sees a CUDA GPU, as blocked matrix products there (cluster_job/nearest.py); else on the CPU.

`assign.search`: exact (every centroid), or ivf (an inverted file over the centroids, cluster_job/centroid_ivf.py;
the default from IVF_FROM_K centroids on). An IVF run is never silently approximate: `assign.check_rows` rows
of every shard are also searched exactly (RUN/labels/S.search.json), and the summary, TensorBoard and the log
give the share whose label changed. `assign.top_l` > 1 keeps the l nearest centroids of each row, nearest first,
with their inner products (S.topl.npy int64 [n, l], S.topl_sim.npy float32 [n, l]; MLCD's positives); S.npy,
written last, is their first column. RUN/labels/search.json records the search; labels of another are refused.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import faiss
import numpy as np
import torch

from cluster_job import centroid_ivf, features
from cluster_job.kmeans import kmeans_dir, search_index, use_gpu
from cluster_job.nearest import TorchFlatIP
from unicom_ds import tblog
from unicom_ds.atomic import atomic_path, read_json, save_npy_atomic, write_json_atomic
from unicom_ds.config import ConfigError, as_config
from unicom_ds.progress import progress


# assign.search=auto searches an IVF over the centroids from this many on (below, exact search is as fast;
# docs/benchmarks.md "Assign"), and warns when more than this share of checked rows changed label.
IVF_FROM_K = 4096
MAX_DISAGREEMENT = 0.005
CALIBRATION_ROWS = 2048  # rows of a task's first shard that assign.search=auto chooses nprobe on


def labels_dir(run_dir: str) -> Path:
    return Path(run_dir) / "labels"


def fingerprint(run_dir: str) -> dict:
    """What identifies the centroids: their sha256 plus the k-means config that made them."""
    path = kmeans_dir(run_dir) / "centroids.npy"
    summary = read_json(kmeans_dir(run_dir) / "summary.json")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"centroids_sha256": digest, "k": summary["k"], "mode": summary["mode"], "config": summary["config"]}


def check_labels(cfg, fp: dict) -> bool:
    """True when RUN/labels is claimed by these centroids, False when unclaimed; refuses other centroids'."""
    path = labels_dir(cfg.run_dir) / "centroids.json"
    if not path.is_file():
        return False
    recorded = read_json(path)
    if recorded["centroids_sha256"] != fp["centroids_sha256"]:
        raise ConfigError(
            f"{labels_dir(cfg.run_dir)} holds labels of other centroids ({path}: k={recorded['k']}, "
            f"sha256 {recorded['centroids_sha256'][:12]}; now k={fp['k']}, sha256 {fp['centroids_sha256'][:12]}); "
            + features.reuse_hint(cfg, recorded["config"], fp["config"])
            + f"; or delete {labels_dir(cfg.run_dir)} to label again here")
    return True


def claim_labels(cfg, fp: dict) -> None:
    """Record the centroids' fingerprint for RUN/labels, or refuse if labels of other centroids are there."""
    if not check_labels(cfg, fp):
        write_json_atomic(labels_dir(cfg.run_dir) / "centroids.json", fp)  # concurrent tasks write the same
        check_labels(cfg, fp)  # another task's claim may have won the rename


def labelled(run_dir: str, stem: str, n: int) -> bool:
    """RUN/labels/S.npy (written last) exists and labels exactly the shard's n rows."""
    path = labels_dir(run_dir) / f"{stem}.npy"
    return path.is_file() and np.load(path, mmap_mode="r").shape == (n,)


def search_check(run_dir: str, stems: list[str], settings: dict) -> dict:
    """The run's measured approximation, from the shards' S.search.json: rows checked against exact search,
    the share whose nearest centroid changed, the share of exact top-l centroids found."""
    out = {**settings}
    if settings["search"] == "exact":
        return out
    total, used = {"checked": 0, "top1_changed": 0, "topl_found": 0}, set()
    for s in stems:
        path = labels_dir(run_dir) / f"{s}.search.json"
        if path.is_file():
            record = read_json(path)
            used.add(str(record.get("nprobe", settings["nprobe"])))
            for key, value in record.items():
                if key in total:
                    total[key] += int(value)
    checked = total["checked"]
    out.update(nprobe_used=sorted(used, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0)),
               checked_rows=checked,
               top1_disagreement=total["top1_changed"] / checked if checked else None,
               topl_recall=total["topl_found"] / (checked * settings["top_l"]) if checked else None)
    return out


def search_settings(cfg, k: int) -> dict:
    """How this run's labels are searched, recorded in RUN/labels/search.json. `assign.search=auto` below
    IVF_FROM_K centroids is exact search (as fast there); from it on, the IVF search at the smallest nprobe (from
    assign.nprobe up, doubling) that keeps at least 1 - MAX_DISAGREEMENT of a sample of the task's own rows'
    labels, or exact search where none does: IVF's agreement depends on the data (docs/benchmarks.md).
    nlist and nprobe are the values used: at most k lists, at most nlist probed (`clamped` says so)."""
    a = cfg.assign
    kind = str(a.search)
    if kind == "auto" and k < IVF_FROM_K:
        kind = "exact"
    settings = {"search": kind, "top_l": int(a.top_l)}
    if int(a.top_l) > k:
        raise ConfigError(f"assign.top_l={a.top_l}: more than the k={k} centroids (kmeans.k); at most {k}")
    if kind != "exact":
        nlist = min(k, int(a.nlist or centroid_ivf.default_nlist(k)))
        settings.update(nlist=nlist, nprobe=min(int(a.nprobe), nlist), seed=int(cfg.kmeans.seed))
    return settings


def clamped(cfg, settings: dict, k: int) -> list[str]:
    """A line for each of assign.nlist / assign.nprobe that the search cannot use as given."""
    lines = []
    if "nlist" in settings and cfg.assign.nlist is not None and int(cfg.assign.nlist) != settings["nlist"]:
        lines.append(f"assign.nlist={cfg.assign.nlist}: k={k} centroids make at most {k} lists; "
                     f"{settings['nlist']} used (recorded in RUN/labels/search.json)")
    if "nprobe" in settings and int(cfg.assign.nprobe) != settings["nprobe"]:
        lines.append(f"assign.nprobe={cfg.assign.nprobe}: more than the {settings['nlist']} lists; "
                     f"{settings['nprobe']} used (recorded in RUN/labels/search.json)")
    return lines


def calibrate(exact, make_ivf, sample: np.ndarray, nprobe: int, nlist: int) -> int | None:
    """The smallest nprobe (nprobe, 2 nprobe, ... up to nlist / 4, past which little speed is left) whose
    nearest centroids differ from exact search's on at most MAX_DISAGREEMENT of `sample`; None: none does."""
    want = exact.search(sample, 1)[1][:, 0]
    while nprobe <= max(1, nlist // 4):
        if (make_ivf(nprobe).search(sample, 1)[1][:, 0] != want).mean() <= MAX_DISAGREEMENT:
            return nprobe
        nprobe *= 2
    return None


def claim_search(cfg, settings: dict) -> None:
    """RUN/labels holds labels of one search: the first task records it, a task with other settings refuses."""
    path = labels_dir(cfg.run_dir) / "search.json"
    if not path.is_file():
        write_json_atomic(path, settings)  # concurrent tasks write the same
    check_search(cfg, settings)


def check_search(cfg, settings: dict) -> None:
    """Refuse `settings` when RUN/labels/search.json records another search (the launcher, before anything runs)."""
    path = labels_dir(cfg.run_dir) / "search.json"
    if not path.is_file():
        return
    recorded = read_json(path)
    if recorded != settings:
        keys = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        raise ConfigError(f"{labels_dir(cfg.run_dir)} holds labels of another search ({path}: "
                          + ", ".join(f"{k} {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in keys)
                          + f"); delete {labels_dir(cfg.run_dir)} to label again, or use a new run_dir")


def ivf_lists(cfg, centroids: np.ndarray, settings: dict) -> np.ndarray:
    """The IVF list centres of this run's centroids, made once (RUN/labels/ivf_lists.npy): the first task to
    publish them wins (a hard link creates the file or fails), and every task reads the published file."""
    path = labels_dir(cfg.run_dir) / "ivf_lists.npy"
    if not path.is_file():
        centres = centroid_ivf.list_centres(centroids, settings["nlist"], settings["seed"], use_gpu(cfg.assign.gpu))
        with atomic_path(path.with_suffix(".new.npy")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, centres)
            try:
                os.link(tmp, path)
            except FileExistsError:  # another task published first: use theirs
                pass
    return np.load(path)


def torch_gpu(setting) -> bool:
    """Whether `assign.gpu` searches with torch on a CUDA GPU: not off, faiss sees no GPU, torch sees one."""
    return setting not in (False, "false", 0) and not faiss.get_num_gpus() and torch.cuda.is_available()


def centroid_index(centroids: np.ndarray, setting):
    """What searches every centroid for `assign.gpu`: a faiss index, or the same search in torch on CUDA."""
    if torch_gpu(setting):
        return TorchFlatIP(centroids, "cuda")
    return search_index(centroids, use_gpu(setting))


def ivf_index(centroids: np.ndarray, centres: np.ndarray, nprobe: int, setting):
    """The IVF search for `assign.gpu`: faiss's (CPU, or its GPUs), or grouped products in torch on CUDA."""
    if torch_gpu(setting):
        return centroid_ivf.TorchIVF(centroids, centres, nprobe, "cuda")
    return centroid_ivf.faiss_ivf(centroids, centres, nprobe, use_gpu(setting))


def label_shard(index, exact, batches, top_l: int, check_rows: int, n: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ids [n, l], similarities [n, l]) of a shard's rows, nearest first, and for an approximate `index` the
    check of `check_rows` evenly spaced rows against `exact` search: rows whose nearest centroid differs and
    exact top-l centroids found."""
    picked = np.unique(np.linspace(0, n - 1, min(n, check_rows)).astype(np.int64)) if exact is not None and n else None
    ids, sims, checked, start = [], [], [], 0
    for b in batches:
        b = np.ascontiguousarray(b, np.float32)
        s, i = index.search(b, top_l)
        if (i < 0).any():  # fewer than top_l centroids in the probed lists: those rows search every centroid
            short = (i < 0).any(axis=1)
            s[short], i[short] = exact.search(b[short], top_l)
        ids.append(i.astype(np.int64))
        sims.append(s.astype(np.float32))
        if picked is not None:
            checked.append(b[picked[(picked >= start) & (picked < start + len(b))] - start])
        start += len(b)
    ids = np.concatenate(ids) if ids else np.zeros((0, top_l), np.int64)
    sims = np.concatenate(sims) if sims else np.zeros((0, top_l), np.float32)
    if picked is None or not len(picked):
        return ids, sims, {}
    _, want = exact.search(np.concatenate(checked), top_l)
    got = ids[picked]
    found = sum(len(set(g) & set(w)) for g, w in zip(got.tolist(), want.tolist()))
    return ids, sims, {"checked": int(len(picked)), "top1_changed": int((got[:, 0] != want[:, 0]).sum()),
                       "topl_found": int(found), "top_l": top_l}


def class_sizes(run_dir: str, stems: list[str], k: int) -> np.ndarray:
    sizes = np.zeros(k, dtype=np.int64)
    for s in stems:
        sizes += np.bincount(np.load(labels_dir(run_dir) / f"{s}.npy", mmap_mode="r"), minlength=k)
    return sizes


def size_stats(sizes: np.ndarray) -> dict:
    """Class-size statistics over the k classes (the paper's Fig. 4 numbers)."""
    used = sizes[sizes > 0]
    stats = {"k": int(len(sizes)), "rows": int(sizes.sum()), "non_empty_classes": int(len(used)),
             "empty_classes": int(len(sizes) - len(used))}
    if len(used):
        stats.update(min_size=int(used.min()), median_size=float(np.median(used)), mean_size=float(used.mean()),
                     max_size=int(used.max()), p99_size=float(np.percentile(used, 99)))
    return stats


def write_summary(cfg, stems: list[str], records: list[dict], fp: dict) -> dict:
    """labels/summary.json + class_sizes.png + TensorBoard, from all shards' labels; the damage and the
    skipped rows recorded by the embed stage come along ("damaged_shards", "rows_skipped")."""
    from cluster_job import cluster_samples

    out = labels_dir(cfg.run_dir)
    sizes = class_sizes(cfg.run_dir, stems, int(fp["k"]))
    skipped: dict[str, int] = {}
    for r in records:
        for reason, count in r.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + int(count)
    damaged = features.damaged_shards(stems, records)
    search = search_check(cfg.run_dir, stems, read_json(out / "search.json"))
    summary = {**size_stats(sizes), "shards": len(stems), "centroids_sha256": fp["centroids_sha256"],
               "mode": fp["mode"], "damaged_shards": damaged, "rows_skipped": dict(sorted(skipped.items())),
               "search": search}
    cluster_samples.plot_class_sizes(sizes, out / "class_sizes.png", len(sizes))
    with tblog.writer(cfg.run_dir, "assign") as tb:
        for key in ("non_empty_classes", "empty_classes", "min_size", "median_size", "max_size", "mean_size"):
            if key in summary:
                tb.add_scalar(f"labels/{key}", summary[key], 0)
        tb.add_scalar("labels/damaged_shards", len(damaged), 0)
        for key in ("top1_disagreement", "topl_recall"):  # an approximate search is never silent
            if search.get(key) is not None:
                tb.add_scalar(f"labels/{key}", search[key], 0)
        tb.add_histogram("labels/class_sizes", sizes[sizes > 0], 0)
    cluster_samples.tensorboard_grids(cfg)
    write_json_atomic(out / "summary.json", summary)
    return summary


def search_line(search: dict) -> str:
    """The run's search in one line; an approximation above MAX_DISAGREEMENT says how to lower it."""
    if search["search"] == "exact":
        return f"assign: exact search of every centroid, top {search['top_l']}"
    head = (f"assign: search={search['search']} (IVF of nlist {search['nlist']}; nprobe used: "
            f"{', '.join(search.get('nprobe_used') or [])})")
    if not search.get("checked_rows"):
        return head + ": no row checked against exact search"
    share = search["top1_disagreement"]
    line = (f"{head}: {100 * share:.2f}% of {search['checked_rows']:,} rows checked against exact search changed "
            f"label; exact top-{search['top_l']} found {100 * search['topl_recall']:.2f}%")
    if share > MAX_DISAGREEMENT:
        line += (f"; WARNING: above {100 * MAX_DISAGREEMENT:.1f}%: raise assign.nprobe (or assign.search=auto or "
                 "exact) in a new run_dir")
    return line


def assign_shards(cfg, stems: list[str]) -> dict | None:
    """Job function: label the given embedded shards; the task that finds every shard labelled
    afterwards writes the summary (returned then, else None)."""
    cfg = as_config(cfg)
    run_dir, src = cfg.run_dir, features.source_run(cfg)
    if not (kmeans_dir(run_dir) / "summary.json").is_file():
        raise FileNotFoundError(f"assign: {kmeans_dir(run_dir)}/summary.json missing; run stage=kmeans first")
    fp = fingerprint(run_dir)
    claim_labels(cfg, fp)
    settings = search_settings(cfg, int(fp["k"]))
    claim_search(cfg, settings)
    embedded = features.embedded_stems(src)
    unknown = sorted(set(stems) - set(embedded))
    if unknown:
        raise FileNotFoundError(f"assign: shard {unknown[0]} has no {features.done_path(src, unknown[0])}")
    rows = dict(zip(stems, features.row_counts(src, stems).tolist()))
    todo = [s for s in stems if not labelled(run_dir, s, rows[s])]
    print(f"assign: {len(stems) - len(todo)} of {len(stems)} shards already labelled", file=sys.stderr, flush=True)
    if todo:
        centroids = np.load(kmeans_dir(run_dir) / "centroids.npy")
        exact = centroid_index(centroids, cfg.assign.gpu)
        index, approx, nprobe = exact, None, settings.get("nprobe")
        if settings["search"] != "exact":
            centres = ivf_lists(cfg, centroids, settings)

            def make_ivf(p: int):
                return ivf_index(centroids, centres, p, cfg.assign.gpu)

            if settings["search"] == "auto":
                first = np.concatenate(list(features.iter_batches(src, todo[0], fp["mode"], cfg.assign.batch_size)))
                sample = first[np.unique(np.linspace(0, len(first) - 1, min(len(first), CALIBRATION_ROWS)).astype(int))]
                nprobe = calibrate(exact, make_ivf, np.ascontiguousarray(sample, np.float32), nprobe,
                                   settings["nlist"])
                print(f"assign: search=auto: " + (f"IVF at nprobe {nprobe} keeps the labels of" if nprobe else
                      f"exact search: no nprobe up to {settings['nlist'] // 4} keeps the labels of")
                      + f" >= {100 * (1 - MAX_DISAGREEMENT):.1f}% of {len(sample):,} rows of shard {todo[0]}",
                      file=sys.stderr, flush=True)
            if nprobe is not None:
                approx = index = make_ivf(nprobe)
        l, out = settings["top_l"], labels_dir(run_dir)
        for s in progress(todo, total=len(todo), desc="assign", mode=cfg.progress, unit="shard",
                          rows=lambda s: rows[s]):
            ids, sims, check = label_shard(index, exact if approx is not None else None,
                                           features.iter_batches(src, s, fp["mode"], cfg.assign.batch_size), l,
                                           int(cfg.assign.check_rows), rows[s])
            if settings["search"] != "exact":
                write_json_atomic(out / f"{s}.search.json", {**check, "nprobe": nprobe if approx else "exact"})
            if l > 1:  # MLCD's positives: the top-l centroids, nearest first, and their similarities
                save_npy_atomic(out / f"{s}.topl.npy", ids)
                save_npy_atomic(out / f"{s}.topl_sim.npy", sims)
            save_npy_atomic(out / f"{s}.npy", ids[:, 0].copy())  # last: it marks the shard done
    print(f"assign: {len(todo)} shards, {sum(rows[s] for s in todo):,} rows labelled -> {labels_dir(run_dir)}",
          file=sys.stderr, flush=True)
    # Cheap test first (every task makes it); the full one reads every done.json and labels header.
    if all((labels_dir(run_dir) / f"{s}.npy").is_file() for s in embedded):
        records = features.done_records(src, embedded)
        if not all(labelled(run_dir, s, int(r["n"])) for s, r in zip(embedded, records)):
            return None  # a shard embedded again is waiting for its task
        summary = write_summary(cfg, embedded, records, fp)
        print(search_line(summary["search"]), file=sys.stderr, flush=True)
        print(f"assign: all {len(embedded)} embedded shards labelled: {summary['rows']:,} rows in "
              f"{summary['non_empty_classes']:,} non-empty classes, sizes {summary['min_size']:,}.."
              f"{summary['max_size']:,} (median {summary['median_size']:,})"
              + (f"; {features.damage_line(summary['damaged_shards'])}" if summary["damaged_shards"] else "")
              + f" -> {labels_dir(run_dir)}/summary.json", file=sys.stderr, flush=True)
        return summary
    return None
