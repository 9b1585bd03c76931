"""unicom_ds.load: release-format files, train-stage exports and open_clip models, and their errors."""
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import unicom_ds
from unicom_ds import backbone, config, model_configs
from unicom_ds.unicom_vit import CONFIGS, UnicomViT

torch.set_num_threads(1)
TINY = dict(image_size=32, patch_size=8, width=16, depth=2, heads=2, embed_dim=12)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def tiny_release(monkeypatch, tmp_path):
    """A random tiny Unicom model and its weights saved the way the release files are: an fp16 state dict."""
    monkeypatch.setitem(CONFIGS, "ViT-Tiny-8", TINY)
    torch.manual_seed(0)
    model = UnicomViT(**TINY).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the head is really exercised
        for bn in (model.feature[1], model.feature[3]):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1, 0.1)
            bn.bias.normal_(0, 0.1)
    path = tmp_path / "FP16-ViT-Tiny-8.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return model, path


def test_release_file_loads_strictly_and_gives_the_same_features(tiny_release):
    model, path = tiny_release
    loaded, preprocess = unicom_ds.load("ViT-Tiny/8", checkpoint=path)
    assert not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        before, after = model(x), loaded(x)
    torch.testing.assert_close(after, before, rtol=0.02, atol=0.02)  # fp16 rounding of the weights
    # Exactly the fp32 model with fp16-rounded weights:
    rounded = UnicomViT(**TINY).eval()
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(after, rounded(x))


def test_release_names_in_both_spellings_and_the_unicom_prefix(tiny_release):
    _, path = tiny_release
    x = torch.randn(2, 3, 32, 32)
    outs = [unicom_ds.load(n, checkpoint=path)[0](x) for n in ("ViT-Tiny/8", "ViT-Tiny-8", "unicom:ViT-Tiny/8")]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


def test_release_preprocess_is_clip_bicubic_resize_center_crop(tiny_release):
    _, path = tiny_release
    _, preprocess = unicom_ds.load("ViT-Tiny-8", checkpoint=path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    expected = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                          T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])(image)
    torch.testing.assert_close(preprocess(image), expected)
    assert preprocess(image.convert("L")).shape == (3, 32, 32)  # grey images become RGB


def test_official_name_without_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="'ViT-B/32': a checkpoint file must be given.*nothing is downloaded"):
        unicom_ds.load("ViT-B/32")


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: no such file"):
        unicom_ds.load("ViT-B/32", checkpoint=tmp_path / "nope.pt")


def test_mismatched_keys_are_listed_with_the_file(tiny_release, tmp_path):
    model, _ = tiny_release
    state = model.state_dict()
    state["head.weight"] = state.pop("norm.weight")
    state["blocks.0.attn.qkv.bias"] = torch.zeros(48)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        unicom_ds.load("ViT-Tiny-8", checkpoint=path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1): norm.weight" in msg
    assert "unexpected keys (2): head.weight, blocks.0.attn.qkv.bias" in msg


def test_wrong_shapes_are_reported(tiny_release, tmp_path):
    model, _ = tiny_release
    state = model.state_dict()
    state["pos_embed"] = torch.zeros(1, 17, 16)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): pos_embed \(1, 17, 16\) != \(1, 16, 16\)"):
        unicom_ds.load("ViT-Tiny-8", checkpoint=tmp_path / "shape.pt")


def tiny_openclip_visual():
    model_configs.register()
    torch.manual_seed(1)
    return open_clip.create_model("ViT-Tiny-16").visual.eval()


def test_train_export_gives_the_features_of_the_saved_model(tmp_path):
    visual = tiny_openclip_visual()
    path = tmp_path / "train" / "backbone.pt"
    path.parent.mkdir()
    torch.save(backbone.export("openclip:ViT-Tiny-16", visual.state_dict()), path)  # as the train stage writes it
    for name in ("openclip:ViT-Tiny-16", "ckpt:openclip:ViT-Tiny-16"):
        loaded, preprocess = unicom_ds.load(name, checkpoint=path)
        x = torch.randn(3, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), visual(x))
    assert preprocess(Image.new("RGB", (100, 70))).shape == (3, 64, 64)


def test_train_export_under_another_name_is_refused(tmp_path):
    visual = tiny_openclip_visual()
    torch.save(backbone.export("openclip:ViT-Tiny-16", visual.state_dict()), tmp_path / "b.pt")
    with pytest.raises(ValueError, match="holds a 'openclip:ViT-Tiny-16' backbone, not 'ViT-Tiny-32'"):
        unicom_ds.load("ckpt:ViT-Tiny-32", checkpoint=tmp_path / "b.pt")


