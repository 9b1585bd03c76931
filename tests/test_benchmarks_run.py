"""Every script in benchmarks/ still runs: each once, with tiny arguments, so that none can rot unnoticed (issue 33:
bench_eval.py and bench_kmeans.py had stopped running and nobody knew). Each run must exit 0 and print what the
script reports (a line it always prints), not just start. A script that needs a GPU runs its CPU fallback here, or
is skipped with the reason where there is no GPU; benchmarks/gpu_figures.sh is checked with `bash -n` and each of
its parts' commands is parsed (every script exists and takes its arguments; every pytest target exists). A new
script in benchmarks/ without an entry in SCRIPTS fails `test_every_benchmark_script_is_listed`.

The figures these runs print mean nothing (tiny sizes, a loaded machine): docs/benchmarks.md holds the measured
ones, each with its command."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
OWN_TEST = "covered by its own test (tests/test_ablations.py)"

# script -> {variant: (arguments, what its output must contain, slow)}; "{run}" is a finished run's folder
# (the `eval_run` fixture). Slow: the script starts DeepSpeed or several processes.
SCRIPTS: dict[str, dict[str, tuple[list[str], str, bool]] | str] = {
    "bench_assign.py": {"cpu": (["--device", "cpu", "--k", "256", "--d", "16", "--n", "512"], '"torch_rows_per_s"',
                                False)},
    "bench_assign_ivf.py": {
        "topics": (["--k", "256", "--d", "16", "--n", "512", "--nprobe", "2", "4", "--l", "2"], '"top1_agreement"', False),
        "sphere": (["--data", "sphere", "--intrinsic", "8", "--k", "256", "--d", "16", "--n", "512", "--nprobe", "4",
                    "--l", "2"], '"top1_agreement"', False)},
    "bench_assign_memory.py": {"ivf+exact": (["--shards", "1", "--rows", "200", "--k", "64", "--d", "16", "--top-l", "2",
                                              "--search", "ivf", "exact"], '"peak_rss_mb"', True)},
    "bench_decode.py": {"300px": (["--sizes", "300", "--repeat", "1"], "| 300 | 18 | train |", False)},
    "bench_detection.py": {"tiny": (["--device", "cpu", "--model", "ViT-Tiny-16", "--size", "64", "--batch", "1",
                                     "--window", "2", "--channels", "16", "--rounds", "1", "--warmup", "0"],
                                    '"s_per_step"', False)},
    "bench_embed.py": {"tiny": (["--model", "ViT-Tiny-16", "--n", "8", "--batch-size", "4", "--workers", "0",
                                 "--size", "64", "--threads", "1"], "ratio stage / forward", False)},
    "bench_eval.py": {"tiny": (["--device", "cpu", "--model", "ViT-Tiny-16", "--images", "8", "--batch-size", "4",
                                "--workers", "0", "--knn-n", "2000", "--knn-d", "16", "--ks", "1,10"],
                               "kNN evaluation 2000 x 16", False)},
    "bench_eval_protocols.py": {"run": (["--run", "{run}"], "EuroSAT probe", False)},
    "bench_finetune.py": {"tiny": (["--device", "cpu", "--model", "ViT-Tiny-16", "--batch", "8", "--steps", "2",
                                    "--workers", "0"], '"images_per_s"', True)},
    "bench_finetune_options.py": {"tiny": (["finetune.epochs=1", "finetune.max_steps=2", "finetune.eval_every_epoch=false"],
                                           "R@1", True)},
    "bench_finetune_schedule.py": {"one recipe": (["--recipes", "sop_vit_l_14_336px"], "| sop_vit_l_14_336px | 29760 /",
                                                  False)},
    "bench_import.py": {"tiny": (["--parts", "1", "--rows", "2000", "--per-shard", "500", "--d", "16",
                                  "--bucket-rows", "2000"], "projection, 400,000,000 rows", True)},
    "bench_kmeans.py": {
        "time": (["time", "--shards", "2", "--rows", "500", "--d", "16", "--k", "10", "--mppc", "20", "--niter", "2"],
                 "ratio stage / direct", False),
        "rss": (["rss", "--rows", "500", "--d", "16", "--k", "5", "--mppc", "20", "--niter", "2"], "peak RSS", False)},
    "bench_kmeans_seeding.py": {"tiny": (["--n", "2000", "--k", "10", "--d", "16", "--seeds", "0"], '"mean_cosine"',
                                         False)},
    "bench_kmeans_two_level.py": {"tiny": (["--data", "topics", "flat", "leaves", "--n", "2048", "--k", "64", "--d", "16",
                                            "--niter", "2", "--coarse-ppc", "16", "--refine", "1", "--refine-exact"],
                                           "exact Lloyd iterations", False)},
    "bench_linear_probe.py": {"tiny": (["--train", "200", "--test", "100", "--dim", "16", "--classes", "5",
                                        "--max-iter", "50", "--sweep"], "search_log10C", False)},
    "bench_loader.py": {"tiny": (["--workers", "1", "--batch", "4", "--batches", "2", "--samples", "16", "--side", "64",
                                  "--image-size", "32"], "img/s per worker", False)},
    "bench_mlcd_loss.py": {
        "layer": (["--batch", "8", "--dim", "16", "--ks", "1000", "--widths", "1,2", "--repeats", "1", "--warmup", "0"],
                  "MLCD l=2", False),
        "paper": (["--paper", "--k", "1000", "--ranks", "2", "--l", "2", "--rows", "32,64", "--full-rows", "128", "--dim",
                   "16", "--repeats", "1", "--warmup", "0"], "projected, 128 rows", False)},
    "bench_prototypes.py": {"tiny": (["--device", "cpu", "--batch", "8", "--dim", "16", "--ks", "1000", "--r1s", "1.0,0.1",
                                      "--repeats", "1", "--warmup", "0"], "r1=0.1 / r1=1.0", False)},
    "bench_quantize.py": {"tiny": (["--parts", "map,ablation,projected,views,speed", "--budgets", "16", "--nbits", "4",
                                    "--scq-max-steps", "2", "--seeds", "0", "--view-counts", "2", "--view-bits", "16",
                                    "--n", "4096", "--d", "16"], "IVF1024,PQ16x8 nprobe 32", True)},
    "bench_train_step.py": {"tiny": (["--device", "cpu", "--model", "ViT-Tiny-16", "--batch", "2", "--classes", "100",
                                      "--steps", "1", "--warmup", "0", "--rounds", "1", "--threads", "1"], '"overhead"',
                                     False)},
    # GPU-only: `decode` has a CPU path that runs the same batch code; `mfu` needs CUDA (skipped without it).
    "gpu_figures.py": {
        "decode on the cpu": (["decode", "--device", "cpu", "--side", "64", "--batch", "4", "--repeat", "1"],
                              '"gpu_images_per_s"', False),
        "mfu (GPU)": (["mfu", "--models", "ViT-Tiny-16:4", "--classes", "1000"], '"mfu"', False)},
    "gpu_figures.sh": "checked by test_gpu_figures_sh_parses",
    # The ablations (another engineer's): the script, its data and its report, with their own test.
    "ablations.py": OWN_TEST, "ablation_data.py": OWN_TEST, "ablation_report.py": OWN_TEST,
}
ABLATIONS = {"ablations.py", "ablation_data.py", "ablation_report.py"}  # may not be committed yet
GPU_ONLY = {("gpu_figures.py", "mfu (GPU)")}


def test_every_benchmark_script_is_listed():
    scripts = {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh")}
    assert scripts - set(SCRIPTS) == set(), "add an entry to SCRIPTS for each new script in benchmarks/"
    assert set(SCRIPTS) - scripts <= ABLATIONS, "SCRIPTS names a script that is gone"


def cases():
    for script, variants in SCRIPTS.items():
        if isinstance(variants, str):
            continue
        for variant, (args, expect, slow) in variants.items():
            marks = [pytest.mark.slow] if slow else []
            if (script, variant) in GPU_ONLY:
                marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
            yield pytest.param(script, args, expect, id=f"{script}[{variant}]", marks=marks)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> Path:
    """What bench_eval_protocols.py reads from a finished run: config.yaml, the cached eval features of the demo's
    SOP and EuroSAT stand-ins (random 16-d rows here) and the sets themselves."""
    from evaluation import demo_sets, probe_sets, retrieval_sets
    root = tmp_path_factory.mktemp("eval_run")
    data, run = root / "data", root / "run"
    demo_sets.main(["--out", str(data), "--retrieval", "60"])
    feats = run / "eval" / "features" / "run"
    feats.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {"sop.npy": len(retrieval_sets.read("sop", data / "sop").labels)}
    probe = probe_sets.load("eurosat", data, seed=0)
    rows.update({"eurosat.train.npy": len(probe.train.labels), "eurosat.test.npy": len(probe.test.labels)})
    for name, n in rows.items():
        np.save(feats / name, rng.standard_normal((n, 16)).astype(np.float32))
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "eval": {"data_root": str(data),
                                                                          "probe": {"max_iter": 100}}}))
    return run


@pytest.mark.parametrize("script,args,expect", list(cases()))
def test_benchmark_script_runs(script, args, expect, tmp_path, request):
    if "{run}" in " ".join(args):
        args = [a.replace("{run}", str(request.getfixturevalue("eval_run"))) for a in args]
    # Scripts write their data and runs under TMPDIR (tempfile): the test's own folder, removed with it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert expect in out, out[-4000:]


def gpu_figures_parts() -> list[tuple[str, str, list[str]]]:
    """(name, limit, argv) of every `part` line of gpu_figures.sh, as bash expands them ($PY, $OUT_DIR and a step
    rate set), without running anything: bash evaluates the lines with `part` printing its arguments."""
    text = (BENCH / "gpu_figures.sh").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith("part ")]
    script = "part() { printf '%s\\0' \"$@\"; printf '\\n\\0'; }\nPY=python OUT_DIR=OUT STEP_RATE=4700\n" + "\n".join(lines)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    parts, current = [], []
    for field in out.split("\0")[:-1]:
        if field == "\n":
            parts.append((current[0], current[1], current[2:]))
            current = []
        else:
            current.append(field)
    return parts


# Runs each command's script up to its argument parsing (the outermost parse_args / parse_known_args, once it has
# returned, stops the script right there), in one process: exit code 0 when every command parses, else the failures.
PARSE_ONLY = r'''
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
depth = 0
def stop(parse):
    def parsed(self, *args, **kwargs):
        global depth
        depth += 1
        try:
            result = parse(self, *args, **kwargs)
        finally:
            depth -= 1
        if depth == 0:  # not a subparser's or parse_args' own inner call
            raise Parsed
        return result
    return parsed
argparse.ArgumentParser.parse_args = stop(argparse.ArgumentParser.parse_args)
argparse.ArgumentParser.parse_known_args = stop(argparse.ArgumentParser.parse_known_args)
sys.path.insert(0, "benchmarks")
failed = {}
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        failed[" ".join(argv)] = "ran to its end without parsing arguments"
    except Parsed:
        pass
    except SystemExit as e:
        failed[" ".join(argv)] = f"exit {e.code}"
print(json.dumps(failed))
sys.exit(1 if failed else 0)
'''


def test_gpu_figures_sh_parses():
    sh = BENCH / "gpu_figures.sh"
    check = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    parts = gpu_figures_parts()
    assert len(parts) == sum(1 for line in sh.read_text().splitlines() if line.startswith("part "))
    header = sh.read_text().split("set -u")[0]
    scripts = []
    for name, limit, argv in parts:
        assert re.fullmatch(r"\d\d_\w+", name) and limit.isdigit() and int(limit) <= 600, (name, limit)
        assert re.search(rf"^#\s+{name[:2]} ", header, re.M), f"part {name[:2]} is not described in the header"
        assert argv[0] == "python", (name, argv)
        if argv[1:3] == ["-m", "pytest"]:
            targets = [a for a in argv[3:] if a.startswith("tests/")]
            assert targets and all((REPO / t.split("::")[0]).is_file() for t in targets), (name, argv)
        else:
            assert argv[1].startswith("benchmarks/") and (REPO / argv[1]).is_file(), (name, argv)
            scripts.append(argv[1:])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # parsing only: nothing may touch a GPU
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(scripts)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
