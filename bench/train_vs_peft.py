#!/usr/bin/env python3
"""LoRA training on a GPU: kiln against PyTorch + PEFT, same geometry, same card, one run.

Models are random-weight Qwen2.5-0.5B and Llama-3.2-1B shapes created on the device with
transformers (bf16) and saved once, so kiln trains the very same weights. Both sides: LoRA
rank 16, alpha 32, on all seven projections, AdamW (lr 1e-4), gradient clipping at 1.0,
batch B x S tokens, every position a target. PyTorch runs eager, base weights bf16, LoRA
parameters f32 (PEFT's default upcast), under bf16 autocast, attention through SDPA.
kiln runs `kiln bench train --json` on a recipe this script writes (packed rows of
datasets/arith, tokenised with the small fixture tokenizer, so every row is S real tokens).

Reported per configuration: tokens/s (median step after warm-up), peak GPU memory (torch:
max_memory_allocated; kiln: its `peak_bytes`), and MFU against the card's dense bf16 peak,
with the same model-FLOPs count for both sides:
    flops/token = 4 * N_linear                 (forward 2N, backward dX 2N; frozen W has no dW)
                + 12 * layers * S * heads * head_dim   (QK^T and PV: forward 2+2, backward 4+4)
N_linear counts every projection and the LM head; LoRA's own FLOPs (<1 %) are left out.

    python3 bench/train_vs_peft.py --kiln $KILN --shapes qwen2.5-0.5b,llama-3.2-1b --seqs 512,1024,2048
    python3 bench/train_vs_peft.py --torch-only --shapes qwen2.5-0.5b --seqs 1024
    python3 bench/train_vs_peft.py --prepare /tmp/r.toml --shapes qwen2.5-0.5b --seqs 1024   # model + recipe only
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H100_BF16_DENSE = 989e12  # H100 SXM dense bf16 tensor-core peak, FLOP/s

SHAPES = {
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=32768),
    "llama-3.2-1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def make_model(shape, path):
    """Random weights created on the GPU, saved as bf16 safetensors with the fixture tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if os.path.exists(os.path.join(path, "config.json")):
        return
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    cfg = (Qwen2Config if arch == "qwen2" else LlamaConfig)(bos_token_id=1, eos_token_id=2, **spec)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(ROOT, "tests/fixtures/models/llama", f), os.path.join(path, f))
    del model
    torch.cuda.empty_cache()


