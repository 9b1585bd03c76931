"""The quantize stage: compact codes of a run's (frozen) backbone features, scored by code search.

- `baselines`: faiss PQ, OPQ+PQ and IVF-PQ at a bit budget (asymmetric distance search).
- `scq`: the SCQ head (Wu et al. 2022, arXiv 2206.09806): soft product quantisation trained with part
  and global consistency losses, its codebooks exported into a faiss IndexPQ.
- `job`: `quantize_job(cfg)`, what `python slurm/submit.py stage=quantize` runs (as `QuantizeJob`, requeued at
  the time limit); the SCQ head trains through `unicom_ds.train`'s Trainer.
"""
