"""DeepGlint's MLCD releases in CLIPVisionModel format (unicom_ds.mlcd_clip, through `mlcd:FOLDER`): replica folders
that transformers itself writes at small sizes, in fp32, fp16 and bf16, whole and sharded, read without transformers
with the features of transformers' CLIPVisionModel; their refusals; how tables name MLCD models (issue 31)."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import unicom_ds
from unicom_ds import mlcd_clip, mlcd_vit
from unicom_ds.loading import load_mlcd_folder, mlcd_folder_title
from unicom_ds.state_dicts import WeightError

torch.set_num_threads(1)

# config.json of DeepGlint-AI/mlcd-vit-base-patch32-224 and mlcd-vit-large-patch14-336, field by field as
# transformers' CLIPVisionConfig documents them:
#   model_type "clip_vision_model"  routes the folder to CLIPVisionModel (the hub lists both repos under it)
#   hidden_size            width of every token (768 / 1024)
#   intermediate_size      the MLP's hidden width (4 x hidden_size, as CLIP's towers: 3072 / 4096)
#   num_hidden_layers      encoder blocks (12 / 24)
#   num_attention_heads    heads per block (12 / 16)
#   image_size, patch_size the input side and the patch side (224, 32 / 336, 14): the position table holds
#                          (image_size / patch_size)^2 + 1 rows
#   hidden_act "quick_gelu"  the MLP activation, x * sigmoid(1.702 x), as OpenAI's CLIP
#   layer_norm_eps 1e-5    every LayerNorm (pre_layrnorm, layer_norm1/2, post_layernorm)
#   num_channels 3         RGB input
#   projection_dim         read by CLIPVisionModelWithProjection only: CLIPVisionModel (the releases) has no
#                          projection, and neither has the model we read them into
#   attention_dropout, dropout 0.0, initializer_range, initializer_factor: training and init only
# Sizes from the hub's listing of both repos (image, patch, layers, hidden, heads, quick_gelu); the MLP widths
# are CLIP's ratio, as the repos' sizes (87.5M parameters; 1.21 GB of fp32) agree.
RELEASES = {
    "mlcd-vit-base-patch32-224": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, image_size=224, patch_size=32),
    "mlcd-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14),
}
COMMON = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3, projection_dim=16)
TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, image_size=32,
            patch_size=8)
# preprocessor_config.json as CLIP's repositories ship it (and DeepGlint's, 316 bytes as OpenAI's): bicubic resize
# of the short side, center crop, CLIP's mean and std.
PREPROCESSOR = {"crop_size": TINY["image_size"], "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(mlcd_vit.CLIP_MEAN),
                "image_std": list(mlcd_vit.CLIP_STD), "resample": 3, "size": TINY["image_size"]}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def replica():
    """A random CLIPVisionModel of the releases' config at tiny sizes, every parameter moved off its init."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**TINY, **COMMON)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return hf


@pytest.fixture(scope="module")
def folders(replica, tmp_path_factory):
    """{fp32, fp16, bf16, bf16-sharded}: the replica as transformers' save_pretrained writes it."""
    out = {}
    for name, dtype in [*DTYPES.items(), ("bf16-sharded", torch.bfloat16)]:
        folder = tmp_path_factory.mktemp("clip") / name
        shard = {"max_shard_size": "20KB"} if name.endswith("sharded") else {}
        copy.deepcopy(replica).to(dtype).save_pretrained(str(folder), **shard)
        (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
        out[name] = folder
    assert (out["bf16-sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(out["bf16-sharded"].glob("model-*.safetensors"))) > 1
    return out


def _reference(folder):
    """transformers' CLIPVisionModel of `folder`, its weights (of whatever dtype) in fp32."""
    from transformers import CLIPVisionModel
    hf, info = CLIPVisionModel.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "bf16-sharded"])
def test_features_equal_transformers_pooler_output(folders, name):
    folder = folders[name]
    stored = {v.dtype for f in folder.glob("*.safetensors") for v in load_file(str(f)).values()}
    assert stored == {DTYPES[name.split("-")[0]]}
    model, _ = load_mlcd_folder(folder)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert (model.embed_dim, model.image_size) == (48, 32)
    x = _images(3, 3, 32, 32, seed=2)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 48)
        torch.testing.assert_close(out, _reference(folder)(pixel_values=x).pooler_output, atol=1e-5, rtol=1e-5)


def test_unicom_ds_load_reads_the_folder_both_ways(folders, replica):
    x = _images(2, 3, 32, 32, seed=3)
    with torch.no_grad():
        expected = replica(pixel_values=x).pooler_output
        for model, _ in (unicom_ds.load(f"mlcd:{folders['fp32']}"), unicom_ds.load("mlcd", checkpoint=folders["fp32"])):
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_the_model_is_open_clips_tower_without_projection(folders):
    from open_clip.transformer import QuickGELU, VisionTransformer
    model, _ = load_mlcd_folder(folders["fp32"])
    assert isinstance(model, VisionTransformer) and model.proj is None
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert model.positional_embedding.shape == (17, 48)  # (32 / 8)^2 patches + the class token


