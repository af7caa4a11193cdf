"""The task-arithmetic family's merge as one compiled pass per chunk (torch.compile: C++ on the CPU, Triton on CUDA).

Why it exists: the eager kernel (task_arithmetic.py) runs each rule as its own torch op, ~20 per block, so a TIES
candidate costs ~5x task arithmetic on a CPU and, one kernel launch per op, far more on a GPU. Here the same
rules are one elementwise formula over the whole chunk: each source byte is read once per pass, nothing is
written but the output. No library offers this merge, so the hot path is hand-written here.

The formula takes the rules `_Rules` decided in task_arithmetic.py (which entries each expert keeps, its
coefficient, its rescale factor) as tensors, never as Python numbers, so one compiled graph serves every
candidate: a new density or weight never recompiles. It repeats the eager kernel's arithmetic op for op
(the same products, the same summation order, bf16/fp16 rounded wherever eager writes them), so its elected
signs are the eager kernel's and its values equal within float32 rounding (bf16: two bf16 steps at most);
tests/test_fused.py checks that for every method.

Which entries an expert keeps is a `Sparsifier` (one small class per kind: magnitude ranks, DARE's uniforms,
DELLA's uniforms and row ranks); the formulas are written once for all of them.

The L1 norms that `rescale` needs are summed in float64 on both paths (the eager kernel per block, this one in
one reduction): float64 sums in different orders round to the same float32 factor, where float32 sums did not
(a factor one ulp apart flips the elected sign of the rare entries whose vote is ~0).

The policy (which device, dtype, model and chunk size run compiled) is `operators.registry.compiled_min_entries`.
"""

from __future__ import annotations

import collections
import functools
import logging
import types
import warnings

import torch

log = logging.getLogger(__name__)


class Sparsifier:
    """One kind of sparsification as a formula: which of the method's prepared per-entry state it reads
    (`sources`, keys of `state`, one tensor per expert each) and which entries it keeps within per-expert
    bounds (`lim`: task_arithmetic's `_Keep.limits`). Dense and empty experts get bounds that keep all or none,
    so one compiled graph serves every expert of a chunk."""

    sources: tuple[str, ...] = ()
    integer = False  # bounds in the sources' integer dtype (ranks), else float32

    def keep(self, srcs: list[torch.Tensor], lim: torch.Tensor) -> torch.Tensor | None:
        """(n,) bool: the kept entries of one expert; None: every entry (nothing is dropped)."""
        return None

    def keep_all(self, n: int) -> tuple[float, ...]:
        raise NotImplementedError

    def keep_none(self) -> tuple[float, ...]:
        raise NotImplementedError


class _Dense(Sparsifier):
    """Task arithmetic: nothing dropped."""


class _Magnitude(Sparsifier):
    """TIES / breadcrumbs: magnitude ranks in [lo, hi)."""

    sources, integer = ("rank",), True

    def keep(self, srcs, lim):
        return (srcs[0] >= lim[0]) & (srcs[0] < lim[1])

    def keep_all(self, n):
        return (0, n)

    def keep_none(self):
        return (0, 0)


class _Random(Sparsifier):
    """DARE: uniforms below the keep probability."""

    sources = ("u",)

    def keep(self, srcs, lim):
        return srcs[0] < lim[0]

    def keep_all(self, n):
        return (2.0,)  # u < 2 always

    def keep_none(self):
        return (0.0,)


class _Della(Sparsifier):
    """DELLA's MAGPRUNE: u < row rank * slope + offset, two float32 roundings as the eager kernel's mul, add_."""

    sources = ("u", "rn")

    def keep(self, srcs, lim):
        return srcs[0] < (srcs[1] * lim[0] + lim[1])

    def keep_all(self, n):
        return (0.0, 2.0)

    def keep_none(self):
        return (0.0, 0.0)


DENSE, MAGNITUDE, RANDOM, DELLA = _Dense(), _Magnitude(), _Random(), _Della()


def _masked(sp: Sparsifier, d: torch.Tensor, srcs, lim) -> torch.Tensor:
    """d (float32) with the entries `sp` drops set to 0."""
    keep = sp.keep(srcs, lim)
    return d if keep is None else d * keep.to(d.dtype)


