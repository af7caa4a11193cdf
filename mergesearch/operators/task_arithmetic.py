"""Generalised task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

All of mergekit's `GeneralizedTaskArithmeticMerge` methods, with its semantics:

1. each task vector d_i = expert_i - base is sparsified (per chunk, as mergekit does per tensor):
   - magnitude (ties): keep exactly the k = max(1, int(density * n)) largest |d| (density >= 1:
     keep all, density <= 0: keep none);
   - random (dare_*): keep each entry with probability `density`;
   - magnitude_outliers (breadcrumbs*): sort |d| ascending, drop the int(gamma * n) largest and
     the smallest so that exactly int(density * n) remain (fewer outliers dropped if needed);
   - della_magprune (della*): keep entry j of a row with probability
     density - epsilon + 2 * epsilon * rank_j / (ncols - 1) (rank by |d| within the row);
   and with `rescale`, the kept entries are scaled so the chunk's L1 norm is unchanged
   (mergekit's RescaleNorm.l1, skipped when either norm is below 1e-7).
   Magnitudes are ranked in one total order: by |d|, and among equal |d| the entry with the lower
   flat index (in the chunk) counts as the larger, so exactly k entries are kept even at ties
   (rare in float32 task vectors, common in bf16). mergekit ranks with torch's default sort,
   whose order among equal magnitudes is arbitrary; given a stable sort in this order it keeps
   the same entries (tests/test_vs_mergekit.py);
2. each is multiplied by its weight: wd_i = w_i * d_i;
3. with sign consensus (ties, dare_ties, breadcrumbs_ties, della), the elected sign per entry is
   sign(sum_i wd_i) (0 counts as +); only entries of that sign (nonzero) are summed, and the
   divisor is the sum of the weights of those entries (0 -> 1). Without consensus the sum is
   over all, divisor sum_i w_i (|.| < 1e-8 -> 1);
4. normalize divides by the divisor; the result is scaled by lambda and added to the base.

Speed: sparsification never sorts on the hot path. `prepare` sorts each chunk's |d| once and keeps the order in
host memory (`MagnitudeOrder`, int32 per entry and expert); a candidate looks up the entry at each rank bound
there, and the kernel compares each entry with it (|d|, then index: fused._Magnitude): exactly the k largest, ties
broken by index, from the deltas alone. Until 2026-12-07 each entry's int32 rank was kept on the merge device
instead: on a GPU a 7B TIES study with 3 experts in bf16 needed ~126 GiB of sources, now ~50, and fits 80 GB.
DARE/DELLA's uniform numbers are a hash of each entry's position in its chunk under a key per expert and chunk,
drawn from the seeded generator (operators/counter.py; float32 fields, kept iff u < p). The CPU stores them once;
the compiled formula on CUDA computes them in the kernel instead of reading them (the same numbers, bit for bit).
The same candidate and seed give the same weights on every device and path, and candidates at different
densities share the random numbers (nested masks), which takes noise out of comparisons between candidates.
DARE's rescale needs each expert's L1 norm over its kept entries: `prepare` sums |d| per 16-bit uniform value once
(`KeptL1`, host memory, <= 768 KiB per chunk and expert), and a candidate looks its norms up instead of reading the
deltas and the uniforms in a pass of their own before the merge pass (exact: integer sums, `fused.l1_scale`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from mergesearch.errors import CandidateError, OperatorError
from mergesearch.operators import counter, fused, registry
from mergesearch.operators.registry import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    Param,
    ParamRule,
    Scratch,
    exact,
    is_on,
    normalize_param,
    register,
    rescale_param,
)

GAMMA = Param("gamma", 0.0, 0.5, 0.01, "fraction of the largest-magnitude entries dropped as outliers",
              per_expert=True, search=(0.0, 0.1))
EPSILON = Param("epsilon", 0.0, 0.5, 0.15,
                "spread of DELLA's keep probability around density, by magnitude rank within a row "
                "(density +/- epsilon must stay inside (0, 1))",
                per_expert=True, search=(0.01, 0.2))


# --- DELLA's rule: density +/- epsilon inside (0, 1) ------------------------------------------------
# Stated once here and declared with the methods (`ParamRule`): the kernel (`_keep`), Plan.validate and the
# search space all apply it.

DELLA_MARGIN = 1e-3  # how far inside (0, 1) a search space keeps density +/- epsilon


def della_out_of_range(density, epsilon):
    """Where DELLA's keep probabilities density +/- epsilon leave (0, 1); floats or tensors alike.

    A density of 0 or 1 (keep none / keep all) ignores epsilon, so it never breaks the rule.
    """
    return (density > 0) & (density < 1) & ((density + epsilon >= 1) | (density - epsilon <= 0))


def della_epsilon_cap(density: torch.Tensor, epsilon: torch.Tensor, margin: float = DELLA_MARGIN) -> torch.Tensor:
    """`epsilon` lowered where needed so that density +/- epsilon stays `margin` inside (0, 1)."""
    room = torch.minimum(density, 1.0 - density) - margin
    capped = torch.minimum(epsilon, room.clamp_min(0.0))
    return torch.where((density > 0) & (density < 1), capped, epsilon)


def della_range_message(density: float, epsilon: float, where: str = "") -> str:
    """The error text for a density/epsilon pair that breaks the rule (`where`: which tensor, if known)."""
    return (f"density {density:g} +/- epsilon {epsilon:g} must stay inside (0, 1){where}; "
            "lower epsilon or move density away from 0 and 1")


DELLA_RULE = ParamRule(("density", "epsilon"), della_out_of_range, della_range_message, della_epsilon_cap)


# --- precomputation (once per chunk) ---------------------------------------------------------------


_L1_BLOCK = 1 << 24  # entries per step of `_l1`: its float32 temporaries stay 64 MiB for a chunk of any size


def _l1(deltas) -> torch.Tensor:
    """(2, E) float64: each task vector's L1 norm (row 0) in fixed point at its scale (row 1): the sums the rescale
    of DARE and DELLA compares its kept entries' against (fused.l1_scale: exact in any order, on every path)."""
    rows = []
    for d in deltas:
        scale, flat = fused.l1_scale(d), d.reshape(-1)
        total = sum(int(fused.fixed_l1(flat[lo:lo + _L1_BLOCK].abs(), scale))
                    for lo in range(0, flat.numel(), _L1_BLOCK))
        rows.append((total, scale))
    return _norms(rows, deltas)


