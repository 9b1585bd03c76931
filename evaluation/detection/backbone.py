"""A loaded ViT as a Mask R-CNN backbone, ViTDet style (Li et al. 2022), and the Mask R-CNN around it.

`ViTDetBackbone` takes the patch embedding, position embedding and blocks of any model `unicom_ds.load`
returns (the Unicom release architecture, this repo's exports of it, an open_clip vision tower, MLCD's
CLIP-format tower, or MLCD's RoPE2D ViT) and drops the rest (the release's BatchNorm head, the class token,
`ln_post`, `proj`). Its forward:

- the position embedding grid is resized bicubically to the input's patch grid on every forward (as
  ViTDet's `get_abs_pos`), so any detection size works with the pre-trained weights; a RoPE2D ViT has no
  table: its blocks rotate queries and keys by each patch's (row, column) in the detection image's grid,
  in windowed blocks as in global ones;
- each block runs as ViTDet's (the block's own weights, its forward rewritten): attention within
  non-overlapping windows of `window_size` x `window_size` patches (the normed grid zero-padded to a
  multiple of the window), except the `global_blocks`, which attend over the whole image (ViTDet's
  choice for ViT-B: window 14, global blocks 2, 5, 8, 11); with `rel_pos`, ViTDet's decomposed
  relative position biases, new tables of (2 x side - 1, head dim) per axis and block (side: the
  window, or image_size / patch in global blocks), zero at the start so the pre-trained attention is
  unchanged until they learn;
  `window_size=0` is plain global attention everywhere (memory quadratic in the token count);
- ViTDet's simple feature pyramid on the last feature map (stride = patch): deconvolutions x4 and x2,
  the map itself, a 2x2 max-pool, each followed by a 1x1 and a 3x3 conv with channel LayerNorm, and a
  further max-pool level for the RPN (strides 4/8/16/32/64 at patch 16, 3.5/7/14/28/56 at patch 14;
  the RoI pooler and the anchors are given these, not torchvision's power-of-two guesses).

Drop path (stochastic depth, rising linearly over the blocks to `drop_path`) drops each residual
branch (attention, MLP) per image, as ViTDet, also in windowed blocks (not per window).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align, stochastic_depth
from torchvision.ops.poolers import initLevelMapper

from unicom_ds import mlcd_vit

# ViTDet's feature pyramid: scale factors of the last feature map -> strides patch/4 ... 2 * patch.
SCALES = (4.0, 2.0, 1.0, 0.5)
LEVELS = ("p2", "p3", "p4", "p5")


# ViTDet's per-size recipe, (layer-wise lr decay, drop path) by depth: ViT-B (12 blocks), ViT-L (24).
RECIPES = {12: (0.7, 0.1), 24: (0.8, 0.4)}


def recipe(depth: int, layer_decay: float | None, drop_path: float | None) -> tuple[float, float]:
    """(layer decay, drop path) for a ViT of `depth` blocks: each value given, or ViTDet's for that size
    where it is None (ViT-B's for depths ViTDet has no recipe for, such as the tiny test models)."""
    default = RECIPES.get(depth, RECIPES[12])
    return (default[0] if layer_decay is None else float(layer_decay),
            default[1] if drop_path is None else float(drop_path))


def vit_depth(vit: nn.Module) -> int:
    """The number of blocks of a loaded ViT."""
    return len(_parts(vit)[3])


def default_global_blocks(depth: int) -> list[int]:
    """ViTDet's spacing: the last block of each quarter of the depth (2, 5, 8, 11 for 12 blocks)."""
    return sorted({max(0, (i + 1) * depth // 4 - 1) for i in range(4)})


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> ([B * nW, window * window, C], (padded H, padded W)); the grid is zero-padded
    at the bottom and right to a multiple of `window`."""
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int],
                       size: tuple[int, int]) -> torch.Tensor:
    """The inverse of `window_partition`: [B * nW, window * window, C] -> [B, H, W, C], padding cut off."""
    hp, wp = padded
    c = windows.shape[-1]
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(b, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, : size[0], : size[1]]


def resize_pos_embed(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A [1, g, g, C] position-embedding grid bicubically resized to [1, h, w, C] (itself if equal)."""
    if tuple(grid.shape[1:3]) == tuple(size):
        return grid
    out = F.interpolate(grid.permute(0, 3, 1, 2).float(), size=size, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).to(grid.dtype)


def token_positions(h: int, w: int, window: int = 0) -> torch.Tensor:
    """(row, column) in the h x w patch grid of each token as `attention` sees them: [1, h * w, 2] for the whole
    grid in row-major order, or with `window` [nW, window * window, 2] for its windows as `window_partition`
    cuts them (the padding's tokens at their places past the grid's edge)."""
    hp, wp = (h + -h % window, w + -w % window) if window else (h, w)
    grid = torch.stack(torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij"), dim=-1)[None]
    return window_partition(grid, window)[0] if window else grid.reshape(1, h * w, 2)


def attention(block: nn.Module, x: torch.Tensor, release: bool, angles: torch.Tensor | None = None) -> torch.Tensor:
    """A ViT block's multi-head self-attention within each grid of x [N, h, w, C] (a window or a whole
    image), plus ViTDet's decomposed relative position bias where the block has its tables. An MLCD RoPE2D
    block rotates queries and keys by `angles` [1 or N, hw, D/2]."""
    n, h, w, c = x.shape
    attn = block.attn
    if release:
        qkv, heads, proj = attn.qkv(x), attn.heads, attn.proj
    elif isinstance(attn, mlcd_vit.Attention):
        qkv, heads, proj = attn.in_proj(x), attn.heads, attn.out_proj
    else:  # nn.MultiheadAttention: q, k, v packed in in_proj
        qkv, heads, proj = F.linear(x, attn.in_proj_weight, attn.in_proj_bias), attn.num_heads, attn.out_proj
    q, k, v = qkv.reshape(n, h * w, 3, heads, c // heads).unbind(2)  # [N, hw, heads, d]
    if angles is not None:
        q, k = mlcd_vit.apply_rope(q, angles), mlcd_vit.apply_rope(k, angles)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, heads, hw, d]
    bias = rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (h, w)) if hasattr(attn, "rel_pos_h") else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return proj(out.transpose(1, 2).reshape(n, h, w, c))


def rel_pos_bias(q: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The decomposed relative position bias of MViTv2 as ViTDet adds it, [N, heads, hw, hw]: query (i, j)
    and key (k, l) get q . table_h[i - k] + q . table_w[j - l] (offsets counted from -(side - 1)); a table
    of another length than 2 * side - 1 is resized linearly, as ViTDet's for other grids."""
    h, w = size
    n, heads, _, d = q.shape
    grid = q.reshape(n, heads, h, w, d)
    by_row = torch.einsum("nahwd,hkd->nahwk", grid, _offsets(table_h, h))
    by_col = torch.einsum("nahwd,wld->nahwl", grid, _offsets(table_w, w))
    return (by_row[..., :, None] + by_col[..., None, :]).reshape(n, heads, h * w, h * w)


def _offsets(table: torch.Tensor, side: int) -> torch.Tensor:
    """[side, side, d]: entry (i, k) is the table's row for offset i - k."""
    if table.shape[0] != 2 * side - 1:
        table = F.interpolate(table.T[None], size=2 * side - 1, mode="linear")[0].T
    pos = torch.arange(side, device=table.device)
    return table[pos[:, None] - pos[None, :] + side - 1]


def _parts(vit: nn.Module) -> tuple[nn.Conv2d, torch.Tensor | None, nn.Module, list[nn.Module], bool]:
    """(patch conv, position grid [1, g, g, C] or None for RoPE2D, pre-norm, blocks, is the release
    architecture) of a loaded ViT."""
    if isinstance(vit, mlcd_vit.MLCDViT):  # its class token and that token's angles are dropped, as CLIP's
        return vit.conv1, None, vit.ln_pre, list(vit.transformer.resblocks), False
    if hasattr(vit, "patch_embed") and hasattr(vit, "blocks"):  # unicom_ds.unicom_vit.UnicomViT
        pos = vit.pos_embed.detach()
        pre, blocks, release = nn.Identity(), list(vit.blocks), True
        conv = vit.patch_embed.proj
    elif hasattr(vit, "conv1") and hasattr(vit, "transformer"):  # open_clip VisionTransformer
        if not getattr(vit.transformer, "batch_first", True):
            raise ValueError("open_clip tower with a sequence-first transformer: not supported")
        pos = vit.positional_embedding.detach()[None, 1:]  # ViTDet drops the class token and its position
        pre, blocks, release = vit.ln_pre, list(vit.transformer.resblocks), False
        conv = vit.conv1
    else:
        raise ValueError(f"{type(vit).__name__}: not a ViT this adapter knows (Unicom ViT, open_clip tower, MLCD ViT)")
    g = int(round(pos.shape[1] ** 0.5))
    if g * g != pos.shape[1]:
        raise ValueError(f"position embedding of {pos.shape[1]} tokens is not a square grid")
    return conv, pos.reshape(1, g, g, -1).clone(), pre, blocks, release


class ViTDetBackbone(nn.Module):
    """images [B, 3, H, W] -> OrderedDict of pyramid maps (torchvision's backbone contract, `out_channels`)."""

    def __init__(self, vit: nn.Module, window_size: int = 14, global_blocks: list[int] | None = None,
                 drop_path: float = 0.1, out_channels: int = 256, rel_pos: bool = True, image_size: int = 1024):
        super().__init__()
        conv, pos, pre, blocks, release = _parts(vit)
        self.patch_embed = conv
        self.pos_embed = None if pos is None else nn.Parameter(pos)
        # RoPE2D: (head size, theta) of the rotation that stands in for the position table.
        self.rope = (vit.width // vit.heads, vit.rope_theta) if pos is None else None
        self.pre_norm = pre
        self.blocks = nn.ModuleList(blocks)
        self.release = release
        self.patch_size = int(conv.kernel_size[0])
        depth, width = len(blocks), conv.out_channels
        self.window_size = int(window_size)
        self.global_blocks = set(default_global_blocks(depth) if global_blocks is None else global_blocks)
        bad = sorted(i for i in self.global_blocks if not 0 <= i < depth)
        if bad:
            raise ValueError(f"detect.global_blocks {bad}: the backbone has blocks 0..{depth - 1}")
        self.block_drop = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        if rel_pos:  # ViTDet's tables, zero at the start: the pre-trained blocks' attention is unchanged
            for i, block in enumerate(blocks):
                side = self.window_size if self._windowed(i) else image_size // self.patch_size
                head_dim = width // (block.attn.num_heads if hasattr(block.attn, "num_heads") else block.attn.heads)
                block.attn.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, head_dim))
                block.attn.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, head_dim))
        self.out_channels = out_channels
        self.pyramid = nn.ModuleList(self._level(width, scale, out_channels) for scale in SCALES)

    def _windowed(self, i: int) -> bool:
        return bool(self.window_size) and i not in self.global_blocks

    @staticmethod
    def _level(width: int, scale: float, out: int) -> nn.Sequential:
        if scale == 4.0:
            layers = [nn.ConvTranspose2d(width, width // 2, 2, stride=2), LayerNorm2d(width // 2), nn.GELU(),
                      nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2)]
            dim = width // 4
        elif scale == 2.0:
            layers, dim = [nn.ConvTranspose2d(width, width // 2, 2, stride=2)], width // 2
        elif scale == 1.0:
            layers, dim = [], width
        else:
            layers, dim = [nn.MaxPool2d(2, stride=2)], width
        layers += [nn.Conv2d(dim, out, 1, bias=False), LayerNorm2d(out),
                   nn.Conv2d(out, out, 3, padding=1, bias=False), LayerNorm2d(out)]
        return nn.Sequential(*layers)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's patch grid [B, h, w, C] (no final norm, as ViTDet). Each block runs as ViTDet's:
        the attention branch on windows (or the whole grid), each residual branch dropped per image."""
        x = self.patch_embed(images).permute(0, 2, 3, 1)  # [B, h, w, C]
        b, h, w, c = x.shape
        x = self.pre_norm(x if self.pos_embed is None else x + resize_pos_embed(self.pos_embed, (h, w)))
        whole, windowed = self._angles(h, w, 0, b, x.device), self._angles(h, w, self.window_size, b, x.device)
        for i, block in enumerate(self.blocks):
            norm1, norm2 = (block.norm1, block.norm2) if self.release else (block.ln_1, block.ln_2)
            scale1, scale2 = getattr(block, "ls_1", nn.Identity()), getattr(block, "ls_2", nn.Identity())
            y = norm1(x)
            if self._windowed(i):  # zero-padded after the norm, as ViTDet
                windows, padded = window_partition(y, self.window_size)
                windows = windows.view(-1, self.window_size, self.window_size, c)
                y = window_unpartition(attention(block, windows, self.release, windowed), self.window_size, padded,
                                       (h, w))
            else:
                y = attention(block, y, self.release, whole)
            x = x + stochastic_depth(scale1(y), self.block_drop[i], "row", self.training)
            x = x + stochastic_depth(scale2(block.mlp(norm2(x))), self.block_drop[i], "row", self.training)
        return x

    def _angles(self, h: int, w: int, window: int, batch: int, device) -> torch.Tensor | None:
        """RoPE2D's angles of every token of the batch's windows (window > 0, [batch * nW, window^2, D/2]) or
        whole grids ([1, h * w, D/2]) at their places in the image's patch grid; None without RoPE2D."""
        if self.rope is None:
            return None
        pos = token_positions(h, w, window).to(device)
        angles = mlcd_vit.position_angles(pos[..., 0], pos[..., 1], *self.rope)
        return angles.repeat(batch, 1, 1) if window else angles

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.tokens(images).permute(0, 3, 1, 2).contiguous()
        return OrderedDict((name, level(x)) for name, level in zip(LEVELS, self.pyramid))


def build_model(vit: nn.Module, num_classes: int, image_size: int, mean, std, window_size: int = 14,
                global_blocks: list[int] | None = None, drop_path: float = 0.1, channels: int = 256,
                rois_per_image: int = 512, pre_nms_topk: tuple[int, int] = (2000, 1000),
                post_nms_topk: tuple[int, int] = (1000, 1000), rel_pos: bool = True):
    """torchvision's Mask R-CNN (GeneralizedRCNN, its RPN and RoI heads) on a ViTDet backbone, with
    ViTDet's heads: a 2-conv RPN head, a 4-conv + 1-fc box head and a 4-conv mask head, all convs with
    channel LayerNorm, and detectron2's L1 box regression losses. `num_classes` counts the background.
    Images are resized so that the longer side is `image_size` (training images already are, by the
    large-scale jitter) and padded to an `image_size` square. Each pyramid level has anchors of 8 x its
    stride (32 ... 512 px at patch 16, as detectron2 and torchvision), whatever the image size. The RPN
    keeps `pre_nms_topk` (training, testing) proposals per level before NMS and `post_nms_topk` per image
    after it (ViTDet's 2000/1000 and 1000/1000)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead

    backbone = ViTDetBackbone(vit, window_size, global_blocks, drop_path, channels, rel_pos, image_size)
    strides = level_strides(backbone.patch_size)
    sizes = tuple((round(8 * s),) for s in strides)
    anchors = _StridedAnchors(strides, sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    # detectron2's (and torchvision's default) matching and sampling: RPN IoU 0.7 / 0.3, 256 anchors per
    # image, half positive; box head IoU 0.5, 25 % positive; at test score > 0.05, NMS 0.5, 100 per image.
    rpn = _L1RPN(anchors, RPNHead(channels, 3, conv_depth=2), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                 batch_size_per_image=256, positive_fraction=0.5,
                 pre_nms_top_n=dict(training=pre_nms_topk[0], testing=pre_nms_topk[1]),
                 post_nms_top_n=dict(training=post_nms_topk[0], testing=post_nms_topk[1]), nms_thresh=0.7)
    heads = _L1RoIHeads(
        box_roi_pool=_StridedRoIAlign(strides[:len(LEVELS)], 7),
        box_head=FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [1024], norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(1024, num_classes), fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=rois_per_image, positive_fraction=0.25, bbox_reg_weights=None,
        score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
        mask_roi_pool=_StridedRoIAlign(strides[:len(LEVELS)], 14),
        mask_head=MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes))
    # The pyramid's strides are multiples of the patch, so the padded square's side is one of 2 x patch.
    model = GeneralizedRCNN(_WithPool(backbone), rpn, heads,
                            _SquarePad(image_size, list(mean), list(std), 2 * backbone.patch_size))
    return model


class _L1RPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's box regression loss: L1 (smooth_l1_beta=0), where torchvision
    uses smooth L1 with beta 1/9; the sum over the positive anchors is divided by all sampled ones."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = (torch.where(torch.cat(m))[0] for m in self.fg_bg_sampler(labels))
        sampled = torch.cat([pos, neg])
        box_loss = F.l1_loss(pred_bbox_deltas[pos], torch.cat(regression_targets)[pos], reduction="sum")
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box_loss / sampled.numel()


class _L1RoIHeads(RoIHeads):
    """torchvision's box and mask heads with detectron2's box regression loss in training: L1 on the
    class-specific deltas of the positive proposals, summed and divided by all sampled proposals (where
    torchvision has smooth L1, beta 1/9). Testing is torchvision's."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched, labels, reg_targets = self.select_training_samples(proposals, targets)
        logits, deltas = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        labels_all = torch.cat(labels)
        pos = torch.where(labels_all > 0)[0]
        deltas = deltas.reshape(len(deltas), -1, 4)[pos, labels_all[pos]]
        box_loss = F.l1_loss(deltas, torch.cat(reg_targets)[pos], reduction="sum") / labels_all.numel()
        # The mask head sees the positive proposals only, as torchvision's.
        keep = [torch.where(lab > 0)[0] for lab in labels]
        mask_boxes = [p[k] for p, k in zip(proposals, keep)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
        mask_loss = maskrcnn_loss(mask_logits, mask_boxes, [t["masks"] for t in targets],
                                  [t["labels"] for t in targets], [m[k] for m, k in zip(matched, keep)])
        return [], {"loss_classifier": F.cross_entropy(logits, labels_all), "loss_box_reg": box_loss,
                    "loss_mask": mask_loss}


class _SquarePad(GeneralizedRCNNTransform):
    """torchvision's resize (longer side `image_size`) and normalisation, then every image zero-padded at
    the bottom and right to one `image_size` square (ViTDet's square_pad), rounded up to `divisible`:
    torchvision pads to the batch's largest image, so test-time features (windows, global attention
    over the padding) and hence AP would depend on which images share a batch."""

    def __init__(self, image_size: int, mean: list[float], std: list[float], divisible: int):
        super().__init__(image_size, image_size, mean, std, size_divisible=divisible)

    def batch_images(self, images, size_divisible=32):
        d = size_divisible
        side = max(self.max_size, *(max(im.shape[-2:]) for im in images))
        side = -(-side // d) * d
        batched = images[0].new_zeros(len(images), images[0].shape[0], side, side)
        for out, im in zip(batched, images):
            out[:, : im.shape[1], : im.shape[2]].copy_(im)
        return batched


def level_strides(patch: int) -> list[float]:
    """Strides of p2 ... p5 and the pooled RPN level: patch/4, patch/2, patch, 2 patch, 4 patch (3.5 ... 56
    at patch 14, where they are not powers of two)."""
    return [patch / scale for scale in SCALES] + [4.0 * patch]


class _StridedAnchors(AnchorGenerator):
    """torchvision's AnchorGenerator with each level's true stride: it would take the integer division of
    image by feature size (3 instead of 3.5 at patch 14, which drifts the anchors off their features)."""

    def __init__(self, strides: list[float], sizes, aspect_ratios):
        super().__init__(sizes, aspect_ratios)
        self.strides = [float(s) for s in strides]

    def grid_anchors(self, grid_sizes, strides):
        device = self.cell_anchors[0].device
        true = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        return super().grid_anchors(grid_sizes, true)


class _StridedRoIAlign(MultiScaleRoIAlign):
    """RoIAlign over p2 ... p5 as detectron2's ROIAlignV2 (ViTDet's): scales 1 / stride, where torchvision
    would infer the nearest power of two of feature / image size (1/4 for the true 1/3.5 at patch 14),
    and `aligned=True` (pixel centres at +0.5; torchvision's pooler has no such option). Boxes go to
    levels by their size as in the FPN paper (224 px -> p4, the stride-`patch` map)."""

    def __init__(self, strides: list[float], output_size: int):
        super().__init__(list(LEVELS), output_size, 0)
        self.scales = [1.0 / s for s in strides]
        self.map_levels = initLevelMapper(2, 2 + len(LEVELS) - 1)

    def forward(self, x, boxes, image_shapes):
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        feats = [x[name] for name in self.featmap_names]
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for k, (f, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == k)[0]
            out[idx] = roi_align(f, rois[idx], self.output_size, scale, self.sampling_ratio, aligned=True).to(out.dtype)
        return out


class _WithPool(nn.Module):
    """The pyramid plus the extra RPN level ("pool", a max-pool of p5), as torchvision's FPN adds it."""

    def __init__(self, body: ViTDetBackbone):
        super().__init__()
        self.body = body
        self.out_channels = body.out_channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out = self.body(images)
        out["pool"] = F.max_pool2d(out["p5"], 1, 2, 0)
        return out


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with ViTDet's layer-wise lr decay: the patch and position embeddings are layer 0,
    block i is layer i + 1, everything else (pyramid, RPN, heads) layer depth + 1 at the full `lr`;
    layer l gets lr * layer_decay ** (depth + 1 - l). Weight decay as detectron2's ViTDet: none on the
    norm layers' parameters (weight_decay_norm=0) and the position embedding (its one override); biases
    and everything else decay (detectron2 leaves weight_decay_bias unset)."""
    depth = len(_find_backbone(model).blocks)
    # LayerNorm (and torchvision's LayerNorm2d, a subclass) is the only norm these models hold. The pyramid's
    # and heads' channel norms are spared too, unlike ViTDet's: detectron2's own LayerNorm class (used
    # there) is missing from its optimizer's list of norm types.
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_id(name, depth)
        decay = not (id(p) in norms or name.endswith("pos_embed"))
        g = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0, "layer": layer,
            "lr_scale": layer_decay ** (depth + 1 - layer), "lr": lr * layer_decay ** (depth + 1 - layer)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def layer_id(name: str, depth: int) -> int:
    """The layer of a parameter of `build_model`'s model for the layer-wise lr decay."""
    head, _, rest = name.partition("backbone.body.")
    if head or not rest:
        return depth + 1
    if rest.startswith(("patch_embed.", "pos_embed", "pre_norm.")):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return depth + 1


def _find_backbone(model: nn.Module) -> ViTDetBackbone:
    return model.backbone.body
