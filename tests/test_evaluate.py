"""The calibration evaluator: task loading, bad input, and the fast path checked against plain HF references."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from mergesearch.errors import TaskError
from mergesearch.evaluate import EvalResult, Evaluator, Task, load_task
from mergesearch.evaluate._scoring import postprocess

DATA = Path(__file__).parent / "data"
ADDITION = DATA / "bigbench_arithmetic_1_digit_addition.json"
NAVIGATE = DATA / "bigbench_navigate_sample.json"


# --- models and data built in the test ------------------------------------------------------------


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def newline_model(path: Path, seed: int = 0):
    """A tiny random char Llama whose greedy continuations often end with a newline after a few chars,
    so exact match against its own outputs is non-trivial (a plain random model never stops)."""
    make_tiny_model(path, "llama", seed=seed)
    model, tok = _load(path)
    nl = tok.convert_tokens_to_ids("\n")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.lm_head.weight[nl] = 0.8 * model.lm_head.weight[37] + 0.5 * torch.randn(32, generator=g)
    model.config.max_position_embeddings = 256  # rotary positions: room for BIG-bench prompts with choices
    return model, tok


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Q: Reverse the word {''.join(rng.choice('abcdefghijklmnop') for _ in range(rng.randint(3, 6)))}.\nA: "
            for _ in range(n)]


def hf_greedy(model, tok, texts: list[str], max_new: int, until: tuple[str, ...] = ("\n",)) -> list[str]:
    """Reference: HF `generate` (greedy, left padding), decoded without special tokens, cut at the first
    of the `until` strings (lm-eval's cut: split at each in turn)."""
    enc = tok(texts, return_tensors="pt", padding=True)
    g = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=2)
    outs = tok.batch_decode(g[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    for stop in until:
        outs = [o.split(stop)[0] for o in outs]
    return outs


def own_answer_jsonl(path: Path, model, tok, n: int = 40, max_new: int = 32) -> Path:
    """Half of the answers are the model's own greedy output (so they match), half are not."""
    texts = prompts(n)
    outs = hf_greedy(model, tok, texts, max_new)
    rows = []
    for i, (p, o) in enumerate(zip(texts, outs)):
        answer = o if i % 2 == 0 and o else (o[:-1] + "#" if len(o) > 1 else "zz")
        rows.append({"id": f"ex{i}", "prompt": p, "answer": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def nl_model(tmp_path_factory):
    return newline_model(tmp_path_factory.mktemp("nl") / "m")


# --- loading --------------------------------------------------------------------------------------


def test_jsonl_exact_match_and_choice(tmp_path):
    gen = tmp_path / "g.jsonl"
    gen.write_text('{"id": "a", "prompt": "Q: x\\nA: ", "answer": "y"}\n\n{"prompt": "Q: z\\nA: ", "answer": "w"}\n')
    t = load_task(gen)
    assert isinstance(t, Task) and t.kind == "generate" and t.metric == "exact_match" and len(t) == 2
    assert {e.id for e in t.examples} == {"a", "3"}  # a missing id falls back to the line number
    mc = tmp_path / "c.jsonl"
    mc.write_text('{"prompt": "p", "choices": ["a", "b"], "label": 1}\n')
    t = load_task(mc, metric="acc_norm")
    assert t.kind == "choice" and t.metric == "acc_norm" and t.examples[0].label == 1


def test_seeded_subsample(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}", "answer": "a"}) + "\n" for i in range(50)))
    a = [e.id for e in load_task(f, limit=10, seed=1).examples]
    assert a == [e.id for e in load_task(f, limit=10, seed=1).examples]
    assert a != [e.id for e in load_task(f, limit=10, seed=2).examples]
    assert len(set(a)) == 10 and len(load_task(f).examples) == 50


def test_fewshot_from_separate_split(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"prompt": "Q: 1\nA: ", "answer": "2"}) + "\n")
    shots = tmp_path / "train.jsonl"
    shots.write_text("".join(json.dumps({"prompt": f"Q: s{i}\nA: ", "answer": f"t{i}"}) + "\n" for i in range(5)))
    t = load_task(f, num_fewshot=2, fewshot_spec=shots)
    prompt = t.examples[0].prompt
    assert prompt.endswith("Q: 1\nA: ") and prompt.count("Q: s") == 2 and "\nA: t" in prompt
    with pytest.raises(TaskError, match="fewshot_spec"):
        load_task(f, num_fewshot=2)


def test_bigbench_formatting_follows_json_task_defaults():
    t = load_task(ADDITION, metric="acc")
    raw = json.loads(ADDITION.read_text())["examples"]
    ex = next(e for e in t.examples if e.id == "0")
    # BIG-bench default_format_fn: "\nQ: " + input + "\n  choice: " + sorted choices permuted + "\nA: "
    assert ex.prompt.startswith("\nQ: " + raw[0]["input"] + "\n  choice: ") and ex.prompt.endswith("\nA: ")
    listed = ex.prompt.split("\nA: ")[0].split("\n  choice: ")[1:]
    assert sorted(listed) == sorted(raw[0]["target_scores"]) and len(listed) == 6
    assert ex.choices == tuple(raw[0]["target_scores"]) and ex.choices[ex.label] == raw[0]["target"]
    gen = load_task(ADDITION)  # preferred_score: exact_str_match
    assert gen.kind == "generate" and gen.output_regex == r"[-+]?\d+" and gen.examples[0].answers
    nav = load_task(NAVIGATE)
    assert nav.kind == "choice"
    first = json.loads(NAVIGATE.read_text())
    # append_choices_to_input: false and a task_prefix
    assert nav.examples[0].prompt == next(first["task_prefix"] + "\nQ: " + e["input"] + "\nA: "
                                          for i, e in enumerate(first["examples"]) if str(i) == nav.examples[0].id)


def test_bigbench_output_regex_postprocess():
    t = load_task(ADDITION)
    assert postprocess("  12 apples\nQ: 3", t) == "12"
    assert postprocess("no digits\n5", t) == ""  # cut at the newline first, then the first regex match


def test_decoding_keys_until_max_new_tokens_extract(tmp_path):
    f = tmp_path / "chain.jsonl"
    f.write_text(json.dumps({"prompt": "Q: ab\nA: ", "answer": "b then a. The answer is BA."}) + "\n")
    t = load_task(f, until=["\n", "Q:"], max_new_tokens=40, extract=r"The answer is (\S+)\.")
    assert t.until == ("\n", "Q:") and t.max_new_tokens == 40
    assert t.cut("x Q: y\nz") == "x " and t.cut("x\nQ:") == "x" and t.cut("none") == "none"
    assert t.extract_answer("so The answer is BA. ok") == "BA" and t.extract_answer("no answer") is None
    assert t.gold(t.examples[0].answers[0]) == "BA" and t.gold("BA") == "BA"  # a gold chain is reduced
    assert postprocess("steps. The answer is BA.\nQ: next", t) == "BA"
    assert postprocess("The answer is\nBA.", t) is None  # cut before the answer: no match, wrong
    whole = load_task(f, extract=r"is \S+")  # no group: the whole match
    assert whole.extract_answer("it is BA.") == "is BA." and whole.max_new_tokens >= 28  # room for the gold
    assert load_task(f).until == ("\n",) and load_task(f).extract is None


@pytest.mark.parametrize("kw, match", [
    ({"extract": "(unclosed"}, r"chain\.jsonl: extract regex '\(unclosed' does not compile"),
    ({"until": "\n"}, r"until must be a list of strings"),
    ({"until": [""]}, r"until needs at least one non-empty stop string"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1"),
])
def test_decoding_keys_bad_input(tmp_path, kw, match):
    f = tmp_path / "chain.jsonl"
    f.write_text(json.dumps({"prompt": "Q: ab\nA: ", "answer": "BA"}) + "\n")
    with pytest.raises(TaskError, match=match):
        load_task(f, **kw)
    mc = tmp_path / "c.jsonl"
    mc.write_text('{"prompt": "p", "choices": ["a", "b"], "label": 1}\n')
    with pytest.raises(TaskError, match="apply to exact-match"):
        load_task(mc, extract="a")


def test_decoding_keys_in_the_study_file(tmp_path):
    from mergesearch.config import TaskConfig

    t = TaskConfig(name="chain", calib="c.jsonl", until=["\n", "Q:"], max_new_tokens=64,
                   extract=r"The answer is (\S+)\.")
    assert t.until == ["\n", "Q:"] and t.max_new_tokens == 64
    with pytest.raises(ValueError, match=r"task 'chain': extract regex '\[' does not compile"):
        TaskConfig(name="chain", calib="c.jsonl", extract="[")


def test_chain_extract_scored_by_generation_equals_hf_generate(tmp_path, nl_model):
    """until with two stop strings and an extract regex: every example generated (no one-pass), the
    output cut at the first stop as lm-eval does, the answer extracted, gold chains reduced alike."""
    model, tok = nl_model
    texts = prompts(24, seed=5)
    until = ("q", "\n\n")  # a one-token stop and a two-token one
    outs = hf_greedy(model, tok, texts, 24, until=until)
    regex = r"t(\w)"
    rows = []
    for i, (p, o) in enumerate(zip(texts, outs)):
        rows.append({"id": f"c{i}", "prompt": p, "answer": ("chain " + o) if i % 2 == 0 else "zz"})
    f = tmp_path / "chain.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f, until=list(until), max_new_tokens=24, extract=regex)
    res = Evaluator(model, tok, [task], batch_size=7).evaluate()
    recs = {r["id"]: r for r in res.records[task.name]}
    assert all(r["decided_by"] == "generation" for r in recs.values())
    for i, (row, o) in enumerate(zip(rows, outs)):
        rec = recs[row["id"]]
        assert rec["output"] == o
        found = re.search(regex, o)
        gold = re.search(regex, row["answer"])
        expected = found is not None and found.group(1) == (gold.group(1) if gold else row["answer"])
        assert rec["exact_match"] == float(expected), (o, row["answer"])
        assert rec["logprob"] is None  # no teacher-forced pass over the gold chain unless asked
    assert 0 < res.primary(task.name) < 1 and "logprob" not in res.scores[task.name]

    # asked for (a study with objectives.smooth > 0), the gold chain's log-probability comes too: the same
    # decisions, and each record's log-probability is the one of its gold chain under greedy's model
    with_lp = Evaluator(model, tok, [task], batch_size=7, gold_logprob=True).evaluate()
    assert [r["output"] for r in with_lp.records[task.name]] == [r["output"] for r in res.records[task.name]]
    assert with_lp.scores[task.name]["exact_match"] == res.scores[task.name]["exact_match"]
    lps = {r["id"]: r["logprob"] for r in with_lp.records[task.name]}
    row = rows[1]
    enc = tok(row["prompt"] + row["answer"], return_tensors="pt").input_ids
    n_prompt = len(tok(row["prompt"]).input_ids)
    with torch.inference_mode():
        logp = torch.log_softmax(model(enc).logits[0, :-1].double(), -1)
    expected = logp[torch.arange(n_prompt - 1, enc.shape[1] - 1), enc[0, n_prompt:]].sum().item()
    assert lps[row["id"]] == pytest.approx(expected, abs=1e-4)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, match", [
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n', r"g\.jsonl:2: invalid JSON"),
    ('{"prompt": "a"}\n', r"g\.jsonl:1: a row needs"),
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "p", "choices": ["a", "b"], "label": 0}\n', r"g\.jsonl:2: mixes"),
    ('{"prompt": "p", "choices": ["a", "b"], "label": 2}\n', r"g\.jsonl:1: \"label\""),
    ('{"prompt": "p", "answer": ""}\n', r"g\.jsonl:1: \"answer\""),
    ("\n\n", r"g\.jsonl: the split has no examples"),
    ("[1, 2]\n", r"g\.jsonl:1: expected a JSON object"),
])
def test_malformed_jsonl(tmp_path, content, match):
    f = tmp_path / "g.jsonl"
    f.write_text(content)
    with pytest.raises(TaskError, match=match):
        load_task(f)


