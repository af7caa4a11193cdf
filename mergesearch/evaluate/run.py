"""Score a model folder on tasks from the three sources (the `mergesearch eval` command)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from mergesearch.errors import CheckpointError, TaskError
from mergesearch.evaluate.evaluator import DEFAULT_BATCH_SIZE, EvalResult, Evaluator
from mergesearch.evaluate.tasks import Task, load_task
from mergesearch.fileio import atomic_write


def load_model(model_dir: str | os.PathLike, device: str = "auto"):
    """(model, tokenizer) from a local HF folder: safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.checkpoints import open_checkpoint, resolve_device

    ckpt = open_checkpoint(model_dir)  # refuses pickle weights and missing folders with a clear message
    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, use_safetensors=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(ckpt.path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_dir}: cannot load the model or its tokenizer ({exc})") from None
    return model.to(dev).eval(), tokenizer


def evaluate_model_dir(model_dir: str | os.PathLike, task_specs: Sequence[str], *, tasks: Sequence[Task] = (),
                       limit: int | None = None, seed: int = 0, num_fewshot: int = 0, fewshot: str | None = None,
                       until: Sequence[str] | None = None, max_new_tokens: int | None = None,
                       extract: str | None = None, data_files: str | None = None,
                       batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto",
                       lmeval_hf: bool = False) -> EvalResult:
    """Load a model folder and score it once on `tasks` (loaded already: a study's) and on every task of
    `task_specs`, loaded here with the options given (fewshot, until, max_new_tokens and extract: for JSONL and
    BIG-bench tasks; an lm-eval task declares its own and refuses them)."""
    if not task_specs and not tasks:
        raise TaskError("no task given: pass --task PATH_OR_NAME (a .jsonl, a BIG-bench .json, an lm-eval .yaml "
                        "or lmeval:NAME; repeatable) or --study STUDY.yaml")
    tasks = [*tasks, *(load_task(spec, limit=limit, seed=seed, num_fewshot=num_fewshot, fewshot_spec=fewshot,
                                 data_files=data_files if str(spec).endswith((".yaml", ".yml")) else None,
                                 until=until, max_new_tokens=max_new_tokens, extract=extract)
                       for spec in task_specs)]
    model, tokenizer = load_model(model_dir, device)
    # one scoring of one model: every metric, the gold chains' log-probability too
    return Evaluator(model, tokenizer, tasks, batch_size=batch_size, lmeval_hf=lmeval_hf, gold_logprob=True).evaluate()


def format_table(result: EvalResult) -> str:
    rows = [("task", "metric", "score", "n", "seconds")]
    rows += [(t, m, f"{s:.4f}", str(n), f"{sec:.2f}") for t, m, s, n, sec in result.table()]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"mean of declared metrics: {result.mean:.4f}   total {result.seconds:.2f} s")
    return "\n".join(lines)


def write_json(result: EvalResult, path: str | os.PathLike) -> None:
    atomic_write(path, json.dumps(result.to_dict(), indent=1, default=float))
