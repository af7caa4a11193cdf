"""Merge coefficients fitted by gradient on the calibration set (Expert Merging / AdaMerging style).

A fitted merge is W = base + sum_k c[k, cell] * part_k on every tensor entry of a cell (a tensor's
row chunk, a layer, ... : the granularity), where part_k is expert k's task vector as the method
uses it (task arithmetic: the task vector; TIES/DARE/breadcrumbs/DELLA: its masked, rescaled form
at the trial's density, see `Operator.linear_parts`). Then

    dL/dc[k, cell] = sum over the cell's entries of dL/dW * part_k

which is one ordinary backward pass through the materialised model and a contraction with the
parts. The contraction runs in a post-accumulate-grad hook as soon as each parameter's gradient
is ready, and the gradient is freed there, so a fit holds at most one parameter's gradient beyond
the model, the sources and one batch's activations. Coefficients and their gradients are float32
whatever the model's dtype.

Objectives: `supervised` (cross-entropy of the gold answer tokens and the stop token) and
`distill` (KL to each task's expert on that task's prompts, along the expert's own greedy
answer: no labels needed). Batches are balanced over tasks, each task's loss weighted; Adam with
cosine decay; coefficients clamped; early stopping keeps the coefficients with the best loss on a
validation slice carved out of calib (never the test split). Same inputs and seed, same result.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from mergesearch import operators
from mergesearch.config import DEFAULT_BATCH_SIZE, FitConfig, StudyConfig
from mergesearch.errors import ConfigError, TaskError
from mergesearch.evaluate.text import decode, encode, encode_pair, n_ctx, pad_id, stop_tokens
from mergesearch.evaluate.engine import GenerationEngine, GenRequest
from mergesearch.evaluate.tasks import Task
from mergesearch.materializer import Materializer, chunk_slice, move_state
from mergesearch.plan import Plan
from mergesearch.space import SearchSpace
from mergesearch.threads import rebalance

log = logging.getLogger(__name__)

TOPK = 64  # distill: teacher distributions kept as their top-k logits (exact when the vocabulary is smaller)


_CONFIG = FitConfig()  # the defaults are declared there, once (config.py); FitOptions reads them


@dataclass(frozen=True)
class FitOptions:
    """The knobs of one fit: the fit: section's values (`from_config`), with a trial's searched ones in place."""

    objective: str = _CONFIG.objective
    lr: float = _CONFIG.lr
    steps: int = _CONFIG.steps
    start: float = _CONFIG.start
    clamp: tuple[float, float] = _CONFIG.clamp
    pull: float = _CONFIG.pull
    temperature: float = _CONFIG.temperature
    batch_size: int = _CONFIG.batch_size
    eval_every: int = _CONFIG.eval_every
    patience: int = _CONFIG.patience
    task_weights: Mapping[str, float] = field(default_factory=dict)
    seed: int = StudyConfig.model_fields["seed"].default

    @classmethod
    def from_config(cls, fit: FitConfig, **knobs) -> FitOptions:
        """The options `fit` gives, with `knobs` (a trial's searched values, the seed, task weights) replacing them."""
        return cls(**{**{f.name: getattr(fit, f.name) for f in fields(cls) if f.name in FitConfig.model_fields},
                      **knobs})


DOT_BLOCK = 1 << 24  # entries of a 16-bit gradient or part cast to float32 at a time (64 MiB)


def dot_in(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a . b in `dtype` (float32): one dot where both are in it already; else cast and summed block by block,
    so that a bf16 model's largest chunk (a 128k x 4096 lm_head: 2 GiB per float32 copy, two copies) never
    has a whole float32 copy. Chunks up to DOT_BLOCK entries are one dot either way."""
    if a.dtype == b.dtype == dtype or a.numel() <= DOT_BLOCK:
        return torch.dot(a.to(dtype), b.to(dtype))
    total = torch.zeros((), dtype=dtype, device=a.device)
    for start in range(0, a.numel(), DOT_BLOCK):
        total += torch.dot(a[start:start + DOT_BLOCK].to(dtype), b[start:start + DOT_BLOCK].to(dtype))
    return total


@dataclass
class FitResult:
    """Fitted coefficients (one per slot of the coefficient space, float32) and the fit's history."""

    coef: torch.Tensor  # (n_slots,) float32, CPU, in the coefficient space's slot order
    history: list[dict]  # {"step", "train_loss", "val_loss"} at every validation check
    best_step: int
    steps_run: int
    seconds: float

    def record(self) -> dict:
        """JSON-able form stored with a trial (the coefficients rebuild the merge exactly)."""
        return {"coef": [float(x) for x in self.coef.tolist()], "history": self.history, "best_step": self.best_step,
                "steps_run": self.steps_run, "seconds": self.seconds}


def require_fittable(method: str) -> None:
    """ConfigError naming the methods the fit supports, unless `method` is one (has `linear_parts`)."""
    if operators.get(method).linear_parts is None:
        fittable = ", ".join(o.name for o in operators.all_operators() if o.linear_parts is not None)
        raise ConfigError(f"fit: method {method!r} has no fittable weights; use one of {fittable}, "
                          "or remove the fit: section")


def split_calib(task: Task, val_fraction: float, seed: int) -> tuple[Task, Task]:
    """(train, validation) parts of a calibration task: a seeded `val_fraction` of its examples held out."""
    n = len(task.examples)
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise TaskError(f"task {task.name!r} has {n} calibration example(s): too few to hold out a validation "
                        "slice for the fit; give more examples or lower fit.val_fraction")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return (replace(task, examples=tuple(task.examples[i] for i in train), limit=None),
            replace(task, examples=tuple(task.examples[i] for i in val), limit=None))


# --- tokenised sequences --------------------------------------------------------------------------


@dataclass
class _Seqs:
    """One task's sequences: ids[j] is predicted from position j - 1 for j >= start (the targets)."""

    task: str
    ids: list[list[int]]
    start: list[int]
    teacher: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (targets, TOPK) indices and logits


def supervised_seqs(task: Task, tokenizer) -> _Seqs:
    """Prompt + gold answer + stop (exact match) or prompt + gold choice (multiple choice)."""
    ids, start = [], []
    for ex in task.examples:
        if task.kind == "generate":
            p = encode(tokenizer, ex.prompt)
            tgt = encode(tokenizer, ex.answers[0]) + (encode(tokenizer, task.until[0]) if task.until else [])
            ids.append(p + tgt)
            start.append(len(p))
        elif task.kind == "choice":
            whole, n_ctx = encode_pair(tokenizer, ex.prompt, ex.choices[ex.label])
            ids.append(whole)
            start.append(max(1, n_ctx))
        else:
            raise TaskError(f"task {task.name!r} is an lm-eval task: the fit needs JSONL or BIG-bench tasks it can "
                            "tokenise itself")
    return _Seqs(task.name, ids, start)


# A row joins the current length group while it is at most this much longer than the group's shortest row.
_GROUP_STRETCH = 1.5


def _length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Row indices in groups of similar length (shortest first), each group one right-padded forward."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= _GROUP_STRETCH * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _pad_batch(rows: Sequence[list[int]], starts: Sequence[int], pad: int, device):
    """Right-padded ids (B, L), attention mask, and the flat (row, position) of every prediction."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    rr, pp, tt = [], [], []
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        for j in range(s, len(r)):
            rr.append(i)
            pp.append(j - 1)
            tt.append(r[j])
    return (ids.to(device), mask.to(device), torch.tensor(rr, device=device), torch.tensor(pp, device=device),
            torch.tensor(tt, device=device))


def distill_seqs(task: Task, tokenizer, model, *, pad: int, batch_size: int) -> _Seqs:
    """The current model's (an expert's) greedy answers to the task's prompts and its top-k logits along them; an
    answer ends where the evaluator's generation ends it (EOS, a stop token, a stop string)."""
    device = next(model.parameters()).device
    prompts = [encode(tokenizer, ex.prompt) for ex in task.examples]
    engine = GenerationEngine(model, batch_size=batch_size, pad_id=pad, max_len=n_ctx(model),
                              decode=lambda toks: decode(tokenizer, toks))
    stop_ids = frozenset(stop_tokens(tokenizer, task.until, tokenizer.eos_token_id))
    ids, start, teacher = [], [], []
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo: lo + batch_size]
            gen = engine.generate([GenRequest(tuple(p), task.max_new_tokens, stop_ids, task.until)
                                   for p in chunk])
            rows = [p + (g or [pad]) for p, g in zip(chunk, gen)]
            starts = [len(p) for p in chunk]
            x, m, r, pos, _ = _pad_batch(rows, starts, pad, device)
            logits = model(input_ids=x, attention_mask=m).logits[r, pos].float()  # (targets, V)
            k = min(TOPK, logits.shape[-1])
            top = logits.topk(k, dim=-1)
            counts = [len(row) - s for row, s in zip(rows, starts)]
            for idx, val in zip(top.indices.split(counts), top.values.split(counts)):
                teacher.append((idx.cpu(), val.cpu()))
            ids += rows
            start += starts
    return _Seqs(task.name, ids, start, teacher)


