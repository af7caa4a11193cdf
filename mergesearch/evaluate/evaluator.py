"""The calibration evaluator: one model object, prompts tokenised once, scored per candidate in slices."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mergesearch.config import ObjectivesConfig
from mergesearch.errors import TaskError
from mergesearch.evaluate import _scoring as scoring
from mergesearch.evaluate.engine import GenerationEngine, GenRequest
from mergesearch.evaluate.tasks import Task
from mergesearch.evaluate.text import decode, n_ctx, pad_id, stop_tokens
from mergesearch.threads import rebalance

log = logging.getLogger(__name__)

# Teacher-forced passes an exact-match example may take before it is left to generation: the first
# over the answer's own tokens, the others along greedy's own spelling of it (BPE).
MAX_PASSES = 5
# Examples per forward pass: the study file's default (objectives.batch_size), declared there only.
DEFAULT_BATCH_SIZE = ObjectivesConfig.model_fields["batch_size"].default


@dataclass
class EvalResult:
    """Scores of one model on the calibration tasks (possibly a running result over the first slices)."""

    scores: dict[str, dict[str, float]]  # task -> metric -> score
    metric: dict[str, str]  # task -> its declared metric
    n: dict[str, int]  # task -> examples scored
    seconds: float
    task_seconds: dict[str, float] = field(default_factory=dict)
    records: dict[str, list[dict]] = field(default_factory=dict)
    complete: bool = True  # False for a running result after an early slice
    # exact-match task -> examples decided by the one teacher-forced pass (the rest were generated)
    one_pass: dict[str, int] = field(default_factory=dict)

    def primary(self, task: str) -> float:
        """The task's declared metric."""
        return self.scores[task][self.metric[task]]

    @property
    def mean(self) -> float:
        """Mean over tasks of each task's declared metric."""
        values = [self.primary(t) for t in self.scores]
        return sum(values) / len(values) if values else math.nan

    def to_dict(self) -> dict:
        return {"scores": self.scores, "metric": self.metric, "n": self.n, "seconds": self.seconds,
                "task_seconds": self.task_seconds, "mean": self.mean, "complete": self.complete,
                "one_pass": self.one_pass, "records": self.records}

    def table(self) -> list[tuple[str, str, float, int, float]]:
        """Rows (task, metric, score, n, seconds): the declared metric first, then the others."""
        rows = []
        for task, scores in self.scores.items():
            for m in [self.metric[task]] + [m for m in scores if m != self.metric[task]]:
                rows.append((task, m, scores[m], self.n[task], self.task_seconds.get(task, 0.0)))
        return rows


@dataclass
class _Prepared:
    task: Task
    items: list  # GenItem | ChoiceItem, in the task's seeded order
    shortcut: bool = False  # exact match decided by one teacher-forced pass where that is exact


