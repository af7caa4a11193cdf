import textwrap

import pytest

from mergesearch.config import load_config
from mergesearch.errors import ConfigError

GOOD = """
models:
  base: zoo/base
  experts: [zoo/expert-reverse, zoo/expert-uppercase]
merge: {method: ties, dtype: bfloat16}
space:
  granularity: per_layer
  parameters:
    density: {low: 0.2, high: 0.9}
    lambda: {fixed: 1.0}
objectives:
  tasks:
    - {name: reverse, calib: zoo/data/reverse.calib.jsonl, test: zoo/data/reverse.test.jsonl}
    - {name: upper, calib: lmeval:zoo_upper}
study: {name: s1, n_trials: 7, sampler: cmaes}
"""


def write(tmp_path, text, name="study.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_config_resolves_paths(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.models.experts["reverse"] == tmp_path / "zoo/expert-reverse"
    assert cfg.objectives.tasks[0].calib == str(tmp_path / "zoo/data/reverse.calib.jsonl")
    assert cfg.objectives.tasks[1].calib == "lmeval:zoo_upper"
    assert cfg.space.parameters["lambda"].fixed == 1.0
    assert cfg.storage_url == f"sqlite:///{tmp_path / 's1.db'}"
    assert cfg.study.pruner == "median" and cfg.merge.device == "auto"


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), {"study.n_trials": 99})
    assert cfg.study.n_trials == 99


def test_space_file_in_search_spaces(tmp_path):
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "g.yaml").write_text("granularity: global\n")
    (tmp_path / "studies").mkdir()
    cfg = load_config(write(tmp_path / "studies", GOOD.replace(
        "space:\n  granularity: per_layer\n  parameters:\n    density: {low: 0.2, high: 0.9}\n"
        "    lambda: {fixed: 1.0}\n", "space: g.yaml\n")))
    assert cfg.space.granularity == "global"


@pytest.mark.parametrize("bad, pattern", [
    ("models: [unclosed", "malformed YAML"),
    (GOOD.replace("merge: {", "merg: {"), "unknown key 'merg'.*did you mean 'merge'"),
    (GOOD.replace("sampler: cmaes", "samplr: cmaes"), "unknown key 'study.samplr'.*did you mean 'sampler'"),
    # keys further down: a task's, a searched parameter's, a fit knob's (list indices and mapping keys passed)
    (GOOD.replace("test: zoo/data/reverse.test.jsonl}", "test: zoo/data/reverse.test.jsonl, untill: ['Q:']}"),
     r"unknown key 'objectives.tasks.0.untill' \(did you mean 'until'\?\); objectives.tasks.0 takes name, calib,"),
    (GOOD.replace("{low: 0.2, high: 0.9}", "{low: 0.2, hihg: 0.9}"),
     r"unknown key 'space.parameters.density.hihg' \(did you mean 'high'\?\)"),
    (GOOD + "fit: {search: {lr: {low: 0.01, hi: 0.1}}}\n", r"unknown key 'fit.search.lr.hi' \(did you mean 'high'\?\)"),
    (GOOD.replace("merge: {", "merge: {methd: x, "), "unknown key 'merge.methd'.*; merge takes method, dtype"),
    (GOOD.replace("sampler: cmaes", "sampler: annealing"), "study.sampler"),
    (GOOD.replace("n_trials: 7", "n_trials: 0"), "n_trials"),
    (GOOD.replace("{low: 0.2, high: 0.9}", "{low: 0.9, high: 0.2}"), "low 0.9 > high 0.2"),
    (GOOD.replace("test: zoo/data/reverse.test.jsonl", "test: zoo/data/reverse.calib.jsonl"), "same file"),
    (GOOD.replace("dtype: bfloat16", "dtype: int4"), "merge.dtype"),
    (GOOD.replace("granularity: per_layer", "granularity: per_layer\n  chunks: auto"), "chunk_budget"),
    (GOOD + "fit: {chunks: auto}\n", "chunk_budget"),
    (GOOD + "fit: {chunks: 0}\n", "chunks must be >= 1"),
    # fit knobs: choices only for the str settings, and only among their own values; a number takes a range
    (GOOD + "fit: {search: {objective: {choices: [supervised, distil]}}}\n",
     r"fit.search: objective: 'distil' is not one of supervised, distill \(did you mean 'distill'\?\)"),
    (GOOD + "fit: {search: {granularity: {low: 1, high: 2}}}\n", "fit.search: granularity takes choices"),
    (GOOD + "fit: {search: {lr: {choices: [fast]}}}\n", "fit.search: lr is a number: give low and high"),
    (GOOD + "fit: {search: {lrr: {low: 0.01, high: 0.1}}}\n", "fit.search: unknown knob 'lrr' \\(did you mean 'lr'\\?\\); the knobs: lr, steps"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_bad_configs_name_file_key_and_reason(tmp_path, bad, pattern):
    path = write(tmp_path, bad)
    with pytest.raises(ConfigError, match=pattern) as exc:
        load_config(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
