"""The merge-operator registry and what every kernel shares: parameters, registration, lookup, chunking,
the device's block policy, scratch buffers and `merge_tensor` (see the package docstring for the contract).

The built-in families (linear, task_arithmetic, slerp, model_stock) register themselves when their module
is imported; `get`, `names` and `all_operators` import them on first use, so that looking a method up never
depends on what happened to be imported before.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mergesearch.config import MERGE_SEED
from mergesearch.errors import OperatorError, did_you_mean


@dataclass(frozen=True)
class Param:
    """One declared merge parameter: the single source of its name, range, default and meaning.

    `low`/`high` bound what a recipe may say (checked on every plan); `search` is the default
    range a search space proposes from (narrower: a search over weight in [-2, 2] is wasteful).
    `per_expert` parameters take one value per expert; the others one value per tensor chunk.
    `kind="bool"` parameters are stored as 0.0 / 1.0 and read as `value >= 0.5`.
    """

    name: str
    low: float
    high: float
    default: float
    doc: str
    per_expert: bool = False
    kind: str = "float"  # "float" | "bool"
    search: tuple[float, float] | None = None

    @property
    def search_range(self) -> tuple[float, float]:
        return self.search if self.search is not None else (self.low, self.high)


# Parameters shared by several families (declared once here, reused by the families).
WEIGHT = Param("weight", -2.0, 2.0, 1.0, "scale of this expert's contribution", per_expert=True, search=(0.0, 1.0))
LAMBDA = Param("lambda", 0.0, 4.0, 1.0, "scale of the merged task vector before adding it to the base",
               search=(0.5, 1.5))
DENSITY = Param("density", 0.0, 1.0, 1.0, "fraction of each task vector's entries kept", per_expert=True,
                search=(0.1, 1.0))


def normalize_param(default: bool) -> Param:
    return Param("normalize", 0.0, 1.0, float(default),
                 "divide by the sum of the weights (of the experts agreeing in sign, for TIES-style methods)",
                 kind="bool")


def rescale_param(default: bool) -> Param:
    return Param("rescale", 0.0, 1.0, float(default),
                 "after sparsifying, rescale each task vector back to its original L1 norm", kind="bool")


@dataclass(frozen=True)
class ParamRule:
    """A rule tying several of a method's parameters that their ranges alone cannot state
    (DELLA: density +/- epsilon inside (0, 1)), declared with the method in the registry.

    `broken(*values)` is True (a bool tensor, for tensors) where the values of `params`, in that order,
    break the rule; `message(*floats, where)` says so and how to fix it; `repair(*tensors)` returns
    the last parameter moved inside the rule, for search spaces that propose the parameters
    independently.
    """

    params: tuple[str, ...]
    broken: Callable[..., Any]
    message: Callable[..., str]
    repair: Callable[..., torch.Tensor]


Kernel = Callable[..., torch.Tensor | None]  # see the package docstring
Prepare = Callable[[torch.Tensor, Sequence[torch.Tensor], torch.Generator], dict]


@dataclass(frozen=True)
class Operator:
    """A registered merge method: its kernel, declared parameters and input contract."""

    name: str
    kernel: Kernel
    params: tuple[Param, ...]
    doc: str
    min_experts: int = 1
    max_experts: int | None = None
    prepare: Prepare | None = None
    reference: str = ""
    # Extra keys mergekit accepts for this method that change nothing here (e.g. int8_mask).
    ignored_mergekit_keys: frozenset[str] = field(default_factory=frozenset)
    # linear_parts(base, deltas, params, state) -> one tensor per expert such that the merged chunk is
    # base + sum_e weight_e * part_e at this candidate: what a gradient fit of the weights moves along
    # (mergesearch.fit). None: the method's weights cannot be fitted.
    linear_parts: Callable[..., list[torch.Tensor]] | None = None
    # Whether those parts, at lambda 1, are the task vectors themselves (views, no copy: what mergesearch.memory
    # counts for a fit); tests/test_operators.py checks it.
    parts_are_deltas: bool = False
    # Rules between parameters (Plan.validate and the search space apply them; the kernel refuses too).
    rules: tuple[ParamRule, ...] = ()
    # Bytes of `prepare`'s state per entry and expert (ranks, random fields): what mergesearch.memory counts.
    state_bytes: int = 0
    # ... of which not stored on a device that computes them (HASHED_DEVICES: DARE's and DELLA's uniforms), or that
    # stays in host memory, not on such a device (TIES's rank order: `host_bytes`).
    hashed_bytes: int = 0
    # Bytes per entry and expert a HASHED_DEVICES merge keeps in host memory (on the CPU they are its memory).
    host_bytes: int = 0
    # Bytes per 16-bit uniform value present, per chunk and expert, kept in host memory on every device (DARE's
    # kept L1 lookup, task_arithmetic.KeptL1): at most 2**16 values a chunk, whatever its size.
    table_bytes: int = 0
    # What that host-memory state is, for `validate` and its warnings (mergesearch.memory).
    host_state_doc: str = ""
    # group(out, base, deltas, state, sizes, params, scratch) -> None | Tensor: many chunks merged in one call
    # (see the package docstring); None: the method merges chunk by chunk only.
    group: Callable[..., torch.Tensor | None] | None = None
    # The reusable buffers (Scratch) its kernel holds, for mergesearch.memory: (fixed, per expert) blocks of
    # min(chunk, the device's block) entries, float32 at most, and buffers of a whole chunk in the merge dtype.
    # tests/test_operators.py checks both against what the kernel allocates.
    scratch_blocks: tuple[int, int] = (0, 0)
    scratch_chunks: int = 0

    def stored_state_bytes(self, device: str | torch.device) -> int:
        """Bytes of `prepare`'s state per entry and expert that `device` stores (see `hashed_bytes`)."""
        return self.state_bytes - (self.hashed_bytes if torch.device(device).type in HASHED_DEVICES else 0)

    def host_state_bytes(self, device: str | torch.device) -> int:
        """Bytes of `prepare`'s state per entry and expert that a merge on `device` keeps in host memory."""
        return self.host_bytes if torch.device(device).type in HASHED_DEVICES else 0

    def scratch_bytes(self, n_experts: int, largest: int, block: int, size: int) -> int:
        """Bytes of the buffers the kernel holds for chunks of at most `largest` entries of `size` bytes each,
        walked in blocks of `block` entries (see `scratch_blocks`)."""
        fixed, per_expert = self.scratch_blocks
        return (fixed + per_expert * n_experts) * min(largest, block) * 4 + self.scratch_chunks * largest * size

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise OperatorError(
            f"method {self.name!r} has no parameter {name!r}{did_you_mean(name, self.param_names)}; "
            f"its parameters are {', '.join(self.param_names) or '(none)'}"
        )

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def check_experts(self, n: int) -> None:
        if n < self.min_experts or (self.max_experts is not None and n > self.max_experts):
            want = (f"exactly {self.min_experts}" if self.max_experts == self.min_experts
                    else f"at least {self.min_experts}" if self.max_experts is None
                    else f"{self.min_experts} to {self.max_experts}")
            raise OperatorError(
                f"method {self.name!r} needs {want} expert model(s) besides the base, got {n}; "
                "list the experts under `models:`"
            )


