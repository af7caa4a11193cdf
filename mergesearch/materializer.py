"""The hot path of a search: merge candidates written into one preallocated model, in place.

`Materializer` loads the sources once (on the device, in the chosen dtype), keeps the task
vectors and each method's precomputed state, allocates one transformers model and writes
every candidate `Plan` (mergesearch.plan) into its parameters in place: no new model, no disk
I/O, one host sync per candidate (the final finiteness check). `materialize_recipe` and
`merge_recipe` (the `merge` command) do the same for a recipe file (mergesearch.recipe).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergesearch import operators
from mergesearch.checkpoints import (
    Checkpoint,
    TensorInfo,
    check_compatible,
    open_checkpoint,
    parse_dtype,
    resolve_device,
    same_path,
    save_model,
)
from mergesearch.config import MERGE_DTYPE, MERGE_SEED
from mergesearch.errors import CandidateError, CheckpointError, ConfigError, OperatorError
from mergesearch.groups import Group, plan_group
from mergesearch.operators import Scratch, chunk_bounds
from mergesearch.pinned import PinnedArena
from mergesearch.plan import Plan, per_tensor_chunks
from mergesearch.recipe import Recipe, load_recipe, recipe_chunk_counts
from mergesearch.timings import PhaseTimer

__all__ = ["Materializer", "chunk_slice", "materialize_recipe", "merge_recipe"]


def chunk_slice(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of a tensor's chunk bounds (a 0-d tensor is its own only chunk)."""
    return x[lo:hi] if x.dim() else x


