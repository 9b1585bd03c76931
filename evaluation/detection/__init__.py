"""COCO detection and instance segmentation (Unicom paper A.4, Tab. 9): Mask R-CNN on the trained ViT,
as ViTDet (Li et al. 2022) does it.

- `backbone`: any model `unicom_ds.load` knows -> a plain-ViT backbone with windowed attention, the
  position embedding resized to the input, and ViTDet's simple feature pyramid, feeding torchvision's
  `MaskRCNN` (`build_model`).
- `data`: COCO 2017 in its original layout read with pycocotools; large-scale jitter for training.
- `job`: the detect stage (`python slurm/submit.py stage=detect`): DDP training, atomic checkpoints,
  requeue, COCOeval bbox/segm into RUN/eval/results.json.
- `synthetic`: a small COCO-format set of rendered shapes for tests and the demo.
"""