_REGISTRY: dict[str, Operator] = {}


def register(name: str, *, params: Sequence[Param], doc: str, min_experts: int = 1,
             max_experts: int | None = None, prepare: Prepare | None = None, reference: str = "",
             ignored_mergekit_keys: Sequence[str] = (),
             linear_parts: Callable[..., list[torch.Tensor]] | None = None, parts_are_deltas: bool = False,
             rules: Sequence[ParamRule] = (), state_bytes: int = 0, hashed_bytes: int = 0, host_bytes: int = 0,
             table_bytes: int = 0, host_state_doc: str = "", group: Callable[..., torch.Tensor | None] | None = None,
             scratch_blocks: tuple[int, int] = (0, 0), scratch_chunks: int = 0) -> Callable[[Kernel], Kernel]:
    """Decorator: register `kernel` as merge method `name` (the one place a method is added)."""

    def deco(kernel: Kernel) -> Kernel:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = Operator(name=name, kernel=kernel, params=tuple(params), doc=doc,
                                   min_experts=min_experts, max_experts=max_experts, prepare=prepare,
                                   reference=reference, ignored_mergekit_keys=frozenset(ignored_mergekit_keys),
                                   linear_parts=linear_parts, parts_are_deltas=parts_are_deltas,
                                   rules=tuple(rules), state_bytes=state_bytes, hashed_bytes=hashed_bytes,
                                   host_bytes=host_bytes, table_bytes=table_bytes, host_state_doc=host_state_doc,
                                   group=group, scratch_blocks=scratch_blocks,
                                   scratch_chunks=scratch_chunks)
        return kernel

    return deco