def test_unknown_metric_and_files(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(TaskError, match=r"unknown metric 'exact_matc'.*did you mean 'exact_match'"):
        load_task(f, metric="exact_matc")
    with pytest.raises(TaskError, match="not found"):
        load_task(tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="unknown task file type"):
        load_task(shutil.copy(f, tmp_path / "g.txt"))
    bb = tmp_path / "bb.json"
    bb.write_text(json.dumps({"examples": [], "metrics": ["exact_str_match"]}))
    with pytest.raises(TaskError, match="bb.json: the task has no examples"):
        load_task(bb)
    bb.write_text(json.dumps({"examples": [{"input": "a", "target": "b"}], "metrics": ["bleu"]}))
    with pytest.raises(TaskError, match="none of the task's metrics"):
        load_task(bb)
    bb.write_text('{"examples": [\n  {"input": "a",, }]}')
    with pytest.raises(TaskError, match=r"bb.json:2: invalid JSON"):
        load_task(bb)


def test_prompt_longer_than_context(tmp_path, nl_model):
    model, tok = nl_model
    f = tmp_path / "long.jsonl"
    f.write_text('{"prompt": "short", "answer": "x"}\n' + json.dumps({"prompt": "y" * 300, "answer": "x"}) + "\n")
    with pytest.raises(TaskError, match=r"long\.jsonl:2: .*longer than the model's context of 256"):
        Evaluator(model, tok, [load_task(f)])


# --- the fast path against plain references ---------------------------------------------------------


def test_one_pass_exact_match_equals_generation_and_hf_generate(tmp_path, nl_model):
    model, tok = nl_model
    task = load_task(own_answer_jsonl(tmp_path / "own.jsonl", model, tok))
    fast = Evaluator(model, tok, [task], batch_size=16).evaluate()
    slow = Evaluator(model, tok, [task], batch_size=16, shortcut=False).evaluate()
    recs_fast, recs_slow = fast.records[task.name], slow.records[task.name]
    # a random model often emits <pad> (decoded as nothing), which only generation can settle: both
    # paths of the fast evaluator are exercised here
    assert 5 <= sum(r["decided_by"] == "one-pass" for r in recs_fast) < len(recs_fast)
    assert all(r["decided_by"] == "generation" for r in recs_slow)
    assert [r["exact_match"] for r in recs_fast] == [r["exact_match"] for r in recs_slow]
    assert 0.3 <= fast.primary(task.name) <= 0.7  # about half are the model's own outputs: non-trivial
    reference = dict(zip((f"ex{i}" for i in range(40)),
                         hf_greedy(model, tok, [e.prompt for e in sorted(task.examples, key=lambda e: e.line)], 32)))
    for f, s in zip(recs_fast, recs_slow):
        assert s["output"] == reference[s["id"]]  # KV-cache generation == HF generate
        assert f["exact_match"] == float(reference[f["id"]] == next(e.answers[0] for e in task.examples
                                                                   if e.id == f["id"]))
        if f["output"] is not None:
            assert f["output"] == s["output"]
        if f["decided_by"] == "one-pass":
            assert s["output"].startswith(f["output_prefix"].split("\n")[0])
        assert f["logprob"] == pytest.approx(s["logprob"], abs=1e-5)


def test_bf16_one_pass_decides_most_examples_and_equals_generation():
    """In bf16 the tie guard is 8 eps of the top logit (`_scoring.tie_tolerance`); at 64 eps, as in float32,
    half the top logit, no example of these experts was decided by one pass. The shipped demo zoo's experts
    on their own calib questions: every one-pass decision equals generation's, and most are one-pass (243
    of 300 for the five skills, 60 each, when this was written; 182 at 16 eps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.zoo import load_manifest
    from mergesearch.zoo.shipped import shipped_zoo

    zoo = shipped_zoo("demo")
    m = load_manifest(zoo)
    tok = AutoTokenizer.from_pretrained(zoo / m["base"])
    decided = total = 0
    for skill in ("reverse", "sort", "chain"):
        model = AutoModelForCausalLM.from_pretrained(zoo / m["experts"][skill], dtype=torch.bfloat16).eval()
        task = load_task(str(zoo / m["data"][skill]["calib"]), name=skill, limit=40)
        fast = Evaluator(model, tok, [task], batch_size=16).evaluate().records[skill]
        slow = Evaluator(model, tok, [task], batch_size=16, shortcut=False).evaluate().records[skill]
        assert [r["exact_match"] for r in fast] == [r["exact_match"] for r in slow], skill
        decided += sum(r["decided_by"] == "one-pass" for r in fast)
        total += len(fast)
    assert decided >= total // 2, f"{decided}/{total} decided by one pass in bf16"


def test_gold_logprob_matches_plain_forward(tmp_path, nl_model):
    model, tok = nl_model
    task = load_task(own_answer_jsonl(tmp_path / "own.jsonl", model, tok, n=12))
    res = Evaluator(model, tok, [task], batch_size=5).evaluate()
    for rec in res.records[task.name]:
        ex = next(e for e in task.examples if e.id == rec["id"])
        p, a = tok(ex.prompt).input_ids, tok(ex.answers[0]).input_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].float(), -1)
        ref = sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(a))
        assert rec["logprob"] == pytest.approx(ref, abs=1e-4)


def _plain_choice_lls(model, tok, prompt: str, choices) -> list[float]:
    """Reference: one full forward pass per choice, lm-eval's whitespace convention written out."""
    ctx = prompt.rstrip()
    out = []
    for c in choices:
        whole = tok(prompt + c).input_ids
        n = len(tok(ctx).input_ids)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        out.append(sum(lp[t - 1, whole[t]].item() for t in range(n, len(whole))))
    return out


def test_choice_scores_match_plain_per_choice_passes(tmp_path, nl_model):
    model, tok = nl_model
    rng = random.Random(0)
    f = tmp_path / "mc.jsonl"
    rows = []
    for i, p in enumerate(prompts(20, seed=3)):
        k = rng.randint(2, 5)
        choices = ["".join(rng.choice("abcxyz\n ") for _ in range(rng.randint(1, 6))).strip() or "q" for _ in range(k)]
        if i % 4 == 0:
            choices = ["ab", "abc", "a"][: max(2, k)]  # shared prefixes and a choice that is a prefix of another
        rows.append({"id": i, "prompt": p, "choices": choices, "label": rng.randrange(len(choices))})
    rows.append(dict(rows[1], id="dup"))  # duplicate rows are scored once and reported twice
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f)
    res = Evaluator(model, tok, [task], batch_size=6).evaluate()
    for rec in res.records[task.name]:
        ex = next(e for e in task.examples if e.id == rec["id"])
        ref = _plain_choice_lls(model, tok, ex.prompt, ex.choices)
        assert rec["lls"] == pytest.approx(ref, abs=1e-4)
        pred = max(range(len(ref)), key=ref.__getitem__)
        assert rec["acc"] == float(pred == ex.label)
        norm = [v / len(c) for v, c in zip(ref, ex.choices)]
        assert rec["acc_norm"] == float(max(range(len(norm)), key=norm.__getitem__) == ex.label)
    assert res.n[task.name] == 21
    assert res.scores[task.name]["acc"] == pytest.approx(sum(r["acc"] for r in res.records[task.name]) / 21)


