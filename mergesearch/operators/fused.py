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

Which entries an expert keeps is a `Sparsifier` (one small class per kind: magnitude rank bounds, DARE's uniforms,
DELLA's uniforms and row ranks); the formulas are written once for all of them.

With `rescale`, DARE's kept L1 norms are looked up in a table made once per chunk (task_arithmetic.KeptL1, given as
l1's row 2: `Sparsifier.looked_up`), so its merge is one pass. DELLA's keep rule depends on each entry's row rank
too, which no small table answers exactly: a first pass sums each expert's kept L1 norm and turns the norms into the
candidate's coefficients, and the merge pass reads the deltas and the mask's sources again: both passes are one
graph, one call (`_merge_rescaled`), on every device and dtype. On a GPU a call's host time is more than a mid-sized
chunk's merge; on a CPU (torch 2.13) writing the kept entries for the merge pass to read instead was slower even
where the sources are twice a bf16 delta's bytes, as inductor wrote them in loops of their own that read the sources
again (bench_merge, bf16, 134M, vs task arithmetic: DARE 2.54x written, 1.87x in one call; DELLA 5.49x, 4.62x). The
norms are summed in fixed point on both paths (the eager kernel per block, this one in one reduction; `l1_scale`):
integer sums are the same in any order, where float32 sums were not (a factor one ulp apart flips the elected sign
of the rare entries whose vote is ~0).

The merge pass also returns the sum of what it wrote, so the materialiser's NaN/inf check reads nothing again.

The policy (which device, dtype, model and chunk size run compiled) is `operators.registry.compiled_min_entries`.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import types
import warnings

import torch
import torch.fx.experimental._config as fx_config  # dynamo's duck sizing (`_call`)

from mergesearch.operators import counter, registry

log = logging.getLogger(__name__)


class Sparsifier:
    """One kind of sparsification as a formula: which of the method's prepared per-entry state it reads
    (`sources`, keys of `state`, one tensor per expert each) and which entries it keeps within per-expert
    bounds (`lim`: task_arithmetic's `_Keep.limits`). Dense and empty experts get bounds that keep all or none,
    so one compiled graph serves every expert of a chunk."""

    sources: tuple[str, ...] = ()
    integer = False  # integer bounds (int64: magnitude rank bounds), else float32
    # The uniforms are computed in the kernel (operators/counter.py), not read: srcs = [key, at, *sources], the
    # expert's key for the chunk and the position of the first entry in its chunk (0-d for a chunk; a group's
    # (blocks, 1), each block's first entry).
    hashed = False
    # The kernel counts entry positions (srcs = [at, t, *sources], `at` as a hashed sparsifier's, t the magnitude
    # bounds' thresholds: `magnitude_thresholds`) but hashes nothing.
    positional = False
    # The kept L1 norms of a rescaled merge are given (l1's row 2: task_arithmetic.KeptL1), not summed in a first pass.
    looked_up = False

    def keep(self, srcs: list[torch.Tensor], lim: torch.Tensor, d: torch.Tensor) -> torch.Tensor | None:
        """(n,) bool: the kept entries of one expert (d: its delta, for the shape); None: every entry."""
        return None

    def keep_all(self, n: int) -> tuple[float, ...]:
        raise NotImplementedError

    def keep_none(self) -> tuple[float, ...]:
        raise NotImplementedError


class _Dense(Sparsifier):
    """Task arithmetic: nothing dropped."""


class _Magnitude(Sparsifier):
    """TIES / breadcrumbs: the entries of magnitude rank in [lo, hi), read from the deltas alone.

    Ranks order a chunk's entries by |d| descending, then by index ascending; the sort order is kept in host memory
    (`task_arithmetic.MagnitudeOrder`) and each bound x is given as the entry p of rank x - 1, looked up there. An
    entry ranks below x iff |d| > t, or |d| == t and its index <= p, where t = |d_p|: the masks of the ranks, ties
    included, with no per-entry state on the device. A bound's lim columns are (p, g): p as above (-1 for x = 0:
    nothing ranks below 0; `EVERY` for x = n: every entry does; both whatever the deltas), g where t is read (p's flat
    position among the deltas passed: a group's chunks lie one after another). srcs = [at, t]: t (2,) the bounds'
    thresholds (`magnitude_thresholds`, gathered before the call), a group's (chunks, 2).

    Until 2026-12-07 each entry's int32 rank was stored and compared: 4 bytes per entry and expert more on the
    device (a 7B TIES study with 3 experts did not fit an 80 GB GPU), and slower on a CPU too (bench_merge, 134M
    Llama, 3 experts, vs task arithmetic: float32 ties 3.51x -> 2.4-3.2x, bf16 2.79x -> 2.16x). Positions are int32 (a
    chunk has fewer than 2**31 entries: MagnitudeOrder): with int64 ones the formula took the ranks' time on a CPU."""

    sources, integer, positional = (), True, True

    def keep(self, srcs, lim, d):
        a, t, index = d.abs(), srcs[1], _positions(srcs, d)
        return _ranks_below(a, index, _col(lim, 2), _col(t, 1)) & ~_ranks_below(a, index, _col(lim, 0), _col(t, 0))

    def keep_all(self, n):
        return (0, n)

    def keep_none(self):
        return (0, 0)


class _Top(_Magnitude):
    """TIES: the entries of magnitude rank below hi, `_Magnitude` with lo = 0 always (its keep-all and keep-none
    bounds too), whose test (nothing ranks below 0) is left out: on a CPU the formula is compute-bound, and that
    test was half the mask's comparisons per entry (a float32 TIES chunk ~10% faster without it)."""

    def keep(self, srcs, lim, d):
        return _ranks_below(d.abs(), _positions(srcs, d), _col(lim, 2), _col(srcs[1], 1))


EVERY = 2 ** 31 - 1  # a rank bound's p where every entry of the chunk ranks below it (`_Magnitude`)


def _positions(srcs, d: torch.Tensor) -> torch.Tensor:
    """int32 positions of d's entries (along its last dimension) in their chunk, from `at` = srcs[0]."""
    return srcs[0].to(torch.int32) + torch.arange(d.shape[-1], device=d.device, dtype=torch.int32)


def _ranks_below(a, index, p, t) -> torch.Tensor:
    """Entries (|d| a, positions `index`) that rank below a bound: p its entry, t its threshold (`_Magnitude`)."""
    return (a > t) | ((a == t) & (index <= p.to(torch.int32)))


def magnitude_thresholds(d: torch.Tensor, lim: torch.Tensor) -> torch.Tensor:
    """(..., 2) float32: the thresholds |d_p| of one expert's magnitude bounds lim (..., 4) (`_Magnitude`), gathered
    from its deltas d (any shape, flat positions g) on the device, before the formula's call: a gather inside it
    made inductor write each expert's masked terms of a whole group to buffers of their own and add them in a
    second loop (breadcrumbs, float32: 3.5x the chunk-by-chunk time). p -1 (nothing) and EVERY decide whatever the
    deltas hold: t past every |d| (none is larger, and p is below every index), or below every |d|."""
    p, g = lim[..., 0::2], lim[..., 1::2]
    t = d.reshape(-1)[g.reshape(-1)].reshape(g.shape).abs().to(torch.float32)
    return torch.where(p < 0, math.inf, torch.where(p == EVERY, -1.0, t))


class _Random(Sparsifier):
    """DARE: uniforms below the keep probability; its kept L1 norms looked up."""

    sources, looked_up = ("u",), True

    def keep(self, srcs, lim, d):
        return srcs[0] < _col(lim, 0)

    def keep_all(self, n):
        return (2.0,)  # u < 2 always

    def keep_none(self):
        return (0.0,)


class _Della(Sparsifier):
    """DELLA's MAGPRUNE: u < row rank * slope + offset, two float32 roundings as the eager kernel's mul, add_; the
    uniform and the row rank read from one int32 (`pack`), compared in integer units (`DELLA_UNITS`)."""

    sources = ("ur",)

    def keep(self, srcs, lim, d):
        x = from_bits(srcs[0])
        return packed_uniforms(x) < (packed_ranks(x) * _col(lim, 0) + _col(lim, 1))

    def keep_all(self, n):
        return (0.0, 2.0 ** 17)  # u < 2 always

    def keep_none(self):
        return (0.0, 0.0)


# DELLA's row ranks r / (ncols - 1) in [0, 1] on a grid of 2**-14: round(r * 2**14 / (ncols - 1)), exact at both ends
# of a row, distinct in rows up to 16,385 entries (in longer ones a keep probability moves by at most 2**-15 times
# DELLA's 2 epsilon). Stored with the entry's 16-bit uniform in one int32 (`pack`) where the uniforms are stored,
# else (CUDA: uniforms hashed in the kernel) alone as int16 (`rank_codes`): 4 or 2 bytes per entry and expert
# instead of float32 uniforms and ranks' 8, so that a DELLA candidate reads 2.8x task arithmetic's bytes instead of
# 3.4x. Not int16 on the CPU: inductor's C++ does not vectorise int16 (a kernel reading int16 ran 4.5x slower).
# The formula compares the integers themselves, the uniform's 16 bits u16 and the rank's steps k, as float32:
# u16 < k * (4 slope) + 2**16 offset is u < rank * slope + offset with both sides times 2**16, and scaling by a power
# of two commutes with every rounding, so the masks are those of the real-valued rule (and the eager kernel's), with
# no decoding (a mask, a shift and two conversions per entry fewer: DELLA's first pass was compute-bound on a CPU).
RANK_STEPS = 2 ** 14
DELLA_UNITS = (2 ** 16 / RANK_STEPS, 2.0 ** 16)  # the slope's and the offset's factors (`_Della.limits`)


def rank_steps(ranks: torch.Tensor, ncols: int) -> torch.Tensor:
    """int64 0 .. 2**14: 0-based row ranks (int64) of rows of `ncols` entries on the grid, rounded to nearest."""
    m = max(1, ncols - 1)  # a one-column row's rank 0 is 0 (mergekit: NaN)
    return (ranks * RANK_STEPS + m // 2) // m


def pack(u_bits: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """int32 (>= 0): a row rank's steps (<= 2**14) above a uniform's 16 bits (counter.bits)."""
    return ((steps << 16) | u_bits).to(torch.int32)


def packed_uniforms(x: torch.Tensor, out: torch.Tensor | None = None, tmp: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """float32 0 .. 2**16 - 1: the uniforms of `pack`ed entries in units of 2**-16 (`out`, `tmp`: the eager
    kernel's float32 and int32 block buffers)."""
    if out is None:
        return (x & 0xFFFF).to(torch.float32)
    return out.copy_(torch.bitwise_and(x, 0xFFFF, out=tmp))


def packed_ranks(x: torch.Tensor, out: torch.Tensor | None = None, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """float32 0 .. 2**14: the row ranks of `pack`ed entries in steps."""
    if out is None:
        return (x >> 16).to(torch.float32)
    return out.copy_(torch.bitwise_right_shift(x, 16, out=tmp))


def rank_codes(steps: torch.Tensor) -> torch.Tensor:
    """int16: row ranks' steps alone (a device that computes the uniforms)."""
    return steps.to(torch.int16)


def row_ranks(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 0 .. 2**14: the row ranks of `rank_codes` in steps."""
    return codes.to(torch.float32) if out is None else out.copy_(codes)


def _uniforms(srcs, d: torch.Tensor, units: bool = False) -> torch.Tensor:
    """The uniforms of a hashed sparsifier's entries: key srcs[0], entry positions srcs[1] + 0, 1, ... along d's
    last dimension. int64 arithmetic off CUDA, int32 on it: the same numbers (operators/counter.py). `units`: in
    units of 2**-16 (DELLA's comparison)."""
    index = srcs[1] + torch.arange(d.shape[-1], device=d.device)
    wide = d.device.type != "cuda"
    return counter.bits(index, srcs[0], wide).to(torch.float32) if units else counter.uniform(index, srcs[0], wide)


class _HashedRandom(_Random):
    """DARE with its uniforms computed in the kernel (no field read)."""

    sources, hashed = (), True

    def keep(self, srcs, lim, d):
        return _uniforms(srcs, d) < _col(lim, 0)


class _HashedDella(_Della):
    """DELLA with its uniforms computed in the kernel; the row ranks read (int16: `rank_codes`)."""

    sources, hashed = ("rn",), True

    def keep(self, srcs, lim, d):
        return _uniforms(srcs, d, units=True) < (row_ranks(srcs[2]) * _col(lim, 0) + _col(lim, 1))


DENSE, MAGNITUDE, TOP, RANDOM, DELLA = _Dense(), _Magnitude(), _Top(), _Random(), _Della()
HASHED_RANDOM, HASHED_DELLA = _HashedRandom(), _HashedDella()


def _col(x: torch.Tensor, i: int) -> torch.Tensor:
    """Number i of a chunk's (K,) numbers (0-d), or of a group's (blocks, K) rows as a (blocks, 1) column that
    broadcasts over each block's entries (`merge_group`)."""
    return x[i] if x.dim() == 1 else x[:, i:i + 1]


def _masked(sp: Sparsifier, d: torch.Tensor, srcs, lim) -> torch.Tensor:
    """d (float32) with the entries `sp` drops set to 0."""
    keep = sp.keep(srcs, lim, d)
    return d if keep is None else d * keep.to(d.dtype)


def _merge(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, nums, rescaled: bool = False
           ) -> torch.Tensor:
    """out = the family's merge of one chunk (flat tensors), computed in float32 and rounded to the chunk's
    dtype (`_round`) wherever the eager kernel writes a bf16/fp16 tensor, so that both elect the same signs.
    Returns the float32 sum of the written values (in the same loop), which is finite iff they all are.

    srcs: each expert's sources of `sp`, lim: (E, 2) or (E, 1) their bounds; nums: (3E + 1,) float32, the
    candidate's numbers in one tensor (each tensor argument is one more guard to check per call):
    fc = nums[:E] each expert's multiplier of its kept entries (consensus: w_e, times the rescale factor;
    otherwise lambda w_e / W times it; rescaled ones already rounded to the dtype, as the eager kernel rounds
    them); rs = nums[E:2E] 1 for the rescaled experts, whose terms the eager kernel writes (rounds) before adding
    them; w = nums[2E:3E] the weights for the consensus divisor; lam = nums[3E] lambda. `rescaled`: the formula of
    a method with `rescale` (rs may be 1); elsewhere rs is 0 and no rounding of a rescaled term is written in, as
    inductor computes both sides of a `where` (a bf16 plain task arithmetic took 3 more bf16 round trips per
    entry).
    """
    n_exp = len(ds)
    fc, rs, w = ([_col(nums, k * n_exp + e) for e in range(n_exp)] for k in range(3))
    lam = _col(nums, 3 * n_exp)
    dt, f32 = b.dtype, torch.float32
    base = b.to(f32)
    # An expert at coefficient 0 adds nothing, as in the eager kernel, which leaves it out: not even a NaN of its own.
    terms = [torch.where(fc[e] != 0, _masked(sp, d.to(f32), srcs[e], lim[e]) * fc[e], 0.0) for e, d in enumerate(ds)]
    if not consensus:  # eager: acc = b + c_e t_e, one rounding per add (a rescaled term rounded before)
        acc = base
        for e, t in enumerate(terms):
            acc = _round(acc + (torch.where(rs[e] > 0, _round(t, dt), t) if rescaled else t), dt)
        return _written(out, acc)
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
        return _written(out, base + lam * mixed / divisor)  # addcdiv's (value * t1) / t2, one rounding
    return _written(out, base + mixed * lam)


def _written(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Write x (float32) into out and return the float32 sum of what out now holds (x rounded to its dtype: a
    value past fp16's range is inf there). A group's (blocks, B): summed per block first, the one reduction that
    inductor fuses with the store; a full sum of the 2-d x made it write x to a buffer of its own and read it back
    (1.8x a TIES candidate's time on a CPU)."""
    out.copy_(x)
    written = _round(x, out.dtype)
    return written.sum(dtype=torch.float32) if x.dim() == 1 else written.sum(dim=1, dtype=torch.float32).sum()


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float32) rounded to `dtype` and back: what writing it into a `dtype` tensor does (none for float32)."""
    return x if dtype == torch.float32 else x.to(dtype).to(torch.float32)


# L1 norms in fixed point: |entry| * 2**k (k per expert and chunk, `l1_scale`) rounded to an integer and summed
# where integers below 2**53 are exact: integer sums are exact in any order, so the eager kernel's block sums, the
# compiled reduction and a group's per-block sums all give the same norms, hence the same rescale factors and elected
# signs, on every device. The compiled reduction sums in int64 where inductor's C++ uses AVX-512 (`wide_cpu`) and
# in float64 elsewhere: the same integers either way. A float32 -> int64 conversion has no vector instruction before
# AVX-512 (inductor's C++ converted entry by entry), and it was most of a DARE or DELLA first pass on an AVX2 CPU (a
# bf16 DARE candidate's 3 x 16.8M entries: 120 ms, against 25 ms rounded in float32 and summed in float64); with
# AVX-512 (vcvtps2qq) int64 is the faster one, as float64 adds take half a float32 vector's lanes twice over (3 x
# 16.8M float32 entries: 10.2 ms in int64, 17.2 ms in float64). k puts the chunk's largest |entry| just below
# 2**(52 - ceil(log2 n)): n rounded entries sum to at most 2**52, and rounding (not truncating: its errors cancel
# instead of adding up) moves each entry by at most 2**-(52 - ceil(log2 n)) of the largest (2**-23 in a 2**29-entry
# chunk).


def l1_scale(d: torch.Tensor) -> float:
    """2**k for the fixed-point L1 norm of `d` (see above); 1 for an all-zero d."""
    amax = float(torch.linalg.vector_norm(d, math.inf)) if d.numel() else 0.0  # no |d| copy of the chunk
    if amax == 0.0 or not math.isfinite(amax):
        return 1.0
    k = 52 - max(1, d.numel() - 1).bit_length() - math.frexp(amax)[1]
    return 2.0 ** max(-126, min(126, k))


def fixed_entries(a: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """float32 integers: the entries of `a` (>= 0; float32, or cast to it) in fixed point at `scale` (a power of two:
    |a| * scale is exact, and so is its rounding); what `fixed_l1` and DARE's kept-L1 tables sum."""
    return torch.round(a.to(torch.float32) * scale)


def fixed_l1(a: torch.Tensor, scale: torch.Tensor | float, dim: int | None = None, integer: bool = False
             ) -> torch.Tensor:
    """float64 holding an integer: the fixed-point sum of `a` (`fixed_entries`) along `dim` (None: all), summed in
    int64 where `integer` (the same number; see above), else in float64."""
    x = fixed_entries(a, scale)
    acc = torch.int64 if integer else torch.float64
    if integer:
        x = x.to(torch.int64)
    total = x.sum(dtype=acc) if dim is None else x.sum(dim=dim, dtype=acc)
    return total.to(torch.float64)


def _kept_l1(sp: Sparsifier, ds, srcs, lim, l1, cob=None, n_chunks=None) -> torch.Tensor:
    """(E,) float64: each expert's L1 norm over the entries it keeps, in fixed point at its scale (l1: (2, E),
    row 1 the scales; see `l1_scale`). A group's (`merge_group`: (blocks, B) tensors, cob (blocks,) each block's
    chunk, l1 (chunks, 2, E)): (n_chunks, E), each chunk's norms, summed per block and then per chunk.

    A mask of one byte per entry was slower on a CPU: inductor wrote it in a loop of its own, which read the
    sources again. All experts in one call: on a GPU each call costs more host time (guards, the wrapper) than
    the kernel of a mid-sized tensor."""
    scale = l1[..., 1, :]
    per_block = scale.to(torch.float32) if cob is None else scale.to(torch.float32)[cob]  # (E,) or (blocks, E)
    integer = ds[0].device.type == "cpu" and WIDE_CPU
    norms = []
    for e, d in enumerate(ds):
        t = _masked(sp, d.to(torch.float32), srcs[e], lim[e])  # float32: bf16 ops would round (exact, but slow)
        if cob is None:
            norms.append(fixed_l1(t.abs(), per_block[e], integer=integer))
        else:
            sums = fixed_l1(t.abs(), per_block[:, e:e + 1], dim=1, integer=integer)
            norms.append(sums.new_zeros(n_chunks).index_add(0, cob, sums))
    return torch.stack(norms, dim=-1) / scale  # fixed_l1's sums are float64 already


RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


def rescale_factor(before: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(E,) float32: each expert's factor that brings its kept entries back to its L1 norm (mergekit's
    RescaleNorm.l1: 1 where either norm is below 1e-7). before, kept: (E,) float64 L1 norms of the whole chunk
    and of its kept entries (0 for an expert that is not rescaled: factor 1). The eager kernel's rule too."""
    small = (before < RESCALE_EPS) | (kept < RESCALE_EPS)
    return torch.where(small, torch.ones_like(kept), before / kept.clamp_min(RESCALE_EPS)).float()


def _rescaled_nums(sp: Sparsifier, ds, srcs, lim, l1, nums, cob=None) -> torch.Tensor:
    """`nums` (see `_merge`) with the coefficients of the rescaled experts (nums[E:2E] > 0) times their L1 rescale
    factors, rounded to the chunk's dtype as the eager kernel rounds them. Every expert's kept L1 norm is summed
    here (`_kept_l1`); an expert that is not rescaled keeps its coefficient (factor 1).
    l1: (2, E) float64, each expert's fixed-point L1 norm over the chunk and its scale (prepare's "l1"). A group's
    (cob given): nums is the (chunks, 3E + 1) table, l1 (chunks, 2, E), lim (E, blocks, K) the bounds gathered per
    block."""
    n_exp = len(ds)
    coef, rs = nums[..., :n_exp], nums[..., n_exp:2 * n_exp]
    kept_l1 = l1[..., 2, :] if sp.looked_up else _kept_l1(sp, ds, srcs, lim, l1, cob, nums.shape[0])
    c = rescale_factor(l1[..., 0, :], torch.where(rs > 0, kept_l1, torch.zeros_like(kept_l1))) * coef
    return torch.cat([torch.where(rs > 0, _round(c, ds[0].dtype), c), nums[..., n_exp:]], dim=-1)


def _merge_rescaled(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, l1, nums
                    ) -> torch.Tensor:
    """`_merge` of a chunk with `rescale` in one graph: the kept L1 norms (DELLA: summed, reading the deltas and
    their mask sources before the merge reads them again; DARE: given) and the coefficients (`_rescaled_nums`),
    then the merge. One call per chunk
    instead of two: the host time of a call is more than a mid-sized chunk's merge on a GPU."""
    return _merge(sp, consensus, normalize, out, b, ds, srcs, lim, _rescaled_nums(sp, ds, srcs, lim, l1, nums),
                  rescaled=True)


# --- a group: many chunks in one call ------------------------------------------------------------------------------
# The materialiser lays the sources of a model's large chunks out in flat buffers (materializer.py, `_Group`),
# every chunk a whole number of blocks of B entries, so that one call merges them all: the tensors are viewed as
# (blocks, B), the candidate's numbers are a (chunks, 3E + 1) table and each block reads its chunk's row (cob:
# (blocks,) int64, each block's chunk). On a GPU a call's host time (~0.1 ms) is more than the kernel of a
# mid-sized chunk: per chunk, the host bounded a 0.5B model's candidate, not the memory.


def _per_block(sp: Sparsifier, srcs, cob):
    """A hashed sparsifier's keys, (chunks,) per expert, gathered per block: (blocks, 1); a positional one's
    thresholds (chunks, 2): (blocks, 2)."""
    if sp.positional:
        return [[x[0], x[1][cob], *x[2:]] for x in srcs]
    return [[x[0][cob][:, None], *x[1:]] for x in srcs] if sp.hashed else srcs


def _group_merge(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, table, cob) -> torch.Tensor:
    """`_merge` of a group: lim (E, chunks, K) each chunk's bounds, table (chunks, 3E + 1) its numbers."""
    return _merge(sp, consensus, normalize, out, b, ds, _per_block(sp, srcs, cob), lim[:, cob], table[cob])


def _group_rescaled(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, l1, table, cob
                    ) -> torch.Tensor:
    """`_merge_rescaled` of a group (l1: (chunks, 2, E) float64 each chunk's L1 norms and scales)."""
    lim, srcs = lim[:, cob], _per_block(sp, srcs, cob)
    table = _rescaled_nums(sp, ds, srcs, lim, l1, table, cob)
    return _merge(sp, consensus, normalize, out, b, ds, srcs, lim, table[cob], rescaled=True)


_FORMULAS = {"merge": _merge, "rescaled": _merge_rescaled, "group_merge": _group_merge,
             "group_rescaled": _group_rescaled}


@functools.cache
def _compiled(what: str, sp: Sparsifier, *flags: bool):
    """The compiled formula `what` (a key of _FORMULAS) for one kind of chunk: "merge" or "rescaled" (flags:
    consensus, normalize); "group_" the same for a group of chunks.

    Each gets a code object of its own: dynamo keeps its compiled graphs and their guards per code object
    and checks them one after another on every call, so formulas sharing one (a closure or a partial) made
    each call test every other formula's guards first (~0.2 ms a call on a CPU, a third of a DELLA candidate).
    """
    body = _FORMULAS[what]

    def formula(*args):
        return body(sp, *flags, *args)
    name = f"_{what}{type(sp).__name__.lower()}_{''.join(str(int(f)) for f in flags)}"
    own = types.FunctionType(formula.__code__.replace(co_name=name, co_qualname=name), formula.__globals__, name,
                             formula.__defaults__, formula.__closure__)
    # emulate_precision_casts: inductor otherwise drops a cast to bf16 and back (`_round`) inside a fused kernel.
    return torch.compile(own, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def _unviewed(args, bits: bool) -> list:
    """args with every tensor, also in lists, passed as a tensor of its own over the same memory (`detach`: no
    view base), with `bits` int32 ones as float32 bits (`as_bits`). dynamo guards an input view's base, its sizes
    and strides: a chunk of a 2-d weight, then one of a 1-d norm, compiled every formula twice (seconds on a CPU,
    more on CUDA)."""
    return [(as_bits(a.detach()) if bits else a.detach()) if isinstance(a, torch.Tensor)
            else _unviewed(a, bits) if isinstance(a, list) else a for a in args]


# Where inductor's C++ uses 256-bit vectors (AVX2), int32 tensors cross into a float32 chunk's compiled formula as
# float32 tensors over the same bytes, and the formula reads them back with `from_bits` (a bit cast: no conversion,
# no copy). Why: inductor's C++ loads a vector of int32 with at::vec's `Vectorized<int32_t>::loadu(ptr, count)`,
# which (torch 2.13, AVX2) copies every 8 entries through a stack buffer even when the vector is full, where
# float32's `loadu` is one instruction. A compiled pass reading 16.8M int32 entries took 2.9x the same pass reading
# them as float32 bits (14 ms vs 4.8 ms), and DELLA's packed uniforms and ranks (`pack`) are its only per-entry
# sources: on the CPU a float32 DELLA candidate was 6.5x task arithmetic, 4.1x since. With AVX-512 (`WIDE_CPU`) it is
# the other way round: the int32 `loadu` of a full vector is one instruction there, and inductor writes the bit cast
# of 16 lanes as a scalar loop through a stack buffer; int32 is passed as it is (one 16.8M-entry float32 DELLA chunk,
# 3 experts, both passes: 47 ms, against 99 ms through the bits). Not for a 16-bit chunk either: its loop takes 16
# entries at a time, inductor writes the bit cast of 16 as a scalar loop whose result is loaded through that same
# int32 path, and it was slower than the int32 load alone (AVX2, one 16.8M-entry bf16 chunk, 3 experts, DELLA: 61
# against 44 ms). Bit patterns of `pack` are below 2**31 - 2**23 (no NaN or inf: nothing is lost in any copy). So
# every formula reads an int32 source through `from_bits`, which is the tensor itself where it was passed as int32
# (DELLA's packed state is the only one); one that did not would fail to compile and fall back to the eager kernel,
# with the warning `_call` logs.
WIDE_CPU = False  # registry.wide_cpu(), set by `_call` before a CPU formula is traced (the formulas read it then)


def as_bits(x: torch.Tensor) -> torch.Tensor:
    """x, or an int32 x viewed as float32 (its bits unchanged)."""
    return x.view(torch.float32) if x.dtype == torch.int32 else x


def from_bits(x: torch.Tensor) -> torch.Tensor:
    """The int32 tensor whose bits x holds (`as_bits`); an int32 x itself."""
    return x.view(torch.int32)


_GRAPHS = 128  # compiled graphs kept per formula (dynamo's default: 8; its limit is process-wide, for any code)
_BROKEN: set[tuple] = set()  # (what, sparsifier, *flags, dtype, device type) whose compile failed
_RAN: set[tuple] = set()  # the same, for those that ran once
calls: collections.Counter = collections.Counter()  # compiled calls that ran, by (what, sparsifier name, *flags)


def _call(key: tuple, sample: torch.Tensor, *args) -> tuple[bool, object]:
    """(True, result) of the compiled function `key` on args; (False, None) where it cannot compile here.

    A compiler that fails (no C++ toolchain, an inductor bug on some dtype or device) is logged once per key and
    never retried, so a study goes on at the eager kernel's speed instead of stopping.

    The host time of a call counts: a GPU merges a chunk of a 0.5B model in tens of microseconds. So the first
    call of a key (which compiles) is the only one that silences inductor's notices, and dynamo's recompile limit
    is raised once per process, not patched around every call (that alone cost ~30 us a call on a CPU).
    """
    sig = (*key, sample.dtype, sample.device.type)
    if sig in _BROKEN:
        return False, None
    global WIDE_CPU
    cpu = sample.device.type == "cpu"
    if cpu:
        WIDE_CPU = registry.wide_cpu()
    args = _unviewed(args, bits=sample.dtype == torch.float32 and not (cpu and WIDE_CPU))
    try:
        if sig in _RAN:
            result = _compiled(*key)(*args)
        else:
            # Each expert count (and each dtype of the mask sources) is a graph of its own: a process that merges
            # several expert sets may hold more than dynamo's default of 8 graphs per code object.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _GRAPHS)
            # No duck sizing: it ties sizes and strides that happen to be equal on the first call (3 experts and
            # 3 chunks in a run, a (2, E) table's 2 and a (E, 2) bound's stride) and recompiles (seconds on a
            # CPU, more on CUDA) when they differ on a later one. Sizes that must agree agree by the ops.
            fx_config.use_duck_shape = False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # inductor's own notices, once per graph
                result = _compiled(*key)(*args)
            _RAN.add(sig)
        calls[(key[0], type(key[1]).__name__, *key[2:])] += 1
        return True, result
    except torch.OutOfMemoryError:
        raise  # the merge itself is out of memory, not the compiler: no reason to give the formula up for good
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the exact eager kernel
        _BROKEN.add(sig)
        first = str(exc).splitlines()[0] if str(exc) else ""
        log.warning("the compiled %s formula is unavailable for %s on %s (%s: %s); using the eager kernel",
                    type(key[1]).__name__.strip("_"), sample.dtype, sample.device.type, type(exc).__name__, first)
        return False, None


def merge(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, nums) -> torch.Tensor | None:
    """Write the merged chunk into `out` and return the float32 sum of what it wrote (see `_merge`); None where
    the compiled formula is unavailable."""
    return _call(("merge", sp, consensus, normalize), b, out, b, ds, srcs, lim, nums)[1]


def merge_rescaled(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, l1, nums
                   ) -> torch.Tensor | None:
    """Write the merged chunk of a method with `rescale` into `out` in one call and return the float32 sum of what
    it wrote (see `_merge_rescaled`); None where the compiled formula is unavailable."""
    return _call(("rescaled", sp, consensus, normalize), b, out, b, ds, srcs, lim, l1, nums)[1]


def merge_group(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, table, cob
                ) -> torch.Tensor | None:
    """`merge` of a group of chunks in one call (see `_group_merge`); None where the formula is unavailable."""
    return _call(("group_merge", sp, consensus, normalize), b, out, b, ds, srcs, lim, table, cob)[1]


def merge_group_rescaled(sp: Sparsifier, consensus: bool, normalize: bool, out, b, ds, srcs, lim, l1, table, cob
                         ) -> torch.Tensor | None:
    """`merge_rescaled` of a group of chunks in one call; None where the formula is unavailable."""
    return _call(("group_rescaled", sp, consensus, normalize), b, out, b, ds, srcs, lim, l1, table, cob)[1]
