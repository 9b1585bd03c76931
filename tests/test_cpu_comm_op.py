"""DeepSpeed's CPU communication op: built once per Python environment, into a folder kept with it, and
announced before a build."""
from __future__ import annotations

import os
import sys

from unicom_ds import dist


def test_op_folder_defaults_to_the_environment_and_a_build_is_announced_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # recorded first, so that undo drops what the call sets
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    (tmp_path / "venv").mkdir()
    folder = dist.prepare_cpu_comm_op(local_rank=0)
    assert folder == tmp_path / "venv" / "torch_extensions" / "deepspeed_shm_comm"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "torch_extensions")  # the ranks' torch reads it
    assert capsys.readouterr().out == f"building DeepSpeed's CPU communication op once, ~2 min, into {folder}\n"
    assert dist.prepare_cpu_comm_op(local_rank=1) == folder and capsys.readouterr().out == ""  # rank 0 speaks
    folder.mkdir(parents=True)
    (folder / "deepspeed_shm_comm.so").write_bytes(b"")
    assert dist.prepare_cpu_comm_op(local_rank=0) == folder and capsys.readouterr().out == ""  # built: silent


def test_a_chosen_folder_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert dist.prepare_cpu_comm_op(local_rank=1) == tmp_path / "mine" / "deepspeed_shm_comm"


def test_the_name_is_deepspeeds():
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    assert ShareMemCommBuilder.NAME == dist.CPU_COMM_OP