# --- the fitter -----------------------------------------------------------------------------------


class CoefficientFitter:
    """Fits merge coefficients on a Materializer's model in place (see the module docstring).

    `train_tasks` feed the gradient, `val_tasks` the early stopping. With `distill`, `teachers`
    maps each task to the index of its expert; the teachers' answers are computed once, on first use.
    """

    def __init__(self, mat: Materializer, tokenizer, train_tasks: Sequence[Task], val_tasks: Sequence[Task], *,
                 teachers: Mapping[str, int] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: bool = False):
        if not train_tasks:
            raise TaskError("the fit needs at least one calibration task")
        self.mat = mat
        self.tokenizer = tokenizer
        self.train_tasks = list(train_tasks)
        self.val_tasks = list(val_tasks)
        self.teachers = dict(teachers or {})
        self.batch_size = batch_size  # distill: prompts per batch of the teachers' greedy answers
        self.progress = progress
        self.device = mat.device
        self.pad = pad_id(tokenizer)
        self._seqs: dict[str, tuple[list[_Seqs], list[_Seqs]]] = {}
        params = dict(mat.model.named_parameters(remove_duplicate=False))
        state = mat.state_dict()
        # (tensor index, target view, parameter or None): tied duplicates are skipped, buffers get no gradient
        self.targets = [(i, state[t.name], params.get(t.name)) for i, t in enumerate(mat.tensors)
                        if mat.is_written(i)]

    # -- data --

    def sequences(self, objective: str) -> tuple[list[_Seqs], list[_Seqs]]:
        if objective not in self._seqs:
            if objective == "supervised":
                self._seqs[objective] = ([supervised_seqs(t, self.tokenizer) for t in self.train_tasks],
                                         [supervised_seqs(t, self.tokenizer) for t in self.val_tasks])
            elif objective == "distill":
                self._seqs[objective] = self._distill_sequences()
            else:
                raise ConfigError(f"unknown fit objective {objective!r}: use supervised or distill")
        return self._seqs[objective]

    def _distill_sequences(self) -> tuple[list[_Seqs], list[_Seqs]]:
        missing = [t.name for t in self.train_tasks if t.name not in self.teachers]
        if missing:
            raise ConfigError(f"distill: no expert for task {missing[0]!r}; name it in fit.teachers (task: expert)")
        n = len(self.mat.experts)
        out: tuple[list[_Seqs], list[_Seqs]] = ([], [])
        for part, tasks in enumerate((self.train_tasks, self.val_tasks)):
            for t in tasks:
                if t.kind != "generate":
                    raise TaskError(f"distill needs generation tasks; {t.name!r} is {t.kind}: use supervised")
                onehot = [1.0 if j == self.teachers[t.name] else 0.0 for j in range(n)]
                self.mat.materialize(Plan.weighted_sum(self.mat.tensors, onehot, chunks=self.mat.chunks))
                out[part].append(distill_seqs(t, self.tokenizer, self.mat.model, pad=self.pad,
                                              batch_size=self.batch_size))
        return out

    # -- the merge as a function of the coefficients --

    def linear_parts(self, plan: Plan) -> list[list[list[torch.Tensor]]]:
        """Per written tensor, per chunk, per expert: the part its coefficient scales (chunk-shaped; for task
        arithmetic, views of the cached task vectors: no copy)."""
        require_fittable(plan.method)
        op = plan.operator
        chunk_params = plan.kernel_params()
        own_state = self.mat.shares_state(op)
        out = []
        with torch.no_grad():
            for i, _, _ in self.targets:
                base, deltas, bounds, states = self.mat.sources(i)
                base = base.to(self.device)
                deltas = [d.to(self.device) for d in deltas]
                chunks = []
                for c, (lo, hi) in enumerate(bounds):
                    # streamed sources keep their state in host memory (the materialiser moves it per merge)
                    st = move_state(states[c], self.device) if own_state else {}
                    chunks.append(op.linear_parts(chunk_slice(base, lo, hi), [chunk_slice(d, lo, hi) for d in deltas],
                                                  chunk_params(i, c), st))
                out.append(chunks)
        return out

    def write(self, table: list, parts: list[list[list[torch.Tensor]]]) -> None:
        """Model weights for a coefficient table ((n_tensors, experts, chunks) as nested lists)."""
        with torch.no_grad():
            for (i, target, _), per_chunk in zip(self.targets, parts):
                base, _, bounds, _ = self.mat.sources(i)
                base = base.to(self.device)
                for c, ((lo, hi), ps) in enumerate(zip(bounds, per_chunk)):
                    o = chunk_slice(target, lo, hi)
                    torch.add(chunk_slice(base, lo, hi), ps[0], alpha=table[i][0][c], out=o)
                    for e in range(1, len(ps)):
                        o.add_(ps[e], alpha=table[i][e][c])

    # -- the fit --

    def session(self, plan: Plan, coef_space: SearchSpace) -> _Session:
        """Parts and index maps for fitting the `weight` slots of `coef_space` on the merge `plan` describes."""
        if coef_space.n_params == 0 or any(s.param != "weight" for s in coef_space.slots):
            raise ConfigError("the coefficient space must search the weights and nothing else")
        return _Session(self, plan, coef_space)

    def gradient(self, plan: Plan, coef_space: SearchSpace, coef: torch.Tensor, opts: FitOptions,
                 ) -> tuple[float, torch.Tensor]:
        """(loss, d loss / d coef) on every training example at once, with the coefficients `coef`."""
        train, _ = self.sequences(opts.objective)
        weights = {s.task: float(opts.task_weights.get(s.task, 1.0)) for s in train}
        with self.session(plan, coef_space) as sess:
            sess.write(coef)
            return sess.grad([(s, list(range(len(s.ids)))) for s in train], weights, opts)

    def fit(self, plan: Plan, coef_space: SearchSpace, opts: FitOptions) -> FitResult:
        """Fit the `weight` coefficients of `coef_space`, starting at opts.start, on the merge `plan` describes
        (its other parameters, e.g. density, stay as they are). The model is left at the best coefficients."""
        from tqdm.auto import tqdm

        t_start = time.perf_counter()
        train, val = self.sequences(opts.objective)
        weights = {s.task: float(opts.task_weights.get(s.task, 1.0)) for s in train}
        lo_c, hi_c = opts.clamp
        theta = torch.full((coef_space.n_params,), float(opts.start), dtype=torch.float32)
        theta0 = theta.clone()
        theta.requires_grad_(True)
        optim = torch.optim.Adam([theta], lr=opts.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, opts.steps) / opts.steps)))
        sampler = BalancedSampler(train, opts.batch_size, torch.Generator().manual_seed(opts.seed))
        history: list[dict] = []
        with self.session(plan, coef_space) as sess:
            sess.write(theta)
            best_val = self._loss_eval(val, weights, opts)
            best = (best_val, theta.detach().clone(), 0)
            history.append({"step": 0, "train_loss": None, "val_loss": best_val})
            bad, running, n_run, step = 0, 0.0, 0, 0
            bar = tqdm(total=opts.steps, desc="fit", unit="step", disable=not self.progress, leave=False,
                       dynamic_ncols=True)
            for step in range(1, opts.steps + 1):
                rebalance()  # a fit is minutes long: follow the fair share of the cores step by step, as trials do
                loss, g = sess.grad(sampler.next(), weights, opts)
                if opts.pull > 0:
                    g = g + opts.pull * (theta.detach() - theta0)
                theta.grad = g.float()
                optim.step()
                sched.step()
                with torch.no_grad():
                    theta.clamp_(lo_c, hi_c)
                sess.write(theta)
                running += loss
                n_run += 1
                bar.update(1)
                if step % opts.eval_every == 0 or step == opts.steps:
                    v = self._loss_eval(val, weights, opts)
                    history.append({"step": step, "train_loss": running / n_run, "val_loss": v})
                    bar.set_postfix(train=f"{running / n_run:.4f}", val=f"{v:.4f}")
                    running, n_run = 0.0, 0
                    if v < best[0] - 1e-6:
                        best, bad = (v, theta.detach().clone(), step), 0
                    else:
                        bad += 1
                        if bad >= opts.patience:
                            break
            bar.close()
            sess.write(best[1])
        return FitResult(best[1].cpu(), history, best[2], step, time.perf_counter() - t_start)

    # -- losses --

    def loss(self, batch: list[tuple[_Seqs, list[int]]], weights: Mapping[str, float], opts: FitOptions,
             *, train: bool) -> torch.Tensor:
        """Weighted mean over tasks of each task's mean per-example loss on `batch` ((seqs, indices) per task)."""
        with torch.set_grad_enabled(train):
            return sum(self._group_terms(batch, weights, opts))

    def backward(self, batch: list[tuple[_Seqs, list[int]]], weights: Mapping[str, float], opts: FitOptions) -> float:
        """The loss of `batch` (as `loss`), its gradient accumulated into the parameters group by group: each length
        group's forward and backward run before the next group's forward. One backward over every group would hold
        each parameter's gradient from the later groups until the earlier groups' backward reached it (autograd
        sums a parameter's uses before its hooks run): the whole model's gradients at once, besides the
        activations of every group (bench_fit's memory target)."""
        total = 0.0
        with torch.enable_grad():
            for term in self._group_terms(batch, weights, opts):
                term.backward()
                total += float(term.detach())
        return total

    def _group_terms(self, batch: list[tuple[_Seqs, list[int]]], weights: Mapping[str, float],
                     opts: FitOptions) -> Iterator[torch.Tensor]:
        """The loss of `batch` as one term per group of similar lengths, each group's forward run when its term is
        asked for. An example lies in one group, so the weighted mean over tasks of each task's mean per-example
        loss is the sum over examples of (its mean token loss) x w_task / (sum of w over the batch's tasks x the
        task's examples in the batch)."""
        rows, starts, scale, teach = [], [], [], []
        wsum = sum(weights.get(seqs.task, 1.0) for seqs, idx in batch if idx)
        for seqs, idx in batch:
            for j in idx:
                rows.append(seqs.ids[j])
                starts.append(seqs.start[j])
                scale.append(weights.get(seqs.task, 1.0) / max(wsum, 1e-12) / len(idx))
                if seqs.teacher is not None:
                    teach.append(seqs.teacher[j])
        # One forward per group of similar lengths: a batch mixes short answers with long chains, and one
        # right-padded forward would compute every short row at the longest chain's width.
        for group in _length_groups([len(row) for row in rows]):
            x, m, r, pos, tgt = _pad_batch([rows[i] for i in group], [starts[i] for i in group], self.pad, self.device)
            logits = self.mat.model(input_ids=x, attention_mask=m).logits[r, pos]  # (targets, V)
            logits = logits if logits.dtype == torch.float64 else logits.float()
            if opts.objective == "supervised":
                tok = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")  # (targets,)
            else:
                t = opts.temperature
                t_idx = torch.cat([teach[i][0] for i in group]).to(self.device)
                t_val = torch.cat([teach[i][1] for i in group]).to(self.device)
                p = torch.softmax(t_val / t, dim=-1)
                logq = torch.log_softmax(logits / t, dim=-1).gather(1, t_idx)
                tok = (p * (torch.log(p.clamp_min(1e-30)) - logq)).sum(-1) * (t * t)
            counts = torch.zeros(len(group), device=self.device, dtype=tok.dtype).index_add_(
                0, r, torch.ones_like(tok))  # targets per row of the group
            row_scale = torch.tensor([scale[i] for i in group], device=self.device, dtype=tok.dtype)
            yield (tok * (row_scale / counts.clamp_min(1))[r]).sum()

    def _loss_eval(self, seqs: list[_Seqs], weights: Mapping[str, float], opts: FitOptions) -> float:
        """The same weighted loss over every validation example (no gradient)."""
        if not seqs:
            return float("nan")
        total, wsum = 0.0, 0.0
        with torch.no_grad():
            for s in seqs:
                w = weights.get(s.task, 1.0)
                acc, n = 0.0, 0
                for lo in range(0, len(s.ids), opts.batch_size):
                    idx = list(range(lo, min(len(s.ids), lo + opts.batch_size)))
                    acc += float(self.loss([(s, idx)], weights, opts, train=False)) * len(idx)
                    n += len(idx)
                total += w * acc / max(n, 1)
                wsum += w
        return total / max(wsum, 1e-12)


