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

Speed: sparsification never sorts on the hot path. `prepare` sorts each chunk's |d| once and
keeps each entry's rank in that order (int32, 0 = largest), so a density's mask is one integer
comparison (rank < k; breadcrumbs: two), exact at ties, with no threshold to look up.
DARE/DELLA draw their uniform numbers once per chunk from the seeded generator (float32
fields, kept iff u < p): the same candidate and seed give the same
weights, and candidates at different densities share the random numbers (nested masks), which
takes noise out of comparisons between candidates.
"""

from __future__ import annotations

import torch

from mergesearch.errors import CandidateError
from mergesearch.operators import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    Param,
    Scratch,
    exact,
    is_on,
    normalize_param,
    register,
    rescale_param,
)

_RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps

GAMMA = Param("gamma", 0.0, 0.5, 0.01, "fraction of the largest-magnitude entries dropped as outliers",
              per_expert=True, search=(0.0, 0.1))
EPSILON = Param("epsilon", 0.0, 0.5, 0.15,
                "spread of DELLA's keep probability around density, by magnitude rank within a row "
                "(density +/- epsilon must stay inside (0, 1))",
                per_expert=True, search=(0.01, 0.2))


# --- DELLA's rule: density +/- epsilon inside (0, 1) ------------------------------------------------
# Stated once here; the kernel (`_sparse_spec`), Plan.validate and the search space all apply it.

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


# --- precomputation (once per chunk) ---------------------------------------------------------------


def _acc_dtype(d: torch.Tensor) -> torch.dtype:
    return torch.float64 if d.dtype == torch.float64 else torch.float32  # never narrower than the input


def _l1(deltas) -> list[torch.Tensor]:
    return [torch.linalg.vector_norm(d, 1, dtype=_acc_dtype(d)) for d in deltas]


def magnitude_rank(d: torch.Tensor) -> torch.Tensor:
    """(n,) rank of each entry of d (flattened) by |d|, 0 = largest; equal |d|: lower index first.

    int32 where n fits (half the memory of int64, and compared as fast as float32 on CPU).
    """
    n = d.numel()
    order = torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices
    dtype = torch.int32 if n < 2**31 else torch.int64
    rank = torch.empty(n, dtype=dtype, device=d.device)
    rank[order] = torch.arange(n, dtype=dtype, device=d.device)
    return rank


def _prepare_magnitude(base, deltas, gen) -> dict:
    return {"rank": [magnitude_rank(d) for d in deltas], "l1": _l1(deltas)}


def _uniform_field(n: int, gen: torch.Generator, device) -> torch.Tensor:
    # (n,) float32 uniforms in [0, 1): entry kept iff u < p, i.e. with probability p. Drawn on the
    # CPU so a seed gives the same masks on every device; float32 because comparing int16 fields
    # is ~3x slower on CPU.
    return torch.rand(n, dtype=torch.float32, generator=gen).to(device)


def _prepare_random(base, deltas, gen) -> dict:
    return {"u": [_uniform_field(d.numel(), gen, d.device) for d in deltas], "l1": _l1(deltas)}


def _rows(d: torch.Tensor) -> torch.Tensor:
    # mergekit ranks along dim 1 and treats a 1-d tensor as one row.
    return d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], -1)


def _prepare_della(base, deltas, gen) -> dict:
    rn = []
    for d in deltas:
        mags = _rows(d).abs().float()
        order = torch.argsort(mags, dim=1, stable=True)  # ties by index: the same ranks on every device
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(mags.shape[1], device=d.device).expand_as(order))
        # (rank - 1) / (ncols - 1) with 1-based ranks; a one-column row gets 0 (mergekit: NaN).
        rn.append((ranks.float() / max(1, mags.shape[1] - 1)).reshape(-1))
    return {"u": [_uniform_field(d.numel(), gen, d.device) for d in deltas], "rn": rn, "l1": _l1(deltas)}


# --- the kernel ----------------------------------------------------------------------------------

# Entries per block: each step below is a separate torch op, so a chunk is processed in blocks
# that stay in the CPU's L2 cache (a dozen float32 buffers of 128K entries), where an elementwise
# op runs ~3-4x faster than streaming from memory. Masks are float 0/1 because bool tensors in
# mul/where are several times slower than float ones on CPU.
BLOCK = 1 << 17


def _sparse_spec(kind: str, e: int, n: int, p, state):
    """How expert e is sparsified in this chunk: ("dense",), ("zero",) or a mask recipe."""
    if kind == "none":
        return ("dense",)
    density = p["density"][e]
    if density >= 1.0:
        return ("dense",)
    if n == 0:
        return ("zero",)
    if kind == "magnitude":
        if density <= 0.0:
            return ("zero",)
        k = max(1, int(exact(density) * n))
        return ("top", k)  # keep rank < k
    if kind == "outliers":
        target = int(exact(density) * n)
        if target <= 0:
            return ("zero",)
        n_top = int(exact(p["gamma"][e]) * n)
        n_bot = max(0, n - target - n_top)
        # Ascending position n - 1 - rank in [n_bot, n_bot + target)  <=>  rank in [n - n_bot - target, n - n_bot);
        # the lower end is 0 when no outlier is dropped (gamma 0, or density 1).
        lo, hi = n - n_bot - target, n - n_bot
        return ("top", hi) if lo == 0 else ("band", lo, hi)
    if kind == "random":
        if density <= 0.0:
            return ("zero",)
        return ("lt_u", density)
    if kind == "della":
        if density <= 0.0:
            return ("zero",)
        eps = p["epsilon"][e]
        if della_out_of_range(density, eps):
            raise CandidateError(f"della: {della_range_message(density, eps)}")
        return ("della", 2.0 * eps, density - eps)
    raise AssertionError(kind)


def _mask(spec, e: int, d, lo: int, hi: int, state, scratch, m) -> None:
    """Write expert e's 0/1 keep mask for entries [lo, hi) into the float buffer m (shape like d)."""
    mode = spec[0]
    if mode == "top":
        torch.lt(state["rank"][e][lo:hi], spec[1], out=m)
    elif mode == "band":
        r = state["rank"][e][lo:hi]
        torch.lt(r, spec[2], out=m)
        m2 = scratch.get("mask2", d)
        torch.ge(r, spec[1], out=m2)
        m.mul_(m2)
    elif mode == "lt_u":
        torch.lt(state["u"][e][lo:hi], spec[1], out=m)
    elif mode == "della":
        q = scratch.get("q", d, torch.float32)
        torch.mul(state["rn"][e][lo:hi], spec[1], out=q)
        q.add_(spec[2])
        torch.lt(state["u"][e][lo:hi], q, out=m)
    else:
        raise AssertionError(mode)


