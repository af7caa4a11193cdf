"""The generation engine and the lm-eval model on it, checked against HF `generate` and lm-eval's HFLM.

Every path the GPU takes runs here too: fixed shapes (the CUDA-graph step, without the capture), slot
refills, the shared prefix, stop strings over several tokens, the context cap. Tiny random models are
built in the tests; the references are HF `generate` (greedy, left padding) and lm-eval's own HFLM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from mergesearch.errors import TaskError
from mergesearch.evaluate import Evaluator, load_task
from mergesearch.evaluate.engine import GenerationEngine, GenRequest
from test_evaluate import _load, newline_model, prompts

CHAIN = Path(__file__).parent / "data" / "chain"


def hf_tokens(model, tok, texts: list[str], max_new: int, batch: int = 8) -> list[list[int]]:
    """HF `generate` (greedy, left padding) per batch, on the model's device; each row up to and including its
    EOS."""
    out = []
    for lo in range(0, len(texts), batch):
        enc = tok(texts[lo: lo + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            g = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=2)
        for row in g[:, enc.input_ids.shape[1]:].tolist():
            out.append(row[: row.index(2) + 1] if 2 in row else row)
    return out


def engine_tokens(model, tok, texts, max_new, *, until=(), **kw) -> tuple[list[list[int]], GenerationEngine]:
    eng = GenerationEngine(model, pad_id=0, decode=lambda t: tok.decode(t, skip_special_tokens=True), **kw)
    reqs = [GenRequest(tuple(tok(t, add_special_tokens=False).input_ids), max_new, frozenset({2}), tuple(until))
            for t in texts]
    with torch.inference_mode():
        return eng.generate(reqs), eng


@pytest.fixture(scope="module")
def nl_model(tmp_path_factory):
    return newline_model(tmp_path_factory.mktemp("gen") / "m")


# --- the engine against HF generate -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_engine_equals_hf_generate(tmp_path, arch, fixed_shapes):
    """A random model never stops: every row runs its whole budget; rows of different prompt lengths
    share slots (refills), the template prefix is computed once, fixed shapes read the whole cache."""
    model, tok = _load(make_tiny_model(tmp_path / arch, arch))
    texts = prompts(21, seed=2)
    ref = hf_tokens(model, tok, texts, 12)
    got, _ = engine_tokens(model, tok, texts, 12, batch_size=4, fixed_shapes=fixed_shapes)
    assert got == ref


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_engine_stops_rows_and_refills(nl_model, fixed_shapes):
    """Rows end at EOS or a stop string (here one-token "q" and two-token "\\n\\n"); the text cut at the
    first stop equals HF's whole output cut the same way, and stopping saves tokens."""
    model, tok = nl_model
    texts = prompts(30, seed=5)
    ref = hf_tokens(model, tok, texts, 40)
    got, _ = engine_tokens(model, tok, texts, 40, until=("q", "\n\n"), batch_size=6, fixed_shapes=fixed_shapes)

    def cut(tokens):
        text = tok.decode(tokens, skip_special_tokens=True)
        for stop in ("q", "\n\n"):
            text = text.split(stop)[0]
        return text

    assert [cut(g) for g in got] == [cut(r) for r in ref]
    assert sum(map(len, got)) < sum(map(len, ref))  # rows ended at their stop string, not at the budget
    assert any(len(g) < 40 and g[-1] != 2 for g in got)  # some ended on a string, not a token


