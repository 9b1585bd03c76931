"""The MLCD ViT (DeepGlint, ECCV 2024; deepglint/unicom `mlcd/vit_rope2d.py`), re-implemented, and its
exchange with the folder format of Hugging Face's `transformers.MLCDVisionModel` (config.json +
model.safetensors), the format DeepGlint releases its RoPE2D models in.

The architecture is a CLIP-style pre-LN ViT with a class token and no learned position table:
patches (a bias-free convolution) behind a class token, `ln_pre`, blocks whose attention rotates
queries and keys with a 2-D rotary position embedding (RoPE2D), and `ln_post` on the class token. That
normalised class token is the feature (`model(images)`, [B, width]): MLCDVisionModel's `pooler_output`,
and the official `VisualTransformer.forward` without a projection. There is no projection head.

RoPE2D: each head of size D rotates its queries and keys in the "rotate half" layout (channel i
pairs with channel i + D/2). The angles of a patch at grid row h and column w are [h * f, w * f]
(D/2 angles, f the D/4 frequencies theta^(-2i/(D/2)), theta = 10000), repeated twice to span D. The class token's D/2 angles are a learned
parameter, `class_pos_emb`. Rows follow the image height and columns its width, as MLCDVisionModel
(the official file builds the grid from (width, height); the two agree on square inputs, the only ones
its models take).

Module names follow the official `vit_rope2d.py` (`conv1`, `class_embedding`, `class_pos_emb`,
`ln_pre`, `transformer.resblocks.N.{ln_1,attn.in_proj,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}`,
`ln_post`), so its state dicts load key for key; `to_hf_state_dict` / `from_hf_state_dict` map them to
and from transformers' names. `export_hf(model, folder)` writes a folder that
`transformers.MLCDVisionModel.from_pretrained(folder)` reads; `load_hf(folder)` reads such a folder (a
released MLCD checkpoint) into this module without transformers.

    python -m unicom_ds.mlcd_vit export NAME STATE_DICT.pt OUT_FOLDER

writes a state dict of this architecture as such a folder: a train stage's RUN/train/backbone.pt of
`model=MLCD-ViT-...` (the train stage trains this module by name), or a plain state dict (ours, or an
official `vit_rope2d.py` checkpoint). OUT_FOLDER must be new or empty (exit 2 otherwise) and appears whole,
with a record of its source (unicom_ds_export.json); rerunning the same export (NAME and a file of the same
sha256) finds that record and writes nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unicom_ds.atomic import atomic_path
from unicom_ds.state_dicts import (CONFIG_FILE, WEIGHTS_FILE, WeightError, check_state_dict, is_export,
                                   load_checked, read_config_json, read_safetensors, read_weights)

# name -> architecture. The bigG sizes are DeepGlint's RoPE2D releases in MLCDVisionModel format
# (DeepGlint-AI/mlcd-vit-bigG-patch14-{224,336,448}: hidden 1664, 48 layers, 16 heads, MLP 8192). The
# B/32 and L/14 sizes are the RoPE2D architecture at the sizes of the paper's B/32-224 and L/14-336; their
# public releases (mlcd-vit-base-patch32-224, mlcd-vit-large-patch14-336) are CLIPVisionModel folders
# (learned position table, no RoPE), which unicom_ds.mlcd_clip reads.
CONFIGS = {
    "MLCD-ViT-B-32": dict(image_size=224, patch_size=32, width=768, depth=12, heads=12, mlp_dim=3072),
    "MLCD-ViT-L-14-336": dict(image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096),
    "MLCD-ViT-bigG-14-224": dict(image_size=224, patch_size=14, width=1664, depth=48, heads=16, mlp_dim=8192),
    "MLCD-ViT-bigG-14-336": dict(image_size=336, patch_size=14, width=1664, depth=48, heads=16, mlp_dim=8192),
    "MLCD-ViT-bigG-14-448": dict(image_size=448, patch_size=14, width=1664, depth=48, heads=16, mlp_dim=8192),
    # Tiny, for tests (not released).
    "MLCD-ViT-Tiny-16": dict(image_size=64, patch_size=16, width=64, depth=2, heads=2, mlp_dim=256),
}
ROPE_THETA = 10000.0
LN_EPS = 1e-5
# config.json's model_type: transformers' own name (what export_hf writes), and the one DeepGlint's bigG
# repositories carry, which transformers' auto classes keep mapping to MLCDVisionModel for them.
MODEL_TYPE = "mlcd_vision_model"
MODEL_TYPES = (MODEL_TYPE, "mlcd")
FORMAT = "RoPE2D"  # how tables name this format (see `title`)
PREPROCESSOR_FILE = "preprocessor_config.json"
EXPORT_RECORD = "unicom_ds_export.json"  # written by the export command: the architecture and source it wrote
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def canonical_name(name: str) -> str:
    """`MLCD-ViT-bigG/14@448px` -> `MLCD-ViT-bigG-14-448`; `MLCD-ViT-B/32` -> `MLCD-ViT-B-32`."""
    out = name.replace("/", "-")
    if "@" in out:
        out, _, size = out.partition("@")
        out = f"{out}-{size.removesuffix('px')}"
    return out


def config(name: str) -> dict:
    key = canonical_name(name)
    if key not in CONFIGS:
        raise ValueError(f"unknown MLCD model '{name}'; known: {', '.join(CONFIGS)}")
    return CONFIGS[key]


# (width, depth) -> the size in the names above: how `title` names a folder's model.
SIZES = {(c["width"], c["depth"]): name.split("-")[2] for name, c in CONFIGS.items()}


def title(arch: dict, kind: str) -> str:
    """How results tables name an MLCD model of `arch` (width, depth, patch_size, image_size): family, size
    and input, then `kind`, its format or where it was trained: "MLCD ViT-L/14-336 (CLIP format)". A size
    none of the names above has is shown as width x depth."""
    size = SIZES.get((arch["width"], arch["depth"]), f"{arch['width']}x{arch['depth']}")
    return f"MLCD ViT-{size}/{arch['patch_size']}-{arch['image_size']} ({kind})"


# ---- RoPE2D: pure functions -------------------------------------------------------------------

def rope_frequencies(head_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """The D/4 frequencies of one spatial axis: theta^(-2i / (D/2)), i = 0 .. D/4 - 1."""
    if head_dim % 4:
        raise ValueError(f"RoPE2D needs a head size divisible by 4, got {head_dim}")
    half = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)).float()


def position_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """[..., D/2] angles of patches at grid row `rows` and column `cols` (tensors of one shape): [row * f,
    column * f]. Any positions: detection rotates each patch by its place in a larger grid, or in a window."""
    f = rope_frequencies(head_dim, theta).to(rows.device)
    return torch.cat([rows[..., None].float() * f, cols[..., None].float() * f], dim=-1)


def rope_angles(grid_h: int, grid_w: int, head_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """[grid_h * grid_w, D/2] angles of the patches in row-major order: [row * f, column * f]."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return position_angles(rows, cols, head_dim, theta)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [B, N, heads, D] rotated by angles [N, D/2], or [B, N, D/2] per sequence (repeated twice over D),
    computed in fp32."""
    full = torch.cat([angles, angles], dim=-1).unsqueeze(-2).float()
    out = x.float() * full.cos() + rotate_half(x.float()) * full.sin()
    return out.to(x.dtype)


# ---- the model ---------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)   # rows: q, k, v
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.in_proj(x).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), angles)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width, heads, mlp_dim, eps) for _ in range(depth))


class MLCDViT(nn.Module):
    """images [B, 3, H, W] -> features [B, width]: the post-LayerNorm class token (not L2-normalised)."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_dim: int,
                 rope_theta: float = ROPE_THETA, eps: float = LN_EPS, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        if width % heads or (width // heads) % 4:
            raise ValueError(f"width {width} / heads {heads}: the head size must be a multiple of 4 for RoPE2D")
        self.image_size, self.patch_size, self.heads = image_size, patch_size, heads
        self.width, self.depth, self.mlp_dim, self.rope_theta, self.eps = width, depth, mlp_dim, rope_theta, eps
        self.embed_dim = width
        head_dim = width // heads
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.class_pos_emb = nn.Parameter(torch.randn(1, head_dim // 2))
        self.ln_pre = nn.LayerNorm(width, eps=eps)
        self.transformer = Transformer(width, depth, heads, mlp_dim, eps)
        self.ln_post = nn.LayerNorm(width, eps=eps)

    def angles(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1 + grid_h * grid_w, D/2]: the class token's learned angles, then the patches'."""
        patches = rope_angles(grid_h, grid_w, self.width // self.heads, self.rope_theta)
        return torch.cat([self.class_pos_emb.float(), patches.to(self.class_pos_emb.device)], dim=0)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output, [B, 1 + N, width] (MLCDVisionModel's `last_hidden_state`)."""
        x = self.conv1(x.to(self.conv1.weight.dtype))
        angles = self.angles(x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1))
        for block in self.transformer.resblocks:
            x = (checkpoint(block, x, angles, use_reentrant=False) if self.grad_checkpointing and self.training
                 else block(x, angles))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self.forward_tokens(x)[:, 0])

    def arch(self) -> dict:
        return dict(image_size=self.image_size, patch_size=self.patch_size, width=self.width, depth=self.depth,
                    heads=self.heads, mlp_dim=self.mlp_dim, rope_theta=self.rope_theta, eps=self.eps)


def build(name: str) -> MLCDViT:
    """A randomly initialised, eval-mode MLCD ViT of a known name."""
    return MLCDViT(**config(name)).eval()


def build_for_training(name: str, grad_checkpointing: bool = False) -> MLCDViT:
    """A randomly initialised MLCD ViT in train mode (the train stage's `model=MLCD-ViT-...`)."""
    return MLCDViT(**config(name), grad_checkpointing=grad_checkpointing).train()


# ---- transformers' names -----------------------------------------------------------------------

# ours -> transformers', per block and outside the blocks (the official converter's mapping).
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_TOP = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
        "class_pos_emb": "class_pos_emb", "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
        "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
_OURS_BLOCK, _HF_BLOCK = "transformer.resblocks.", "encoder.layers."
HF_PREFIX = "vision_model."  # how a checkpoint saved from a model wrapping MLCDVisionModel names its keys


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (the official vit_rope2d.py) names -> MLCDVisionModel's; the fused in_proj is split into q, k, v."""
    out = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        if not key.startswith(_OURS_BLOCK):
            raise WeightError(f"no MLCDVisionModel name for '{key}'")
        index, _, rest = key[len(_OURS_BLOCK):].partition(".")
        module, _, leaf = rest.rpartition(".")
        head = f"{_HF_BLOCK}{index}."
        if module == "attn.in_proj":
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{head}self_attn.{part}_proj.{leaf}"] = chunk.contiguous()
        elif module in _BLOCK:
            out[f"{head}{_BLOCK[module]}.{leaf}"] = value
        else:
            raise WeightError(f"no MLCDVisionModel name for '{key}'")
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], depth: int, source: str = "the state dict", top: dict = _TOP,
                       in_proj: str = "attn.in_proj.{}", what: str = "an MLCDVisionModel") -> dict[str, torch.Tensor]:
    """transformers' names (optionally under `vision_model.`) -> ours, for a model of `depth` blocks: the blocks'
    names, which CLIPVisionModel shares, and `top` (ours -> theirs) outside them; q, k and v are fused into
    `in_proj` (our name, `{}` the leaf). A missing key raises WeightError naming `source` and the key; so do
    keys left over."""
    hf = {k.removeprefix(HF_PREFIX): v for k, v in hf.items()}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise WeightError(f"{source}: missing key '{key}' ({what} of {depth} layers needs it)")
        used.add(key)
        return hf[key]

    out = {ours: take(theirs) for ours, theirs in top.items()}
    for i in range(depth):
        head, ours = f"{_HF_BLOCK}{i}.", f"{_OURS_BLOCK}{i}."
        for leaf in ("weight", "bias"):
            out[ours + in_proj.format(leaf)] = torch.cat([take(f"{head}self_attn.{p}_proj.{leaf}") for p in "qkv"])
            for module, theirs in _BLOCK.items():
                out[f"{ours}{module}.{leaf}"] = take(f"{head}{theirs}.{leaf}")
    extra = sorted(set(hf) - used)
    if extra:
        raise WeightError(f"{source}: unexpected key(s) for {what} of {depth} layers: "
                          f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}")
    return out


