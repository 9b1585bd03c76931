"""The run report: one static HTML page (RUN/report/index.html) over everything a run has produced so far.

Sections: what was run (and what it stands in for: random CLIP weights, digits in a real set's layout,
damaged input shards), config and stage summaries, a cluster browser (thumbnails and captions of sampled
pseudo classes, like the paper's Fig. 3 and 5), the class-size histogram, training curves and evaluation
tables.
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
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from cluster_job import cluster_samples
from unicom_ds import config, continuation, tblog
from unicom_ds.atomic import atomic_path, read_json, write_text_atomic

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
.curves img{width:400px;margin:4px}
.kv .kv{margin:0}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:4px 8px;margin:4px 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    """HTML of a summary value: a mapping as a nested table, a list item by item, nothing as "none"."""
    if isinstance(value, (dict, list)) and not value:
        return "none"
    if isinstance(value, dict):
        return _kv_table(value)
    if isinstance(value, list):
        return "<br>".join(_cell(v) for v in value)
    if value is None:
        return "unset"
    return _e(f"{value:.4g}" if isinstance(value, float) else value)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _kv_table(d: Mapping) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_cell(v)}</td></tr>" for k, v in d.items())
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
        facts.append(f"k-means: k = {kmeans.get('k')} ({kmeans.get('mode')}) on {kmeans.get('points_used')} "
                     f"of {kmeans.get('points_embedded')} embedded rows")
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

def stage_summaries(run_dir: Path, embed_dir: Path) -> dict[str, dict | None]:
    """{stage: its summary as a flat dict, or None when it has not run yet}."""
    done = sorted(embed_dir.glob("*.done.json"))
    embed = None
    if done:
        skipped: dict[str, int] = {}
        rows = damaged = 0
        for path in done:
            d = read_json(path)
            rows += int(d.get("n", 0))
            damaged += bool(d.get("damaged"))
            for reason, count in d.get("skipped", {}).items():
                skipped[reason] = skipped.get(reason, 0) + int(count)
        embed = {"shards embedded": len(done), "damaged shards": damaged, "rows": rows, "skipped": skipped}
    train = None
    if (run_dir / "train").is_dir():
        train = {"backbone": "train/backbone.pt" if (run_dir / "train" / "backbone.pt").is_file()
                 else "not exported yet"}
        for path in sorted((run_dir / "train").glob("*.json")):
            d = read_json(path)
            train.update(d if isinstance(d, dict) else {path.name: d})
    results = _json_or_none(run_dir / "eval" / "results.json")
    from evaluation import results as eval_results  # models named as in RUN/eval/results.md
    evals = None if results is None else {
        "models": list(eval_results.titled(results, eval_results.read_titles(run_dir))),
        "datasets": sorted({d for m in results.values() for d in m})}
    return {"embed": embed, "kmeans": _json_or_none(run_dir / "kmeans" / "summary.json"),
            "assign": _json_or_none(run_dir / "labels" / "summary.json"), "train": train, "eval": evals}


def _summaries_html(summaries: dict[str, dict | None]) -> str:
    parts = []
    for stage, summary in summaries.items():
        body = _note("not run yet") if summary is None else _kv_table(summary)
        parts.append(f"<h3>{_e(stage)}</h3>{body}")
    return "".join(parts)


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
        out.append(f'<div class="cls"><h3>class {c} &middot; {samples.sizes[c]} images</h3>'
                   f'<div class="grid" style="--thumb:{size}px">{body}</div></div>')
    return "".join(out)


# ---- training curves ------------------------------------------------------------------------

def _safe_name(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tag)


def plot_curves(scalars: dict[str, list[tuple[int, float]]], out_dir: Path) -> list[tuple[str, Path]]:
    """One PNG per scalar tag (value against step), written to out_dir; returns (tag, path) pairs."""
    import matplotlib
    matplotlib.use("Agg")  # no display on clusters and in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for tag in sorted(scalars):
        points = sorted(scalars[tag])
        fig, ax = plt.subplots(figsize=(4, 2.6), dpi=100)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{_safe_name(tag)}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        made.append((tag, path))
    return made


def _curves_html(run_dir: Path, report_dir: Path) -> str:
    curves = report_dir / "curves"
    shutil.rmtree(curves, ignore_errors=True)
    scalars = tblog.read_scalars(str(run_dir / "tensorboard" / "train"))
    if not scalars:
        return _note("not run yet: no scalars under RUN/tensorboard/train")
    imgs = "".join(f'<img src="curves/{p.name}" alt="{_e(tag)}">' for tag, p in plot_curves(scalars, curves))
    return f'<div class="curves">{imgs}</div>'


# ---- evaluation -----------------------------------------------------------------------------

def _eval_html(run_dir: Path, report_dir: Path) -> str:
    eval_dir = run_dir / "eval"
    results = _json_or_none(eval_dir / "results.json")
    if results is None:
        return _note("not run yet: no RUN/eval/results.json")
    from evaluation import results as eval_results  # the very tables of RUN/eval/results.md

    results = eval_results.titled(results, eval_results.read_titles(run_dir))
    out = []
    tables = [(caption, *eval_results.rows(results, columns)) for caption, columns in eval_results.PAPER_TABLES]
    tables += [(caption, list(columns), eval_results.split_rows(results, dataset, columns))
               for caption, dataset, columns in eval_results.DETECTION_TABLES]  # Tab. 9 (or the demo's shapes)
    for caption, titles, rows in tables:
        if not rows:
            continue
        head = "".join(f"<th>{_e(t)}</th>" for t in titles)
        body = "".join(
            f"<tr><td>{_e(model)}</td>" + "".join(
                f"<td>{'&ndash;' if v is None else f'{v:.1f}'}</td>" for v in values) + "</tr>"
            for model, values in rows.items())
        out.append(f"<h3>{_e(caption)}</h3><table><tr><th>model</th>{head}</tr>{body}</table>")
    titles, rows = eval_results.finetune_rows(results)
    if rows:  # Tab. 4: each starting model beside the models fine-tuned from it
        head = "".join(f"<th>{_e(t)}</th>" for t in titles)
        body = "".join(f"<tr><td>{_e(model)}</td>" + "".join(
            f"<td>{'&ndash;' if v is None else f'{v:.1f}'}</td>" for v in values) + "</tr>" for model, values in rows.items())
        out.append(f"<h3>{_e(eval_results.FINETUNE_CAPTION)}</h3><table><tr><th>model</th>{head}</tr>{body}</table>")
    for (model, dataset), rows in eval_results.quantize_cells(results).items():  # compact codes: bits x method
        bits = sorted({b for cells in rows.values() for b in cells})
        head = "".join(f"<th>{b} bits</th>" for b in bits)
        body = "".join(f"<tr><td>{_e(row)}</td>" + "".join(
            "<td>&ndash;</td>" if (c := rows[row].get(b)) is None else
            f"<td>{100 * c.get('map', float('nan')):.1f} ({100 * c.get('r1', float('nan')):.1f}) / "
            f"{c.get('ms', float('nan')):.3g} ms</td>" for b in bits) + "</tr>" for row in sorted(rows))
        out.append(f"<h3>{_e(eval_results.QUANTIZE_CAPTION)}: {_e(model)} on {_e(dataset)}</h3>"
                   f"<table><tr><th>method</th>{head}</tr>{body}</table>")
    assets = report_dir / "assets"
    for png in sorted(eval_dir.glob("*.png")):
        caption = eval_results.PLOT_CAPTIONS.get(png.name, png.stem)
        out.append(f'<figure><img src="assets/eval_{png.name}" alt="{_e(caption)}">'
                   f"<figcaption>{_e(caption)} (RUN/eval/{_e(png.name)})</figcaption></figure>")
        shutil.copyfile(png, assets / f"eval_{png.name}")
    for md in sorted(eval_dir.glob("*.md")):
        out.append(f'<p><a href="../eval/{md.name}">{_e(md.name)}</a></p>')
    return "".join(out)


# ---- the page -------------------------------------------------------------------------------

def build_report(run_dir: str | Path, cfg: Any = None) -> Path:
    """Write RUN/report/index.html (and its images) from what the run holds now; returns its path."""
    run_dir = Path(run_dir)
    cfg = config.as_config(cfg) if cfg is not None else config.resolve([f"run_dir={run_dir}"])
    report_dir = run_dir / "report"
    assets = report_dir / "assets"
    shutil.rmtree(assets, ignore_errors=True)
    assets.mkdir(parents=True)
    rc = cfg.report

    config_file = run_dir / "config.yaml"
    header = (f'<details><summary>config (<a href="../config.yaml">config.yaml</a>)</summary>'
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
        ("Training curves", _curves_html(run_dir, report_dir)),
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
    """Job function of the `report` step (the last of stage=all)."""
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
