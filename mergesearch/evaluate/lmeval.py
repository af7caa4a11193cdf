"""lm-eval tasks scored by lm-eval itself: its prompts, few-shot sampling, filters and metrics.

The model answering lm-eval's requests is `MergesearchLM` (lmeval_lm.py: our generation engine on the
in-memory model) by default, or lm-eval's own `HFLM(pretrained=<the in-memory model>)` as a check.
The model object is shared with the fast path, so every call sees the weights the materialiser has
just written. lm-eval's import and TaskManager indexing happen once per Evaluator, not per candidate.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import tempfile
from pathlib import Path

from mergesearch.errors import TaskError, did_you_mean
from mergesearch.evaluate.tasks import LmEvalSpec, Task

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "lmeval_tasks"
ZOO_TEMPLATE = TEMPLATE_DIR / "mergesearch_zoo_calib.yaml"


def offline_env() -> None:
    """Nothing may be downloaded: datasets and hub lookups must use local files only."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


class _TagTolerantLoader:
    """A yaml SafeLoader that keeps lm-eval's `!function` tags as plain strings (we never run them)."""

    @staticmethod
    def load(text: str):
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}")
        return yaml.load(text, Loader=Loader)  # noqa: S506 - SafeLoader subclass


def resolve_lmeval_spec(spec: str, *, name: str | None = None, data_files=None) -> tuple[LmEvalSpec, str]:
    """`lmeval:NAME` or a task YAML -> (what lm-eval needs to load it, a description for messages).

    A YAML whose `data_files` are relative (or replaced by `data_files=`) is copied into a private
    folder with absolute paths: lm-eval would otherwise resolve them against the working directory.
    """
    import yaml

    if spec.startswith("lmeval:"):
        task_name = spec.removeprefix("lmeval:")
        if not task_name:
            raise TaskError("lmeval: needs a task name, e.g. lmeval:arc_easy")
        if data_files is not None:
            raise TaskError(f"{spec}: data_files applies to a task YAML, not to an installed task name")
        return LmEvalSpec(task_name), spec
    path = Path(spec)
    if not path.is_file():
        raise TaskError(f"lm-eval task file {path} not found")
    try:
        cfg = _TagTolerantLoader.load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise TaskError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
        raise TaskError(f"{path}: an lm-eval task YAML needs a `task:` name")
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    split = cfg.get("test_split") or cfg.get("validation_split") or "test"
    if data_files is not None:
        files = {split: str(Path(data_files).resolve())}
    rewrite = data_files is not None or name is not None
    if isinstance(files, dict):
        resolved = {}
        for key, value in files.items():
            values = value if isinstance(value, list) else [value]
            abs_values = [v if Path(v).is_absolute() else str((path.parent / v).resolve()) for v in values]
            rewrite |= abs_values != values
            for v in abs_values:
                if not Path(v).is_file():
                    raise TaskError(f"{path}: data file {v} not found; pass data_files= (or --data-files) "
                                    "pointing at a local JSONL split")
            resolved[key] = abs_values if isinstance(value, list) else abs_values[0]
        files = resolved
    if not rewrite:
        return LmEvalSpec(cfg["task"], str(path.parent.resolve())), str(path)
    if any(isinstance(v, str) and v.startswith("!") for v in cfg.values()):
        raise TaskError(f"{path}: uses !function tags; give its data_files as absolute paths instead of rewriting it")
    cfg = dict(cfg, dataset_kwargs=dict(kwargs, data_files=files))
    if name is not None:
        cfg["task"] = name
    if isinstance(cfg.get("include"), str) and not Path(cfg["include"]).is_absolute():
        cfg["include"] = str((path.parent / cfg["include"]).resolve())
    folder = Path(tempfile.mkdtemp(dir=_rewrites().name))  # a folder each: lm-eval includes a whole folder
    (folder / path.name).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return LmEvalSpec(cfg["task"], str(folder)), str(path)


@functools.cache
def _rewrites() -> tempfile.TemporaryDirectory:
    """Where this process writes rewritten task YAMLs: one temporary folder, removed when the process exits (each
    rewrite had left a folder of its own in the temp dir for good)."""
    return tempfile.TemporaryDirectory(prefix="mergesearch-lmeval-")


