"""The config layers: defaults < config=FILE < RUN/config.yaml < command line, key checks, save."""
from __future__ import annotations

import pytest
import yaml

from unicom_ds import config


def read_defaults(name: str) -> dict:
    with open(config.CONFIG_DIR / name) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("bad, closest", [
    ("kmeans.kk=5", "kmeans.k"),
    ("slurm.partiton=gpu", "slurm.partition"),
    ("loss.marg=0.2", "loss.margin"),
])
def test_unknown_key_names_closest_valid_key(bad, closest):
    with pytest.raises(config.ConfigError) as err:
        config.resolve([bad])
    key = bad.split("=")[0]
    assert f"unknown config key '{key}'" in str(err.value)
    assert f"did you mean '{closest}'" in str(err.value)


def test_argument_without_equals_is_refused():
    with pytest.raises(config.ConfigError, match="'stage' is not of the form key=value"):
        config.resolve(["stage"])


def test_bad_stage_value_names_the_key():
    with pytest.raises(config.ConfigError, match="stage=clustr"):
        config.resolve(["stage=clustr"])


def test_precedence_defaults_file_run_config_cli(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"kmeans": {"k": 7, "niter": 3}, "loss": {"r1": 0.5}}))
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"kmeans": {"niter": 11, "seed": 4}, "loss": {"r1": 0.25}}))

    cfg = config.resolve([f"run_dir={run}", f"config={extra}", "kmeans.k=9"])

    cluster = read_defaults("cluster.yaml")
    assert cfg.kmeans.k == 9                       # command line beats RUN/config.yaml
    assert cfg.kmeans.niter == 3                   # RUN/config.yaml beats config=FILE
    assert cfg.loss.r1 == 0.5                      # RUN/config.yaml beats config=FILE
    assert cfg.kmeans.seed == 4                    # config=FILE beats the defaults
    assert cfg.kmeans.mode == cluster["kmeans"]["mode"]           # untouched: the default
    assert cfg.embed.batch_size == cluster["embed"]["batch_size"]


def test_unknown_key_in_run_config_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"kmeans": {"kay": 3}}))
    with pytest.raises(config.ConfigError) as err:
        config.resolve([f"run_dir={tmp_path}"])
    assert str(tmp_path / "config.yaml") in str(err.value)
    assert "did you mean 'kmeans.k'" in str(err.value)


def test_save_round_trip(tmp_path):
    run = tmp_path / "run"
    cfg = config.resolve([f"run_dir={run}", "stage=kmeans", "kmeans.k=13", "loss.margin=0.25",
                          "slurm.partition=gpu", "dry_run=true"])
    path = config.save(cfg)

    assert path == run / "config.yaml"
    with open(path) as f:
        saved = yaml.safe_load(f)
    assert "stage" not in saved and "dry_run" not in saved   # how to run this call, not the run
    assert saved["kmeans"]["k"] == 13 and saved["loss"]["margin"] == 0.25
    assert saved["slurm"]["partition"] == "gpu"
    assert not [p for p in run.iterdir() if p.name != "config.yaml"]  # the atomic write left no temp file

    again = config.resolve([f"run_dir={run}"])
    want = config.select(cfg, exclude=("stage", "dry_run"))
    assert config.select(again, exclude=("stage", "dry_run")) == want
    assert again.stage == read_defaults("common.yaml")["stage"]