def test_openclip_model_from_a_local_file(tmp_path):
    model_configs.register()
    torch.manual_seed(2)
    clip = open_clip.create_model("ViT-Tiny-32").eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    loaded, preprocess = unicom_ds.load("openclip:ViT-Tiny-32", checkpoint=tmp_path / "clip.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clip.encode_image(x))
    assert not loaded.training


def test_unicom_ds_load_is_callable_whatever_the_import_order():
    import unicom_ds.loading  # noqa: F401  (the function's module; must not shadow unicom_ds.load)
    from unicom_ds import load as from_package
    for fn in (unicom_ds.load, from_package):
        with pytest.raises(ValueError, match="a checkpoint file must be given"):
            fn("ViT-B/16")


def test_prefix_that_contradicts_the_file_is_refused(tiny_release, tmp_path):
    _, release = tiny_release
    with pytest.raises(ValueError, match=r"model 'ckpt:ViT-Tiny-8' needs a train-stage export, "
                                         r"this file is a plain state dict \(the Unicom release format\)"):
        unicom_ds.load("ckpt:ViT-Tiny-8", checkpoint=release)
    torch.save(backbone.export("openclip:ViT-Tiny-16", tiny_openclip_visual().state_dict()), tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"needs a plain state dict \(the Unicom release format\), "
                                         r"this file is a train-stage export"):
        unicom_ds.load("unicom:ViT-B/32", checkpoint=tmp_path / "b.pt")


def test_release_architecture_export_is_a_release_file(tmp_path):
    """model=ViT-Tiny-16 trains the release architecture; its export is a plain fp32 state dict with the
    release's keys that the inference model loads strictly and that gives the trained model's features."""
    torch.manual_seed(3)
    trained = backbone.build("ViT-Tiny-16")
    assert trained.training and trained.blocks[-1].drop_path == pytest.approx(0.1)
    trained(torch.randn(8, 3, 64, 64))  # a train-mode forward moves the BatchNorm statistics
    payload = backbone.export("ViT-Tiny-16", trained.state_dict())
    assert set(payload) == set(UnicomViT(**CONFIGS["ViT-Tiny-16"]).state_dict())
    assert all(v.dtype == torch.float32 for k, v in payload.items() if not k.endswith("num_batches_tracked"))
    torch.save(payload, tmp_path / "backbone.pt")
    official = UnicomViT(**CONFIGS["ViT-Tiny-16"]).eval()
    official.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True), strict=True)
    loaded, _ = unicom_ds.load("ViT-Tiny-16", checkpoint=tmp_path / "backbone.pt")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = trained.eval()(x)
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(official(x), expected)
    assert expected.shape == (3, 64)


@pytest.mark.parametrize("name,kind,dim", [("ViT-B-16", "Unicom release architecture", 768),
                                           ("ViT-B-32", "Unicom release architecture", 512),
                                           ("ViT-L-14-336", "Unicom release architecture", 768),
                                           ("openclip:ViT-B-16", "open_clip CLIP vision tower", 512),
                                           ("MLCD-ViT-B-32", "MLCD RoPE2D ViT", 768),
                                           ("MLCD-ViT-bigG-14-448", "MLCD RoPE2D ViT", 1664)])
def test_model_names_say_which_architecture_they_train(name, kind, dim):
    assert backbone.embed_dim(name) == dim
    assert kind in backbone.description(name)


def test_unknown_model_lists_the_names():
    with pytest.raises(ValueError, match="model=ViT-B-33: expected one of ViT-B-32, ViT-B-16"):
        backbone.build("ViT-B-33")


def test_weights_trained_with_quickgelu_build_the_quickgelu_tower(tmp_path):
    """OpenAI's and LAION-400M's ViT weights were trained with QuickGELU; open_clip 3 only warns when the
    config says GELU. The loader, the embed stage and fine-tuning's export name pick the -quickgelu tower."""
    from unicom_ds.loading import openclip_architecture
    from evaluation.finetune.job import trained_name
    from evaluation.run import parse_model
    assert openclip_architecture("ViT-B-32", "openai") == "ViT-B-32-quickgelu"
    assert openclip_architecture("ViT-B-32", "laion400m_e32") == "ViT-B-32-quickgelu"
    assert openclip_architecture("ViT-B-16", "laion400m_e32") == "ViT-B-16"
    assert openclip_architecture("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32"  # trained with GELU
    assert openclip_architecture("ViT-B-32", str(tmp_path / "w.pt")) == "ViT-B-32"  # a file: as named
    assert openclip_architecture("ViT-Tiny-16", None) == "ViT-Tiny-16"
    cfg = config.resolve(["finetune.init=openclip:ViT-L-14@openai", f"run_dir={tmp_path}"])
    name = trained_name(parse_model(str(cfg.finetune.init), cfg.run_dir, str(cfg.model)), cfg)
    assert name == "openclip:ViT-L-14-quickgelu"
    # The exported tower is rebuilt with QuickGELU, so a fine-tuned OpenAI tower reloads as it trained.
    acts = {type(m).__name__ for m in backbone.build("openclip:ViT-B-32-quickgelu").modules()}
    assert "QuickGELU" in acts and "GELU" not in acts
    assert "QuickGELU" not in {type(m).__name__ for m in backbone.build("openclip:ViT-B-32").modules()}


def _library_imports() -> dict[str, set[str]]:
    """unicom_ds module -> the unicom_ds modules it imports, at the top or inside functions (read with ast)."""
    import ast
    from pathlib import Path
    package = Path(unicom_ds.__file__).parent
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for path in package.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "unicom_ds":  # from unicom_ds import a, b
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unicom_ds."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("unicom_ds.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_the_library_imports_run_downhill():
    """No cycle among unicom_ds's modules; the readers of weights (loading, backbone, mlcd_vit, mlcd_clip) share
    state_dicts, which imports none of them (issue 31: backbone -> mlcd_vit -> loading -> backbone was one)."""
    import graphlib
    graph = _library_imports()
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    assert graph["state_dicts"] == set()
    assert {"state_dicts"} <= graph["loading"] and {"state_dicts"} <= graph["mlcd_vit"]
    assert "loading" not in graph["mlcd_vit"] | graph["mlcd_clip"] | graph["backbone"]
