"""Agreement with lm-eval (the standard harness) on the same examples, prompts and model.

lm-eval runs here through its own task machinery (a local task YAML, `dataset_path: json`) and its
HFLM wrapper around the same in-memory model; nothing of our scorer is used on its side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergesearch.evaluate import Evaluator, export_lmeval_task, load_task
from mergesearch.zoo import load_manifest

DATA = Path(__file__).parent / "data"
ADDITION = DATA / "bigbench_arithmetic_1_digit_addition.json"


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def run_lmeval(model, tok, yaml_path: Path, batch_size: int = 32) -> tuple[dict, dict[str, dict]]:
    """lm-eval's own scores and per-document samples (keyed by our example id)."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu",
              max_length=model.config.max_position_embeddings)
    name = yaml_path.stem
    tasks = get_task_dict([name], TaskManager(include_path=str(yaml_path.parent)))
    out = evaluate(lm, tasks, bootstrap_iters=0, log_samples=True, verbosity="WARNING")
    return out["results"][name], {s["doc"]["id"]: s for s in out["samples"][name]}


@pytest.fixture(scope="module", params=["char", "bpe"])
def zoo(request):
    """The test zoo with each tokenizer: char (one tokenisation per string) and byte-level BPE."""
    return request.getfixturevalue("zoo_test" if request.param == "char" else "zoo_test_bpe")


@pytest.fixture(scope="module")
def zoo_model(zoo):
    model, tok = _load(zoo / "expert-successor")
    # BIG-bench prompts with their appended choices need more than the zoo's context; rotary positions
    # extend, and lm-eval reads the same config value, so both sides see the same limit.
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, 320)
    return model, tok


def test_bigbench_exact_match_generation_agrees(tmp_path, zoo, zoo_model):
    model, tok = zoo_model
    # exact_str_match with its own output_regex: decided in one pass only where the output is known
    # (it ended inside the teacher-forced answer), otherwise generated
    task = load_task(ADDITION, limit=40, seed=0)
    ours = Evaluator(model, tok, [task], batch_size=16).evaluate()
    lm_scores, samples = run_lmeval(model, tok, export_lmeval_task(task, tmp_path))
    recs = ours.records[task.name]
    assert len(samples) == len(recs) == 40
    for rec in recs:
        s = samples[rec["id"]]
        assert rec["exact_match"] == float(s["exact_match"])
        if rec["output"] is None:  # decided by teacher forcing, a miss whose rest is unknown
            assert rec["decided_by"] != "generation" and (s["resps"][0][0] + "\n").startswith(rec["output_prefix"])
            continue
        assert rec["output"] == s["resps"][0][0]  # the generated string, before the regex
        assert rec["extracted"] == s["filtered_resps"][0]  # after the regex filter
        assert rec["exact_match"] == float(s["exact_match"])
    assert ours.primary(task.name) == pytest.approx(lm_scores["exact_match,regex"])
    if load_manifest(zoo)["config"]["tokenizer"] == "char":  # the BPE test zoo's model stops at once here
        assert len({r["output"] for r in recs}) > 1  # not one answer to every prompt (its value depends on the zoo)


def test_bigbench_multiple_choice_agrees(tmp_path, zoo_model):
    model, tok = zoo_model
    task = load_task(ADDITION, metric="acc", limit=40, seed=1)
    ours = Evaluator(model, tok, [task], batch_size=16).evaluate()
    lm_scores, samples = run_lmeval(model, tok, export_lmeval_task(task, tmp_path))
    for rec in ours.records[task.name]:
        s = samples[rec["id"]]
        lm_lls = [r[0][0] for r in s["resps"]]  # one (loglikelihood, is_greedy) per choice
        assert rec["lls"] == pytest.approx(lm_lls, abs=1e-4)
        assert rec["acc"] == float(s["acc"]) and rec["acc_norm"] == float(s["acc_norm"])
    assert ours.scores[task.name]["acc"] == pytest.approx(lm_scores["acc,none"])
    assert ours.scores[task.name]["acc_norm"] == pytest.approx(lm_scores["acc_norm,none"])


