#!/usr/bin/env bash
# What no CPU can check, in one run on a lent CUDA machine. It has not been run on a GPU yet, so
# how long it takes is not known.
#   1. detectron2 built with its CUDA ops from the carried source, .gpu/detectron2-src.tar.gz
#      (tools/install_detectron2.py; tools/gpu_prepare.sh packed it: main at the pinned commit
#      unless DETECTRON2_SOURCE said otherwise);
#   2. the CUDA tests (tests/test_gpu.py: both detectors, fp32 and AMP) and the install tests;
#   3. train_net.py --num-gpus 1 on CUDA, a short GKD run, with and without AMP, plus an NCCL
#      all-reduce (with one GPU detectron2's launch runs in-process, so NCCL is checked apart);
#   4. the step ratio at a COCO-like size: R101 -> R50 at 800 px, random weights, both detectors
#      (python -m benchmarks.bench_step --device cuda);
#   5. the prototype refresh at COCO size on CUDA, full and bank mode side by side, both paper
#      configs, and its extraction under autocast against fp32 (picks kept, r)
#      (python -m benchmarks.bench_refresh --stand-in-data --coco-projection --amp-compare, small
#      step counts; the gloo selection comparison is CPU-only and skipped here).
# First, here: bash tools/gpu_prepare.sh (fills .gpu/). There: bash tools/gpu_check.sh, with `.gpu`
# carried. Figures and logs go to $OUT (default output/gpu_check): summary.txt and the JSONs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, record the outcome and the seconds
    local name=$1 start=$SECONDS
    shift
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "ok   $name ($((SECONDS - start)) s)" | tee -a "$OUT/summary.txt"
    else
        echo "FAIL $name ($((SECONDS - start)) s): see $name.log" | tee -a "$OUT/summary.txt"
        tail -20 "$OUT/$name.log"
        failed=1
    fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/summary.txt" 2>&1

if ! "$PY" -c "import fvcore, iopath, pycocotools, yacs, omegaconf, hydra" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/gkd_site .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/gkd_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH  # gkd_d2 from this tree
install_d2() {
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) \
        "$PY" tools/install_detectron2.py --source .gpu/detectron2-src.tar.gz --cache /tmp/gkd_cache &&
        "$PY" -c "from detectron2 import _C; assert _C.has_cuda(), 'no CUDA ops'; print(_C.get_cuda_version())"
}
step detectron2_cuda_build install_d2
step pytest_gpu "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_install.py

teacher=$OUT/tiny_teacher.pth
"$PY" - "$teacher" <<'PY'
import sys, torch
from detectron2.modeling import build_model
from gkd_d2 import load_config
cfg = load_config("tests/configs/tiny_retinanet.yaml")
torch.manual_seed(0)
torch.save({"model": build_model(cfg).state_dict()}, sys.argv[1])
PY
run_gkd() {  # run_gkd AMP; tests/startup registers the tiny config's test-only datasets
    PYTHONPATH=$PWD/tests/startup:$PWD/tests:$PYTHONPATH "$PY" train_net.py --config-file tests/configs/tiny_gkd_retinanet.yaml --num-gpus 1 \
        MODEL.DEVICE cuda MODEL.TEACHER.WEIGHTS "$teacher" SOLVER.AMP.ENABLED "$1" \
        SOLVER.MAX_ITER 20 OUTPUT_DIR "$OUT/gkd_amp_$1"
}
step train_net_fp32 run_gkd False
step train_net_amp run_gkd True
step nccl_all_reduce "$PY" -c "
import torch, torch.distributed as dist
dist.init_process_group('nccl', init_method='tcp://127.0.0.1:29511', world_size=1, rank=0)
x = torch.ones(4, device='cuda'); dist.all_reduce(x); assert x.sum().item() == 4
print('nccl', torch.cuda.nccl.version()); dist.destroy_process_group()"
for det in retinanet faster_rcnn; do
    step "step_${det}_800" "$PY" -m benchmarks.bench_step --detector "$det" --device cuda \
        --size 800 --teacher-depth 101 --student-depth 50 --json "$OUT/step_gpu_${det}_800.json"
done
grep -h '"ratio' "$OUT"/step_gpu_*.json >>"$OUT/summary.txt" 2>/dev/null
for det in retinanet faster_rcnn; do
    config=configs/gkd.yaml
    [ "$det" = faster_rcnn ] && config=configs/gkd_faster_rcnn.yaml
    step "refresh_${det}_coco" "$PY" -m benchmarks.bench_refresh --config "$config" \
        --stand-in-data --steps 3 --bank-steps 2 --harvest-blocks 3 --harvest-block-steps 2 \
        --worker-rounds 1 --selection-processes 0 --amp-compare --coco-projection \
        --json "$OUT/refresh_gpu_${det}.json" SOLVER.IMS_PER_BATCH 2 MODEL.DEVICE cuda
done
for f in "$OUT"/refresh_gpu_*.json; do  # the share figures, one line per detector
    [ -f "$f" ] || continue
    "$PY" - "$f" >>"$OUT/summary.txt" 2>&1 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b, h, p = r["bank"], r["harvest_cost"], r["coco_projection"]["shares"][0]
a = r.get("autocast", {})
print(
    f"refresh {r['config']}: later refresh / period full {r['second_refresh_share_of_period']}"
    f" bank {b['second_refresh_share_of_period']} (student images {r['second_student_images']}"
    f" vs {b['second_student_images']}); harvest step ratio {h['ratio']}, harvest calls"
    f" {b.get('harvest_call_ms_per_step')} ms/step; COCO epoch share at"
    f" 800/class: full first {p['first_refresh_share']} later {p['later_refresh_share']}"
    f" (unsharded selection {p['later_refresh_share_unsharded_selection']}), bank later"
    f" {p['bank_later_refresh_share']} (+harvest {p.get('bank_later_refresh_share_plus_harvest')})"
    f"; autocast vs fp32: picks kept {a.get('pick_overlap', {}).get('overall')}, mean |dr|"
    f" {a.get('r', {}).get('mean_abs_delta_r')}, s {a.get('autocast_refresh_s')} vs {a.get('fp32_refresh_s')}"
)
PY
done
cat "$OUT/summary.txt"
exit $failed