def _norms(rows: list[tuple[float, float]], deltas) -> torch.Tensor:
    """`_l1`'s (2, E) tensor on the deltas' device from each expert's (fixed-point total, scale)."""
    if not deltas:
        return torch.zeros(2, 0, dtype=torch.float64)
    # total < 2**53: exact as a Python int or float64, one rounding to float64 in the division
    return torch.tensor([(total / scale, scale) for total, scale in rows], dtype=torch.float64,
                        device=deltas[0].device).T.contiguous()


MAX_MAGNITUDE_CHUNK = 2**31 - 1  # entries: positions are int32 in the order and in the kernel (fused._Magnitude)


def magnitude_order(d: torch.Tensor) -> torch.Tensor:
    """(n,) int32: the flat indices of d's entries in rank order: by |d| descending, equal |d| lower index first."""
    if d.numel() > MAX_MAGNITUDE_CHUNK:
        raise OperatorError(f"a chunk of {d.numel():,} entries is too large for the magnitude masks (at most "
                            f"{MAX_MAGNITUDE_CHUNK:,}): split the tensor with chunks: 2 or more")
    return torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices.to(torch.int32)


class MagnitudeOrder:
    """A chunk's rank order per expert (`magnitude_order`), in host memory: TIES's and breadcrumbs' state (see the
    module docstring). Not a tensor, so the materialiser neither moves it to the device nor lays it out in a
    group's buffers (mergesearch.groups keeps one per chunk)."""

    def __init__(self, orders: list[torch.Tensor]):
        self._orders = [o.cpu().numpy() for o in orders]  # numpy: a scalar lookup costs ~0.1 us, torch's ~2

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self._orders)

    def size(self, e: int) -> int:
        """Entries of expert e's chunk."""
        return len(self._orders[e])

    def entry(self, e: int, rank: int) -> int:
        """The flat index of expert e's entry of rank `rank`."""
        return int(self._orders[e][rank])

    def bounds(self, e: int, lo: int, hi: int, offset: int = 0) -> tuple[int, int, int, int]:
        """Expert e's rank bounds [lo, hi) as fused._Magnitude's lim: (p, g) of lo, then of hi; `offset`: the
        chunk's first entry among the deltas the kernel is given (a group's flat buffer)."""
        return (*self._bound(e, lo, offset), *self._bound(e, hi, offset))

    def _bound(self, e: int, x: int, offset: int) -> tuple[int, int]:
        if x <= 0:  # nothing ranks below 0, whatever the deltas hold (t is not read)
            return -1, offset
        if x >= self.size(e):  # everything: kept whatever the deltas hold (t is not read)
            return fused.EVERY, offset
        p = self.entry(e, x - 1)
        return p, offset + p


def _below(order: MagnitudeOrder, e: int, x: int, d: torch.Tensor, lo: int, a: torch.Tensor, out: torch.Tensor
           ) -> None:
    """out (1/0) = which of the entries lo, lo + 1, ... of the chunk (|d|: a) rank below x, from expert e's order:
    |d| >= t up to the entry p of rank x - 1, |d| > t after it (t = |d_p|, read on the device: no sync)."""
    if x <= 0 or x >= order.size(e):  # none or every entry, whatever the deltas hold
        out.fill_(0 if x <= 0 else 1)
        return
    p = order.entry(e, x - 1)
    t = d[p].abs()
    q = min(max(p + 1 - lo, 0), a.numel())
    torch.ge(a[:q], t, out=out[:q])
    torch.gt(a[q:], t, out=out[q:])


def _prepare_magnitude(base, deltas, gen) -> dict:
    """"order" (`MagnitudeOrder`, in host memory: sorted on the device, then copied); "l1" as DARE's (for
    `rescale`)."""
    return {"order": MagnitudeOrder([magnitude_order(d) for d in deltas]), "l1": _l1(deltas)}


def _keys(deltas, gen: torch.Generator) -> list[int]:
    """Each expert's key for this chunk's uniforms (operators/counter.py), drawn from the seeded generator."""
    return [counter.draw_key(gen) for _ in deltas]


def _hashed(deltas) -> bool:
    """Whether the device computes the uniforms instead of storing them (registry.HASHED_DEVICES: CUDA): the
    compiled formula hashes them in the kernel, the eager kernel per block (`_hash`)."""
    return (deltas[0].device.type if deltas else "cpu") in registry.HASHED_DEVICES


def _key_tensor(keys: list[int], deltas) -> torch.Tensor:
    return torch.tensor(keys, dtype=torch.int64, device=deltas[0].device if deltas else "cpu")


TABLE_BYTES = 12  # KeptL1: bytes per 16-bit value present, per chunk and expert (a uint32 key, a float64 sum)


