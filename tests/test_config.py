"""The config layers: defaults < config=FILE < RUN/config.yaml < command line, key checks, save."""
from __future__ import annotations

import re

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import fresh_run
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
        config.resolve([bad, fresh_run()])
    key = bad.split("=")[0]
    assert f"unknown config key '{key}'" in str(err.value)
    assert f"did you mean '{closest}'" in str(err.value)


def test_argument_without_equals_is_refused():
    with pytest.raises(config.ConfigError, match="'stage' is not of the form key=value"):
        config.resolve(["stage"])


def test_bad_stage_value_names_the_key():
    with pytest.raises(config.ConfigError, match="stage=clustr"):
        config.resolve(["stage=clustr", fresh_run()])


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
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "logs"]  # the atomic write left no temp file
    assert [p.name for p in (run / "logs").iterdir()] == ["config_undo.json"]  # what undo_save would put back

    again = config.resolve([f"run_dir={run}"])
    want = config.select(cfg, exclude=("stage", "dry_run"))
    assert config.select(again, exclude=("stage", "dry_run")) == want
    assert again.stage == read_defaults("common.yaml")["stage"]


# ---- types and ranges from the one schema (unicom_ds/schema.py) ------------------------------

@pytest.mark.parametrize("arg, expected", [
    ("train.lr=abc", "a number"),
    ("kmeans.k=abc", "an integer >= 1"),
    ("kmeans.k=1.5", "an integer >= 1"),           # once silently k=1
    ("kmeans.k=0", "an integer >= 1"),
    ("kmeans.niter=abc", "an integer >= 1"),
    ("loss.r1=0", "a number in (0, 1]"),
    ("loss.r2=1.5", "a number in (0, 1]"),
    ("kmeans.mode=both", "joint / image / text"),
    ("kmeans.two_level=maybe", "auto / true / false"),
    ("dry_run=maybe", "true or false"),
    ("train.max_steps=0", "null or an integer >= 1"),
    ("slurm.nodes=two", "null or an integer >= 1"),
    ("embed.slurm.time_min=-5", "an integer >= 1"),
    ("eval.dims=[64,0]", "a list of integers >= 1"),
    ("eval.datasets=cub", "a list of strings"),
    ("train.lr=.inf", "a number"),
    ("seed=-1", "an integer >= 0"),
])
def test_bad_value_names_key_value_and_expectation(arg, expected):
    key, value = arg.split("=")
    with pytest.raises(config.ConfigError) as err:
        config.resolve([arg, fresh_run()])
    msg = str(err.value)
    assert msg.startswith(f"{key}=") and expected in msg, msg
    assert value.strip("[]").split(",")[0].lstrip(".") in msg, msg


def test_all_bad_keys_are_reported_together():
    with pytest.raises(config.ConfigError) as err:
        config.resolve(["train.lr=abc", "kmeans.k=1.5", "stage=clustr", fresh_run()])
    lines = str(err.value).splitlines()
    assert sorted(line.split("=")[0] for line in lines) == ["kmeans.k", "stage", "train.lr"]


def test_values_are_normalised_to_their_type():
    cfg = config.resolve(["kmeans.k=1e6", "train.lr=1", "slurm.mem_gb=2", "run_dir=2024", "kmeans.two_level=true"])
    assert cfg.kmeans.k == 1_000_000 and type(cfg.kmeans.k) is int
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.slurm.mem_gb) is float and cfg.run_dir == "2024" and cfg.kmeans.two_level is True


def test_a_yaml_boolean_for_a_string_key_says_to_quote_it():
    with pytest.raises(config.ConfigError, match=r"train.resume=false: expected a string .*quote it"):
        config.resolve(["train.resume=no", fresh_run()])
    assert config.resolve(["train.resume='no'", fresh_run()]).train.resume == "no"


def test_a_mapping_replaced_by_a_scalar_is_refused():
    with pytest.raises(config.ConfigError, match=r"^slurm=3: expected a mapping of slurm\.\* keys$"):
        config.resolve(["slurm=3", fresh_run()])


