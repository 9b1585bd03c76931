"""The detect stage's pieces, each against an independent reference, on one CPU process: window
partition, position-embedding resize, the ViTDet backbone on both ViT families, the layer-wise lr decay,
the schedule, large-scale jitter, the COCO reading and scoring, checkpoints and the launcher's checks.
(tests/test_detection_learns.py trains one for real.)"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from evaluation.detection import backbone as det_backbone
from evaluation.detection import data, job, synthetic
from unicom_ds import unicom_vit


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return synthetic.write(tmp_path_factory.mktemp("coco"), train=6, val=4, size=96, seed=3)


def test_window_partition_round_trip_and_blocks_see_only_their_window():
    x = torch.randn(2, 7, 9, 5)  # not a multiple of the window: padded, then cut off again
    windows, padded = det_backbone.window_partition(x, 4)
    assert padded == (8, 12) and windows.shape == (2 * 2 * 3, 16, 5)
    assert torch.equal(det_backbone.window_unpartition(windows, 4, padded, (7, 9)), x)
    # Window (0, 1) of image 1 holds exactly the patches rows 0..3, columns 4..7.
    assert torch.equal(windows[1 * 6 + 1].view(4, 4, 5), x[1, 0:4, 4:8])


def test_windowed_block_equals_attention_inside_each_window():
    torch.manual_seed(0)
    vit = unicom_vit.build("ViT-Tiny-16")
    bb = det_backbone.ViTDetBackbone(vit, window_size=2, global_blocks=[1], drop_path=0.0, out_channels=16).eval()
    images = torch.randn(1, 3, 64, 64)  # a 4 x 4 patch grid: four 2 x 2 windows in block 0
    with torch.no_grad():
        got = bb.tokens(images)
        x = bb.patch_embed(images).permute(0, 2, 3, 1) + bb.pos_embed
        ref = torch.empty_like(x)
        for r in (0, 2):
            for c in (0, 2):
                ref[:, r:r + 2, c:c + 2] = vit.blocks[0](x[:, r:r + 2, c:c + 2].reshape(1, 4, -1)).view(1, 2, 2, -1)
        ref = vit.blocks[1](ref.reshape(1, 16, -1)).view(1, 4, 4, -1)  # block 1 is global
    torch.testing.assert_close(got, ref)


def test_rel_pos_tables_start_at_zero_and_add_the_decomposed_bias():
    """Tables (2 side - 1, head dim) per axis, zero at the start (side: the window, or image_size / patch
    in global blocks); with random tables, block 0's attention equals a hand loop adding
    q . R_h[i - k] + q . R_w[j - l] to each logit, for both ViT families."""
    from unicom_ds import backbone
    torch.manual_seed(0)
    for name in ("ViT-Tiny-16", "openclip:ViT-Tiny-16"):
        vit = backbone.build(name).eval()
        bb = det_backbone.ViTDetBackbone(vit, window_size=2, global_blocks=[1], drop_path=0.0, out_channels=8,
                                         image_size=96).eval()
        attn0, attn1 = bb.blocks[0].attn, bb.blocks[1].attn
        assert tuple(attn0.rel_pos_h.shape) == (3, 32) and tuple(attn1.rel_pos_w.shape) == (11, 32)
        assert not attn0.rel_pos_h.any() and not attn1.rel_pos_w.any()
        with torch.no_grad():
            attn0.rel_pos_h.normal_(), attn0.rel_pos_w.normal_()
            x = torch.randn(1, 2, 2, 64)  # one 2 x 2 window, 2 heads of 32
            got = det_backbone.attention(bb.blocks[0], x, bb.release)
            if bb.release:
                qkv, proj = attn0.qkv(x.reshape(4, 64)), attn0.proj
            else:
                qkv, proj = x.reshape(4, 64) @ attn0.in_proj_weight.T + attn0.in_proj_bias, attn0.out_proj
            out = torch.zeros(4, 64)
            for head in range(2):
                q, k, v = (qkv[:, part * 64 + head * 32: part * 64 + head * 32 + 32] for part in range(3))
                logits = torch.zeros(4, 4)
                for a in range(4):
                    for b in range(4):
                        (i, j), (kk, ll) = divmod(a, 2), divmod(b, 2)
                        logits[a, b] = (q[a] @ k[b]) / 32 ** 0.5 + q[a] @ attn0.rel_pos_h[i - kk + 1] \
                            + q[a] @ attn0.rel_pos_w[j - ll + 1]
                out[:, head * 32:(head + 1) * 32] = logits.softmax(-1) @ v
            torch.testing.assert_close(got.reshape(4, 64), proj(out), atol=1e-5, rtol=1e-4)


def test_drop_path_drops_each_branch_per_image_also_in_windowed_blocks():
    """Blocks whose attention and MLP branches each add exactly 1 to every feature: with drop path, a
    branch adds 0 or 1 / (1 - p) to every token of an image alike (per image, not per window), and
    differently over the batch."""
    vit = unicom_vit.build("ViT-Tiny-16")
    with torch.no_grad():
        for block in vit.blocks:
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                lin.weight.zero_()
            block.attn.proj.bias.fill_(1.0), block.mlp.fc1.bias.zero_(), block.mlp.fc2.bias.fill_(1.0)
    bb = det_backbone.ViTDetBackbone(vit, window_size=2, global_blocks=[0], drop_path=0.5, out_channels=8,
                                     rel_pos=False, image_size=64).train()
    images = torch.randn(16, 3, 64, 64)  # 4 x 4 patches: four windows in block 1, which drops at 0.5
    torch.manual_seed(1)
    with torch.no_grad():
        added = bb.tokens(images) - (bb.patch_embed(images).permute(0, 2, 3, 1) + bb.pos_embed)
    per_image = added[:, 0, 0, 0]
    for b in range(16):
        torch.testing.assert_close(added[b], torch.full_like(added[b], float(per_image[b])))
    # Block 0 (rate 0) adds 2; block 1's two branches add 0 or 2 each.
    assert set(per_image.round().tolist()) <= {2.0, 4.0, 6.0} and len(set(per_image.round().tolist())) > 1


def test_pos_embed_resize_matches_the_release_resize():
    state = unicom_vit.build("ViT-Tiny-16").state_dict()
    grid = state["pos_embed"].reshape(1, 4, 4, -1)
    ours = det_backbone.resize_pos_embed(grid, (6, 6)).reshape(1, 36, -1)
    torch.testing.assert_close(ours, unicom_vit.resize_state_dict(state, 96)["pos_embed"])
    assert det_backbone.resize_pos_embed(grid, (4, 4)) is grid


def test_global_blocks_follow_vitdet():
    assert det_backbone.default_global_blocks(12) == [2, 5, 8, 11]
    assert det_backbone.default_global_blocks(24) == [5, 11, 17, 23]
    with pytest.raises(ValueError, match="global_blocks"):
        det_backbone.ViTDetBackbone(unicom_vit.build("ViT-Tiny-16"), global_blocks=[2])


@pytest.mark.parametrize("name", ["ViT-Tiny-16", "openclip:ViT-Tiny-16"])
def test_backbone_pyramid_strides_for_both_vit_families(name):
    from unicom_ds import backbone
    vit = backbone.build(name).eval()
    bb = det_backbone.ViTDetBackbone(vit, window_size=3, drop_path=0.2, out_channels=8).eval()
    feats = bb(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in feats.values()] == [(2, 8, 24, 32), (2, 8, 12, 16), (2, 8, 6, 8), (2, 8, 3, 4)]
    assert bb.block_drop == pytest.approx([0.0, 0.2])
    if name.startswith("openclip"):  # the class token's position is dropped
        assert bb.pos_embed.shape[1:3] == (4, 4)


def _tiny_vit(patch: int) -> torch.nn.Module:
    """A random-init Unicom ViT of any patch size (the tiny named configs are all patch 16 or 32)."""
    return unicom_vit.UnicomViT(image_size=4 * patch, patch_size=patch, width=32, depth=2, heads=2, embed_dim=32).eval()


@pytest.mark.parametrize("patch", [14, 16])
def test_pooler_scales_and_anchor_centres_follow_the_patch(patch):
    """Strides patch/4 ... 2 patch, not powers of two at patch 14: the RoI pooler's scales, and level-0
    anchors centred on every (patch/4)-th pixel (a hand loop), through a whole detector forward."""
    torch.manual_seed(0)
    model = det_backbone.build_model(_tiny_vit(patch), 4, 8 * patch, [0.5] * 3, [0.25] * 3, window_size=4,
                                     channels=16).eval()
    expect = {14: [1 / 3.5, 1 / 7, 1 / 14, 1 / 28], 16: [1 / 4, 1 / 8, 1 / 16, 1 / 32]}[patch]
    seen = []
    model.rpn.anchor_generator.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    with torch.no_grad():
        out = model([torch.rand(3, 6 * patch, 8 * patch)])  # 6 x 8 patches: p2 is 24 x 32
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert pool.scales == pytest.approx(expect, rel=1e-12)
    stride = patch / 4
    centres = []
    for y in range(24):
        for x in range(32):
            centres += [(x * stride, y * stride)] * 3  # three aspect ratios per position
    a = seen[0][: len(centres)]
    got = torch.stack([(a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2], 1)
    torch.testing.assert_close(got, torch.tensor(centres), rtol=0, atol=1e-4)


def test_roi_pooler_is_aligned_and_reads_each_box_at_its_level_stride():
    """ROIAlignV2 on maps whose channels are the column and the row index: bilinear sampling of a linear
    map is exact, so bin j of a box pools x0 / stride - 0.5 + (j + 0.5) * bin width (aligned: pixel
    centres at +0.5). A 56-px box is read on p2 (stride 3.5 at patch 14), a 112-px one on p3 (stride 7)."""
    model = det_backbone.build_model(_tiny_vit(14), 4, 224, [0.5] * 3, [0.25] * 3, window_size=4, channels=16)
    pool = model.roi_heads.box_roi_pool
    feats = {}
    for name, grid in zip(det_backbone.LEVELS, (64, 32, 16, 8)):
        rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                    indexing="ij")
        one = torch.stack([cols, rows])
        feats[name] = torch.stack([one, one + 100])  # image 1 reads 100 more: the batch index is kept
    boxes = [torch.tensor([[14.0, 21.0, 70.0, 77.0]]), torch.tensor([[28.0, 14.0, 140.0, 126.0]])]
    got = pool(feats, boxes, [(224, 224)] * 2)
    for i, ((x0, y0, x1, _), stride) in enumerate([(boxes[0][0].tolist(), 3.5), (boxes[1][0].tolist(), 7.0)]):
        width = (x1 - x0) / stride / 7
        for j in range(7):
            centre = (j + 0.5) * width - 0.5 + 100 * i
            torch.testing.assert_close(got[i, 0, :, j], torch.full((7,), x0 / stride + centre))
            torch.testing.assert_close(got[i, 1, j, :], torch.full((7,), y0 / stride + centre))


def test_box_regression_losses_are_l1_over_the_sampled_boxes(coco):
    """A training forward: the RPN's and the box head's loss_box_reg equal a hand loop of |delta - target|
    over the sampled positives (the class's own deltas in the box head), divided by all sampled, as
    detectron2's L1 (smooth_l1_beta=0)."""
    torch.manual_seed(0)
    model = det_backbone.build_model(unicom_vit.build("ViT-Tiny-16"), 4, 96, [0.5] * 3, [0.25] * 3, window_size=3,
                                     channels=16, rois_per_image=32).train()
    split = data.CocoSplit(coco, "train2017", train=True)
    images = [data.to_tensor(split.image(i)) for i in split.image_ids[:2]]
    targets = [split.instances(i).as_target() for i in split.image_ids[:2]]
    seen = {}

    def spy(owner, name):
        real = getattr(owner, name)

        def call(*args):
            out = real(*args)
            seen[name] = (args, out)
            return out
        setattr(owner, name, call)

    spy(model.rpn, "compute_loss")
    spy(model.rpn, "fg_bg_sampler")
    spy(model.roi_heads, "select_training_samples")
    model.roi_heads.box_predictor.register_forward_hook(lambda m, args, out: seen.update(predictor=out))
    losses = {k: v.detach() for k, v in model(images, targets).items()}

    (_, deltas, _, reg_targets), _ = seen["compute_loss"]
    deltas = deltas.detach()
    _, (pos_masks, neg_masks) = seen["fg_bg_sampler"]
    pos = [i for i, v in enumerate(torch.cat(pos_masks).tolist()) if v]
    total = len(pos) + int(torch.cat(neg_masks).sum())
    reg_targets = torch.cat(reg_targets)
    assert pos and total > len(pos)
    hand = sum(abs(float(deltas[i, k]) - float(reg_targets[i, k])) for i in pos for k in range(4)) / total
    assert float(losses["loss_rpn_box_reg"]) == pytest.approx(hand, rel=1e-5)

    _, (_, _, labels, reg_targets) = seen["select_training_samples"]
    labels, reg_targets = torch.cat(labels).tolist(), torch.cat(reg_targets)
    deltas = seen["predictor"][1].detach()
    hand = sum(abs(float(deltas[i, 4 * c + k]) - float(reg_targets[i, k]))
               for i, c in enumerate(labels) if c > 0 for k in range(4)) / len(labels)
    assert any(c > 0 for c in labels) and float(losses["loss_box_reg"]) == pytest.approx(hand, rel=1e-5)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def test_layer_wise_lr_decay_and_weight_decay():
    model = det_backbone.build_model(unicom_vit.build("ViT-Tiny-16"), 4, 64, [0.5] * 3, [0.25] * 3,
                                     window_size=2, channels=16)
    groups = det_backbone.param_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = 2
    expect = {"backbone.body.pos_embed": (1e-3 * 0.5 ** 3, 0.0), "backbone.body.patch_embed.weight": (1e-3 * 0.5 ** 3, 0.1),
              "backbone.body.blocks.0.attn.qkv.weight": (1e-3 * 0.5 ** 2, 0.1),
              "backbone.body.blocks.1.norm1.weight": (1e-3 * 0.5, 0.0),
              "backbone.body.blocks.1.norm2.bias": (1e-3 * 0.5, 0.0),
              "backbone.body.blocks.1.mlp.fc1.bias": (1e-3 * 0.5, 0.1),  # detectron2 decays biases
              "backbone.body.blocks.0.attn.rel_pos_h": (1e-3 * 0.5 ** 2, 0.1),  # and the rel-pos tables
              "backbone.body.pyramid.0.1.weight": (1e-3, 0.0), "backbone.body.pyramid.2.1.bias": (1e-3, 0.0),
              "backbone.body.pyramid.0.0.bias": (1e-3, 0.1),
              "roi_heads.box_head.0.0.weight": (1e-3, 0.1), "roi_heads.box_head.0.1.bias": (1e-3, 0.0),
              "roi_heads.mask_head.3.1.weight": (1e-3, 0.0), "rpn.head.conv.0.0.bias": (1e-3, 0.1)}
    for name, (lr, wd) in expect.items():
        g = where[id(named[name])]
        assert (g["lr"], g["weight_decay"]) == (pytest.approx(lr), wd), name
        assert det_backbone.layer_id(name, depth) == g["layer"]


def test_schedule_warmup_and_steps():
    assert job.lr_factor(0, 250, [100_000]) == pytest.approx(0.001)
    assert job.lr_factor(125, 250, [100_000]) == pytest.approx(0.001 + 0.999 * 0.5)
    assert job.lr_factor(250, 250, [1000, 2000]) == 1.0
    assert job.lr_factor(1000, 250, [1000, 2000]) == pytest.approx(0.1)
    assert job.lr_factor(2500, 250, [1000, 2000]) == pytest.approx(0.01)
    assert job.lr_factor(0, 0, []) == 1.0


def _mask_box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("seed", range(6))
def test_large_scale_jitter_keeps_boxes_and_masks_together(seed):
    rng = np.random.default_rng(seed)
    image, shapes = synthetic.render(rng, 120)
    from PIL import Image, ImageDraw
    masks = []
    for s in shapes:  # independent masks: each polygon filled by PIL
        canvas = Image.new("L", (120, 120), 0)
        ImageDraw.Draw(canvas).polygon(s["polygon"], fill=1)
        masks.append(np.asarray(canvas, np.uint8))
    masks = np.stack(masks)
    inst = data.Instances(np.array([_mask_box(m) for m in masks], np.float32), np.arange(1, len(masks) + 1), masks)
    out_img, out = data.large_scale_jitter(image, inst, 96, (0.3, 2.0), rng, fill=(1, 2, 3))
    assert out_img.size == (96, 96) and out.masks.shape[1:] == (96, 96)
    assert len(out.labels) == len(out.masks) == len(out.boxes) <= len(masks)
    for box, m in zip(out.boxes, out.masks):
        assert m.any()
        assert box.tolist() == _mask_box(m)  # boxes recomputed from the masks


def test_stream_walks_a_permutation_per_epoch():
    seq = [data.stream_index(k, 7, seed=1) for k in range(21)]
    assert all(sorted(seq[i:i + 7]) == list(range(7)) for i in (0, 7, 14))
    assert seq[:7] != seq[7:14]


def test_coco_split_reads_the_written_set(coco):
    raw = json.loads(data.annotation_file(coco, "val2017").read_text())  # the file itself, not pycocotools
    assert len({a["id"] for a in raw["annotations"]}) == len(raw["annotations"])
    val = data.CocoSplit(coco, "val2017", train=False)
    assert val.category_of == {1: 1, 2: 3, 3: 7} and val.num_classes == 4
    assert val.image_ids == sorted(im["id"] for im in raw["images"])
    for image_id in val.image_ids:
        anns = [a for a in raw["annotations"] if a["image_id"] == image_id]
        inst = val.instances(image_id)
        assert inst.labels.tolist() == [val.label_of[a["category_id"]] for a in anns]
        np.testing.assert_allclose(inst.boxes, [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        for a, m in zip(anns, inst.masks):  # each mask fills its own polygon's box and area
            assert abs(int(m.sum()) - a["area"]) <= 2
            assert np.allclose(_mask_box(m), [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                              a["bbox"][1] + a["bbox"][3]], atol=1.5)
    assert val.image(val.image_ids[0]).size == (96, 96)


def test_training_leaves_out_images_without_instances(tmp_path):
    root = synthetic.write(tmp_path / "c", train=3, val=2, size=64)
    path = data.annotation_file(root, "train2017")
    ann = json.loads(path.read_text())
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != 2]
    path.write_text(json.dumps(ann))
    assert data.CocoSplit(root, "train2017", train=True).image_ids == [1, 3]
    assert data.CocoSplit(root, "train2017", train=False).image_ids == [1, 2, 3]
    assert len(data.CocoSplit(root, "train2017", train=False).instances(2).labels) == 0


def test_coco_metrics_against_ground_truth(coco):
    from pycocotools import mask as mask_utils
    val = data.CocoSplit(coco, "val2017", train=False)
    perfect = []
    for a in val.coco.loadAnns(val.coco.getAnnIds()):
        rle = mask_utils.encode(np.asfortranarray(val.coco.annToMask(a)))
        rle["counts"] = rle["counts"].decode()
        perfect.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                        "score": 1.0, "segmentation": rle})
    m = job.coco_metrics(val.coco, perfect)
    assert m["box/AP"] == pytest.approx(1.0) and m["mask/AP"] == pytest.approx(1.0)
    assert "box/APs" not in m or m["box/APs"] == pytest.approx(1.0)  # -1 (no small objects) is left out
    wrong = [dict(p, category_id=[c for c in (1, 3, 7) if c != p["category_id"]][0]) for p in perfect]
    assert job.coco_metrics(val.coco, wrong)["box/AP"] == 0.0
    assert job.coco_metrics(val.coco, [])["mask/AP"] == 0.0


