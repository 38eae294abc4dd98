#!/usr/bin/env python3
"""Reads a CUPTI timeline (bench/cupti_trace.c) and says where a training step's time goes.

A training step launches the same kernels in the same order every time, so the step is found
as the trace's period: the largest constant spacing (in launches) between the last --last + 1
launches of some kernel that runs once a step; those launches cut the steps. Over the last
--last steps it reports:
  - GPU busy: the union of kernel intervals over wall time (idle = the GPU waited);
  - idle gaps between kernels by length: many short gaps mean launch overhead, a few long
    ones mean the host stalled;
  - queue wait: how long a launched kernel waited before it started (kernel start - end of
    its launch call). Near zero: the GPU drains the queue faster than the host fills it
    (host-bound). Large: the host runs ahead (GPU-bound);
  - host: driver calls per step and the launching thread's time between launches;
  - the kernels with the most GPU time.

    python3 bench/timeline.py kiln.tsv [--last 3] [--top 30]
"""
import argparse
import collections
import statistics
import sys


def load(path):
    kernels, copies, api, dropped = [], [], {}, 0
    with open(path, errors="replace") as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if p[0] == "K" and len(p) >= 6:
                kernels.append((int(p[1]), int(p[2]), int(p[3]), "\t".join(p[5:])))
            elif p[0] == "C" and len(p) >= 6:
                copies.append((int(p[1]), int(p[2]), int(p[4]), int(p[5])))
            elif p[0] == "A" and len(p) >= 6:
                api[int(p[3])] = (int(p[1]), int(p[2]), int(p[4]), p[5])
            elif p[0] == "D":
                dropped += int(p[1])
    kernels.sort()
    copies.sort()
    return kernels, copies, api, dropped


def step_starts(kernels, last):
    """Indices of the launches that begin the last `last` steps, and one past them."""
    occurrences = collections.defaultdict(list)
    for i, k in enumerate(kernels):
        occurrences[k[3]].append(i)
    best = None
    for idx in occurrences.values():
        if len(idx) > last:
            tail = idx[-(last + 1):]
            gaps = {b - a for a, b in zip(tail, tail[1:])}
            if len(gaps) == 1 and (best is None or tail[1] - tail[0] > best[1] - best[0]):
                best = tail
    return best


def short(name, width=90):
    return name if len(name) <= width else name[: width - 1] + "…"


def busy_and_gaps(ks, t0, t1):
    """Union of kernel intervals inside [t0, t1] and the idle gaps between them."""
    busy, gaps, cur_s, cur_e = 0, [], None, None
    for s, e, *_ in ks:
        s, e = max(s, t0), min(e, t1)
        if e <= s:
            continue
        if cur_e is None:
            gaps.append(s - t0)
            cur_s, cur_e = s, e
        elif s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
        gaps.append(t1 - cur_e)
    return busy, gaps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--last", type=int, default=3, help="steps to summarise, counted from the end")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    kernels, copies, api, dropped = load(args.trace)
    if not kernels:
        sys.exit(f"{args.trace}: no kernel records")
    print(f"{args.trace}: {len(kernels)} kernels, {len(copies)} copies, {len(api)} driver calls, {dropped} records dropped")
    starts = step_starts(kernels, args.last)
    if starts is None:
        sys.exit(f"no kernel repeats at a constant spacing over {args.last + 1} launches: no steps found")
    print(f"step: {starts[1] - starts[0]} launches, begins with {short(kernels[starts[0]][3], 60)}; "
          "steps (ms): " + " ".join(f"{(kernels[b][0] - kernels[a][0]) / 1e6:.1f}" for a, b in zip(starts, starts[1:])))
    t0, t1 = kernels[starts[0]][0], kernels[starts[-1]][0]
    n = len(starts) - 1
    wall = (t1 - t0) / n
    ks = [k for k in kernels if k[1] > t0 and k[0] < t1]
    busy, gaps = busy_and_gaps(ks, t0, t1)
    print(f"\nlast {n} steps: {wall / 1e6:.1f} ms/step, {len(ks) / n:.0f} kernels/step, "
          f"GPU busy {busy / n / 1e6:.1f} ms/step ({100 * busy / (t1 - t0):.1f} %), idle {(t1 - t0 - busy) / n / 1e6:.1f} ms/step")
    buckets = [(2e3, "< 2 µs"), (1e4, "2–10 µs"), (1e5, "10–100 µs"), (1e6, "0.1–1 ms"), (float("inf"), "> 1 ms")]
    counts, sums = collections.Counter(), collections.Counter()
    for g in gaps:
        label = next(lbl for lim, lbl in buckets if g < lim)
        counts[label] += 1
        sums[label] += g
    print("idle gaps: " + ", ".join(f"{lbl}: {counts[lbl] / n:.0f}/step {sums[lbl] / n / 1e6:.1f} ms" for _, lbl in buckets))
    waits = [k[0] - api[k[2]][1] for k in ks if k[2] in api]
    if waits:
        q = statistics.quantiles(waits, n=10)
        print(f"queue wait (kernel start - launch call end): p10 {q[0] / 1e3:.1f} µs, median {statistics.median(waits) / 1e3:.1f} µs, p90 {q[-1] / 1e3:.1f} µs")
    calls = [a for a in api.values() if a[1] > t0 and a[0] < t1]
    launches = sorted(api[k[2]] for k in ks if k[2] in api)
    if launches:
        threads = collections.Counter(a[2] for a in launches)
        tid = threads.most_common(1)[0][0]
        mine = [a for a in launches if a[2] == tid]
        between = [b[0] - a[0] for a, b in zip(mine, mine[1:])]
        in_call = sum(a[1] - a[0] for a in mine)
        print(f"host: {len(calls) / n:.0f} driver calls/step; launching thread {tid}: {len(mine) / n:.0f} launches/step, "
              f"median {statistics.median(between) / 1e3:.1f} µs between launches, {in_call / n / 1e6:.1f} ms/step inside launch calls")
    if calls:
        spent = collections.Counter()
        for a in calls:
            spent[a[3]] += a[1] - a[0]
        print("host time in driver calls, ms/step: " + ", ".join(f"{c} {t / n / 1e6:.1f}" for c, t in spent.most_common(6)))
    # The long idle gaps of the last step, where they fall and what the host called meanwhile.
    first = kernels[starts[-2]][0]
    last_step = kernels[starts[-2]:starts[-1] + 1]  # and the next step's first launch
    for before, after in zip(last_step, last_step[1:]):
        if after[0] - before[1] > 5e5:
            during = collections.Counter(a[3] for a in calls if before[1] <= a[0] < after[0])
            print(f"gap {(after[0] - before[1]) / 1e6:5.1f} ms at {(before[1] - first) / 1e6:6.1f} ms into the step, "
                  f"after {short(before[3], 40)}, before {short(after[3], 40)}; driver calls: "
                  + (", ".join(f"{c} ×{m}" for c, m in during.most_common(4)) or "none"))
    by_name = collections.defaultdict(lambda: [0, 0])
    for s, e, _, name in ks:
        by_name[name][0] += e - s
        by_name[name][1] += 1
    total = sum(v[0] for v in by_name.values())
    print(f"\n{'ms/step':>8} {'share':>6} {'calls':>6} {'mean µs':>8}  kernel")
    for name, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{t / n / 1e6:8.2f} {100 * t / total:5.1f}% {c / n:6.0f} {t / c / 1e3:8.1f}  {short(name)}")


if __name__ == "__main__":
    main()
