"""Checkpoint files: atomic publication, `latest`, pruning, re-slicing prototype blocks and their AdamW state."""
import copy
import random
import re

import numpy as np
import pytest
import torch

from unicom_ds import checkpoint
from unicom_ds.prototypes import block_range
from unicom_ds.config import ConfigError

torch.set_num_threads(1)
K, D = 11, 3


def fake_save(root, step, world=2, keep=2, crash_after_rank=None):
    """What Trainer.save does, with a stand-in for the engine's files."""
    tmp = checkpoint.begin(root, step)
    (tmp / checkpoint.ENGINE_TAG).mkdir()
    (tmp / checkpoint.ENGINE_TAG / "mp_rank_00_model_states.pt").write_bytes(b"engine")
    for rank in range(world):
        lo, hi = block_range(K, world, rank)
        checkpoint.save_rank_state(tmp, rank, {"rank": rank, "class_range": (lo, hi), "weight": torch.full((hi - lo, D), float(step)),
                                               "optimizer": {"state": {}, "param_groups": []}, "rng": None})
        if rank == crash_after_rank:
            raise KeyboardInterrupt("killed mid-save")
    return checkpoint.commit(root, step, {"world_size": world, "model": "ViT-Tiny-16"}, keep)


def test_latest_and_pruning(tmp_path):
    root = tmp_path / "ckpt"
    assert checkpoint.resolve(root, "latest") is None  # a fresh run
    assert checkpoint.resolve(root, "none") is None  # from scratch: nothing to overwrite yet
    for step in (10, 20, 30):
        fake_save(root, step)
    assert checkpoint.resolve(root, "latest") == root / "step_30"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_20", "step_30"]
    assert checkpoint.read_meta(root / "step_20") == {"world_size": 2, "model": "ViT-Tiny-16", "step": 20}
    with pytest.raises(ConfigError, match=f"train.resume=none: {tmp_path} holds checkpoints up to step_30; "
                                          "training from scratch would overwrite them"):
        checkpoint.resolve(root, "none")
    assert checkpoint.resolve(root, str(root / "step_20")) == root / "step_20"
    with pytest.raises(FileNotFoundError, match="step_10 is not a complete checkpoint"):
        checkpoint.resolve(root, str(root / "step_10"))


def test_crash_during_rank_writes_keeps_previous(tmp_path):
    root = tmp_path / "ckpt"
    fake_save(root, 10)
    with pytest.raises(KeyboardInterrupt):
        fake_save(root, 20, crash_after_rank=0)
    assert checkpoint.resolve(root, "latest") == root / "step_10"
    assert (root / ".step_20.tmp").is_dir() and not (root / "step_20").exists()
    states = checkpoint.load_rank_states(checkpoint.resolve(root, "latest"), K, 0, K)
    assert all(float(s["weight"][0, 0]) == 10.0 for s in states)
    fake_save(root, 20)  # the next save clears the leftovers
    assert not (root / ".step_20.tmp").exists() and checkpoint.resolve(root, "latest") == root / "step_20"


def test_missing_rank_file_is_not_published(tmp_path):
    root = tmp_path / "ckpt"
    fake_save(root, 10)
    checkpoint.begin(root, 20)
    with pytest.raises(RuntimeError, match=r"rank files missing for ranks \[0, 1\]"):
        checkpoint.commit(root, 20, {"world_size": 2}, keep=2)
    assert checkpoint.resolve(root, "latest") == root / "step_10"


def test_crash_between_rename_and_pointer(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    fake_save(root, 10)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed before `latest` was rewritten")

    monkeypatch.setattr(checkpoint, "write_text_atomic", die)
    with pytest.raises(KeyboardInterrupt):
        fake_save(root, 20)
    assert (root / "step_20").is_dir() and checkpoint.resolve(root, "latest") == root / "step_10"
    monkeypatch.undo()
    fake_save(root, 20)  # a resumed run reaching step 20 again replaces the unpublished folder
    assert checkpoint.resolve(root, "latest") == root / "step_20"


def adamw_blocks(world: int, full: torch.Tensor, grads: list[torch.Tensor]) -> list[dict]:
    """Per-rank saved states after training each block with its own AdamW, as the ranks do."""
    states = []
    for rank in range(world):
        lo, hi = block_range(K, world, rank)
        w = torch.nn.Parameter(full[lo:hi].clone())
        opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.05)
        for g in grads:
            w.grad = g[lo:hi].clone()
            opt.step()
        states.append({"rank": rank, "class_range": (lo, hi), "weight": w.detach().clone(), "optimizer": opt.state_dict()})
    return states