def test_missing_coco_files_name_the_expected_path(tmp_path, coco):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train2017")):
        data.check_files(tmp_path)
    (coco / "annotations" / "instances_val2017.json").rename(tmp_path / "moved.json")
    try:
        with pytest.raises(FileNotFoundError, match="annotations/instances_val2017.json"):
            data.check_files(coco)
    finally:
        (tmp_path / "moved.json").rename(coco / "annotations" / "instances_val2017.json")


def test_missing_coco_images_are_found_before_submission(tmp_path):
    """Every image the annotation files name is checked up front: the count and the first few are named."""
    copy = synthetic.write(tmp_path / "coco", train=2, val=8, size=32, seed=1)
    names = sorted(p.name for p in (copy / "val2017").iterdir())
    for name in names[:7]:
        (copy / "val2017" / name).unlink()
    with pytest.raises(FileNotFoundError) as err:
        data.check_files(copy)
    msg = str(err.value)
    assert f"7 of the {len(names)} images named in {copy}/annotations/instances_val2017.json are missing: " in msg
    assert f"{copy}/val2017/{names[0]}" in msg and "... (2 more)" in msg
    (copy / "annotations" / "instances_train2017.json").write_text('{"annotations": []}')
    with pytest.raises(ValueError, match="instances_train2017.json: not a COCO instances file"):
        data.check_files(copy)


