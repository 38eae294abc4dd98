#!/usr/bin/env python3
"""kiln vs transformers/PyTorch: prefill and decode tokens/s on one machine, in one run.

Creates (once) a random-weight Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 query
heads, 3 key/value heads, vocab 49152, tied embeddings) with transformers, then measures
transformers and `kiln bench decode` on the same prompt, same device class, both in f32, and
prints the two side by side with their ratio.

    python3 bench/compare.py --kiln target/release/kiln --device cpu
    python3 bench/compare.py --kiln $KILN --device cuda      # on the GPU machine

Needs torch and transformers. Both sides: median of --runs timed runs after one warm-up;
prefill = one forward over the prompt; decode = greedy tokens with the KV cache, prefill
excluded.
"""
import argparse
import json
import os
import statistics
import subprocess
import time


def make_model(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(path, safe_serialization=True)


def prompt_ids(n, vocab):
    # The same pseudo-random prompt `kiln bench` uses.
    return [((i * 2654435761) % (1 << 32) >> 7) % vocab for i in range(n)]


def torch_bench(path, device, prompt_len, new_tokens, runs):
    import torch
    from transformers import AutoModelForCausalLM

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([prompt_ids(prompt_len, vocab)], device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def prefill():
        sync()
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        out.logits[:, -1].float().cpu()
        sync()
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.cpu()  # kiln samples on the host each step too
        sync()
        return time.perf_counter() - t

    prefill()
    p = statistics.median(prefill() for _ in range(runs))
    decode()
    d = statistics.median(decode() for _ in range(runs))
    return prompt_len / p, new_tokens / d


def kiln_bench(kiln, path, device, prompt_len, new_tokens, runs):
    cmd = [kiln, "bench", "decode", "--model", path, "--device", device, "--prompt-len", str(prompt_len),
           "--new-tokens", str(new_tokens), "--runs", str(runs), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["prefill_tokens_per_s"], r["decode_tokens_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--device", default="cpu", help="kiln device: cpu, wgpu, cuda")
    ap.add_argument("--torch-device", default=None, help="cpu or cuda (default: cuda for kiln cuda/wgpu)")
    ap.add_argument("--model-dir", default="/tmp/kiln-bench-smollm2-shape")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    import torch
    make_model(args.model_dir)
    tdev = args.torch_device or ("cpu" if args.device == "cpu" else "cuda")
    kp, kd = kiln_bench(args.kiln, args.model_dir, args.device, args.prompt_len, args.new_tokens, args.runs)
    tp, td = torch_bench(args.model_dir, tdev, args.prompt_len, args.new_tokens, args.runs)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"model: random Llama, SmolLM2-135M shape, f32; prompt {args.prompt_len}, decode {args.new_tokens}, "
          f"median of {args.runs}; torch {torch.__version__} threads {torch.get_num_threads()}; gpu {gpu}")
    print(f"{'':10}{'kiln (' + args.device + ')':>18}{'torch (' + tdev + ')':>18}{'kiln/torch':>12}")
    print(f"{'prefill':10}{kp:>14.1f} t/s{tp:>14.1f} t/s{kp / tp:>12.2f}")
    print(f"{'decode':10}{kd:>14.1f} t/s{td:>14.1f} t/s{kd / td:>12.2f}")


if __name__ == "__main__":
    main()
