#!/usr/bin/env python3
"""Batched sampling (GRPO rollouts) on a GPU: kiln against transformers' `generate`, same model,
same card, one run.

The model is the random-weight shape `train_vs_peft.py` creates (saved once, bf16). One prompt of
P tokens, B rows sampled side by side for N new tokens each (temperature 1, top-k 50, no stop
token, so every row runs the full N), prefill included in the time. transformers runs eager in
bf16 with its KV cache (`generate(do_sample=True, min_new_tokens=N)`); kiln runs
`kiln bench sample --json` (f32 weights, KV cache, host-side sampling).

    python3 bench/decode_vs_hf.py --kiln $KILN --shape qwen2.5-0.5b --batch 8 --new-tokens 256
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_vs_peft import SHAPES, make_model  # noqa: E402


def hf_sample(path, batch, prompt_len, new_tokens, runs):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.vocab_size
    # The prompt kiln's bench uses: token i is (i * 2654435761 >> 7) mod vocab.
    prompt = [((i * 2654435761) % 2**32 >> 7) % vocab for i in range(prompt_len)]
    ids = torch.tensor([prompt] * batch, device="cuda")
    times = []
    for run in range(runs + 1):
        torch.manual_seed(run)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=50,
                                 top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        torch.cuda.synchronize()
        if run > 0:
            times.append(time.perf_counter() - t)
        assert out.shape == (batch, prompt_len + new_tokens), out.shape
    peak = torch.cuda.max_memory_allocated()
    del model
    torch.cuda.empty_cache()
    return {"tokens_per_s": batch * new_tokens / statistics.median(times), "peak_bytes": peak}


def kiln_sample(kiln, path, device, batch, prompt_len, new_tokens, runs, log, timeout):
    cmd = [kiln, "bench", "sample", "--model", path, "--device", device, "--batch", str(batch),
           "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--runs", str(runs), "--json"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        with open(log, "w") as f:
            f.write((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        return {"error": f"timed out after {timeout} s"}
    with open(log, "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    row = json.loads(p.stdout.strip().splitlines()[-1])["results"][0]
    return {"tokens_per_s": row["sample_tokens_per_s"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=None, help="kiln binary; left out: transformers only")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kiln-timeout", type=int, default=300)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    path = os.path.join("/tmp", f"kiln-bench-{a.shape}")
    make_model(a.shape, path)
    hf = hf_sample(path, a.batch, a.prompt_len, a.new_tokens, a.runs)
    row = {"shape": a.shape, "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "transformers": hf}
    print(f"{a.shape} sampling {a.batch} x {a.new_tokens} (prompt {a.prompt_len}): transformers generate "
          f"{hf['tokens_per_s']:.0f} tokens/s", flush=True)
    if a.kiln:
        k = kiln_sample(a.kiln, path, a.device, a.batch, a.prompt_len, a.new_tokens, a.runs,
                        os.path.join(a.out, f"kiln-sample-{a.shape}.log"), a.kiln_timeout)
        row["kiln"] = k
        if "tokens_per_s" in k:
            print(f"  kiln {k['tokens_per_s']:.0f} tokens/s = {k['tokens_per_s'] / hf['tokens_per_s']:.2f}x transformers", flush=True)
        else:
            print(f"  kiln: {k['error']}", flush=True)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
