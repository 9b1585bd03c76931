"""Every `python slurm/submit.py ...` command in the README's code blocks runs as written (dry run).

Each command is taken from README.md (so a command added there is tested without touching this file),
run with `dry_run=true` appended, and must exit 0 after the launcher's up-front checks. What a command
names outside this repository is replaced by a small real stand-in: `$RUN` by a run directory in the
state the command expects (fresh for the stages that start a run; holding a real tiny cluster stage's
outputs for train; a tiny trained model too for eval and report), `data.shards=/data/...` by generated
shards (more of them than the launcher counts up front, as on LAION, so kmeans.k is checked when the
kmeans job starts), `eval.data_root=/data/...` by tiny sets in the named sets' own layouts. `deepspeed`
lines are tested with the train stage's own tests.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.io import savemat

from conftest import REPO
from cluster_job import checks, demo_data
from evaluation import demo_sets

README = REPO / "README.md"
FIRST_STAGES = ("embed", "cluster", "all")     # stages that start a run from the input shards
RELEASE_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
DEFAULT_EVAL_SETS = ("cub", "cars", "sop", "inshop", "inat", "vehicleid", "gldv2")


# The first line of a README block of demo-sized commands: they need the demo's finished run, and
# tests/test_readme_demo_commands.py runs them for real.
DEMO_MARKER = "# on the demo (bash demo.sh first"


def readme_commands(text: str) -> list[str]:
    """The `python slurm/submit.py` commands of the fenced code blocks, continuation lines joined; not those of
    the demo-sized blocks (DEMO_MARKER)."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S):
        if block.startswith(DEMO_MARKER):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
            if line.startswith("python slurm/submit.py"):
                commands.append(" ".join(line.split()))
    return commands


def test_commands_are_found():
    commands = readme_commands(README.read_text())
    stages = {re.search(r"\bstage=(\w+)", c).group(1) for c in commands}
    assert {"cluster", "train", "eval", "all"} <= stages, commands
    sample = "```bash\nRUN=/x\npython slurm/submit.py stage=train \\\n    run_dir=$RUN  # why\n```\n" \
             "`python slurm/submit.py inline` and\n```\n# python slurm/submit.py commented\n```\n"
    assert readme_commands(sample) == ["python slurm/submit.py stage=train run_dir=$RUN"]
    assert readme_commands(f"```bash\n{DEMO_MARKER})\npython slurm/submit.py stage=train\n```\n") == []


# ---- stand-ins ----------------------------------------------------------------------------------

def _digits(n: int):
    x, y = demo_sets.digit_images(n)
    return x, y


def write_cub(root: Path) -> None:
    x, y = _digits(40)
    lines, labels = [], []
    for i in range(len(x)):
        cls = 99 + int(y[i]) % 4  # 99, 100 train classes; 101, 102 test
        rel = f"{cls:03d}.Bird_{cls}/Bird_{cls}_{i}.jpg"
        demo_sets.save_image(root / "images" / rel, x[i])
        lines.append(f"{i + 1} {rel}")
        labels.append(f"{i + 1} {cls}")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")


def write_cars(root: Path) -> None:
    x, y = _digits(40)
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    annos = np.zeros((1, len(x)), dtype=[(f, "O") for f in fields])
    for i in range(len(x)):
        rel = f"car_ims/{i + 1:06d}.jpg"
        demo_sets.save_image(root / rel, x[i])
        annos[0, i] = (np.array([rel]), *[np.array([[1]], dtype=np.uint16)] * 4,
                       np.array([[97 + int(y[i]) % 4]], dtype=np.uint8), np.array([[1]], dtype=np.uint8))
    savemat(root / "cars_annos.mat", {"annotations": annos})


def write_inshop(root: Path) -> None:
    x, y = _digits(40)
    rows = []
    for i in range(len(x)):
        rel = f"img/WOMEN/Dresses/id_{int(y[i]) % 4:08d}/{i:02d}_1_front.jpg"
        demo_sets.save_image(root / "Img" / rel, x[i])
        rows.append(f"{rel} id_{int(y[i]) % 4:08d} {'query' if i % 2 else 'gallery'}")
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n"
                                                           + "\n".join(rows) + "\n")


def write_sop(root: Path) -> None:
    # A train split too (quantize.train_split=train with the default 8-bit codebooks, fine-tuning), as the demo's.
    x, y = _digits(600)  # 300 test images: quantize.train_split=test's default 8-bit codebooks need 256
    demo_sets.write_sop(root.parent, x[:300], y[:300], train=(x[300:], y[300:]))


