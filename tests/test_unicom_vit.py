"""The official Unicom architecture: the official model class's state-dict keys and shapes (a fixture dumped from
deepglint/unicom), and its forward against plain math."""
import json
import math
from pathlib import Path

import pytest
import torch

from unicom_ds import backbone, unicom_vit
from unicom_ds.unicom_vit import CONFIGS, UnicomViT, build, canonical_name

torch.set_num_threads(1)
TINY = dict(image_size=32, patch_size=8, width=16, depth=2, heads=2, embed_dim=12)


# The official model class's state dict for each release architecture: deepglint/unicom's
# unicom/unicom/vision_transformer.py, build_model(NAME).state_dict() as [key, shape, dtype], dumped once (the
# file's "source" names the repository, path and commit); nothing is downloaded at test time.
OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "unicom_release_keys.json").read_text())


def official_state(release: str) -> dict[str, tuple[tuple[int, ...], str]]:
    return {key: (tuple(shape), dtype) for key, shape, dtype in OFFICIAL["models"][release]["state_dict"]}


def shapes_and_dtypes(state: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def test_the_official_key_list_names_its_source():
    source = OFFICIAL["source"]
    assert source["repository"] == "deepglint/unicom" and source["path"] == "unicom/unicom/vision_transformer.py"
    assert len(source["commit"]) == 40 and set(OFFICIAL["models"]) == {"ViT-B/32", "ViT-B/16", "ViT-L/14",
                                                                       "ViT-L/14@336px"}


@pytest.mark.parametrize("release", ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"])
def test_state_dict_keys_and_shapes_equal_the_official_model_class(release):
    """Our model for each release name (inference and training builds) has exactly the official class's state-dict
    keys, shapes and dtypes, so the release files and our exports load key for key both ways; the export is that
    state dict as it is."""
    name = OFFICIAL["models"][release]["ours"]
    assert canonical_name(release) == name
    expected = official_state(release)
    with torch.device("meta"):  # shapes only: no allocation (ViT-L/14@336's head alone is 604M weights)
        models = {"build": build(release), "train": unicom_vit.build_for_training(name)}
    for how, model in models.items():
        got = shapes_and_dtypes(model.state_dict())
        assert got.keys() - expected.keys() == set() and expected.keys() - got.keys() == set(), how
        assert got == expected, (how, {k: (got[k], expected[k]) for k in got if got[k] != expected[k]})
    # backbone.export's payload for a release name: the plain state dict (stand-in tensors of the right shapes).
    stand_in = {k: torch.zeros((), dtype=getattr(torch, dtype)).expand(shape) for k, (shape, dtype) in expected.items()}
    assert shapes_and_dtypes(backbone.export(name, stand_in)) == expected


@pytest.mark.parametrize("name,size,dim", [("ViT-B-16", 224, 768), ("ViT-L-14", 224, 768),
                                           ("ViT-L-14-336", 336, 768), ("ViT-B-32", 224, 512)])
def test_release_configs(name, size, dim):
    cfg = CONFIGS[name]
    assert (cfg["image_size"], cfg["embed_dim"]) == (size, dim)
    assert cfg["width"] == (1024 if "L" in name else 768)


@pytest.mark.parametrize("given,expected", [("ViT-B/32", "ViT-B-32"), ("ViT-B-16", "ViT-B-16"),
                                            ("ViT-L/14@336px", "ViT-L-14-336"), ("ViT-L/14@336", "ViT-L-14-336"),
                                            ("ViT-L-14-336", "ViT-L-14-336")])
def test_canonical_name(given, expected):
    assert canonical_name(given) == expected


def test_build_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown Unicom model 'ViT-H/14'.*ViT-B-32"):
        build("ViT-H/14")


def reference_forward(sd, x, heads, eps_ln=1e-5, eps_bn=2e-5):
    """The architecture in explicit tensor math, independent of the module code."""
    w = sd["patch_embed.proj.weight"]
    p = w.shape[-1]
    b, _, s, _ = x.shape
    g = s // p
    patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
    h = patches @ w.reshape(w.shape[0], -1).T + sd["patch_embed.proj.bias"] + sd["pos_embed"]

    def ln(t, name):
        mu = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps_ln) * sd[name + ".weight"] + sd[name + ".bias"]

    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        pre = f"blocks.{i}."
        y = ln(h, pre + "norm1")
        n, d = y.shape[1], y.shape[2]
        q, k, v = (y @ sd[pre + "attn.qkv.weight"].T).split(d, dim=-1)
        split = lambda t: t.reshape(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        h = h + o @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        y = ln(h, pre + "norm2")
        y = torch.clamp(y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"], 0, 6)
        h = h + y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        i += 1
    f = ln(h, "norm").reshape(b, -1)

    def bn(t, j):
        m, var = sd[f"feature.{j}.running_mean"], sd[f"feature.{j}.running_var"]
        return (t - m) / torch.sqrt(var + eps_bn) * sd[f"feature.{j}.weight"] + sd[f"feature.{j}.bias"]

    f = bn(f @ sd["feature.0.weight"].T, 1)
    return bn(f @ sd["feature.2.weight"].T, 3)


def randomise(model):
    """Non-trivial values everywhere, so a mixed-up weight cannot go unnoticed."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.2)
    return model


def test_forward_matches_reference_math():
    torch.manual_seed(0)
    model = randomise(UnicomViT(**TINY).eval())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        ref = reference_forward(model.state_dict(), x, heads=TINY["heads"])
    assert out.shape == (3, 12)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_build_is_eval_mode_so_features_do_not_depend_on_the_batch():
    # BatchNorm with running statistics: an image's feature is the same alone or in a batch.
    model = randomise(unicom_vit.UnicomViT(**TINY)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-5, atol=1e-5)


def test_build_returns_eval_mode(monkeypatch):
    monkeypatch.setitem(CONFIGS, "ViT-Tiny-8", TINY)
    model = build("ViT-Tiny/8")
    assert not model.training
    assert all(not m.training for m in model.modules())


def test_training_build_has_the_release_drop_path_rising_over_blocks():
    model = unicom_vit.build_for_training("ViT-Tiny-16")
    rates = [b.drop_path for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(unicom_vit.DROP_PATH) and model.training
    torch.manual_seed(0)
    x = torch.randn(64, 5, 64)
    block = model.blocks[-1]
    kept = block._drop(torch.ones_like(x))
    # Whole samples are dropped (zero) or kept and scaled by 1 / (1 - p).
    per_sample = kept.flatten(1)
    first = per_sample[:, 0]
    assert bool(((first == 0) | torch.isclose(first, torch.tensor(1 / 0.9))).all())
    assert (per_sample == per_sample[:, :1]).all() and 0 < int((per_sample[:, 0] == 0).sum()) < 64
    assert torch.equal(block.eval()._drop(x), x)


def test_batchnorm_head_keeps_fp32_statistics_when_the_model_is_cast_to_bf16():
    torch.manual_seed(0)
    model = unicom_vit.build_for_training("ViT-Tiny-32").bfloat16()
    bn = model.feature[1]
    assert bn.weight.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    x = torch.randn(16, 3, 64, 64, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == (16, 32)
    # One train-mode step moves the statistics by momentum 0.1 of the fp32 batch mean of the head's input.
    h = model.norm(model.blocks[0](model.patch_embed(x) + model.pos_embed)).flatten(1)
    expected = 0.1 * model.feature[0](h).float().mean(0)
    torch.testing.assert_close(bn.running_mean, expected, rtol=0.05, atol=1e-3)


def test_resize_state_dict_moves_position_grid_and_head_grid_together():
    torch.manual_seed(0)
    model = UnicomViT(**TINY)  # 32 px, patch 8: a 4 x 4 grid, width 16
    state = model.state_dict()
    g, width = 4, 16
    ramp = torch.linspace(-1, 1, g)
    # A position embedding that is a ramp along x, and a head weight that is a fixed [out, width]
    # map A scaled by the same ramp at every grid cell (f(x) * A).
    state["pos_embed"] = ramp.repeat(g).reshape(1, g * g, 1).expand(1, g * g, width).clone()
    a = torch.randn(width, width)
    head = (ramp.repeat(g).reshape(g * g, 1, 1) * a.T.reshape(1, width, width))  # [cells, in, out]
    state["feature.0.weight"] = head.permute(2, 0, 1).reshape(width, g * g * width)
    resized = unicom_vit.resize_state_dict(state, 48)  # a 6 x 6 grid
    new = 6
    pos = resized["pos_embed"].reshape(new, new, width)
    assert torch.allclose(pos, pos[:1].expand_as(pos)) and torch.allclose(pos, pos[..., :1].expand_as(pos))
    xs = pos[0, :, 0]
    assert bool((xs[1:] > xs[:-1]).all()) and xs[0] < -0.5 and xs[-1] > 0.5  # still a rising ramp
    cells = resized["feature.0.weight"].reshape(width, new, new, width).permute(1, 2, 3, 0)  # [y, x, in, out]
    scale = (g * g) / (new * new)
    for y in range(new):
        for x in range(new):
            # Every cell is still a multiple of A (the token axis was moved, not mixed with channels),
            # by the ramp's value at that cell times g_old^2 / g_new^2.
            torch.testing.assert_close(cells[y, x], a.T * xs[x] * scale, rtol=1e-4, atol=1e-5)
    resized_model = UnicomViT(**{**TINY, "image_size": 48})
    resized_model.load_state_dict(resized)
    assert unicom_vit.resize_state_dict(state, 32)["pos_embed"] is state["pos_embed"]
