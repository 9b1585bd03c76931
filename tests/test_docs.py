"""The README's config reference is generated from the YAML defaults; this fails when it is stale."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_reference_is_fresh():
    result = subprocess.run([sys.executable, "docs/config_reference.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_reference_lists_every_default_key_with_its_value_and_comment():
    from unicom_ds.config import defaults, flat_keys

    table = _reference().table()
    cfg = defaults()
    for key in flat_keys(cfg):
        assert f"| `{key}` |" in table, key
    row = next(line for line in table.splitlines() if line.startswith("| `kmeans.mode` |"))
    assert f"`{cfg.kmeans.mode}`" in row and "normalize((img+txt)/2)" in row


def test_stale_readme_is_detected(tmp_path):
    ref = _reference()
    stale = f"intro\n{ref.START}\n| old |\n{ref.END}\nrest\n"
    fresh = ref.render(stale)
    assert fresh != stale and fresh.startswith("intro\n") and fresh.endswith("\nrest\n")
    assert ref.render(fresh) == fresh


def test_reference_comments_follow_nesting(tmp_path):
    yaml = tmp_path / "x.yaml"
    yaml.write_text("a:\n  b: 1   # the b\n  c:\n    d: 2 # deep\ne: 3 # top\n")
    assert _reference().comments(yaml) == {"a": "", "a.b": "the b", "a.c": "", "a.c.d": "deep", "e": "top"}


def test_readme_demo_paragraph_names_every_stage_the_demo_runs(tmp_path):
    from slurm import launch
    from unicom_ds import config

    cfg = config.resolve([f"config={config.CONFIG_DIR / 'demo.yaml'}", f"run_dir={tmp_path / 'run'}"])
    readme = (ROOT / "README.md").read_text()
    start = readme.index("`demo.sh` then writes")
    paragraph = readme[start:readme.index("\n\n", start)]
    steps = launch.steps_of(cfg)
    assert "detect" in steps
    for step in steps:
        assert f"(`{step}`)" in paragraph, step
    assert "minutes" in paragraph and "docs/benchmarks.md" in paragraph