class _Session:
    """One fit's working state: the parts, the slot map and the gradient hooks (removed on exit)."""

    def __init__(self, fitter: CoefficientFitter, plan: Plan, coef_space: SearchSpace):
        self.f = fitter
        mat = fitter.mat
        self.parts = fitter.linear_parts(plan)
        self.written = [i for i, _, _ in fitter.targets]
        slots = coef_space.slot_numbers("weight")  # (n_tensors, experts, max chunks)
        self.n_slots = coef_space.n_params
        self.n_exp, cmax = slots.shape[1], slots.shape[2]
        self.ix = slots[self.written]  # (n_written, experts, max chunks)
        nchunks = torch.tensor([len(mat.sources(i)[2]) for i in self.written])
        self.valid = (torch.arange(cmax).view(1, 1, cmax) < nchunks.view(-1, 1, 1)).expand_as(self.ix)
        self.flat_ix = self.ix[self.valid]
        # float32 accumulation (float64 for a float64 model: the gradient tests)
        acc = torch.float64 if mat.dtype == torch.float64 else torch.float32
        self.grad_table = torch.zeros((len(self.written), self.n_exp, cmax), dtype=acc, device=fitter.device)
        self.table = torch.zeros((len(mat.tensors), self.n_exp, cmax), dtype=torch.float64)
        self.hooks: list = []

    def __enter__(self) -> _Session:
        for w, ((i, _, param), ps) in enumerate(zip(self.f.targets, self.parts)):
            if param is None:
                continue
            param.requires_grad_(True)
            self.hooks.append(param.register_post_accumulate_grad_hook(self._hook(w, ps, self.f.mat.sources(i)[2])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()
        for _, _, p in self.f.targets:
            if p is not None:
                p.requires_grad_(False)
                p.grad = None

    def _hook(self, w: int, per_chunk: list[list[torch.Tensor]], bounds):
        """Contract the parameter's gradient with its parts per chunk, then free the gradient."""
        grad_table = self.grad_table
        n_exp = len(per_chunk[0])

        def hook(p) -> None:
            g = p.grad
            rows = g.reshape(g.shape[0], -1) if g.dim() else g.reshape(1, 1)
            dots = []
            for (lo, hi), ps in zip(bounds, per_chunk):
                gc = rows[lo:hi].reshape(-1)
                for part in ps:
                    dots.append(dot_in(gc, part.reshape(-1), grad_table.dtype))
            # (chunks * experts,) chunk-major -> (experts, chunks)
            # added: the hook runs once per length group's backward (CoefficientFitter.backward)
            grad_table[w, :, : len(bounds)] += torch.stack(dots).view(len(bounds), n_exp).T
            p.grad = None

        return hook

    def write(self, theta: torch.Tensor) -> None:
        """Write the model's weights for coefficients `theta` (one host transfer of the coefficient table)."""
        self.table[self.written] = theta.detach().double().cpu()[self.ix]
        self.f.write(self.table.tolist(), self.parts)

    def grad(self, batch, weights: Mapping[str, float], opts: FitOptions) -> tuple[float, torch.Tensor]:
        """(loss, float32 gradient per slot) of one batch at the weights last written."""
        self.grad_table.zero_()
        loss = self.f.backward(batch, weights, opts)
        g = torch.zeros(self.n_slots, dtype=self.grad_table.dtype)
        g.index_add_(0, self.flat_ix, self.grad_table.cpu()[self.valid])
        return loss, g


class BalancedSampler:
    """Seeded batches with an equal share of every task, each task's examples visited in shuffled epochs."""

    def __init__(self, seqs: list[_Seqs], batch_size: int, gen: torch.Generator):
        self.seqs = seqs
        self.per_task = max(1, batch_size // len(seqs))
        self.gen = gen
        self.queues: list[list[int]] = [[] for _ in seqs]

    def next(self) -> list[tuple[_Seqs, list[int]]]:
        out = []
        for k, s in enumerate(self.seqs):
            q = self.queues[k]
            take = []
            while len(take) < min(self.per_task, len(s.ids)):
                if not q:
                    q.extend(torch.randperm(len(s.ids), generator=self.gen).tolist())
                take.append(q.pop())
            out.append((s, take))
        return out
