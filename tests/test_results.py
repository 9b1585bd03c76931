"""results.json merging, the paper-style tables, the dimension plot and the TensorBoard scalars."""
from __future__ import annotations

import json

import pytest

from evaluation import results
from unicom_ds.tblog import read_scalars


def test_merge_updates_metrics_and_keeps_the_rest(tmp_path):
    path = tmp_path / "eval" / "results.json"
    results.merge(path, {"a": {"cub": {"R@1": 0.5, "R@2": 0.6}}, "b": {"sop": {"R@1": 0.7}}})
    merged = results.merge(path, {"a": {"cub": {"R@1": 0.55}, "dtd": {"top1": 0.3}}})
    expected = {"a": {"cub": {"R@1": 0.55, "R@2": 0.6}, "dtd": {"top1": 0.3}}, "b": {"sop": {"R@1": 0.7}}}
    assert merged == expected
    assert json.loads(path.read_text()) == expected


def test_tables_in_paper_order_with_percent_and_row_average():
    res = {
        "unicom:ViT-B/32": {"sop": {"R@1": 0.701}, "cub": {"R@1": 0.5, "R@2": 0.9},
                            "vehicleid": {"800/R@1": 0.8, "1600/R@1": 0.1},
                            "gldv2": {"private/mAP@100": 0.2, "public/mAP@100": 0.9}},
        "run": {"cub": {"R@1": 0.25}},
        "probe-only": {"pets": {"mean_per_class": 0.9, "top1": 0.1}},
    }
    text = results.markdown(res)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| Model | CUB"))
    assert header == "| Model | CUB | SOP | VehicleID (800) | GLDv2 (private) | Average |"
    avg = (0.5 + 0.701 + 0.8 + 0.2) / 4 * 100
    assert f"| unicom:ViT-B/32 | 50.0 | 70.1 | 80.0 | 20.0 | {avg:.1f} |" in lines
    assert "| run | 25.0 | – | – | – | 25.0 |" in lines  # average of what the row has
    assert "| Model | Pets | Average |" in lines
    assert "| probe-only | 90.0 | 90.0 |" in lines  # Pets: CLIP's mean per-class accuracy
    assert text.index("Linear probe") < text.index("Unsupervised retrieval")
    assert "probe-only |" not in text.split("Unsupervised retrieval")[1]


def test_vehicleid_lists_and_gldv2_splits_get_their_own_tables_saying_which_fills_tab2():
    vid = {f"{s}/R@{k}": (s + k) / 10000 for s in (800, 1600, 2400) for k in (1, 5)}
    res = {"m": {"vehicleid": {**vid, "800/MAP@R": 0.5}, "gldv2": {"public/mAP@100": 0.125,
                                                                  "private/mAP@100": 0.25}},
           "n": {"cub": {"R@1": 0.5}}}
    text = results.markdown(res)
    vehicle = text.split("VehicleID as Patel et al. 2022")[1]
    assert "the retrieval table's VehicleID column is the 800 list" in vehicle.split("\n")[0]
    assert "| Model | 800 R@1 | 800 R@5 | 1600 R@1 | 1600 R@5 | 2400 R@1 | 2400 R@5 |" in vehicle
    assert "| m | 8.0 | 8.1 | 16.0 | 16.1 | 24.0 | 24.1 |" in vehicle
    assert "| n |" not in vehicle.split("GLDv2 mAP@100")[0]  # only models that have the set
    gld = text.split("GLDv2 mAP@100")[1]
    assert "the retrieval table's GLDv2 column is the private split" in gld.split("\n")[0]
    assert "| Model | public | private |" in gld and "| m | 12.5 | 25.0 |" in gld
    assert "| m | – | 8.0 | 25.0 | 16.5 |" in text  # Tab. 2: the 800 list and the private split


def test_no_table_for_a_kind_nobody_has():
    text = results.markdown({"m": {"cifar10": {"top1": 0.5}}})
    assert "Linear probe" in text and "retrieval" not in text


def test_dim_curves_average_recall_at_1_over_sets():
    res = {"m": {"cub": {"dim64/R@1": 0.4, "dim32/R@1": 0.2, "dim64/R@2": 0.9},
                 "sop": {"dim64/R@1": 0.6},
                 "vehicleid": {"dim32/800/R@1": 0.4, "dim32/1600/R@1": 0.0},
                 "gldv2": {"dim32/private/mAP@100": 0.9}},  # not a Recall@1: left out
           "n": {"cub": {"R@1": 0.3}}}
    assert results.dim_curves(res) == {"m": ([32, 64], [pytest.approx(0.3), pytest.approx(0.5)])}


