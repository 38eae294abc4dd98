#!/usr/bin/env python3
"""LoRA training throughput: kiln vs PyTorch + PEFT on the same model, shapes and settings,
on one machine in one run.

The model is compare.py's random Llama of SmolLM2-135M's shape (f32), with the tokenizer of
tests/fixtures/models/llama copied in (kiln trains from a model directory). Both sides train
LoRA rank 16, alpha 32, on all seven projections, AdamW, batch 8 x 512 tokens, f32:
kiln through `kiln bench train` on a recipe this script writes (packed rows of
datasets/arith, block-diagonal attention), PyTorch on rows of the same shape (plain causal
attention, `attn_implementation="sdpa"`). Tokens/s counts every position of every row on both
sides; median of the timed steps after warm-up.

    python3 bench/compare_train.py --kiln target/release/kiln --device cpu
    python3 bench/compare_train.py --kiln $KILN --device cuda       # on the GPU machine
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from compare import make_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_recipe(model_dir, device, batch, seq, path):
    data = os.path.join(ROOT, "datasets/arith")
    with open(path, "w") as f:
        f.write(f"""method = "lora"
[run]
name = "bench-train"
device = "{device}"
[model]
path = "{model_dir}"
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
steps = 1000
batch_size = {batch}
learning_rate = 1e-4
""")


def torch_train(model_dir, device, batch, seq, steps):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for step in range(steps):
        ids = torch.randint(0, 384, (batch, seq), generator=g).to(dev)
        sync()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        sync()
        if step >= 2:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
    return batch * seq / statistics.median(times), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dir", default="/tmp/kiln-bench-smollm2-shape")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()

    make_model(args.model_dir)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(ROOT, "tests/fixtures/models/llama", f), os.path.join(args.model_dir, f))
    recipe = os.path.join(args.model_dir, "bench-train.toml")
    write_recipe(args.model_dir, args.device, args.batch, args.seq, recipe)
    out = subprocess.run([args.kiln, "bench", "train", "--recipe", recipe, "--steps", str(args.steps), "--json"],
                         check=True, capture_output=True, text=True).stdout
    k = json.loads(out.strip().splitlines()[-1])
    tdev = "cpu" if args.device == "cpu" else "cuda"
    t_tps, t_peak = torch_train(args.model_dir, tdev, args.batch, args.seq, args.steps)
    import torch
    import peft
    print(f"LoRA r16 all-linear, SmolLM2-135M shape, f32, batch {args.batch} x {args.seq}; torch {torch.__version__}, peft {peft.__version__}")
    print(f"{'':10}{'kiln (' + args.device + ')':>20}{'torch+peft (' + tdev + ')':>24}{'kiln/torch':>12}")
    print(f"{'train':10}{k['tokens_per_s']:>16.1f} t/s{t_tps:>20.1f} t/s{k['tokens_per_s'] / t_tps:>12.2f}")
    print(f"kiln peak memory ({k['peak_of']}) {k['peak_bytes'] / 2**20:.0f} MiB; torch peak CUDA memory {t_peak:.0f} MiB")


if __name__ == "__main__":
    main()