class Materializer:
    """Writes merge candidates into one preallocated transformers model, in place.

    Sources (base weights and task vectors) are loaded once, on `device` in `dtype` (with
    `streaming`, kept in CPU memory and copied per tensor to the device); the method's state
    (sorted magnitudes, random fields, angles) is computed once per tensor chunk. Then
    `materialize(plan)` costs about the memory traffic of reading the sources once and
    writing the model once. The chunks the compiled formula merges (operators.compiled_min_entries) have
    their sources, state and model parameters laid out in flat buffers and are merged in one call per
    candidate where the method can (mergesearch.groups; `grouped=False`: chunk by chunk).
    """

    def __init__(self, base: str | os.PathLike | Checkpoint, experts: Sequence[str | os.PathLike | Checkpoint],
                 method: str, *, dtype: str | torch.dtype = MERGE_DTYPE, device: str | torch.device = "auto",
                 chunks: int | Sequence[int] = 1, streaming: bool = False, seed: int = MERGE_SEED,
                 merge_common_vocab: bool = False,
                 check_finite: bool = True, block: int | None = None, compiled: bool | None = None,
                 grouped: bool = True):
        self.op = operators.get(method)
        self.op.check_experts(len(experts))
        if min([chunks] if isinstance(chunks, int) else list(chunks) or [1]) < 1:
            raise ConfigError(f"chunks must be >= 1, got {chunks}")
        self.base = open_checkpoint(base)
        self.experts = [open_checkpoint(e) for e in experts]
        distinct = [e for e in self.experts if not same_path(e.path, self.base.path)]
        check_compatible(self.base, distinct, merge_common_vocab=merge_common_vocab)
        self.dtype = parse_dtype(dtype)
        self.device = resolve_device(device)
        self.chunks = chunks
        self.seed = seed
        # Streaming keeps the sources in host memory, apart from the model, and copies each tensor's to the
        # device when it is merged. On the CPU the copy is free, but the same path runs, so it is tested.
        self.streaming = streaming
        self.check_finite = check_finite
        self.num_layers = self.base.num_layers
        self.expert_names = [e.path.name for e in self.experts]
        self.tensors: list[TensorInfo] = [t for t in self.base.tensors.values() if t.dtype.is_floating_point]
        # chunks: one count for every tensor, or one per tensor in `tensors` order (chunks: auto)
        self._bounds = [chunk_bounds(t.shape[0], c) if t.shape else [(0, 1)]
                        for t, c in zip(self.tensors, per_tensor_chunks(chunks, len(self.tensors)))]
        # Kernels walk chunks in blocks the device decides (operators.block_entries); tests pass the
        # GPU's block to run its arithmetic on a CPU, and `compiled` to force or forbid the compiled formula.
        self.scratch = Scratch.for_device(self.device, block=block, compiled=compiled,
                                          model_entries=sum(t.numel for t in self.tensors))
        # The chunks the compiled formula merges lie in flat buffers, merged in one call per candidate where the
        # method can (mergesearch.groups); `grouped=False` (or MERGESEARCH_GROUPED=0): chunk by chunk.
        self._group = self._plan_group() if grouped else None
        self.grouped = self._group is not None  # False: chunk by chunk (benchmarks time both on one materialiser)
        self.timer = PhaseTimer()  # where opening went: read_sources, prepare, model (mergesearch.timings)
        with torch.no_grad():
            self._load_sources()
            with self.timer.phase("model_s"):
                self.model = self._build_model()

    # -- set-up (once) --

    def _plan_group(self) -> Group | None:
        s = self.scratch
        # Whatever the method: a plan of another, state-free one (task arithmetic on a linear materialiser) may use it.
        if self.streaming or s.compiled_min is None or self.dtype not in s.compiled_dtypes:
            return None
        rows = [math.prod(t.shape[1:]) for t in self.tensors]
        wanted = [all((hi - lo) * row >= s.compiled_min for lo, hi in b) for b, row in zip(self._bounds, rows)]
        return plan_group(self.tensors, self._bounds, wanted)

    def _place(self, slot, i: int, t: torch.Tensor) -> torch.Tensor:
        """t, or its view in the group's flat buffer `slot` where tensor i is in the group."""
        return self._group.place(slot, i, t) if self._group is not None and i in self._group else t

    def _load_sources(self) -> None:
        with self.timer.phase("read_sources_s"):
            self._read_sources()
        with self.timer.phase("prepare_s"):
            self._prepare()

    def _read_sources(self) -> None:
        store = self._store
        # Streaming to a GPU: each source is copied into page-locked slabs as soon as it exists (asynchronous
        # copies to the device; mergesearch.pinned), so the host never holds a pageable and a pinned copy of all.
        self._pinned = PinnedArena() if self.streaming and _pins(self.device) else None
        names = [t.name for t in self.tensors]
        base_src = self.base.load(names, device=store)  # source precision: deltas are taken before casting
        self._deltas: list[list[torch.Tensor]] = [[] for _ in self.tensors]
        for e, ex in enumerate(self.experts):
            if same_path(ex.path, self.base.path):
                for i, n in enumerate(names):
                    zeros = torch.zeros_like(base_src[n], dtype=self.dtype)
                    self._deltas[i].append(self._pin(self._place(("delta", e), i, zeros)))
                continue
            src = ex.load(names, device=store)
            for i, n in enumerate(names):
                b, x = base_src[n], src.pop(n)
                if x.shape != b.shape:  # merge_common_vocab: keep the rows the base has
                    x = x[: b.shape[0]]
                # In the wider of the source and merge dtypes: bf16 checkpoints merged in float32 get
                # exact differences (as mergekit, which casts first), float32 ones merged in bf16 are
                # rounded once, after the subtraction.
                wide = torch.promote_types(b.dtype, self.dtype)
                delta = self._place(("delta", e), i, (x.to(wide) - b.to(wide)).to(self.dtype))
                self._deltas[i].append(self._pin(delta))
            del src
        self._base = [self._pin(self._place("base", i, base_src.pop(n).to(self.dtype))) for i, n in enumerate(names)]

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        """t, or with streaming to a GPU its page-locked copy."""
        return t if self._pinned is None else self._pinned.copy(t)

    @property
    def _store(self) -> torch.device:
        """Where the sources live: the device, or with streaming the host."""
        return torch.device("cpu") if self.streaming else self.device

    def _prepare(self) -> None:
        # Precomputed state per tensor per chunk, in plan order (the random fields draw in this order).
        # Always computed on the merge device, also when streaming (then kept in host memory beside the
        # sources): norms and angles are reductions whose rounding depends on the device, so state made
        # on the host would give streamed weights that differ from resident ones.
        gen = torch.Generator().manual_seed(self.seed)
        self._state: list[list[dict]] = []
        for i, t in enumerate(self.tensors):
            per_chunk = []
            for c, (lo, hi) in enumerate(self._bounds[i]):
                if self.op.prepare is None:
                    per_chunk.append({})
                    continue
                b = chunk_slice(self._base[i], lo, hi).to(self.device)
                ds = [chunk_slice(d, lo, hi).to(self.device) for d in self._deltas[i]]
                state = self.op.prepare(b, ds, gen)
                if self.streaming:
                    state = move_state(state, self._store, pin=self._pin)
                elif self._group is not None and i in self._group and self.op.group is not None:
                    state = self._group.add_state(i, c, state)  # laid out for the method's group kernel
                per_chunk.append(state)
            self._state.append(per_chunk)
        if self._group is not None:
            self._group.finish_state(len(self.experts), self.device)

    def shares_state(self, op) -> bool:
        """Whether `op`'s kernel reads this materialiser's prepared state (the method it was made for, or one
        that prepares the same); a state-free method's kernel gets empty states."""
        return op.prepare is self.op.prepare

    def _build_model(self):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        try:
            # Explicitly False: left unset, transformers asks on stdin whether to run a folder's own code.
            cfg = AutoConfig.from_pretrained(self.base.path, trust_remote_code=False)
        except ValueError as exc:
            msg = str(exc)
            if "custom code" in msg or "trust_remote_code" in msg:
                raise CheckpointError(f"{self.base.path} needs its own modelling code (auto_map in config.json); "
                                      "mergesearch never runs code from a checkpoint: use an architecture that "
                                      "transformers ships") from None
            raise CheckpointError(f"{self.base.path}/config.json: transformers cannot build this model "
                                  f"({msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__})") from None
        with no_init_weights():  # every weight is overwritten by each candidate
            model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype)
        model.tie_weights()  # no_init_weights also skips tying (GPT-2's lm_head = wte)
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update(dict(model.named_buffers()))
        for t in self.tensors:
            target = named.get(t.name)
            if target is None:
                raise CheckpointError(f"{self.base.path}: tensor {t.name} has no counterpart in "
                                      f"{type(model).__name__}; is config.json the one these weights were saved with?")
            if tuple(target.shape) != t.shape:
                raise CheckpointError(f"{t.name}: model expects {tuple(target.shape)}, checkpoint has {t.shape}")
        if self._group is not None:
            # The group's parameters become views of its flat output, on the device, before the model moves there:
            # the rest moves, these are not copied twice (a second copy of a 7B model would not fit beside it).
            bound: set[int] = set()
            for i, t in enumerate(self.tensors):
                param = named[t.name]
                if i in self._group and id(param) not in bound:  # a tied weight: bound once, through its first name
                    bound.add(id(param))
                    param.data = self._group.view("out", i, self._base[i])
        model.to(self.device).eval().requires_grad_(False)
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update(dict(model.named_buffers()))
        self._targets: list[torch.Tensor | None] = []
        written: set[int] = set()
        for t in self.tensors:
            target = named[t.name]
            ptr = target.data_ptr()
            self._targets.append(None if ptr in written else target.data)  # tied weights are written once
            written.add(ptr)
        missing = [n for n, p in model.named_parameters() if p.data_ptr() not in written]
        if missing:
            raise CheckpointError(f"{self.base.path}: model parameter {missing[0]} is not in the checkpoint "
                                  f"({len(missing)} missing); the merge would leave it uninitialised")
        # Non-float tensors of the checkpoint (rare) are copied from the base once.
        extra = [t.name for t in self.base.tensors.values() if not t.dtype.is_floating_point and t.name in named]
        for n, v in self.base.load(extra, device=self.device).items():
            named[n].data.copy_(v)
        return model

    # -- per candidate --

    def plan(self, **values) -> Plan:
        """A Plan for this materialiser with one value per parameter (scalar or per-expert list)."""
        return Plan.full(self.op.name, self.tensors, len(self.experts), chunks=self.chunks, **values)

    def _check_plan(self, plan: Plan) -> None:
        # A method that precomputes nothing (task arithmetic, linear, ...) runs on any materialiser, so a
        # study can score its baselines without a second copy of the sources.
        # Methods sharing a `prepare` (ties/breadcrumbs*, dare_*, della*) share the precomputed state too.
        if plan.method != self.op.name and plan.operator.prepare not in (None, self.op.prepare):
            raise OperatorError(f"plan is for {plan.method!r} but this materialiser was prepared for "
                                f"{self.op.name!r}; build a Materializer per method")
        if plan.tensor_names != tuple(t.name for t in self.tensors):
            raise OperatorError("plan's tensor names do not match this materialiser's (build it from `.tensors`)")
        if plan.n_experts != len(self.experts):
            raise OperatorError(f"plan has {plan.n_experts} experts, materialiser {len(self.experts)}")
        want = tuple(len(b) for b in self._bounds)
        if plan.chunks != want:
            raise OperatorError(f"plan's chunk counts differ from the materialiser's (chunks={self.chunks})")
        plan.validate()

    def materialize(self, plan: Plan):
        """Write `plan` into `self.model` in place and return the model; CandidateError on NaN/inf."""
        self._check_plan(plan)
        op = plan.operator
        own_state = self.shares_state(op)
        chunk_params = plan.kernel_params()  # one host read-back per candidate
        sums = []

        with torch.no_grad():
            grouped = self._merge_group(op, own_state, chunk_params)
            if grouped is not None and self.check_finite:
                sums.append(grouped)
            for i, t in enumerate(self.tensors):
                target = self._targets[i]
                if target is None or (grouped is not None and i in self._group):
                    continue
                base, deltas = self._base[i], self._deltas[i]
                states = self._state[i] if own_state else [{}] * len(self._bounds[i])
                if self.streaming:
                    base = base.to(self.device, non_blocking=True)
                    deltas = [d.to(self.device, non_blocking=True) for d in deltas]
                    states = [move_state(s, self.device) for s in states]
                written = []  # the sums of the chunks a kernel returned (it computed them as it wrote them)
                for c, (lo, hi) in enumerate(self._bounds[i]):
                    p = chunk_params(i, c)
                    try:
                        written.append(op.kernel(chunk_slice(target, lo, hi), chunk_slice(base, lo, hi),
                                                 [chunk_slice(d, lo, hi) for d in deltas], p, states[c], self.scratch))
                    except CandidateError as exc:
                        raise CandidateError(f"{t.name}: {exc}") from None
                if self.check_finite:
                    if written and all(w is not None for w in written):  # no second read of the tensor
                        sums.append(written[0] if len(written) == 1 else torch.stack(written).sum())
                    else:
                        sums.append(target.sum(dtype=torch.float32))
            if sums and not bool(torch.isfinite(torch.stack(sums)).all()):  # the one host sync
                bad = next((t.name for t, w in zip(self.tensors, self._targets)
                            if w is not None and not math.isfinite(float(w.sum(dtype=torch.float32)))), "the sum")
                raise CandidateError(f"merged weights are not finite (NaN/inf) in {bad}")
        return self.model

    def _merge_group(self, op, own_state: bool, chunk_params) -> torch.Tensor | None:
        """The group's chunks merged in one call (op.group); the float32 sum it wrote, or None: no group here,
        or the method cannot merge it at this candidate (then each chunk runs alone, as any other)."""
        g = self._group
        if not self.grouped or g is None or op.group is None or not (own_state or op.prepare is None):
            return None
        params = [chunk_params(i, c) for i in g.members for c in range(len(self._bounds[i]))]
        try:
            return op.group(g.blocks(g.buffers["out"]), g.blocks(g.buffers["base"]),
                            [g.blocks(g.buffers["delta", e]) for e in range(len(self.experts))], g.state, g.sizes,
                            params, self.scratch)
        except CandidateError:
            return None  # merged chunk by chunk, whose error names the tensor

    def sources(self, i: int) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[int, int]], list[dict]]:
        """Tensor i's cached base, task vectors, chunk row bounds and per-chunk precomputed state
        (on the device; with `streaming`, in host memory). Read-only: the fit builds on them."""
        return self._base[i], self._deltas[i], self._bounds[i], self._state[i]

    def is_written(self, i: int) -> bool:
        """False for the second name of a tied weight (written once, through the first)."""
        return self._targets[i] is not None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current candidate's tensors by checkpoint name (views of the model's parameters)."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(dict(self.model.named_buffers()))
        return {t.name: named[t.name].data for t in self.tensors}


