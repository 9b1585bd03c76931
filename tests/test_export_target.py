"""`python -m unicom_ds.mlcd_vit export NAME PT FOLDER` never overwrites: a folder holding anything but this
command's own export of the same input is refused (exit 2, one line) and left byte-identical; a new or empty
folder is written whole; rerunning the same export writes nothing."""
import hashlib
import os

import pytest
import torch

from unicom_ds import mlcd_vit

TINY = "MLCD-ViT-Tiny-16"


def tree(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "backbone.pt"
    torch.save(mlcd_vit.build(TINY).state_dict(), path)
    return path


def test_a_folder_holding_other_files_is_refused_and_left_as_it_was(weights, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    (out / "notes.txt").write_text("keep me\n")
    before = tree(out)
    with pytest.raises(SystemExit) as e:
        mlcd_vit.main(["export", TINY, str(weights), str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"{out}: not empty (2 file(s), e.g. config.json, notes.txt); export into a "
                                       "new or empty folder\n")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt", "hf"]  # no temporary folder left


def test_an_empty_folder_is_written_whole_and_a_rerun_writes_nothing(weights, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    mlcd_vit.main(["export", TINY, str(weights), str(out)])
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert {p.name for p in out.iterdir()} == {mlcd_vit.CONFIG_FILE, mlcd_vit.WEIGHTS_FILE, mlcd_vit.PREPROCESSOR_FILE,
                                               mlcd_vit.EXPORT_RECORD}
    x = torch.randn(2, 3, 64, 64)
    model = mlcd_vit.build(TINY)
    model.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        assert torch.allclose(mlcd_vit.load_hf(out)(x), model.eval()(x), atol=1e-6)
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}, tree(out)
    copy = tmp_path / "moved.pt"  # the same bytes elsewhere: the same input
    copy.write_bytes(weights.read_bytes())
    mlcd_vit.main(["export", TINY, str(copy), str(out)])
    assert capsys.readouterr().out.endswith("; nothing written\n")
    assert ({p: p.stat().st_mtime_ns for p in out.iterdir()}, tree(out)) == before


def test_a_new_nested_folder_is_written_with_shared_file_modes(weights, tmp_path):
    out = tmp_path / "exports" / "tiny"
    umask = os.umask(0o022)
    try:
        mlcd_vit.main(["export", TINY, str(weights), str(out)])
    finally:
        os.umask(umask)
    mlcd_vit.load_hf(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]
    # safetensors writes its file 0600 (issue 32): every exported file is readable by others, as umask says
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {p.name: "0o644" for p in out.iterdir()}
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_an_earlier_export_of_other_weights_is_refused(weights, tmp_path, capsys):
    out = tmp_path / "hf"
    mlcd_vit.main(["export", TINY, str(weights), str(out)])
    before = tree(out)
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(mlcd_vit.build(TINY).state_dict(), other)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mlcd_vit.main(["export", TINY, str(other), str(out)])
    assert e.value.code == 2 and f"{out}: not empty (4 file(s)" in capsys.readouterr().err
    assert tree(out) == before