class KeptL1:
    """DARE's kept L1 norms by lookup, in host memory: per expert of a chunk (a segment; a group's chunk c, expert e:
    segment c * E + e, `join`), the fixed-point sums (fused.fixed_l1) of |d| over the entries whose uniform's 16 bits
    (counter.bits) are below each value. An entry is kept iff u < p (p float32 on every path), i.e. iff its 16 bits
    are below ceil(p * 2**16), so a candidate's kept norms are one lookup, where they were a pass over the deltas
    and the uniforms before the merge pass read both again (bench_merge, 134M Llama, float32, vs task arithmetic:
    dare_linear 2.76x -> 1.68x, dare_ties 2.96x -> 1.74x). Exact: the sums are integers below 2**53
    (`fused.l1_scale`), the same in any order, so they are the numbers that pass summed, bit for bit
    (tests/test_kept.py). 12 bytes per 16-bit value present, per chunk and expert: at most 768 KiB however large
    the chunk (`TABLE_BYTES`)."""

    def __init__(self, keys: np.ndarray, sums: np.ndarray, starts: np.ndarray, scales: np.ndarray):
        # (values,): segment * 2**16 + a 16-bit value present there, ascending; uint32 below 2**16 segments
        self.keys = keys.astype(np.uint32 if len(starts) < 1 << 16 else np.int64)
        self.sums = sums  # (values + 1,) float64: 0, then each segment's running fixed-point sum, value by value
        self.starts = starts  # (segments,) int64: each segment's first value in `keys`
        self.scales = scales  # (segments,) float64: each segment's fixed-point scale (fused.l1_scale)
        self.first = 0  # the segment number of segment 0 in `keys` (a chunk's table within its group's: `join`)

    @classmethod
    def of(cls, tables: list[tuple[np.ndarray, np.ndarray, float]]) -> "KeptL1":
        """One chunk's: per expert (values present ascending, their fixed-point sums, the scale) (`_kept_table`)."""
        keys = [np.zeros(0, dtype=np.int64)] + [v.astype(np.int64) + (s << 16) for s, (v, _, _) in enumerate(tables)]
        # each segment's own running sums (integers below 2**53: fused.l1_scale bounds a chunk's total by 2**52)
        sums = [np.zeros(1)] + [np.cumsum(f) for _, f, _ in tables]
        starts = np.cumsum([0] + [len(v) for v, _, _ in tables], dtype=np.int64)[:-1]
        scales = np.array([scale for _, _, scale in tables], dtype=np.float64)
        return cls(np.concatenate(keys), np.concatenate(sums), starts, scales)

    @classmethod
    def join(cls, tables: list["KeptL1"]) -> "KeptL1":
        """A group's (mergesearch.groups: one per chunk, in layout order): segment c * E + e."""
        keys, starts, at, segments = [], [], 0, 0
        for t in tables:
            keys.append(t.keys.astype(np.int64) + ((segments - t.first) << 16))
            starts.append(t.starts + at)
            at, segments = at + len(t.keys), segments + len(t.starts)
        sums = [np.zeros(1)] + [t.sums[1:] for t in tables]
        group = cls(np.concatenate(keys), np.concatenate(sums), np.concatenate(starts),
                    np.concatenate([t.scales for t in tables]))
        # Each chunk's table becomes a view of the group's (one copy in memory; a chunk merged on its own, as
        # streaming does, still looks up its own): keys from its segment's number on, sums from the entry before
        # its first (never read: `lookup` masks it).
        segment, at = 0, 0
        for t in tables:
            n = len(t.keys)
            t.keys, t.sums, t.first = group.keys[at:at + n], group.sums[at:at + n + 1], segment
            segment, at = segment + len(t.starts), at + n
        return group

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.sums.nbytes + self.starts.nbytes + self.scales.nbytes

    def lookup(self, counts) -> np.ndarray:
        """(segments,) float64: each segment's L1 norm over its entries whose 16 bits are below counts[s] (0 ..
        2**16), in fixed point divided by its scale, as fused._kept_l1 returns it."""
        counts = np.asarray(counts, dtype=np.int64)
        queries = ((self.first + np.arange(len(counts), dtype=np.int64)) << 16) + counts  # uint32 keys: < 2**32
        at = np.searchsorted(self.keys, queries.astype(self.keys.dtype))  # the keys' dtype: no copy of them
        return np.where(at > self.starts, self.sums[at], 0.0) / self.scales


def _kept_table(d: torch.Tensor, key: int, scale: float, field: torch.Tensor | None = None,
                wide: bool | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """One expert's (16-bit values present ascending, the fixed-point sum of |d| over the entries of each, `scale`)
    (`KeptL1`), summed on d's device in blocks of _L1_BLOCK entries (bounded temporaries). The 16 bits are read
    from the stored uniforms `field` where there is one (hashing them again took ~4x the rest on a CPU), else
    hashed in int64, or where `wide` is False (default: on CUDA, whose int64 multiplies are emulated) in wrapping
    int32: the same numbers (operators/counter.py)."""
    flat, dev = d.reshape(-1), d.device
    wide = dev.type != "cuda" if wide is None else wide
    sums = torch.zeros(1 << 16, dtype=torch.float64, device=dev)
    counts = torch.zeros(1 << 16, dtype=torch.int64, device=dev)
    for lo in range(0, flat.numel(), _L1_BLOCK):
        hi = min(flat.numel(), lo + _L1_BLOCK)
        if field is None:
            index = torch.arange(lo, hi, device=dev, dtype=torch.int64 if wide else torch.int32)
            bits = counter.bits(index, key, wide)
        else:  # u = bits * 2**-16 exactly
            bits = (field[lo:hi] * 2.0 ** 16).to(torch.int64)
        # index_add_ (not bincount with weights: deterministic on CUDA too); integer sums, exact in any order
        sums.index_add_(0, bits, fused.fixed_entries(flat[lo:hi].abs(), scale).to(torch.float64))
        counts += torch.bincount(bits, minlength=1 << 16)
    values = np.flatnonzero((counts > 0).cpu().numpy())
    return values, sums.cpu().numpy()[values], scale


def _prepare_random(base, deltas, gen) -> dict:
    """"key" (E,) int64 each expert's key, "kept" their kept L1 norms by lookup (`KeptL1`, host memory), and
    (unless the device hashes them) "u" the (n,) float32 uniforms they hash to (entry kept iff u < p, i.e. with
    probability p)."""
    keys = _keys(deltas, gen)
    state = {"key": _key_tensor(keys, deltas)}
    fields = [None] * len(deltas)
    if not _hashed(deltas):
        fields = state["u"] = [counter.field(d.numel(), k, d.device) for d, k in zip(deltas, keys)]
    tables = [_kept_table(d, k, fused.l1_scale(d), u) for d, k, u in zip(deltas, keys, fields)]
    state["kept"] = KeptL1.of(tables)
    # each table sums every entry's fixed-point |d| once: its total is `_l1`'s, without another pass over the deltas
    state["l1"] = _norms([(float(sums.sum()), scale) for _, sums, scale in tables], deltas)
    return state


def _rows(d: torch.Tensor) -> torch.Tensor:
    # mergekit ranks along dim 1 and treats a 1-d tensor as one row.
    return d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], -1)


