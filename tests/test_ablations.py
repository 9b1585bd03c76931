"""benchmarks/ablations.py cannot rot: its smallest variant set (`--tiny --only r1`: tiny data, one seed, one
epoch, the base run and three r1 values) runs end to end, cluster -> train -> eval through slurm/submit.py, and
writes its report and plot. The numbers of a tiny run mean nothing; the suite's are in docs/ablations.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_r1_ablation_runs_end_to_end(tmp_path):
    doc = tmp_path / "ablations.md"
    proc = subprocess.run([sys.executable, "benchmarks/ablations.py", "--tiny", "--only", "r1", "--out",
                           str(tmp_path / "runs"), "--doc", str(doc)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = doc.read_text()
    assert "Tab. 6: random class selection r1" in text and "r1 = 1.0 is worst" in text
    assert "![Tab. 6: random class selection r1](ablations_r1.png)" in text
    assert (tmp_path / "ablations_r1.png").is_file()
    for name in ("base", "r1-1.0", "r1-0.3", "r1-0.05"):
        result = json.loads((tmp_path / "runs" / "seed0" / name / "ablation.json").read_text())
        assert 0 <= result["R@1"] <= 1 and 0 <= result["probe"] <= 1 and result["loss"], name
        results = json.loads((tmp_path / "runs" / "seed0" / name / "eval" / "results.json").read_text())
        assert set(results["run"]) == {"sop", "eurosat"}
    # every run went through the launcher: the cluster stage imported the release, train exported a backbone
    assert (tmp_path / "runs" / "seed0" / "base" / "train" / "backbone.pt").is_file()
    assert (tmp_path / "runs" / "seed0" / "base" / "embed" / "parts" / "join.json").is_file()