def test_an_empty_annotation_set_is_refused_by_name(tmp_path):
    """Issue 29: an empty `annotations` list failed with ZeroDivisionError after the job had started."""
    copy = synthetic.write(tmp_path / "coco", train=2, val=2, size=32, seed=1)
    path = copy / "annotations" / "instances_train2017.json"
    ann = json.loads(path.read_text())
    path.write_text(json.dumps({**ann, "annotations": []}))
    with pytest.raises(ValueError, match=re.escape(f"detect.data_root={copy}: {path} has no annotation (2 images, "
                                                   "an empty 'annotations' list): nothing to train on or score")):
        data.check_files(copy)


def test_boxes_outside_their_image_are_clipped_or_dropped_and_counted(tmp_path):
    copy = synthetic.write(tmp_path / "coco", train=2, val=2, size=32, seed=1)
    path = data.annotation_file(copy, "val2017")
    ann = json.loads(path.read_text())
    first, second = ann["annotations"][:2]
    x, y, w, h = first["bbox"]
    first["bbox"] = [x - 40, y, w + 40, h]          # reaches 40 px left of the image: clipped at x = 0
    second["bbox"] = [100.0, 100.0, 5.0, 5.0]       # wholly outside the 32-px image: dropped
    path.write_text(json.dumps(ann))
    val = data.CocoSplit(copy, "val2017", train=False)
    assert val.box_faults == {"clipped": 1, "dropped": 1}
    kept = {a["id"]: a for a in val.coco.loadAnns(val.coco.getAnnIds())}
    assert second["id"] not in kept and len(kept) == len(ann["annotations"]) - 1
    assert kept[first["id"]]["bbox"] == pytest.approx([0.0, y, x + w, h])
    assert data.CocoSplit(copy, "train2017", train=True).box_faults == {"clipped": 0, "dropped": 0}