def test_bigbench_choice_credit_is_multiple_choice_grade(nl_model):
    model, tok = nl_model
    task = load_task(ADDITION, metric="acc", limit=12)
    res = Evaluator(model, tok, [task]).evaluate()
    for rec in res.records[task.name]:
        ex = next(e for e in task.examples if e.id == rec["id"])
        assert rec["acc"] == ex.credit[rec["pred"]]


def test_slices_running_result_and_final_equal(tmp_path, nl_model):
    model, tok = nl_model
    gen = load_task(own_answer_jsonl(tmp_path / "own.jsonl", model, tok, n=30))
    mc = load_task(ADDITION, metric="acc", limit=20, name="add_mc")
    ev = Evaluator(model, tok, [gen, mc], batch_size=8)
    full = ev.evaluate()
    running = list(ev.iter_slices(4))
    assert len(running) == 4 and [r.complete for r in running] == [False, False, False, True]
    assert [r.n[gen.name] for r in running] == [8, 15, 22, 30]  # rounded quarters, in the seeded order
    assert [r["id"] for r in running[0].records[gen.name]] == [e.id for e in gen.examples[:8]]
    last = running[-1]
    for t in (gen.name, mc.name):
        for m, v in full.scores[t].items():
            assert last.scores[t][m] == pytest.approx(v, abs=1e-6)
    assert full.mean == pytest.approx((full.primary(gen.name) + full.primary(mc.name)) / 2)
    assert json.dumps(full.to_dict())  # serialisable
    # The caller never runs in inference mode: not between slices, nor after abandoning the generator
    # (a pruned trial does), or a later backward (the fit, a zoo build) fails for want of a graph.
    slices = ev.iter_slices(4)
    next(slices)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    del slices
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_weights_overwritten_in_place_are_reread(tmp_path, nl_model):
    model, tok = nl_model
    other, _ = newline_model(tmp_path / "other", seed=5)
    task = load_task(own_answer_jsonl(tmp_path / "own.jsonl", model, tok, n=20))
    mc = load_task(ADDITION, metric="acc", limit=10, name="add_mc")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ev = Evaluator(model, tok, [task, mc])
    first = ev.evaluate()
    try:
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(other.state_dict()[name])
        second = ev.evaluate()
        fresh = Evaluator(other, tok, [task, mc]).evaluate()
    finally:
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(saved[name])
    assert second.scores == fresh.scores
    assert second.scores != first.scores


