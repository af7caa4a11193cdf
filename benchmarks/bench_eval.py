"""Per-candidate cost of the calibration evaluator vs lm-eval's HFLM path, same model, same examples.

    .venv/bin/python benchmarks/bench_eval.py [--examples 200] [--repeats 5] [--threads 1] [--tokenizer char|bpe]

Model: a ~3.2M-parameter Llama (4 layers, hidden 256) with random weights, adjusted so that greedy
decoding is prompt-dependent and stops at a newline after a few tokens (special tokens' output rows
zeroed, the newline row scaled). Tokenizer: the zoo's char tokenizer, or (--tokenizer bpe) a byte-level
BPE trained on the benchmark's own text (640 tokens), as real LLMs have: there a wrong answer is decided
in one pass only where the first wrong token's text leaves the gold text. Tasks:
- generation: "Q: Reverse the word ....\\nA: " prompts; half of the answers are the model's own greedy
  output (so exact match is non-trivial), half are the true reversal (3-5 characters, as in the zoo);
- multiple choice: BIG-bench arithmetic (1-digit addition/subtraction/multiplication, 6-7 choices,
  choices listed in the prompt, BIG-bench formatting); navigate (2 choices, long prompts) as a second,
  harder case for prefix sharing.
lm-eval's import, TaskManager indexing and dataset loading are done once, outside the timings; so is
our Evaluator construction (tokenisation), which a study does once. Runs are interleaved and repeated;
the table shows medians and the ratio to lm-eval measured in the same run. Scores must be identical
per example (exact match, chosen answer), at least ONE_PASS_TARGET of the exact-match examples must be
decided in one pass and exact match must run GEN_SPEEDUP_TARGET times faster than lm-eval. Each target
prints an `ok` or `MISS` line; exit code 1 on a MISS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from _checks import Checks  # noqa: E402

BIGBENCH = Path(__file__).resolve().parent.parent / "tests" / "data"
SHARED_BIGBENCH = Path("/work/shared/data/bigbench")
ONE_PASS_TARGET = 0.95  # share of exact-match examples decided by the one teacher-forced pass
GEN_SPEEDUP_TARGET = 4.0  # exact match, ours vs lm-eval HFLM
BPE_VOCAB = 640
CHARS = set("\n" + "".join(chr(c) for c in range(32, 127)))


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5))) for _ in range(n)]


def build_tokenizer(kind: str):
    from mergesearch.zoo.tokenizer import build_bpe_tokenizer, build_char_tokenizer

    if kind == "char":
        return build_char_tokenizer()
    # the benchmark's own text, with other words than the ones it asks about (another seed)
    texts = [f"Q: Reverse the word {w}.\nA: {w[::-1]}\n" for w in _words(random.Random(1), 4000)]
    return build_bpe_tokenizer(texts, BPE_VOCAB)


def newline_id(tok) -> int:
    return tok("\n", add_special_tokens=False).input_ids[0]


def build_model(seed: int = 0, tokenizer: str = "char", newline_scale: float = 2.0, context: int = 512):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = build_tokenizer(tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    nl = newline_id(tok)
    # a trained model never emits <pad>/<s>/<unk>, nor a byte its (ASCII) training text never had;
    # zero rows give logit 0, below the best character
    never = [0, 1, 2, 3] + [i for t, i in tok.get_vocab().items() if i > 3 and not set(tok.decode([i])) <= CHARS]
    with torch.no_grad():
        model.lm_head.weight[never] = 0.0
        model.lm_head.weight[nl] *= newline_scale  # 2.0: stop after a few characters, as a trained model does
    return model, tok


def gen_task_file(model, tok, out: Path, n: int, max_new: int) -> Path:
    words = _words(random.Random(0), n)
    prompts = [f"Q: Reverse the word {w}.\nA: " for w in words]
    outs = []
    for start in range(0, n, 50):
        enc = tok(prompts[start: start + 50], return_tensors="pt", padding=True)
        with torch.inference_mode():
            g = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=2)
        outs += tok.batch_decode(g[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    rows = []
    for i, (p, o, w) in enumerate(zip(prompts, outs, words)):
        own = o.split("\n")[0]
        # even rows: the model's own greedy answer (a hit); odd rows: the true reversal (a miss, almost surely)
        answer = own if i % 2 == 0 and own and "\n" in o else w[::-1]
        rows.append({"id": f"g{i}", "prompt": p, "answer": answer})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def mc_task_file(out: Path, n: int, files: list[str], seed: int = 0) -> Path:
    from mergesearch.evaluate import load_task

    rows = []
    for name in files:
        path = SHARED_BIGBENCH / name if (SHARED_BIGBENCH / name).is_file() else BIGBENCH / f"bigbench_{name}"
        for ex in load_task(path, metric="acc").examples:
            rows.append({"id": f"{Path(name).stem}-{ex.id}", "prompt": ex.prompt, "choices": list(ex.choices),
                         "label": ex.label})
    random.Random(seed).shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return out


class LmEvalRun:
    """lm-eval's HFLM at batch 32 on an exported local task; set-up done once, outside the timings."""

    def __init__(self, model, tok, task, folder: Path, batch_size: int, max_length: int = 512):
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict

        from mergesearch.evaluate import export_lmeval_task

        yaml_path = export_lmeval_task(task, folder / task.name)
        self.name = yaml_path.stem
        self.lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu", max_length=max_length)
        self.tasks = get_task_dict([self.name], TaskManager(include_path=str(yaml_path.parent)))

    def __call__(self):
        from lm_eval.evaluator import evaluate

        out = evaluate(self.lm, self.tasks, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
        return {s["doc"]["id"]: s for s in out["samples"][self.name]}


def plain_generate(model, tok, task, batch_size: int, device="cpu"):
    """The issue's baseline: batched HF `generate`, stopping at the newline token or EOS."""
    nl = newline_id(tok)
    outs = {}
    exs = list(task.examples)
    for start in range(0, len(exs), batch_size):
        chunk = exs[start: start + batch_size]
        enc = tok([e.prompt for e in chunk], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            g = model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=0,
                               eos_token_id=[2, nl])
        for e, t in zip(chunk, tok.batch_decode(g[:, enc.input_ids.shape[1]:], skip_special_tokens=True)):
            outs[e.id] = t.split("\n")[0]
    return outs


def plain_choice(model, tok, task, batch_size: int):
    """A plain multiple-choice loop: one right-padded sequence per (prompt, choice), batched."""
    from mergesearch.evaluate.text import encode_pair

    reqs = [(e.id, c, *encode_pair(tok, e.prompt, ch)) for e in task.examples for c, ch in enumerate(e.choices)]
    lls: dict[str, list[float]] = {}
    for start in range(0, len(reqs), batch_size):
        chunk = reqs[start: start + batch_size]
        width = max(len(w) for _, _, w, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (_, _, w, _) in enumerate(chunk):
            ids[i, : len(w)] = torch.tensor(w)
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        for i, (eid, _, w, n) in enumerate(chunk):
            lls.setdefault(eid, []).append(sum(lp[i, t - 1, w[t]].item() for t in range(n, len(w))))
    return {eid: max(range(len(v)), key=v.__getitem__) for eid, v in lls.items()}


# --- chains: generation the one-pass shortcut cannot decide ----------------------------------------

CHAIN_DATA = BIGBENCH / "chain"
CHAIN_SPEEDUP_LMEVAL = 3.0  # ours vs lm-eval's HFLM, chain task and gsm8k-style lm-eval task
CHAIN_SPEEDUP_GENERATE = 2.0  # ours vs HF `generate`, batched greedy at the same batch size
CHAIN_NEWLINE_SCALE = 1.3  # greedy outputs end at a newline after 2 to 96 characters, most after 10-40
CHAIN_MAX_NEW = 96
# The chain skill's regex is "The answer is (\S+)\." (tests/data/chain); a random model never writes
# that, so the benchmark extracts a word it does write, to keep exact match non-trivial.
CHAIN_EXTRACT = r"([a-z]{3,})"
CHAIN_CONTEXT = 1024  # the gsm8k-style prompts (a fixed few-shot block) are ~500 characters


def chain_task_file(model, tok, out: Path, n: int) -> Path:
    """The chain fixture's prompts; even rows answered with the model's own output (hits), odd rows with
    the fixture's gold chain (misses)."""
    nl = newline_id(tok)
    rows = [json.loads(line) for line in (CHAIN_DATA / "reverse_upper.test.jsonl").read_text().splitlines()][:n]
    for start in range(0, len(rows), 50):
        chunk = rows[start: start + 50]
        enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        with torch.inference_mode():
            g = model.generate(**enc, max_new_tokens=CHAIN_MAX_NEW, do_sample=False, pad_token_id=0,
                               eos_token_id=[2, nl])
        for i, (r, text) in enumerate(zip(chunk, tok.batch_decode(g[:, enc.input_ids.shape[1]:],
                                                                  skip_special_tokens=True))):
            if (start + i) % 2 == 0:
                r["answer"] = text.split("\n")[0]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def plain_chain(model, tok, task, batch_size: int) -> dict[str, str]:
    """HF `generate`, batched greedy at our batch size, stopping at the newline or EOS; output cut there."""
    nl = newline_id(tok)
    outs = {}
    exs = list(task.examples)
    for start in range(0, len(exs), batch_size):
        chunk = exs[start: start + batch_size]
        enc = tok([e.prompt for e in chunk], return_tensors="pt", padding=True)
        with torch.inference_mode():
            g = model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=0,
                               eos_token_id=[2, nl])
        for e, t in zip(chunk, tok.batch_decode(g[:, enc.input_ids.shape[1]:], skip_special_tokens=True)):
            outs[e.id] = task.cut(t)
    return outs


def yaml_prompts(yaml_path: Path, docs: list[dict]) -> list[str]:
    """The gsm8k-style task's prompts as lm-eval writes them: the fixed few-shot block, then the question."""
    import yaml

    cfg = yaml.safe_load(yaml_path.read_text())
    return [cfg["description"] + f"Q: {d['question']}\nA:" for d in docs]


def plain_yaml(model, tok, prompts: list[str], until: list[str], max_new: int, batch_size: int) -> list[str]:
    """HF `generate`, batched greedy, stopping at EOS, cut at the first stop string afterwards (HF's own
    `stop_strings` criterion is slower than running every row to max_new here)."""
    outs = []
    tok.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        enc = tok(prompts[start: start + batch_size], return_tensors="pt", padding=True)
        with torch.inference_mode():
            g = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=2)
        for text in tok.batch_decode(g[:, enc.input_ids.shape[1]:], skip_special_tokens=True):
            for stop in until:
                text = text.split(stop)[0]
            outs.append(text)
    return outs