def hf_config(model: MLCDViT) -> dict:
    """config.json of MLCDVisionModel for `model` (the fields transformers' MLCDVisionConfig reads)."""
    return {
        "architectures": ["MLCDVisionModel"], "model_type": MODEL_TYPE,
        "hidden_size": model.width, "intermediate_size": model.mlp_dim, "num_hidden_layers": model.depth,
        "num_attention_heads": model.heads, "num_key_value_groups": 1, "num_channels": 3,
        "image_size": model.image_size, "patch_size": model.patch_size, "hidden_act": "gelu",
        "layer_norm_eps": model.eps, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
        "rope_parameters": {"rope_type": "axial", "rope_theta": model.rope_theta}, "dtype": "float32",
    }


def preprocessor_config(image_size: int) -> dict:
    """preprocessor_config.json of the CLIPImageProcessor DeepGlint ships with its models (bicubic resize of the
    short side, center crop, CLIP mean and std), the same transform `unicom_ds.load` gives."""
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}


def export_hf(model: MLCDViT, folder: str | os.PathLike) -> Path:
    """Write `folder`/config.json, model.safetensors (fp32, transformers' names) and preprocessor_config.json."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in to_hf_state_dict(model.state_dict()).items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:  # safetensors writes 0600 files; atomic_path shares them
        save_file(state, str(tmp), metadata={"format": "pt"})
    for name, content in ((PREPROCESSOR_FILE, preprocessor_config(model.image_size)), (CONFIG_FILE, hf_config(model))):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return folder


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The MLCDViT arguments of an MLCDVisionModel folder's config.json; a folder, file or value this
    module cannot read raises, naming it."""
    path, cfg = read_config_json(folder, "MLCD model folder")
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {kind!r} is not an MLCDVisionModel folder ({' or '.join(MODEL_TYPES)})")
    rope = cfg.get("rope_parameters") or {}
    fixed = {"hidden_act": ("gelu", cfg.get("hidden_act", "gelu")), "num_channels": (3, cfg.get("num_channels", 3)),
             "num_key_value_groups": (1, cfg.get("num_key_value_groups", 1)),
             "rope_parameters.rope_type": ("axial", rope.get("rope_type", "axial"))}
    for key, (want, got) in fixed.items():
        if got != want:
            raise ValueError(f"{path}: {key}={got!r} is not supported (MLCD's models use {want!r})")
    try:
        size = [cfg.get(k, d) for k, d in (("image_size", 336), ("patch_size", 14))]
        if any(isinstance(s, (list, tuple)) and len(set(s)) != 1 for s in size):
            raise ValueError(f"{path}: non-square image_size / patch_size {size} are not supported")
        image, patch = (int(s[0] if isinstance(s, (list, tuple)) else s) for s in size)
        return dict(image_size=image, patch_size=patch, width=int(cfg["hidden_size"]),
                    depth=int(cfg["num_hidden_layers"]), heads=int(cfg["num_attention_heads"]),
                    mlp_dim=int(cfg["intermediate_size"]), rope_theta=float(rope.get("rope_theta", ROPE_THETA)),
                    eps=float(cfg.get("layer_norm_eps", LN_EPS)))
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e.args[0]!r}") from None


