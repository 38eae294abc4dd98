#!/usr/bin/env python3
"""Writes kiln's bundled toy datasets: arith, arith-sub and chat-small.

Standard library only and a fixed seed, so running it again reproduces the committed files
byte for byte:

    python3 datasets/make_datasets.py

Every file is JSONL (one JSON object per line) in one of kiln's formats: completion
(`{"prompt", "completion"}`) for the arithmetic sets, chat (`{"messages": [...]}`) for chat-small.
"""

import json
import os
import random

SEED = 1234
HERE = os.path.dirname(os.path.abspath(__file__))


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def split_pairs(pairs, rng, n_train, n_valid, n_test):
    """Shuffles the distinct operand pairs and cuts them into disjoint splits."""
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    assert len(pairs) >= n_train + n_valid + n_test, "not enough distinct problems"
    return (
        pairs[:n_train],
        pairs[n_train:n_train + n_valid],
        pairs[n_train + n_valid:n_train + n_valid + n_test],
    )


def make_arith(rng):
    # 100 x 100 = 10,000 distinct problems; 6,400 are used so the splits never share one.
    pairs = [(a, b) for a in range(100) for b in range(100)]
    train, valid, test = split_pairs(pairs, rng, 6000, 200, 200)
    for name, split in (("train", train), ("valid", valid), ("test", test)):
        rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in split]
        write_jsonl(os.path.join(HERE, "arith", f"{name}.jsonl"), rows)
    return {"train": len(train), "valid": len(valid), "test": len(test)}


def make_arith_sub(rng):
    # The inverse of arith: (a + b) - b = a for a, b in 0..99, so every result is non-negative
    # (0..99), the minuend is 0..198 and there are 10,000 distinct problems, as for addition.
    pairs = [(a + b, b) for a in range(100) for b in range(100)]
    train, valid, test = split_pairs(pairs, rng, 6000, 200, 200)
    for name, split in (("train", train), ("valid", valid), ("test", test)):
        rows = [{"prompt": f"{m}-{s}=", "completion": str(m - s)} for m, s in split]
        write_jsonl(os.path.join(HERE, "arith-sub", f"{name}.jsonl"), rows)
    return {"train": len(train), "valid": len(valid), "test": len(test)}


ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n):
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + words(rest))
    raise ValueError(n)


CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Mexico", "Mexico City"), ("India", "New Delhi"), ("China", "Beijing"), ("Peru", "Lima"),
]

WORDS = ["apple", "banana", "river", "window", "garden", "pencil", "rocket", "silver", "forest",
         "candle", "planet", "butter", "marble", "kitten", "ladder", "mirror", "orange", "puzzle",
         "tunnel", "yellow", "castle", "dragon", "engine", "falcon", "harbor", "island", "jungle",
         "lemon", "meadow", "needle", "ocean", "parrot", "quartz", "saddle", "thunder", "violet"]

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You answer questions about numbers, words and geography.",
]


def arithmetic_turn(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        q = rng.choice([f"What is {a} plus {b}?", f"How much is {a} + {b}?", f"Add {a} and {b}."])
        return q, f"{a} plus {b} is {words(a + b)}."
    a, b = max(a, b), min(a, b)
    q = rng.choice([f"What is {a} minus {b}?", f"How much is {a} - {b}?", f"Subtract {b} from {a}."])
    return q, f"{a} minus {b} is {words(a - b)}."


def reverse_turn(rng):
    w = rng.choice(WORDS)
    q = rng.choice([f"Reverse the word \"{w}\".", f"Spell \"{w}\" backwards.", f"What is \"{w}\" written backwards?"])
    return q, f"\"{w}\" reversed is \"{w[::-1]}\"."


def count_turn(rng):
    w = rng.choice(WORDS)
    letter = rng.choice(sorted(set(w)))
    n = w.count(letter)
    q = rng.choice([f"How many times does the letter \"{letter}\" appear in \"{w}\"?",
                    f"Count the letter \"{letter}\" in the word \"{w}\"."])
    times = "once" if n == 1 else ("twice" if n == 2 else f"{words(n)} times")
    return q, f"The letter \"{letter}\" appears {times} in \"{w}\"."


def length_turn(rng):
    w = rng.choice(WORDS)
    q = rng.choice([f"How many letters are in \"{w}\"?", f"How long is the word \"{w}\"?"])
    return q, f"\"{w}\" has {words(len(w))} letters."


def capital_turn(rng):
    country, capital = rng.choice(CAPITALS)
    q = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                    f"Name the capital of {country}."])
    return q, f"The capital of {country} is {capital}."


TURNS = [arithmetic_turn, reverse_turn, count_turn, length_turn, capital_turn]


def conversation(rng):
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    # Roughly a third of the conversations have a second exchange.
    for _ in range(2 if rng.random() < 0.35 else 1):
        q, a = rng.choice(TURNS)(rng)
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    return {"messages": messages}


def make_chat_small(rng):
    seen = set()
    rows = []
    # Distinct conversations only, so that valid never repeats a train line.
    while len(rows) < 440:
        conv = conversation(rng)
        key = json.dumps(conv, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        rows.append(conv)
    train, valid = rows[:400], rows[400:]
    write_jsonl(os.path.join(HERE, "chat-small", "train.jsonl"), train)
    write_jsonl(os.path.join(HERE, "chat-small", "valid.jsonl"), valid)
    return {"train": len(train), "valid": len(valid)}


def main():
    # One generator per dataset so that changing one does not reshuffle the others.
    counts = {
        "arith": make_arith(random.Random(SEED)),
        "arith-sub": make_arith_sub(random.Random(SEED + 1)),
        "chat-small": make_chat_small(random.Random(SEED + 2)),
    }
    for name, c in counts.items():
        print(name, " ".join(f"{k}={v}" for k, v in c.items()))


if __name__ == "__main__":
    main()
