#!/usr/bin/env bash
# One-shot GPU check (H200): SFT and GRPO steps of a random-weight Qwen2.5-VL-3B through vlm_post, timed.
#
# Run from the repository root on the GPU machine, with $OUT set (its files come back):
#     bash bench/gpu_check.sh
# The path measured is the one configs/geo3k/rl_qwen2_5_vl_7b.yaml runs: Lightning's ModelParallelStrategy with
# FSDP2 (model.fsdp: bf16 compute, fp32 reduction) over fp32 weights, precision 32-true; a stage that fails is
# re-run on a single device. Arguments are passed on to bench/gpu_step.py, e.g. SFT under FSDP1:
#     bash bench/gpu_check.sh --strategy fsdp1 --stages sft
# Needs, beside the tracked tree: .whl/ (wheels the machine lacks: transformers 5.24.0 as pinned here,
# huggingface_hub 1.33.0 for it, datasets 5.2.0 with dill and multiprocess, fsspec, jsonargparse) and
# artifacts/qwen2.5-vl-processor/ (tools/make_qwen_processor.py). Both are git-ignored: carry them.
# Writes $OUT/gpu_step.json (every figure, written after each stage) and $OUT/log.txt (this output).
# Expected wall time: about 4 minutes (an estimate, not yet measured); bench/gpu_step.py starts no new attempt
# after 400 s and `timeout` ends it at 480 s, so the JSON holds whatever finished.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Local rehearsal only (never needed on the GPU machine): WHEELS=<dir> SIZE=tiny NO_GPU=1 bash bench/gpu_check.sh
WHEELS=${WHEELS:-.whl} SIZE=${SIZE:-3b}
{
  date -u +"start %FT%TZ"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed"; exit 3; }
  if [ -z "${NO_GPU:-}" ]; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm,power.limit --format=csv
  fi
  python3 -c "import sys, torch, transformers, lightning, datasets, huggingface_hub, tokenizers, pyarrow, safetensors; \
print(sys.executable, sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'lightning', lightning.__version__, 'datasets', datasets.__version__, \
'hub', huggingface_hub.__version__, 'tokenizers', tokenizers.__version__, 'pyarrow', pyarrow.__version__, \
'safetensors', safetensors.__version__)"
  timeout --kill-after=15 480 python3 bench/gpu_step.py --size "$SIZE" --out "$OUT/gpu_step.json" --workdir /tmp/gpu "$@"
  status=$?
  date -u +"end %FT%TZ (gpu_step exit $status)"
  exit $status
} 2>&1 | tee "$OUT/log.txt"