def _prepare_della(base, deltas, gen) -> dict:
    """"key" as DARE's, and each entry's row rank r / (ncols - 1) with its uniform: "ur" (n,) int32 both packed
    (fused.pack), or where the device hashes the uniforms, "rn" (n,) int16 the ranks alone."""
    keys, hashed = _keys(deltas, gen), _hashed(deltas)
    fields = []
    for d, key in zip(deltas, keys):
        mags = _rows(d).abs().float()
        order = torch.argsort(mags, dim=1, stable=True)  # ties by index: the same ranks on every device
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(mags.shape[1], device=d.device).expand_as(order))
        # (rank - 1) / (ncols - 1) with 1-based ranks
        steps = fused.rank_steps(ranks, mags.shape[1]).reshape(-1)
        del order, ranks
        if hashed:
            fields.append(fused.rank_codes(steps))
        else:
            fields.append(fused.pack(counter.bits(torch.arange(d.numel(), device=d.device), key), steps))
    return {"key": _key_tensor(keys, deltas), "rn" if hashed else "ur": fields, "l1": _l1(deltas)}


# --- the family's rules at one chunk and candidate (written once: the kernel and the linear parts read them) --


class _Keep:
    """How one expert's task vector is sparsified in a chunk: which entries survive (a 0/1 mask)."""

    dense = False  # every entry kept: no mask
    empty = False  # no entry kept: the expert contributes nothing

    def mask(self, e: int, d: torch.Tensor, lo: int, hi: int, state: dict, scratch: Scratch, m: torch.Tensor) -> None:
        """Write expert e's 0/1 keep mask for flat entries [lo, hi) of the chunk (d: its whole flat delta) into m."""
        raise NotImplementedError

    def limits(self, sp: fused.Sparsifier, n: int) -> tuple[float, ...]:
        """This rule as the bounds of the compiled formula's sparsifier `sp` (operators/fused.py) in an n-entry
        chunk."""
        raise NotImplementedError


class _All(_Keep):
    dense = True

    def limits(self, sp, n):
        return sp.keep_all(n)


class _Nothing(_Keep):
    empty = True

    def limits(self, sp, n):
        return sp.keep_none()


class _Top(_Keep):
    """The `k` largest magnitudes: rank < k."""

    def __init__(self, k: int):
        self.k = k

    def mask(self, e, d, lo, hi, state, scratch, m) -> None:
        _below(state["order"], e, self.k, d, lo, torch.abs(d[lo:hi], out=scratch.get("abs", m)), m)

    def limits(self, sp, n):
        return (0, self.k)


class _Band(_Keep):
    """Magnitude ranks in [lo_rank, hi_rank): breadcrumbs without its largest outliers."""

    def __init__(self, lo_rank: int, hi_rank: int):
        self.lo_rank, self.hi_rank = lo_rank, hi_rank

    def mask(self, e, d, lo, hi, state, scratch, m) -> None:
        m2 = scratch.get("mask2", m)
        a = torch.abs(d[lo:hi], out=scratch.get("abs", m))
        _below(state["order"], e, self.hi_rank, d, lo, a, m)
        _below(state["order"], e, self.lo_rank, d, lo, a, m2)
        m.sub_(m2)  # the entries below lo are below hi too

    def limits(self, sp, n):
        return (self.lo_rank, self.hi_rank)


class _Random(_Keep):
    """Each entry with probability `p`: its uniform number below p."""

    def __init__(self, p: float):
        self.p = p

    def mask(self, e, d, lo, hi, state, scratch, m) -> None:
        u = state["u"][e][lo:hi] if "u" in state else _hash(state, e, lo, hi)
        torch.lt(u, self.p, out=m)

    def limits(self, sp, n):
        return (self.p,)

    def below(self) -> int:
        """How many 16-bit uniforms (counter.bits) are kept: u < p, with p float32 as every path compares it."""
        return min(1 << 16, max(0, math.ceil(float(np.float32(self.p)) * 2.0 ** 16)))


class _Della(_Keep):
    """DELLA's MAGPRUNE: keep probability offset + slope * (row rank / (ncols - 1)), compared as the compiled
    formula compares it: in integer units (fused.DELLA_UNITS), the same masks."""

    def __init__(self, slope: float, offset: float):
        self.slope, self.offset = slope * fused.DELLA_UNITS[0], offset * fused.DELLA_UNITS[1]

    def mask(self, e, d, lo, hi, state, scratch, m) -> None:
        q = scratch.get("q", m, torch.float32)
        if "ur" in state:
            ur, tmp = state["ur"][e][lo:hi], scratch.get("i", m, torch.int32)
            fused.packed_ranks(ur, out=q, tmp=tmp)
            u = fused.packed_uniforms(ur, out=scratch.get("u", m, torch.float32), tmp=tmp)
        else:
            fused.row_ranks(state["rn"][e][lo:hi], out=q)
            u = _hash(state, e, lo, hi, units=True)
        q.mul_(self.slope).add_(self.offset)
        torch.lt(u, q, out=m)

    def limits(self, sp, n):
        return (self.slope, self.offset)


def _hash(state: dict, e: int, lo: int, hi: int, units: bool = False) -> torch.Tensor:
    """Expert e's uniforms of entries [lo, hi) of a chunk on a device that computes them (`_hashed`): the hash of
    their positions under its key. `units`: in units of 2**-16 (DELLA's comparison, fused.DELLA_UNITS)."""
    key = state["key"][e]
    index = torch.arange(lo, hi, device=key.device)
    return counter.bits(index, key).to(torch.float32) if units else counter.uniform(index, key)


def _keep(kind: str, e: int, n: int, p: dict) -> _Keep:
    """How expert e of an n-entry chunk is sparsified at parameters p."""
    if kind == "none":
        return _All()
    density = p["density"][e]
    if density >= 1.0:
        return _All()
    if n == 0 or density <= 0.0:
        return _Nothing()
    if kind == "magnitude":
        return _Top(max(1, int(exact(density) * n)))
    if kind == "outliers":
        target = int(exact(density) * n)
        if target <= 0:
            return _Nothing()
        n_top = int(exact(p["gamma"][e]) * n)
        n_bot = max(0, n - target - n_top)
        # Ascending position n - 1 - rank in [n_bot, n_bot + target)  <=>  rank in [n - n_bot - target, n - n_bot);
        # the lower end is 0 when no outlier is dropped (gamma 0, or density 1).
        lo, hi = n - n_bot - target, n - n_bot
        return _Top(hi) if lo == 0 else _Band(lo, hi)
    if kind == "random":
        return _Random(density)
    if kind == "della":
        eps = p["epsilon"][e]
        if della_out_of_range(density, eps):
            raise CandidateError(f"della: {della_range_message(density, eps)}")
        return _Della(2.0 * eps, density - eps)
    raise ValueError(f"unknown sparsification {kind!r}")