def test_a_rerun_into_another_configs_detect_folder_is_refused_before_submitting(tmp_path, coco):
    from slurm import launch
    from unicom_ds import config
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    torch.save(unicom_vit.build("ViT-Tiny-16").state_dict(), run / "train" / "backbone.pt")
    args = ["stage=detect", f"run_dir={run}", "model=ViT-Tiny-16", f"detect.data_root={coco}"]
    cfg = config.resolve(args)
    out = job.out_dir(cfg, "run")
    model = torch.nn.Linear(3, 2)
    job.save_checkpoint(out / "ckpt", 5, model, torch.optim.AdamW(model.parameters()),
                        config.select(cfg, job.MADE_WITH))
    launch.precheck(cfg)  # its own folder: a rerun continues it
    with pytest.raises(ValueError, match=r"step_5.pt was made with a different config \(detect.lr: "):
        launch.precheck(config.resolve([*args, "detect.lr=0.5"]))


def test_launcher_checks_before_submitting(tmp_path, coco):
    """In process, as slurm/submit.py does it: resolve, plan, precheck, render the sbatch scripts."""
    from slurm import launch
    from slurm.launch_slurm import dry_run_scripts
    from unicom_ds import config
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    torch.save(unicom_vit.build("ViT-Tiny-16").state_dict(), run / "train" / "backbone.pt")

    def plan(*args):
        cfg = config.resolve(["stage=detect", f"run_dir={run}", "model=ViT-Tiny-16", f"detect.data_root={coco}", *args])
        return cfg, launch.plan(cfg), launch.precheck(cfg)

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / "train2017")):
        plan(f"detect.data_root={tmp_path / 'none'}")
    with pytest.raises(ValueError, match=r"detect.batch_size=12: must split evenly over the 8 rank"):
        plan("detect.batch_size=12", "slurm.gpus_per_node=8")
    with pytest.raises(FileNotFoundError, match="detect.model=unicom:ViT-Tiny-16@/nowhere.pt"):
        plan("detect.model=unicom:ViT-Tiny-16@/nowhere.pt")
    cfg, jobs, notes = plan()
    assert [j.step for j in jobs] == ["detect"] and "detect: Mask R-CNN on run" in notes[0]
    (_, script), = dry_run_scripts(cfg, jobs)
    assert "#SBATCH --ntasks-per-node=8" in script and "#SBATCH --gpus-per-node=8" in script
    cfg, jobs, _ = plan("stage=eval", "detect.with_eval=true", "eval.datasets=[]")
    assert [j.step for j in jobs] == ["eval", "detect"] and jobs[1].after == "eval"
    cfg = config.resolve(["stage=all", f"run_dir={run}", "detect.with_eval=true"])
    assert launch.steps_of(cfg)[-3:] == ("eval", "detect", "report")