def write_inat(root: Path) -> None:
    x, y = _digits(40)
    paths = [f"train_val2018/Aves/{2761 + int(y[i]) % 4}/{i:032x}.jpg" for i in range(len(x))]
    for i, rel in enumerate(paths):
        demo_sets.save_image(root / rel, x[i])
    (root / "Inat_dataset_splits").mkdir(parents=True)
    (root / "Inat_dataset_splits" / "Inaturalist_test_set1.txt").write_text("\n".join(paths) + "\n")


def write_vehicleid(root: Path) -> None:
    x, y = _digits(40)
    pairs = [(f"{i:07d}", f"{int(y[i]) % 8:04d}") for i in range(len(x))]
    for i, (name, _) in enumerate(pairs):
        demo_sets.save_image(root / "image" / f"{name}.jpg", x[i])
    (root / "train_test_split").mkdir(parents=True)
    for size, n in ((800, 20), (1600, 30), (2400, 40)):  # larger lists share images, as in the release
        (root / "train_test_split" / f"test_list_{size}.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs[:n]))


def write_gldv2(root: Path) -> None:
    x, _ = _digits(12)
    index, test = [f"{i:016x}" for i in range(8)], [f"f{i:015x}" for i in range(4)]
    for i, image_id in enumerate(index + test):
        folder = "index" if i < len(index) else "test"
        demo_sets.save_image(root / folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", x[i])
    (root / "index.csv").write_text("id\n" + "\n".join(index) + "\n")
    rows = [f"{t},{index[j]} {index[j + 4]},{'Public' if j % 2 else 'Private'}" for j, t in enumerate(test)]
    (root / "retrieval_solution_v2.1.csv").write_text("id,images,Usage\n" + "\n".join(rows) + "\n")


WRITERS = {"cub": write_cub, "cars": write_cars, "inshop": write_inshop, "sop": write_sop, "inat": write_inat,
           "vehicleid": write_vehicleid, "gldv2": write_gldv2}


def eval_root(tmp: Path, datasets: list[str]) -> Path:
    root = tmp / "eval_data"
    for name in datasets:
        if not (root / name).is_dir():
            if name not in WRITERS:
                pytest.fail(f"a README command evaluates '{name}': add a writer of its layout to WRITERS")
            (root / name).mkdir(parents=True)
            WRITERS[name](root / name)
    return root


def coco_root(tmp: Path) -> Path:
    """A tiny set in COCO 2017's layout (train2017/, val2017/, annotations/) for detect.data_root."""
    from evaluation.detection import synthetic
    root = tmp / "coco"
    if not root.is_dir():
        synthetic.write(root, train=2, val=1, size=64)
    return root


def submit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Shards, and run directories after a real tiny cluster stage and a real tiny train stage."""
    tmp = tmp_path_factory.mktemp("readme")
    n = checks.COUNT_TAR_LIMIT + 1
    demo_data.write(tmp / "laion", shards=n, copies=1, size=32)
    shards = f"{tmp}/laion/{{00000..{n - 1:05d}}}.tar"
    clustered = tmp / "clustered"
    res = submit("stage=cluster", "launcher=local", f"run_dir={clustered}", f"data.shards={shards}",
                 "clip.model=ViT-Tiny-16", "clip.pretrained=random", "kmeans.k=4", "progress=off", "device=cpu",
                 f"embed.shards_per_task={n}", "assign.top_l=2")  # S.topl.npy too, for loss.kind=mlcd
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trained = tmp / "trained"
    shutil.copytree(clustered, trained)
    res = submit("stage=train", "launcher=local", f"run_dir={trained}", "model=ViT-Tiny-16", "device=cpu",
                 "train.deepspeed_config=ds_configs/demo_cpu.json", "train.precision=fp32", "train.max_steps=1",
                 "train.workers=0", "train.local_processes=1", "loss.r1=1.0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (trained / "train" / "backbone.pt").is_file()
    for run in (clustered, trained):  # made here on a CPU; the README's runs were launched on SLURM and say so
        saved = run / "config.yaml"
        saved.write_text(saved.read_text().replace("launcher: local\n", "launcher: slurm\n")
                         .replace("deepspeed_config: ds_configs/demo_cpu.json\n", "deepspeed_config: auto\n"))
    return {"tmp": tmp, "shards": shards, "clustered": clustered, "trained": trained,
            "embeddings": clip_retrieval_folder(tmp / "laion-embeddings", clustered)}


def clip_retrieval_folder(folder: Path, run: Path, d: int = 512) -> Path:
    """LAION's embeddings for `embed.source`: one clip-retrieval part holding every key of `run`'s shards,
    random unit rows of ViT-B-32's width."""
    import pandas as pd

    keys = [k for f in sorted((run / "embed").glob("*.keys.txt")) for k in f.read_text().split()]
    rng = np.random.default_rng(0)
    for sub, name in (("img_emb", "img_emb_0.npy"), ("text_emb", "text_emb_0.npy")):
        (folder / sub).mkdir(parents=True)
        x = rng.standard_normal((len(keys), d))
        np.save(folder / sub / name, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
    (folder / "metadata").mkdir()
    pd.DataFrame({"image_path": [f"{k}.jpg" for k in keys], "caption": ["c"] * len(keys), "key": keys,
                  "url": [f"http://example.com/{k}.jpg" for k in keys]}).to_parquet(
        folder / "metadata" / "metadata_0.parquet")
    return folder


def release_file(tmp: Path, init: str) -> Path:
    """The release file `init` names (unicom:NAME@/weights/FILE), at random init and in fp16 as released."""
    from unicom_ds import unicom_vit
    name, _, path = init.removeprefix("unicom:").partition("@")
    out = tmp / "weights" / Path(path).name
    if not out.is_file():
        out.parent.mkdir(exist_ok=True)
        torch.save(unicom_vit.build(unicom_vit.canonical_name(name)).half().state_dict(), out)
    return out


def as_run(command: str, stand_ins: dict, index: int) -> list[str]:
    """The command's arguments after `python slurm/submit.py`, with stand-ins for what it names."""
    text = command.removeprefix("python slurm/submit.py ")
    assert " ... " not in f" {text} ", f"README command is not complete: {command}"
    args = [a.partition("=") for a in shlex.split(text)]
    keys = {k for k, _, _ in args}
    stage = next(v for k, _, v in args if k == "stage")
    # config=FILE sets a new run's keys (an existing run's config.yaml would outrank it): a fresh directory
    if stage in FIRST_STAGES or "train.continue_from" in keys or "config" in keys:
        run = stand_ins["tmp"] / f"fresh{index}"         # a new run directory
    else:
        run = stand_ins["clustered" if stage in ("kmeans", "assign", "train") else "trained"]
    if "train.continue_from" in keys:
        model = next((v for k, _, v in args if k == "model"), None) or next(
            (yaml.safe_load((REPO / v).read_text()).get("model") for k, _, v in args if k == "config"), None)
        if model in RELEASE_MODELS:
            pytest.skip(f"trains {model} on from a finished run of its size (train.continue_from); a test can "
                        "only make a tiny run")
    out = []
    for key, _, value in args:
        if key == "run_dir":
            value = str(run)
        elif key == "train.continue_from":               # a finished run
            value = str(stand_ins["trained"])
        elif key == "data.shards" and value.startswith("/data/"):
            value = stand_ins["shards"]
        elif key == "embed.source" and value.startswith("/data/"):
            value = str(stand_ins["embeddings"])
        elif key == "eval.data_root" and value.startswith("/data/"):
            continue                                     # added below, with the sets the command names
        elif key == "detect.data_root" and value.startswith("/data/"):
            value = str(coco_root(stand_ins["tmp"]))     # COCO 2017's layout, rendered shapes
        elif key == "finetune.init" and "@/weights/" in value:   # an official release file
            value = value.partition("@")[0] + "@" + str(release_file(stand_ins["tmp"], value))
        elif "@$RUN/train/backbone.pt" in value:         # another run's export: the trained stand-in's
            value = value.replace("$RUN", str(stand_ins["trained"]))
        elif "$" in value or value.startswith(("/data/", "/scratch/", "/weights/")):
            pytest.fail(f"no stand-in for {key}={value} in: {command}")
        out.append(f"{key}={value}")
    if stage in ("eval", "all", "finetune", "quantize"):
        listed = next((v for k, _, v in args if k == ("finetune.datasets" if stage == "finetune" else
                                                      "quantize.datasets" if stage == "quantize" else "eval.datasets")),
                      None)
        names = re.findall(r"\w+", listed) if listed else list(DEFAULT_EVAL_SETS)
        out.append(f"eval.data_root={eval_root(stand_ins['tmp'], names)}")
    return out + ["dry_run=true"]


@pytest.mark.slow
@pytest.mark.parametrize("index, command", list(enumerate(readme_commands(README.read_text()))))
def test_readme_command_dry_runs(index, command, stand_ins):
    res = submit(*as_run(command, stand_ins, index))
    assert res.returncode == 0, f"{command}\n{res.stderr}"
    if "launcher=local" in command:  # a local plan, never an sbatch script
        assert "dry run: nothing is run" in res.stdout and "launcher=local: this machine would run" in res.stdout
        assert "#SBATCH" not in res.stdout
    else:
        assert "dry run: nothing is submitted" in res.stdout
        assert "#SBATCH" in res.stdout
    assert "missing (" not in res.stdout, res.stdout  # the stand-ins hold every input
