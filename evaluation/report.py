"""The run report: one static HTML page (RUN/report/index.html) over everything a run has produced so far.

Sections: what was run (and what it stands in for: random CLIP weights, digits in a real set's layout,
damaged input shards), the config (folded) and a short table per stage (named quantities with units), a cluster
browser (thumbnails and captions of sampled pseudo classes, like the paper's Fig. 3 and 5), the class-size
histogram, training and detection curves (titled in words, constant ones left out) and the evaluation tables
(short headings, the protocol in a footnote; RUN/eval/results.md keeps the whole captions).
A stage that has not run yet gets a note instead of its section. Every link is relative, so the report
folder can be opened in place or copied together with the run directory.

    python -m evaluation.report run_dir=RUN
"""
from __future__ import annotations

import html
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from cluster_job import cluster_samples
from unicom_ds import config, continuation, tblog
from unicom_ds.atomic import atomic_path, read_json, write_text_atomic
from unicom_ds.progress import count

CSS = """
body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
h1{margin-bottom:0} .note{color:#888;font-style:italic}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left} .kv td{text-align:left;vertical-align:top}
.cls{margin-bottom:1.5em} .grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0 0 1em} .grid figure{margin:0;width:var(--thumb)}
.grid img{display:block;width:var(--thumb);height:var(--thumb)}
figcaption{font-size:11px;line-height:1.25;max-height:5em;overflow:hidden;word-wrap:break-word}
.curves,.stages{display:flex;flex-wrap:wrap;align-items:flex-start;gap:8px} .stages{column-gap:2.5em}
.curves img{width:390px}
.foot{font-size:12px;color:#555;margin:-1em 0 1.5em;max-width:60em}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:4px 8px;margin:4px 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _text(value: Any) -> str:
    """A quantity as people read it: yes/no, — for nothing, thousands separated, 4 significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or value == [] or value == {}:
        return "\u2014"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float) and value.is_integer() or isinstance(value, int):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _seconds(s: float | None) -> str | None:
    """A duration in s, min or h."""
    if s is None:
        return None
    if s < 0.1:
        return "under 0.1 s"
    return f"{s:.1f} s" if s < 100 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _counts(found: Mapping[str, int]) -> str | int:
    """{reason: count} as "3 (corrupt image: 2, unreadable: 1)", 0 when there is none."""
    total = sum(found.values())
    return f"{total:,} ({', '.join(f'{k}: {v:,}' for k, v in sorted(found.items()) if v)})" if total else 0


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _kv_table(d: Mapping) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_text(v))}</td></tr>" for k, v in d.items())
    return f'<table class="kv">{rows}</table>'


