"""The official Unicom ViT (deepglint/unicom `vision_transformer.py`), re-implemented for inference.

It differs from CLIP's vision tower: no CLS token, a learned position embedding over the patches
only, pre-LN blocks with a bias-free qkv and a ReLU6 MLP, and a head that flattens the whole
normalised token map into Linear(no bias) -> BatchNorm1d -> Linear(no bias) -> BatchNorm1d.
Module names follow the release files (`patch_embed.proj.*`, `pos_embed`, `blocks.N.*`, `norm.*`,
`feature.{0,1,2,3}.*`) so those plain fp16 state dicts load key for key.

The release trains with drop path 0.1; drop path has no parameters and is the identity in eval
mode, so this inference model leaves it out. Build with `build(name)`; always use it in eval mode
(the BatchNorm head must use its running statistics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# name -> architecture of the four release files (image 336 only for L/14@336).
CONFIGS = {
    "ViT-B-32": dict(image_size=224, patch_size=32, width=768, depth=12, heads=12, embed_dim=512),
    "ViT-B-16": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, embed_dim=768),
    "ViT-L-14": dict(image_size=224, patch_size=14, width=1024, depth=24, heads=16, embed_dim=768),
    "ViT-L-14-336": dict(image_size=336, patch_size=14, width=1024, depth=24, heads=16, embed_dim=768),
}
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
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, width * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


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
                 embed_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(image_size, patch_size, width)
        n = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, n, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.feature = nn.Sequential(
            nn.Linear(n * width, width, bias=False),
            nn.BatchNorm1d(width, eps=BN_EPS),
            nn.Linear(width, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # The release's random init (truncated normal, std 0.02; zero biases); only matters for tests.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        # The release normalises in fp32 even under autocast, then flattens every token.
        x = self.norm(x.float()).flatten(1)
        return self.feature(x)


def build(name: str) -> UnicomViT:
    """A randomly initialised, eval-mode Unicom ViT for a release name (`ViT-B/32`, `ViT-L-14-336`...)."""
    key = canonical_name(name)
    if key not in CONFIGS:
        raise ValueError(f"unknown Unicom model '{name}'; known: {', '.join(CONFIGS)}")
    return UnicomViT(**CONFIGS[key]).eval()
