#!/usr/bin/env bash
# One call on the GPU machine (see ../shared/gpu/README.md; carry .devcarry and .whl):
# the fused-op checks on CUDA and Vulkan, then kiln vs PyTorch + PEFT LoRA training.
#   bash bench/gpu_train.sh "qwen2.5-0.5b" "512,1024,2048"
set -o pipefail
source .devcarry/prelude.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
if [ -z "$SKIP_FUSED" ]; then
  timeout 120 $KILN bench fused --device cuda --runs 3 2>&1 | tee $OUT/fused-cuda.txt | tail -14
  timeout 120 $KILN bench fused --device wgpu --runs 3 2>&1 | tee $OUT/fused-vulkan.txt | tail -3
fi
python3 bench/train_vs_peft.py --kiln $KILN --shapes "${1:-qwen2.5-0.5b,llama-3.2-1b}" --seqs "${2:-512,1024,2048}" \
  --steps ${STEPS:-8} --kiln-timeout ${KILN_TIMEOUT:-180} --out $OUT 2>&1 | tee $OUT/train_vs_peft.txt | grep -v '^{'