def test_nan_logits_are_scored_by_generation_not_a_crash(tmp_path, nl_model):
    """A merge whose forward overflows gives NaN logits: the one-pass shortcut proves nothing there (no token is
    within reach of a NaN top; it once indexed an empty list of ties) and generation scores every example."""
    model, tok = nl_model
    task = load_task(own_answer_jsonl(tmp_path / "own.jsonl", model, tok, n=8))
    saved = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight[5] = float("nan")
        result = Evaluator(model, tok, [task]).evaluate()
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    recs = result.records[task.name]
    assert len(recs) == 8 and {r["decided_by"] for r in recs} == {"generation"}
    assert result.primary(task.name) == 0.0


def test_eval_result_table_and_primary():
    r = EvalResult(scores={"a": {"exact_match": 0.5, "logprob": -1.0}, "b": {"acc": 1.0}},
                   metric={"a": "exact_match", "b": "acc"}, n={"a": 2, "b": 1}, seconds=0.1)
    assert r.primary("a") == 0.5 and r.mean == 0.75
    assert [row[:2] for row in r.table()] == [("a", "exact_match"), ("a", "logprob"), ("b", "acc")]


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_eval_table_and_json(tmp_path, nl_model, capsys):
    from mergesearch.cli import main

    model, tok = nl_model
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    jsonl = own_answer_jsonl(tmp_path / "own.jsonl", model, tok, n=10)
    out = tmp_path / "scores.json"
    rc = main(["eval", str(folder), "--task", str(jsonl), "--task", str(ADDITION), "--limit", "6",
               "--json", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "task" in text and "exact_match" in text and "own" in text and "1_digit_addition" in text
    data = json.loads(out.read_text())
    assert data["n"] == {"own": 6, "1_digit_addition": 6} and set(data["records"]) == {"own", "1_digit_addition"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["eval", str(folder), "--task", str(bad)]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err


def test_cli_eval_scores_a_chain_as_the_study_does(tmp_path, capsys):
    """`eval` takes a chain task's decoding keys (--until, --max-new-tokens, --extract) and a study's own tasks
    (--study): both give the scores of the task as the study declares it; without the keys the chain's whole
    output is compared with the gold chain instead."""
    import yaml

    from mergesearch.cli import main
    from mergesearch.config import load_config
    from mergesearch.evaluate.run import load_model
    from mergesearch.study.workbench import load_tasks
    from mergesearch.zoo import load_manifest, study_inputs
    from mergesearch.zoo.shipped import shipped_zoo
    from mergesearch.zoo.skills import get_skill

    zoo = shipped_zoo("demo")
    m = load_manifest(zoo)
    expert = zoo / m["experts"]["chain"]
    data = zoo / m["data"]["chain"]["test"]
    keys = get_skill("chain").task_settings()
    model, tok = load_model(expert, "cpu")
    want = Evaluator(model, tok, [load_task(data, limit=12, seed=0, name="chain", **keys)]).evaluate()

    def run(*extra) -> dict:
        out = tmp_path / "scores.json"
        assert main(["eval", str(expert), "--device", "cpu", "--json", str(out), *extra]) == 0, capsys.readouterr().err
        return json.loads(out.read_text())

    typed = [a for u in keys["until"] for a in ("--until", u.encode("unicode_escape").decode())]  # "\\n" typed
    got = run("--task", str(data), "--limit", "12", *typed, "--max-new-tokens", str(keys["max_new_tokens"]),
              "--extract", keys["extract"])
    name = data.stem
    assert got["scores"][name]["exact_match"] == want.scores["chain"]["exact_match"]
    assert [r["extracted"] for r in got["records"][name]] == [r["extracted"] for r in want.records["chain"]]
    assert all(r["decided_by"] == "generation" for r in got["records"][name])
    assert any(r["exact_match"] for r in got["records"][name])  # the chain's own expert gets some right
    plain = run("--task", str(data), "--limit", "12", "--max-new-tokens", str(keys["max_new_tokens"]))
    assert all(r.get("extracted", r["output"]) == r["output"] for r in plain["records"][name])  # the whole output
    assert any(r["extracted"] != r["output"] for r in got["records"][name])  # the answer out of the chain

    models, tasks = study_inputs(zoo)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"models": models, "merge": {"method": "task_arithmetic", "device": "cpu"},
                                     "objectives": {"tasks": [{**t, "limit": 12} for t in tasks if t["name"] == "chain"]},
                                     "study": {"name": "s", "n_trials": 1, "seed": 0}}))
    got = run("--study", str(study), "--split", "calib")
    calib = Evaluator(model, tok, load_tasks(load_config(study), "calib")).evaluate()
    assert got["n"] == {"chain": 12} and got["scores"]["chain"]["exact_match"] == calib.scores["chain"]["exact_match"]
    assert main(["eval", str(expert), "--study", str(study), "--task", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["eval", str(expert)]) == 2 and "--study" in capsys.readouterr().err


# --- the one-pass decision on tokenizers with several tokenisations per string (BPE) ------------------


def bpe_newline_model(path: Path, seed: int = 0):
    """A tiny random Llama over a byte-level BPE trained on the prompts' own text (as the zoo's `bpe`),
    newline-prone like `newline_model`, so greedy outputs are a few multi-character tokens long."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from mergesearch.zoo.tokenizer import build_bpe_tokenizer

    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 6))) for _ in range(1500)]
    tok = build_bpe_tokenizer([f"Q: Reverse the word {w}.\nA: {w[::-1]}\n" for w in words], 400)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok))).eval()
    nl = tok("\n", add_special_tokens=False).input_ids[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.lm_head.weight[[0, 1, 3]] = 0.0  # <pad>, <s>, <unk>: a trained model does not emit them
        model.lm_head.weight[nl] = 0.8 * model.lm_head.weight[300] + 0.5 * torch.randn(32, generator=g)
    model.config.max_position_embeddings = 256
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return _load(path)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    return bpe_newline_model(tmp_path_factory.mktemp("bpe") / "m")


def test_bpe_one_pass_equals_generation_and_hf_generate(tmp_path, bpe_model):
    model, tok = bpe_model
    from mergesearch.evaluate._scoring import decode_is_prefix_stable, tokenizer_is_unique

    assert decode_is_prefix_stable(tok) and not tokenizer_is_unique(tok)
    texts = prompts(60, seed=5)
    outs = hf_greedy(model, tok, texts, 32)
    rows = []
    for i, (p, o) in enumerate(zip(texts, outs)):
        # two in three: the model's own output (greedy's tokens need not be the answer's own tokens)
        answer = (o[:-1] + "#" if len(o) > 1 else "zz") if i % 3 == 1 else o
        rows.append({"id": f"ex{i}", "prompt": p, "answer": answer or "q"})
    f = tmp_path / "bpe.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f)
    fast = Evaluator(model, tok, [task], batch_size=16).evaluate()
    slow = Evaluator(model, tok, [task], batch_size=16, shortcut=False).evaluate()
    reference = dict(zip((f"ex{i}" for i in range(60)), outs))
    answers = {r["id"]: r["answer"] for r in rows}
    for fr, sr in zip(fast.records[task.name], slow.records[task.name]):
        assert sr["output"] == reference[sr["id"]]
        assert fr["exact_match"] == sr["exact_match"] == float(reference[fr["id"]] == answers[fr["id"]])
        if fr["decided_by"] != "generation":  # one pass, or more along greedy's own tokens
            assert (sr["output"] + "\n").startswith(fr["output_prefix"])
            if fr["output"] is not None:
                assert fr["output"] == sr["output"]
    assert 0.2 < fast.primary(task.name) < 0.9
    assert fast.one_pass[task.name] >= 0.8 * len(rows) and slow.one_pass[task.name] == 0
    # misses are decided in the pass too, not only hits
    assert any(r["decided_by"] == "one-pass" and r["exact_match"] == 0 for r in fast.records[task.name])


def test_bigbench_default_regex_one_pass_equals_generation(tmp_path, nl_model):
    """BIG-bench exact_str_match with neither output_regex nor stop_string: its default regex
    (the first run outside .?!;\\n) is decided in one pass, with the same result as generation."""
    model, tok = nl_model
    inputs = [p.removeprefix("Q: ").removesuffix("\nA: ") for p in prompts(40, seed=9)]
    outs = hf_greedy(model, tok, ["\nQ: " + x + "\nA: " for x in inputs], 32)  # BIG-bench's formatting
    examples = []
    for i, (x, o) in enumerate(zip(inputs, outs)):
        first = next(iter(re.findall(r"[^\.\?\!\;\n]+", o)), "")
        target = [first or "x", o + "!", "zz", o[:1] or "y"][i % 4]  # hit, never (a break inside), miss, prefix
        examples.append({"input": x, "target": target})
    bb = tmp_path / "bb_default_regex.json"
    bb.write_text(json.dumps({"name": "bbd", "metrics": ["exact_str_match"], "preferred_score": "exact_str_match",
                              "examples": examples}))
    task = load_task(bb)
    assert task.output_regex == r"[^\.\?\!\;\n]+" and task.bigbench_stop_string is None
    fast = Evaluator(model, tok, [task], batch_size=16).evaluate()
    slow = Evaluator(model, tok, [task], batch_size=16, shortcut=False).evaluate()
    assert [r["exact_match"] for r in fast.records[task.name]] == [r["exact_match"] for r in slow.records[task.name]]
    assert 0 < fast.primary(task.name) < 1
    assert fast.one_pass[task.name] >= 10


@pytest.mark.parametrize("regex", [None, r"[^\.\?\!\;\n]+"])
def test_decide_agrees_with_every_continuation(regex):
    """Whatever `decide` settles from a proven prefix holds for every continuation greedy could add."""
    import itertools

    from mergesearch.evaluate._scoring import decide
    from mergesearch.evaluate.tasks import Task

    task = Task(name="t", kind="generate", metric="exact_match", source="t", output_regex=regex)
    alphabet = "ab.\n"
    strings = ["".join(s) for n in range(4) for s in itertools.product(alphabet, repeat=n)]
    rng = random.Random(0)
    decided = 0
    for _ in range(400):
        text = rng.choice(strings[1:])
        answers = tuple(rng.sample([s for s in strings if s and "\n" not in s], rng.randint(1, 2)))
        match, output = decide(text, False, True, task, answers)
        truths = {postprocess(text + rest, task) in answers for rest in strings}
        if match is not None:
            decided += 1
            assert truths == {match}, (text, answers)
            if output is not None:
                assert all((text + rest).split("\n")[0] == output for rest in strings)
        assert decide(text, True, True, task, answers)[0] == (postprocess(text, task) in answers)
        assert decide(text, False, False, task, answers) == (None, None)  # a decode that may rewrite text
    assert decided > 100


def test_scoring_emits_no_future_warning(tmp_path, nl_model):
    import warnings

    model, tok = nl_model
    gen = load_task(own_answer_jsonl(tmp_path / "own.jsonl", model, tok, n=12))
    mc = load_task(ADDITION, metric="acc", limit=6, name="add_mc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning (e.g. `past_key_values`) fails the test
        Evaluator(model, tok, [gen, mc], batch_size=4).evaluate()
        Evaluator(model, tok, [gen], batch_size=4, shortcut=False).evaluate()


def test_cli_eval_limit_help_says_random_subset(capsys):
    from mergesearch.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "random subset drawn with --seed" in text and "lm-eval's --limit takes the first N" in text


def test_prefix_stable_decoders():
    """Misses are decided from a text prefix only for decoders that only ever append text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from mergesearch.evaluate._scoring import decode_is_prefix_stable

    def wrap(decoder, cleanup=False):
        t = Tokenizer(models.BPE())
        t.decoder = decoder
        return PreTrainedTokenizerFast(tokenizer_object=t, clean_up_tokenization_spaces=cleanup)

    assert decode_is_prefix_stable(wrap(decoders.ByteLevel()))  # GPT-2, Llama 3, Qwen
    llama2 = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                decoders.Strip(" ", 1, 0)])
    assert decode_is_prefix_stable(wrap(llama2))
    assert not decode_is_prefix_stable(wrap(decoders.ByteLevel(), cleanup=True))  # " ." becomes "."
    assert not decode_is_prefix_stable(wrap(decoders.Strip(" ", 0, 1)))  # a trailing strip
    assert not decode_is_prefix_stable(wrap(decoders.WordPiece()))