def _json_or_none(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


# ---- what was run ---------------------------------------------------------------------------

def _embed_dir(run_dir: Path, cfg: Any) -> Path:
    source = OmegaConf.select(cfg, "embed.from", default=None)  # embed.from: another run's features, in place
    return Path(str(source or run_dir)) / "embed"


def damaged_shards(run_dir: Path, cfg: Any) -> list[dict]:
    """[{shard, reason, rows_kept, rows_lost}]: from RUN/labels/summary.json once assign has run, else
    from the embed stage's done markers."""
    labels = _json_or_none(run_dir / "labels" / "summary.json")
    if isinstance(labels, dict) and "damaged_shards" in labels:
        return list(labels["damaged_shards"])
    found = []
    for path in sorted(_embed_dir(run_dir, cfg).glob("*.done.json")):
        damage = read_json(path).get("damaged")
        if damage:
            found.append({"shard": path.name[: -len(".done.json")], **damage})
    return found


def demo_stand_ins(cfg: Any, datasets: list[str]) -> dict[str, str]:
    """{data set: what it really is} for the sets whose folder holds the demo-set marker (digits)."""
    from evaluation.demo_sets import MARKER

    out = {}
    for name in datasets:
        marker = Path(str(cfg.eval.data_root)) / name / MARKER
        if marker.is_file():
            out[name] = marker.read_text().strip()
    return out


def what_was_run(run_dir: Path, cfg: Any) -> str:
    """Plain statements of what the numbers below come from, with warnings for stand-ins."""
    warn, facts = [], []
    pretrained = str(cfg.clip.pretrained)
    facts.append(f"CLIP features: {cfg.clip.model}, weights {pretrained}")
    if pretrained == "random":
        warn.append(f"The CLIP weights were random (clip.pretrained=random): the pseudo classes come from an "
                    f"untrained {cfg.clip.model}, so they group images by little more than colour and layout. "
                    "The numbers show that the pipeline runs, not what Unicom reaches.")
    facts.append(f"input shards: {cfg.data.shards}")
    kmeans = _json_or_none(run_dir / "kmeans" / "summary.json")
    if isinstance(kmeans, dict):
        facts.append(f"k-means: k = {_text(kmeans.get('k'))} ({kmeans.get('mode')}) on "
                     f"{_text(kmeans.get('points_used'))} of {_text(kmeans.get('points_embedded'))} embedded rows")
    facts.append(f"trained model: {cfg.model}, from random initialisation (as in the paper)")
    results = _json_or_none(run_dir / "eval" / "results.json")
    evaluated = sorted({d for m in results.values() for d in m}) if isinstance(results, dict) else []
    for name, truth in demo_stand_ins(cfg, evaluated or [str(d) for d in cfg.eval.datasets]).items():
        warn.append(f"The data set '{name}' is not the real one: {truth}")
    shapes = Path(str(cfg.detect.data_root)) / "DEMO_SET.txt"  # evaluation.detection.synthetic's marker
    if "shapes" in evaluated and shapes.is_file():
        warn.append(f"The detection set is not COCO: {shapes.read_text().strip()}")
    damaged = damaged_shards(run_dir, cfg)
    if damaged:
        lost = [d.get("rows_lost") for d in damaged]
        known = sum(x for x in lost if x is not None)
        warn.append(f"{len(damaged)} damaged input shard{'s' if len(damaged) != 1 else ''}: "
                    f"{sum(int(d.get('rows_kept', 0)) for d in damaged)} rows kept, {known} rows lost"
                    + (f" (unknown in {lost.count(None)})" if None in lost else "")
                    + "; `stage=embed embed.redo_damaged=true` reads them again.")
    out = "".join(f'<p class="warn">{_e(w)}</p>' for w in warn)
    out += "<ul>" + "".join(f"<li>{_e(f)}</li>" for f in facts) + "</ul>"
    if damaged:
        head = "".join(f"<th>{h}</th>" for h in ("shard", "reason", "rows kept", "rows lost"))
        rows = "".join(f"<tr><td>{_e(d.get('shard'))}</td><td>{_e(d.get('reason'))}</td>"
                       f"<td>{_e(d.get('rows_kept'))}</td><td>{_e('unknown' if d.get('rows_lost') is None else d['rows_lost'])}</td></tr>"
                       for d in damaged)
        out += f'<table class="damaged"><tr>{head}</tr>{rows}</table>'
    return out


# ---- stage summaries ------------------------------------------------------------------------

MODES = {"joint": "image + text (joint)", "image": "image", "text": "text"}  # kmeans.mode

def stage_summaries(run_dir: Path, embed_dir: Path) -> dict[str, dict | None]:
    """{stage: {quantity in words: value}, or None when it has not run yet}; detect only once it has run."""
    out: dict[str, dict | None] = {"embed": None, "kmeans": None, "assign": None, "train": None, "eval": None}
    done = [read_json(p) for p in sorted(embed_dir.glob("*.done.json"))]
    if done:
        skipped = Counter()
        for d in done:
            skipped.update({k: int(v) for k, v in d.get("skipped", {}).items()})
        reused = embed_dir.parent.resolve() != run_dir.resolve()
        out["embed"] = {
            "shards embedded": f"{len(done):,}" + (f", reused from {embed_dir.parent} (embed.from)" if reused else ""),
            "rows": sum(int(d.get("n", 0)) for d in done), "rows skipped": _counts(skipped),
            "damaged shards": sum(bool(d.get("damaged")) for d in done), "feature dimension": done[0].get("d"),
            "time, all shards": _seconds(sum(float(d.get("seconds", 0)) for d in done))}
    k = _json_or_none(run_dir / "kmeans" / "summary.json")
    if isinstance(k, dict):
        out["kmeans"] = {
            "pseudo classes (k)": k.get("k"), "features": MODES.get(k.get("mode"), k.get("mode")),
            "feature dimension": k.get("d"),
            "rows clustered": f"{_text(k.get('points_used'))} of {_text(k.get('points_embedded'))} embedded",
            "iterations": k.get("iterations"), "objective": k.get("objective"),
            "mean cosine to the centroid": k.get("mean_cosine"),
            "empty classes on the sample": k.get("empty_classes_on_sample"), "two levels": k.get("two_level"),
            "device": f"{k['gpus']} GPU{'s' if k['gpus'] != 1 else ''}" if k.get("gpus") else "CPU",
            "time": _seconds(k.get("seconds"))}
    a = _json_or_none(run_dir / "labels" / "summary.json")
    if isinstance(a, dict):
        out["assign"] = {
            "rows labelled": a.get("rows"), "shards": a.get("shards"),
            "non-empty classes": f"{_text(a.get('non_empty_classes'))} of {_text(a.get('k'))}",
            "class size (images)": ", ".join(f"{name} {_text(a[key])}" for name, key in (
                ("min", "min_size"), ("median", "median_size"), ("mean", "mean_size"), ("99th percentile", "p99_size"),
                ("max", "max_size")) if key in a),
            "search": _search(a.get("search") or {}), "rows skipped": _counts(a.get("rows_skipped") or {}),
            "damaged shards": len(a.get("damaged_shards") or [])}
    if (run_dir / "train").is_dir():
        export = _json_or_none(run_dir / "train" / continuation.EXPORT_META) or {}
        out["train"] = {"model": export.get("model"), "feature dimension": export.get("embed_dim"),
                        "pseudo classes": export.get("num_classes"), "steps": export.get("step"),
                        "backbone": "train/backbone.pt" if (run_dir / "train" / "backbone.pt").is_file()
                        else "not exported yet"}
    results = _json_or_none(run_dir / "eval" / "results.json")
    if results is not None:
        from evaluation import results as eval_results  # models named as in RUN/eval/results.md
        out["eval"] = {"models": list(eval_results.titled(results, eval_results.read_titles(run_dir))),
                       "data sets": sorted({d for m in results.values() for d in m})}
    detected = {p.parent.name: read_json(p) for p in sorted((run_dir / "detect").glob("*/metrics.json"))}
    if detected:
        out["detect"] = {label: f"{int(d['steps']):,} steps, box AP {100 * d['metrics'].get('box/AP', 0):.1f} %, "
                                f"mask AP {100 * d['metrics'].get('mask/AP', 0):.1f} %" for label, d in detected.items()}
    return {stage: None if rows is None else {k: v for k, v in rows.items() if v is not None}
            for stage, rows in out.items()}


def _search(search: Mapping) -> str:
    """assign's nearest-centroid search in words (cluster_job.assign.search_line's facts)."""
    top = f"{count(int(search.get('top_l', 1)), 'label')} per row"
    if search.get("search", "exact") == "exact":
        return f"exact, every centroid, {top}"
    line = f"IVF of {search.get('nlist')} lists, nprobe {', '.join(search.get('nprobe_used') or [])}, {top}"
    if search.get("checked_rows"):
        line += (f"; {100 * search['top1_disagreement']:.2f} % of {search['checked_rows']:,} rows checked against "
                 "exact search changed label")
    return line


def _summaries_html(summaries: dict[str, dict | None]) -> str:
    parts = []
    for stage, summary in summaries.items():
        body = _note("not run yet") if summary is None else _kv_table(summary)
        parts.append(f"<div><h3>{_e(stage)}</h3>{body}</div>")
    return f'<div class="stages">{"".join(parts)}</div>'


# ---- cluster browser ------------------------------------------------------------------------

def _browser_html(samples: cluster_samples.ClusterSamples | None, report_dir: Path, size: int) -> str:
    thumbs = report_dir / "thumbs"
    shutil.rmtree(thumbs, ignore_errors=True)  # a rebuild must not keep the last sample's files
    if samples is None:
        return _note("not run yet: no RUN/labels/S.npy with its RUN/embed/S.keys.txt")
    thumbs.mkdir(parents=True)
    out = [f"<p>{len(samples.classes)} of {samples.num_nonempty} non-empty pseudo classes, "
           "chosen at random (seeded); images and captions from the input shards.</p>"]
    if samples.skipped:
        out.append(_note("not shown: " + ", ".join(f"{k}: {v}" for k, v in sorted(samples.skipped.items()))))
    for c, shown in samples.classes.items():
        figures = []
        for i, s in enumerate(shown):
            name = f"c{c}_{i}.jpg"
            s.thumb.save(thumbs / name, quality=85)
            caption = s.caption if s.caption is not None else "(no caption)"
            figures.append(f'<figure><img src="thumbs/{name}" width="{size}" height="{size}" '
                           f'alt="{_e(s.key)}" title="{_e(s.stem)}/{_e(s.key)}">'
                           f"<figcaption>{_e(caption)}</figcaption></figure>")
        body = "".join(figures) or _note("no image of this class could be read")
        out.append(f'<div class="cls"><h3>class {c} &middot; {count(samples.sizes[c], "image")}</h3>'
                   f'<div class="grid" style="--thumb:{size}px">{body}</div></div>')
    return "".join(out)


# ---- training curves ------------------------------------------------------------------------

# Title and y-axis unit of a scalar by its name (the tag after its section: train/loss -> loss).
CURVES = {
    "loss": ("Training loss", ""), "lr": ("Learning rate", ""), "beta1": ("Adam \u03b21", ""),
    "images_per_s": ("Images per second, all ranks", "images/s"),
    "images_per_s_per_gpu": ("Images per second per rank", "images/s"),
    "grad_norm": ("Gradient norm", "L2 norm"), "peak_mem_mb": ("Peak memory per rank", "MB"),
    "selected_classes": ("Classes scored per step", "classes"), "positives": ("Positive classes per step", "classes"),
    "sampled_negatives": ("Negative classes drawn per step (r1)", "classes"),
    "skipped_samples": ("Samples skipped, in all", "samples"), "skipped_steps": ("Steps skipped, in all", "steps"),
}
LOSS_TERMS = {"loss_classifier": "classifier", "loss_box_reg": "box regression", "loss_mask": "mask",
              "loss_objectness": "RPN objectness", "loss_rpn_box_reg": "RPN box regression"}
_AP = re.compile(r"(.+)/(box|mask)/(AP\w*)")  # detect/<model>/box/AP50


def _safe_name(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tag)


def curve_figures(scalars: dict[str, list[tuple[int, float]]]) -> list[tuple[str, str, str, dict[str, list]]]:
    """(file stem, title, y unit, {series: [(step, value)]}) of one TensorBoard folder's scalars: titled in words,
    flat ones left out, loss terms in one figure, each model's APs (in percent) in one."""
    figures, grouped = [], {}
    for tag in sorted(scalars):
        points = sorted(scalars[tag])
        if len(points) > 1 and min(v for _, v in points) == max(v for _, v in points):
            continue  # a constant says nothing a plot could show
        section, _, name = tag.partition("/")
        if m := _AP.fullmatch(name):
            key = (f"{section}_{m[1]}_AP", f"Average precision on val, {m[1]}", "%")
            grouped.setdefault(key, {})[f"{m[2]} {m[3]}"] = [(s, 100 * v) for s, v in points]
        elif name in LOSS_TERMS:
            grouped.setdefault((f"{section}_loss_terms", "Loss terms", ""), {})[LOSS_TERMS[name]] = points
        else:
            title, unit = CURVES.get(name) or (name.replace("_", " ").capitalize(), "")
            figures.append((tag, title, unit, {title: points}))
    order = [f"{section}/{name}" for name in CURVES]  # the loss first, then the schedule, then throughput
    figures.sort(key=lambda f: order.index(f[0]) if f[0] in order else len(order))
    return figures + [(stem, title, unit, series) for (stem, title, unit), series in grouped.items()]


def plot_curves(figures: list[tuple[str, str, str, dict[str, list]]], out_dir: Path) -> list[tuple[str, Path]]:
    """One PNG per figure of curve_figures (value against step, a legend below the axes for several series);
    returns (title, path) pairs."""
    import matplotlib
    matplotlib.use("Agg")  # no display on clusters and in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for stem, title, unit, series in figures:
        steps = {p[0] for points in series.values() for p in points}
        columns = min(len(series), 3)
        legend_in = 0.0 if len(series) == 1 or len(steps) == 1 else 0.12 + 0.17 * -(-len(series) // columns)
        fig, ax = plt.subplots(figsize=(4, 2.6 + legend_in), dpi=100)
        if len(steps) == 1:  # scores at the end of training (detection's APs): bars, not the points of a curve
            ax.barh(list(series)[::-1], [points[0][1] for points in series.values()][::-1])
            ax.set_title(f"{title}, step {steps.pop():,}", fontsize=9)
            ax.set_xlabel(unit, fontsize=8)
        else:
            for label, points in series.items():
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label,
                        marker="." if len(points) < 50 else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel(unit, fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if legend_in:  # below the x-axis label, outside the data
            fig.legend(loc="lower center", ncol=columns, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, legend_in / (2.6 + legend_in), 1, 1))
        path = out_dir / f"{_safe_name(stem)}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        made.append((title, path))
    return made


def _curves_html(run_dir: Path, report_dir: Path, section: str) -> str:
    """RUN/tensorboard/<section>'s curves, drawn into RUN/report/curves."""
    scalars = tblog.read_scalars(str(run_dir / "tensorboard" / section))
    if not scalars:
        return _note(f"not run yet: no scalars under RUN/tensorboard/{section}")
    made = plot_curves(curve_figures(scalars), report_dir / "curves")
    imgs = "".join(f'<img src="curves/{p.name}" alt="{_e(title)}">' for title, p in made)
    return f'<div class="curves">{imgs}</div>'


# ---- evaluation -----------------------------------------------------------------------------

def _table(first: str, titles: list[str], rows: Mapping[str, list]) -> str:
    """Percent values, a row per model; columns no row has are left out."""
    used = [i for i in range(len(titles)) if any(values[i] is not None for values in rows.values())]
    head = "".join(f"<th>{_e(t)}</th>" for t in [first, *(titles[i] for i in used)])
    body = "".join(f"<tr><td>{_e(name)}</td>" + "".join(
        "<td>&ndash;</td>" if values[i] is None else f"<td>{values[i]:.1f}</td>" for i in used) + "</tr>"
        for name, values in rows.items())
    return f"<table><tr>{head}</tr>{body}</table>"


def _titled(heading: str, body: str, protocol: str) -> str:
    """A table or plot under a short heading, its protocol in a footnote (RUN/eval/results.md has the captions)."""
    return f'<h3>{_e(heading)}</h3>{body}<p class="foot">{_e(protocol)}</p>'


def _present(results: dict, names) -> list[str]:
    return [n for n in names if any(n in sets for sets in results.values())]


def _eval_tables(results: dict) -> list[str]:
    from evaluation import probe_sets
    from evaluation import results as r

    out = []
    sets = _present(results, r.PROBE_COLUMNS)
    per_class = [r.PROBE_TITLES[n] for n in sets if probe_sets.SETS[n].metric != "top1"]
    probe = ("Top-1 accuracy (%)" + (f"; mean per-class accuracy for {', '.join(per_class)}" if per_class else "")
             + ". L-BFGS logistic regression on the raw features")
    sets = _present(results, r.RETRIEVAL_COLUMNS)
    retrieval = (f"Recall@1 (%), {r.RETRIEVAL_PROTOCOL}" + ("; VehicleID: the 800 test list" if "vehicleid" in sets else "")
                 + (f"; GLDv2: mAP@100 of the private queries, on {r.GLDV2_PROTOCOL}" if "gldv2" in sets else ""))
    for heading, columns, protocol in (
            ("Linear probe", r.PROBE_COLUMNS, f"{probe}, C by CLIP's validation sweep, refit on train+val, as the "
                                              "Unicom paper's Tab. 1."),
            ("Linear probe at a fixed C", r.FIXED_C_COLUMNS, f"{probe}, one fit on the train split at the official "
                                                             "example's C (eval.probe.fixed_c)."),
            ("Retrieval", r.RETRIEVAL_COLUMNS, f"{retrieval}; as the Unicom paper's Tab. 2.")):
        titles, rows = r.rows(results, columns)
        if rows:
            out.append(_titled(heading, _table("model", titles, rows), protocol))
    for _, dataset, columns in r.SPLIT_TABLES:  # every test list, split or AP of the sets that have several
        if rows := r.split_rows(results, dataset, columns):
            heading, protocol = SPLIT_HEADINGS[dataset]
            out.append(_titled(heading, _table("model", list(columns), rows), protocol))
    titles, rows = r.finetune_rows(results)
    if rows:  # Tab. 4: each starting model beside the models fine-tuned from it
        out.append(_titled("Supervised fine-tuning", _table("model", titles, rows),
                           "Recall@1 and MAP@R (%) on each set's test split after fine-tuning on its train split, as "
                           "the Unicom paper's Tab. 4; the final model is the result; the row 'selected on the test "
                           "set' holds each column's best epoch, as the official script's max_score."))
    for (model, dataset), rows in r.quantize_cells(results).items():  # compact codes: bits x method
        bits = sorted({b for cells in rows.values() for b in cells})
        head = "".join(f"<th>{b} bits</th>" for b in bits)
        body = "".join(f"<tr><td>{_e(row)}</td>" + "".join(
            "<td>&ndash;</td>" if (c := rows[row].get(b)) is None else
            f"<td>{100 * c.get('map', float('nan')):.1f} ({100 * c.get('r1', float('nan')):.1f}) / "
            f"{c.get('ms', float('nan')):.3g} ms</td>" for b in bits) + "</tr>" for row in sorted(rows))
        out.append(_titled(f"Compact codes: {model} on {dataset}", f"<table><tr><th>method</th>{head}</tr>{body}</table>",
                           "mAP@K (%) in SCQ's protocol by code size, Recall@1 (%) in brackets, search time per query "
                           "after the slash; codes searched by asymmetric distance; float: exact search of the float "
                           "features."))
    return out


# Short heading and protocol footnote of each of results.SPLIT_TABLES, by data set.
SPLIT_HEADINGS = {
    "vehicleid": ("VehicleID, every test list", "Recall@K (%), each test list all against all, the query left out of "
                                                "its own gallery, as Patel et al. 2022."),
    "gldv2": ("GLDv2, public and private queries", "mAP@100 (%) of the test queries against the index, on raw dot "
                                                   "products; (cosine): on L2-normalised features (eval.gldv2_cosine)."),
    "coco": ("COCO detection and segmentation", "Box and mask AP (%) on val2017, Mask R-CNN fine-tuned on each "
                                                "backbone as ViTDet, as the Unicom paper's Tab. 9."),
    "shapes": ("Detection on synthetic shapes", "Box and mask AP (%), Mask R-CNN fine-tuned on each backbone as ViTDet "
                                                "on rendered shapes in COCO's layout (evaluation/detection/synthetic.py): "
                                                "the demo's stand-in for COCO, not comparable with the paper's numbers."),
}


def _eval_html(run_dir: Path, report_dir: Path) -> str:
    results = _json_or_none(run_dir / "eval" / "results.json")
    if results is None:
        return _note("not run yet: no RUN/eval/results.json")
    from evaluation import results as eval_results  # the very tables of RUN/eval/results.md

    results = eval_results.titled(results, eval_results.read_titles(run_dir))
    out = _eval_tables(results)
    assets = report_dir / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    for name, heading, plot in ((eval_results.DIM_PLOT, "Recall@1 by feature dimension", eval_results.plot_dims),
                                (eval_results.BITS_PLOT, "Compact codes by code size", eval_results.plot_quantize)):
        if plot(results, assets / f"eval_{name}"):  # drawn here: the page shows results.json as it is now
            out.append(_titled(heading, f'<img src="assets/eval_{name}" alt="{_e(heading)}">',
                               eval_results.PLOT_CAPTIONS[name] + "."))
    out.append('<p><a href="../eval/results.md">results.md</a>: these tables with their whole captions</p>')
    return "".join(out)


# ---- the page -------------------------------------------------------------------------------

def build_report(run_dir: str | Path, cfg: Any = None) -> Path:
    """Write RUN/report/index.html (and its images) from what the run holds now; returns its path."""
    run_dir = Path(run_dir)
    cfg = config.as_config(cfg) if cfg is not None else config.resolve([f"run_dir={run_dir}"])
    report_dir = run_dir / "report"
    assets = report_dir / "assets"
    for stale in (assets, report_dir / "curves"):
        shutil.rmtree(stale, ignore_errors=True)
    assets.mkdir(parents=True)
    rc = cfg.report

    config_file = run_dir / "config.yaml"
    header = (f'<details><summary>Config: every key of this run (<a href="../config.yaml">config.yaml</a>)</summary>'
              f"<pre>{_e(config_file.read_text())}</pre></details>" if config_file.is_file()
              else _note("no RUN/config.yaml yet"))

    samples = cluster_samples.collect(run_dir, cfg.data.shards, rc.classes, rc.per_class, cfg.seed,
                                      rc.thumb_size, mode=cfg.progress, keys_dir=continuation.embed_source(cfg))
    if samples is not None:
        kmeans = _json_or_none(run_dir / "kmeans" / "summary.json")
        k = kmeans.get("k") if isinstance(kmeans, dict) else None
        cluster_samples.plot_class_sizes(samples.all_sizes, assets / "class_sizes.png", k)
        histogram = '<img src="assets/class_sizes.png" alt="class sizes">'
    else:
        histogram = _note("not run yet: no RUN/labels/S.npy")

    sections = [
        ("What was run", what_was_run(run_dir, cfg)),
        ("Stages", _summaries_html(stage_summaries(run_dir, _embed_dir(run_dir, cfg)))),
        ("Cluster browser", _browser_html(samples, report_dir, rc.thumb_size)),
        ("Class sizes", histogram),
        ("Training curves", _curves_html(run_dir, report_dir, "train")),
        *([("Detection curves", _curves_html(run_dir, report_dir, "detect"))]
          if (run_dir / "tensorboard" / "detect").is_dir() else []),
        ("Evaluation", _eval_html(run_dir, report_dir)),
    ]
    body = "".join(f"<h2>{_e(title)}</h2>{content}" for title, content in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>unicom-ds report: {_e(run_dir.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>unicom-ds run report</h1><p>{_e(run_dir.resolve())} &middot; built "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>{header}{body}</body></html>\n")
    index = report_dir / "index.html"
    write_text_atomic(index, page)  # last: the page never points at images not yet written
    return index


def report_job(cfg) -> Path:
    """Job function of the `report` step: the last of stage=all, and of detect, finetune and quantize once the run
    has a report (slurm.launch.steps_of)."""
    cfg = config.as_config(cfg)
    start = time.monotonic()
    index = build_report(cfg.run_dir, cfg)
    print(f"report: built in {time.monotonic() - start:.1f}s -> {index}", file=sys.stderr)
    return index


def main(argv: list[str] | None = None) -> Path:
    index = report_job(config.resolve(sys.argv[1:] if argv is None else argv))
    print(index)
    return index


if __name__ == "__main__":
    main()
