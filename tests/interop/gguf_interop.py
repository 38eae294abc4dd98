"""Checks kiln's GGUF files with llama.cpp's own tools: gguf-py's reader and llama.cpp itself
(llama-cpp-python). Called by tests/gguf.rs; each subcommand prints one JSON line.

    gguf_interop.py read FILE OUT.bin          metadata + tensor infos; dequantised values to OUT.bin
    gguf_interop.py logits FILE FIXTURE_DIR    llama.cpp logits and greedy ids vs the transformers reference
    gguf_interop.py tokenize FILE REFERENCE    llama.cpp tokenisation vs chat_reference.json
    gguf_interop.py eog FILE TOKEN...          whether llama.cpp ends generation at each token id
    gguf_interop.py ppl FILE JSONL             perplexity of prompt+completion lines, scored on the completion
    gguf_interop.py generate FILE PROMPT N     greedy text and whether generation stopped by itself
"""
import json
import sys

import numpy as np


def read(path, out):
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list) and len(value) > 8:
            value = {"len": len(value), "first": value[:8], "last": value[-1]}
        meta[name] = value
    tensors = []
    with open(out, "wb") as f:
        for t in reader.tensors:
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
            f.write(values.tobytes())
            tensors.append({"name": t.name, "type": t.tensor_type.name, "dims": [int(d) for d in t.shape], "n": int(values.size)})
    print(json.dumps({"metadata": meta, "tensors": tensors}))


def load(path, **kw):
    import llama_cpp

    # n_ctx 0 takes the model's own context length; a vocab-only load has none.
    n_ctx = 512 if kw.get("vocab_only") else 0
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0, **kw)


def logits(path, fixture):
    from safetensors.numpy import load_file

    ref = load_file(f"{fixture}/reference.safetensors")
    input_ids = ref["input_ids"].astype(np.int64)
    expected = ref["logits"].astype(np.float32)
    llm = load(path)
    worst = 0.0
    for row in range(input_ids.shape[0]):
        llm.reset()
        llm.eval(input_ids[row].tolist())
        got = np.array(llm.scores[: input_ids.shape[1]], dtype=np.float32)
        worst = max(worst, float(np.abs(got - expected[row]).max()))
    prompt = ref["greedy_prompt"][0].tolist()
    want = ref["greedy_ids"][0].tolist()
    llm.reset()
    out = list(prompt)
    llm.eval(prompt)
    while len(out) < len(want):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    print(json.dumps({"max_abs_diff": worst, "greedy": out, "expected": want}))


def tokenize(path, reference):
    ref = json.load(open(reference))
    llm = load(path, vocab_only=True)
    cases = [(e["text"], e["ids"]) for e in ref["encode"]] + [(c["text"], c["ids"]) for c in ref["chat"]]
    mismatches = []
    for text, ids in cases:
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        if got != ids:
            mismatches.append({"text": text, "got": got, "expected": ids})
    print(json.dumps({"cases": len(cases), "mismatches": mismatches}))


def eog(path, tokens):
    import llama_cpp

    llm = load(path, vocab_only=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    print(json.dumps({t: bool(llama_cpp.llama_vocab_is_eog(vocab, int(t))) for t in tokens}))


def ppl(path, jsonl):
    llm = load(path)
    nll, count = 0.0, 0
    for line in open(jsonl):
        ex = json.loads(line)
        prompt = llm.tokenize(ex["prompt"].encode(), add_bos=False, special=True)
        answer = llm.tokenize(ex["completion"].encode(), add_bos=False, special=True) + [llm.token_eos()]
        ids = prompt + answer
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
        for pos in range(len(prompt) - 1, len(ids) - 1):
            row = scores[pos]
            m = row.max()
            logz = m + np.log(np.exp(row - m).sum())
            nll += logz - row[ids[pos + 1]]
            count += 1
    print(json.dumps({"ppl": float(np.exp(nll / count)), "tokens": count}))


def generate(path, prompt, n):
    llm = load(path)
    out = llm(prompt, max_tokens=int(n), temperature=0.0, top_k=1)
    choice = out["choices"][0]
    print(json.dumps({"text": choice["text"], "finish_reason": choice["finish_reason"]}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"read": read, "logits": logits, "tokenize": tokenize, "eog": lambda p, *t: eog(p, t), "ppl": ppl, "generate": generate}[cmd](*args)
