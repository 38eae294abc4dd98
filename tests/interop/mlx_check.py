"""Checks a kiln MLX export with MLX itself: every quantised weight must equal what
`mx.quantize` makes of the original weight, bit for bit, and `mx.dequantize` of it must stay
within half a quantisation step of the original. Prints one JSON line.

    mlx_check.py EXPORT_DIR ORIGINAL_DIR
"""
import json
import sys

import mlx.core as mx
import numpy as np


def main(export_dir, original_dir):
    config = json.load(open(f"{export_dir}/config.json"))
    q = config["quantization"]
    bits, group = q["bits"], q["group_size"]
    ours = mx.load(f"{export_dir}/model.safetensors")
    original = mx.load(f"{original_dir}/model.safetensors")
    checked, worst = 0, 0.0
    problems = []
    for name, w in original.items():
        base = name[: -len(".weight")]
        if f"{base}.scales" not in ours:
            if not mx.array_equal(ours[name], w.astype(ours[name].dtype)):
                problems.append(f"{name}: unquantised tensor changed")
            continue
        wq, s, b = mx.quantize(w, group_size=group, bits=bits)
        for part, theirs, mine in [("weight", wq, ours[name]), ("scales", s, ours[f"{base}.scales"]), ("biases", b, ours[f"{base}.biases"])]:
            if theirs.shape != mine.shape or not mx.array_equal(theirs, mine.astype(theirs.dtype)):
                problems.append(f"{name}: {part} differs from mx.quantize")
        back = mx.dequantize(ours[name], ours[f"{base}.scales"], ours[f"{base}.biases"], group_size=group, bits=bits)
        step = np.abs(np.array(ours[f"{base}.scales"], dtype=np.float32)).max()
        err = float(np.abs(np.array(back, dtype=np.float32) - np.array(w, dtype=np.float32)).max())
        worst = max(worst, float(err / step))
        checked += 1
    print(json.dumps({"quantized": checked, "worst_error_in_steps": worst, "problems": problems, "bits": bits, "group_size": group}))


if __name__ == "__main__":
    main(*sys.argv[1:])
