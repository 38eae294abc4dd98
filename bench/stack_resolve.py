#!/usr/bin/env python3
"""Names the addresses `bench/stack_sample.py` printed, against the same unstripped binary:
for each sampled thread, the functions its instruction pointer was in and the most frequent
functions on its stack. A binary built with line tables (`CARGO_PROFILE_RELEASE_DEBUG=
line-tables-only`) also gets each instruction pointer's chain of inlined calls from `addr2line`,
which is what tells code inlined into a big loop (CubeCL's device thread) apart.

    python3 bench/stack_resolve.py stacks.txt target/release/kiln
"""
import bisect
import collections
import re
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

    def to_file(a):
        for lo, hi, off, path in exe:
            if lo <= a < hi:
                return a - lo + off
        return None

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

    inlined = inline_chains(binary, [to_file(r[0]) for rows in samples.values() for r in rows])

    for tid, rows in samples.items():
        print(f"thread {tid}: {len(rows)} samples")
        leaf = collections.Counter(name(r[0]) for r in rows)
        for n, c in leaf.most_common(8):
            print(f"  ip   {c:3d}  {n}")
        chains = [inlined.get(to_file(r[0])) for r in rows]
        if any(chains):
            within = collections.Counter()
            for c in chains:
                within.update(set(c or []))
            for n, c in within.most_common(40):
                print(f"  inl  {c:3d}  {n}")
            for c, n in collections.Counter(" < ".join(c[:4]) for c in chains if c).most_common(15):
                print(f"  leaf {n:3d}  {c[:400]}")
        on_stack = collections.Counter()
        for r in rows:
            on_stack.update(set(name(a) for a in r[1:]))
        for n, c in on_stack.most_common(25):
            print(f"  stack {c:3d}  {n}")
    return 0


def inline_chains(binary, file_addrs):
    """`{address: [innermost function, its caller, ...]}` from the binary's line tables (empty
    without them)."""
    wanted = sorted({a for a in file_addrs if a is not None})
    if not wanted:
        return {}
    out = subprocess.run(["addr2line", "-f", "-i", "-C", "-a", "-e", binary] + [f"{a:x}" for a in wanted],
                         capture_output=True, text=True).stdout.splitlines()
    chains, current, i = {}, None, 0
    while i < len(out):
        line = out[i]
        if line.startswith("0x"):
            current = int(line, 16)
            chains[current] = []
            i += 1
            continue
        if current is not None and line != "??":
            short = re.sub(r"<[^<>]*(<[^<>]*(<[^<>]*>[^<>]*)*>[^<>]*)*>", "<>", line)
            chains[current].append(short[:160])
        i += 2  # function, then file:line
    return {a: c for a, c in chains.items() if c}


if __name__ == "__main__":
    sys.exit(main())
