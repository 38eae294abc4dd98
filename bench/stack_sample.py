#!/usr/bin/env python3
"""Where a busy process spends its time, without gdb or perf: samples the busiest threads'
instruction pointers through ptrace, plus the words on their stacks that point into code
(return addresses, roughly the call chain). Prints the process's code mappings and the samples;
`bench/stack_resolve.py` names them against the same (unstripped) binary.

    python3 bench/stack_sample.py PID [--samples 20] [--threads 2] > stacks.txt
"""
import argparse
import ctypes
import os
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_GETREGS, PTRACE_ATTACH, PTRACE_DETACH = 12, 16, 17
FIELDS = ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
          "fs_base gs_base ds es fs gs").split()


class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in FIELDS]


def cpu_ticks(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])


def code_ranges(pid):
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            p = line.split()
            if len(p) >= 6 and "x" in p[1]:
                lo, hi = (int(x, 16) for x in p[0].split("-"))
                out.append((lo, hi, int(p[2], 16), p[5]))
    return out


def sample(pid, tid, ranges, mem, words):
    if libc.ptrace(PTRACE_ATTACH, tid, None, None) != 0:
        return None
    try:
        os.waitpid(tid, 0x40000000)  # __WALL
        regs = Regs()
        libc.ptrace(PTRACE_GETREGS, tid, None, ctypes.byref(regs))
        chain = []
        try:
            mem.seek(regs.rsp)
            data = mem.read(8 * words)
            for (w,) in struct.iter_unpack("<Q", data):
                if any(lo <= w < hi for lo, hi, _, _ in ranges):
                    chain.append(w)
        except OSError:
            pass
        return regs.rip, chain
    finally:
        libc.ptrace(PTRACE_DETACH, tid, None, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pid", type=int)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--words", type=int, default=512, help="stack words scanned per sample")
    args = ap.parse_args()
    pid = args.pid
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    before = {t: cpu_ticks(pid, t) for t in tids}
    time.sleep(1.0)
    busy = sorted(tids, key=lambda t: cpu_ticks(pid, t) - before[t], reverse=True)[: args.threads]
    ranges = code_ranges(pid)
    for lo, hi, off, path in ranges:
        print(f"map {lo:x} {hi:x} {off:x} {path}")
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for tid in busy:
            for _ in range(args.samples):
                got = sample(pid, tid, ranges, mem, args.words)
                if got:
                    rip, chain = got
                    print(f"sample {tid} {rip:x} " + " ".join(f"{a:x}" for a in chain[:40]))
                time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