def test_checkpoint_round_trip_and_planted_payload_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    made = {"detect.lr": 0.1}
    for step in (1, 2, 3):
        job.save_checkpoint(tmp_path, step, model, opt, made)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_2.pt", "step_3.pt"]
    assert job.latest_step(tmp_path) == 3
    state = job.load_checkpoint(tmp_path, made)
    assert torch.equal(state["model"]["weight"], model.weight)
    with pytest.raises(ValueError, match="detect.lr"):
        job.load_checkpoint(tmp_path, {"detect.lr": 0.2})

    class Payload:
        def __reduce__(self):
            return (print, ("planted payload ran",))

    torch.save({"step": 4, "model": Payload()}, tmp_path / "step_4.pt")
    (tmp_path / "latest").write_text("step_4.pt\n")
    with pytest.raises(ValueError, match="step_4.pt: not a checkpoint this project wrote"):
        job.load_checkpoint(tmp_path, made)


def test_detect_prints_its_own_table_once(tmp_path, monkeypatch, capsys):
    """After the eval stage printed Tab. 1 and 2, detect prints Tab. 9 only; results.md keeps them all."""
    from evaluation import results
    from unicom_ds import config
    run = tmp_path / "run"
    results.write_all(run, {"run": {"sop": {"R@1": 0.5}}}, {})
    metrics = {"box/AP": 0.03, "mask/AP": 0.04}
    monkeypatch.setattr(job.Detector, "run", lambda self: metrics)
    assert job.detect(config.resolve(["stage=detect", f"run_dir={run}", "model=ViT-Tiny-16"])) == metrics
    out = capsys.readouterr().out
    assert out.count("Tab. 9") == 1 and "Tab. 2" not in out and "| run | 3.0 |" in out
    assert "Tab. 2" in (run / "eval" / "results.md").read_text()
    # The demo's synthetic set (its marker file) gets its own table: its AP never stands in a COCO table.
    shapes = synthetic.write(tmp_path / "shapes", train=1, val=1, size=32, seed=0)
    job.detect(config.resolve(["stage=detect", f"run_dir={run}", "model=ViT-Tiny-16", f"detect.data_root={shapes}"]))
    out = capsys.readouterr().out
    assert "Synthetic shapes, the demo's stand-in for COCO" in out and "Tab. 9" not in out
    saved = json.loads((run / "eval" / "results.json").read_text())["run"]
    assert saved["shapes"] == metrics and saved["coco"] == metrics  # the earlier COCO row stays as it was


