"""Writes the chain-of-thought fixtures (run from this folder; deterministic): a gsm8k-style lm-eval
task (arith_chain.*) and a JSONL chain task (reverse_upper.test.jsonl) with until/extract keys."""

import json
import random

rng = random.Random(0)
NAMES = ["Tom", "Ann", "Raj", "Mia", "Leo", "Zoe", "Ben", "Ivy"]
ITEMS = ["apples", "pens", "cards", "books", "shells", "coins"]


def problem():
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(1, 9)
    q = f"{name} has {a} {item}. {name} buys {b} more and then gives away {c}. How many {item} are left?"
    chain = f"{name} starts with {a}. {a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. The answer is {a + b - c}."
    return {"question": q, "chain": chain, "answer": str(a + b - c)}


with open("arith_chain.test.jsonl", "w") as f:
    for i in range(240):
        f.write(json.dumps({"id": i, **problem()}) + "\n")

words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6))) for _ in range(300)]
with open("reverse_upper.test.jsonl", "w") as f:
    for i, w in enumerate(words):
        r = w[::-1]
        chain = f"Reversed: {r}. Uppercase: {r.upper()}. The answer is {r.upper()}."
        f.write(json.dumps({"id": f"r{i}", "prompt": f"Q: Reverse and uppercase the word {w}.\nA: ",
                            "answer": chain}) + "\n")
