#!/usr/bin/env bash
# One call on the GPU machine (carry .devcarry, .whl, .kiln-cache.tar.xz): attention's checks on
# CUDA, then kiln's training step on one shape under each attention setting, and a timeline of
# the first setting given. For A/B work on the attention kernels, without PyTorch.
#   bash bench/attention_ab.sh [SHAPE=llama-3.2-1b] [SEQ=1024] ["ENV1" "ENV2" ...]
# Each ENV is one run's environment ("X=1" for none); TRACE=0 skips the timeline, CHECKS=0 the checks;
# ONLY="attention,lm_head_loss" picks the checks (comma-separated); NCU="kernel regex" profiles three launches of those kernels (Nsight Compute, first ENV) into ncu.txt.
set -o pipefail
source bench/device_env.sh >/dev/null 2>&1
shape=${1:-llama-3.2-1b}; seq=${2:-1024}; shift 2 2>/dev/null
[ $# -eq 0 ] && set -- "X=1" "KILN_ATTENTION_TENSOR_CORES=forward" "KILN_ATTENTION_TENSOR_CORES=off"
if [ "${CHECKS:-1}" = 1 ]; then
  timeout ${FUSED_TIMEOUT:-200} $KILN bench fused --device cuda --runs 2 --only ${ONLY:-attention} 2>&1 | tail -${FUSED_LINES:-14} | tee $OUT/fused.txt
fi
recipe=/tmp/ab-$shape-$seq.toml
python3 bench/train_vs_peft.py --prepare $recipe --shapes $shape --seqs $seq --steps ${STEPS:-6} --kiln-dtypes bf16 2>&1 | grep -v Writing
for e in "$@"; do
  echo "$shape $seq $e" | tee -a $OUT/train.txt
  env $e timeout ${KILN_TIMEOUT:-150} $KILN bench train --recipe $recipe --steps ${STEPS:-6} --json 2>&1 | tail -1 \
    | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print(int(r["tokens_per_s"]), round(r["step_s"],4), r["peak_bytes"], [round(x,4) for x in r.get("losses",[])], r.get("tensor_core_attention"))' 2>&1 | tee -a $OUT/train.txt
done
if [ "${TRACE:-1}" = 1 ]; then
  env $1 SIDES=kiln KILN_TIMEOUT=200 bash bench/gpu_trace.sh $shape $seq > /dev/null 2>&1
  head -45 $OUT/kiln-timeline.txt; rm -f $OUT/kiln-trace.tsv.gz $OUT/kiln-run.txt $OUT/kiln-threads.txt
fi
if [ -n "$NCU" ]; then
  ncu=$(ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  env $1 timeout ${NCU_TIMEOUT:-300} $ncu --kernel-name "regex:$NCU" --launch-skip ${NCU_SKIP:-6} --launch-count ${NCU_COUNT:-3} \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section InstructionStats $KILN bench train --recipe $recipe --steps 3 > $OUT/ncu.txt 2>&1
  echo "ncu rc $?: $(grep -c '==PROF==' $OUT/ncu.txt) notes"; grep -E "^  [a-z_]+kernel|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Stall" $OUT/ncu.txt | head -60
fi
tar cJf $OUT/kiln-cache.part .kiln-cache 2>/dev/null && mv $OUT/kiln-cache.part $OUT/kiln-cache.tar.xz