# The built-in families, in registration order (= `names()` order).
BUILTIN_FAMILIES = ("linear", "task_arithmetic", "slerp", "model_stock")


@functools.cache
def _load_builtin() -> None:
    for family in BUILTIN_FAMILIES:
        importlib.import_module(f"mergesearch.operators.{family}")


def get(name: str) -> Operator:
    """The registered operator called `name`; OperatorError with a suggestion otherwise."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OperatorError(
            f"unknown merge method {name!r}{did_you_mean(name, _REGISTRY)}; "
            f"available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def names() -> list[str]:
    """Names of every registered merge method, in registration order."""
    _load_builtin()
    return list(_REGISTRY)


def all_operators() -> list[Operator]:
    """Every registered operator, in registration order."""
    _load_builtin()
    return list(_REGISTRY.values())


# --- helpers shared by the kernels ---------------------------------------------------------------


def chunk_bounds(dim0: int, chunks: int) -> list[tuple[int, int]]:
    """Row ranges of `torch.chunk(t, chunks, dim=0)` for a tensor with `dim0` rows.

    Like torch.chunk, every chunk has ceil(dim0 / chunks) rows except the last, so fewer than
    `chunks` chunks come back when dim0 is small (5 rows in 4 chunks -> 2, 2, 1).
    """
    if dim0 <= 0:
        return [(0, max(dim0, 0))]
    size = -(-dim0 // max(1, chunks))
    return [(lo, min(lo + size, dim0)) for lo in range(0, dim0, size)]


def num_chunks(shape: Sequence[int], chunks: int) -> int:
    """How many chunks a tensor of `shape` has at chunk count `chunks` (0-d tensors: 1)."""
    return 1 if len(shape) == 0 else len(chunk_bounds(int(shape[0]), chunks))


@functools.lru_cache(maxsize=1 << 14)  # called per expert and chunk on the hot path; numpy's formatting is slow
def exact(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (0.699999988 -> 0.7).

    Plans store parameters as float32; mergekit computes k = int(density * n) from the YAML's
    float64. Reading the float32 back through its shortest decimal gives the same k.
    """
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def is_on(x: float) -> bool:
    """A bool parameter stored as 0.0 / 1.0."""
    return x >= 0.5


# --- the block policy: the device decides it, here and nowhere else ----------------------------------

# Entries per block of a multi-step kernel (masks, sign consensus), by device type. Each step is a
# separate torch op. On a CPU a block stays in the L2 cache (a dozen float32 buffers of 128K entries),
# where an elementwise op runs ~3-4x faster than streaming from memory. On a GPU each op is a kernel
# launch of a few microseconds: 128K-entry blocks made TIES 100-250x slower than task arithmetic on an
# H200, so a chunk is processed whole up to 32M entries (which bounds the eager kernel's scratch: at most 9 + E
# blocks, Operator.scratch_blocks, ~1.5 GB in float32 for 3 experts, whatever the model's largest tensor).
BLOCK_ENTRIES = {"cpu": 1 << 17, "cuda": 1 << 25}
_BLOCK_DEFAULT = 1 << 25  # other accelerators (mps, xpu): launch-bound like CUDA


