#!/usr/bin/env bash
# The performance benchmarks of docs/performance.md, one after the other (never two at once:
# they time each other otherwise). Figures go to docs/perf/*.json; logs to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-docs/perf}
mkdir -p "$OUT"
$PY benchmarks/bench_pgm.py --json "$OUT/pgm.json"
$PY benchmarks/bench_step.py --detector retinanet --json "$OUT/step_retinanet.json"
$PY benchmarks/bench_step.py --detector faster_rcnn --json "$OUT/step_faster_rcnn.json"
$PY benchmarks/bench_step.py --detector faster_rcnn --json "$OUT/step_faster_rcnn_adapter1.json" MODEL.GKD.ADAPTER_KERNEL 1
$PY benchmarks/bench_step.py --detector retinanet --norm BN --json "$OUT/step_retinanet_bn.json"
$PY benchmarks/bench_step.py --detector faster_rcnn --norm BN --json "$OUT/step_faster_rcnn_bn.json"
$PY benchmarks/bench_memory.py --detector retinanet --json "$OUT/memory_retinanet.json"
$PY benchmarks/bench_memory.py --detector faster_rcnn --json "$OUT/memory_faster_rcnn.json"
$PY benchmarks/bench_refresh.py --config configs/quickstart_gkd_retinanet_cpu.yaml --json "$OUT/refresh_retinanet.json"
$PY benchmarks/bench_refresh.py --config configs/quickstart_gkd_faster_rcnn_cpu.yaml --json "$OUT/refresh_faster_rcnn.json"
$PY benchmarks/bench_inference.py --config configs/quickstart_gkd_faster_rcnn_cpu.yaml --json "$OUT/inference_faster_rcnn.json"
$PY benchmarks/bench_inference.py --config configs/quickstart_gkd_retinanet_cpu.yaml --json "$OUT/inference_retinanet.json"