def test_plot_dims_writes_a_png_only_with_data(tmp_path):
    assert not results.plot_dims({"m": {"cub": {"R@1": 0.3}}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert results.plot_dims({"m": {"cub": {"dim64/R@1": 0.4, "dim32/R@1": 0.2}}}, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scalars_named_eval_model_dataset_metric(tmp_path):
    res = {"run": {"cub": {"R@1": 0.25, "dim32/R@1": 0.125}}, "openclip:ViT-Tiny-16@x": {"dtd": {"top1": 0.5}}}
    results.log_scalars(tmp_path, res)
    scalars = read_scalars(str(tmp_path / "tensorboard" / "eval"))
    assert {tag: [v for _, v in vals] for tag, vals in scalars.items()} == {
        "eval/run/cub/R@1": [0.25], "eval/run/cub/dim32/R@1": [0.125],
        "eval/openclip:ViT-Tiny-16@x/dtd/top1": [0.5]}


def test_write_all_logs_only_what_was_computed(tmp_path):
    found = {"run": {"cub": {"R@1": 0.25}, "sop": {"R@1": 0.5}}}
    merged, text = results.write_all(tmp_path, found, {"run": {"sop": {"R@1": 0.5}}})
    assert merged == found
    assert (tmp_path / "eval" / "results.md").read_text() == text
    assert set(read_scalars(str(tmp_path / "tensorboard"))) == {"eval/run/sop/R@1"}


def test_rows_row_per_model_column_per_dataset_with_average():
    res = {"a": {"cub": {"R@1": 0.5, "MAP@R": 0.1}, "sop": {"R@1": 0.7}},
           "b": {"sop": {"R@1": 0.2}, "cars": {"MAP@R": 0.3}},
           "c": {"cifar10": {"top1": 0.9}}}
    titles, rows = results.rows(res, results.RETRIEVAL_COLUMNS)
    assert titles == ["CUB", "Cars", "SOP", "Average"]            # the paper's column order, used sets only
    assert rows["a"] == pytest.approx([50.0, None, 70.0, 60.0])
    assert rows["b"] == [None, None, pytest.approx(20.0), pytest.approx(20.0)]  # cars has no R@1 for b
    assert "c" not in rows                                          # no retrieval set at all


def test_every_caption_names_its_protocol_and_option_columns_appear_only_when_scored():
    res = {"m": {"cub": {"R@1": 0.5, "dim64/R@1": 0.5, "dim32/R@1": 0.3, "dim64renorm/R@1": 0.5,
                         "dim32renorm/R@1": 0.4},
                 "gldv2": {"public/mAP@100": 0.1, "private/mAP@100": 0.2, "public-cosine/mAP@100": 0.15,
                           "private-cosine/mAP@100": 0.25},
                 "pets": {"mean_per_class": 0.9, "fixed_c/mean_per_class": 0.8}}}
    text = results.markdown(res)
    assert "C by CLIP's validation sweep" in text and "as the official retrieval.py's get_metric" in text
    fixed = text.split("Linear probe at the official example's fixed C")[1]
    assert "| m | 80.0 | 80.0 |" in fixed.split("\n\n")[1]
    gld = text.split("GLDv2 mAP@100")[1]
    assert "raw dot products of the model's outputs" in gld.split("\n")[0]
    assert "| Model | public | private | public (cosine) | private (cosine) |" in gld
    assert "| m | 10.0 | 20.0 | 15.0 | 25.0 |" in gld
    dims = text.split("Recall@1 (percent) by feature dimension")[1]
    assert "not re-normalised, Euclidean distance, as the official retrieval.py's num_feat" in dims.split("\n")[0]
    assert "| Model | 64 | 32 |" in dims
    assert "| m | 50.0 | 30.0 |" in dims and "| m (re-normalised) | 50.0 | 40.0 |" in dims
    # Without the options: no cosine columns, no re-normalised row, no fixed-C table.
    plain = results.markdown({"m": {"gldv2": {"public/mAP@100": 0.1, "private/mAP@100": 0.2},
                                    "cub": {"dim32/R@1": 0.3}, "pets": {"mean_per_class": 0.9}}})
    assert "| Model | public | private |" in plain and "(cosine) |" not in plain
    assert "re-normalised) |" not in plain and "fixed C" not in plain


def test_cosine_key_names_the_split_variant():
    assert results.cosine_key("private/mAP@100") == "private-cosine/mAP@100"
    assert results.dim_key(128, "R@1") == "dim128/R@1"
    assert results.dim_key(128, "R@1", renormalized=True) == "dim128renorm/R@1"


def test_quantize_rows_name_the_adc_their_codes_were_ranked_by():
    res = {"m": {"nuswide": {"float/mAP@5000": 0.5, "float/bytes": 256, "scq-4x4/mAP@5000": 0.4,
                             "scq-4x4/plain_adc": 1.0, "pq-4x4/mAP@5000": 0.3}}}
    text = results.markdown(res)
    assert "relevant = any shared tag" in text and "rows marked plain ADC: of unsquared ones" in text
    assert "| SCQ (4-bit codebooks, plain ADC) | 40.0" in text and "| PQ (4-bit codebooks) | 30.0" in text
