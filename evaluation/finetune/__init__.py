"""Supervised retrieval fine-tuning (the Unicom paper's Tab. 4): any backbone `unicom_ds.load` knows (MLCD's too),
fine-tuned on the train split of a retrieval set with the train stage's machinery (`unicom_ds.train.Trainer`:
ShardedPrototypes, DeepSpeed, checkpoints and resume, TensorBoard, SLURM requeue), then evaluated on the
set's test split by the eval stage's retrieval code, next to the model it started from.

    python slurm/submit.py stage=finetune run_dir=RUN finetune.datasets=[cub] finetune.init=unicom:ViT-B/16@FILE

- `data`: the train split (`evaluation.retrieval_sets.read_train`) as the Trainer's data source, with
  deepglint/unicom retrieval.py's train images (timm augmentation, or origin_clip) and its eval transform.
- `job`: the precheck, the job (`finetune_job`, `FinetuneJob` under SLURM, `local_command` for the
  deepspeed launcher), the per-epoch test and the evaluation. Writes RUN/finetune/<set>/ (ckpt/, backbone.pt,
  export.json, init.json, epochs.json), RUN/tensorboard/finetune/<set>/, and the results into RUN/eval/.
- `sync_bn`: the release head's BatchNorm synchronised over the ranks (retrieval.py's SyncBatchNorm).
"""