def linear_divisor(weights, normalize: bool) -> float:
    """What a method without sign consensus divides its weighted sum by: the sum of every expert's weight (as
    mergekit's weights.sum()) with `normalize`, unless that is ~0; else 1."""
    total = sum(weights)
    return total if (normalize and abs(total) >= 1e-8) else 1.0


class _Rules:
    """The family's rules for one chunk at one candidate: sparsification, coefficients, divisor, rescale.

    Without consensus the merge is base + sum_e coef_e * factor_e * keep_e(d_e), coef_e = lambda w_e / W
    (W = sum of the weights with `normalize`, else 1). With consensus each weighted term
    wd_e = w_e * factor_e * keep_e(d_e) votes for the sign, and base + lambda * (sum of the agreeing
    wd_e) / (sum of their weights) is written. factor_e is the L1 rescale (1 without `rescale`).
    """

    def __init__(self, kind: str, consensus: bool, n: int, p: dict):
        self.consensus = consensus
        self.weight = p["weight"]
        self.lam = p["lambda"]
        self.normalize = is_on(p["normalize"])
        self.rescale = is_on(p.get("rescale", 0.0))
        # A zero weight contributes nothing, not even to a consensus divisor (mergekit: mask * 0).
        self.keep = [_Nothing() if w == 0.0 else _keep(kind, e, n, p) for e, w in enumerate(self.weight)]
        self.live = [e for e, k in enumerate(self.keep) if not k.empty]
        if consensus:
            self.coef = {e: self.weight[e] for e in self.live}
        else:
            self.coef = {e: self.lam * self.weight[e] / linear_divisor(self.weight, self.normalize) for e in self.live}

    @property
    def plain(self) -> bool:
        """Task arithmetic at this chunk: no mask, no consensus."""
        return not self.consensus and all(self.keep[e].dense for e in self.live)

    @property
    def rescaled(self) -> list[int]:
        """The experts whose kept entries are rescaled to the chunk's L1 norm (sparsified, with `rescale`)."""
        return [e for e in self.live if not self.keep[e].dense] if self.rescale else []

    def factor_vector(self, kept_l1: torch.Tensor, state) -> torch.Tensor:
        """(E,) float32: each rescaled expert's factor that brings its kept entries back to the chunk's L1 norm
        (mergekit's RescaleNorm.l1: 1 where either norm is below 1e-7).

        `kept_l1`: (E,) float64 L1 norms of the kept entries, 0 for the experts that are not rescaled (so
        their factor is 1). They are summed in fixed point on every path (blocks, whole chunk, compiled, any
        device: fused.l1_scale), so every path gets the same factor bit for bit, which keeps the elected signs of
        near-zero votes the same. Computed on the device: no sync."""
        return fused.rescale_factor(state["l1"][0], kept_l1)

    def kept_l1(self, state, device: torch.device) -> torch.Tensor | None:
        """(E,) float64 on `device`: the rescaled experts' kept L1 norms (0 for the others) looked up in
        state["kept"] (DARE: `KeptL1`); None where there is none (DELLA: summed in a pass over the chunk)."""
        table = state.get("kept")
        if table is None:
            return None
        return _on_device(table.lookup(self.below(self.rescaled)), torch.float64, device)

    def below(self, experts) -> list[int]:
        """Per expert of the chunk, how many 16-bit uniforms it keeps (`_Random.below`); 0 outside `experts`."""
        return [self.keep[e].below() if e in experts else 0 for e in range(len(self.keep))]

    def rescale_factors(self, ds, state, scratch: Scratch, block: int) -> dict[int, torch.Tensor]:
        """Per rescaled expert its 0-d factor (`factor_vector`), the kept L1 looked up (`kept_l1`) or summed block
        by block."""
        sparse = self.rescaled
        if not sparse:
            return {}
        kept = self.kept_l1(state, ds[0].device)
        if kept is not None:
            f = self.factor_vector(kept, state)
            return {e: f[e] for e in sparse}
        n = ds[0].numel()
        acc = torch.zeros(len(self.keep), dtype=torch.float64, device=ds[0].device)  # integers: fixed_l1
        scale = state["l1"][1].float()
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            for e in sparse:
                d = ds[e][lo:hi]
                m = scratch.get("m", d)
                self.keep[e].mask(e, ds[e], lo, hi, state, scratch, m)
                a = scratch.get("abs", d)
                torch.abs(d, out=a)
                acc[e] += fused.fixed_l1(a.mul_(m), scale[e])
        f = self.factor_vector(acc / state["l1"][1], state)
        return {e: f[e] for e in sparse}

    def terms(self, ds, lo: int, hi: int, state, scratch: Scratch, factors: dict, unit: bool = False):
        """This block's contribution of each live expert, as (tensor, python coefficient) pairs.

        Consensus: the weighted terms wd_e (coefficient 1.0). Otherwise the kept (rescaled) d_e and
        coef_e. `unit`: at unit weight, keep_e(d_e) * factor_e (the linear parts): fresh tensors, or the
        read-only sources themselves where nothing is dropped.
        """
        out = []
        for i, e in enumerate(self.live):
            d = ds[e][lo:hi]
            c = 1.0 if unit else self.coef[e]
            if self.keep[e].dense:
                if self.consensus and not unit:
                    wd = scratch.get(f"W{i}", d)
                    torch.mul(d, c, out=wd)
                    out.append((wd, 1.0))
                else:  # the source itself (read-only): no copy
                    out.append((d, c))
                continue
            wd = torch.empty_like(d) if unit else scratch.get(f"W{i}", d)
            m = scratch.get("m", d)
            self.keep[e].mask(e, ds[e], lo, hi, state, scratch, m)
            torch.mul(d, m, out=wd)
            if e in factors:
                wd.mul_((factors[e] * c).to(wd.dtype))
                out.append((wd, 1.0))
            elif self.consensus and not unit:
                wd.mul_(c)
                out.append((wd, 1.0))
            else:
                out.append((wd, c))
        return out


