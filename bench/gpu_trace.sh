#!/usr/bin/env bash
# One call on the GPU machine (carry .devcarry, .whl and .kiln-cache.tar.xz): a non-blocking
# timeline (CUPTI, bench/cupti_trace.c) of kiln's training steps and of PyTorch + PEFT's on the
# same model and batch, each summarised by bench/timeline.py: GPU busy share, idle gaps, queue
# wait, launches per step and the kernels with the most GPU time.
#   bash bench/gpu_trace.sh [SHAPE=qwen2.5-0.5b] [SEQ=1024]
# DTYPE (bf16) is kiln's run.dtype; STEPS (6) the steps each side runs; KILN_TIMEOUT (300);
# SIDES ("kiln torch") which programs to trace; STACK_SAMPLES=N also samples the host thread of an
# untraced kiln run N times in its steady state (bench/stack_sample.py, to kiln-stacks.txt; name
# them with bench/stack_resolve.py against the unstripped binary that was sent).
set -o pipefail
source bench/device_env.sh >/dev/null
shape=${1:-qwen2.5-0.5b}; seq=${2:-1024}; steps=${STEPS:-6}

# CUPTI from the pip package PyTorch loads (one copy per process; PyTorch links it), else the
# toolkit's. Its headers must match the library: they name the newest activity records.
site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))')
inc=$(dirname "$(find $(for s in $site; do echo $s/nvidia; done) /usr/local/cuda/extras/CUPTI/include -name cupti.h 2>/dev/null | head -1)")
lib=$(find "$inc/../lib" "$inc/../lib64" -name 'libcupti.so*' 2>/dev/null | sort | head -1)
newest() { grep -ho "} $1[0-9]*;" "$inc"/cupti_activity.h | tr -d '}; ' | sort -uV | tail -1; }
echo "CUPTI: $lib ($(newest CUpti_ActivityKernel), $(newest CUpti_ActivityMemcpy))"
gcc -O2 -shared -fPIC -DKERNEL_T=$(newest CUpti_ActivityKernel) -DMEMCPY_T=$(newest CUpti_ActivityMemcpy) \
  -I"$inc" -I/usr/local/cuda/include bench/cupti_trace.c -o /tmp/libcupti_trace.so "$lib" -Wl,-rpath,"$(dirname "$lib")" || exit 1
trace() { KILN_TRACE=$1 CUDA_INJECTION64_PATH=/tmp/libcupti_trace.so "${@:2}"; }

recipe=/tmp/trace-$shape-$seq.toml
python3 bench/train_vs_peft.py --prepare $recipe --shapes $shape --seqs $seq --steps $steps --kiln-dtypes ${DTYPE:-bf16} 2>&1 | grep -v Writing
case " ${SIDES:-kiln torch} " in *" kiln "*)
trace /tmp/kiln.tsv timeout ${KILN_TIMEOUT:-300} $KILN bench train --recipe $recipe --steps $steps --json > $OUT/kiln-run.txt 2>&1 &
run=$!; sleep 1
# Which host threads are busy during the steps (the last lines are the steady state).
python3 bench/thread_cpu.py $(pgrep -n -f "bench train --recipe $recipe") --every 2 > $OUT/kiln-threads.txt 2>&1 &
wait $run; rc=$?; sleep 2
echo "kiln rc $rc (traced): $(tail -1 $OUT/kiln-run.txt | cut -c1-300)"
echo "busiest threads, last intervals:"; tail -4 $OUT/kiln-threads.txt
python3 bench/timeline.py /tmp/kiln.tsv --last 3 --top 40 | tee $OUT/kiln-timeline.txt
tar cJf $OUT/kiln-cache.part .kiln-cache 2>/dev/null && mv $OUT/kiln-cache.part $OUT/kiln-cache.tar.xz
# The raw timeline, for questions the summary does not answer.
gzip -1 < /tmp/kiln.tsv > $OUT/kiln-trace.tsv.gz
if [ -n "$STACK_SAMPLES" ]; then
  timeout ${KILN_TIMEOUT:-300} $KILN bench train --recipe $recipe --steps 80 --json > $OUT/kiln-sampled.txt 2>&1 &
  run=$!; sleep ${STACK_AFTER:-12}
  python3 bench/stack_sample.py $(pgrep -n -f "bench train --recipe $recipe") --samples $STACK_SAMPLES --threads 1 > $OUT/kiln-stacks.txt 2>&1
  wait $run; echo "sampled run: $(tail -1 $OUT/kiln-sampled.txt | grep -o '"tokens_per_s":[0-9.]*')"
fi ;;
esac
case " ${SIDES:-kiln torch} " in *" torch "*)
trace /tmp/torch.tsv python3 bench/train_vs_peft.py --torch-only --shapes $shape --seqs $seq --steps $steps --out /tmp > $OUT/torch-run.txt 2>&1
echo "torch rc $? (traced): $(grep '^{' $OUT/torch-run.txt | cut -c1-300)"
python3 bench/timeline.py /tmp/torch.tsv --last 3 --top 25 | tee $OUT/torch-timeline.txt ;;
esac