def _metric_name(key: str) -> str:
    """'acc,none' -> 'acc'; a named filter stays visible: 'exact_match,regex' -> 'exact_match[regex]'."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}[{filt}]"


class LmEvalRunner:
    """Holds one lm-eval model around the shared model and the loaded lm-eval task objects."""

    def __init__(self, model, tokenizer, tasks: list[Task], *, batch_size: int, device, engine=None):
        """engine: the evaluator's GenerationEngine, answered through MergesearchLM; None: lm-eval's HFLM."""
        offline_env()
        try:
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager, get_task_dict
        except ImportError as exc:  # pragma: no cover - lm-eval is a dependency
            raise TaskError(f"lm-eval tasks need the lm-eval package ({exc}); pip install lm-eval") from None
        from mergesearch.evaluate.text import n_ctx

        include = sorted({t.lmeval.include_path for t in tasks if t.lmeval.include_path})
        manager = TaskManager(include_path=include or None)
        known = set(manager.all_tasks)
        for t in tasks:
            if t.lmeval.task_name not in known:
                raise TaskError(f"{t.source}: lm-eval has no task {t.lmeval.task_name!r}"
                                f"{did_you_mean(t.lmeval.task_name, known)}")
        if engine is None:
            # softmax in float32, as our path computes it: HFLM's default (None) takes the model's dtype, and a
            # bf16 model's log-likelihoods then come out rounded to bf16 (0.149 apart on a zoo expert's request,
            # -54.63 against -54.75), which would make the check disagree with the path it checks
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                           max_length=n_ctx(model), softmax_dtype="float32")
        else:
            from mergesearch.evaluate.lmeval_lm import MergesearchLM

            self.lm = MergesearchLM(model=model, tokenizer=tokenizer, engine=engine, batch_size=batch_size,
                                    max_length=n_ctx(model))
        self.tasks = {}
        for t in tasks:
            try:
                loaded = get_task_dict([t.lmeval.task_name], manager)
            except Exception as exc:  # lm-eval raises many kinds; all mean "this task cannot load offline"
                raise TaskError(f"{t.source}: lm-eval cannot load task {t.lmeval.task_name!r} offline "
                                f"({type(exc).__name__}: {exc})") from None
            task_obj = loaded[t.lmeval.task_name]
            if t.num_fewshot:
                task_obj.set_config(key="num_fewshot", value=t.num_fewshot)
            docs = task_obj.eval_docs
            n_docs = len(docs)
            if n_docs == 0:
                raise TaskError(f"{t.source}: lm-eval task {t.lmeval.task_name!r} has an empty evaluation split")
            order = list(range(n_docs))
            random.Random(t.seed).shuffle(order)
            if t.limit is not None:
                order = order[: t.limit]
            metrics = [m["metric"] for m in task_obj.config.metric_list or [] if isinstance(m.get("metric"), str)]
            if t.metric and t.metric not in metrics:
                raise TaskError(f"{t.source}: unknown metric {t.metric!r}{did_you_mean(t.metric, metrics)}; "
                                f"the task reports {', '.join(metrics) or 'nothing'}")
            self.tasks[t.name] = (t, task_obj, sorted(order), metrics)

    def declared_metric(self, task: Task) -> str:
        return task.metric or (self.tasks[task.name][3] or ["acc"])[0]

    def evaluate(self, task: Task) -> tuple[dict[str, float], list[dict]]:
        from lm_eval.evaluator import evaluate

        _, task_obj, indices, _ = self.tasks[task.name]
        name = task.lmeval.task_name
        out = evaluate(self.lm, {name: task_obj}, samples={name: indices}, bootstrap_iters=0, log_samples=True,
                       verbosity="WARNING")
        raw = out["results"][name]
        scores = {_metric_name(k): float(v) for k, v in raw.items()
                  if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        records = []
        for s in out["samples"][name]:
            rec = {"id": str(s.get("doc_id")), "resps": s.get("resps"), "filtered_resps": s.get("filtered_resps"),
                   "target": s.get("target")}
            rec.update({m: s[m] for m in scores if m in s})
            records.append(rec)
        return scores, records
