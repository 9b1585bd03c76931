"""Evaluation outputs: RUN/eval/results.json, the paper-style tables, the dimension plot, TensorBoard.

results.json is {model: {dataset: {metric: value}}} with values as fractions (percent only in the
tables), merged across eval runs in the same run directory: a rerun replaces the metrics it
recomputes and keeps the rest. Truncated-dimension retrieval metrics are stored as
`dim<D>/<metric>` (`dim128/R@1`, the official protocol: normalised, cut, not re-normalised) and
`dim<D>renorm/<metric>` (re-normalised, eval.dims_renormalize); GLDv2 on cosine similarity
(eval.gldv2_cosine) as `public-cosine/` and `private-cosine/`; the probe at the official example's
fixed C as `fixed_c/<metric>`. The tables follow the Unicom paper: Tab. 1 (linear probe) and
Tab. 2 (retrieval), a row per model, a column per data set in the paper's order, plus the average
of the columns the row has. VehicleID (three test lists) and GLDv2 (public and private queries)
get a table of their own that shows every list and split, and says which one fills Tab. 2. Every
caption names the protocol its columns were computed with.

Tables, plots and the report name a model by its title where the eval stage gave it one (MLCD models: family,
size and format, "MLCD ViT-L/14-336 (CLIP format)"; RUN/eval/models.json, {label: title}), else by its label;
results.json and TensorBoard keep the labels.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

from unicom_ds.atomic import atomic_path, read_json, write_json_atomic, write_text_atomic

from evaluation import probe_sets, retrieval_sets
from evaluation.linear_probe import FIXED_C

# Retrieval set -> (column title, the metric Tab. 2 reports), in the paper's column order.
RETRIEVAL_COLUMNS = {
    "cub": ("CUB", "R@1"), "cars": ("Cars", "R@1"), "sop": ("SOP", "R@1"),
    "inshop": ("In-Shop", "R@1"), "inat": ("iNat", "R@1"), "vehicleid": ("VehicleID (800)", "800/R@1"),
    "gldv2": ("GLDv2 (private)", "private/mAP@100"),
}
PROBE_TITLES = {
    "cifar10": "CIFAR10", "cifar100": "CIFAR100", "food101": "Food101", "birdsnap": "Birdsnap",
    "sun397": "SUN397", "stanford_cars": "Cars", "fgvc_aircraft": "Aircraft", "dtd": "DTD",
    "pets": "Pets", "caltech101": "Caltech101", "flowers102": "Flowers", "eurosat": "EuroSAT",
    "imagenet": "ImageNet",
}
PROBE_COLUMNS = {name: (title, probe_sets.SETS[name].metric) for name, title in PROBE_TITLES.items()}
FIXED_C_COLUMNS = {name: (title, f"{FIXED_C}/{metric}") for name, (title, metric) in PROBE_COLUMNS.items()}
DIM_PREFIX, RENORM = "dim", "renorm"
_DIM = re.compile(rf"^{DIM_PREFIX}(\d+)({RENORM})?$")
COSINE = "-cosine"


def dim_key(dim: int, metric: str, renormalized: bool = False) -> str:
    return f"{DIM_PREFIX}{dim}{RENORM if renormalized else ''}/{metric}"


def cosine_key(metric: str) -> str:
    """GLDv2's cosine-similarity variant of a split's metric: public/mAP@100 -> public-cosine/mAP@100."""
    split, _, name = metric.partition("/")
    return f"{split}{COSINE}/{name}"


def merge(path: str | os.PathLike, new: dict) -> dict:
    """Merge `new` into the results file at `path` (atomically) and return the merged results."""
    merged = read_json(path) if Path(path).is_file() else {}
    for model, sets in new.items():
        for dataset, metrics in sets.items():
            merged.setdefault(model, {}).setdefault(dataset, {}).update(metrics)
    write_json_atomic(path, merged)
    return merged


RETRIEVAL_PROTOCOL = ("features L2-normalised, neighbours by Euclidean distance, as the official retrieval.py's "
                      "get_metric")
GLDV2_PROTOCOL = "raw dot products of the model's outputs, as the official get_metric_google_landmark"
# (caption, columns) of the paper's two tables and the fixed-C probe.
PAPER_TABLES = (
    ("Linear probe (top-1 accuracy; mean per-class accuracy for Aircraft, Pets, Caltech101 and Flowers), "
     "as in the Unicom paper's Tab. 1: L-BFGS logistic regression on the raw features, C by CLIP's validation "
     "sweep, refit on train+val", PROBE_COLUMNS),
    ("Linear probe at the official example's fixed C (eval.probe.fixed_c, 0.601 by default): one fit on the "
     "train split, same metrics as Tab. 1", FIXED_C_COLUMNS),
    (f"Unsupervised retrieval (Recall@1, {RETRIEVAL_PROTOCOL}; VehicleID: Recall@1 on the 800 test list; "
     f"GLDv2: mAP@100 of the private test queries on {GLDV2_PROTOCOL}), as in the Unicom paper's Tab. 2",
     RETRIEVAL_COLUMNS),
)
# Sets scored under several test lists or splits: every one in a table of its own ({title: metric}).
DETECTION_COLUMNS = {f"{key} {m}": f"{key}/{m}" for key in ("box", "mask") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
SPLIT_TABLES = (
    ("VehicleID as Patel et al. 2022: each test list all against all, the query left out of its own "
     "gallery (Recall@K, percent); the retrieval table's VehicleID column is the 800 list", "vehicleid",
     {f"{size} R@{k}": f"{size}/R@{k}" for size in retrieval_sets.VEHICLEID_SIZES for k in (1, 5)}),
    (f"GLDv2 mAP@100 (percent) of the public and the private test queries against the index, on "
     f"{GLDV2_PROTOCOL}; '(cosine)' columns on L2-normalised features (eval.gldv2_cosine); the retrieval "
     "table's GLDv2 column is the private split", "gldv2",
     {"public": "public/mAP@100", "private": "private/mAP@100",
      "public (cosine)": cosine_key("public/mAP@100"), "private (cosine)": cosine_key("private/mAP@100")}),
    *(DETECTION_TABLES := (
        ("COCO detection and instance segmentation (val2017): Mask R-CNN fine-tuned on each backbone as ViTDet, "
         "box and mask AP (percent), as in the Unicom paper's Tab. 9", "coco", DETECTION_COLUMNS),
        ("Synthetic shapes, the demo's stand-in for COCO (evaluation/detection/synthetic.py, in COCO's layout; not "
         "COCO val2017, not comparable with the paper's COCO numbers): Mask R-CNN fine-tuned on each backbone as ViTDet, "
         "box and mask AP (percent)", "shapes", DETECTION_COLUMNS))),
)


def _percent(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else 100 * value


def rows(results: dict, columns: dict[str, tuple[str, str]]) -> tuple[list[str], dict[str, list]]:
    """(column titles + "Average", {model: [percent or None per column] + [average]}) for the models
    holding any of `columns`' data sets; columns nobody has are left out."""
    used = [name for name in columns if any(name in sets for sets in results.values())]
    out = {}
    for model, sets in results.items():
        values = [_percent(sets.get(n, {}).get(columns[n][1])) for n in used]
        present = [v for v in values if v is not None]
        if present:
            out[model] = values + [sum(present) / len(present)]
    return [columns[n][0] for n in used] + ["Average"], out