def flops_per_token(shape, seq):
    s = SHAPES[shape]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    heads, kv = s["num_attention_heads"], s["num_key_value_heads"]
    hd = s.get("head_dim", h // heads)
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter
    n_linear = layers * per_layer + h * s["vocab_size"]
    return 4 * n_linear + 12 * layers * seq * heads * hd


def torch_train(path, batch, seq, steps):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        ids = torch.randint(0, 384, (batch, seq), generator=g).cuda()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    del model, opt
    torch.cuda.empty_cache()
    step_s = statistics.median(times)
    return dict(tokens_per_s=batch * seq / step_s, step_s=step_s, peak_bytes=peak, peak_reserved_bytes=reserved)


def write_recipe(model_dir, device, batch, seq, steps, path, extra, dtype="f32"):
    data = os.path.join(ROOT, "datasets/arith")
    with open(path, "w") as f:
        f.write(f"""method = "lora"
[run]
name = "bench-train"
device = "{device}"
dtype = "{dtype}"
[model]
path = "{model_dir}"
{extra}
[data]
train = "{data}/train.jsonl"
valid = "{data}/valid.jsonl"
max_seq_len = {seq}
packing = true
train_on = "all"
[lora]
rank = 16
alpha = 32
targets = ["all-linear"]
[train]
steps = {steps}
batch_size = {batch}
learning_rate = 1e-4
max_grad_norm = 1.0
""")


def kiln_train(kiln, model_dir, device, batch, seq, steps, extra, log, timeout, dtype):
    recipe = os.path.join(model_dir, f"bench-{batch}x{seq}-{dtype}.toml")
    write_recipe(model_dir, device, batch, seq, steps, recipe, extra, dtype)
    cmd = [kiln, "bench", "train", "--recipe", recipe, "--steps", str(steps), "--json"]
    plan = subprocess.run([kiln, "plan", recipe, "--json"], capture_output=True, text=True)
    predicted = None
    if plan.returncode == 0 and plan.stdout.strip():
        predicted = json.loads(plan.stdout.strip().splitlines()[-1])
    t = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write(f"$ {' '.join(cmd)}  (timed out after {timeout} s)\n{(e.stderr or b'')[-4000:]}\n")
        return dict(error=f"timed out after {timeout} s", plan_peak_bytes=predicted and predicted.get("peak_bytes"))
    log.write(f"$ {' '.join(cmd)}  ({time.time() - t:.0f} s, rc {r.returncode})\n{r.stdout}\n{r.stderr[-4000:]}\n")
    log.flush()
    if r.returncode != 0:
        return dict(error=r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}",
                    plan_peak_bytes=predicted and predicted.get("peak_bytes"))
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if predicted is not None:
        out["plan_peak_bytes"] = predicted.get("peak_bytes")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=None, help="kiln binary; left out with --torch-only")
    ap.add_argument("--torch-only", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,llama-3.2-1b")
    ap.add_argument("--seqs", default="512,1024,2048")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step; batch = tokens / seq")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--kiln-dtypes", default="bf16,f32", help="run.dtype values kiln trains with, each its own run")
    ap.add_argument("--kiln-extra", default="", help="extra lines for the recipe's [model] table")
    ap.add_argument("--kiln-timeout", type=int, default=240, help="seconds one kiln bench may take")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--prepare", metavar="RECIPE", help="only save the first shape's model and write a kiln "
                    "recipe for it at the first sequence length to RECIPE, then stop")
    args = ap.parse_args()
    if args.prepare:
        shape, seq = args.shapes.split(",")[0], int(args.seqs.split(",")[0])
        model_dir = f"/tmp/kiln-bench-{shape}"
        make_model(shape, model_dir)
        write_recipe(model_dir, args.device, max(1, args.tokens // seq), seq, args.steps, args.prepare, args.kiln_extra,
                     args.kiln_dtypes.split(",")[0])
        return 0

    import torch
    import peft
    import transformers
    card = torch.cuda.get_device_name()
    print(f"card {card}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}", flush=True)
    rows = []
    log = open(os.path.join(args.out, "kiln-train.log"), "a")
    for shape in args.shapes.split(","):
        model_dir = f"/tmp/kiln-bench-{shape}"
        make_model(shape, model_dir)
        for seq in map(int, args.seqs.split(",")):
            batch = max(1, args.tokens // seq)
            row = dict(shape=shape, seq=seq, batch=batch, flops_per_token=flops_per_token(shape, seq))
            row["torch"] = torch_train(model_dir, batch, seq, args.steps)
            dtypes = [] if args.torch_only else args.kiln_dtypes.split(",")
            for dtype in dtypes:
                row[f"kiln_{dtype}"] = kiln_train(args.kiln, model_dir, args.device, batch, seq, args.steps, args.kiln_extra,
                                                  log, args.kiln_timeout, dtype)
            curves = [row[f"kiln_{d}"].get("losses") for d in dtypes]
            if len(curves) == 2 and all(curves):
                # The same seed and data: the two precisions' loss curves side by side.
                row["kiln_loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(*curves))
            for side in ["torch"] + [f"kiln_{d}" for d in dtypes]:
                r = row.get(side, {})
                if "tokens_per_s" in r:
                    r["mfu"] = r["tokens_per_s"] * row["flops_per_token"] / H100_BF16_DENSE
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(os.path.join(args.out, "train_vs_peft.json"), "w") as f:
        json.dump(dict(card=card, torch=torch.__version__, peft=peft.__version__, rows=rows), f, indent=1)

    gib = 2**30
    print(f"\n{card}: LoRA r16 all 7 projections, AdamW, bf16; tokens/s (peak GiB, MFU)")
    print(f"{'shape':14}{'seq':>6}{'batch':>6}{'dtype':>6}{'torch+peft':>28}{'kiln':>28}{'speed':>7}{'mem':>7}{'plan/kiln':>10}")
    cell = lambda r: (f"{r['tokens_per_s']:9.0f} ({r['peak_bytes'] / gib:5.1f}, {r['mfu'] * 100:4.1f}%)"
                      if "tokens_per_s" in r else r.get("error", "-")[:26])
    for row in rows:
        t = row["torch"]
        for d in dtypes:
            k = row[f"kiln_{d}"]
            ratio = lambda key: f"{k[key] / t[key]:7.2f}" if key in k and k.get(key) else "      -"
            plan = k.get("plan_peak_bytes")
            vs = f"{plan / k['peak_bytes']:10.2f}" if plan and k.get("peak_bytes") else (f"{plan / gib:8.1f}G" if plan else "         -")
            print(f"{row['shape']:14}{row['seq']:>6}{row['batch']:>6}{d:>6}{cell(t):>28}{cell(k):>28}{ratio('tokens_per_s')}{ratio('peak_bytes')}{vs}")
        if "kiln_loss_max_abs_diff" in row:
            print(f"{'':26}loss curves bf16 vs f32, same seed: max |difference| {row['kiln_loss_max_abs_diff']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
