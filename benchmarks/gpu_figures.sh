#!/usr/bin/env bash
# Every figure that waits for a GPU (issue 13's, and the detect and finetune stages'), in one run of a
# few minutes on one CUDA GPU.
#
#     bash benchmarks/gpu_figures.sh [OUT_DIR] [PART ...]   # default OUT_DIR: gpu_figures/ ($OUT when set)
#
# PART: part numbers to run (e.g. 01 02 03 04 07), all when none are given. A device call runs at most
# 10 minutes, so run the parts in calls into one OUT_DIR: `01 02 03 04 07 09`, then `05 06 08 10 11 12`, then `13`
# (the summary is appended to; 04 reads 02's step rate from OUT_DIR).
#
# Each part has its own time limit and log (OUT_DIR/NN_name.log); a part that fails or runs out of
# time is reported and the others still run. The summary (OUT_DIR/summary.txt) lists each part's
# exit status and last lines; copy the figures into docs/benchmarks.md with the machine and date.
# Parts (about 15 minutes on an H100 / H200 with 16 CPU cores, 35 at the most with every limit hit;
# the embed parts spend most of their time writing their shard: about 10 ms per sample on one core):
#   01 the sync-free prototype layer on the GPU (tests/test_prototypes_sync.py under sync_debug_mode)
#   02 training step vs backbone forward+backward, ViT-B-32 bf16 batch 256, 125k prototypes, + profile
#   03 model FLOPs utilisation of the training step (torch.utils.flop_counter), B/32, B/16, L/14
#   04 train loader img/s per rank with 4, 8, 16 workers (500 x 400 JPEG q90), against 02's step rate
#   05 embed stage vs forward-only: ViT-B-32 on a 10,240-sample shard, ViT-L-14 on 4,096 (400-px JPEGs)
#   06 eval extraction vs forward-only (bench_eval.py, extraction only, 4,096 500 x 375 JPEGs)
#   07 GPU JPEG decoding (nvJPEG) vs PIL decoding, equality and speed, a train run with train.gpu_decode (tests/test_decode_gpu.py + bench)
#   08 detect stage: one ViT-B Mask R-CNN step at 1024 px, windowed vs global attention (img/s, peak memory)
#   09 finetune stage: ViT-B/16 bf16 at the recipe's batch of 128 (img/s)
#   10 assign's nearest-centroid search in torch on the GPU (faiss-cpu build) vs faiss on the CPU, k = 100k and 1M
#   11 assign's IVF search as grouped products on the GPU (TorchIVF) vs exact torch search, k = 1M, d = 512
#   12 MLCD (issue 25): its loss layer at l = 1 and 8 vs the single-label layer, k = 125k (one rank's block of 1M
#      on 8 GPUs) and 1M; the training step of MLCD's RoPE2D ViT-B/32 vs its backbone forward+backward
#   13 MLCD at the paper's scale (issue 30): its GPU tests (the step with the new r1 sample never waits on the
#      host; GPU equals CPU), then one of 8 ranks (125,000 of k = 1M classes, d = 1024, l = 8, r1 = 0.1) against
#      4,096-12,288 rows of the global batch, projected to its 32,768 rows
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_figures}}
shift $(( $# > 0 ? 1 : 0 ))
PARTS=" $* "
mkdir -p "$OUT_DIR"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT_DIR/summary.txt"
[ "$PARTS" = "  " ] && : > "$SUMMARY"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc;
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } \
  >> "$SUMMARY" 2>&1

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  [ "$PARTS" = "  " ] || [[ "$PARTS" == *" ${name:0:2} "* ]] || return 0
  local log="$OUT_DIR/$name.log" start=$SECONDS
  echo "== $name: $*" | tee -a "$SUMMARY"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start)) s; last lines:" >> "$SUMMARY"
  tail -n 12 "$log" | sed 's/^/   | /' >> "$SUMMARY"
}

part 01_sync_free_layer 90 $PY -m pytest -q -rs tests/test_prototypes_sync.py
part 02_train_step 120 $PY benchmarks/bench_train_step.py --device cuda --model ViT-B-32 --batch 256 \
  --classes 125000 --bf16 --steps 20 --warmup 5 --rounds 3 --profile "$OUT_DIR/02_train_step_profile.txt"
part 03_mfu 180 $PY benchmarks/gpu_figures.py mfu --models ViT-B-32:256 ViT-B-16:256 ViT-L-14:128
STEP_RATE=$(grep -o '"images_per_s": [0-9.]*, "peak_mem_mb"' "$OUT_DIR/02_train_step.log" | tail -1 | grep -o '[0-9.]*' | head -1)
part 04_loader 120 $PY benchmarks/bench_loader.py --device cuda --workers 4 8 16 --batch 256 --batches 30 \
  --samples 4000 ${STEP_RATE:+--step-rate "$STEP_RATE"}
part 05_embed_b32 240 $PY benchmarks/bench_embed.py --device cuda --model ViT-B-32 --n 10240 --batch-size 256 \
  --workers 14 --size 400
part 05_embed_l14 150 $PY benchmarks/bench_embed.py --device cuda --model ViT-L-14 --n 4096 --batch-size 256 \
  --workers 14 --size 400
part 06_eval_extract 120 $PY benchmarks/bench_eval.py --device cuda --skip knn --images 4096 --workers 14
part 07_gpu_decode_tests 150 $PY -m pytest -q -rs tests/test_decode_gpu.py
part 07_gpu_decode_rate 60 $PY benchmarks/gpu_figures.py decode --side 500 --batch 256
part 07_gpu_decode_rate_1024 60 $PY benchmarks/gpu_figures.py decode --side 1024 --batch 256
part 08_detect_windowed 90 $PY benchmarks/bench_detection.py --device cuda --model ViT-B-16 --size 1024 --batch 2 \
  --window 14 --bf16
part 08_detect_global 90 $PY benchmarks/bench_detection.py --device cuda --model ViT-B-16 --size 1024 --batch 2 \
  --window 0 --bf16
part 09_finetune 150 $PY benchmarks/bench_finetune.py --device cuda --model ViT-B-16 --batch 128 --steps 60 \
  --precision bf16 --workers 8
part 10_assign_100k 90 $PY benchmarks/bench_assign.py --device cuda --k 100000 --d 768 --n 65536 --faiss-rows 8192
part 10_assign_1m 120 $PY benchmarks/bench_assign.py --device cuda --k 1000000 --d 768 --n 65536 --faiss-rows 1024
part 11_assign_ivf_1m 240 $PY benchmarks/bench_assign_ivf.py --device cuda --data topics --k 1000000 --d 512 \
  --n 65536 --nprobe 8 32
part 12_mlcd_loss 120 $PY benchmarks/bench_mlcd_loss.py --device cuda --batch 256 --ks 125000,1000000 --widths 1,8 \
  --warmup 3 --repeats 10
part 12_mlcd_vit_step 120 $PY benchmarks/bench_train_step.py --device cuda --model MLCD-ViT-B-32 --batch 256 \
  --classes 125000 --bf16 --steps 20 --warmup 5
part 13_mlcd_gpu_tests 90 $PY -m pytest -q -rs tests/test_mlcd_loss.py -k gpu
part 13_mlcd_paper_scale 240 $PY benchmarks/bench_mlcd_loss.py --device cuda --paper --rows 4096,8192,12288 \
  --dim 1024 --warmup 2 --repeats 5
echo "done: $SUMMARY" | tee -a "$SUMMARY"