def test_engine_context_cap_and_empty_batch(tmp_path):
    model, tok = _load(make_tiny_model(tmp_path / "m"))
    texts = prompts(5, seed=1)
    longest = max(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    got, eng = engine_tokens(model, tok, texts, 50, batch_size=2, max_len=longest + 3)
    for t, g in zip(texts, got):
        assert len(tok(t, add_special_tokens=False).input_ids) + len(g) <= longest + 3
    assert eng.generate([]) == []


def test_engine_rereads_weights_written_in_place(nl_model, tmp_path):
    """The materialiser's copy_ changes the weights under a kept engine (and its fixed-shape cache):
    the next run sees them; nothing of the last run's keys and values survives."""
    model, tok = newline_model(tmp_path / "m2")
    other, _ = newline_model(tmp_path / "m3", seed=7)
    texts = prompts(10, seed=3)
    eng = GenerationEngine(model, batch_size=4, pad_id=0, decode=tok.decode, fixed_shapes=True)
    reqs = [GenRequest(tuple(tok(t, add_special_tokens=False).input_ids), 16, frozenset({2})) for t in texts]
    with torch.inference_mode():
        before = eng.generate(reqs)
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)
        after = eng.generate(reqs)
    assert before == hf_tokens(newline_model(tmp_path / "m4")[0], tok, texts, 16)
    assert after == hf_tokens(other, tok, texts, 16) and after != before


