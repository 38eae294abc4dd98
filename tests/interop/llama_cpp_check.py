"""Runs a kiln-exported GGUF in llama.cpp (llama-cpp-python) and compares with the
transformers reference of a fixture model.

    python3 llama_cpp_check.py FILE.gguf FIXTURE_DIR [--tol 1e-2]

Prints one JSON line: {"max_abs_diff": ..., "greedy_equal": ..., ...}; exit code 1 when a
check fails. Logits are compared for every position of every reference input row.
"""
import argparse
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("fixture")
    ap.add_argument("--tol", type=float, default=1e-2)
    args = ap.parse_args()

    import llama_cpp

    ref = load_file(f"{args.fixture}/reference.safetensors")
    input_ids = ref["input_ids"].astype(np.int64)
    logits_ref = ref["logits"].astype(np.float32)
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    worst = 0.0
    for row in range(input_ids.shape[0]):
        llm.reset()
        llm.eval(input_ids[row].tolist())
        got = np.array(llm.scores[: input_ids.shape[1]], dtype=np.float32)
        worst = max(worst, float(np.abs(got - logits_ref[row]).max()))

    prompt = ref["greedy_prompt"][0].tolist()
    expected = ref["greedy_ids"][0].tolist()
    llm.reset()
    out = list(prompt)
    llm.eval(prompt)
    while len(out) < len(expected):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    result = {
        "max_abs_diff": worst,
        "greedy_equal": out == expected,
        "greedy": out,
        "expected": expected,
        "n_vocab": llm.n_vocab(),
    }
    print(json.dumps(result))
    sys.exit(0 if worst <= args.tol and out == expected else 1)


if __name__ == "__main__":
    main()
