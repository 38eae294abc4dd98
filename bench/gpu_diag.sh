#!/usr/bin/env bash
# Why kiln's CUDA path is slow: kernel compilations over time for `bench fused`, and kiln's
# training on the same card through Vulkan (wgpu) instead.
source .devcarry/prelude.sh >/dev/null
export PYTHONUNBUFFERED=1
( CUBECL_AUTOTUNE_LEVEL=minimal CUBECL_DEBUG_LOG=/tmp/c.log timeout ${T1:-150} $KILN bench fused --device cuda --runs 1 > $OUT/fused-cuda.txt 2>&1 ) &
p=$!; for i in $(seq 1 $(( ${T1:-150} / 15 ))); do sleep 15; echo "t=$((i*15))s compiled $(grep -c START_KERNEL_COMPILATION /tmp/c.log 2>/dev/null) kernels, autotune lines $(grep -ci autotun /tmp/c.log 2>/dev/null)"; kill -0 $p 2>/dev/null || break; done; wait $p
tail -4 $OUT/fused-cuda.txt
grep -o "name: [a-zA-Z_:]*" /tmp/c.log | sort | uniq -c | sort -rn | head -8
python3 -c "
import sys; sys.path.insert(0,'bench'); import train_vs_peft as t
t.make_model('qwen2.5-0.5b', '/tmp/kiln-bench-qwen2.5-0.5b')
t.write_recipe('/tmp/kiln-bench-qwen2.5-0.5b','wgpu',${B:-16},${S:-512},8,'/tmp/w.toml','')" 2>&1 | grep -v Writing
$KILN plan /tmp/w.toml --memory-gib 79.6
timeout ${T2:-300} $KILN bench train --recipe /tmp/w.toml --steps 6 --json 2>&1 | tail -3
