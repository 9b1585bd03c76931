"""The official Unicom ViT (deepglint/unicom `vision_transformer.py`), re-implemented: the architecture
the train stage trains for the paper's models and the one the release files load into.

It differs from CLIP's vision tower: no CLS token, a learned position embedding over the patches
only, pre-LN blocks with a bias-free qkv and a ReLU6 MLP, and a head that flattens the whole
normalised token map into Linear(no bias) -> BatchNorm1d -> Linear(no bias) -> BatchNorm1d.
Module names follow the release files (`patch_embed.proj.*`, `pos_embed`, `blocks.N.*`, `norm.*`,
`feature.{0,1,2,3}.*`) so those plain fp16 state dicts load key for key.

The release trains with drop path 0.1 (stochastic depth rising linearly over the blocks, as the
official `build_model`); it has no parameters and is the identity in eval mode. `build(name)` gives
an eval-mode model for inference; the train stage builds `UnicomViT(**CONFIGS[name], drop_path=0.1)`.
The BatchNorm head computes in fp32 and keeps fp32 running statistics even when the engine casts the
model to bf16, so the exported statistics are as precise as the release's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import stochastic_depth

# name -> architecture of the four release files (image 336 only for L/14@336).
CONFIGS = {
    "ViT-B-32": dict(image_size=224, patch_size=32, width=768, depth=12, heads=12, embed_dim=512),
    "ViT-B-16": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, embed_dim=768),
    "ViT-L-14": dict(image_size=224, patch_size=14, width=1024, depth=24, heads=16, embed_dim=768),
    "ViT-L-14-336": dict(image_size=336, patch_size=14, width=1024, depth=24, heads=16, embed_dim=768),
    # Tiny configs of the same architecture for tests and the demo (not released).
    "ViT-Tiny-16": dict(image_size=64, patch_size=16, width=64, depth=2, heads=2, embed_dim=64),
    "ViT-Tiny-16-96": dict(image_size=96, patch_size=16, width=64, depth=2, heads=2, embed_dim=64),
    "ViT-Tiny-32": dict(image_size=64, patch_size=32, width=32, depth=1, heads=2, embed_dim=32),
}
RELEASED = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
DROP_PATH = 0.1  # the release's training value
BN_EPS = 2e-5


def canonical_name(name: str) -> str:
    """`ViT-L/14@336px`, `ViT-L/14@336`, `ViT-L-14-336` -> `ViT-L-14-336`; `ViT-B/32` -> `ViT-B-32`."""
    out = name.replace("/", "-")
    for suffix in ("@336px", "@336"):
        if out.endswith(suffix):
            out = out[: -len(suffix)] + "-336"
    return out


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, width * mlp_ratio)
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Per-sample residual drop, scaled by 1 / (1 - p) (timm's DropPath, as the release uses).
        return stochastic_depth(x, self.drop_path, "row", self.training) if self.drop_path else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class BatchNorm1dFP32(nn.BatchNorm1d):
    """BatchNorm1d that computes in fp32 with fp32 running statistics whatever the module dtype.

    The engine casts the whole model to bf16; bf16 running statistics (8 bits of mantissa) would
    lose most of each momentum update. State-dict keys are those of nn.BatchNorm1d.
    """

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("running_mean", "running_var"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch = self.training or not self.track_running_stats
        out = F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                           use_batch, momentum, self.eps)
        return out.to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class UnicomViT(nn.Module):
    """images [B, 3, S, S] -> embeddings [B, embed_dim] (not L2-normalised, as released)."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 embed_dim: int, mlp_ratio: int = 4, drop_path: float = 0.0, grad_checkpointing: bool = False):
        super().__init__()
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(image_size, patch_size, width)
        n = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, n, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, rate) for rate in drop_path_rates(drop_path, depth))
        self.norm = nn.LayerNorm(width)
        self.feature = nn.Sequential(
            nn.Linear(n * width, width, bias=False),
            BatchNorm1dFP32(width, eps=BN_EPS),
            nn.Linear(width, embed_dim, bias=False),
            BatchNorm1dFP32(embed_dim, eps=BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # The release's random init (truncated normal, std 0.02; zero biases).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        # The release normalises in the weights' precision (fp32 under autocast), then flattens every token.
        x = self.norm(x.to(self.norm.weight.dtype)).flatten(1)
        return self.feature(x)


def config(name: str) -> dict:
    """The architecture of a release name (`ViT-B/32`, `ViT-L-14-336`, ...) or a tiny test config."""
    key = canonical_name(name)
    if key not in CONFIGS:
        raise ValueError(f"unknown Unicom model '{name}'; known: {', '.join(CONFIGS)}")
    return CONFIGS[key]


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Each block's drop-path rate: 0 in the first, `rate` in the last, linear between (the release's
    torch.linspace(0, rate, depth))."""
    return [rate * i / max(1, depth - 1) for i in range(depth)]


def set_drop_path(model: UnicomViT, rate: float) -> UnicomViT:
    """A loaded model (built for inference, without drop path) set to train with the release's `rate`."""
    for block, r in zip(model.blocks, drop_path_rates(rate, len(model.blocks))):
        block.drop_path = r
    return model


def build(name: str) -> UnicomViT:
    """A randomly initialised, eval-mode Unicom ViT for inference."""
    return UnicomViT(**config(name)).eval()


def build_for_training(name: str, grad_checkpointing: bool = False) -> UnicomViT:
    """A randomly initialised Unicom ViT in train mode with the release's drop path."""
    return UnicomViT(**config(name), drop_path=DROP_PATH, grad_checkpointing=grad_checkpointing).train()


def resize_state_dict(state: dict[str, torch.Tensor], image_size: int) -> dict[str, torch.Tensor]:
    """A state dict moved to another input size (the 336-px epoch from a 224-px model).

    The position embedding is a (g x g) grid of patch vectors and the head's first Linear reads
    the flattened tokens, so it is one (g x g) grid of [width -> width] maps: both are resized over
    the grid with bicubic interpolation. The head's weight is also scaled by g_old^2 / g_new^2 so
    that its output, a sum over every token, keeps its scale for the BatchNorm after it. (The
    official `finetune_GLDv2.py` `zoom_state_dict` does the same with scipy's linear zoom, but
    reshapes the head's weight without moving its token axis first.)
    """
    pos = state["pos_embed"]
    patch = state["patch_embed.proj.weight"].shape[-1]
    old, new = math.isqrt(pos.shape[1]), image_size // patch
    if old * old != pos.shape[1]:
        raise ValueError(f"pos_embed holds {pos.shape[1]} tokens: not a square grid")
    if old == new:
        return dict(state)
    width = pos.shape[2]

    def grid(t: torch.Tensor) -> torch.Tensor:  # [c, g, g] channels-first -> resized
        return F.interpolate(t.float(), size=(new, new), mode="bicubic", align_corners=False)

    out = dict(state)
    out["pos_embed"] = grid(pos.reshape(1, old, old, width).permute(0, 3, 1, 2)).permute(0, 2, 3, 1) \
        .reshape(1, new * new, width).to(pos.dtype)
    head = state["feature.0.weight"]
    rows = head.shape[0]
    resized = grid(head.reshape(rows, old, old, width).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out["feature.0.weight"] = (resized.reshape(rows, new * new * width) * (old * old / (new * new))).to(head.dtype)
    return out