def load_hf(folder: str | os.PathLike) -> MLCDViT:
    """An MLCDVisionModel folder (config.json + model.safetensors or sharded safetensors, e.g. a released MLCD
    checkpoint) as an eval-mode fp32 MLCDViT, checked key for key and shape for shape."""
    arch = read_hf_config(folder)
    hf, source = read_safetensors(folder)
    state = from_hf_state_dict(hf, arch["depth"], source)
    return load_checked(MLCDViT(**arch), state, source, Path(folder) / CONFIG_FILE).eval()


def official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official vit_rope2d.py checkpoint as our state dict: `_orig_mod.` (torch.compile) stripped, and the
    unused `positional_embedding` and `proj` dropped, as the official loader and converter do."""
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in ("positional_embedding", "proj")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unicom_ds.mlcd_vit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="a plain state dict of an MLCD ViT -> a transformers MLCDVisionModel folder")
    exp.add_argument("name", help=f"the architecture: {', '.join(CONFIGS)}")
    exp.add_argument("state_dict", help="RUN/train/backbone.pt of model=NAME, or a .pt state dict in our / the "
                                        "official vit_rope2d.py names")
    exp.add_argument("out", help="the folder to write (config.json, model.safetensors, preprocessor_config.json)")
    args = parser.parse_args(argv)
    model = build(args.name)
    path, out = Path(args.state_dict), Path(args.out)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    with open(path, "rb") as f:
        record = {"model": canonical_name(args.name), "source": str(path),
                  "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    if _same_export(out, record):
        print(f"{out}: already holds this export of {path} ({record['model']}, sha256 {record['sha256'][:12]}); "
              "nothing written")
        return
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present:  # never overwrite what is there: another export, or someone's files
        parser.exit(2, f"{out}: not empty ({len(present)} file(s), e.g. {', '.join(present[:3])}); export into a "
                       "new or empty folder\n")
    state = read_weights(path, expected="a train-stage backbone.pt of model=MLCD-ViT-... or an MLCD ViT state dict")
    if is_export(state):
        if canonical_name(str(state["model"])) != canonical_name(args.name):
            raise SystemExit(f"{path}: holds a '{state['model']}' backbone, not '{args.name}'")
        state = state["state_dict"]
    state = official_state_dict(state)
    check_state_dict(model, state, path, f"the MLCD {canonical_name(args.name)} architecture")
    model.load_state_dict(state)
    print(f"wrote {_export_whole(model, out, record)}")


def _same_export(out: Path, record: dict) -> bool:
    """`out` holds exactly this command's export of the same architecture from a file of the same bytes."""
    if not out.is_dir() or {p.name for p in out.iterdir()} != {CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE,
                                                                 EXPORT_RECORD}:
        return False
    try:
        earlier = json.loads((out / EXPORT_RECORD).read_text())
        return (earlier["model"], earlier["sha256"]) == (record["model"], record["sha256"])
    except (ValueError, LookupError, TypeError):  # a file of that name this command did not write
        return False


def _export_whole(model: MLCDViT, out: Path, record: dict) -> Path:
    """export_hf and the record into a sibling folder renamed onto `out` (absent or empty): an interrupted
    export leaves no partial folder behind to be refused as not empty."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    tmp.mkdir()
    try:
        export_hf(model, tmp)
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":
    main()