def test_run_dir_must_be_creatable(tmp_path):
    with pytest.raises(config.ConfigError, match=r"^run_dir=/proc/x: cannot create a directory in /proc"):
        config.resolve(["run_dir=/proc/x"])
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(config.ConfigError, match=f"run_dir={afile}/run: {afile} exists and is not a directory"):
        config.resolve([f"run_dir={afile}/run"])
    config.resolve([f"run_dir={tmp_path}/new/run"])
    assert list(tmp_path.iterdir()) == [afile]       # the write test left nothing behind


def test_bad_values_in_files_name_the_key(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("kmeans:\n  k: lots\n")
    with pytest.raises(config.ConfigError, match="kmeans.k=lots: expected an integer >= 1"):
        config.resolve([f"config={extra}", fresh_run()])
    extra.write_text("kmeans: {k: [\n")
    with pytest.raises(config.ConfigError, match=f"{extra}: not a readable YAML config"):
        config.resolve([f"config={extra}", fresh_run()])


def test_keys_without_a_rule_are_checked_by_their_default():
    """Keys others add to the YAML files are checked by their default's type; a null default accepts anything."""
    from omegaconf import OmegaConf

    from unicom_ds import schema

    added = {"train": {"new_count": 8, "new_flag": False, "new_path": None}, "loss": {"new_mode": "exact"}}
    assert not {f"{g}.{k}" for g, keys in added.items() for k in keys} & set(schema.RULES)
    base = OmegaConf.to_container(OmegaConf.merge(config.defaults(), added))
    for arg, expected in [("train.new_count=many", "an integer"), ("train.new_count=2.5", "an integer"),
                          ("train.new_flag=perhaps", "true or false"), ("loss.new_mode=[1]", "a string")]:
        with pytest.raises(config.ConfigError, match=f"^{re.escape(arg.split('=')[0])}=.*: expected {expected}"):
            config.resolve([arg, fresh_run()], base=base)
    cfg = config.resolve(["train.new_path=/runs/old", "train.new_count=3", fresh_run()], base=base)
    assert cfg.train.new_path == "/runs/old" and cfg.train.new_count == 3
    assert config.resolve(["train.new_path=[1,2]", fresh_run()], base=base).train.new_path == [1, 2]


def test_every_default_passes_its_own_rule():
    from unicom_ds import schema

    ref = config.defaults()
    for key in config.flat_keys(ref):
        schema.rule(key, OmegaConf.select(ref, key)).coerce(
            OmegaConf.to_container(v) if OmegaConf.is_config(v := OmegaConf.select(ref, key)) else v)
    config.resolve([f"config={config.CONFIG_DIR / 'demo.yaml'}", fresh_run()])


def test_every_explicit_rule_names_a_real_key():
    """A rule for a key that was renamed would silently check nothing."""
    from fnmatch import fnmatchcase

    from unicom_ds import schema

    keys = config.flat_keys(config.defaults())
    for pattern in schema.RULES:
        assert any(fnmatchcase(k, pattern) for k in keys), pattern


def test_undo_save_restores_what_the_file_held_and_leaves_a_later_save(tmp_path):
    """A command whose first job refuses it after submission (the import's join on SLURM) is taken back out of
    RUN/config.yaml; a config a later command saved in between is kept."""
    run = tmp_path / "run"
    first = config.resolve([f"run_dir={run}", "kmeans.k=5"])
    config.undo_save(first)  # nothing saved: nothing to undo
    config.save(first)
    config.undo_save(first)
    assert not (run / "config.yaml").exists() and not (run / "logs" / "config_undo.json").exists()
    config.save(first)
    kept = (run / "config.yaml").read_text()
    second = config.resolve([f"run_dir={run}", "kmeans.k=7"])
    config.save(second)
    assert "k: 7" in (run / "config.yaml").read_text()
    config.undo_save(second)
    assert (run / "config.yaml").read_text() == kept
    config.save(second)
    config.save(config.resolve([f"run_dir={run}", "kmeans.k=9"]))  # a later command, saved before the undo
    config.undo_save(second)
    assert "k: 9" in (run / "config.yaml").read_text()
    config.undo_save(config.resolve([f"run_dir={run}", "kmeans.k=9", "dry_run=true"]))  # one-off keys: unrecorded
    assert "k: 7" in (run / "config.yaml").read_text()  # what the k = 9 command found
