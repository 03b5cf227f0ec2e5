#!/usr/bin/env bash
# Issue 22's device run as one call on the GPU host, from the repository root there, with the wheels that
# tools/gpu-wheels.sh downloads here carried along:
#   run(command="bash tools/gpu-check.sh", carry=[".whl"], timeout_s=600)
# MODELS (default smollm2-135m,qwen3-0.6b; llama-3.2-1b is the ~1B config) and GPU_CHECK_SECONDS (default 540:
# the check stops inside the call's limit) may be set. The reports come back in $OUT/check (gpu_check.json and
# gpu_check.md, written after each model, and the log); checkpoints and artifacts stay on the host's /tmp.
set -uo pipefail
out="${OUT:-/tmp/gpu-check-out}/check"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing .whl/ failed: was it carried (tools/gpu-wheels.sh, carry=['.whl'])?" >&2; exit 1; }
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/nvidia-smi.txt"
models="${MODELS:-smollm2-135m,qwen3-0.6b}"
timeout "${GPU_CHECK_SECONDS:-540}" python3 -m inferneo_build.gpu_check "$out" --device cuda \
  --models "$models" --work /tmp/gpu-check-work 2>&1 | tee "$out/gpu_check.log"
rc=$?
# Then, in the time left (the call's limit is 600 s), the product's own bench on the device: the first model's
# torchscript-bf16 target with `inferneo bench --device cuda` (its JSON and log in $OUT/check too).
art="/tmp/gpu-check-work/${models%%,*}/artifact"
left=$((585 - SECONDS))
if [ -d "$art" ] && [ "$left" -gt 30 ]; then
  timeout "$left" python3 -m inferneo_runtime.cli bench "$art" --device cuda --target torchscript-bf16 --runs 3 --json \
    > "$out/bench_cuda.json" 2> "$out/bench_cuda.log"
fi
exit $rc  # the device check's verdict