def test_rpn_proposal_counts_reach_the_model_and_need_two_numbers(tmp_path, coco):
    from unicom_ds import config
    vit = unicom_vit.build("ViT-Tiny-16")
    model = det_backbone.build_model(vit, 4, 96, [0.5] * 3, [0.5] * 3, 3, None, 0.0, 32, 32, (500, 200), (250, 100))
    assert model.rpn._pre_nms_top_n == {"training": 500, "testing": 200}
    assert model.rpn._post_nms_top_n == {"training": 250, "testing": 100}
    default = det_backbone.build_model(vit, 4, 96, [0.5] * 3, [0.5] * 3)
    assert default.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}  # ViTDet's
    assert default.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    torch.save(vit.state_dict(), run / "train" / "backbone.pt")
    cfg = config.resolve(["stage=detect", f"run_dir={run}", "model=ViT-Tiny-16", f"detect.data_root={coco}",
                          "detect.rpn_post_nms_topk=[1000]"])
    with pytest.raises(config.ConfigError, match=r"detect.rpn_post_nms_topk=\[1000\]: two numbers"):
        job.check(cfg)


def test_predictions_do_not_depend_on_the_eval_batch_size(tmp_path):
    """Val images of four shapes: every one padded to the detect.image_size square, so one image alone
    and four in a batch see the same padded input and give the same detections."""
    from PIL import Image
    from unicom_ds import config
    root = synthetic.write(tmp_path / "coco", train=1, val=4, size=96, seed=5)
    for name, (w, h) in zip(sorted((root / "val2017").iterdir()), [(96, 64), (64, 96), (96, 96), (80, 48)]):
        Image.open(name).crop((0, 0, w, h)).save(name)
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(unicom_vit.build("ViT-Tiny-16").state_dict(), run / "train" / "backbone.pt")

    def detector(batch: int) -> job.Detector:
        return job.Detector(config.as_config(config.select(config.resolve([
            "stage=detect", f"run_dir={run}", "model=ViT-Tiny-16", f"detect.data_root={root}", "device=cpu",
            "detect.image_size=96", "detect.window_size=3", "detect.fpn_channels=16", "progress=off",
            f"detect.eval_batch_size={batch}"]))))

    val = data.CocoSplit(root, "val2017", train=False)
    model, _ = detector(1).build(val.num_classes)
    one, four = detector(1).predict(model, val), detector(4).predict(model, val)
    assert len({p["image_id"] for p in one}) == 4 and len(one) == len(four)
    for a, b in zip(one, four):
        assert [a[k] for k in ("image_id", "category_id", "segmentation")] == \
            [b[k] for k in ("image_id", "category_id", "segmentation")]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_layer_decay_drop_path_and_global_blocks_default_to_vitdets_for_the_model_size(tmp_path, coco):
    """null detect.layer_decay / drop_path: ViTDet's ViT-B values for 12 blocks (and the tiny models), its
    ViT-L ones for 24 (0.8, 0.4, global blocks 5, 11, 17, 23); a given value wins; a bad one stops the plan."""
    from slurm import launch
    from unicom_ds import config
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    torch.save(unicom_vit.build("ViT-Tiny-16").state_dict(), run / "train" / "backbone.pt")

    def resolve(*args):
        return config.resolve(["stage=detect", f"run_dir={run}", "model=ViT-Tiny-16", f"detect.data_root={coco}",
                               "device=cpu", "progress=off", "detect.image_size=64", "detect.window_size=2", *args])

    cfg = resolve()
    assert cfg.detect.layer_decay is None and cfg.detect.drop_path is None
    assert "lr 0.0001 (ViTDet's layer decay for its size down the ViT)" in launch.precheck(cfg)[0]
    det = job.Detector(config.as_config(config.select(cfg)))
    assert (det.recipe(12), det.recipe(24), det.recipe(2)) == ((0.7, 0.1), (0.8, 0.4), (0.7, 0.1))
    model, _ = det.build(4)
    assert model.backbone.body.block_drop == pytest.approx([0.0, 0.1])
    lrs = {g["layer"]: g["lr"] for g in det.optimizer(model).param_groups}
    assert lrs[0] == pytest.approx(1e-4 * 0.7 ** 3) and lrs[3] == pytest.approx(1e-4)
    given = job.Detector(config.as_config(config.select(resolve("detect.layer_decay=0.65", "detect.drop_path=0.2"))))
    assert given.recipe(24) == (0.65, 0.2)
    large = unicom_vit.UnicomViT(image_size=32, patch_size=16, width=16, depth=24, heads=1, embed_dim=16)
    drop = det.recipe(det_backbone.vit_depth(large))[1]
    bb = det_backbone.ViTDetBackbone(large, window_size=2, drop_path=drop, out_channels=8, image_size=32)
    assert sorted(bb.global_blocks) == [5, 11, 17, 23] and bb.block_drop[-1] == pytest.approx(0.4)
    for bad in ("detect.layer_decay=0", "detect.drop_path=abc", "detect.drop_path=1.5"):
        with pytest.raises(config.ConfigError, match=bad.replace(".", r"\.") + ": expected null or a number in"):
            resolve(bad)