@pytest.mark.parametrize("n_tied", [2, 3, 4])
def test_a_near_tie_of_tokens_that_all_part_from_the_answer_is_decided_in_one_pass(tmp_path, n_tied):
    """A hook ties n_tied tokens ("x", "y", ...) at the top of every position, so greedy takes one of them (float
    noise would decide which). Where none of them is the answer's next token every start greedy can take parts
    from the answer: wrong, decided by the one pass, as generation decides it. Where the answer's next token is
    one of them, or more than TIED_MOST tokens tie, only generation can tell."""
    from mergesearch.evaluate import _scoring

    model, tok = newline_model(tmp_path / "m")
    tied = tok.convert_tokens_to_ids(["x", "y", "w", "v"][:n_tied])

    def tie(module, args, out):
        out = out.clone()
        out[..., tied] = out.max(-1, keepdim=True).values + 1.0
        return out

    model.lm_head.register_forward_hook(tie)
    rows = [{"id": f"a{i}", "prompt": p, "answer": "abc"} for i, p in enumerate(prompts(6, seed=1))]
    rows += [{"id": f"x{i}", "prompt": p, "answer": "xyz"} for i, p in enumerate(prompts(6, seed=2))]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(path)
    fast = Evaluator(model, tok, [task], batch_size=4).evaluate().records[task.name]
    slow = Evaluator(model, tok, [task], batch_size=4, shortcut=False).evaluate().records[task.name]
    assert [r["exact_match"] for r in fast] == [r["exact_match"] for r in slow] == [0.0] * 12
    by = {r["id"]: r["decided_by"] for r in fast}
    parting = n_tied <= _scoring.TIED_MOST
    assert all(by[f"a{i}"] == ("one-pass" if parting else "generation") for i in range(6)), by
    assert all(by[f"x{i}"] == "generation" for i in range(6)), by  # "x", the answer's first token, is tied
