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
from mergesearch.evaluate._kinds import ExactMatch, LmEval, MultipleChoice, Prepared
from mergesearch.evaluate.engine import GenerationEngine
from mergesearch.evaluate.tasks import Task
from mergesearch.evaluate.text import decode, n_ctx, pad_id
from mergesearch.threads import rebalance

log = logging.getLogger(__name__)

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
        # score, `objectives.smooth`): see `gold_pass`
        self.gold_logprob = gold_logprob
        self.pad_id = pad_id(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.skipped = {i for i in tokenizer.all_special_ids if i != self.eos_id}
        self.max_len = n_ctx(model)
        # whether the text of greedy decoding's first tokens is a prefix of its whole output's text
        self.prefix_stable = scoring.tokenizer_is_unique(tokenizer) or scoring.decode_is_prefix_stable(tokenizer)
        self._plans: dict[int, dict] = {}
        # one engine for every generation of every task (on CUDA it keeps its captured decode step)
        self.engine = GenerationEngine(model, batch_size=batch_size, pad_id=self.pad_id, decode=self.text_of,
                                       max_len=self.max_len, cuda_graphs=cuda_graphs)
        lm_tasks = [t for t in tasks if t.kind == "lmeval"]
        lm_runner = None
        if lm_tasks:
            from mergesearch.evaluate.lmeval import LmEvalRunner

            lm_runner = LmEvalRunner(model, tokenizer, lm_tasks, batch_size=batch_size, device=self.device,
                                     engine=None if lmeval_hf else self.engine)
        self._prepared = {t.name: self._prepare(t, shortcut, lm_runner) for t in tasks}

    def _prepare(self, task: Task, shortcut: bool, lm_runner) -> Prepared:
        """The task made ready for scoring, as its kind says."""
        if task.kind == "lmeval":
            return LmEval(task, lm_runner)
        if task.kind == "generate":
            return ExactMatch(task, scoring.prepare_generate(task, self.tokenizer, self.max_len), shortcut)
        return MultipleChoice(task, scoring.prepare_choice(task, self.tokenizer, self.max_len))

    def text_of(self, tokens: list[int]) -> str:
        """The text of generated tokens (special tokens left out): what stop strings and answers are read from."""
        return decode(self.tokenizer, tokens)

    def declared_metric(self, task: Task) -> str:
        return self._prepared[task.name].declared_metric()

    def gold_pass(self, task: Task) -> bool:
        """Whether a task's examples get the teacher-forced pass over their gold answer: always, but for a chain
        (`extract`: decided by generation, so the pass gives only the gold's log-probability) where neither its
        metric nor the caller (`gold_logprob`) asks for that log-probability."""
        return task.extract is None or self.gold_logprob or task.metric == "logprob"

    # --- plans: the per-slice padded batches, built once per slice count ---------------------------

    def _plan(self, n_slices: int) -> dict:
        if n_slices in self._plans:
            return self._plans[n_slices]
        plan = {}
        for name, prep in self._prepared.items():
            n = len(prep.items)
            bounds = [round(n * k / n_slices) for k in range(n_slices + 1)]
            plan[name] = [prep.slice(self, list(range(bounds[k], bounds[k + 1]))) for k in range(n_slices)]
        self._plans[n_slices] = plan
        return plan

    # --- scoring ------------------------------------------------------------------------------------

    def iter_slices(self, n_slices: int) -> Iterator[EvalResult]:
        """Score the tasks in `n_slices` slices of their seeded order; yield the running result after each
        slice of every task (the last one is the full result). lm-eval tasks are scored whole in the first."""
        if n_slices < 1:
            raise TaskError(f"n_slices must be >= 1 (got {n_slices})")
        plan = self._plan(n_slices)
        rebalance()  # a fair share of the cores, if other mergesearch processes started or ended meanwhile
        records: dict[str, list[dict]] = {t.name: [] for t in self.tasks}
        seconds = {t.name: 0.0 for t in self.tasks}
        start = time.perf_counter()
        for k in range(n_slices):
            # Inference mode is per-thread state: held across the `yield`, it would leak into the caller
            # between slices, and stay on when a pruned trial abandons this generator.
            with torch.inference_mode():
                for task in self.tasks:
                    t0 = time.perf_counter()
                    records[task.name] += self._prepared[task.name].run(self, plan[task.name][k], first=k == 0)
                    seconds[task.name] += time.perf_counter() - t0
            yield self._result(records, seconds, time.perf_counter() - start, k == n_slices - 1)

    def evaluate(self) -> EvalResult:
        """Score every task once with the model's current weights."""
        result = None
        for result in self.iter_slices(1):
            pass
        return result

    def _result(self, records, seconds, elapsed, complete) -> EvalResult:
        preps = self._prepared
        scores = {name: preps[name].scores(recs) for name, recs in records.items()}
        one_pass = {name: preps[name].one_pass(recs) for name, recs in records.items()}
        return EvalResult(scores=scores, metric={name: preps[name].metric_of(sc) for name, sc in scores.items()},
                          n={name: len(recs) for name, recs in records.items()},
                          one_pass={name: c for name, c in one_pass.items() if c is not None},
                          seconds=elapsed, task_seconds=dict(seconds), records={k: list(v) for k, v in records.items()},
                          complete=complete)