def _markdown_table(titles: list[str], body: dict[str, list]) -> str:
    lines = ["| Model | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    for model, values in body.items():
        lines.append(f"| {model} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def table(results: dict, columns: dict[str, tuple[str, str]]) -> str:
    """A markdown table: a row per model holding any of `columns`' data sets, values in percent."""
    titles, body = rows(results, columns)
    return _markdown_table(titles, body) if body else ""


def split_rows(results: dict, dataset: str, columns: dict[str, str]) -> dict[str, list]:
    """{model: [percent or None per column]} of one data set's metrics `columns` ({title: metric})."""
    return {model: [_percent(sets[dataset].get(m)) for m in columns.values()]
            for model, sets in results.items() if dataset in sets}


def split_table(results: dict, dataset: str, columns: dict[str, str]) -> str:
    """A markdown table of one data set's metrics `columns` ({title: metric}), a row per model that has it;
    columns no model has are left out."""
    body = split_rows(results, dataset, columns)
    used = [i for i in range(len(columns)) if any(values[i] is not None for values in body.values())]
    if not used:
        return ""
    return _markdown_table([list(columns)[i] for i in used], {m: [v[i] for i in used] for m, v in body.items()})


# Tab. 4, supervised fine-tuning (evaluation.finetune): the model fine-tuned on set S from the model
# labelled INIT is the results.json row ft-S:INIT, scored on S's test split.
FT_PREFIX = "ft-"
# A fine-tuned model's best epoch on its own test split (the official script's number), stored as SELECTED<metric>.
SELECTED = "test-selected/"
SELECTED_ROW = "selected on the test set, as the official script"
FINETUNE_SETS = ("cub", "cars", "sop", "inshop", "inat")
FINETUNE_METRICS = ("R@1", "MAP@R")
FINETUNE_CAPTION = ("Supervised fine-tuning on each set's train split, scored on its test split (Recall@1 and "
                    "MAP@R, percent): the starting model and the model fine-tuned from it, as in the Unicom "
                    "paper's Tab. 4; the final model is the result, the row 'selected on the test set, as the official "
                    "script' holds each column's best epoch (deepglint/unicom retrieval.py's max_score)")


def finetune_rows(results: dict) -> tuple[list[str], dict[str, list]]:
    """(column titles, {row: [percent or None]}): per starting model, its row and its fine-tuned row."""
    tuned: dict[str, dict[str, str]] = {}  # init label -> {set: fine-tuned row}
    for model, sets in results.items():
        name, _, init = model[len(FT_PREFIX):].partition(":")
        if model.startswith(FT_PREFIX) and name in FINETUNE_SETS and name in sets:
            tuned.setdefault(init, {})[name] = model
    used = [n for n in FINETUNE_SETS if any(n in t for t in tuned.values())]
    titles = [f"{RETRIEVAL_COLUMNS[n][0]} {m}" for n in used for m in FINETUNE_METRICS]
    body = {}
    for init, by_set in tuned.items():
        for row, source, prefix in ((init, lambda n: init, ""), (f"{init} fine-tuned", lambda n: by_set[n], ""),
                                    (f"{init} fine-tuned, {SELECTED_ROW}", lambda n: by_set[n], SELECTED)):
            body[row] = [_percent(results.get(source(n), {}).get(n, {}).get(prefix + m)) if n in by_set else None
                         for n in used for m in FINETUNE_METRICS]
        if all(v is None for v in body[f"{init} fine-tuned, {SELECTED_ROW}"]):
            del body[f"{init} fine-tuned, {SELECTED_ROW}"]
    return titles, body


def finetune_table(results: dict) -> str:
    titles, body = finetune_rows(results)
    return _markdown_table(titles, body) if body else ""


# Compact codes (evaluation.quantize): a set's metrics stored as UNIT/METRIC, UNIT being `float` (exact
# float search) or METHOD-MxNBITS (M sub-quantisers of NBITS bits: a code of M*NBITS bits).
QUANTIZE_METHODS = {"pq": "PQ", "opq": "OPQ+PQ", "ivfpq": "IVF-PQ", "scq": "SCQ",
                    "scq_e2e": "SCQ end to end"}
QUANTIZE_CAPTION = ("Compact codes (quantize stage): mAP@K in SCQ's protocol by code size (percent; flickr25k and "
                    "nuswide: mAP@5000 of their queries against their database, relevant = any shared tag), Recall@1 in "
                    "brackets, search time per query after the slash; codes searched by asymmetric distance (the sum of "
                    "squared sub-space distances; rows marked plain ADC: of unsquared ones, as SCQ's code); float is "
                    "exact search of the float features")
_UNIT = re.compile(r"^(float|(pq|opq|ivfpq|scq|scq_e2e)-(\d+)x(\d+))/(.+)$")


def quantize_cells(results: dict) -> dict[tuple[str, str], dict[str, dict[int, dict[str, float]]]]:
    """{(model, set): {row title: {bits: {"map", "r1", "ms"}}}} of every set holding quantize metrics."""
    out: dict = {}
    for model, sets in results.items():
        for dataset, values in sets.items():
            for key, value in values.items():
                m = _UNIT.match(key)
                if m is None:
                    continue
                unit, method, books, nbits, metric = m.groups()
                if method:
                    adc = ", plain ADC" if values.get(f"{unit}/plain_adc") else ""
                    row, bits = f"{QUANTIZE_METHODS[method]} ({nbits}-bit codebooks{adc})", int(books) * int(nbits)
                else:
                    row, bits = "float", 8 * int(values.get("float/bytes", 0))
                name = ("map" if metric.startswith("mAP@") and "/" not in metric else "r1" if metric == "R@1"
                        else "ms" if metric == "ms_per_query" else None)
                if name:
                    cell = out.setdefault((model, dataset), {}).setdefault(row, {}).setdefault(bits, {})
                    cell[name] = value
                    if name == "map":
                        cell["k"] = int(metric[4:])  # the K it was scored at
    return out


def quantize_table(results: dict) -> str:
    parts = []
    for (model, dataset), rows in quantize_cells(results).items():
        all_bits = sorted({b for cells in rows.values() for b in cells})
        ks = sorted({c["k"] for cells in rows.values() for c in cells.values() if "k" in c})
        scored = f", mAP@{'/'.join(map(str, ks))} (percent)" if ks else ""
        lines = [f"{model} on {dataset}{scored}:", "", "| Method | " + " | ".join(f"{b} bits" for b in all_bits) + " |",
                 "|---|" + "---:|" * len(all_bits)]
        for row in sorted(rows, key=lambda r: (r != "float", r)):
            cells = [rows[row].get(b) for b in all_bits]
            lines.append(f"| {row} | " + " | ".join(
                "–" if c is None else f"{100 * c.get('map', math.nan):.1f} ({100 * c.get('r1', math.nan):.1f}) / "
                f"{c.get('ms', math.nan):.3g} ms" for c in cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# Below the axes, outside the data (a legend inside hid the first point); bbox_inches="tight" keeps it in the file.
LEGEND_BELOW = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.18), "frameon": False}


def plot_quantize(results: dict, path: str | os.PathLike) -> bool:
    """mAP@K against code bits, a line per method (and the float features as a level), per (model, set)."""
    cells = quantize_cells(results)
    if not cells:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, ((model, dataset), rows) in zip(axes[0], cells.items()):
        for row, by_bits in sorted(rows.items()):
            bits = sorted(b for b in by_bits if "map" in by_bits[b])
            if row == "float":
                for b in bits:
                    ax.axhline(100 * by_bits[b]["map"], color="gray", ls="--", label=f"float ({b} bits)")
            else:
                ax.plot(bits, [100 * by_bits[b]["map"] for b in bits], marker="o", label=row)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("code bits per image")
        ax.set_ylabel("mAP@K (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{model} on {dataset}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, **LEGEND_BELOW)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def markdown(results: dict) -> str:
    """The paper's two tables, then the per-split tables, each with its caption (a table is left
    out when no model has any of its sets)."""
    parts = [f"{caption}\n\n{text}" for caption, columns in PAPER_TABLES if (text := table(results, columns))]
    parts += [f"{caption}\n\n{text}" for caption, dataset, columns in SPLIT_TABLES
              if (text := split_table(results, dataset, columns))]
    if text := dim_table(results):
        parts.append(f"{DIM_CAPTION}\n\n{text}")
    if text := finetune_table(results):
        parts.append(f"{FINETUNE_CAPTION}\n\n{text}")
    if text := quantize_table(results):
        parts.append(f"{QUANTIZE_CAPTION}\n\n{text}")
    return "\n\n".join(parts) + "\n"


RENORM_LABEL = " (re-normalised)"
DIM_PROTOCOL = ("the first D dimensions of the L2-normalised features, not re-normalised, Euclidean distance, as "
                "the official retrieval.py's num_feat; rows marked" + RENORM_LABEL + " re-normalise the cut features "
                "(eval.dims_renormalize)")
DIM_CAPTION = f"Recall@1 (percent) by feature dimension, mean over the retrieval sets scored at it: {DIM_PROTOCOL}"


def dim_curves(results: dict) -> dict[str, tuple[list[int], list[float]]]:
    """Per model (and per model + RENORM_LABEL for re-normalised prefixes): the dimensions evaluated and
    the mean Recall@1 (Tab. 2's R@1 columns) at each, averaged over the retrieval sets evaluated at it."""
    curves = {}
    for model, sets in results.items():
        by_dim: dict[tuple[bool, int], list[float]] = {}
        for name, (_, metric) in RETRIEVAL_COLUMNS.items():
            if not metric.endswith("R@1"):
                continue
            for key, value in sets.get(name, {}).items():
                head, _, rest = key.partition("/")
                if (m := _DIM.match(head)) and rest == metric:
                    by_dim.setdefault((bool(m.group(2)), int(m.group(1))), []).append(value)
        for renorm in (False, True):
            dims = sorted(d for r, d in by_dim if r == renorm)
            if dims:
                curves[model + (RENORM_LABEL if renorm else "")] = (
                    dims, [sum(by_dim[renorm, d]) / len(by_dim[renorm, d]) for d in dims])
    return curves


def dim_table(results: dict) -> str:
    """dim_curves as a markdown table: a row per curve, a column per dimension."""
    curves = dim_curves(results)
    all_dims = sorted({d for dims, _ in curves.values() for d in dims}, reverse=True)
    body = {row: [100 * dict(zip(dims, values))[d] if d in dims else None for d in all_dims]
            for row, (dims, values) in curves.items()}
    return _markdown_table([str(d) for d in all_dims], body) if body else ""


def plot_dims(results: dict, path: str | os.PathLike) -> bool:
    """Recall@1 against feature dimension, a line per model (the paper's Fig. 1a); False if no data."""
    curves = dim_curves(results)
    if not curves:
        return False
    import matplotlib
    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for model, (dims, values) in curves.items():
        ax.plot(dims, [100 * v for v in values], marker="o", label=model)
    ax.set_xscale("log", base=2)
    all_dims = sorted({d for dims, _ in curves.values() for d in dims})
    ax.set_xticks(all_dims, [str(d) for d in all_dims])
    ax.set_xlabel("feature dimension (first D dims of the normalised features)")
    ax.set_ylabel("Recall@1 (%), mean over retrieval sets")
    ax.set_ylim(0, 100)  # the whole scale: a 2-point change must not look steep
    ax.grid(alpha=0.3)
    ax.legend(**LEGEND_BELOW)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def log_scalars(run_dir: str | os.PathLike, results: dict, step: int = 0) -> None:
    """Every value as the TensorBoard scalar eval/<model>/<dataset>/<metric>."""
    from unicom_ds.tblog import writer

    with writer(str(run_dir), "eval") as w:
        for model, sets in results.items():
            for dataset, metrics in sets.items():
                for metric, value in metrics.items():
                    w.add_scalar(f"eval/{model}/{dataset}/{metric}", value, step)


# RUN/eval's plots and what each shows (the report's captions).
DIM_PLOT, BITS_PLOT = "recall_vs_dim.png", "map_vs_bits.png"
PLOT_CAPTIONS = {
    DIM_PLOT: f"Recall@1 against feature dimension, averaged over the retrieval sets evaluated at each dimension, "
              f"a line per model, as in the Unicom paper's Fig. 1a: {DIM_PROTOCOL}",
    BITS_PLOT: "Compact codes: mAP@K against code bits per image, a line per method, the float features as a "
               "dashed level, per model and data set",
}


TITLES_FILE = "models.json"


def read_titles(run_dir: str | os.PathLike) -> dict[str, str]:
    """RUN/eval/models.json: {label: how tables name the model}, {} before the eval stage wrote one."""
    path = Path(run_dir) / "eval" / TITLES_FILE
    return read_json(path) if path.is_file() else {}


def titled(results: dict, titles: dict[str, str]) -> dict:
    """`results` keyed by how tables name each model: its title, else its label; a fine-tuned row ft-SET:INIT
    names INIT so. Labels that would share a name keep their label beside it."""
    def name(label: str) -> str:
        if label.startswith(FT_PREFIX):
            head, _, init = label.partition(":")
            return f"{head}:{titles.get(init, init)}"
        return titles.get(label, label)

    shown = {label: name(label) for label in results}
    count = Counter(shown.values())
    return {(f"{shown[label]} [{label}]" if count[shown[label]] > 1 else shown[label]): sets
            for label, sets in results.items()}


def write_all(run_dir: str | os.PathLike, found: dict, computed: dict,
              titles: dict[str, str] | None = None) -> tuple[dict, str]:
    """Merge this job's results `found` into RUN/eval/results.json and its model `titles` into
    RUN/eval/models.json, rewrite results.md and recall_vs_dim.png (models by title), log the `computed` ones
    (not those a rerun found done) to TensorBoard; returns (all results, the tables' markdown)."""
    out = Path(run_dir) / "eval"
    merged = merge(out / "results.json", found)
    known = read_titles(run_dir)
    if titles and titles.items() - known.items():
        known.update(titles)
        write_json_atomic(out / TITLES_FILE, known)
    shown = titled(merged, known)
    text = markdown(shown)
    write_text_atomic(out / "results.md", text)
    plot_dims(shown, out / DIM_PLOT)
    plot_quantize(shown, out / BITS_PLOT)
    log_scalars(run_dir, computed)
    return merged, text
