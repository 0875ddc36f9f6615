#!/usr/bin/env bash
# The GPU code paths and GPU figures in one script, for a node with one CUDA GPU:
#
#     bash bench/gpu_check.sh [OUT_DIR]
#
# 1. the demo pipeline with every stage on the GPU: the classifier, affinity and
#    segmentation fits on Ray Train with use_gpu (NCCL process group), the CAM, random-walk,
#    prior and prediction actors with num_gpus, two rounds of the loop; then its table;
# 2. bench/bench_random_walk.py on CUDA: the sparse walk against IRN's dense one;
# 3. bench/bench_segmenter.py --gpu: the segmenter stage's Ray Train fit against a plain
#    loop on the same GPU.
# Every part writes its log to OUT_DIR (default bench/out/gpu); a failing part does not
# stop the next one, and the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/out/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
PY=${PYTHON:-python3}
fail=0

part() {  # part NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    echo "=== $name ($(date +%T))"
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0)) s"
    tail -n "${TAIL:-25}" "$OUT_DIR/$name.log"
    [ $rc -eq 0 ] || fail=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"

RUN=$(mktemp -d /tmp/wsss-gpu-XXXX)
GPU_KEYS=(run_dir="$RUN" ray.progress_bars=false
          classifier.use_gpu=true segmenter.use_gpu=true affinity.use_gpu=true
          cams.gpus_per_actor=0.5 predict.gpus_per_actor=0.5 loop.gpus_per_actor=0.5
          random_walk.gpus_per_actor=0.5 random_walk.enabled=true loop.rounds=2)
part pipeline "${PIPELINE_S:-300}" $PY -m ray_wsss.cli run ray_wsss/configs/demo.yaml "${GPU_KEYS[@]}"
TAIL=60 part metrics 60 $PY -m ray_wsss.cli metrics "$RUN"
# the fits really ran on the GPU: the device each worker reported
grep -h -E "worker [0-9]+/[0-9]+ on" "$OUT_DIR/pipeline.log" | sort | uniq -c | head -20

part random_walk "${WALK_S:-150}" $PY bench/bench_random_walk.py --device cuda --repeats 3 \
    --sizes 500x375,640x640,1000x750,2000x1500,4000x3000 --max-dense-gib 8
TAIL=15 part segmenter "${SEG_S:-150}" $PY bench/bench_segmenter.py --gpu --images 640 \
    --epochs 3 --threads 4
exit $fail
