"""The README's demo-sized commands run as written, for real (issue 32): every command of a code block whose first
line opens with DEMO_MARKER (`# on the demo (bash demo.sh first`), taken from README.md and run in README order,
exits 0 and leaves what it is for.

They run in a copy of the checkout as `bash demo.sh` leaves it, at a smaller size: a temporary folder that links
every entry of the repository but `runs/` and `data/`, which are its own: `data/demo` (4 shards),
`data/demo_eval` (SOP's and EuroSAT's stand-ins, with SOP's train split) and `data/demo_coco` written by the
demo's own generators with fewer images, and `runs/demo` made by demo.sh's command
(`python slurm/submit.py config=slurm/configs/demo.yaml`) with fewer detection steps. So each command's
`runs/demo...` and `data/...` paths are this test's, relative as in the README, and nothing of the checkout's
run state is read or written.

What each command must leave (CHECKS, by its kind; a command of a kind without a check fails the test):
fine-tuning `RUN/finetune/SET/backbone.pt` and its results rows; quantize every unit's `UNIT.json`, made with the
command's keys; detection a `metrics.json` of the command's model and steps; a cluster stage labels for every
shard (top-l ones with `assign.top_l`), and for an import of `cluster_job.demo_release`'s stand-in the demo
run's own features, keys and labels; train `backbone.pt` of the command's model; the MLCD export a folder whose
`transformers.MLCDVisionModel` gives our model's features.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from test_readme_commands import DEMO_MARKER

README = REPO / "README.md"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# demo.sh's command at a smaller size: its data are smaller (below), its detection 20 steps instead of 200
SMALL_DEMO = ["detect.steps=20", "detect.warmup_steps=5", "detect.decay_steps=[15]", "progress=off"]


def demo_commands(text: str) -> list[str]:
    """The commands of the demo-sized blocks, in README order: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S):
        if block.startswith(DEMO_MARKER):
            for line in block.replace("\\\n", " ").splitlines():
                line = " ".join(line.split())
                if line and not line.startswith("#"):
                    commands.append(line)
    return commands


def kind(argv: list[str]) -> str:
    """Which check a command gets: `submit:STAGE`, `module:NAME` (python -m), or `python -c`."""
    if argv[:2] == ["python", "slurm/submit.py"]:
        return "submit:" + args_of(argv).get("stage", "?")
    if argv[:2] == ["python", "-m"]:
        return f"module:{argv[2]}" + (f" {argv[3]}" if argv[2] == "unicom_ds.mlcd_vit" else "")
    if argv[:2] == ["python", "-c"] and "MLCDVisionModel.from_pretrained(" in argv[2]:
        return "python -c MLCDVisionModel"
    return " ".join(argv[:2])


def args_of(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv[2:] if "=" in a)


COMMANDS = demo_commands(README.read_text())


def test_demo_blocks_are_found_and_each_command_has_a_check():
    assert len(COMMANDS) >= 10, COMMANDS
    sample = f"```bash\n{DEMO_MARKER}, then x)\npython slurm/submit.py stage=train \\\n    run_dir=runs/demo\n```\n" \
             "```bash\npython slurm/submit.py stage=eval\n```\n"
    assert demo_commands(sample) == ["python slurm/submit.py stage=train run_dir=runs/demo"]
    kinds = [kind(shlex.split(c, comments=True)) for c in COMMANDS]
    assert not [k for k in kinds if k not in CHECKS], f"README demo commands without a check here: {kinds}"
    for stage in ("finetune", "quantize", "detect", "cluster", "train"):
        assert f"submit:{stage}" in kinds, f"no demo-sized stage={stage} command in the README"
    assert {"module:cluster_job.demo_release", "module:unicom_ds.mlcd_vit export", "python -c MLCDVisionModel"} \
        <= set(kinds)
    for command in COMMANDS:
        argv = shlex.split(command, comments=True)
        assert argv[0] == "python" and "$" not in command and "/data/" not in command, command
        if kind(argv).startswith("submit:"):  # on this machine, in the demo's run directories
            args = args_of(argv)
            assert args.get("launcher") == "local" and args["run_dir"].startswith("runs/demo"), command


# ---- the small demo -----------------------------------------------------------------------------

