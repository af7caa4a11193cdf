"""TIES's and breadcrumbs' masks where the device keeps no ranks (CUDA; here the CPU made one): the rank order
lives in host memory (task_arithmetic.MagnitudeOrder), the entry at each rank bound is looked up there, and the
kernels compare every entry with it (fused._Ordered, task_arithmetic._below). The masks, and so the weights, are
those of the ranks bit for bit, ties included (many in bf16), on every path: compiled chunk by chunk and in one
call, eager, streamed, and the fit's linear parts."""

from __future__ import annotations

import pytest
import torch

from test_fused import PARAMS

from mergesearch import memory
from mergesearch.materializer import Materializer
from mergesearch.operators import fused, registry
from mergesearch.operators.registry import Scratch
from mergesearch.operators.task_arithmetic import MagnitudeOrder, _below, magnitude_order, magnitude_rank


def _tied(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A task vector with many equal magnitudes (a few hundred values, both signs): every bound falls in a tie."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-300, 300, (n,), generator=g) * 1e-3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_entry_at_a_rank_bound_gives_the_ranks_masks_ties_included(dtype):
    n = 5_000
    d = _tied(n, dtype)
    rank = magnitude_rank(d)
    assert torch.equal(magnitude_order(d).long(), torch.argsort(rank))
    order = MagnitudeOrder([magnitude_order(d)])
    a = d.abs()
    g = torch.Generator().manual_seed(1)
    bounds = [0, 1, n - 1, n, *torch.randint(0, n + 1, (40,), generator=g).tolist()]
    lo_hi = [(0, x) for x in bounds] + [tuple(sorted(torch.randint(0, n + 1, (2,), generator=g).tolist()))
                                        for _ in range(40)]
    for lo, hi in lo_hi:
        want = (rank >= lo) & (rank < hi)
        # the compiled formula's arithmetic, run eagerly here: a chunk's 0-d bounds and a group's per-block rows
        lim = torch.tensor(order.bounds(0, lo, hi))
        got = fused.ORDERED.keep([torch.zeros((), dtype=torch.int64)], lim, d.float())
        assert torch.equal(got, want), (lo, hi)
        blocks = d.float().view(50, 100)
        at = (torch.arange(50) * 100).view(-1, 1)
        assert torch.equal(fused.ORDERED.keep([at], lim.expand(50, 4), blocks).reshape(-1), want), (lo, hi)
        # the eager kernel's, block by block (rank < hi only: _Band subtracts two of these)
        for start in (0, 1_000, 4_900):
            out = torch.empty(100, dtype=dtype)
            _below(order, 0, hi, d, start, a[start:start + 100], out)
            assert torch.equal(out.bool(), rank[start:start + 100] < hi), (hi, start)


def _plan(m, method):
    values = {k: (v + [0.5] if isinstance(v, list) else v) for k, v in PARAMS[method].items()}
    plan = m.plan(**values)
    # per-chunk densities (chunks: 2): bounds differ by chunk, and one expert keeps all, another none
    plan.params["density"][:] = torch.tensor([[0.3, 1.0], [0.55, 0.0], [0.2, 0.45]])
    return plan


# Each case compiles two formulas per grouping (~15-30 s on 2 cores).
@pytest.mark.parametrize("method, dtype", [("ties", "bfloat16"), ("ties", "float32"),
                                           ("breadcrumbs_ties", "bfloat16"), ("breadcrumbs", "float32")])
def test_the_order_in_host_memory_gives_the_ranks_weights_on_every_path(method, dtype, tiny_family, monkeypatch):
    monkeypatch.setitem(registry.COMPILED_DTYPES, "cpu", (torch.float32, torch.bfloat16))
    base, experts = tiny_family("llama", 3)
    got = {}
    for ordered in (False, True):
        monkeypatch.setattr(registry, "HASHED_DEVICES", {"cuda", "cpu"} if ordered else {"cuda"})
        paths = {"compiled": {"compiled": True, "grouped": False}, "group": {"compiled": True},
                 "eager": {"compiled": False}, "streamed": {"compiled": False, "streaming": True}}
        for path, kw in paths.items():
            m = Materializer(base, experts, method, device="cpu", dtype=dtype, chunks=2, seed=3, **kw)
            states = [s for i in range(len(m.tensors)) for s in m.sources(i)[3]]
            assert all(("order" in s) is ordered and ("rank" in s) is not ordered for s in states), path
            before = fused.calls.copy()
            m.materialize(_plan(m, method))
            ran = {k[1] for k in fused.calls - before}
            assert ran == ({"_Ordered" if ordered else "_Magnitude"} if kw["compiled"] else set()), (path, ran)
            got[ordered, path] = {k: v.clone() for k, v in m.state_dict().items()}
    want = got[False, "eager"]
    for key, state in got.items():
        assert all(torch.equal(v, want[k]) for k, v in state.items()), key


def test_the_fits_linear_parts_read_the_order_as_they_read_the_ranks(tiny_family, monkeypatch):
    from mergesearch.operators import get

    base, experts = tiny_family("llama", 3)
    op = get("ties")
    parts = {}
    for ordered in (False, True):
        monkeypatch.setattr(registry, "HASHED_DEVICES", {"cuda", "cpu"} if ordered else {"cuda"})
        m = Materializer(base, experts, "ties", device="cpu", dtype="bfloat16", chunks=2, compiled=False)
        plan = m.plan(density=[0.3, 0.6, 0.45], weight=[0.8, -0.5, 0.4])
        i = max(range(len(m.tensors)), key=lambda j: m.tensors[j].numel)
        b, ds, bounds, states = m.sources(i)
        lo, hi = bounds[1]
        parts[ordered] = op.linear_parts(b[lo:hi], [d[lo:hi] for d in ds], plan.kernel_params()(i, 1), states[1])
    assert all(torch.equal(x, y) for x, y in zip(parts[False], parts[True]))


def test_a_device_that_keeps_no_ranks_holds_only_the_deltas_and_the_host_the_order(tiny_family, monkeypatch):
    """The memory estimate counts what the materialiser holds: on such a device TIES's sources are task
    arithmetic's, and the host keeps 4 bytes per entry and expert (the order) for TIES and breadcrumbs."""
    base, experts = tiny_family("llama", 3)
    monkeypatch.setattr(registry, "HASHED_DEVICES", {"cuda", "cpu"})
    for method in ("ties", "breadcrumbs"):
        m = Materializer(base, experts, method, device="cpu", dtype="bfloat16", chunks=2, compiled=False)
        states = [s for i in range(len(m.tensors)) for s in m.sources(i)[3]]
        on_device = sum(v.nbytes for s in states for xs in s.values() if isinstance(xs, list) for v in xs)
        on_host = sum(s["order"].nbytes for s in states)
        n = sum(t.numel for t in m.tensors)
        est = memory.estimate(m.tensors, 3, method, "bfloat16", device="cpu")
        ta = memory.estimate(m.tensors, 3, "task_arithmetic", "bfloat16", device="cpu")
        assert on_device == 0 and est.sources == ta.sources
        assert on_host == est.host_state == 4 * 3 * n
        assert "host memory for the magnitude ranks' order" in memory.format_estimate(est.as_dict())[0]


def test_a_7b_ties_study_with_3_experts_fits_an_80gb_gpu_resident():
    """Llama-2-7B's shapes, 3 experts, bf16, on CUDA: the int32 ranks made TIES's sources ~126 GiB (it had to
    stream); with the rank order in host memory they are task arithmetic's, and the host holds 4 bytes per entry
    and expert (~75 GiB)."""
    from test_devices import _llama_tensors

    tensors = _llama_tensors(4096, 11008, 32, 32, 32, 32000)
    n = sum(t.numel for t in tensors)
    gpu80 = 80 * memory.GiB
    for method in ("ties", "breadcrumbs_ties"):
        est = memory.estimate(tensors, 3, method, "bfloat16", device="cuda")
        assert est.sources == memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", device="cuda").sources
        assert memory.fits(est, gpu80) and memory.choose_streaming("auto", est, gpu80)[0] is False
        assert est.host_state == 4 * 3 * n
        cpu = memory.estimate(tensors, 3, method, "bfloat16", device="cpu")  # the CPU keeps its ranks
        assert cpu.host_state == 0 and cpu.sources - est.sources == 4 * 3 * n


def test_scratch_buffers_of_the_eager_ordered_masks_are_declared():
    """On such a device the eager masks use the blocks the rank masks declare (|d| shares the rescale's)."""
    from test_operators import _kernel_params, _sources

    from mergesearch import operators

    for name in ("ties", "breadcrumbs_ties", "breadcrumbs"):
        op = operators.get(name)
        base, ex = _sources((16, 100), n=3)
        deltas = [e - base for e in ex]
        declared = op.scratch_bytes(3, base.numel(), 512, 4)
        for setting in ({"density": 0.5}, {"density": 0.5, "gamma": 0.05, "rescale": 1.0}):
            scratch = Scratch(512, hashed=True)
            state = {"order": MagnitudeOrder([magnitude_order(d) for d in deltas]),
                     **{k: v for k, v in op.prepare(base, deltas, torch.Generator()).items() if k == "l1"}}
            out = torch.empty_like(base)
            op.kernel(out, base, deltas, _kernel_params(op, 3, setting), state, scratch)
            assert scratch.nbytes <= declared, (name, setting)
            ranked = torch.empty_like(base)
            op.kernel(ranked, base, deltas, _kernel_params(op, 3, setting),
                      op.prepare(base, deltas, torch.Generator()), Scratch(512))
            assert torch.equal(out, ranked), (name, setting)


def test_a_host_too_small_for_the_order_is_warned_about():
    from test_devices import _llama_tensors

    tensors = _llama_tensors(4096, 11008, 32, 32, 32, 32000)
    est = memory.estimate(tensors, 3, "ties", "bfloat16", device="cuda")
    warning = memory.host_shortfall(est, "ties", free=64 * memory.GiB)
    assert warning.startswith("ties keeps its magnitude ranks' order in host memory on cuda: 75.3 GiB")
    assert "64.0 GiB available" in warning
    assert memory.host_shortfall(est, "ties", free=128 * memory.GiB) is None
    ta = memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", device="cuda")
    assert memory.host_shortfall(ta, "task_arithmetic", free=1) is None