def _elect_sign(weighted: list[torch.Tensor], sg: torch.Tensor) -> torch.Tensor:
    """sg = +1 where the sum of the weighted terms is >= 0, else -1 (the elected sign, written into sg)."""
    if len(weighted) == 1:
        torch.ge(weighted[0], 0, out=sg)
    else:
        torch.add(weighted[0], weighted[1], out=sg)
        for t in weighted[2:]:
            sg.add_(t)
        torch.ge(sg, 0, out=sg)
    return sg.mul_(2.0).sub_(1.0)


def _zero_to_one(divisor: torch.Tensor, scratch_like: torch.Tensor) -> None:
    # mergekit: divisor[divisor == 0] = 1 (no agreeing expert: the sum is 0 anyway)
    torch.eq(divisor, 0, out=scratch_like)
    divisor.add_(scratch_like)


def _merge_block(rules: _Rules, ob, bb, ds, lo, hi, state, scratch: Scratch, factors: dict) -> None:
    """Write base + the family's merge of entries [lo, hi) into ob."""
    terms = rules.terms(ds, lo, hi, state, scratch, factors)
    if not rules.consensus:
        t0, c0 = terms[0]
        torch.add(bb, t0, alpha=c0, out=ob)
        for t, c in terms[1:]:
            ob.add_(t, alpha=c)
        return
    weighted = [t for t, _ in terms]
    sg = _elect_sign(weighted, scratch.get("sg", bb))
    # Kept entries agree with sg: mixed = sg * sum_e relu(sg * wd_e), divisor = sum_e w_e [sg * wd_e > 0].
    mixed = scratch.get("mixed", bb)
    kept = scratch.get("kept", bb)
    divisor = scratch.get("divisor", bb)
    for i, t in enumerate(weighted):
        t.mul_(sg).clamp_(min=0)
        if i == 0:
            mixed.copy_(t)
        else:
            mixed.add_(t)
        if rules.normalize:
            torch.gt(t, 0, out=kept)
            if i == 0:
                torch.mul(kept, rules.weight[rules.live[i]], out=divisor)
            else:
                divisor.add_(kept, alpha=rules.weight[rules.live[i]])
    mixed.mul_(sg)
    if rules.normalize:
        _zero_to_one(divisor, kept)
        torch.addcdiv(bb, mixed, divisor, value=rules.lam, out=ob)
    else:
        torch.add(bb, mixed, alpha=rules.lam, out=ob)


# The compiled formula's sparsifier of each kind ("none": the plain task arithmetic of any kind's chunk).
_SPARSIFIERS = {"none": fused.DENSE, "magnitude": fused.TOP, "outliers": fused.MAGNITUDE,
                "random": fused.RANDOM, "della": fused.DELLA}


_HASHED = {fused.RANDOM: fused.HASHED_RANDOM, fused.DELLA: fused.HASHED_DELLA}


def _sparsifier(kind: str, scratch: Scratch) -> fused.Sparsifier:
    """The compiled formula's sparsifier of `kind` on this device: where `scratch.hashed` (CUDA), DARE's and DELLA's
    uniforms are computed in the kernel from their keys instead of read (operators/counter.py): 4 (DELLA: 2) bytes
    per entry and expert less to read, the same masks."""
    sp = _SPARSIFIERS[kind]
    return _HASHED.get(sp, sp) if scratch.hashed else sp


_ZERO: dict[torch.device, torch.Tensor] = {}


def _zero(device: torch.device) -> torch.Tensor:
    """A 0-d int64 zero on `device`, made once: a chunk's first entry for a hashed sparsifier."""
    zero = _ZERO.get(device)
    if zero is None:
        zero = _ZERO[device] = torch.zeros((), dtype=torch.int64, device=device)
    return zero


def _chunk_sources(sp: fused.Sparsifier, state: dict, e: int, device: torch.device) -> list[torch.Tensor]:
    """Expert e's sources of `sp` in a chunk's state: hashed, its key and the chunk's first entry (0) first."""
    sources = [state[key][e] for key in sp.sources]
    if sp.hashed:
        return [state["key"][e], _zero(device), *sources]
    return [_zero(device), *sources] if sp.positional else sources


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of Python values on `device`, made on the host and copied non_blocking. A blocking copy
    from pageable memory synchronises the stream (torch's copy_ waits for it), which would make the host wait
    for every kernel queued before it, several times per chunk. The driver stages a non-blocking pageable copy
    before it returns, so the host tensor may go; CUDA allows it to wait for the stream first, which small
    copies usually don't (not yet measured here: no GPU)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _numbers(rules: _Rules, sp: fused.Sparsifier, n: int, n_exp: int, order: MagnitudeOrder | None = None,
             at: int = 0) -> tuple[list, list[float]]:
    """A chunk's rules as the compiled formula's inputs: each expert's bounds of `sp` (E, k), and the (3E + 1,)
    numbers: coefficients, rescaled flags, weights, lambda (fused._merge). fused.MAGNITUDE's rank bounds are given
    as entries found in the chunk's `order`, at its first entry `at` among the deltas the formula is given."""
    lim = [rules.keep[e].limits(sp, n) if sp is not fused.DENSE else (0.0,) for e in range(n_exp)]
    if sp.positional:
        lim = [order.bounds(e, *bounds, at) for e, bounds in enumerate(lim)]
    numbers = ([rules.coef.get(e, 0.0) for e in range(n_exp)] + [float(e in rules.rescaled) for e in range(n_exp)]
               + list(rules.weight) + [rules.lam])
    return lim, numbers


def _lim_dtype(sp: fused.Sparsifier) -> torch.dtype:
    return torch.int64 if sp.integer else torch.float32  # rank bounds are entries' positions


