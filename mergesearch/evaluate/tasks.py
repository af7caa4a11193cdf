"""Calibration tasks as data: JSONL files, BIG-bench JSON task files and lm-eval task specs.

A `Task` holds fully formatted prompts (task prefix, few-shot examples and input/output prefixes
already applied), so the scorer only tokenises strings and the same prompts can be exported to a
local lm-eval task for an independent check.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from mergesearch.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_UNTIL, decoding_problem
from mergesearch.errors import TaskError, did_you_mean
from mergesearch.fileio import atomic_write

log = logging.getLogger(__name__)

Kind = Literal["generate", "choice", "lmeval"]
# The metrics each kind of task can declare; the first one is the default.
METRICS: dict[str, tuple[str, ...]] = {
    "generate": ("exact_match", "logprob"),
    "choice": ("acc", "acc_norm", "logprob"),
}
# BIG-bench names for our metrics.
_BIGBENCH_METRICS = {"exact_str_match": "exact_match", "multiple_choice_grade": "acc"}
# BIG-bench json_task defaults (bigbench/api/json_task.py).
BIGBENCH_DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
    "few_shot_example_separator": "\n",
}
# BIG-bench's output regex when a task sets neither `output_regex` nor `stop_string`.
BIGBENCH_DEFAULT_REGEX = r"[^\.\?\!\;\n]+"
# Decoding defaults of our own exact-match tasks: config.DEFAULT_UNTIL and DEFAULT_MAX_NEW_TOKENS; a task overrides
# them with `until`, `max_new_tokens` and `extract` (config.TaskConfig passes them through; None keeps them).
JSONL_FEWSHOT_DELIMITER = "\n"


@dataclass(frozen=True)
class Example:
    """One scored item. `answers` for generation (any one counts; the first is the gold for logprob),
    `choices` + `label` (+ optional per-choice `credit`, BIG-bench `target_scores`) for multiple choice."""

    id: str
    prompt: str
    line: int
    answers: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    label: int = -1
    credit: tuple[float, ...] | None = None


@dataclass(frozen=True)
class LmEvalSpec:
    """An lm-eval task evaluated by lm-eval itself: a registered name plus an optional include folder."""

    task_name: str
    include_path: str | None = None


@dataclass(frozen=True)
class Task:
    """A calibration task: formatted examples in a seeded order, a declared metric and decoding rules."""

    name: str
    kind: Kind
    metric: str
    source: str
    examples: tuple[Example, ...] = ()
    # stop strings, lm-eval semantics: the generated text is cut at the first occurrence of any of them
    until: tuple[str, ...] = DEFAULT_UNTIL
    # the answer in the (cut) output: group 1 of the first match, or the whole match without a group;
    # no match is wrong. Gold answers the regex matches are reduced the same way (a full gold chain).
    extract: str | None = None
    # BIG-bench post-processing of the generated text; any of them disables the one-pass shortcut.
    output_regex: str | None = None
    bigbench_stop_string: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    lmeval: LmEvalSpec | None = None
    limit: int | None = None
    seed: int = 0
    num_fewshot: int = 0
    metrics: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.examples)

    def cut(self, text: str) -> str:
        """`text` up to the first occurrence of any stop string (lm-eval's generate_until cut)."""
        end = len(text)
        for stop in self.until:
            idx = text.find(stop) if stop else -1
            if 0 <= idx < end:
                end = idx
        return text[:end]

    def extract_answer(self, text: str) -> str | None:
        """The answer `extract` finds in `text` (group 1, or the whole match); `text` itself without a regex."""
        if self.extract is None:
            return text
        match = re.search(self.extract, text)
        if match is None:
            return None
        return match.group(1) if match.re.groups else match.group(0)

    def gold(self, answer: str) -> str:
        """A gold answer as the extracted output is compared with it: reduced by `extract` where it matches."""
        found = self.extract_answer(answer)
        return answer if found is None else found


def check_decoding(until, max_new_tokens, extract, source: str) -> None:
    """Validate the decoding keys of a task: a one-line TaskError naming the key and the fix."""
    problem = decoding_problem(until, max_new_tokens, extract)
    if problem:
        raise TaskError(f"{source}: {problem}")


def _decoding(task: Task, until, max_new_tokens, extract) -> Task:
    """`task` with the decoding keys a config or caller gave (None keeps the task's own)."""
    check_decoding(until, max_new_tokens, extract, task.source)
    if until is None and max_new_tokens is None and extract is None:
        return task
    if task.kind != "generate":
        raise TaskError(f"{task.source}: until, max_new_tokens and extract apply to exact-match (generation) "
                        f"tasks; this is a {task.kind} task")
    new = replace(task, until=task.until if until is None else tuple(u for u in until if u),
                  max_new_tokens=task.max_new_tokens if max_new_tokens is None else max_new_tokens,
                  extract=extract)
    if max_new_tokens is None:  # room for the longest gold answer, as without keys
        new = replace(new, max_new_tokens=gen_budget((len(a) for e in new.examples for a in e.answers),
                                                     new.max_new_tokens))
    return new


def gen_budget(answer_lengths, floor: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """Tokens generated per example where a task sets none: room for the longest gold answer (in characters, at
    least one token each) and the stop, never below `floor`."""
    return max([floor, *(n + 1 for n in answer_lengths)])


def _check_metric(metric: str, kind: str, source: str) -> None:
    allowed = METRICS[kind]
    if metric not in allowed:
        raise TaskError(f"{source}: unknown metric {metric!r} for a {kind} task{did_you_mean(metric, allowed)}; "
                        f"choose from {', '.join(allowed)}")


def _subsample(examples: list[Example], limit: int | None, seed: int, source: str) -> tuple[Example, ...]:
    """A seeded permutation (so slices of it are unbiased running estimates), cut to `limit`."""
    if not examples:
        raise TaskError(f"{source}: the split has no examples; point the task at a non-empty file")
    if limit is not None and limit < 1:
        raise TaskError(f"{source}: limit must be >= 1 (got {limit})")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    return tuple(examples[i] for i in order)


# --- JSONL --------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[Example]:
    examples: list[Example] = []
    kind = None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskError(f"{path}: cannot read the task file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise TaskError(f"{path}: not UTF-8 text; a JSONL task has one JSON object per line") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{where}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected a JSON object with \"prompt\" and \"answer\" or \"choices\"+\"label\"")
        row_kind = "choice" if "choices" in row else "generate" if "answer" in row else None
        if row_kind is None or "prompt" not in row:
            raise TaskError(f"{where}: a row needs \"prompt\" and either \"answer\" (exact match) or "
                            f"\"choices\" and \"label\" (multiple choice); got keys {sorted(row)}")
        if kind is not None and row_kind != kind:
            raise TaskError(f"{where}: mixes {row_kind} and {kind} rows; put each kind in its own file")
        kind = row_kind
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise TaskError(f"{where}: \"prompt\" must be a non-empty string")
        ex_id = str(row.get("id", lineno))
        if row_kind == "generate":
            answer = row["answer"]
            answers = tuple(answer) if isinstance(answer, list) else (answer,)
            if not answers or not all(isinstance(a, str) and a for a in answers):
                raise TaskError(f"{where}: \"answer\" must be a non-empty string (or a list of them)")
            examples.append(Example(ex_id, prompt, lineno, answers=answers))
        else:
            choices, label = row["choices"], row.get("label")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise TaskError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
                raise TaskError(f"{where}: \"label\" must be an integer index into \"choices\" (0..{len(choices) - 1}),"
                                f" got {label!r}")
            examples.append(Example(ex_id, prompt, lineno, choices=tuple(choices), label=label))
    return examples


def _fewshot_jsonl(examples: list[Example], pool: list[Example], k: int, seed: int) -> list[Example]:
    """Prefix each prompt with k solved examples drawn (seeded, per example) from a separate split."""
    out = []
    for i, ex in enumerate(examples):
        rng = random.Random(f"{seed}:{i}")
        candidates = [p for p in pool if p.prompt != ex.prompt]
        shots = rng.sample(candidates, min(k, len(candidates)))
        context = "".join(s.prompt + (s.answers[0] if s.answers else s.choices[s.label]) + JSONL_FEWSHOT_DELIMITER
                          for s in shots)
        out.append(replace(ex, prompt=context + ex.prompt))
    return out


def _load_jsonl(path: Path, *, limit, seed, num_fewshot, fewshot_spec, name, metric) -> Task:
    examples = _read_jsonl(path)
    if not examples:
        raise TaskError(f"{path}: the split has no examples; point the task at a non-empty JSONL file")
    kind = "choice" if examples[0].choices else "generate"
    if num_fewshot:
        if fewshot_spec is None:
            raise TaskError(f"{path}: num_fewshot={num_fewshot} needs a separate few-shot split: pass fewshot_spec "
                            "(e.g. the zoo's train JSONL)")
        pool = _read_jsonl(Path(fewshot_spec))
        if not pool:
            raise TaskError(f"{fewshot_spec}: the few-shot split has no examples")
        if (pool[0].choices != ()) != (kind == "choice"):
            raise TaskError(f"{fewshot_spec}: few-shot rows are not the same kind as {path}")
        examples = _fewshot_jsonl(examples, pool, num_fewshot, seed)
    metric = metric or METRICS[kind][0]
    _check_metric(metric, kind, str(path))
    return Task(name=name or path.name.removesuffix(".jsonl"), kind=kind, metric=metric, source=str(path),
                examples=_subsample(examples, limit, seed, str(path)), limit=limit, seed=seed,
                num_fewshot=num_fewshot, metrics=METRICS[kind],
                max_new_tokens=gen_budget(len(a) for e in examples for a in e.answers)
                if kind == "generate" else DEFAULT_MAX_NEW_TOKENS)


# --- BIG-bench ----------------------------------------------------------------------------------


def _bigbench_format(raw: dict, fmt: dict, rng) -> tuple[str, list[str], list[str], list[float] | None]:
    """BIG-bench `default_format_fn`: (input with prefixes, targets, choice keys, choice scores)."""
    text = raw["input"]
    choices, credit = [], None
    if "target_scores" in raw:
        scores = raw["target_scores"]
        choices, credit = list(scores), [float(v) for v in scores.values()]
        if fmt["append_choices_to_input"]:
            permuted = rng.permutation(sorted(scores))
            text = text + fmt["choice_prefix"] + fmt["choice_prefix"].join(permuted)
    if "target" in raw:
        targets = raw["target"] if isinstance(raw["target"], list) else [raw["target"]]
    else:
        best = max(credit)
        targets = [next(k for k, v in zip(choices, credit) if v == best)]
    return fmt["example_input_prefix"] + text + fmt["example_output_prefix"], [str(t) for t in targets], choices, credit


def _load_bigbench(path: Path, *, limit, seed, num_fewshot, fewshot_spec, name, metric) -> Task:
    import numpy as np

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TaskError(f"{path}: cannot read the task file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise TaskError(f"{path}: not a BIG-bench JSON task (expected an object with an \"examples\" list)")
    if not data["examples"]:
        raise TaskError(f"{path}: the task has no examples")
    declared = [m for m in data.get("metrics", []) if m in _BIGBENCH_METRICS]
    if metric is None:
        preferred = data.get("preferred_score")
        if preferred in _BIGBENCH_METRICS:
            metric = _BIGBENCH_METRICS[preferred]
        elif declared:
            metric = _BIGBENCH_METRICS[declared[0]]
        else:
            raise TaskError(f"{path}: none of the task's metrics {data.get('metrics')} is supported; "
                            f"supported: {', '.join(_BIGBENCH_METRICS)}")
    kind = "generate" if metric in METRICS["generate"] and (metric != "logprob" or "target" in data["examples"][0]) \
        else "choice"
    _check_metric(metric, kind, str(path))
    fmt = {k: data.get(k, v) for k, v in BIGBENCH_DEFAULTS.items()}
    rng = np.random.RandomState(seed)
    formatted = []
    for i, raw in enumerate(data["examples"]):
        where = f"{path}: example {i}"
        if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
            raise TaskError(f"{where}: needs a string \"input\"")
        if kind == "choice" and not isinstance(raw.get("target_scores"), dict):
            raise TaskError(f"{where}: multiple choice needs \"target_scores\" {{choice: score}}")
        if kind == "generate" and "target" not in raw:
            raise TaskError(f"{where}: exact match needs a \"target\"")
        formatted.append(_bigbench_format(raw, fmt, rng))
    if fewshot_spec is not None and num_fewshot:
        pool_task = _load_bigbench(Path(fewshot_spec), limit=None, seed=seed, num_fewshot=0, fewshot_spec=None,
                                   name=None, metric=metric)
        pool = [(e.prompt, list(e.answers) or [e.choices[e.label]]) for e in pool_task.examples]
    else:
        pool = [(p, t) for p, t, _, _ in formatted]
    sep = fmt["few_shot_example_separator"]
    examples = []
    for i, (prompt, targets, choices, credit) in enumerate(formatted):
        if num_fewshot:
            # BIG-bench make_nshot_dataset: shots are other examples, each input followed by a target.
            shot_rng = random.Random(f"{seed}:{i}")
            candidates = [p for p in pool if p[0] != prompt]
            shots = shot_rng.sample(candidates, min(num_fewshot, len(candidates)))
            prompt = sep.join(p + t[0] for p, t in shots) + sep + prompt
        prompt = fmt["task_prefix"] + prompt
        if kind == "generate":
            examples.append(Example(str(i), prompt, i, answers=tuple(targets)))
        else:
            best = max(credit)
            examples.append(Example(str(i), prompt, i, choices=tuple(choices), label=credit.index(best),
                                    credit=tuple(credit)))
    output_regex = data.get("output_regex")
    stop_string = data.get("stop_string")
    if output_regex is None and stop_string is None:
        output_regex = BIGBENCH_DEFAULT_REGEX
    if output_regex is not None:
        try:
            re.compile(output_regex)
        except re.error as exc:
            raise TaskError(f"{path}: output_regex {output_regex!r} does not compile ({exc})") from None
    return Task(name=name or data.get("name") or path.stem, kind=kind, metric=metric, source=str(path),
                examples=_subsample(examples, limit, seed, str(path)), output_regex=output_regex,
                bigbench_stop_string=stop_string, max_new_tokens=gen_budget(len(t) for _, ts, _, _ in formatted for t in ts),
                limit=limit, seed=seed, num_fewshot=num_fewshot, metrics=METRICS[kind])


# --- lm-eval ------------------------------------------------------------------------------------


def _load_lmeval(spec: str, *, limit, seed, num_fewshot, name, metric, data_files) -> Task:
    from mergesearch.evaluate.lmeval import resolve_lmeval_spec

    lm_spec, source = resolve_lmeval_spec(spec, name=name, data_files=data_files)
    return Task(name=name or lm_spec.task_name, kind="lmeval", metric=metric or "", source=source,
                lmeval=lm_spec, limit=limit, seed=seed, num_fewshot=num_fewshot)


def is_lmeval_spec(spec: str) -> bool:
    """Whether a task spec names an lm-eval task: `lmeval:TASKNAME` or a local task `.yaml`."""
    return spec.startswith("lmeval:") or spec.endswith((".yaml", ".yml"))


def load_task(spec: str | os.PathLike, *, limit: int | None = None, seed: int = 0, num_fewshot: int = 0,
              fewshot_spec: str | os.PathLike | None = None, name: str | None = None,
              metric: str | None = None, data_files: str | os.PathLike | None = None,
              until: list[str] | tuple[str, ...] | None = None, max_new_tokens: int | None = None,
              extract: str | None = None) -> Task:
    """Load a calibration task.

    spec: a `.jsonl` file (`{"prompt","answer"}` exact match or `{"prompt","choices","label"}` multiple
    choice, optional "id"), a BIG-bench `.json` task file, a local lm-eval task `.yaml`, or
    `lmeval:TASKNAME` for an installed lm-eval task whose data is local. `metric` overrides the declared
    metric; `data_files` replaces the test data file of an lm-eval YAML (e.g. the shipped zoo template).
    until / max_new_tokens / extract (exact-match JSONL and BIG-bench tasks): the stop strings (the output
    is cut at the first of them), the generation budget and the answer regex (see `Task`); None keeps
    the task's defaults. An lm-eval task declares its own in its YAML.
    """
    text = str(spec)
    if is_lmeval_spec(text):
        if until is not None or max_new_tokens is not None or extract is not None:
            raise TaskError(f"{text}: until, max_new_tokens and extract are set in an lm-eval task's YAML "
                            "(generation_kwargs, filter_list), not in the study file or as eval flags")
        return _load_lmeval(text, limit=limit, seed=seed, num_fewshot=num_fewshot, name=name, metric=metric,
                            data_files=data_files)
    path = Path(spec)
    if not path.is_file():
        raise TaskError(f"task file {path} not found: pass a .jsonl, a BIG-bench .json, an lm-eval .yaml "
                        "or lmeval:TASKNAME")
    kw = dict(limit=limit, seed=seed, num_fewshot=num_fewshot, fewshot_spec=fewshot_spec, name=name, metric=metric)
    if path.suffix == ".jsonl":
        return _decoding(_load_jsonl(path, **kw), until, max_new_tokens, extract)
    if path.suffix == ".json":
        return _decoding(_load_bigbench(path, **kw), until, max_new_tokens, extract)
    raise TaskError(f"{path}: unknown task file type {path.suffix!r}; use .jsonl, a BIG-bench .json or an lm-eval .yaml")


def export_lmeval_task(task: Task, out_dir: str | os.PathLike, *, task_name: str | None = None) -> Path:
    """Write `task`'s formatted examples as a local lm-eval task (JSONL data + YAML); returns the YAML path.

    The prompts are copied verbatim (`target_delimiter: ""`), so lm-eval scores exactly what we score.
    """
    import yaml

    if task.kind == "lmeval":
        raise TaskError(f"{task.source}: already an lm-eval task")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tname = task_name or re.sub(r"\W", "_", f"mergesearch_{task.name}")
    data = out / f"{tname}.jsonl"
    rows = []
    for ex in task.examples:
        row = {"id": ex.id, "prompt": ex.prompt}
        if task.kind == "generate":
            row["answer"] = task.gold(ex.answers[0])
        else:
            row.update(choices=list(ex.choices), label=ex.label)
        rows.append(json.dumps(row))
    atomic_write(data, "\n".join(rows) + "\n")
    cfg = {
        "task": tname,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "doc_to_text": "prompt",
        "target_delimiter": "",
        "fewshot_delimiter": "\n",
    }
    if task.kind == "generate":
        cfg.update(output_type="generate_until", doc_to_target="answer",
                   generation_kwargs={"until": list(task.until), "do_sample": False,
                                      "max_gen_toks": task.max_new_tokens},
                   metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
        regex = task.output_regex if task.extract is None else task.extract
        if task.output_regex is not None and task.extract is not None:
            raise TaskError(f"{task.source}: a BIG-bench output_regex and extract cannot both be exported to "
                            "one lm-eval regex filter")
        if regex is not None:
            # lm-eval's regex filter takes the first match (its group 1 where the regex has one);
            # our no-match is wrong, so the fallback is a string no gold answer equals
            fallback = "" if task.extract is None else "[invalid]"
            cfg["filter_list"] = [{"name": "regex", "filter": [
                {"function": "regex", "regex_pattern": regex, "group_select": 0, "fallback": fallback},
                {"function": "take_first"}]}]
    else:
        cfg.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="label",
                   metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")])
    path = out / f"{tname}.yaml"
    atomic_write(path, yaml.safe_dump(cfg, sort_keys=False))
    return path