# --- the shared prefix attended once (cascade) -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_attention_equals_sdpa_over_the_whole_row(dtype):
    """Prefix once (float32) + each row's tail, one softmax: torch's SDPA over the concatenated keys and
    values (GQA heads expanded as repeat_kv does), with a causal mask and a left-padded row."""
    from mergesearch.evaluate import cascade

    torch.manual_seed(0)
    rows, n_heads, n_kv, q, dim, n_prefix, tail = 3, 6, 2, 4, 8, 11, 7
    query = torch.randn(rows, n_heads, q, dim, dtype=dtype)
    kp, vp = torch.randn(n_kv, n_prefix, dim), torch.randn(n_kv, n_prefix, dim)
    key, value = torch.randn(rows, n_kv, tail, dim, dtype=dtype), torch.randn(rows, n_kv, tail, dim, dtype=dtype)
    qpos = torch.arange(n_prefix + tail - q, n_prefix + tail).expand(rows, q).clone()
    qpos[1, :2] = n_prefix + tail - 1  # pad queries of a left-padded row read up to their own position
    allowed = torch.arange(n_prefix + tail)[None, None] <= qpos[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    class Layer:
        layer_idx = 0

    class Cache:
        prefix_keys, prefix_values = [kp], [vp]

    got, _ = cascade.attention(Layer(), query, key, value, mask, scaling=0.3, **{cascade.KWARG: Cache()})
    whole_k = torch.cat([kp.expand(rows, -1, -1, -1), key.float()], 2).repeat_interleave(n_heads // n_kv, 1)
    whole_v = torch.cat([vp.expand(rows, -1, -1, -1), value.float()], 2).repeat_interleave(n_heads // n_kv, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(query.float(), whole_k, whole_v,
                                                           attn_mask=mask.float(), scale=0.3).transpose(1, 2)
    assert got.shape == (rows, q, n_heads, dim) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output rounded to bf16 (8 bits of mantissa)
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_attends_a_few_shot_prefix_once(tmp_path, arch, monkeypatch):
    """A long shared few-shot block goes through the cascade attention (counted) and the rows still equal
    HF generate; the model's own attention choice is back after the run."""
    from transformers import AttentionInterface

    from mergesearch.evaluate import cascade

    model, tok = _load(make_tiny_model(tmp_path / arch, arch))
    before = model.config._attn_implementation
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return cascade.attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, cascade.NAME, counted)
    shots = "Q: Reverse the word abc.\nA: cba\n\nQ: Reverse the word hello.\nA: olleh\n\n"
    texts = [shots + t for t in prompts(9, seed=5)]
    ref = hf_tokens(model, tok, texts, 10)
    got, _ = engine_tokens(model, tok, texts, 10, batch_size=4)
    assert got == ref
    assert calls, "the shared prefix was not attended through the cascade"
    assert model.config._attn_implementation == before
    calls.clear()
    engine_tokens(model, tok, texts, 10, batch_size=4, fixed_shapes=True)
    assert not calls  # fixed shapes (the CUDA-graph step) keep a copy of the prefix in every slot


# --- lm-eval tasks through MergesearchLM vs HFLM ----------------------------------------------------------


def _task_copy(tmp_path: Path, name: str) -> Path:
    for f in CHAIN.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / name


def _by_doc(records):
    return {r["id"]: r for r in records}


def test_lmeval_generate_until_agrees_with_hflm(tmp_path, nl_model):
    """The gsm8k-style task (fixed few-shot block, four stop strings, strict and flexible regexes): our
    LM and HFLM give the same generated strings, filtered answers and scores, per document."""
    model, tok = nl_model
    yaml_path = _task_copy(tmp_path, "arith_chain.yaml")
    task = load_task(yaml_path, limit=40)
    ours = Evaluator(model, tok, [task], batch_size=8).evaluate()
    hf = Evaluator(model, tok, [task], batch_size=8, lmeval_hf=True).evaluate()
    a, b = _by_doc(ours.records[task.name]), _by_doc(hf.records[task.name])
    assert len(a) == len(b) == 40
    for doc, rec in a.items():
        assert rec["resps"] == b[doc]["resps"]  # the generated strings, cut at the first stop
        assert rec["filtered_resps"] == b[doc]["filtered_resps"]  # strict-match and flexible-extract
    assert ours.scores[task.name] == pytest.approx(hf.scores[task.name])
    assert len({r["resps"][0][0] for r in a.values()}) > 1  # prompt-dependent outputs


def test_lmeval_loglikelihood_agrees_with_hflm(tmp_path, nl_model):
    model, tok = nl_model
    task = load_task(_task_copy(tmp_path, "arith_choice.yaml"), limit=30)
    ours = Evaluator(model, tok, [task], batch_size=8).evaluate()
    hf = Evaluator(model, tok, [task], batch_size=8, lmeval_hf=True).evaluate()
    a, b = _by_doc(ours.records[task.name]), _by_doc(hf.records[task.name])
    for doc, rec in a.items():
        ll_a = [r[0][0] for r in rec["resps"]]
        ll_b = [r[0][0] for r in b[doc]["resps"]]
        assert ll_a == pytest.approx(ll_b, abs=1e-4)
        assert [r[0][1] for r in rec["resps"]] == [r[0][1] for r in b[doc]["resps"]]  # is_greedy
        assert rec["acc"] == b[doc]["acc"] and rec["acc_norm"] == b[doc]["acc_norm"]
    assert ours.scores[task.name] == pytest.approx(hf.scores[task.name])


def test_lmeval_loglikelihood_agrees_with_hflm_in_bf16(tmp_path):
    """A bf16 model: our path takes its log-softmax in float32, and so does the HFLM check (softmax_dtype); with
    HFLM's default, the model's dtype, its log-likelihoods came out up to 0.087 apart here and 7 of 30 choices
    differed."""
    model, tok = newline_model(tmp_path / "m")
    model = model.to(torch.bfloat16)
    task = load_task(_task_copy(tmp_path, "arith_choice.yaml"), limit=30)
    ours = Evaluator(model, tok, [task], batch_size=8).evaluate()
    hf = Evaluator(model, tok, [task], batch_size=8, lmeval_hf=True).evaluate()
    a, b = _by_doc(ours.records[task.name]), _by_doc(hf.records[task.name])
    for doc, rec in a.items():
        assert [r[0][0] for r in rec["resps"]] == pytest.approx([r[0][0] for r in b[doc]["resps"]], abs=1e-4)
        assert rec["acc"] == b[doc]["acc"]


def test_lmeval_rolling_and_greedy_flags_agree_with_hflm(nl_model):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from mergesearch.evaluate.lmeval_lm import MergesearchLM

    model, tok = nl_model
    ours = MergesearchLM(model=model, tokenizer=tok, batch_size=4, max_length=64)
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", max_length=64)
    # not periodic: HFLM's logits cache groups requests by their tokens, and windows of a periodic text
    # can share them with another split between context and continuation (then HFLM misreads one)
    texts = ["".join(f"Q: Reverse the word {w}.\nA: {w[::-1]}\n" for w in prompts(k, seed=k)) for k in (1, 3, 7)]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), abs=1e-4)
    pairs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(
        [("Q: Reverse the word abc.\nA: ", "cba"), ("", "abc"), ("Q: x\nA:", " \n"), ("Q: x\nA:", " \n")])]
    for (ll_a, g_a), (ll_b, g_b) in zip(ours.loglikelihood(pairs), hf.loglikelihood(pairs)):
        assert ll_a == pytest.approx(ll_b, abs=1e-4) and g_a == g_b


