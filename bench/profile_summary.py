#!/usr/bin/env python3
"""Sums CubeCL's per-kernel GPU times by kernel name: which kernels a kiln run spends its time in.

CubeCL times every kernel launch when its profiling logger is on (a `cubecl.toml` in the working
directory with `[profiling.logger] level = "basic"` and a `file`); each launch then becomes a
line `| 1.234ms    | kernel name`. Launches turn blocking while profiled, so the total is GPU
time, not the step time of an unprofiled run, and the shares are distorted too (each launch
carries a synchronisation): on CUDA, bench/gpu_trace.sh's CUPTI timeline is the one to trust;
this remains for wgpu, which CUPTI does not see.

    python3 bench/profile_summary.py profile.log [--top 30]
"""
import argparse
import collections
import re
import sys

LINE = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")
UNIT = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
# Generic arguments that every matmul variant's name repeats; the rest tells the variants apart.
NOISE = re.compile(r"^(Dynamic\w*|__\w+|Option|\(\)|TensorArgs|\w+Runtime)$")


def short(name):
    return " | ".join(t for t in name.split(" | ") if not NOISE.match(t))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    total = collections.Counter()
    count = collections.Counter()
    with open(args.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                name = short(m.group(3))
                total[name] += float(m.group(1)) * UNIT[m.group(2)]
                count[name] += 1
    if not total:
        print(f"{args.log}: no profiled kernel lines", file=sys.stderr)
        return 1
    all_s = sum(total.values())
    print(f"{sum(count.values())} kernel launches, {all_s:.3f} s of GPU time, {len(total)} distinct kernels")
    print(f"{'share':>7} {'seconds':>9} {'launches':>9}  kernel")
    for name, s in total.most_common(args.top):
        print(f"{100 * s / all_s:6.1f}% {s:9.4f} {count[name]:9d}  {name[:220]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
