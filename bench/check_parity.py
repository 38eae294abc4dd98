#!/usr/bin/env python3
"""Runs `kiln forward` and `kiln generate` on every fixture on one device and compares with the
transformers references in tests/fixtures (the same checks as tests/parity.rs, through the
command line, for machines that have the binary but no Rust toolchain, such as the GPU box).

    python3 bench/check_parity.py --kiln $KILN --device cuda
"""
import argparse
import json
import os
import subprocess
import tempfile

import numpy as np
from safetensors.numpy import load_file

MODELS = ["llama", "llama-bf16", "mistral", "qwen2", "qwen3", "gemma3"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fixtures", default="tests/fixtures/models")
    args = ap.parse_args()
    worst = 0.0
    ok = True
    for m in MODELS:
        d = os.path.join(args.fixtures, m)
        ref = load_file(os.path.join(d, "reference.safetensors"))
        diffs = []
        for row in ref["input_ids"]:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "logits.safetensors")
                subprocess.run([args.kiln, "forward", "--model", d, "--device", args.device, "--ids",
                                ",".join(map(str, row)), "--out", out], check=True, capture_output=True)
                got = load_file(out)["logits"][0]
            diffs.append(np.abs(got.astype(np.float64) - ref["logits_f64"][len(diffs)]).max())
        prompt = ref["greedy_prompt"][0]
        want = ref["greedy_ids"][0][len(prompt):].tolist()
        r = subprocess.run([args.kiln, "generate", "--model", d, "--device", args.device, "--prompt-ids",
                            ",".join(map(str, prompt)), "--max-new-tokens", str(len(want)), "--temperature", "0",
                            "--ignore-eos", "--json"], check=True, capture_output=True, text=True)
        got_ids = json.loads(r.stdout.strip().splitlines()[-1])["ids"]
        diff = max(diffs)
        worst = max(worst, diff)
        same = got_ids == want
        ok &= same
        print(f"{m:12} max|Δlogit| vs f64 = {diff:.3e}   greedy ids {'identical' if same else 'DIFFER'}")
    print(f"worst max|Δlogit| on {args.device}: {worst:.3e}; greedy {'all identical' if ok else 'MISMATCH'}")


if __name__ == "__main__":
    main()