def _own_answers_half(model, tok, src: Path, out: Path, max_new: int = 16) -> Path:
    """src's questions, half of them answered with the model's own greedy output (hits) and half with an
    answer it does not give (misses): both outcomes occur whatever weights the zoo trained."""
    rows = [json.loads(line) for line in src.read_text().splitlines() if line]
    for start in range(0, len(rows), 32):
        chunk = rows[start: start + 32]
        tok.padding_side = "left"
        enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        with torch.inference_mode():
            g = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        for i, (r, text) in enumerate(zip(chunk, tok.batch_decode(g[:, enc.input_ids.shape[1]:],
                                                                  skip_special_tokens=True))):
            own = text.split("\n")[0]
            if (start + i) % 2 == 0 and own and "\n" in text:
                r["answer"] = own
            elif r["answer"] == own:
                r["answer"] = own + "#"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_zoo_exact_match_one_pass_agrees(tmp_path, zoo):
    # Half of the answers are the model's own greedy output, so hits and misses both occur whatever
    # weights the zoo trained (char or BPE tokenizer).
    model, tok = _load(zoo / "expert-reverse")
    bpe = load_manifest(zoo)["config"]["tokenizer"] == "bpe"
    task = load_task(_own_answers_half(model, tok, zoo / "data" / "reverse.calib.jsonl",
                                       tmp_path / "reverse.calib.jsonl"))
    ours = Evaluator(model, tok, [task], batch_size=16).evaluate()
    lm_scores, samples = run_lmeval(model, tok, export_lmeval_task(task, tmp_path))
    recs = ours.records[task.name]
    if bpe:  # a greedy answer spelt with other tokens than its own takes more passes
        assert ours.one_pass[task.name] >= 0.75 * len(recs)
        assert sum(r["decided_by"] == "generation" for r in recs) <= 0.05 * len(recs)
    else:  # a trained model, char tokens: no pads, near-ties rare (the bound holds on zoos of other machines too)
        assert ours.one_pass[task.name] >= 0.95 * len(recs)
        assert sum(r["decided_by"] == "generation" for r in recs) <= 0.02 * len(recs)
    assert 0 < ours.primary(task.name) < 1
    for rec in recs:
        generated = samples[rec["id"]]["resps"][0][0]
        assert rec["exact_match"] == float(samples[rec["id"]]["exact_match"])
        if rec["output"] is not None:
            assert rec["output"] == generated
        assert (generated + "\n").startswith(rec["output_prefix"])  # what the pass proves, lm-eval generated
    assert ours.primary(task.name) == pytest.approx(lm_scores["exact_match,none"])


def test_shipped_yaml_through_lmeval_equals_fast_path(zoo, zoo_model):
    from mergesearch.evaluate.lmeval import ZOO_TEMPLATE

    model, tok = zoo_model
    data = zoo / "data" / "successor.calib.jsonl"
    lm_task = load_task(ZOO_TEMPLATE, data_files=data)
    fast_task = load_task(data)
    res = Evaluator(model, tok, [lm_task, fast_task], batch_size=16).evaluate()
    assert res.n[lm_task.name] == res.n[fast_task.name] == sum(1 for line in data.read_text().splitlines() if line)
    assert res.primary(lm_task.name) == pytest.approx(res.primary(fast_task.name))
    assert res.metric[lm_task.name] == "exact_match"
    by_id = {r["id"]: r for r in res.records[fast_task.name]}
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for rec in res.records[lm_task.name]:
        doc_id = rows[int(rec["id"])]["id"]
        assert rec["exact_match"] == by_id[doc_id]["exact_match"]


def test_rewritten_task_yamls_live_as_long_as_the_process(zoo_test, tmp_path):
    """A YAML rewritten for local data files (one folder per rewrite, which lm-eval includes whole) lives in one
    temporary folder of the process, removed at its exit: each rewrite had left a folder in the temp dir for good."""
    data = zoo_test / "data" / "successor.calib.jsonl"
    code = ("from mergesearch.evaluate.lmeval import ZOO_TEMPLATE, resolve_lmeval_spec\n"
            "from pathlib import Path\n"
            f"specs = [resolve_lmeval_spec(str(ZOO_TEMPLATE), data_files={str(data)!r})[0] for _ in range(2)]\n"
            "print(len({s.include_path for s in specs}), all(any(Path(s.include_path).glob('*.yaml')) for s in specs))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "True"]  # two folders, each with its YAML, while the process ran
    assert not list(tmp_path.iterdir())  # and nothing left behind
