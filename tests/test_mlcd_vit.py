"""The MLCD ViT (unicom_ds.mlcd_vit): RoPE2D against hand computation, and the exchange with transformers'
MLCDVisionModel folders both ways on tiny random models (nothing is downloaded)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from unicom_ds import mlcd_vit

TINY = "MLCD-ViT-Tiny-16"


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init (LayerNorms are ones and zeros), so a swapped name shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _transformers_model(folder):
    from transformers import MLCDVisionModel
    hf, info = MLCDVisionModel.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = _perturbed(mlcd_vit.build(TINY), seed=1)
    return model, mlcd_vit.export_hf(model, tmp_path_factory.mktemp("mlcd") / "tiny")


# ---- RoPE2D --------------------------------------------------------------------------------------

def test_rope_frequencies_and_grid_angles_by_hand():
    # head size 8: D/2 = 4 angles per token, D/4 = 2 frequencies per axis: 10000^(-0/4) = 1, 10000^(-2/4) = 0.01.
    assert torch.allclose(mlcd_vit.rope_frequencies(8), torch.tensor([1.0, 0.01]))
    angles = mlcd_vit.rope_angles(2, 3, 8)
    expected = []
    for row in range(2):            # row-major over a 2 x 3 grid: rows follow the height
        for col in range(3):
            expected.append([row * 1.0, row * 0.01, col * 1.0, col * 0.01])
    assert torch.allclose(angles, torch.tensor(expected))
    # head size 104 (bigG): 26 frequencies per axis, theta^(-2i/52)
    f = mlcd_vit.rope_frequencies(104)
    assert f.shape == (26,) and math.isclose(f[5].item(), 10000 ** (-10 / 52), rel_tol=1e-6)


def test_apply_rope_rotates_channel_pairs_i_and_i_plus_half():
    x = _images(1, 6, 1, 8)
    angles = mlcd_vit.rope_angles(2, 3, 8)
    out = mlcd_vit.apply_rope(x, angles)
    for t in range(6):
        for i in range(4):       # channel i pairs with i + 4, rotated by angle i
            a, b, theta = x[0, t, 0, i], x[0, t, 0, i + 4], angles[t, i]
            assert torch.allclose(out[0, t, 0, i], a * torch.cos(theta) - b * torch.sin(theta), atol=1e-6)
            assert torch.allclose(out[0, t, 0, i + 4], b * torch.cos(theta) + a * torch.sin(theta), atol=1e-6)


def test_rope_scores_depend_on_the_2d_offset_only():
    # <rot(q, p1), rot(k, p2)> is a function of p2 - p1: shifting both tokens by (1, 2) keeps it.
    q, k = _images(1, 1, 1, 16, seed=1), _images(1, 1, 1, 16, seed=2)
    grid = mlcd_vit.rope_angles(4, 4, 16)

    def score(p1, p2):
        return (mlcd_vit.apply_rope(q, grid[p1 : p1 + 1]) * mlcd_vit.apply_rope(k, grid[p2 : p2 + 1])).sum()

    at = lambda r, c: r * 4 + c  # noqa: E731
    assert torch.allclose(score(at(0, 0), at(1, 1)), score(at(1, 2), at(2, 3)), atol=1e-5)
    assert not torch.allclose(score(at(0, 0), at(1, 1)), score(at(0, 0), at(1, 2)), atol=1e-3)


def test_model_angles_put_the_class_tokens_learned_angles_first():
    model = mlcd_vit.build(TINY)
    angles = model.angles(4, 4)
    assert angles.shape == (17, 16)  # 1 + 4 x 4 tokens, head size 32 -> 16 angles
    assert torch.equal(angles[0], model.class_pos_emb[0].detach())
    assert torch.allclose(angles[1:], mlcd_vit.rope_angles(4, 4, 32))


# ---- names and sizes ------------------------------------------------------------------------------

def test_names_and_the_bigG_release_config():
    from transformers import MLCDVisionConfig
    assert mlcd_vit.canonical_name("MLCD-ViT-bigG/14@448px") == "MLCD-ViT-bigG-14-448"
    assert mlcd_vit.canonical_name("MLCD-ViT-B/32") == "MLCD-ViT-B-32"
    ref = MLCDVisionConfig()  # transformers' defaults are DeepGlint-AI/mlcd-vit-bigG-patch14-336
    assert mlcd_vit.config("MLCD-ViT-bigG/14@336") == dict(
        image_size=ref.image_size, patch_size=ref.patch_size, width=ref.hidden_size, depth=ref.num_hidden_layers,
        heads=ref.num_attention_heads, mlp_dim=ref.intermediate_size)
    assert ref.rope_parameters["rope_theta"] == mlcd_vit.ROPE_THETA and ref.layer_norm_eps == mlcd_vit.LN_EPS
    with pytest.raises(ValueError, match="unknown MLCD model 'MLCD-ViT-H-14'"):
        mlcd_vit.build("MLCD-ViT-H-14")


# ---- ours -> transformers -------------------------------------------------------------------------

def test_export_loads_in_transformers_with_the_same_features(exported):
    model, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    hf = _transformers_model(folder)
    for shape in ((3, 3, 64, 64), (2, 3, 48, 80)):  # the config's size, and a non-square one (rows = height)
        x = _images(*shape, seed=3)
        with torch.no_grad():
            out = hf(pixel_values=x)
            assert torch.allclose(model(x), out.pooler_output, atol=1e-5)
            assert torch.allclose(model.forward_tokens(x), out.last_hidden_state, atol=1e-5)


def test_export_writes_clips_image_processor(exported):
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor.from_pretrained(str(exported[1]))
    assert (processor.crop_size.height, processor.crop_size.width) == (64, 64)
    assert tuple(processor.image_mean) == mlcd_vit.CLIP_MEAN and tuple(processor.image_std) == mlcd_vit.CLIP_STD


def test_command_line_export_of_an_official_style_state_dict(exported, tmp_path):
    model, _ = exported
    # As the official vit_rope2d.py training saves it: torch.compile's prefix, the unused position table and proj.
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["_orig_mod.positional_embedding"] = torch.zeros(17, 64)
    state["_orig_mod.proj"] = torch.zeros(64, 32)
    torch.save(state, tmp_path / "official.pt")
    mlcd_vit.main(["export", TINY, str(tmp_path / "official.pt"), str(tmp_path / "out")])
    x = _images(2, 3, 64, 64, seed=4)
    with torch.no_grad():
        assert torch.allclose(mlcd_vit.load_hf(tmp_path / "out")(x), model(x), atol=1e-6)


def test_command_line_export_names_a_wrong_state_dict(tmp_path):
    state = mlcd_vit.build(TINY).state_dict()
    del state["ln_post.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt.*missing keys \(1\): ln_post\.bias"):
        mlcd_vit.main(["export", TINY, str(tmp_path / "bad.pt"), str(tmp_path / "out")])


# ---- transformers -> ours -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    from transformers import MLCDVisionConfig, MLCDVisionModel
    torch.manual_seed(0)
    cfg = MLCDVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                           image_size=32, patch_size=8)
    hf = _perturbed(MLCDVisionModel(cfg), seed=2).eval()
    folder = tmp_path_factory.mktemp("hf") / "saved"
    hf.save_pretrained(str(folder))
    return hf, folder


def test_import_of_a_transformers_folder_gives_the_same_features(saved_by_transformers):
    hf, folder = saved_by_transformers
    ours = mlcd_vit.load_hf(folder)
    assert (ours.width, ours.depth, ours.heads, ours.mlp_dim, ours.image_size, ours.patch_size) == (48, 3, 3, 96, 32, 8)
    x = _images(3, 3, 32, 32, seed=5)
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(pixel_values=x).pooler_output, atol=1e-5)


def test_unicom_ds_load_reads_an_mlcd_folder(saved_by_transformers):
    import unicom_ds
    hf, folder = saved_by_transformers
    x = _images(2, 3, 32, 32, seed=6)
    with torch.no_grad():
        expected = hf(pixel_values=x).pooler_output
        for model, preprocess in (unicom_ds.load(f"mlcd:{folder}"), unicom_ds.load("mlcd", checkpoint=folder)):
            assert isinstance(model, mlcd_vit.MLCDViT) and not model.training
            assert torch.allclose(model(x), expected, atol=1e-5)
    from PIL import Image
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="give the folder"):
        unicom_ds.load("mlcd")


def test_import_accepts_vision_model_prefixed_and_half_precision_weights(saved_by_transformers, tmp_path):
    hf, folder = saved_by_transformers
    state = load_file(str(folder / "model.safetensors"))
    save_file({f"vision_model.{k}": v.to(torch.bfloat16) for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model = mlcd_vit.load_hf(tmp_path)
    assert model.conv1.weight.dtype == torch.float32
    x = _images(2, 3, 32, 32, seed=7)
    with torch.no_grad():
        assert torch.allclose(model(x), hf(pixel_values=x).pooler_output, atol=0.1)


def test_import_reads_sharded_weights(saved_by_transformers, tmp_path):
    hf, folder = saved_by_transformers
    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    x = _images(2, 3, 32, 32, seed=8)
    with torch.no_grad():
        assert torch.allclose(mlcd_vit.load_hf(tmp_path)(x), hf(pixel_values=x).pooler_output, atol=1e-5)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names shard.*model-00002-of-00002.safetensors"):
        mlcd_vit.load_hf(tmp_path)


# ---- errors name the file and the key -------------------------------------------------------------

def _copy(folder, to, drop=None, add=None, config=None):
    to.mkdir()
    state = load_file(str(folder / "model.safetensors"))
    if drop:
        del state[drop]
    state.update(add or {})
    save_file(state, str(to / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config or {})
    (to / "config.json").write_text(json.dumps(cfg))
    return to


def test_a_missing_weight_names_the_file_and_the_key(saved_by_transformers, tmp_path):
    folder = _copy(saved_by_transformers[1], tmp_path / "m", drop="encoder.layers.2.self_attn.k_proj.bias")
    with pytest.raises(mlcd_vit.WeightError,
                       match=r"m/model\.safetensors: missing key 'encoder\.layers\.2\.self_attn\.k_proj\.bias'"):
        mlcd_vit.load_hf(folder)


def test_an_unexpected_weight_names_the_file_and_the_key(saved_by_transformers, tmp_path):
    folder = _copy(saved_by_transformers[1], tmp_path / "u", add={"visual_projection.weight": torch.zeros(4, 48)})
    with pytest.raises(mlcd_vit.WeightError, match=r"u/model\.safetensors: unexpected key\(s\).*visual_projection\.weight"):
        mlcd_vit.load_hf(folder)


def test_a_mismatched_weight_names_the_file_and_the_key(saved_by_transformers, tmp_path):
    folder = _copy(saved_by_transformers[1], tmp_path / "s", config={"intermediate_size": 64})
    with pytest.raises(mlcd_vit.WeightError,
                       match=r"s/model\.safetensors: shapes do not match .*s/config\.json.*"
                             r"transformer\.resblocks\.0\.mlp\.c_fc\.weight \(96, 48\) != \(64, 48\)"):
        mlcd_vit.load_hf(folder)


def test_a_missing_folder_or_file_is_named(saved_by_transformers, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MLCD model folder .*nowhere: no such folder"):
        mlcd_vit.load_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json: no such file"):
        mlcd_vit.load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((saved_by_transformers[1] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"empty/model\.safetensors: no such file"):
        mlcd_vit.load_hf(tmp_path / "empty")


def test_the_hub_model_type_mlcd_is_read_and_a_clip_vision_folder_is_not(saved_by_transformers, tmp_path):
    # DeepGlint's bigG repositories say model_type "mlcd"; transformers' auto classes map it to MLCDVisionModel.
    from transformers import AutoModel
    hf, folder = saved_by_transformers
    hub = _copy(folder, tmp_path / "hub", config={"model_type": "mlcd"})
    assert type(AutoModel.from_pretrained(str(hub))).__name__ == "MLCDVisionModel"
    x = _images(2, 3, 32, 32, seed=9)
    with torch.no_grad():
        assert torch.allclose(mlcd_vit.load_hf(hub)(x), hf(pixel_values=x).pooler_output, atol=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 1024}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'clip_vision_model' is not an MLCDVisionModel"):
        mlcd_vit.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mlcd_vision_model", "hidden_act": "quick_gelu"}))
    with pytest.raises(ValueError, match=r"config\.json: hidden_act='quick_gelu' is not supported"):
        mlcd_vit.load_hf(tmp_path)


# ---- the eval stage's mlcd:FOLDER ----------------------------------------------------------------

def test_eval_models_mlcd_entry(saved_by_transformers, tmp_path):
    from evaluation import run
    from unicom_ds.config import ConfigError
    folder = saved_by_transformers[1]
    spec = run.parse_model(f"mlcd:{folder}", tmp_path, "ViT-B-16")
    assert (spec.label, spec.name, spec.checkpoint) == ("mlcd:saved", "mlcd", str(folder))
    run.check_mlcd_folder("eval.models 'x'", spec.checkpoint)
    identity = run._checkpoint_identity(f"mlcd:{folder}", spec)
    assert identity["bytes"] == sum((folder / f).stat().st_size for f in ("config.json", "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"eval.models 'x': MLCD model folder .*missing: no such folder"):
        run.check_mlcd_folder("eval.models 'x'", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="mlcd:FOLDER"):
        run.parse_model("mlcd:", tmp_path, "ViT-B-16")
    # The jobs that rebuild a backbone take it too (tests/test_mlcd_jobs.py); a missing folder is named with their key.
    cfg = SimpleNamespace(run_dir=tmp_path, model="ViT-B-16")
    assert run.job_model(f"mlcd:{folder}", "detect.model", cfg) == spec
    with pytest.raises(FileNotFoundError, match=r"detect.model=mlcd:.*missing: MLCD model folder .*missing: no such"):
        run.job_model(f"mlcd:{tmp_path / 'missing'}", "detect.model", cfg)


def test_eval_stage_scores_an_mlcd_folder_end_to_end(exported, tmp_path):
    """eval.models=[mlcd:FOLDER] on digits-as-SOP: checked, scored under `mlcd:<folder>`, features from our model."""
    import numpy as np
    from evaluation import retrieval_sets, run
    from evaluation.demo_sets import digit_images, write_sop
    from evaluation.features import features_path
    from unicom_ds import config
    from unicom_ds.loading import load
    model, folder = exported
    data, run_dir = tmp_path / "data", tmp_path / "run"
    x, y = digit_images(60)
    write_sop(data, x, y)
    cfg = config.resolve([f"run_dir={run_dir}", "stage=eval", f"eval.models=[mlcd:{folder}]", f"eval.data_root={data}",
                          "eval.datasets=[sop]", "eval.workers=0", "eval.batch_size=32", "eval.dims=[64,16]",
                          "progress=off"])
    run.check(cfg)
    merged = run.eval_job(config.select(cfg))
    assert 0.0 <= merged["mlcd:tiny"]["sop"]["R@1"] <= 1.0
    cached = np.load(features_path(run_dir, "mlcd:tiny", "sop"))
    paths = retrieval_sets.read("sop", data / "sop").paths
    _, preprocess = load(f"mlcd:{folder}")
    from PIL import Image
    with torch.no_grad():
        first = model(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[:4]]))
    assert cached.shape == (len(paths), 64)
    assert np.allclose(cached[:4], first.numpy(), atol=1e-2)  # the cache is float16
    missing = config.resolve([f"run_dir={run_dir}", "stage=eval", f"eval.models=[mlcd:{tmp_path / 'gone'}]",
                              f"eval.data_root={data}", "eval.datasets=[]"])
    with pytest.raises(FileNotFoundError, match=r"eval.models 'mlcd:.*gone': MLCD model folder .*gone: no such folder"):
        run.check(missing)