def _make_kernel(kind: str, consensus: bool):
    def kernel(out, base, deltas, p, state, scratch) -> None:
        o, b = out.reshape(-1), base.reshape(-1)
        ds = [d.reshape(-1) for d in deltas]
        n = b.numel()
        w = p["weight"]
        lam = p["lambda"]
        normalize = is_on(p["normalize"])
        rescale = is_on(p.get("rescale", 0.0))
        # A zero weight contributes nothing, not even to a consensus divisor (mergekit: mask * 0).
        specs = [("zero",) if w[e] == 0.0 else _sparse_spec(kind, e, n, p, state) for e in range(len(ds))]
        live = [e for e in range(len(ds)) if specs[e][0] != "zero"]
        if not live:
            o.copy_(b)
            return
        if consensus:
            coef = {e: w[e] for e in live}
        else:
            total = sum(w)  # over every expert, as mergekit's weights.sum()
            div = total if (normalize and abs(total) >= 1e-8) else 1.0
            coef = {e: lam * w[e] / div for e in live}
        if not consensus and all(specs[e][0] == "dense" for e in live):
            # Plain task arithmetic: whole-chunk streaming adds (no block overhead).
            torch.add(b, ds[live[0]], alpha=coef[live[0]], out=o)
            for e in live[1:]:
                o.add_(ds[e], alpha=coef[e])
            return
        # Rescaling needs each sparsified chunk's L1 norm first: one extra pass (dot of |d| and mask).
        scale: dict[int, torch.Tensor] = {}
        if rescale:
            sparse = [e for e in live if specs[e][0] != "dense"]
            acc = {e: torch.zeros((), dtype=torch.float32, device=b.device) for e in sparse}
            for lo in range(0, n, BLOCK):
                hi = min(n, lo + BLOCK)
                for e in sparse:
                    d = ds[e][lo:hi]
                    m = scratch.get("m", d)
                    _mask(specs[e], e, d, lo, hi, state, scratch, m)
                    a = scratch.get("abs", d)
                    torch.abs(d, out=a)
                    if a.dtype == torch.float32:
                        acc[e] += torch.dot(a, m)
                    else:  # bf16/fp16 dot runs ~20x slower than mul + float32 sum on CPU
                        acc[e] += a.mul_(m).sum(dtype=torch.float32)
            for e in sparse:
                before, after = state["l1"][e], acc[e]
                small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
                factor = torch.where(small, torch.ones_like(after), before / after.clamp_min(_RESCALE_EPS))
                scale[e] = (factor * coef[e]).to(b.dtype)
        for lo in range(0, n, BLOCK):
            hi = min(n, lo + BLOCK)
            bb, ob = b[lo:hi], o[lo:hi]
            terms = []  # (tensor, python coefficient): this block's wd_e = coefficient * tensor
            for i, e in enumerate(live):
                d = ds[e][lo:hi]
                if specs[e][0] == "dense":
                    if consensus:
                        wd = scratch.get(f"W{i}", d)
                        torch.mul(d, coef[e], out=wd)
                        terms.append((wd, 1.0))
                    else:
                        terms.append((d, coef[e]))
                    continue
                wd = scratch.get(f"W{i}", d)
                m = scratch.get("m", d)
                _mask(specs[e], e, d, lo, hi, state, scratch, m)
                torch.mul(d, m, out=wd)
                if e in scale:
                    wd.mul_(scale[e])
                    terms.append((wd, 1.0))
                elif consensus:
                    wd.mul_(coef[e])
                    terms.append((wd, 1.0))
                else:
                    terms.append((wd, coef[e]))
            if not consensus:
                t0, c0 = terms[0]
                torch.add(bb, t0, alpha=c0, out=ob)
                for t, c in terms[1:]:
                    ob.add_(t, alpha=c)
                continue
            # Sign consensus: sg = +1 where sum_e wd_e >= 0 else -1; kept entries agree with sg,
            # so mixed = sg * sum_e relu(sg * wd_e) and divisor = sum_e w_e [sg * wd_e > 0].
            sg = scratch.get("sg", bb)
            if len(terms) == 1:
                torch.ge(terms[0][0], 0, out=sg)
            else:
                torch.add(terms[0][0], terms[1][0], out=sg)
                for t, _ in terms[2:]:
                    sg.add_(t)
                torch.ge(sg, 0, out=sg)
            sg.mul_(2.0).sub_(1.0)
            mixed = scratch.get("mixed", bb)
            kept = scratch.get("kept", bb)
            divisor = scratch.get("divisor", bb)
            for i, (t, _) in enumerate(terms):
                t.mul_(sg).clamp_(min=0)
                if i == 0:
                    mixed.copy_(t)
                else:
                    mixed.add_(t)
                if normalize:
                    we = w[live[i]]
                    torch.gt(t, 0, out=kept)
                    if i == 0:
                        torch.mul(kept, we, out=divisor)
                    else:
                        divisor.add_(kept, alpha=we)
            mixed.mul_(sg)
            if normalize:
                torch.eq(divisor, 0, out=kept)
                divisor.add_(kept)  # 0 -> 1, as mergekit
                mixed.div_(divisor)
            torch.add(bb, mixed, alpha=lam, out=ob)

    return kernel