def run_chains(args, checks: Checks) -> dict:
    """The chain fixture (JSONL, until + extract) and the gsm8k-style lm-eval YAML: ours vs lm-eval's HFLM vs
    HF generate, interleaved; per-example identity checked; the two speed targets checked per task."""
    from mergesearch.evaluate import Evaluator, load_task

    model, tok = build_model(newline_scale=CHAIN_NEWLINE_SCALE, context=CHAIN_CONTEXT)
    folder = Path(tempfile.mkdtemp(prefix="bench-chain-"))
    bs = args.batch_size
    chain = load_task(chain_task_file(model, tok, folder / "chain.jsonl", args.chain_examples), name="chain",
                      until=["\n"], max_new_tokens=CHAIN_MAX_NEW, extract=CHAIN_EXTRACT)
    yaml_path = CHAIN_DATA / "arith_chain.yaml"
    gsm = load_task(yaml_path, limit=args.chain_examples, seed=0, name="gsm8k_style")
    import yaml

    cfg = yaml.safe_load(yaml_path.read_text())
    until, max_gen = cfg["generation_kwargs"]["until"], cfg["generation_kwargs"]["max_gen_toks"]
    docs = [json.loads(line) for line in (CHAIN_DATA / "arith_chain.test.jsonl").read_text().splitlines()]
    ours_gsm = Evaluator(model, tok, [gsm], batch_size=bs)
    ours_gsm_default = Evaluator(model, tok, [gsm], batch_size=args.our_batch_size)
    hf_gsm = Evaluator(model, tok, [gsm], batch_size=bs, lmeval_hf=True)
    # the documents lm-eval scores (a seeded subset), in doc_id order
    doc_ids = sorted(int(r["id"]) for r in hf_gsm.evaluate().records[gsm.name])
    gsm_prompts = yaml_prompts(yaml_path, [docs[i] for i in doc_ids])
    runs = {
        "chain": {"lm-eval": LmEvalRun(model, tok, chain, folder, bs, CHAIN_CONTEXT),
                  "ours": Evaluator(model, tok, [chain], batch_size=bs).evaluate,
                  "ours-64": Evaluator(model, tok, [chain], batch_size=args.our_batch_size).evaluate,
                  "plain": lambda: plain_chain(model, tok, chain, bs)},
        "gsm8k_style": {"lm-eval": hf_gsm.evaluate, "ours": ours_gsm.evaluate, "ours-64": ours_gsm_default.evaluate,
                        "plain": lambda: plain_yaml(model, tok, gsm_prompts, until, max_gen, bs)},
    }
    times = {(t, e): [] for t in runs for e in runs[t]}
    last = {}
    for _ in range(args.chain_repeats):
        for t, engines in runs.items():
            for e, fn in engines.items():
                s = time.perf_counter()
                last[(t, e)] = fn()
                times[(t, e)].append(time.perf_counter() - s)

    # per-example identity
    lm = last[("chain", "lm-eval")]
    recs = last[("chain", "ours")].records["chain"]
    plain = last[("chain", "plain")]
    same = sum(r["output"] == lm[r["id"]]["resps"][0][0] and r["exact_match"] == float(lm[r["id"]]["exact_match"])
               for r in recs)
    same_plain = sum(plain[r["id"]] == lm[r["id"]]["resps"][0][0] for r in recs)
    identity = {"chain": (same, same_plain, len(recs))}
    chain_score = last[("chain", "ours")].primary("chain")
    ours_recs = {r["id"]: r for r in last[("gsm8k_style", "ours")].records[gsm.name]}
    hf_recs = {r["id"]: r for r in last[("gsm8k_style", "lm-eval")].records[gsm.name]}
    same_g = sum(ours_recs[d]["resps"] == hf_recs[d]["resps"] and ours_recs[d]["filtered_resps"] ==
                 hf_recs[d]["filtered_resps"] for d in hf_recs)
    plain_by_doc = dict(zip((str(i) for i in doc_ids), last[("gsm8k_style", "plain")]))
    same_gp = sum(plain_by_doc[d] == hf_recs[d]["resps"][0][0] for d in hf_recs)
    identity["gsm8k_style"] = (same_g, same_gp, len(hf_recs))
    gen_chars = {"chain": statistics.mean(len(r["output"]) for r in recs),
                 "gsm8k_style": statistics.mean(len(r["resps"][0][0]) for r in hf_recs.values())}

    print(f"\nchains: char Llama {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, {args.threads} thread(s), "
          f"batch {bs} for lm-eval, HF generate and ours; ours-64: our default batch "
          f"{args.our_batch_size} (as in the table above); {args.chain_repeats} interleaved repeats")
    print(f"{'task':<12} {'engine':<8} {'median s':>9} {'vs lm-eval':>10} {'vs generate':>11}")
    rows = []
    for t in runs:
        med = {e: statistics.median(times[(t, e)]) for e in runs[t]}
        for e in runs[t]:
            rows.append({"task": t, "engine": e, "median_s": med[e], "speedup_vs_lmeval": med["lm-eval"] / med[e],
                         "speedup_vs_generate": med["plain"] / med[e]})
            print(f"{t:<12} {e:<8} {med[e]:>9.2f} {med['lm-eval'] / med[e]:>9.2f}x {med['plain'] / med[e]:>10.2f}x")
        s, sp, n = identity[t]
        print(f"  {t}: identical to lm-eval {s}/{n} (generated string and answer); HF generate {sp}/{n}; mean "
              f"output {gen_chars[t]:.1f} characters")
        checks.check(f"{t}: {s}/{n} examples identical to lm-eval's HFLM (target: all)", s == n)
        best = min(med["ours"], med["ours-64"])
        checks.check(f"{t}: {med['lm-eval'] / best:.2f}x lm-eval HFLM at batch {bs} (ours at batch "
                     f"{bs if best == med['ours'] else args.our_batch_size}; target >= {CHAIN_SPEEDUP_LMEVAL:g}x)",
                     med["lm-eval"] / best >= CHAIN_SPEEDUP_LMEVAL)
        checks.check(f"{t}: {med['plain'] / med['ours']:.2f}x HF generate at batch {bs} (target >= "
                     f"{CHAIN_SPEEDUP_GENERATE:g}x)", med["plain"] / med["ours"] >= CHAIN_SPEEDUP_GENERATE)
    by = {k: sum(r["decided_by"] == k for r in recs) for k in ("one-pass", "teacher-forced", "generation")}
    print(f"  chain exact match {chain_score:.4f}; decided_by: one-pass {by['one-pass']}, teacher-forced "
          f"{by['teacher-forced']}, generation {by['generation']}")
    checks.check(f"chain: every chain decided by generation and the extraction ({by['generation']}/{len(recs)})",
                 by["generation"] == len(recs))
    return {"rows": rows, "identity": {t: list(v) for t, v in identity.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32, help="lm-eval and plain baselines")
    ap.add_argument("--our-batch-size", type=int, default=64)
    ap.add_argument("--tokenizer", choices=["char", "bpe"], default="char",
                    help="char: the zoo's; bpe: a byte-level BPE trained on the benchmark's text")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--suite", choices=["all", "short", "chains"], default="all",
                    help="short: exact match decided in one pass and multiple choice; chains: generated chains "
                         "(the chain fixture and the gsm8k-style lm-eval task)")
    ap.add_argument("--chain-examples", type=int, default=96, help="examples per chain task (fixtures: 300/240)")
    ap.add_argument("--chain-repeats", type=int, default=1)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    checks = Checks()
    chains = run_chains(args, checks) if args.suite in ("all", "chains") else None
    if args.suite == "chains":
        if args.json:
            Path(args.json).write_text(json.dumps({"chains": chains}, indent=1))
        return checks.finish()
    from mergesearch.evaluate import Evaluator, load_task

    model, tok = build_model(tokenizer=args.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    folder = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    gen = load_task(gen_task_file(model, tok, folder / "reverse_gen.jsonl", args.examples, 32), name="gen_reverse")
    arith = load_task(mc_task_file(folder / "arith_mc.jsonl", args.examples, [
        "arithmetic_1_digit_addition.json", "arithmetic_1_digit_subtraction.json",
        "arithmetic_1_digit_multiplication.json"]), name="mc_arithmetic")
    nav = load_task(mc_task_file(folder / "navigate_mc.jsonl", args.examples, ["navigate.json"]), name="mc_navigate")
    tasks = [gen, arith, nav]

    t0 = time.perf_counter()
    ours = {t.name: Evaluator(model, tok, [t], batch_size=args.our_batch_size) for t in tasks}
    setup_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = {t.name: LmEvalRun(model, tok, t, folder, args.batch_size) for t in tasks}
    setup_lm = time.perf_counter() - t0
    plain = {gen.name: lambda: plain_generate(model, tok, gen, args.batch_size),
             arith.name: lambda: plain_choice(model, tok, arith, args.batch_size),
             nav.name: lambda: plain_choice(model, tok, nav, args.batch_size)}

    times = {(t.name, eng): [] for t in tasks for eng in ("lm-eval", "ours", "plain")}
    last = {}
    for _ in range(args.repeats):  # interleaved, so that load from other users hits every engine alike
        for t in tasks:
            for eng, fn in (("lm-eval", theirs[t.name]), ("ours", ours[t.name].evaluate), ("plain", plain[t.name])):
                s = time.perf_counter()
                last[(t.name, eng)] = fn()
                times[(t.name, eng)].append(time.perf_counter() - s)

    rows, identity = [], {}
    for t in tasks:
        lm_samples = last[(t.name, "lm-eval")]
        our = last[(t.name, "ours")].records[t.name]
        pl = last[(t.name, "plain")]
        if t.kind == "generate":
            same = sum(r["exact_match"] == float(lm_samples[r["id"]]["exact_match"]) for r in our)
            same_plain = sum(float(pl[e.id] == e.answers[0]) == float(lm_samples[e.id]["exact_match"])
                             for e in t.examples)
            # greedy tokens emitted until and including the stop (same count for every engine)
            tokens = sum(min(len(s["resps"][0][0]) + 1, t.max_new_tokens) for s in lm_samples.values())
            score_lm = statistics.mean(float(s["exact_match"]) for s in lm_samples.values())
        else:
            same = sum(r["acc"] == float(lm_samples[r["id"]]["acc"]) for r in our)
            same_plain = sum(float(pl[e.id] == e.label) == float(lm_samples[e.id]["acc"]) for e in t.examples)
            tokens = None
            score_lm = statistics.mean(float(s["acc"]) for s in lm_samples.values())
        n = len(our)
        identity[t.name] = {"ours_vs_lmeval": f"{same}/{n}", "plain_vs_lmeval": f"{same_plain}/{n}",
                            "score_ours": last[(t.name, "ours")].primary(t.name), "score_lmeval": score_lm}
        checks.check(f"{t.name}: {same}/{n} examples scored as lm-eval scores them (target: all "
                     f"{len(lm_samples)})", same == n == len(lm_samples))
        base = statistics.median(times[(t.name, "lm-eval")])
        for eng in ("lm-eval", "plain", "ours"):
            med = statistics.median(times[(t.name, eng)])
            rows.append({"task": t.name, "engine": eng, "median_s": med, "min_s": min(times[(t.name, eng)]),
                         "examples_per_s": n / med, "tokens_per_s": tokens / med if tokens else None,
                         "speedup_vs_lmeval": base / med})

    print(f"model: {args.tokenizer} Llama ({len(tok)} tokens), {n_params / 1e6:.2f}M parameters; {args.examples} examples per task; "
          f"{args.threads} thread(s); {args.repeats} interleaved repeats; lm-eval batch {args.batch_size}, "
          f"ours batch {args.our_batch_size}")
    print(f"one-off set-up (excluded): ours {setup_ours:.2f} s (tokenise, pad), lm-eval {setup_lm:.2f} s "
          "(HFLM, TaskManager, datasets)")
    print(f"{'task':<14} {'engine':<8} {'median s':>9} {'min s':>7} {'ex/s':>8} {'tok/s':>8} {'speedup':>8}")
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(f"{r['task']:<14} {r['engine']:<8} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
              f"{r['examples_per_s']:>8.0f} {tps:>8} {r['speedup_vs_lmeval']:>7.2f}x")
    print("per-example identity with lm-eval (exact match / chosen answer):")
    for name, v in identity.items():
        print(f"  {name:<14} ours {v['ours_vs_lmeval']}  plain {v['plain_vs_lmeval']}  "
              f"score ours {v['score_ours']:.4f} lm-eval {v['score_lmeval']:.4f}")
    res = last[(gen.name, "ours")]
    recs = res.records[gen.name]
    one_pass = res.one_pass[gen.name] / res.n[gen.name]
    by = {k: sum(r["decided_by"] == k for r in recs) for k in ("one-pass", "teacher-forced", "generation")}
    misses = [r for r in recs if not r["exact_match"]]
    print(f"  {gen.name}: first pass {by['one-pass']}, more teacher-forced passes {by['teacher-forced']} (greedy "
          f"spelt the answer with other tokens), generation {by['generation']}; wrong answers decided by the first "
          f"pass: {sum(r['decided_by'] == 'one-pass' for r in misses)}/{len(misses)}")
    speedup = next(r["speedup_vs_lmeval"] for r in rows if r["task"] == gen.name and r["engine"] == "ours")
    checks.check(f"{gen.name}: {res.one_pass[gen.name]}/{res.n[gen.name]} ({100 * one_pass:.1f}%) decided in one "
                 f"pass (target >= {100 * ONE_PASS_TARGET:.0f}%)", one_pass >= ONE_PASS_TARGET)
    checks.check(f"{gen.name}: {speedup:.2f}x lm-eval HFLM (target >= {GEN_SPEEDUP_TARGET:g}x)",
                 speedup >= GEN_SPEEDUP_TARGET)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "identity": identity, "tokenizer": args.tokenizer,
                                               "one_pass": one_pass, "decided_by": by, "chains": chains}, indent=1))
    return checks.finish()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
