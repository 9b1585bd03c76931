"""Untrusted bytes never run (issue 29): every place the tree unpickles a file, and how each is made safe; the
CIFAR-10 batches read as data (unicom_ds.safe_pickle); weight files named by a job's key (detect.model,
finetune.init, quantize.model) read at submission as tensors only, a bad one refused in one line naming the key
with the run left byte-identical; and a planted payload never runs."""
from __future__ import annotations

import ast
import hashlib
import os
import pickle
import pickletools
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import files

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("unicom_ds", "cluster_job", "evaluation", "slurm", "benchmarks", "docs")


class Payload:
    """What a planted file holds: unpickling it calls os.system (posix.system) to create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---- every unpickling call site, and why each is safe --------------------------------------------------

# Calls (or base classes) that unpickle what they read, by their full dotted name.
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "torch.load",
              "torch.jit.load", "joblib.load", "pandas.read_pickle", "dill.load", "dill.loads", "cloudpickle.load",
              "cloudpickle.loads", "shelve.open", "marshal.load", "marshal.loads", "webdataset.decode",
              "webdataset.autodecode.Decoder", "unicom_ds.safe_pickle.load",
              "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint",
              # torchvision's CIFAR readers call pickle.load on the batch files
              "torchvision.datasets.CIFAR10", "torchvision.datasets.CIFAR100"}
ENGINE_READERS = {"load_checkpoint", "_get_all_zero_checkpoints"}  # DeepSpeed engine methods: pickles of its own

TRUSTED = "DeepSpeed's engine files (a full unpickler): only from this run's own checkpoints, or with " \
          "<section>.trust_checkpoint=true (unicom_ds.checkpoint.resolve, at submission)"
WEIGHTS_ONLY = "torch.load(weights_only=True): tensors and plain values only"
SITES = {
    ("unicom_ds/safe_pickle.py:_Unpickler", "pickle.Unpickler"): "find_class admits only safe_pickle.ALLOWED",
    ("evaluation/files.py:read_cifar_batch", "unicom_ds.safe_pickle.load"): "the restricted unpickler",
    ("unicom_ds/state_dicts.py:read_weights", "torch.load"): WEIGHTS_ONLY,
    ("unicom_ds/checkpoint.py:read_rank_file", "torch.load"): WEIGHTS_ONLY,
    ("unicom_ds/train.py:Trainer.base_weights", "torch.load"): WEIGHTS_ONLY,
    ("evaluation/detection/job.py:load_checkpoint", "torch.load"): WEIGHTS_ONLY,
    ("evaluation/quantize/scq.py:Objective.load", "torch.load"): WEIGHTS_ONLY,
    ("evaluation/quantize/scq.py:Objective.load_backbone", "torch.load"): WEIGHTS_ONLY,
    ("unicom_ds/train.py:Trainer.resume", "self.engine.load_checkpoint"): TRUSTED,
    ("unicom_ds/train.py:Trainer.repartition_zero_state", "self.engine._get_all_zero_checkpoints"): TRUSTED,
    ("unicom_ds/train.py:Trainer.export", "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint"):
        "the checkpoint this job just wrote or resumed from (" + TRUSTED + ")",
    # torchvision's readers would pickle.load data_batch_N / batches.meta; _SafeCifar's __init__ replaces theirs.
    ("evaluation/probe_sets.py:_CIFAR10", "torchvision.datasets.CIFAR10"): "_SafeCifar: the restricted unpickler",
    ("evaluation/probe_sets.py:_CIFAR100", "torchvision.datasets.CIFAR100"): "_SafeCifar: the restricted unpickler",
    ("evaluation/probe_sets.py:_SafeCifar.__init__", "unicom_ds.safe_pickle.load"): "the restricted unpickler",
}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> full dotted name, from every import of the module (also those inside functions)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)) is not None:
        return f"{base}.{node.attr}"
    return None


def unpickling_sites() -> dict[tuple[str, str], list[ast.AST]]:
    """(file:qualname, callee) -> its calls or class definition, for every unpickling site of the scanned tree."""
    found = {}

    def visit(node: ast.AST, scope: list[str], rel: str, names: dict[str, str]) -> None:
        uses = []
        if isinstance(node, ast.Call):
            uses = [node.func]
        elif isinstance(node, ast.ClassDef):
            uses = node.bases
        for use in uses:
            text = _dotted(use)
            if text is None:
                continue
            head, _, rest = text.partition(".")
            full = names.get(head, head) + (f".{rest}" if rest else "")
            if full in UNPICKLERS or (isinstance(use, ast.Attribute) and use.attr in ENGINE_READERS):
                where = ".".join(scope + [node.name]) if isinstance(node, ast.ClassDef) else ".".join(scope)
                found.setdefault((f"{rel}:{where or '<module>'}", full if full in UNPICKLERS else text), []).append(node)
        inner = scope + [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else scope
        for child in ast.iter_child_nodes(node):
            visit(child, inner, rel, names)

    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            visit(tree, [], str(path.relative_to(REPO)), _aliases(tree))
    return found


def test_every_unpickling_site_is_listed_with_why_it_is_safe():
    found = unpickling_sites()
    new = sorted(set(found) - set(SITES))
    assert not new, ("new call site(s) that can unpickle a file: " + "; ".join(f"{s} calls {c}" for s, c in new) +
                     ". Read untrusted bytes safely (torch.load(..., weights_only=True), unicom_ds.safe_pickle, or "
                     "DeepSpeed's engine files behind <section>.trust_checkpoint), then add each to SITES in "
                     "tests/test_untrusted_bytes.py saying why it is safe")
    gone = sorted(set(SITES) - set(found))
    assert not gone, f"listed in SITES but no longer in the tree (remove them): {gone}"


def test_every_torch_load_is_weights_only_and_no_numpy_load_allows_pickle():
    for (site, callee), nodes in unpickling_sites().items():
        for node in nodes if callee == "torch.load" else ():
            flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, \
                f"{site} (line {node.lineno}): torch.load without weights_only=True"
    for top in SCANNED:
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and any(
                        k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                        for k in node.keywords):
                    pytest.fail(f"{path.relative_to(REPO)}:{node.lineno}: allow_pickle lets np.load unpickle "
                                "object arrays; save plain arrays instead")


# ---- CIFAR-10's python release -------------------------------------------------------------------------

class Python2Pickler(pickle._Pickler):
    """Writes a protocol-2 pickle as Python 2's pickler wrote CIFAR-10's release: strings (keys, the batch
    label, file names, the array's raw bytes) as BINSTRING, which Python 3 decodes with pickle.load's
    `encoding`; numpy's modules under their pre-2.0 name, numpy.core.multiarray."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_string(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        small = len(data) < 256
        self.write((pickle.SHORT_BINSTRING + bytes([len(data)])) if small else
                   (pickle.BINSTRING + struct.pack("<i", len(data))))
        self.write(data)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_string

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def cifar_batch(n: int = 10000, seed: int = 0) -> dict:
    """One batch as https://www.cs.toronto.edu/~kriz/cifar.html ("Dataset layout", python version) describes
    it: a dict whose `data` is an n x 3072 uint8 array, each row an image, row-major, the first 1024 entries
    red, then green, then blue, and `labels` a list of n numbers 0-9; the release also holds its batch
    label and file names."""
    rng = np.random.default_rng(seed)
    return {"batch_label": "training batch 1 of 5", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"image_{i:05d}.png" for i in range(n)]}