def block_entries(device: str | torch.device) -> int:
    """Entries per kernel block on `device` (see BLOCK_ENTRIES)."""
    return BLOCK_ENTRIES.get(torch.device(device).type, _BLOCK_DEFAULT)


# Which chunks the task-arithmetic family merges with its compiled formula (operators/fused.py, one pass over
# the sources) instead of the eager block kernel: chunks of at least COMPILED_MIN_ENTRIES in the device's
# COMPILED_DTYPES, in models of at least COMPILED_MIN_MODEL entries on that device.
# - bf16 is compiled on both devices, fp16 on CUDA only. On a CPU the compiled bf16 formula was once 2x slower
#   than the eager kernel; with torch 2.13 it is faster for every sparse method (2026-12-07, one 16.8M-entry
#   bf16 chunk, 3 experts, 2 threads: ties 34 against 98 ms, dare_ties 120 / 217, breadcrumbs_ties 28 / 121,
#   della 202 / 348, della_linear 191 / 222, dare_linear 133 / 144; the same weights), while plain task arithmetic
#   stays eager there (16 against 8 ms: `Scratch.compiled`). On a GPU the eager kernel's ~20 launches per block
#   cost more. The formula rounds to bf16 wherever the eager kernel writes a bf16 tensor, so that elected
#   signs stay the eager kernel's (within two bf16 steps, tests/test_fused.py).
# - Below COMPILED_MIN_ENTRIES the call's fixed cost (guards, the candidate's parameters as tensors) is more
#   than the work.
# - Below COMPILED_MIN_MODEL the compile (1-3 s per formula, ~20 s for a process's first on a cold cache) costs
#   more than a study saves: a TIES candidate of a 134M model saves ~0.35 s on 2 CPU threads, one of a 16M
#   model ~0.04 s. GPUs save more per entry (one kernel instead of ~20 launches per block).
# MERGESEARCH_FUSED=0 runs the eager kernel everywhere; MERGESEARCH_FUSED=1 compiles every chunk of any model
# in the device's dtypes (benchmarks: the two paths side by side).
COMPILED_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}
# Where the compiled formula computes DARE's and DELLA's uniforms in the kernel instead of reading them
# (operators/counter.py): a GPU has arithmetic to spare and reads a bf16 delta in half the bytes of its uniforms;
# a CPU's integer hash cost more than the read.
HASHED_DEVICES = {"cuda"}
COMPILED_MIN_ENTRIES = 1 << 16
COMPILED_MIN_MODEL = {"cpu": 1 << 26, "cuda": 1 << 24}  # 67M entries (268 MB float32); 16.8M


def compiled_min_entries(device: str | torch.device, compiled: bool | None = None,
                         model_entries: int = 0) -> int | None:
    """The smallest chunk (entries) merged by the compiled formula on `device`; None: never.

    `compiled`: None follows the policy above for a model of `model_entries` floats; True compiles every
    chunk in the device's dtypes, whatever its size (tests: the path a large model takes, on small tensors);
    False never.
    """
    env = os.environ.get("MERGESEARCH_FUSED", "")
    if compiled is False or env == "0":
        return None
    if compiled or env == "1":
        return 0
    floor = COMPILED_MIN_MODEL.get(torch.device(device).type)
    return COMPILED_MIN_ENTRIES if floor is not None and model_entries >= floor else None


