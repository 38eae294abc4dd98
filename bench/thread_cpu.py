#!/usr/bin/env python3
"""CPU use of a process's threads over time: which thread is the bottleneck when the GPU waits.

Every --every seconds until the process exits, prints one line with the busiest threads' share
of one core over that interval (from /proc/PID/task/*/stat), named as the kernel knows them.

    python3 bench/thread_cpu.py PID [--every 2] [--top 4]
"""
import argparse
import os
import time


def ticks(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
            name = head.split("(", 1)[1]
            fields = tail.split()
            out[tid] = (name, int(fields[11]) + int(fields[12]))  # utime + stime
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pid", type=int)
    ap.add_argument("--every", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args()
    hz = os.sysconf("SC_CLK_TCK")
    start = time.time()
    before = ticks(args.pid)
    while os.path.exists(f"/proc/{args.pid}"):
        time.sleep(args.every)
        try:
            now = ticks(args.pid)
        except FileNotFoundError:
            break
        busy = sorted(((now[t][1] - before.get(t, (None, 0))[1]) / hz / args.every, now[t][0], t) for t in now)
        line = "  ".join(f"{name}/{tid} {share:4.0%}" for share, name, tid in reversed(busy[-args.top:]))
        print(f"t={time.time() - start:5.0f}s  {line}", flush=True)
        before = now


if __name__ == "__main__":
    main()