def test_lmeval_model_is_registered_and_greedy_only(nl_model):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from mergesearch.evaluate.lmeval_lm import MergesearchLM

    assert get_model("mergesearch") is MergesearchLM
    model, tok = nl_model
    lm = MergesearchLM(model=model, tokenizer=tok)
    with pytest.raises(TaskError, match="greedily only"):
        lm.generate_until([Instance("generate_until", {}, ("Q: a\nA:", {"do_sample": True, "temperature": 1.0}), 0)])


# --- chains in our own tasks ------------------------------------------------------------------------


def test_chain_jsonl_fixture_scored_by_generation(nl_model):
    """The shipped chain fixture with the chain skill's keys: generation, cut at the newline, the answer
    extracted by the regex; gold chains are reduced to their answer."""
    model, tok = nl_model
    task = load_task(CHAIN / "reverse_upper.test.jsonl", limit=20, until=["\n"], max_new_tokens=48,
                     extract=r"The answer is (\S+)\.")
    assert task.gold(task.examples[0].answers[0]).isupper()
    res = Evaluator(model, tok, [task], batch_size=8).evaluate()
    assert all(r["decided_by"] == "generation" for r in res.records[task.name])
    assert res.primary(task.name) == 0.0  # a random model never writes "The answer is X."
    assert all(r["extracted"] is None for r in res.records[task.name])


def test_export_chain_task_to_lmeval_agrees(tmp_path, nl_model):
    """A JSONL chain task exported as an lm-eval task (until list, extract as its regex filter, gold
    reduced) scores per example as our evaluator does."""
    from mergesearch.evaluate import export_lmeval_task

    model, tok = nl_model
    texts = prompts(24, seed=8)
    outs = [tok.decode(t, skip_special_tokens=True).split("q")[0].split("\n\n")[0]
            for t in hf_tokens(model, tok, texts, 24)]
    rows = [{"id": f"c{i}", "prompt": p, "answer": ("chain " + o) if i % 2 == 0 else "zz"}
            for i, (p, o) in enumerate(zip(texts, outs))]
    f = tmp_path / "chain.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f, until=["q", "\n\n"], max_new_tokens=24, extract=r"t(\w)")
    ours = Evaluator(model, tok, [task], batch_size=8).evaluate()
    lm_task = load_task(export_lmeval_task(task, tmp_path / "export"))
    theirs = Evaluator(model, tok, [lm_task], batch_size=8, lmeval_hf=True).evaluate()
    by_id = {json.loads(line)["id"]: i for i, line in enumerate(
        (tmp_path / "export" / f"{lm_task.name}.jsonl").read_text().splitlines())}
    lm_recs = {r["id"]: r for r in theirs.records[lm_task.name]}
    for rec in ours.records[task.name]:
        s = lm_recs[str(by_id[rec["id"]])]
        assert rec["output"] == s["resps"][0][0]
        assert (rec["extracted"] if rec["extracted"] is not None else "[invalid]") == s["filtered_resps"][0]
        assert rec["exact_match"] == float(s["filtered_resps"][0] == s["target"])
    assert 0 < ours.primary(task.name) < 1
    assert ours.primary(task.name) == pytest.approx(theirs.primary(lm_task.name))