def test_reslice_weight_and_adamw_state_across_rank_counts():
    torch.manual_seed(0)
    full = torch.randn(K, D)
    grads = [torch.randn(K, D) for _ in range(3)]
    # Reference: one AdamW over the whole matrix (AdamW is elementwise, so blocks must agree with it).
    ref = torch.nn.Parameter(full.clone())
    ref_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.05)
    for g in grads:
        ref.grad = g.clone()
        ref_opt.step()
    saved = adamw_blocks(2, full, grads)
    for world in (1, 3):
        for rank in range(world):
            lo, hi = block_range(K, world, rank)
            weight, opt_state = checkpoint.merge_prototype_states([s for s in saved if s["class_range"][1] > lo
                                                                   and s["class_range"][0] < hi], lo, hi)
            torch.testing.assert_close(weight, ref.detach()[lo:hi], rtol=1e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt_state["state"][0][key], ref_opt.state[ref][key][lo:hi], rtol=1e-6, atol=1e-9)
            assert float(opt_state["state"][0]["step"]) == 3.0
            # The merged state loads into a fresh optimizer of the new block and steps like the reference.
            w = torch.nn.Parameter(weight.clone())
            opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.05)
            opt.load_state_dict(opt_state)
            w.grad = grads[0][lo:hi].clone()
            opt.step()
            ref2 = ref.detach().clone().requires_grad_()
            opt2 = torch.optim.AdamW([ref2], lr=0.1, weight_decay=0.05)
            opt2.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # load aliases tensors
            ref2.grad = grads[0].clone()
            opt2.step()
            torch.testing.assert_close(w.detach(), ref2.detach()[lo:hi], rtol=1e-6, atol=1e-7)


def test_load_rank_states_reads_only_overlapping_blocks(tmp_path):
    root = tmp_path / "ckpt"
    path = fake_save(root, 5, world=4)
    got = checkpoint.load_rank_states(path, K, *block_range(K, 2, 1))  # classes [6, 11) of 2 ranks
    assert [s["class_range"] for s in got] == [block_range(K, 4, r) for r in (2, 3)]


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item())
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item()) == first


class Payload:
    """What an attacker plants: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_payload_in_a_rank_file_does_not_run(tmp_path):
    root = tmp_path / "ckpt"
    path = fake_save(root, 5)
    marker = tmp_path / "pwned"
    state = torch.load(checkpoint.rank_file(path, 0), weights_only=True)
    state["rng"] = Payload(marker)
    torch.save(state, checkpoint.rank_file(path, 0))
    torch.load(checkpoint.rank_file(path, 0), weights_only=False)  # the payload is real: a plain load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=r"rank_00000\.pt: not a rank file this project wrote"):
        checkpoint.load_rank_states(path, K, 0, K)
    assert not marker.exists()


def test_resume_from_outside_the_run_needs_trust(tmp_path):
    other = fake_save(tmp_path / "other" / "ckpt", 5)
    root = tmp_path / "run" / "ckpt"
    with pytest.raises(checkpoint.ConfigError, match=r"train.resume=.*other/ckpt/step_5 is outside this run's "
                                                     r"checkpoints .*train.trust_checkpoint=true"):
        checkpoint.resolve(root, str(other))
    assert checkpoint.resolve(root, str(other), trust=True) == other
    for section in ("finetune", "quantize.scq"):  # each job's refusal names its own keys
        with pytest.raises(checkpoint.ConfigError, match=rf"^{re.escape(section)}.resume=.* pass "
                                                         rf"{re.escape(section)}.trust_checkpoint=true "):
            checkpoint.resolve(root, str(other), section=section)
    own = fake_save(root, 7)
    assert checkpoint.resolve(root, str(own)) == own and checkpoint.resolve(root, "latest") == own