def run(argv: list[str], cwd: Path, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, *argv[1:]] if argv[0] == "python" else argv, cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n{out[-5000:]}"
    return out


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the checkout after `bash demo.sh`, smaller: the repository linked, data/ and runs/ its own."""
    from cluster_job import demo_data
    from evaluation import demo_sets
    from evaluation.detection import synthetic

    root = tmp_path_factory.mktemp("checkout")
    for entry in REPO.iterdir():
        if entry.name not in ("runs", "data"):
            (root / entry.name).symlink_to(entry)
    data = root / "data"
    demo_data.write(data / "demo", shards=4, copies=2, size=64)  # 63 pairs (demo.sh: 336 at 128 px)
    x, y = demo_sets.digit_images(400)
    demo_sets.write_sop(data / "demo_eval", x[:100], y[:100], train=(x[100:300], y[100:300]))
    demo_sets.write_eurosat(data / "demo_eval", x[:200], y[:200])
    demo_sets.mark(data / "demo_eval")
    synthetic.write(data / "demo_coco", train=8, val=4, size=64)
    start = time.monotonic()
    run(["python", "slurm/submit.py", "config=slurm/configs/demo.yaml", *SMALL_DEMO], root)
    assert (root / "runs" / "demo" / "report" / "index.html").is_file()
    return {"root": root, "failed": None, "seconds": {"demo": time.monotonic() - start}, "release": {}, "export": {}}


def test_demo_shards_carry_urls_and_an_older_demos_are_written_again(tmp_path):
    """img2dataset's `url` in each sample's json, one per sample; shards of an older demo without it are written
    again with the same keys, images and captions, and demo_release names such shards."""
    import webdataset as wds
    from webdataset import TarWriter

    from cluster_job import demo_data, demo_release

    paths = demo_data.write(tmp_path / "demo", shards=2, copies=1, size=32)
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))
    urls = [json.loads(s["json"])["url"] for s in samples]
    assert len(set(urls)) == len(urls) and all(u.startswith("https://demo.unicom-ds.invalid/") for u in urls)
    older = tmp_path / "older"
    older.mkdir()
    with TarWriter(str(older / "00000.tar")) as sink:  # an older demo's first shard: its json has no url
        for s in samples[: len(samples) // 2]:
            meta = {k: v for k, v in json.loads(s["json"]).items() if k != "url"}
            sink.write({"__key__": s["__key__"], "jpg": s["jpg"], "txt": s["txt"], "json": json.dumps(meta)})
    run_dir = tmp_path / "run"
    (run_dir / "embed").mkdir(parents=True)
    keys = [s["__key__"] for s in samples if s["__key__"].startswith("00000")]
    (run_dir / "embed" / "00000.keys.txt").write_text("".join(k + "\n" for k in keys))
    (run_dir / "embed" / "00000.done.json").write_text(json.dumps({"config": {"data.shard": str(older / "00000.tar")}}))
    with pytest.raises(SystemExit, match="has no url in its .json"):
        demo_release.write(run_dir, tmp_path / "release")
    again = demo_data.write(older, shards=2, copies=1, size=32)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("someone's file")
    with pytest.raises(SystemExit, match="is not empty"):
        demo_release.write(run_dir, tmp_path / "other")


@pytest.mark.slow
@pytest.mark.parametrize("index, command", list(enumerate(COMMANDS)),
                         ids=[f"{i}-{kind(shlex.split(c, comments=True))}" for i, c in enumerate(COMMANDS)])
def test_readme_demo_command_runs(index, command, checkout):
    if checkout["failed"] is not None:
        pytest.fail(f"an earlier demo command failed ({checkout['failed']}): the README's order is kept")
    argv = shlex.split(command, comments=True)
    check = CHECKS.get(kind(argv))
    assert check is not None, f"no check for: {command}"
    checkout["failed"] = command
    start = time.time()
    out = run(argv, checkout["root"])
    check(checkout, argv, start, out)
    checkout["seconds"][command] = time.time() - start
    checkout["failed"] = None


# ---- what each command leaves -------------------------------------------------------------------

def recorded(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def made_with_the_command(made_with: dict, argv: list[str], section: str) -> None:
    """Every `section.*` key of the command that the job records in `made_with` has the command's value."""
    made = flat(made_with)
    for key, value in args_of(argv).items():
        if key.startswith(section + ".") and key in made:
            assert made[key] == yaml.safe_load(value), (key, made[key], value)


def check_finetune(state, argv, start, out):
    run_dir = state["root"] / args_of(argv)["run_dir"]
    cfg = recorded(run_dir)
    assert cfg["finetune"]["datasets"], cfg["finetune"]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    for name in cfg["finetune"]["datasets"]:
        folder = run_dir / "finetune" / name
        assert (folder / "backbone.pt").stat().st_mtime >= start
        init = json.loads((folder / "init.json").read_text())["finetune.init"]
        assert init == args_of(argv).get("finetune.init", "run")
        assert any(m.startswith(f"ft-{name}:") and name in results[m] for m in results), results.keys()


