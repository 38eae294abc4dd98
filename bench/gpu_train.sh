#!/usr/bin/env bash
# One call on the GPU machine (see ../shared/gpu/README.md; carry .devcarry and .whl):
# kiln vs PyTorch + PEFT LoRA training, a timeline of one kiln run (bench/gpu_trace.sh), the fused-op checks
# on CUDA and Vulkan, then batched sampling against transformers' generate.
#   bash bench/gpu_train.sh "qwen2.5-0.5b" "512,1024,2048"
# SKIP_TRAIN, SKIP_FUSED, SKIP_DECODE, SKIP_PROFILE=1 leave a part out; ALSO_WITH="VAR=value" reruns
# kiln's bf16 recipes with that environment (KILN_NO_CUBLAS=1: Burn's matmul in place of cuBLAS;
# KILN_ATTENTION_KERNELS=1: the flash kernels in place of attention on cuBLAS;
# KILN_ATTENTION_TENSOR_CORES=forward|off: attention's backward on the products, or everything there), for a before/after
# in one call; STEPS, KILN_TIMEOUT tune the training runs;
# DTYPES (default bf16,f32) are the run.dtype values kiln trains with, each its own run.
set -o pipefail
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/card.txt
[ -z "$SKIP_TRAIN" ] && python3 bench/train_vs_peft.py --kiln $KILN --shapes "${1:-qwen2.5-0.5b,llama-3.2-1b}" --seqs "${2:-512,1024,2048}" \
  --steps ${STEPS:-8} --kiln-timeout ${KILN_TIMEOUT:-180} --kiln-dtypes ${DTYPES:-bf16,f32} --out $OUT 2>&1 | tee $OUT/train_vs_peft.txt | grep -v '^{'
if [ -n "$ALSO_WITH" ]; then
  for recipe in /tmp/kiln-bench-*/bench-*-bf16.toml; do
    echo "$ALSO_WITH $recipe"
    env $ALSO_WITH timeout ${KILN_TIMEOUT:-180} $KILN bench train --recipe $recipe --steps ${STEPS:-8} --json 2>&1 | tail -1 | tee -a $OUT/also-with.txt | cut -c1-400
  done
fi
tar cJf $OUT/kiln-cache.part .kiln-cache 2>/dev/null && mv $OUT/kiln-cache.part $OUT/kiln-cache.tar.xz; du -sh .kiln-cache 2>/dev/null | sed 's/^/kernel cache: /'
# A non-blocking timeline of one kiln run (CUPTI; CubeCL's own profiler blocks on every launch).
[ -z "$SKIP_PROFILE" ] && SIDES=kiln KILN_TIMEOUT=${PROFILE_TIMEOUT:-300} bash bench/gpu_trace.sh qwen2.5-0.5b 1024
if [ -z "$SKIP_FUSED" ]; then
  timeout ${FUSED_TIMEOUT:-120} $KILN bench fused --device cuda --runs 3 2>&1 | tee $OUT/fused-cuda.txt | tail -25
  timeout ${FUSED_TIMEOUT:-120} $KILN bench fused --device wgpu --runs 3 2>&1 | tee $OUT/fused-vulkan.txt | tail -3
fi
if [ -z "$SKIP_DECODE" ]; then
  python3 bench/decode_vs_hf.py --kiln $KILN --shape qwen2.5-0.5b --batch 8 --new-tokens 256 \
    --kiln-timeout ${KILN_TIMEOUT:-180} --out $OUT 2>&1 | tee $OUT/decode_vs_hf.txt | grep -v '^{'
fi
tar cJf $OUT/kiln-cache.part .kiln-cache 2>/dev/null && mv $OUT/kiln-cache.part $OUT/kiln-cache.tar.xz
# The device tool brings back at most 8 files: the summaries stay as they are, everything else
# (logs, the raw trace, JSON rows) travels in one archive.
(cd $OUT && rest=$(ls | grep -v -x -e card.txt -e train_vs_peft.txt -e kiln-timeline.txt -e decode_vs_hf.txt -e fused-cuda.txt -e kiln-cache.tar.xz) \
  && [ -n "$rest" ] && tar czf rest.tar.gz $rest && rm -f $rest)
