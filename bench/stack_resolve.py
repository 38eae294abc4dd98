#!/usr/bin/env python3
"""Names the addresses `bench/stack_sample.py` printed, against the same unstripped binary:
for each sampled thread, the functions its instruction pointer was in and the most frequent
functions on its stack.

    python3 bench/stack_resolve.py stacks.txt target/release/kiln
"""
import bisect
import collections
import subprocess
import sys


def symbols(binary):
    out = subprocess.run(["nm", "-C", "--defined-only", binary], capture_output=True, text=True).stdout
    syms = []
    for line in out.splitlines():
        p = line.split(" ", 2)
        if len(p) == 3 and p[1] in "tTwW":
            syms.append((int(p[0], 16), p[2]))
    syms.sort()
    return [a for a, _ in syms], [n for _, n in syms]


def main():
    stacks, binary = sys.argv[1], sys.argv[2]
    addrs, names = symbols(binary)
    maps, samples = [], collections.defaultdict(list)
    for line in open(stacks):
        p = line.split()
        if p and p[0] == "map":
            maps.append((int(p[1], 16), int(p[2], 16), int(p[3], 16), p[4] if len(p) > 4 else "?"))
        elif p and p[0] == "sample":
            samples[p[1]].append([int(x, 16) for x in p[2:]])
    # A PIE binary's code mapping: its load bias is the mapping start minus the file offset.
    exe = [m for m in maps if binary.split("/")[-1] in m[3] or "kiln" in m[3]]

    def name(a):
        for lo, hi, off, path in maps:
            if lo <= a < hi:
                if (lo, hi, off, path) in exe:
                    v = a - lo + off
                    # text vaddr == file offset for the usual single-segment layout
                    i = bisect.bisect_right(addrs, v) - 1
                    return names[i][:150] if i >= 0 else f"kiln+{v:x}"
                return path.split("/")[-1]
        return f"{a:x}"

    for tid, rows in samples.items():
        print(f"thread {tid}: {len(rows)} samples")
        leaf = collections.Counter(name(r[0]) for r in rows)
        for n, c in leaf.most_common(8):
            print(f"  ip   {c:3d}  {n}")
        on_stack = collections.Counter()
        for r in rows:
            on_stack.update(set(name(a) for a in r[1:]))
        for n, c in on_stack.most_common(25):
            print(f"  stack {c:3d}  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