def _merge(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, fc, rs, w, lam) -> None:
    """out = the family's merge of one chunk (flat tensors), computed in float32 and rounded to the chunk's
    dtype (`_round`) wherever the eager kernel writes a bf16/fp16 tensor, so that both elect the same signs.

    srcs: each expert's sources of `sp`, lim: (E, 2) or (E, 1) their bounds; fc: (E,) float32 each
    expert's multiplier of its kept entries (consensus: w_e, times the rescale factor; otherwise lambda w_e / W
    times it; rescaled ones already rounded to the dtype, as the eager kernel rounds them); rs: (E,) 1 for the
    rescaled experts, whose terms the eager kernel writes (rounds) before adding them; w: (E,) float32 weights
    for the consensus divisor; lam: () float32 lambda.
    """
    dt, f32 = b.dtype, torch.float32
    base = b.to(f32)
    terms = [_masked(sp, d.to(f32), srcs[e], lim[e]) * fc[e] for e, d in enumerate(ds)]
    if not consensus:  # eager: acc = b + c_e t_e, one rounding per add (a rescaled term rounded before)
        acc = base
        for e, t in enumerate(terms):
            acc = _round(acc + torch.where(rs[e] > 0, _round(t, dt), t), dt)
        out.copy_(acc)
        return
    terms = [_round(t, dt) for t in terms]  # eager: the weighted terms are written in the chunk's dtype
    vote = terms[0]
    for t in terms[1:]:
        vote = _round(vote + t, dt)
    sg = (vote >= 0).to(f32) * 2.0 - 1.0
    mixed = None
    divisor = None
    for e, t in enumerate(terms):
        a = torch.clamp_min(t * sg, 0)
        mixed = a if mixed is None else _round(mixed + a, dt)
        if normalize:
            k = (a > 0).to(f32) * w[e]
            divisor = _round(k if divisor is None else divisor + k, dt)
    mixed = mixed * sg
    if normalize:
        divisor = divisor + (divisor == 0).to(f32)
        out.copy_(base + lam * mixed / divisor)  # addcdiv's (value * t1) / t2, one rounding
    else:
        out.copy_(base + mixed * lam)


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float32) rounded to `dtype` and back: what writing it into a `dtype` tensor does (none for float32)."""
    return x if dtype == torch.float32 else x.to(dtype).to(torch.float32)


def _kept_l1(sp: Sparsifier, ds, srcs, lim) -> torch.Tensor:
    """(E,) float64: each given expert's L1 norm over the entries it keeps (ds, srcs, lim: those experts').

    (rows, cols) views, a sum per row, then of the rows. All experts in one call: on a GPU each call costs
    more host time (guards, the wrapper) than the kernel of a mid-sized tensor."""
    return torch.stack([_masked(sp, d.abs(), srcs[e], lim[e]).sum(dim=1, dtype=torch.float64).sum()
                        for e, d in enumerate(ds)])


@functools.cache
def _compiled(what: str, sp: Sparsifier, consensus: bool = False, normalize: bool = False):
    """The compiled formula `what` ("merge" | "l1") for one kind of chunk.

    Each gets a code object of its own: dynamo keeps its compiled graphs and their guards per code object
    and checks them one after another on every call, so formulas sharing one (a closure or a partial) made
    each call test every other formula's guards first (~0.2 ms a call on a CPU, a third of a DELLA candidate).
    """
    if what == "merge":
        def formula(*args):
            return _merge(sp, consensus, normalize, *args)
    else:
        def formula(*args):
            return _kept_l1(sp, *args)
    name = f"_{what}{type(sp).__name__.lower()}_{int(consensus)}{int(normalize)}"
    own = types.FunctionType(formula.__code__.replace(co_name=name, co_qualname=name), formula.__globals__, name,
                             formula.__defaults__, formula.__closure__)
    # emulate_precision_casts: inductor otherwise drops a cast to bf16 and back (`_round`) inside a fused kernel.
    return torch.compile(own, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


_GRAPHS = 128  # compiled graphs kept, all formulas together
_BROKEN: set[tuple] = set()  # (what, sparsifier, consensus, normalize, dtype, device type) whose compile failed
calls: collections.Counter = collections.Counter()  # compiled calls that ran, by (what, sparsifier name)


def _call(key: tuple, sample: torch.Tensor, *args) -> tuple[bool, object]:
    """(True, result) of the compiled function `key` on args; (False, None) where it cannot compile here.

    A compiler that fails (no C++ toolchain, an inductor bug on some dtype or device) is logged once per key and
    never retried, so a study goes on at the eager kernel's speed instead of stopping.
    """
    broken_key = (*key, sample.dtype, sample.device.type)
    if broken_key in _BROKEN:
        return False, None
    try:
        # Each expert count (and each dtype of the mask sources) is a graph of its own: a process that merges
        # several expert sets may hold more than dynamo's default of 8 graphs per code object.
        with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=_GRAPHS):
            warnings.simplefilter("ignore")  # inductor's own notices, once per graph
            result = _compiled(*key)(*args)
        calls[key[0], type(key[1]).__name__] += 1
        return True, result
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the exact eager kernel
        _BROKEN.add(broken_key)
        first = str(exc).splitlines()[0] if str(exc) else ""
        log.warning("the compiled %s formula is unavailable for %s on %s (%s: %s); using the eager kernel",
                    type(key[1]).__name__.strip("_"), sample.dtype, sample.device.type, type(exc).__name__, first)
        return False, None


def merge(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, fc, rs, w, lam) -> bool:
    """Write the merged chunk into `out` (see `_merge`); False where the compiled formula is unavailable."""
    return _call(("merge", sp, consensus, normalize), b, out, b, ds, srcs, lim, fc, rs, w, lam)[0]


def kept_l1(sp: Sparsifier, ds, srcs, lim) -> torch.Tensor | None:
    """(E,) float64 L1 norms of the given experts' kept entries (see `_kept_l1`); None where the compiled
    formula is unavailable."""
    return _call(("l1", sp), ds[0], ds, srcs, lim)[1]
