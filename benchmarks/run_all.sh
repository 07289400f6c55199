#!/usr/bin/env bash
# The performance benchmarks of docs/performance.md, one after the other (never two at once:
# they time each other otherwise). Figures go to docs/perf/*.json; logs to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-docs/perf}
mkdir -p "$OUT"
$PY -m benchmarks.bench_pgm --json "$OUT/pgm.json"
$PY -m benchmarks.bench_step --detector retinanet --json "$OUT/step_retinanet.json"
$PY -m benchmarks.bench_step --detector faster_rcnn --json "$OUT/step_faster_rcnn.json"
$PY -m benchmarks.bench_step --detector faster_rcnn --json "$OUT/step_faster_rcnn_adapter1.json" MODEL.GKD.ADAPTER_KERNEL 1
$PY -m benchmarks.bench_step --detector retinanet --norm BN --json "$OUT/step_retinanet_bn.json"
$PY -m benchmarks.bench_step --detector faster_rcnn --norm BN --json "$OUT/step_faster_rcnn_bn.json"
$PY -m benchmarks.bench_memory --detector retinanet --json "$OUT/memory_retinanet.json"
$PY -m benchmarks.bench_memory --detector faster_rcnn --json "$OUT/memory_faster_rcnn.json"
$PY -m benchmarks.bench_refresh --config configs/quickstart_gkd_retinanet_cpu.yaml --json "$OUT/refresh_retinanet.json"
$PY -m benchmarks.bench_refresh --config configs/quickstart_gkd_faster_rcnn_cpu.yaml --json "$OUT/refresh_faster_rcnn.json"
$PY -m benchmarks.bench_inference --config configs/quickstart_gkd_faster_rcnn_cpu.yaml --json "$OUT/inference_faster_rcnn.json"
$PY -m benchmarks.bench_inference --config configs/quickstart_gkd_retinanet_cpu.yaml --json "$OUT/inference_retinanet.json"
