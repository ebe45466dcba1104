#!/usr/bin/env bash
# What to run first on a GPU node (one machine, every GPU), meant to fit 10 minutes (its timeouts: 5 + 5 + 10;
# not yet timed on a GPU): the GPU check on one
# GPU (SFT and GRPO speed, then GRPO with TRL's vLLM rollouts), then R1-Zero and the cold start of the
# GPU profile end to end on every GPU, a few steps each, evaluated through vLLM. Nothing is
# downloaded: without BASE the base is a random Qwen2.5-0.5B-shaped model (its scores mean nothing;
# that everything runs does).
#
#   bench/gpu_first_run.sh [BASE]    BASE: a Hugging Face folder, or s3://... put there by `r1flow upload`
#
# Needs the orchestrator's environment (PYTHON, default .venv/bin/python) and the GPU stage
# environment (STAGE_PYTHON, default /opt/stage/bin/python: infra/stage.Containerfile). Figures and
# logs go to OUT (default gpu-first-run/).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STAGE_PYTHON=${STAGE_PYTHON:-/opt/stage/bin/python}
OUT=${OUT:-gpu-first-run}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpus.csv"

# 1. One GPU: training and rollout speed.
timeout 300 "$STAGE_PYTHON" bench/gpu_check.py --steps 5 | tee "$OUT/gpu_check.txt"
timeout 300 "$STAGE_PYTHON" bench/gpu_check.py --steps 5 --vllm colocate | tee "$OUT/gpu_check_vllm.txt"

# 2. The GPU profile on every GPU: SFT and GRPO under accelerate with DeepSpeed,
#    one process per GPU, rollouts and evaluation through vLLM.
BASE=${1:-}
if [ -z "$BASE" ]; then
  BASE="$OUT/random-qwen2.5-0.5b"
  [ -d "$BASE" ] || "$STAGE_PYTHON" bench/gpu_check.py --save "$BASE"
fi
R1FLOW_ROOT="$OUT/root" timeout 600 "$PYTHON" -m flows.cli run --config configs/qwen-gpu.yaml \
  --set "base.path=$BASE" --set runtime.gpu_deployment=null --set runtime.stage_python="$STAGE_PYTHON" \
  --set "stages=[eval_base, eval_r1_zero, eval_cold_start]" \
  --set data.n_train=256 --set data.n_validation=16 --set data.n_test=64 --set data.cold_start_size=64 \
  --set cold_start.max_steps=5 --set cold_start.save_steps=5 \
  --set grpo.max_steps=5 --set grpo.save_steps=5 --set grpo.heldout_every=5 --set grpo.logging_steps=1 \
  --set evaluate.limit=64 --summary-json "$OUT/summary.json" 2>&1 | tee "$OUT/run.log"
echo "done: figures and logs in $OUT/ (gpu_check*.txt, run.log, summary.json)"