def _merge_compiled(kind: str, rules: _Rules, o, b, ds, state, scratch: Scratch) -> torch.Tensor | None:
    """Write the merged chunk into o with the compiled formula (operators/fused.py): the same rules, one pass
    over the sources (DELLA with `rescale`: a first pass for the kept L1 norms, which DARE looks up). Returns the
    float32 sum of what it wrote; None where it cannot compile here: the eager kernel's turn."""
    n, dev, n_exp = b.numel(), b.device, len(ds)
    sp = _sparsifier(kind, scratch)
    srcs = [_chunk_sources(sp, state, e, dev) for e in range(n_exp)]
    lim, numbers = _numbers(rules, sp, n, n_exp, state.get("order"))
    lim = _on_device(lim, _lim_dtype(sp), dev)  # (E, k)
    if sp.positional:  # the magnitude bounds' thresholds, gathered on the device
        srcs = [[*s, fused.magnitude_thresholds(ds[e], lim[e])] for e, s in enumerate(srcs)]
    numbers = _on_device(numbers, torch.float32, dev)  # the candidate's numbers in one copy
    if rules.rescaled:  # the kept L1 norms (DARE: looked up, row 2), the coefficients and the merge in one call
        kept = rules.kept_l1(state, dev)
        l1 = state["l1"] if kept is None else torch.cat([state["l1"], kept[None]])
        return fused.merge_rescaled(sp, rules.consensus, rules.normalize, o, b, ds, srcs, lim, l1, numbers)
    return fused.merge(sp, rules.consensus, rules.normalize, o, b, ds, srcs, lim, numbers)


def _make_kernel(kind: str, consensus: bool):
    def kernel(out, base, deltas, p, state, scratch) -> torch.Tensor | None:
        o, b = out.reshape(-1), base.reshape(-1)
        ds = [d.reshape(-1) for d in deltas]
        n = b.numel()
        rules = _Rules(kind, consensus, n, p)
        if not rules.live:
            o.copy_(b)
            return None
        if scratch.compiled(b, rules.plain):
            written = _merge_compiled("none" if rules.plain else kind, rules, o, b, ds, state, scratch)
            if written is not None:
                return written  # the sum of the merged chunk, for the materialiser's NaN check
        if rules.plain:  # task arithmetic: whole-chunk streaming adds on every device
            _merge_block(rules, o, b, ds, 0, n, state, scratch, {})
            return None
        block = scratch.block or max(n, 1)
        factors = rules.rescale_factors(ds, state, scratch, block)
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            _merge_block(rules, o[lo:hi], b[lo:hi], ds, lo, hi, state, scratch, factors)
        return None

    return kernel


def _make_group_kernel(kind: str, consensus: bool):
    def group(out, base, deltas, state, sizes, params, scratch) -> torch.Tensor | None:
        """Merge the group's chunks (see operators' `group` contract) with the compiled formula in one call; the
        same rules chunk by chunk as the kernel, so the same weights. None where the formula does not serve these
        chunks here."""
        n_exp, dev = len(deltas), base.device
        if len(sizes) < 2:  # one chunk: its own formula (a group of one tripped inductor's scatter of one row)
            return None
        # The host time of a candidate is this loop: chunks of one size at the same parameters (every layer's
        # q_proj in a global search) share their rules.
        memo: dict[tuple, _Rules] = {}
        rules = [memo.get(key) or memo.setdefault(key, _Rules(kind, consensus, n, p))
                 for n, p in zip(sizes, params) for key in [(n, *p.values())]]
        plain = all(r.plain or not r.live for r in rules)
        # Plain task arithmetic too: on the CPU in one call it took 0.69x the eager kernel's time (134M Llama, 3
        # experts, float32, 2 threads; 0.79x the compiled chunks'). Not in bf16 on an AVX2 CPU (Scratch.compiled).
        if not scratch.compiled(base, plain) or (consensus and len({r.normalize for r in rules}) > 1):
            return None
        sp = fused.DENSE if plain else _sparsifier(kind, scratch)
        # a hashed sparsifier's keys (chunks,) and each block's first entry in its chunk, then per-entry sources
        srcs = [([state["key"][:, e], state["at"]] if sp.hashed else [state["at"]] if sp.positional else [])
                + [state[key][e] for key in sp.sources] for e in range(n_exp)]
        if sp.positional:  # bounds found in each chunk's own order, at its first entry in the buffers
            parts = [_numbers(r, sp, n, n_exp, order, at) for r, n, order, at
                     in zip(rules, sizes, state["order"], itertools.accumulate(sizes, initial=0))]
        else:
            numbers = {id(r): _numbers(r, sp, key[0], n_exp) for key, r in memo.items()}
            parts = [numbers[id(r)] for r in rules]
        lim = _on_device([[lim[e] for lim, _ in parts] for e in range(n_exp)], _lim_dtype(sp), dev)  # (E, C, k)
        if sp.positional:  # the magnitude bounds' thresholds (C, 2), gathered on the device
            srcs = [[*s, fused.magnitude_thresholds(deltas[e], lim[e])] for e, s in enumerate(srcs)]
        table = _on_device([numbers for _, numbers in parts], torch.float32, dev)  # (C, 3E + 1)
        normalize = rules[0].normalize
        if not any(r.rescaled for r in rules):
            return fused.merge_group(sp, consensus, normalize, out, base, deltas, srcs, lim, table, state["cob"])
        l1 = state["l1"]
        if "kept" in state:  # DARE: each chunk's kept L1 norms looked up, (chunks, 1, E) as l1's row 2
            counts = [c for r in rules for c in r.below(r.rescaled)]
            kept = _on_device(state["kept"].lookup(counts).reshape(len(rules), 1, n_exp), torch.float64, dev)
            l1 = torch.cat([l1, kept], dim=1)
        return fused.merge_group_rescaled(sp, consensus, normalize, out, base, deltas, srcs, lim, l1, table,
                                          state["cob"])

    return group