def check_quantize(state, argv, start, out):
    from omegaconf import OmegaConf

    from evaluation.quantize import job

    run_dir = state["root"] / args_of(argv)["run_dir"]
    cfg = OmegaConf.create(recorded(run_dir))
    assert cfg.quantize.model == "run", "a check of another quantize.model's folder is not written yet"
    cfg.run_dir = str(run_dir)
    units = job.units(cfg)
    assert units and cfg.quantize.datasets
    for name in cfg.quantize.datasets:
        for method, bits, nbits in units:
            unit = job.unit_dir(cfg, "run", str(name)) / f"{job.unit_name(method, bits, nbits)}.json"
            assert unit.is_file(), f"{unit} missing after: {shlex.join(argv)}"
            made_with_the_command(json.loads(unit.read_text())["made_with"], argv, "quantize")


def check_detect(state, argv, start, out):
    run_dir = state["root"] / args_of(argv)["run_dir"]
    written = [p for p in (run_dir / "detect").glob("*/metrics.json") if p.stat().st_mtime >= start]
    assert len(written) == 1, written
    metrics = json.loads(written[0].read_text())
    made_with_the_command(metrics["made_with"], argv, "detect")
    assert metrics["steps"] == int(args_of(argv)["detect.steps"]), metrics["steps"]
    assert {"box/AP", "mask/AP"} <= set(metrics["metrics"]), metrics["metrics"]


def check_cluster(state, argv, start, out):
    from unicom_ds.shards import expand, stem

    args = args_of(argv)
    run_dir = state["root"] / args["run_dir"]
    stems = [stem(p) for p in expand(args["data.shards"])]
    top_l = int(recorded(run_dir)["assign"]["top_l"])
    assert top_l == int(args.get("assign.top_l", 1))
    for s in stems:
        labels = np.load(run_dir / "labels" / f"{s}.npy")
        assert len(labels) == len((run_dir / "embed" / f"{s}.keys.txt").read_text().split()) > 0
        if top_l > 1:
            assert np.load(run_dir / "labels" / f"{s}.topl.npy").shape == (len(labels), top_l)
    source = args.get("embed.source")
    if source is not None:  # an import: of demo_release's stand-in, which holds a demo run's features
        assert source in state["release"], f"embed.source={source}: not written by an earlier demo command"
        released = state["root"] / state["release"][source]
        join = json.loads((run_dir / "embed" / "parts" / "join.json").read_text())
        assert join["joined"] > 0 and join["skipped"].get("not_in_download", 0) > 0, join
        for s in stems:
            assert json.loads((run_dir / "embed" / f"{s}.done.json").read_text())["source"]["join"] == "url"
            for name in (f"{s}.img.npy", f"{s}.txt.npy", f"{s}.keys.txt"):
                assert (run_dir / "embed" / name).read_bytes() == (released / "embed" / name).read_bytes(), name
            assert np.array_equal(np.load(run_dir / "labels" / f"{s}.npy"), np.load(released / "labels" / f"{s}.npy"))


def check_train(state, argv, start, out):
    args = args_of(argv)
    run_dir = state["root"] / args["run_dir"]
    assert (run_dir / "train" / "backbone.pt").stat().st_mtime >= start
    export = json.loads((run_dir / "train" / "export.json").read_text())
    assert export["model"] == args.get("model", recorded(run_dir)["model"]), export


def check_demo_release(state, argv, start, out):
    import pyarrow.parquet as pq

    args = dict(zip(argv[3::2], argv[4::2]))
    folder = state["root"] / args["--out"]
    assert (folder / "DEMO_SET.txt").is_file()
    for sub in ("img_emb", "text_emb"):
        assert list((folder / sub).glob(f"{sub}_*.npy")), sub
    tables = [pq.read_table(p) for p in sorted((folder / "metadata").glob("metadata_*.parquet"))]
    assert tables and all({"url", "caption"} <= set(t.column_names) for t in tables)
    state["release"][args["--out"]] = args["--run"]


def check_mlcd_export(state, argv, start, out):
    name, source, folder = argv[4:7]
    for file in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (state["root"] / folder / file).is_file(), file
    state["export"][folder] = (name, source)


def check_transformers_load(state, argv, start, out):
    from test_mlcd_vit import _transformers_model

    import unicom_ds

    folder = re.search(r"from_pretrained\('([^']+)'\)", argv[2])[1]
    assert folder in state["export"], f"{folder}: not exported by an earlier demo command"
    name, source = state["export"][folder]
    hf = _transformers_model(state["root"] / folder)
    ours, _ = unicom_ds.load(name, checkpoint=str(state["root"] / source))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), hf(pixel_values=x).pooler_output, atol=1e-5)
    assert "torch.Size([" in out, out[-2000:]  # what the command prints


CHECKS = {"submit:finetune": check_finetune, "submit:quantize": check_quantize, "submit:detect": check_detect,
          "submit:cluster": check_cluster, "submit:train": check_train,
          "module:cluster_job.demo_release": check_demo_release, "module:unicom_ds.mlcd_vit export": check_mlcd_export,
          "python -c MLCDVisionModel": check_transformers_load}