def write_python2_batch(path: Path, batch: dict) -> None:
    with open(path, "wb") as f:
        Python2Pickler(f, protocol=2).dump(batch)


def _globals(path: Path) -> set[str]:
    return {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}


def test_a_release_batch_reads_back_equal(tmp_path):
    batch = cifar_batch()
    old = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    old.parent.mkdir()
    write_python2_batch(old, batch)
    assert _globals(old) == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    with open(old, "rb") as f:  # the replica is what the release's readers (pickle, latin1) take
        assert np.array_equal(pickle.load(f, encoding="latin1")["data"], batch["data"])
    new = tmp_path / "python3_protocol2"  # numpy 2's module name, bytes as _codecs.encode
    with open(new, "wb") as f:
        pickle.dump({**batch, "filenames": [n.encode() for n in batch["filenames"]]}, f, protocol=2)
    assert "_codecs encode" in _globals(new)
    for path in (old, new):
        images, labels = files.read_cifar_batch(str(path))
        assert labels == batch["labels"]
        assert images.shape == (10000, 32, 32, 3)
        assert np.array_equal(images, batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        assert images[0, 0, 0].tolist() == batch["data"][0, [0, 1024, 2048]].tolist()  # pixel (0, 0): R, G, B


def _planted_release(root: Path, marker: Path, nested: bool) -> Path:
    path = root / "cifar10_scq" / "cifar-10-batches-py" / "data_batch_1"
    path.parent.mkdir(parents=True)
    planted = {**cifar_batch(10), "labels": Payload(marker)} if nested else Payload(marker)
    with open(path, "wb") as f:
        pickle.dump(planted, f, protocol=2)
    return path


REFUSED = r"refused to unpickle (os|posix)\.system \(only numpy arrays, lists, dicts, numbers and strings are read\)"


@pytest.mark.parametrize("nested", [False, True])
def test_a_planted_batch_is_refused_naming_the_file_and_never_runs(tmp_path, nested):
    from evaluation import retrieval_sets
    from evaluation.features import ImageFiles
    marker = tmp_path / "MARKER"
    path = _planted_release(tmp_path, marker, nested)
    message = re.escape(str(path)) + ": " + REFUSED
    with pytest.raises(ValueError, match=message):
        files.read_cifar_batch(str(path))  # the eval and quantize jobs' reader of the images
    with pytest.raises(ValueError, match=message):
        ImageFiles([f"{path}#0"], transform=lambda image: image)[0]
    with pytest.raises(ValueError, match=message):
        retrieval_sets.read("cifar10_scq", tmp_path / "cifar10_scq")  # what the checks read at submission
    assert not marker.exists()


def test_a_damaged_batch_names_the_file(tmp_path):
    path = tmp_path / "data_batch_1"
    write_python2_batch(path, cifar_batch(10))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable pickle (")):
        files.read_cifar_batch(str(path))


def test_the_linear_probe_reader_never_runs_a_planted_batch(tmp_path):
    from evaluation import probe_sets
    marker = tmp_path / "MARKER"
    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        write_python2_batch(base / name, {**cifar_batch(10), "label_names": [str(i) for i in range(10)]})
    with open(base / "data_batch_1", "wb") as f:
        pickle.dump(Payload(marker), f, protocol=2)
    with pytest.raises(ValueError, match=re.escape(f"{base / 'data_batch_1'}: refused to unpickle posix.system")):
        probe_sets.load("cifar10", str(tmp_path))
    assert not marker.exists()


# ---- weight files named by a job's key -------------------------------------------------------------------

def sha_tree(root: Path) -> dict:
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of a random ViT-Tiny-16 (its backbone.pt in the train stage's export format, its
    config.yaml), CUB-layout digits for fine-tuning and quantisation, and a synthetic COCO for detection."""
    from evaluation import demo_sets
    from evaluation.detection import synthetic
    from unicom_ds import backbone, config, unicom_vit
    root = tmp_path_factory.mktemp("untrusted")
    x, y = demo_sets.digit_images(100)
    demo_sets.write_cub(root / "data", x, y, test_from=5)
    coco = synthetic.write(root / "coco", train=1, val=1, size=32)
    run = root / "run"
    (run / "train").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(backbone.export("ViT-Tiny-16", unicom_vit.build("ViT-Tiny-16").state_dict()),
               run / "train" / "backbone.pt")
    config.save(config.resolve([f"run_dir={run}", "model=ViT-Tiny-16", "device=cpu"]))
    return {"run": run, "data": root / "data", "coco": coco}


def stage_args(key: str, finished: dict, run: Path) -> list[str]:
    base = [f"run_dir={run}", "launcher=local", "device=cpu"]
    data = f"eval.data_root={finished['data']}"
    return base + {
        "detect.model": ["stage=detect", f"detect.data_root={finished['coco']}"],
        "finetune.init": ["stage=finetune", "finetune.datasets=[cub]", data],
        "quantize.model": ["stage=quantize", "quantize.datasets=[cub]", data, "quantize.methods=[pq]",
                           "quantize.bits=[16]", "quantize.nbits=[4]"],
    }[key]


KEYS = ("detect.model", "finetune.init", "quantize.model")


def bad_file(kind: str, path: Path, good: Path, marker: Path) -> str:
    """Write a bad weights file of `kind` at `path`; returns what the refusal's reason must say."""
    if kind == "payload":
        torch.save({"pos_embed": torch.zeros(1), "cls_token": Payload(marker)}, path)
        return r"[^()]*(os|posix)\.system[^()]*"
    if kind == "empty":
        path.write_bytes(b"")
        return r"not a zip archive as torch\.save writes: empty, cut short or another format"
    if kind == "cut":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return r"not a zip archive as torch\.save writes: empty, cut short or another format"
    torch.save([torch.zeros(2)], path)
    return r"holds a list, not a dict"


@pytest.mark.parametrize("key", KEYS)
def test_a_good_weights_file_passes_the_check(key, finished, tmp_path, capsys):
    from conftest import load_submit
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    assert load_submit().main([*stage_args(key, finished, run), "dry_run=true"]) == 0, capsys.readouterr()


@pytest.mark.parametrize("kind", ["payload", "empty", "cut", "list"])
@pytest.mark.parametrize("key", KEYS)
def test_a_bad_weights_file_is_refused_at_submission(key, kind, finished, tmp_path, capsys):
    """The run's own backbone.pt replaced (key=run, the default), and the same file named outside the run."""
    from conftest import load_submit
    submit = load_submit()
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    marker = tmp_path / "MARKER"
    outside = tmp_path / "weights.pt"
    reason = bad_file(kind, outside, finished["run"] / "train" / "backbone.pt", marker)
    shutil.copy(outside, run / "train" / "backbone.pt")
    tail = (r"; expected a train-stage backbone\.pt export, a Unicom release \.pt or an open_clip state dict; only "
            r"tensors and plain values are loaded, nothing in it ran")
    for entry, shown in (("run", f"run ({run / 'train' / 'backbone.pt'})"),
                         (f"unicom:ViT-Tiny-16@{outside}", f"unicom:ViT-Tiny-16@{outside}")):
        before = sha_tree(run)
        assert submit.main([*stage_args(key, finished, run), f"{key}={entry}"]) == 2
        out, err = capsys.readouterr()
        assert re.fullmatch(f"error: {re.escape(f'{key}={shown}')}: not a weights file this project can read "
                            rf"\({reason}\){tail}\n", err), err
        assert "Traceback" not in out + err
        assert sha_tree(run) == before
    assert submit.main([*stage_args(key, finished, run), "dry_run=true"]) == 2  # a dry run refuses the same
    assert "not a weights file this project can read" in capsys.readouterr().err
    assert not marker.exists()