def _make_linear_parts(kind: str, consensus: bool):
    """Per-expert parts of a candidate: merged = base + sum_e w_e * part_e (see Operator.linear_parts).

    Masks and L1 rescaling do not depend on the weights, so without sign consensus the merge is
    linear in the weights and the parts are exact everywhere. With consensus the elected sign and the
    divisor do depend on them: the parts freeze both at this candidate (exact here, a linearisation
    around it), and an expert counts where its own kept entries agree with the elected sign
    (the same as the kernel for non-negative weights).
    """

    def parts(base, deltas, p, state) -> list[torch.Tensor]:
        ds = [d.reshape(-1) for d in deltas]
        n = ds[0].numel() if ds else 0
        w, lam = p["weight"], p["lambda"]
        normalize, rescale = is_on(p["normalize"]), is_on(p.get("rescale", 0.0))
        scratch = Scratch()
        kept = []  # per expert: its sparsified (and rescaled) task vector, at unit weight
        for e, d in enumerate(ds):
            spec = _sparse_spec(kind, e, n, p, state)
            if spec[0] == "zero":
                kept.append(torch.zeros_like(d))
                continue
            if spec[0] == "dense":
                kept.append(d)
                continue
            m = torch.empty_like(d)
            _mask(spec, e, d, 0, n, state, scratch, m)
            x = d * m
            if rescale:
                before = state["l1"][e]
                after = torch.linalg.vector_norm(x, 1, dtype=_acc_dtype(x))
                small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
                x.mul_(torch.where(small, torch.ones_like(after), before / after.clamp_min(_RESCALE_EPS)).to(x.dtype))
            kept.append(x)
        if not consensus:
            total = sum(w)
            factor = lam / (total if (normalize and abs(total) >= 1e-8) else 1.0)
            out = kept if factor == 1.0 else [x * factor for x in kept]
        else:
            mixed = torch.zeros_like(ds[0])
            for e, x in enumerate(kept):
                if w[e] != 0.0:
                    mixed.add_(x, alpha=w[e])
            sg = torch.where(mixed >= 0, 1.0, -1.0).to(mixed.dtype)
            agree = [((x * sg) > 0).to(x.dtype) for x in kept]
            if normalize:
                divisor = torch.zeros_like(mixed)
                for e, a in enumerate(agree):
                    if w[e] != 0.0:
                        divisor.add_(a, alpha=w[e])
                divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
                out = [x * a * lam / divisor for x, a in zip(kept, agree)]
            else:
                out = [x * a * lam for x, a in zip(kept, agree)]
        return [x.reshape(d.shape) for x, d in zip(out, deltas)]

    return parts


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
             linear_parts=_make_linear_parts(kind, consensus))(_make_kernel(kind, consensus))


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
