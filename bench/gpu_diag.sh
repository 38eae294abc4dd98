#!/usr/bin/env bash
# Where a kiln training run on the GPU spends its first minutes: kiln's phase log, kernel
# compilations over time (CubeCL's compilation log), which threads are busy, and samples of the
# busiest threads' stacks (bench/stack_sample.py; name them here with bench/stack_resolve.py
# against the same unstripped binary).
#   bash bench/gpu_diag.sh [DEVICE=cuda] [SECONDS=180] [BATCH=8] [SEQ=1024]
source bench/device_env.sh >/dev/null
device=${1:-cuda}; secs=${2:-180}; batch=${3:-8}; seq=${4:-1024}
python3 bench/train_vs_peft.py --prepare /tmp/diag.toml --device $device --shapes qwen2.5-0.5b --seqs $seq \
  --tokens $((batch * seq)) --steps 8 2>&1 | grep -v Writing
echo "tools: $(which gdb eu-stack nsys 2>/dev/null | tr '\n' ' ')"
KILN_LOG=debug CUBECL_DEBUG_LOG=/tmp/c.log timeout $secs $KILN bench train --recipe /tmp/diag.toml --steps 6 --json > $OUT/diag-run.txt 2>&1 &
p=$!; sleep 1; pid=$(pgrep -n -f "bench train --recipe /tmp/diag.toml")
for i in $(seq 1 $(( secs / 10 ))); do
  sleep 10
  kill -0 $p 2>/dev/null || break
  busy=$(top -b -n1 -H -p $pid 2>/dev/null | awk 'NR>7 && $9>5 {printf "%s:%s%% ", $12, $9}')
  echo "t=$((i*10))s compiled $(grep -c START_KERNEL_COMPILATION /tmp/c.log 2>/dev/null) | busy threads: $busy| $(tail -1 $OUT/diag-run.txt | cut -c1-150)"
  if [ $i -eq 4 ] || [ $i -eq 12 ]; then
    python3 bench/stack_sample.py $pid --samples 15 --threads 3 > $OUT/stacks-$((i*10))s.txt 2>&1
  fi
done
wait $p; echo "rc $?"
tail -5 $OUT/diag-run.txt | cut -c1-400
grep -o "name: [a-zA-Z_:]*" /tmp/c.log | sort | uniq -c | sort -rn | head -8
