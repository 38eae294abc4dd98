#!/usr/bin/env python3
"""PyTorch's dense matmul at the shapes `kiln bench matmul` times, for the same card in the same
run: 8192 rows through the Qwen2.5-0.5B and Llama-3.2-1B projections, forward x·W and
backward dy·Wᵀ, in f32 (TF32 allowed, as Burn uses it) and bf16 (cuBLAS).

    python3 bench/matmul_torch.py [--json]
"""
import json
import sys

import torch

ROWS = 8192
RANK = 16
SHAPES = [(896, 896), (896, 128), (896, 4864), (4864, 896), (2048, 2048), (2048, 8192), (8192, 2048)]


def tflops(f, flops, runs=10, queued=4):
    for _ in range(2):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(queued):
            f()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / queued)
    return flops / sorted(times)[len(times) // 2] / 1e12


def main():
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for k, n in SHAPES:
        row = dict(rows=ROWS, k=k, n=n)
        for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            x = torch.randn(ROWS, k, device="cuda", dtype=dtype)
            w = torch.randn(k, n, device="cuda", dtype=dtype)
            dy = torch.randn(ROWS, n, device="cuda", dtype=dtype)
            flops = 2.0 * ROWS * k * n
            row[f"{name}_fwd"] = tflops(lambda: x @ w, flops)
            row[f"{name}_bwd"] = tflops(lambda: dy @ w.t(), flops)
            # The rank-16 adapter products, microseconds each (autocast runs PEFT's in bf16).
            a = torch.randn(k, RANK, device="cuda", dtype=dtype)
            b = torch.randn(RANK, n, device="cuda", dtype=dtype)
            h = torch.randn(ROWS, RANK, device="cuda", dtype=dtype)
            for key, f in (("xa", lambda: x @ a), ("hb", lambda: h @ b), ("da", lambda: x.t() @ h), ("db", lambda: h.t() @ dy)):
                row[f"{name}_lora_{key}_us"] = 1.0 / tflops(f, 1e6)
        rows.append(row)
    if "--json" in sys.argv:
        print(json.dumps(dict(card=torch.cuda.get_device_name(), torch=torch.__version__, matmul=rows)))
        return
    print(f"torch {torch.__version__} dense matmul on {torch.cuda.get_device_name()}, {ROWS} rows: TFLOP/s (forward x·W, backward dy·Wᵀ)")
    for r in rows:
        print(f"  {r['k']:>5} -> {r['n']:<5}  f32 {r['f32_fwd']:7.1f} {r['f32_bwd']:7.1f}   bf16 {r['bf16_fwd']:7.1f} {r['bf16_bwd']:7.1f}")
    print(f"rank-{RANK} adapter products, microseconds each: x·A, h·B, dA = xᵀ·g, dB = hᵀ·dy (f32 | bf16)")
    for r in rows:
        cells = "  ".join(" ".join(f"{r[f'{d}_lora_{k}_us']:7.1f}" for k in ("xa", "hb", "da", "db")) for d in ("f32", "bf16"))
        print(f"  {r['k']:>5} -> {r['n']:<5}  {cells}")


if __name__ == "__main__":
    main()
