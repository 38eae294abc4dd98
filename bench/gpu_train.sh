#!/usr/bin/env bash
# One call on the GPU machine (see ../shared/gpu/README.md; carry .devcarry and .whl):
# the fused-op checks on CUDA and Vulkan, kiln vs PyTorch + PEFT LoRA training, then batched
# sampling against transformers' generate.
#   bash bench/gpu_train.sh "qwen2.5-0.5b" "512,1024,2048"
set -o pipefail
source .devcarry/prelude.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
# Compiled kernels (PTX) and autotune results outlive the call: the directory is git-ignored, and
# ignored files stay on a warm device machine between calls.
export KILN_CACHE_DIR="$PWD/.kiln-cache" CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
if [ -z "$SKIP_FUSED" ]; then
  timeout 120 $KILN bench fused --device cuda --runs 3 2>&1 | tee $OUT/fused-cuda.txt | tail -25
  timeout 120 $KILN bench fused --device wgpu --runs 3 2>&1 | tee $OUT/fused-vulkan.txt | tail -3
fi
python3 bench/train_vs_peft.py --kiln $KILN --shapes "${1:-qwen2.5-0.5b,llama-3.2-1b}" --seqs "${2:-512,1024,2048}" \
  --steps ${STEPS:-8} --kiln-timeout ${KILN_TIMEOUT:-180} --out $OUT 2>&1 | tee $OUT/train_vs_peft.txt | grep -v '^{'
if [ -z "$SKIP_DECODE" ]; then
  python3 bench/decode_vs_hf.py --kiln $KILN --shape qwen2.5-0.5b --batch 8 --new-tokens 256 \
    --kiln-timeout ${KILN_TIMEOUT:-180} --out $OUT 2>&1 | tee $OUT/decode_vs_hf.txt | grep -v '^{'
fi
