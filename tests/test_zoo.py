"""The expert zoo: folder layout, offline loading, exact phrasing, disjoint splits, determinism, CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesearch.cli import main
from mergesearch.errors import ConfigError
from mergesearch.zoo import PRESETS, build_zoo, ensure_zoo, get_preset, load_manifest
from mergesearch.zoo.presets import BaseTraining, ExpertTraining, ModelShape, Splits, ZooPreset
from mergesearch.zoo.skills import eval_splits, get_skill, train_stream
from mergesearch.zoo.train import CharCodec, teacher_forced_accuracy

from conftest import ZOO_SEED

# A zoo small enough to build twice in a test: structure and determinism only.
TINY = ZooPreset(
    name="tiny",
    skills=("reverse", "successor"),
    model=ModelShape(layers=1, hidden=32, intermediate=64, heads=2, kv_heads=2),
    base=BaseTraining(steps=12, batch=8, warmup=2),
    expert=ExpertTraining(steps=4, batch=8, warmup=1, l2_weight=1e-3),
    splits=Splits(calib=6, test=5),
    monitor_examples=4,
    monitor_every=4,
    ta_scales=(0.5, 1.0),
)

# The phrasings outside tools rely on, written out independently of the zoo's generators.
PHRASING = {
    "reverse": (re.compile(r"Q: Reverse the word ([a-z]{3,5})\.\nA: "), lambda m: m.group(1)[::-1]),
    "uppercase": (re.compile(r"Q: Uppercase the word ([a-z]{3,5})\.\nA: "), lambda m: m.group(1).upper()),
    "successor": (re.compile(r"Q: What number comes after (\d+)\?\nA: "), lambda m: str(int(m.group(1)) + 1)),
    "sort": (re.compile(r"Q: Sort the letters of ([a-z]{3,5})\.\nA: "), lambda m: "".join(sorted(m.group(1)))),
    "larger": (re.compile(r"Q: Which is larger, (\d+) or (\d+)\?\nA: "),
               lambda m: str(max(int(m.group(1)), int(m.group(2))))),
}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_zoo_layout_and_offline_loading(zoo_test):
    man = load_manifest(zoo_test)
    assert man["preset"] == "test" and man["seed"] == ZOO_SEED
    assert man["skills"][:3] == ["reverse", "uppercase", "successor"] and len(man["skills"]) >= 4
    folders = [man["base"]] + [man["experts"][s] for s in man["skills"]]
    assert folders == ["base"] + [f"expert-{s}" for s in man["skills"]]
    prompt = "Q: Reverse the word kqmz.\nA: "
    for f in folders:
        d = zoo_test / f
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
        assert (d / "tokenizer.json").is_file() and (d / "train_log.jsonl").is_file()
        assert not list(d.glob("*.bin")), "pickle weights must never be written"
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        assert model.config.model_type == "llama"
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids.shape == (1, len(prompt)) and tok.decode(ids[0]) == prompt
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()
        log_rows = _rows(d / "train_log.jsonl")
        assert log_rows and all(("loss" in r) or ("ce" in r) for r in log_rows)


def test_splits_phrasing_answers_and_disjointness(zoo_test):
    man = load_manifest(zoo_test)
    p = get_preset("test")
    for s in man["skills"]:
        calib = _rows(zoo_test / man["data"][s]["calib"])
        test = _rows(zoo_test / man["data"][s]["test"])
        assert len(calib) == p.splits.calib and len(test) == p.splits.test
        pattern, answer = PHRASING[s]
        for r in calib + test:
            m = pattern.fullmatch(r["prompt"])
            assert m, r["prompt"]
            assert r["answer"] == answer(m), r
            if s == "successor":
                assert 0 <= int(m.group(1)) <= 4998
        qc, qt = {r["prompt"] for r in calib}, {r["prompt"] for r in test}
        assert len(qc) == len(calib) and len(qt) == len(test), "duplicate questions inside a split"
        assert not qc & qt, f"{s}: calib and test share questions"
        train = _rows(zoo_test / man["data"][s]["train"])  # few-shot pool, from the training distribution
        assert len(train) == p.splits.train
        for r in train:
            m = pattern.fullmatch(r["prompt"])
            assert m and r["answer"] == answer(m)
            assert r["prompt"] not in qc | qt, f"{s}: a few-shot example is a held-out question"
        ids = [r["id"] for r in calib + test + train]
        assert len(set(ids)) == len(ids)


def test_chain_skill_rows_show_the_steps_and_end_with_the_answer(tmp_path):
    """The chain skill's phrasing, written out independently of its generator: the prompt of the issue and
    a gold chain `reversed -> REVERSED. The answer is REVERSED.` that the evaluator reduces to the answer."""
    from mergesearch.evaluate import load_task

    prompt = re.compile(r"Q: Reverse and uppercase the word ([a-z]{3})\.\nA: ")
    sk = get_skill("chain")
    sp = eval_splits("chain", {"calib": 40, "test": 60}, seed=0)
    finals = {}
    for r in sp["calib"] + sp["test"]:
        w = prompt.fullmatch(r["prompt"]).group(1)
        final = w[::-1].upper()
        assert r["answer"] == f"{w[::-1]} -> {final}. The answer is {final}."
        finals[r["prompt"]] = final
    assert sk.task_settings() == {"until": ["\n"], "max_new_tokens": sk.max_new_tokens,
                                  "extract": r"The answer is (\S+)\."}
    assert sk.max_new_tokens >= max(len(r["answer"]) for r in sp["test"]) + 1  # chain + newline, char tokens
    assert get_skill("reverse").task_settings() == {}
    assert {r["prompt"] for r in sp["calib"]}.isdisjoint(r["prompt"] for r in sp["test"])
    # the evaluator's task reads the chain as gold and scores its final answer
    path = tmp_path / "chain.test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sp["test"]))
    task = load_task(path, name="chain", **sk.task_settings())
    assert task.until == ("\n",) and task.max_new_tokens == sk.max_new_tokens
    for ex in task.examples:
        assert task.gold(ex.answers[0]) == finals[ex.prompt]
        assert task.extract_answer(ex.answers[0] + " Q: more") == finals[ex.prompt]
        assert task.extract_answer(finals[ex.prompt]) is None  # an answer without the chain's ending is wrong


def test_training_draws_avoid_held_out_questions():
    sp = eval_splits("successor", {"calib": 300, "test": 300}, seed=3)
    held = {r["question"] for rows in sp.values() for r in rows}
    stream = train_stream("successor", 3, held)
    draws = [next(stream)[0] for _ in range(3000)]
    assert not held & set(draws)
    # The eval draws themselves repeat for a seed and differ across seeds.
    assert eval_splits("successor", {"calib": 300, "test": 300}, seed=3) == sp
    assert eval_splits("successor", {"calib": 300, "test": 300}, seed=4) != sp


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = build_zoo(tmp_path / "a", TINY, seed=5, progress=False)
    b = build_zoo(tmp_path / "b", TINY, seed=5, progress=False)
    c = build_zoo(tmp_path / "c", TINY, seed=6, progress=False)
    for f in ["base", "expert-reverse", "expert-successor"]:
        ta, tb, tc = (load_file(z / f / "model.safetensors") for z in (a, b, c))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{f}/{k} differs between two builds with one seed"
        assert any(not torch.equal(ta[k], tc[k]) for k in ta)
    for s in TINY.skills:
        for split in ("calib", "test"):
            assert (a / "data" / f"{s}.{split}.jsonl").read_bytes() == (b / "data" / f"{s}.{split}.jsonl").read_bytes()
    ra = json.loads((a / "zoo_report.json").read_text())
    assert ra["rows"] == json.loads((b / "zoo_report.json").read_text())["rows"]
    # Experts really moved, and only a little: a task vector, not a new model.
    base = load_file(a / "base" / "model.safetensors")
    exp = load_file(a / "expert-reverse" / "model.safetensors")
    tv = torch.cat([(exp[k] - base[k]).flatten() for k in base])
    norm = torch.cat([base[k].flatten() for k in base]).norm()
    assert 0 < tv.norm() < 0.5 * norm


def test_ensure_zoo_reuses_a_complete_build(tmp_path):
    first = ensure_zoo(tmp_path, TINY, seed=1, progress=False)
    stamp = (first / "zoo.json").stat().st_mtime_ns
    again = ensure_zoo(tmp_path, TINY, seed=1, progress=False)
    assert again == first and (first / "zoo.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_teacher_forced_accuracy_equals_greedy_generation(zoo_test):
    """The fast check used for monitoring agrees with real greedy decoding (HF generate)."""
    man = load_manifest(zoo_test)
    tok = AutoTokenizer.from_pretrained(zoo_test / "base", local_files_only=True)
    newline = tok.convert_tokens_to_ids("\n")
    codec = CharCodec(tok)
    for name in ["base", man["experts"]["successor"]]:
        model = AutoModelForCausalLM.from_pretrained(zoo_test / name, local_files_only=True).eval()
        rows = [r for s in man["skills"] for r in _rows(zoo_test / man["data"][s]["calib"])[:8]]
        hits = []
        for r in rows:
            ids = tok(r["prompt"], return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=newline,
                                     pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids.shape[1]:])
            hits.append(text == r["answer"] + "\n")
        per_row = [teacher_forced_accuracy(model, codec, [r]) == 1.0 for r in rows]
        assert per_row == hits
        assert teacher_forced_accuracy(model, codec, rows) == pytest.approx(sum(hits) / len(hits))


def test_report_rows_and_summary(zoo_test):
    man = load_manifest(zoo_test)
    rep = json.loads((zoo_test / man["report"]).read_text())
    names = list(rep["rows"])
    assert names[0] == "base" and names[1 : 1 + len(man["skills"])] == [f"expert-{s}" for s in man["skills"]]
    assert "uniform" in names and any(n.startswith("task_arithmetic") for n in names)
    assert any(n.startswith("ties") for n in names)
    for row in rep["rows"].values():
        assert set(row) == set(man["skills"]) | {"mean"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
        assert row["mean"] == pytest.approx(sum(row[s] for s in man["skills"]) / len(man["skills"]))


def test_composition_report_merges_the_chains_parts_alone(zoo_test):
    """On the shipped demo zoo: the chain's parts' experts, each alone and merged by task arithmetic at the scale
    its calib grid chose (not test's), against the chain's own expert; a zoo without a chain has no such table."""
    from mergesearch.zoo import shipped_zoo
    from mergesearch.zoo.tables import composition_report, format_composition

    assert composition_report(zoo_test, load_manifest(zoo_test), progress=False) == {}
    demo = shipped_zoo("demo")
    comp = composition_report(demo, load_manifest(demo), progress=False)
    c = comp["chain"]
    assert c["parts"] == ["reverse", "uppercase"]
    grid = {float(k): v for k, v in c["calib_grid"].items()}
    scale = max(grid, key=grid.get)
    assert c["merge"] == f"task_arithmetic(reverse+uppercase)@{scale:g}"
    assert list(c["rows"]) == ["base", "expert-reverse", "expert-uppercase", c["merge"]]
    assert all(0.0 <= v <= 1.0 for v in c["rows"].values())
    parts = [c["rows"]["expert-reverse"], c["rows"]["expert-uppercase"]]
    assert c["margin"] == pytest.approx(c["rows"][c["merge"]] - max(parts))
    # the chain's own expert (93.0% in the shipped report) is far above either part's: it is not in the merge
    assert c["own_expert"] > max(parts) + 0.2
    assert "merge of the part experts - best part expert" in format_composition(comp)


def test_bad_input_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        get_preset("dem")
    with pytest.raises(ConfigError, match="unknown zoo skill"):
        build_zoo(tmp_path / "z", TINY.model_copy(update={"skills": ("reverse", "revers")}), progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        build_zoo(tmp_path / "full", TINY, progress=False)
    with pytest.raises(ConfigError, match="not a zoo folder"):
        build_zoo(tmp_path / "full", TINY, overwrite=True, progress=False)
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"


def test_cli_zoo_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "test", TINY)
    out = tmp_path / "zoo"
    assert main(["zoo", "build", "--preset", "test", "--out", str(out), "--seed", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "expert-reverse" in text and "uniform" in text and "built in" in text
    man = load_manifest(out)
    assert man["seed"] == 2 and (out / "zoo_report.json").is_file()
    # An existing zoo is kept unless --overwrite is given.
    assert main(["zoo", "build", "--preset", "test", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["zoo", "build", "--preset", "test", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert load_manifest(out)["seed"] == 0


def test_base_cap_takes_a_skill_out_of_the_mix(tmp_path, monkeypatch):
    """Once the monitored accuracy on a skill reaches the cap, the base draws no more of it;
    when every skill is capped the base stops early."""
    import mergesearch.zoo.train as zoo_train
    from mergesearch.zoo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    codec = zoo_train.CharCodec(tok)
    draws = {"reverse": 0, "successor": 0}

    def counting(skill):
        stream = train_stream(skill, 0, set())
        while True:
            draws[skill] += 1
            yield next(stream)

    accs = {"reverse": 1.0, "successor": 0.0}
    monkeypatch.setattr(zoo_train, "teacher_forced_accuracy", lambda model, codec, rows: accs[rows[0]["skill"]])
    monitor = {s: [{"skill": s}] for s in draws}
    cfg = TINY.base.model_copy(update={"steps": 12, "batch": 8, "cap": 0.5})
    hist = zoo_train.train_base(zoo_train.make_model(TINY.model, tok, 0), codec, {s: counting(s) for s in draws}, cfg, 0,
                        tmp_path / "log.jsonl", monitor, 4, progress=False)
    assert hist[0]["capped"] == ["reverse"]
    assert sum(draws.values()) == 12 * 8
    assert draws["reverse"] <= 4 * 8 and draws["successor"] >= 8 * 8  # steps 5-12 drew successor only

    accs["successor"] = 1.0
    zoo_train.train_base(zoo_train.make_model(TINY.model, tok, 0), codec, {s: counting(s) for s in draws}, cfg, 0,
                 tmp_path / "log2.jsonl", monitor, 4, progress=False)
    assert len((tmp_path / "log2.jsonl").read_text().splitlines()) == 4


def test_bpe_tokenizer_is_deterministic_byte_level_and_merges():
    from mergesearch.zoo.tokenizer import build_bpe_tokenizer

    texts = [f"Q: What number comes after {n}?\nA: {n + 1}\n" for n in range(0, 3000, 7)]
    a, b = build_bpe_tokenizer(texts, 300), build_bpe_tokenizer(texts, 300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 300 and a.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    for text in ["Q: What number comes after 1234?\nA: ", "1235\n", "naïve €5 \t x"]:  # any byte round-trips
        ids = a(text, add_special_tokens=False).input_ids
        assert a.decode(ids) == text and a.unk_token_id not in ids
    ids = a("Q: What number comes after 1234?\nA: ", add_special_tokens=False).input_ids
    assert len(ids) < 20 and any(len(a.decode([i])) > 2 for i in ids)  # merges: fewer tokens than characters


def test_cli_zoo_build_bpe(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "test", TINY)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["zoo", "build", "--preset", "test", "--tokenizer", "bpe", "--out", str(out), "--no-progress"]) == 0
    assert "built in" in capsys.readouterr().out
    man = load_manifest(outs[0])
    assert man["config"]["tokenizer"] == "bpe"
    tok = AutoTokenizer.from_pretrained(outs[0] / "base", local_files_only=True)
    spec = json.loads((outs[0] / "base" / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["decoder"]["type"] == "ByteLevel" and len(tok) == TINY.bpe_vocab
    model = AutoModelForCausalLM.from_pretrained(outs[0] / "expert-reverse", local_files_only=True)
    assert model.config.vocab_size == len(tok)
    prompt = _rows(outs[0] / "data" / "reverse.calib.jsonl")[0]["prompt"]
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert len(ids) < len(prompt) and tok.decode(ids) == prompt
    for f in ["base/tokenizer.json", "base/model.safetensors", "expert-reverse/model.safetensors"]:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f"{f} differs between two builds"
    # the char tokenizer stays the default, and a char zoo's cache folder keeps its name
    assert get_preset("test").tokenizer == "char"
    assert ensure_zoo(tmp_path / "cache", TINY, seed=0, progress=False).name.startswith("zoo-tiny-s0-")


@pytest.mark.parametrize("study", ["demo.yaml", "demo_global.yaml"])
def test_demo_studies_use_every_demo_skill_with_its_decoding_keys(study):
    """The demo studies name every expert of the demo preset, and score each skill as the zoo does (the
    chain by its regex on the generated chain): the YAML restates the skill's keys, this keeps them equal."""
    import yaml
    from pathlib import Path

    from mergesearch.config import load_config

    path = Path(__file__).resolve().parent.parent / "studies" / study
    raw = yaml.safe_load(path.read_text())
    skills = get_preset("demo").skills
    assert list(raw["models"]["experts"]) == list(skills)
    assert [t["name"] for t in raw["objectives"]["tasks"]] == list(skills)
    keys = ("until", "max_new_tokens", "extract")
    for t in raw["objectives"]["tasks"]:
        assert {k: t[k] for k in keys if k in t} == get_skill(t["name"]).task_settings(), t["name"]
    cfg = load_config(path)  # validates (paths are not opened)
    assert cfg.objectives.tasks[-1].extract == r"The answer is (\S+)\."


def test_the_composition_study_merges_only_the_chains_parts():
    """studies/demo_compose.yaml merges the experts of the chain's parts (not the chain's own expert) and scores
    the chain with the zoo's decoding keys."""
    import yaml
    from pathlib import Path

    from mergesearch.config import load_config

    path = Path(__file__).resolve().parent.parent / "studies" / "demo_compose.yaml"
    raw = yaml.safe_load(path.read_text())
    chain = get_skill("chain")
    assert chain.parts == ("reverse", "uppercase") and set(chain.parts) <= set(get_preset("demo").skills)
    assert list(raw["models"]["experts"]) == list(chain.parts)
    (task,) = raw["objectives"]["tasks"]
    assert task["name"] == "chain"
    assert {k: task[k] for k in ("until", "max_new_tokens", "extract")} == chain.task_settings()
    assert load_config(path).fit is not None


def test_length_groups_give_the_unsplit_loss():
    """Chain rows are about twice as long as the others: a batch mixing them runs as two forward passes
    (short rows, long rows), with the same mean loss as one padded batch; one-step rows alone never split."""
    from mergesearch.zoo.tokenizer import build_char_tokenizer
    from mergesearch.zoo.train import _answer_ce, make_model

    tok = build_char_tokenizer()
    codec = CharCodec(tok)
    streams = {s: train_stream(s, 0, set()) for s in ("reverse", "successor", "chain")}
    pairs = [("Q: " + q + "\nA: ", a) for s in ("reverse", "chain", "successor", "chain", "reverse", "reverse")
             for q, a in [next(streams[s])]]
    groups = codec.groups(pairs)
    assert [rows for _, _, rows in groups] == [[0, 2, 4, 5], [1, 3]]
    assert len(codec.groups([p for i, p in enumerate(pairs) if i not in (1, 3)])) == 1
    model = make_model(TINY.model, tok, 0).eval()
    ids, mask = codec.batch(pairs)
    with torch.no_grad():
        whole = _answer_ce(model(input_ids=ids).logits, ids, mask)
        split = sum(_answer_ce(model(input_ids=i).logits, i, m, "sum") for i, m, _ in groups) / mask.sum()
        for i, m, rows in groups:  # each group's rows and masks are the unsplit batch's, less padding
            assert torch.equal(m, mask[rows][:, : m.shape[1]]) and not mask[rows][:, m.shape[1]:].any()
    assert split.item() == pytest.approx(whole.item(), rel=1e-5)