def _make_linear_parts(kind: str, consensus: bool):
    """Per-expert parts of a candidate: merged = base + sum_e w_e * part_e (see Operator.linear_parts).

    The same rules as the kernel (`_Rules`), over the whole chunk. Masks and L1 rescaling do not
    depend on the weights, so without sign consensus the merge is linear in the weights and the parts
    are exact everywhere. With consensus the elected sign and the divisor do: the parts freeze both
    at this candidate (exact here, a linearisation around it); an expert counts where its weighted
    term agrees with the elected sign, as in the kernel (an expert at weight 0: where its kept
    entries do, the direction a positive weight would take).
    """

    def parts(base, deltas, p, state) -> list[torch.Tensor]:
        ds = [d.reshape(-1) for d in deltas]
        n = ds[0].numel() if ds else 0
        # All experts, the zero-weight ones too: a part says where a weight would move the merge.
        unit_p = dict(p, weight=tuple(1.0 if w == 0.0 else w for w in p["weight"]))
        rules = _Rules(kind, consensus, n, unit_p)
        scratch = Scratch()
        factors = rules.rescale_factors(ds, state, scratch, max(n, 1))
        kept = {e: t for e, (t, _) in zip(rules.live, rules.terms(ds, 0, n, state, scratch, factors, unit=True))}
        zero = torch.zeros_like(ds[0]) if ds else None
        w = p["weight"]
        if not consensus:
            factor = rules.lam / linear_divisor(w, rules.normalize)
            out = [(kept[e] if factor == 1.0 else kept[e] * factor) if e in kept else zero for e in range(len(ds))]
        else:
            direction = [1.0 if we >= 0 else -1.0 for we in w]
            weighted = [kept[e] * w[e] for e in rules.live if w[e] != 0.0]
            sg = _elect_sign(weighted, torch.empty_like(ds[0])) if weighted else torch.ones_like(ds[0])
            agree = {e: ((kept[e] * sg * direction[e]) > 0).to(kept[e].dtype) for e in kept}
            scale = torch.full_like(ds[0], rules.lam)
            if rules.normalize:
                divisor = torch.zeros_like(ds[0])
                for e, a in agree.items():
                    if w[e] != 0.0:
                        divisor.add_(a, alpha=w[e])
                _zero_to_one(divisor, torch.empty_like(divisor))
                scale.div_(divisor)
            out = [kept[e] * agree[e] * scale if e in kept else zero for e in range(len(ds))]
        return [x.reshape(d.shape) for x, d in zip(out, deltas)]

    return parts


# The eager kernel's Scratch blocks, (fixed, per expert), by sparsifier kind and sign consensus, in the setting
# that takes the most (sparsified and rescaled): each expert's weighted delta; the mask, its sources and the
# rescale's magnitudes (not DARE's: its kept norms are looked up, `KeptL1`); with consensus the elected sign, the
# mixed sum, the kept count and the divisor.
# tests/test_operators.py checks them against the kernel's allocations.
_SCRATCH_BLOCKS = {("none", False): (0, 0), ("random", False): (1, 1), ("outliers", False): (3, 1),
                   ("della", False): (5, 1), ("magnitude", True): (6, 1), ("random", True): (5, 1),
                   ("outliers", True): (7, 1), ("della", True): (9, 1)}


def _register(name: str, kind: str, consensus: bool, normalize: bool, rescale: bool, doc: str, ref: str) -> None:
    params = [WEIGHT]
    if kind != "none":
        params.append(DENSITY)
    if kind == "outliers":
        params.append(GAMMA)
    if kind == "della":
        params.append(EPSILON)
    if kind != "none":
        params.append(rescale_param(rescale))
    params += [normalize_param(normalize), LAMBDA]
    prepare = {"none": None, "magnitude": _prepare_magnitude, "outliers": _prepare_magnitude,
               "random": _prepare_random, "della": _prepare_della}[kind]
    ignored = {"int8_mask"} | ({"rescale"} if kind == "none" else set())
    register(name, params=params, doc=doc, prepare=prepare, reference=ref, ignored_mergekit_keys=ignored,
             linear_parts=_make_linear_parts(kind, consensus), parts_are_deltas=kind == "none" and not consensus,
             rules=(DELLA_RULE,) if kind == "della" else (),
             # the int32 rank order (in host memory: on CUDA not the device's); float32 uniforms; della: 16-bit uniform
             # and row rank in one int32 (CUDA: the rank alone)
             state_bytes={"none": 0, "magnitude": 4, "outliers": 4, "random": 4, "della": 4}[kind],
             hashed_bytes={"magnitude": 4, "outliers": 4, "random": 4, "della": 2}.get(kind, 0),
             host_bytes={"magnitude": 4, "outliers": 4}.get(kind, 0),
             table_bytes=TABLE_BYTES if kind == "random" else 0,  # DARE's kept-L1 lookup (KeptL1)
             host_state_doc={"magnitude": "magnitude ranks' order", "outliers": "magnitude ranks' order",
                             "random": "kept-L1 tables"}.get(kind, ""),
             group=_make_group_kernel(kind, consensus),
             scratch_blocks=_SCRATCH_BLOCKS[kind, consensus])(_make_kernel(kind, consensus))


_register("task_arithmetic", "none", False, False, False,
          "base + lambda * sum of weighted task vectors", "https://arxiv.org/abs/2212.04089")
_register("ties", "magnitude", True, True, False,
          "TIES: keep the largest entries of each task vector, elect a sign, average the agreeing ones",
          "https://arxiv.org/abs/2306.01708")
_register("dare_linear", "random", False, False, True,
          "DARE: drop random entries of each task vector and rescale, then task arithmetic",
          "https://arxiv.org/abs/2311.03099")
_register("dare_ties", "random", True, False, True,
          "DARE sparsification with TIES sign consensus", "https://arxiv.org/abs/2311.03099")
_register("breadcrumbs", "outliers", False, False, False,
          "Model Breadcrumbs: drop the smallest entries and the largest outliers, then task arithmetic",
          "https://arxiv.org/abs/2312.06795")
_register("breadcrumbs_ties", "outliers", True, False, False,
          "Model Breadcrumbs sparsification with TIES sign consensus", "https://arxiv.org/abs/2312.06795")
_register("della", "della", True, True, True,
          "DELLA: magnitude-ranked random dropping (MAGPRUNE) with TIES sign consensus",
          "https://arxiv.org/abs/2406.11617")
_register("della_linear", "della", False, False, True,
          "DELLA's MAGPRUNE sparsification, then task arithmetic", "https://arxiv.org/abs/2406.11617")