def compiled_dtypes(device: str | torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes the compiled formula merges on `device` (COMPILED_DTYPES; none on other devices)."""
    return COMPILED_DTYPES.get(torch.device(device).type, ())


@functools.cache
def wide_cpu() -> bool:
    """Whether inductor's C++ compiles for 512-bit vectors on this CPU (AVX-512), where some formulas take other
    (equally exact) forms: int32 sources read as they are, fixed-point sums in int64 (operators/fused.py), plain
    bf16 task arithmetic compiled (`Scratch.compiled`). Private API (torch._inductor.cpu_vec_isa), asked once: where
    it is missing or fails, the choices made for AVX2 stand, which are exact everywhere and only slower here."""
    try:
        from torch._inductor import cpu_vec_isa
        isa = cpu_vec_isa.pick_vec_isa()
        return bool(isa) and isa.bit_width() >= 512
    except Exception:  # noqa: BLE001 - any failure keeps the AVX2 choices
        return False


class Scratch:
    """Reusable flat buffers keyed by slot name, grown on demand, so kernels allocate nothing; and the
    block size kernels walk a chunk in (`block_entries` of the device they run on).

    `get(slot, like)` returns a tensor shaped like `like` (same device, dtype unless given)
    viewing the slot's storage; buffers only grow, so after the first candidate the hot path
    does no allocation.
    """

    def __init__(self, block: int = BLOCK_ENTRIES["cpu"], compiled_min: int | None = None,
                 compiled_dtypes: Sequence[torch.dtype] = COMPILED_DTYPES["cpu"], hashed: bool = False) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1 entries, got {block}")
        self.block = block
        self.compiled_min = compiled_min  # `compiled_min_entries` of the device: chunks this large run compiled
        self.compiled_dtypes = tuple(compiled_dtypes)  # ... in these dtypes (COMPILED_DTYPES of the device)
        self.hashed = hashed  # ... computing DARE's and DELLA's uniforms in the kernel (HASHED_DEVICES)
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        # The views handed out, by slot and shape: a candidate asks for the same few shapes every time, and
        # making a view costs more than the elementwise op on a small tensor (launch-bound GPUs, small models).
        self._views: dict[tuple, torch.Tensor] = {}

    @classmethod
    def for_device(cls, device: str | torch.device, *, block: int | None = None, compiled: bool | None = None,
                   model_entries: int = 0) -> Scratch:
        """The buffers with `device`'s policies: its block (`block_entries`, or `block`) and which chunks of a
        model of `model_entries` floats run the compiled formula (`compiled_min_entries`, `compiled_dtypes`), and
        whether it computes the uniforms of DARE and DELLA in the kernel (HASHED_DEVICES)."""
        return cls(block if block is not None else block_entries(device),
                   compiled_min_entries(device, compiled, model_entries), compiled_dtypes(device),
                   torch.device(device).type in HASHED_DEVICES)

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold now."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def compiled(self, chunk: torch.Tensor, plain: bool = False) -> bool:
        """Whether the family's compiled formula merges `chunk` (the policy: `compiled_min_entries`), chunk by chunk
        or as the base of a group of chunks in one call: the same decision for both, so that a model's weights do
        not depend on whether its chunks were grouped (resident) or not (streamed, a group of one).

        `plain`: task arithmetic at this chunk (every chunk of the group). On the CPU the formula's exact bf16
        rounding after every add, which inductor emulates, took 1.5x the eager adds' time on an AVX2 CPU (a bf16
        group, 134M Llama, 3 experts, 2 threads), so plain bf16 stays on the eager adds there unless the formula is
        forced (compiled_min 0); with AVX-512 (`wide_cpu`) the bf16 group took 0.19x their time (72 against 371 ms,
        the same model). A float32 group took 0.66-0.69x the eager adds' time, a float32 chunk alone 1.1x: until
        2026-12-08 such a chunk stayed eager, so a streamed model (chunk by chunk) differed from the resident one
        (grouped) in the last bit of most tensors."""
        if self.compiled_min is None or chunk.dtype not in self.compiled_dtypes:
            return False
        eager_adds = plain and chunk.device.type == "cpu" and self.compiled_min > 0
        if eager_adds and not (chunk.dtype == torch.float32 or wide_cpu()):
            return False
        return chunk.numel() >= self.compiled_min

    def get(self, slot: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        key = (slot, dtype, like.device)
        view_key = (key, like.shape)
        view = self._views.get(view_key)
        if view is not None:
            return view
        n = like.numel()
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype, device=like.device)
            self._bufs[key] = buf
            self._views = {k: v for k, v in self._views.items() if k[0] != key}  # views of the old buffer
        view = self._views[view_key] = buf[:n].view(like.shape)
        return view


# --- the pure-tensor entry point -----------------------------------------------------------------


def _per_chunk(value: Any, n_experts: int, per_expert: bool, n_chunks: int, name: str) -> list[list[float]]:
    """Normalise a parameter value to [chunk][expert or 1] floats.

    Accepted: a scalar; for per-expert parameters a list of one value per expert; and a list of
    per-chunk values (for per-expert parameters: [expert][chunk]).
    """
    width = n_experts if per_expert else 1
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return [[float(value)] * width for _ in range(n_chunks)]
    if per_expert:
        if len(value) != n_experts:
            raise OperatorError(f"parameter {name!r} needs one value per expert ({n_experts}), got {len(value)}")
        rows = []
        for v in value:
            if isinstance(v, (list, tuple)):
                if len(v) != n_chunks:
                    raise OperatorError(f"parameter {name!r} needs {n_chunks} per-chunk values, got {len(v)}")
                rows.append([float(x) for x in v])
            else:
                rows.append([float(v)] * n_chunks)
        return [[rows[e][c] for e in range(n_experts)] for c in range(n_chunks)]
    if len(value) != n_chunks:
        raise OperatorError(f"parameter {name!r} needs {n_chunks} per-chunk values, got {len(value)}")
    return [[float(v)] for v in value]


def resolve_chunk_params(op: Operator, values: dict[str, list[float]]) -> dict[str, Any]:
    """Kernel params from raw [expert or 1] floats: per-expert -> tuple, method-level -> float."""
    return {p.name: tuple(values[p.name]) if p.per_expert else values[p.name][0] for p in op.params}


def merge_tensor(method: str, base: torch.Tensor, experts: Sequence[torch.Tensor], *, chunks: int = 1,
                 seed: int = MERGE_SEED, block: int | None = None, compiled: bool | None = None,
                 **params: Any) -> torch.Tensor:
    """Merge one tensor with `method`: a new tensor, same shape/dtype/device as `base`.

    `experts` are full expert tensors (task vectors are taken against `base`). Parameters not
    given take their declared default; values may be scalars, per-expert lists, or per-chunk
    lists (per-expert: [expert][chunk]). Example:
        merge_tensor("ties", b, [e1, e2], weight=[0.5, 0.5], density=0.3)
    `block`: entries per kernel block, default the device's policy (`block_entries`); tests pass
    another device's to run its arithmetic here. `compiled`: the compiled formula for every chunk in the
    device's compiled dtypes (True), never (False), or as the device's policy says (None; see
    `compiled_min_entries`).
    """
    op = get(method)
    op.check_experts(len(experts))
    unknown = set(params) - set(op.param_names)
    if unknown:
        name = sorted(unknown)[0]
        op.param(name)  # raises with a suggestion
    deltas = [e.to(base.dtype) - base for e in experts]
    out = torch.empty_like(base)
    bounds = chunk_bounds(base.shape[0], chunks) if base.dim() else [(0, 1)]
    per = {p.name: _per_chunk(params.get(p.name, p.default), len(experts), p.per_expert, len(bounds), p.name)
           for p in op.params}
    for p in op.params:
        for row in per[p.name]:
            for v in row:
                if not (p.low <= v <= p.high) or math.isnan(v):
                    raise OperatorError(f"{method}: parameter {p.name}={v} is outside [{p.low}, {p.high}]")
    gen = torch.Generator().manual_seed(seed)
    scratch = Scratch.for_device(base.device, block=block, compiled=compiled, model_entries=base.numel())
    for c, (lo, hi) in enumerate(bounds):
        if base.dim():
            b, ds, o = base[lo:hi], [d[lo:hi] for d in deltas], out[lo:hi]
        else:
            b, ds, o = base, deltas, out
        state = op.prepare(b, ds, gen) if op.prepare else {}
        op.kernel(o, b, ds, resolve_chunk_params(op, {k: v[c] for k, v in per.items()}), state, scratch)
    return out
