"""TIES's and breadcrumbs' masks (fused._Magnitude, task_arithmetic._below): the rank order lives in host memory
(task_arithmetic.MagnitudeOrder), the entry at each rank bound is looked up there, and the kernels compare every
entry with it. The masks are those of the ranks as defined (|d| descending, then index) bit for bit, ties included
(many in bf16); every path gives the same weights; a GPU keeps no per-entry state for them (test_vs_mergekit.py
checks the weights against mergekit's TIES)."""

from __future__ import annotations

import pytest
import torch

from test_fused import PARAMS

from mergesearch import memory
from mergesearch.errors import OperatorError
from mergesearch.materializer import Materializer
from mergesearch.operators import fused, registry, task_arithmetic
from mergesearch.operators.task_arithmetic import MagnitudeOrder, _below, magnitude_order


def _tied(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A task vector with many equal magnitudes (a few hundred values, both signs): every bound falls in a tie."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-300, 300, (n,), generator=g) * 1e-3).to(dtype)


def _ranks(d: torch.Tensor) -> torch.Tensor:
    """Each entry's rank as defined, without a sort: the entries with a larger |d|, and those with the same |d| and
    a lower index."""
    a = d.abs().float()
    larger = (a[None, :] > a[:, None]).sum(1)
    earlier_tie = ((a[None, :] == a[:, None]) & (torch.arange(len(a))[None, :] < torch.arange(len(a))[:, None])).sum(1)
    return larger + earlier_tie


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_entry_at_a_rank_bound_gives_the_ranks_masks_ties_included(dtype):
    n = 5_000
    d = _tied(n, dtype)
    rank = _ranks(d)
    order = MagnitudeOrder([magnitude_order(d)])
    assert torch.equal(torch.from_numpy(order._orders[0]).long(), torch.argsort(rank))
    a = d.abs()
    g = torch.Generator().manual_seed(1)
    bounds = [0, 1, n - 1, n, *torch.randint(0, n + 1, (40,), generator=g).tolist()]
    lo_hi = [(0, x) for x in bounds] + [tuple(sorted(torch.randint(0, n + 1, (2,), generator=g).tolist()))
                                        for _ in range(40)]
    for lo, hi in lo_hi:
        want = (rank >= lo) & (rank < hi)
        # the compiled formula's arithmetic, run eagerly here: a chunk's 0-d bounds and a group's per-block rows
        lim = torch.tensor(order.bounds(0, lo, hi))
        t = fused.magnitude_thresholds(d, lim)
        got = fused.MAGNITUDE.keep([torch.zeros((), dtype=torch.int64), t], lim, d.float())
        assert torch.equal(got, want), (lo, hi)
        if lo == 0:  # TIES's sparsifier, which tests the upper bound alone
            assert torch.equal(fused.TOP.keep([torch.zeros((), dtype=torch.int64), t], lim, d.float()), want), hi
        blocks = d.float().view(50, 100)
        at = (torch.arange(50) * 100).view(-1, 1)
        assert torch.equal(fused.MAGNITUDE.keep([at, t.expand(50, 2)], lim.expand(50, 4), blocks).reshape(-1),
                           want), (lo, hi)
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


# Each case compiles two formulas (~10-20 s on 2 cores).
@pytest.mark.parametrize("method, dtype", [("ties", "bfloat16"), ("ties", "float32"),
                                           ("breadcrumbs_ties", "bfloat16"), ("breadcrumbs", "float32")])
def test_every_path_gives_the_same_weights(method, dtype, tiny_family, monkeypatch):
    """Compiled chunk by chunk and in one call, eager, streamed, and under the GPU's policy (run on the CPU)."""
    monkeypatch.setitem(registry.COMPILED_DTYPES, "cpu", (torch.float32, torch.bfloat16))
    base, experts = tiny_family("llama", 3)
    got = {}
    paths = {"compiled": {"compiled": True, "grouped": False}, "group": {"compiled": True},
             "eager": {"compiled": False}, "streamed": {"compiled": False, "streaming": True},
             "gpu policy": {"compiled": True}}
    for path, kw in paths.items():
        monkeypatch.setattr(registry, "HASHED_DEVICES", {"cuda", "cpu"} if path == "gpu policy" else {"cuda"})
        m = Materializer(base, experts, method, device="cpu", dtype=dtype, chunks=2, seed=3, **kw)
        before = fused.calls.copy()
        m.materialize(_plan(m, method))
        ran = {k[0] for k in fused.calls - before if k[1] == ("_Top" if method == "ties" else "_Magnitude")}
        assert ran == ({"merge"} if path == "compiled" else {"group_merge"} if kw["compiled"] else set()), (path, ran)
        got[path] = {k: v.clone() for k, v in m.state_dict().items()}
    for path, state in got.items():
        assert all(torch.equal(v, got["eager"][k]) for k, v in state.items()), path


def test_a_chunk_too_large_for_int32_positions_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(task_arithmetic, "MAX_MAGNITUDE_CHUNK", 999)
    with pytest.raises(OperatorError, match=r"^a chunk of 1,000 entries is too large for the magnitude masks "
                                            r"\(at most 999\): split the tensor with chunks: 2 or more$"):
        magnitude_order(torch.ones(1000))


def test_the_order_is_in_host_memory_and_the_estimate_counts_it_there(tiny_family, monkeypatch):
    """The materialiser keeps no per-entry tensor for TIES or breadcrumbs, only the order (4 bytes per entry and
    expert); the estimate counts it among the sources on the CPU (host memory is its memory), and on a GPU (its
    policy run on the CPU) as host memory beside sources equal to task arithmetic's."""
    base, experts = tiny_family("llama", 3)
    for gpu in (False, True):
        monkeypatch.setattr(registry, "HASHED_DEVICES", {"cuda", "cpu"} if gpu else {"cuda"})
        for method in ("ties", "breadcrumbs"):
            m = Materializer(base, experts, method, device="cpu", dtype="bfloat16", chunks=2, compiled=False)
            states = [s for i in range(len(m.tensors)) for s in m.sources(i)[3]]
            assert not [k for s in states for k, v in s.items() if isinstance(v, list)]
            on_host = sum(s["order"].nbytes for s in states)
            n = sum(t.numel for t in m.tensors)
            est = memory.estimate(m.tensors, 3, method, "bfloat16", device="cpu")
            ta = memory.estimate(m.tensors, 3, "task_arithmetic", "bfloat16", device="cpu")
            assert on_host == 4 * 3 * n == est.host_state + est.sources - ta.sources
            assert (est.host_state > 0) is gpu
            line = memory.format_estimate(est.as_dict())[0]
            assert ("host memory for the magnitude ranks' order" in line) is gpu


def test_a_7b_ties_study_with_3_experts_fits_an_80gb_gpu_resident():
    """Llama-2-7B's shapes, 3 experts, bf16, on CUDA: int32 ranks on the device made TIES's sources ~126 GiB (it
    had to stream, until 2026-12-07); with the rank order in host memory they are task arithmetic's, and the host
    holds 4 bytes per entry and expert (~75 GiB)."""
    from test_devices import _llama_tensors

    tensors = _llama_tensors(4096, 11008, 32, 32, 32, 32000)
    n = sum(t.numel for t in tensors)
    gpu80 = 80 * memory.GiB
    for method in ("ties", "breadcrumbs_ties"):
        est = memory.estimate(tensors, 3, method, "bfloat16", device="cuda")
        assert est.sources == memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", device="cuda").sources
        assert memory.fits(est, gpu80) and memory.choose_streaming("auto", est, gpu80)[0] is False
        assert est.host_state == 4 * 3 * n
        cpu = memory.estimate(tensors, 3, method, "bfloat16", device="cpu")  # the order in the CPU's own memory
        assert cpu.host_state == 0 and cpu.sources - est.sources == 4 * 3 * n


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