def _pins(device: torch.device) -> bool:
    """Whether streamed sources are page-locked for this merge device (a GPU's asynchronous copies)."""
    return device.type == "cuda"


def move_state(state: Any, device: torch.device, pin: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """Every tensor of a precomputed state moved to `device` (then passed through `pin`: page-locked)."""
    if isinstance(state, torch.Tensor):
        # Asynchronous only towards an accelerator: a non-blocking copy to the host may still be in flight
        # when the host reads it (here: the pinned copy right after).
        moved = state.to(device, non_blocking=device.type != "cpu")
        return pin(moved) if pin else moved
    if isinstance(state, dict):
        return {k: move_state(v, device, pin) for k, v in state.items()}
    if isinstance(state, list):
        return [move_state(v, device, pin) for v in state]
    return state


# --- convenience ------------------------------------------------------------------------------------


def materialize_recipe(recipe: Recipe | str | os.PathLike | Mapping, *, device: str = "auto",
                       dtype: str | None = None, streaming: bool = False) -> Materializer:
    """Load a recipe, build a Materializer for it and materialise it; the merged model is `.model`."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    missing = [str(p) for p in [r.base_model, *r.models] if not Path(p).is_dir()]
    if missing:
        raise CheckpointError(f"model folder not found: {missing[0]} (paths in a recipe are relative to its file)")
    chunks = r.chunks
    if not isinstance(chunks, int):  # per layer -> per tensor, in the materialiser's tensor order
        base = open_checkpoint(r.base_model)
        chunks = recipe_chunk_counts(chunks, [t for t in base.tensors.values() if t.dtype.is_floating_point],
                                     base.num_layers)
    m = Materializer(r.base_model, r.models, r.method, dtype=dtype or r.dtype, device=device, chunks=chunks,
                     streaming=streaming, seed=r.seed)
    m.materialize(r.to_plan(m.tensors, m.num_layers))
    return m


def merge_recipe(recipe_path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                 device: str = "auto", dtype: str | None = None) -> Path:
    """Merge a recipe file (either format) and save the result with its provenance; the `merge` command."""
    r = load_recipe(recipe_path)
    out_p = Path(out).expanduser()
    if out_p.exists() and not force:
        raise CheckpointError(f"{out_p} already exists: choose another --out or pass --force to replace it")
    m = materialize_recipe(r, device=device, dtype=dtype)
    provenance = {
        "tool": "mergesearch merge",
        "recipe_file": str(Path(recipe_path).resolve()),
        "recipe": r.source,
        "recipe_format": r.format,
        "method": r.method,
        "dtype": str(m.dtype).replace("torch.", ""),
        "seed": r.seed,
        "base": m.base.fingerprint(),
        "experts": [e.fingerprint() for e in m.experts],
    }
    return save_model(m.model, out_p, base=m.base, provenance=provenance, force=force)