def test_the_transform_is_the_releases_preprocessor(folders):
    from transformers import CLIPImageProcessor
    _, preprocess = load_mlcd_folder(folders["fp32"])
    processor = CLIPImageProcessor.from_pretrained(str(folders["fp32"]))
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 60 x 80, blocky
    image = Image.fromarray(smooth)
    ours = preprocess(image)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    # Both resize the short side to 32 bicubically, crop the centre and normalise with CLIP's mean and std; the two
    # resamplers (PIL, torchvision) differ in rounding only (measured: mean 2e-5, max 0.015, where other mean and
    # std, or a squashed resize, differ by 0.47 and 0.61 on average).
    assert (ours - theirs).abs().mean() < 1e-3 and (ours - theirs).abs().max() < 0.05


def test_release_layouts_transformers_reads(folders, tmp_path):
    # transformers 4.x (the releases' writer) named every key under vision_model., some versions with the
    # position_ids buffer; transformers 5 reads that layout too, and so do we.
    state = load_file(str(folders["fp16"] / "model.safetensors"))
    old = {f"vision_model.{k}": v for k, v in state.items()}
    old["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folders["fp16"] / "config.json").read_text())
    x = _images(2, 3, 32, 32, seed=4)
    with torch.no_grad():
        expected = _reference(folders["fp16"])(pixel_values=x).pooler_output
        torch.testing.assert_close(_reference(tmp_path)(pixel_values=x).pooler_output, expected)
        torch.testing.assert_close(load_mlcd_folder(tmp_path)[0](x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_every_weight_of_the_release_sizes_has_its_place(release):
    """On the meta device (no memory): transformers' CLIPVisionModel of the release config maps key for key and
    shape for shape onto the model we build from that config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from unicom_ds.mlcd_clip import _TOP
    with torch.device("meta"):
        theirs = CLIPVisionModel(CLIPVisionConfig(**RELEASES[release], **COMMON)).state_dict()
        arch = dict(image_size=RELEASES[release]["image_size"], patch_size=RELEASES[release]["patch_size"],
                    width=RELEASES[release]["hidden_size"], depth=RELEASES[release]["num_hidden_layers"],
                    heads=RELEASES[release]["num_attention_heads"], mlp_dim=RELEASES[release]["intermediate_size"])
        ours = mlcd_clip.build(**arch).state_dict()
    mapped = mlcd_vit.from_hf_state_dict(theirs, arch["depth"], top=_TOP, in_proj="attn.in_proj_{}")
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_defaults_are_transformers_clip_vision_config_defaults():
    from transformers import CLIPVisionConfig
    ref = CLIPVisionConfig()
    assert mlcd_clip.DEFAULTS == {k: getattr(ref, k) for k in mlcd_clip.DEFAULTS}


# ---- refusals: one line naming the file and the fault ----------------------------------------------

def _copy(folder, to, drop=None, config=None):
    to.mkdir()
    state = load_file(str(folder / "model.safetensors"))
    if drop:
        del state[drop]
    save_file(state, str(to / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config or {})
    (to / "config.json").write_text(json.dumps(cfg))
    return to


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_another_model_type_is_refused_naming_the_file(folders, tmp_path):
    folder = _copy(folders["fp32"], tmp_path / "siglip", config={"model_type": "siglip_vision_model"})
    with pytest.raises(ValueError) as e:
        unicom_ds.load(f"mlcd:{folder}")
    assert _one_line(e).startswith(f"{folder / 'config.json'}: model_type 'siglip_vision_model' is not an MLCD")
    assert "'clip_vision_model' (CLIP format)" in str(e.value) and "'mlcd' (RoPE2D)" in str(e.value)


def test_a_missing_weight_is_refused_naming_the_file_and_the_key(folders, tmp_path):
    folder = _copy(folders["fp32"], tmp_path / "m", drop="encoder.layers.1.mlp.fc2.bias")
    with pytest.raises(WeightError) as e:
        load_mlcd_folder(folder)
    assert _one_line(e).startswith(f"{folder / 'model.safetensors'}: missing key 'encoder.layers.1.mlp.fc2.bias'")


def test_a_mismatched_shape_is_refused_naming_the_files_and_the_key(folders, tmp_path):
    folder = _copy(folders["fp32"], tmp_path / "s", config={"image_size": 48})  # a 37-row position table
    with pytest.raises(WeightError) as e:
        load_mlcd_folder(folder)
    assert _one_line(e) == (f"{folder / 'model.safetensors'}: shapes do not match {folder / 'config.json'} (file vs "
                            f"config): positional_embedding (17, 48) != (37, 48)")


def test_a_missing_shard_or_other_activation_is_refused(folders, tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in folders["bf16-sharded"].iterdir():
        (sharded / f.name).write_bytes(f.read_bytes())
    next(sharded.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json: names shard\(s\) that are not there"):
        unicom_ds.load(f"mlcd:{sharded}")
    folder = _copy(folders["fp32"], tmp_path / "gelu", config={"hidden_act": "gelu"})
    with pytest.raises(ValueError) as e:
        load_mlcd_folder(folder)
    assert _one_line(e) == f"{folder / 'config.json'}: hidden_act='gelu' is not supported (MLCD's CLIP-format models use 'quick_gelu')"


# ---- how tables name MLCD models ---------------------------------------------------------------------

def _config_only(folder, config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")  # present; naming reads config.json only
    return folder


def test_titles_name_family_size_and_format(tmp_path):
    from evaluation import run
    for release, config in RELEASES.items():
        _config_only(tmp_path / release, {"model_type": "clip_vision_model", **config, **COMMON})
    assert mlcd_folder_title(tmp_path / "mlcd-vit-large-patch14-336") == "MLCD ViT-L/14-336 (CLIP format)"
    assert mlcd_folder_title(tmp_path / "mlcd-vit-base-patch32-224") == "MLCD ViT-B/32-224 (CLIP format)"
    bigg = _config_only(tmp_path / "bigG", {"model_type": "mlcd", "hidden_size": 1664, "intermediate_size": 8192,
                                            "num_hidden_layers": 48, "num_attention_heads": 16, "image_size": 448,
                                            "patch_size": 14})
    assert mlcd_folder_title(bigg) == "MLCD ViT-bigG/14-448 (RoPE2D)"
    spec = run.parse_model(f"mlcd:{bigg}", tmp_path, "ViT-B-32")
    assert (spec.label, run.model_title(spec)) == ("mlcd:bigG", "MLCD ViT-bigG/14-448 (RoPE2D)")
    trained = run.parse_model("run", tmp_path, "MLCD-ViT-B-32")
    assert run.model_title(trained) == "MLCD ViT-B/32-224 (trained here)"
    assert run.model_title(run.parse_model("ckpt:MLCD-ViT-L-14-336@x.pt", tmp_path, "ViT-B-32")) == \
        "MLCD ViT-L/14-336 (trained here)"
    assert run.model_title(run.parse_model("run", tmp_path, "ViT-B-32")) is None  # named by its label


def test_tables_rename_rows_keep_fine_tuned_prefixes_and_tell_clashes_apart():
    from evaluation.results import titled
    results = {"run": {}, "mlcd:a": {}, "mlcd:b": {}, "ft-cub:run": {}, "unicom:ViT-B/32": {}}
    titles = {"run": "MLCD ViT-B/32-224 (trained here)", "mlcd:a": "MLCD ViT-L/14-336 (CLIP format)",
              "mlcd:b": "MLCD ViT-L/14-336 (CLIP format)"}
    assert list(titled(results, titles)) == [
        "MLCD ViT-B/32-224 (trained here)", "MLCD ViT-L/14-336 (CLIP format) [mlcd:a]",
        "MLCD ViT-L/14-336 (CLIP format) [mlcd:b]", "ft-cub:MLCD ViT-B/32-224 (trained here)", "unicom:ViT-B/32"]


def test_eval_stage_results_and_report_name_the_models(folders, replica, tmp_path):
    """eval.models = [mlcd:FOLDER] on digits in SOP's layout: scored from our features, results.json keyed by the
    label, results.md, the dimension plot's rows and the report's tables and stage summary by the title."""
    from evaluation import report, run
    from evaluation.demo_sets import digit_images, write_sop
    from evaluation.features import features_path
    from unicom_ds import config
    data, run_dir = tmp_path / "data", tmp_path / "run"
    x, y = digit_images(40)
    write_sop(data, x, y)
    cfg = config.resolve([f"run_dir={run_dir}", "stage=eval", f"eval.models=[mlcd:{folders['bf16']}]",
                          f"eval.data_root={data}", "eval.datasets=[sop]", "eval.workers=0", "eval.batch_size=32",
                          "eval.dims=[16]", "progress=off"])
    run.check(cfg)
    merged = run.eval_job(config.select(cfg))
    title = "MLCD ViT-48x3/8-32 (CLIP format)"  # no release has this size: width x depth
    assert list(merged) == ["mlcd:bf16"] and 0.0 <= merged["mlcd:bf16"]["sop"]["R@1"] <= 1.0
    assert json.loads((run_dir / "eval" / "models.json").read_text()) == {"mlcd:bf16": title}
    md = (run_dir / "eval" / "results.md").read_text()
    assert f"| {title} |" in md and "mlcd:bf16" not in md
    cached = np.load(features_path(run_dir, "mlcd:bf16", "sop"))
    model, preprocess = load_mlcd_folder(folders["bf16"])
    from evaluation import retrieval_sets
    paths = retrieval_sets.read("sop", data / "sop").paths[:4]
    with torch.no_grad():
        first = model(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]))
    assert np.allclose(cached[:4], first.numpy(), atol=1e-2)  # the cache is float16
    (run_dir / "report" / "assets").mkdir(parents=True)
    page = report._eval_html(run_dir, run_dir / "report")
    assert f"<td>{title}</td>" in page and "mlcd:bf16" not in page
    assert report.stage_summaries(run_dir, run_dir / "embed")["eval"]["models"] == [title]