class Evaluator:
    """Scores a model on calibration tasks; reuse it for every candidate the materialiser writes in place.

    The tokenisation, padding and device tensors are built once; `evaluate()` only runs forward passes,
    reading whatever weights the model holds at that moment.
    """

    def __init__(self, model, tokenizer, tasks: Sequence[Task], *, batch_size: int = DEFAULT_BATCH_SIZE, device=None,
                 shortcut: bool = True, progress: bool = False, lmeval_hf: bool = False,
                 cuda_graphs: bool | None = None, gold_logprob: bool = False):
        if not tasks:
            raise TaskError("no calibration tasks given: pass at least one task")
        names = [t.name for t in tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise TaskError(f"two tasks are named {sorted(dup)[0]!r}: give each task its own name")
        if batch_size < 1:
            raise TaskError(f"batch_size must be >= 1 (got {batch_size})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.progress = progress
        # the gold chains' log-probability, also where no metric needs it (a study blending it into the
        # score, `objectives.smooth`): see `_gold_pass`
        self.gold_logprob = gold_logprob
        self.pad_id = pad_id(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.skipped = {i for i in tokenizer.all_special_ids if i != self.eos_id}
        self.max_len = n_ctx(model)
        # whether the text of greedy decoding's first tokens is a prefix of its whole output's text
        self.prefix_stable = scoring.tokenizer_is_unique(tokenizer) or scoring.decode_is_prefix_stable(tokenizer)
        self._plans: dict[int, dict] = {}
        self._prepared: dict[str, _Prepared] = {}
        lm_tasks = [t for t in tasks if t.kind == "lmeval"]
        for t in tasks:
            if t.kind == "generate":
                items = scoring.prepare_generate(t, tokenizer, self.max_len)
                self._prepared[t.name] = _Prepared(t, items, shortcut)
            elif t.kind == "choice":
                self._prepared[t.name] = _Prepared(t, scoring.prepare_choice(t, tokenizer, self.max_len))
        # one engine for every generation of every task (on CUDA it keeps its captured decode step)
        self.engine = GenerationEngine(model, batch_size=batch_size, pad_id=self.pad_id, decode=self._decode,
                                       max_len=self.max_len, cuda_graphs=cuda_graphs)
        self._lmeval = None
        if lm_tasks:
            from mergesearch.evaluate.lmeval import LmEvalRunner

            self._lmeval = LmEvalRunner(model, tokenizer, lm_tasks, batch_size=batch_size, device=self.device,
                                        engine=None if lmeval_hf else self.engine)

    def _decode(self, tokens: list[int]) -> str:
        return decode(self.tokenizer, tokens)

    def declared_metric(self, task: Task) -> str:
        return self._lmeval.declared_metric(task) if task.kind == "lmeval" else task.metric

    # --- plans: the per-slice padded batches, built once per slice count ---------------------------

    def _plan(self, n_slices: int) -> dict:
        if n_slices in self._plans:
            return self._plans[n_slices]
        plan = {}
        for name, prep in self._prepared.items():
            n = len(prep.items)
            bounds = [round(n * k / n_slices) for k in range(n_slices + 1)]
            plan[name] = [self._slice_batches(prep, list(range(bounds[k], bounds[k + 1]))) for k in range(n_slices)]
        self._plans[n_slices] = plan
        return plan

    def _slice_batches(self, prep: _Prepared, idx: list[int]) -> dict:
        """Deduplicate identical examples, sort by length and cut into padded device batches."""
        if not idx:
            return {"idx": [], "batches": [], "unique_of": [], "uniq": []}
        keyf = ((lambda it: (tuple(it.whole), it.gen_start)) if prep.task.kind == "generate"
                else (lambda it: tuple(map(tuple, it.wholes))))
        first: dict = {}
        unique_of = []  # slice position -> position in the unique list
        uniq = []
        for i in idx:
            key = keyf(prep.items[i])
            if key not in first:
                first[key] = len(uniq)
                uniq.append(i)
            unique_of.append(first[key])
        # by length, so that little padding is computed; a task's template still opens every batch
        # and is computed once per batch (the batch prefix)
        if prep.task.kind == "generate":
            order = sorted(range(len(uniq)), key=lambda u: (len(prep.items[uniq[u]].whole), prep.items[uniq[u]].whole))
        else:
            order = sorted(range(len(uniq)), key=lambda u: (prep.items[uniq[u]].shared, prep.items[uniq[u]].wholes[0]))
        batches = []
        # a chain whose gold pass does not run (`_gold_pass`) needs no teacher-forced batches
        for groups in self._groups(prep, uniq, order) if self._gold_pass(prep.task) else []:
            for start in range(0, len(groups), self.batch_size):
                chunk = groups[start: start + self.batch_size]
                its = [prep.items[uniq[u]] for u in chunk]
                if prep.task.kind == "generate":
                    use = prep.shortcut and its[0].gen_start is not None
                    b = scoring.build_gen_batch(its, self.device, self.pad_id, use)
                else:
                    b = scoring.build_choice_batch(its, self.device, self.pad_id)
                batches.append((chunk, b))
        return {"idx": idx, "batches": batches, "unique_of": unique_of, "uniq": uniq}

    def _gold_pass(self, task: Task) -> bool:
        """Whether a task's examples get the teacher-forced pass over their gold answer: always, but for a chain
        (`extract`: decided by generation, so the pass gives only the gold's log-probability) where neither its
        metric nor the caller (`gold_logprob`) asks for that log-probability."""
        return task.kind != "generate" or task.extract is None or self.gold_logprob or task.metric == "logprob"

    @staticmethod
    def _groups(prep: _Prepared, uniq: list[int], order: list[int]) -> list[list[int]]:
        if prep.task.kind != "generate":
            return [order]
        # examples the one-pass shortcut can decide are batched apart from those that need generation
        yes = [u for u in order if prep.items[uniq[u]].gen_start is not None]
        no = [u for u in order if prep.items[uniq[u]].gen_start is None]
        return [g for g in (yes, no) if g]

    # --- scoring ------------------------------------------------------------------------------------

    def _run_generate(self, prep: _Prepared, sl: dict) -> list[dict]:
        task = prep.task
        uniq = sl["uniq"]
        stop_ids = stop_tokens(self.tokenizer, task.until, self.eos_id)
        ll: list[float | None] = [0.0 if self._gold_pass(task) else None] * len(uniq)
        proven: dict[int, tuple[list[int], bool] | None] = {}
        for chunk, batch in sl["batches"]:
            lls, known = scoring.score_gen_batch(self.model, batch, task.max_new_tokens, stop_ids, self.skipped,
                                           self.max_len)
            for u, a, k in zip(chunk, lls, known):
                ll[u], proven[u] = a, k
        # (match, output or None, the text the passes prove, passes) for the examples the passes decide
        decided: list[tuple[bool, str | None, str, int] | None] = [None] * len(uniq)
        for n_pass in range(1, MAX_PASSES + 1):
            retry = {}
            for u, known in proven.items():
                if known is None:
                    continue
                text = self._decode(known[0])
                it = prep.items[uniq[u]]
                match, output = scoring.decide(text, known[1], self.prefix_stable, task, it.example.answers)
                if match is not None:
                    decided[u] = (match, output, text, n_pass)
                elif not known[1] and self.prefix_stable and n_pass < MAX_PASSES:
                    nxt = scoring.follow_greedy(it, known[0], text, self.tokenizer, self.max_len)
                    if nxt is not None:
                        retry[u] = nxt
            if not retry:
                break
            proven = {}
            order = sorted(retry, key=lambda u: len(retry[u].whole))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start: start + self.batch_size]
                batch = scoring.build_gen_batch([retry[u] for u in chunk], self.device, self.pad_id, True)
                _, known = scoring.score_gen_batch(self.model, batch, task.max_new_tokens, stop_ids, self.skipped,
                                             self.max_len)
                proven.update(zip(chunk, known))
        outputs: list[str | None] = [None] * len(uniq)
        todo = [u for u in range(len(uniq)) if decided[u] is None]
        if todo:
            stops = frozenset(stop_ids)
            gen = self.engine.generate([GenRequest(tuple(prep.items[uniq[u]].prompt_ids), task.max_new_tokens, stops,
                                                   task.until) for u in todo])
            for u, toks in zip(todo, gen):
                outputs[u] = task.cut(self._decode(toks))
        records = []
        for pos, i in enumerate(sl["idx"]):
            u = sl["unique_of"][pos]
            it = prep.items[i]
            rec = {"id": it.example.id, "line": it.example.line, "logprob": ll[u]}
            if outputs[u] is not None:
                rec.update(exact_match=float(scoring.is_match(outputs[u], task, it.example.answers)), output=outputs[u],
                           extracted=scoring.postprocess(outputs[u], task), decided_by="generation")
            else:
                match, output, text, n_pass = decided[u]
                # the greedy output starts with output_prefix (up to its first stop, where it has one)
                cut = task.cut(text)
                stop = next((st for st in task.until if st and text.startswith(st, len(cut))), "")
                prefix = text[: len(cut) + len(stop)]
                rec.update(exact_match=float(match), output=output, output_prefix=prefix,
                           decided_by="one-pass" if n_pass == 1 else "teacher-forced", passes=n_pass)
                if output is not None:
                    rec["extracted"] = scoring.postprocess(output, task)
            records.append(rec)
        return records

    def _run_choice(self, prep: _Prepared, sl: dict) -> list[dict]:
        lls: list[list[float]] = [[] for _ in sl["uniq"]]
        for chunk, batch in sl["batches"]:
            for u, row in zip(chunk, scoring.score_choice_batch(self.model, batch)):
                lls[u] = row
        records = []
        for pos, i in enumerate(sl["idx"]):
            it = prep.items[i]
            ex = it.example
            row = lls[sl["unique_of"][pos]]
            pred = max(range(len(row)), key=row.__getitem__)  # first maximum, as np.argmax
            norm = [v / len(c) for v, c in zip(row, ex.choices)]
            pred_norm = max(range(len(norm)), key=norm.__getitem__)
            credit = ex.credit if ex.credit is not None else [float(k == ex.label) for k in range(len(row))]
            records.append({"id": ex.id, "line": ex.line, "acc": credit[pred], "acc_norm": credit[pred_norm],
                            "logprob": row[ex.label], "pred": pred, "lls": row})
        return records

    def iter_slices(self, n_slices: int) -> Iterator[EvalResult]:
        """Score the tasks in `n_slices` slices of their seeded order; yield the running result after each
        slice of every task (the last one is the full result). lm-eval tasks are scored whole in the first."""
        if n_slices < 1:
            raise TaskError(f"n_slices must be >= 1 (got {n_slices})")
        plan = self._plan(n_slices)
        rebalance()  # a fair share of the cores, if other mergesearch processes started or ended meanwhile
        records: dict[str, list[dict]] = {t.name: [] for t in self.tasks}
        lm_scores: dict[str, dict[str, float]] = {}
        seconds = {t.name: 0.0 for t in self.tasks}
        start = time.perf_counter()
        for k in range(n_slices):
            # Inference mode is per-thread state: held across the `yield`, it would leak into the caller
            # between slices, and stay on when a pruned trial abandons this generator.
            with torch.inference_mode():
                for task in self.tasks:
                    t0 = time.perf_counter()
                    if task.kind == "lmeval":
                        if k == 0:
                            lm_scores[task.name], records[task.name] = self._lmeval.evaluate(task)
                    elif task.kind == "generate":
                        records[task.name] += self._run_generate(self._prepared[task.name], plan[task.name][k])
                    else:
                        records[task.name] += self._run_choice(self._prepared[task.name], plan[task.name][k])
                    seconds[task.name] += time.perf_counter() - t0
            yield self._result(records, lm_scores, seconds, time.perf_counter() - start, k == n_slices - 1)

    def evaluate(self) -> EvalResult:
        """Score every task once with the model's current weights."""
        result = None
        for result in self.iter_slices(1):
            pass
        return result

    def _result(self, records, lm_scores, seconds, elapsed, complete) -> EvalResult:
        scores, n = {}, {}
        for task in self.tasks:
            recs = records[task.name]
            if task.kind == "lmeval":
                scores[task.name] = dict(lm_scores.get(task.name, {}))
                n[task.name] = len(recs)
                continue
            n[task.name] = len(recs)
            # a chain's gold log-probability is left out where its pass did not run (see `gold_logprob`)
            scores[task.name] = {m: (sum(r[m] for r in recs) / len(recs) if recs else math.nan)
                                 for m in task.metrics if not any(r[m] is None for r in recs)}
        metric = {}
        for t in self.tasks:
            m = self.declared_metric(t)
            if t.kind == "lmeval" and scores[t.name] and m not in scores[t.name]:
                # lm-eval names a metric behind a filter 'exact_match[strict-match]': take the first such
                m = next((k for k in scores[t.name] if k.startswith(m + "[")), next(iter(scores[t.name])))
            metric[t.name] = m
        one_pass = {t.name: sum(r["decided_by"] == "one-pass" for r in records[t.name])
                    for t in self.tasks if t.kind == "generate"}
        return EvalResult(scores=scores, metric=metric, n=n, one_pass=one_pass,
                          seconds=elapsed, task_seconds=dict(seconds), records={k: list(v) for k, v in records.items()},
                          complete=complete)
