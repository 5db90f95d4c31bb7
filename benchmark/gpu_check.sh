#!/usr/bin/env bash
# Every GPU check in one command, on a machine with CUDA GPUs: `python -m pytest -m gpu -q -rs`.
#
#   bash benchmark/gpu_check.sh [OUT_DIR] [more pytest arguments]     # OUT_DIR: $OUT, else ./gpu_check
#
# Writes OUT_DIR/gpu_check.log (the GPUs and versions, then pytest's output) and OUT_DIR/gpu_check.xml
# (JUnit; each kernel case's errors and each numerics split are properties of its test case).
# NVLink multicast stays off. pytest is interrupted after GPU_CHECK_TIMEOUT seconds (default 520) so
# that it still reports what ran. Carried folders it installs first (benchmark/README.md, GPU checks):
#   .whl/   wheels, e.g. hydra-core, omegaconf, antlr4 (test modules import them at collection)
#   .fa4b/  FlashAttention-4's second half, the first stashed in /root/stash (../shared/device-fa4.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && [ "${1%.py}" = "$1" ] && [ "${1#tests}" = "$1" ]; then
  out=$1; shift
fi
mkdir -p "$out"
log=$out/gpu_check.log
: > "$log"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# FA4 keeps its compiled kernels on disk, so that each torchrun launch does not compile them again
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=${FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED:-1}
py=${PYTHON:-python3}
site=/tmp/site

wheels=()
if command -v nvidia-smi > /dev/null; then  # the GPU machine: the folders carried there
  if [ -d .whl ]; then wheels+=(.whl/*.whl); fi
  if [ -d .fa4b ] && [ ! -d "$site/flash_attn" ]; then
    if ls /root/stash/part* > /dev/null 2>&1; then
      mkdir -p /tmp/fa4w && cp .fa4b/*.whl /tmp/fa4w/ && cat /root/stash/part* .fa4b/part* > "/tmp/fa4w/$(cat .fa4b/LIBS_NAME)"
      wheels+=(/tmp/fa4w/*.whl)
    else
      echo "gpu_check: .fa4b came without its first half in /root/stash: no FA4 (benchmark/README.md)" | tee -a "$log"
    fi
  fi
fi
if [ ${#wheels[@]} -gt 0 ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${wheels[@]}" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_check: installing the carried wheels failed" | tee -a "$log"; exit 2; }
fi
if [ -d "$site" ]; then export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # lightning_sp, uninstalled

{
  if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; fi
  "$py" - <<'PY'
import importlib.util
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
for name in ("flash_attn.cute", "triton", "hydra"):
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    print(f"{name}: {'importable' if found else 'missing'}")
PY
} 2>&1 | tee -a "$log"

# a test module that cannot be imported is reported as an error; the GPU tests still run
timeout -s INT -k 30 "${GPU_CHECK_TIMEOUT:-520}" "$py" -m pytest -m gpu -q -rs -p no:cacheprovider \
  --durations=15 --continue-on-collection-errors --junitxml="$out/gpu_check.xml" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "gpu_check: pytest exit status $status" | tee -a "$log"
exit "$status"
