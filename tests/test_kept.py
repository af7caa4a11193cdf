"""DARE's kept L1 norms by lookup (task_arithmetic.KeptL1): the lookup gives the fixed-point sums written out here
from the rule (entry kept iff its uniform u < p, p float32), which are the sums of the pass the formula and the
eager kernel made before (and DELLA still makes), bit for bit; a group's joined lookup gives each chunk's; the
rescaled formula reads the looked-up norms, not the deltas; and the table takes its declared size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesearch.operators import counter, fused, registry
from mergesearch.operators.task_arithmetic import (
    TABLE_BYTES,
    KeptL1,
    _kept_table,
    _l1,
    _prepare_random,
    _Random,
    _Rules,
)

# Densities at and around the uniforms' grid (k / 2**16), the ends, a float32 rounding (0.1) and keep-all (2.0).
DENSITIES = [0.0, 2.0 ** -16, 0.1, 0.5 - 2.0 ** -17, 0.5, 0.5 + 2.0 ** -30, 0.73115, 1.0 - 2.0 ** -16, 1.0, 2.0]


def _written_out(d: torch.Tensor, key: int, scale: float, p: float) -> float:
    """The kept L1 norm from its definition: u = counter.uniform of each position under the key, kept iff u < p in
    float32; |d| in float32 times the power-of-two scale, rounded to an integer, summed exactly (Python ints)."""
    u = counter.uniform(torch.arange(d.numel()), key)
    kept = u < torch.tensor(p, dtype=torch.float32)
    ints = torch.round(d.reshape(-1).float().abs() * scale)[kept]
    return sum(int(x) for x in ints.tolist()) / scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_lookup_is_the_kept_l1_written_out(dtype):
    g = torch.Generator().manual_seed(0)
    deltas = [(0.01 * torch.randn(97, 53, generator=g)).to(dtype), torch.randn(97, 53, generator=g).to(dtype),
              torch.zeros(97, 53, dtype=dtype)]  # an all-zero task vector: scale 1, norm 0
    deltas[1][3, :5] = 0.0
    keys = [5, 2 ** 31 - 1, 77]
    scales = _l1(deltas)[1].tolist()
    table = KeptL1.of([_kept_table(d, k, s) for d, k, s in zip(deltas, keys, scales)])
    # hashed the CUDA way (wrapping int32), and read from the uniforms the CPU stores: the same table
    hashed32 = KeptL1.of([_kept_table(d, k, s, wide=False) for d, k, s in zip(deltas, keys, scales)])
    stored = KeptL1.of([_kept_table(d, k, s, counter.field(d.numel(), k, "cpu"))
                        for d, k, s in zip(deltas, keys, scales)])
    for other in (hashed32, stored):
        assert np.array_equal(other.keys, table.keys) and np.array_equal(other.sums, table.sums)
    for p in DENSITIES:
        got = table.lookup([_Random(p).below()] * 3).tolist()
        assert got == [_written_out(d, k, s, p) for d, k, s in zip(deltas, keys, scales)], p
    assert table.lookup([0, 0, 0]).tolist() == [0.0, 0.0, 0.0]
    assert table.lookup([1 << 16] * 3).tolist() == _l1(deltas)[0].tolist()  # every entry: the whole norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lookup_is_the_pass_the_formula_and_the_eager_kernel_sum(dtype):
    """The pass DELLA still makes (fused._kept_l1, the eager kernel's blocks) gives the lookup's numbers for DARE's
    masks, so a looked-up factor is the one a pass would give, bit for bit."""
    g = torch.Generator().manual_seed(1)
    deltas = [(torch.randn(3001, generator=g) * s).to(dtype) for s in (1e-3, 1.0, 30.0)]
    state = _prepare_random(None, deltas, torch.Generator().manual_seed(2))
    assert torch.equal(state["l1"], _l1(deltas))  # the norms prepare takes from the tables: the pass's
    lim = torch.tensor([[0.3], [0.61], [2.0]])
    srcs = [[u] for u in state["u"]]
    summed = fused._kept_l1(fused.RANDOM, deltas, srcs, lim, state["l1"])
    looked_up = state["kept"].lookup([_Random(float(p)).below() for p in lim[:, 0]])
    assert summed.tolist() == looked_up.tolist()
    params = {"weight": (1.0, 0.5, 2.0), "lambda": 1.0, "normalize": 0.0, "rescale": 1.0, "density": (0.3, 0.61, 0.9)}
    rules = _Rules("random", False, 3001, params)
    scratch = registry.Scratch(block=1000)
    with_lookup = rules.rescale_factors(deltas, state, scratch, 1000)
    blocks = rules.rescale_factors(deltas, {k: v for k, v in state.items() if k != "kept"}, scratch, 1000)
    assert {e: float(f) for e, f in with_lookup.items()} == {e: float(f) for e, f in blocks.items()}


def test_a_groups_joined_lookup_gives_each_chunks():
    g = torch.Generator().manual_seed(3)
    tables = []
    for n in (4096, 70_000, 1):  # one chunk larger than the grid: every 16-bit value present
        deltas = [torch.randn(n, generator=g) for _ in range(2)]
        scales = _l1(deltas)[1].tolist()
        tables.append(KeptL1.of([_kept_table(d, 10 + n + e, s) for e, (d, s) in enumerate(zip(deltas, scales))]))
    counts = [[0, 1 << 16], [12_345, 40_000], [65_535, 1]]
    want = [x for t, c in zip(tables, counts) for x in t.lookup(c).tolist()]
    nbytes = sum(t.nbytes for t in tables)
    joined = KeptL1.join(tables)
    assert joined.lookup([c for pair in counts for c in pair]).tolist() == want
    assert joined.nbytes == nbytes - 8 * (len(tables) - 1)  # one leading 0 of the sums
    # the chunks' tables are views of the group's now (one copy in memory), and give the same norms
    assert all(np.shares_memory(t.keys, joined.keys) and np.shares_memory(t.sums, joined.sums) for t in tables)
    assert [x for t, c in zip(tables, counts) for x in t.lookup(c).tolist()] == want
    again = KeptL1.join(tables)  # a group made again from the same chunks (views): the same lookups
    assert again.lookup([c for pair in counts for c in pair]).tolist() == want


def test_the_rescaled_formula_reads_the_looked_up_norms_not_the_deltas():
    """DARE's merge pass is the only one: with the kept norms given (l1's row 2), deltas full of NaN outside the
    kept entries' coefficients cannot reach the factors (a first pass over them would make every factor NaN)."""
    n, n_exp = 64, 2
    ds = [torch.full((n,), float("nan")) for _ in range(n_exp)]
    srcs = [[torch.rand(n)] for _ in range(n_exp)]
    lim = torch.tensor([[0.5], [0.5]])
    l1 = torch.tensor([[4.0, 9.0], [1.0, 1.0], [2.0, 3.0]], dtype=torch.float64)  # norms, scales, kept norms
    nums = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # coefficients, rescaled flags, weights, lambda
    out = fused._rescaled_nums(fused.RANDOM, ds, srcs, lim, l1, nums)
    assert out[:n_exp].tolist() == [2.0, 3.0]  # norm / kept norm
    assert fused.HASHED_RANDOM.looked_up and not fused.DELLA.looked_up


def test_the_table_takes_its_declared_bytes_per_value_present():
    g = torch.Generator().manual_seed(4)
    for n in (10, 5000, 200_000):
        deltas = [torch.randn(n, generator=g) for _ in range(3)]
        state = _prepare_random(None, deltas, torch.Generator().manual_seed(n))
        values = min(n, 1 << 16)
        assert state["kept"].nbytes <= 3 * (TABLE_BYTES * values + 16) + 8
        bits = [counter.bits(torch.arange(n), k) for k in state["key"].tolist()]
        present = sum(len(np.unique(b.numpy())) for b in bits)
        assert state["kept"].nbytes == TABLE_BYTES * present + 8 + 3 * 16


def test_the_memory_estimate_bounds_the_tables_the_materialiser_holds(tiny_family):
    from mergesearch import memory
    from mergesearch.materializer import Materializer

    base, experts = tiny_family("llama", 2)
    for chunks in (1, 3):  # chunk-wise coefficients: a table per chunk
        m = Materializer(base, experts, "dare_ties", device="cpu", dtype="float32", chunks=chunks)
        held = sum(s["kept"].nbytes for i in range(len(m.tensors)) for s in m.sources(i)[3])
        floats = [t for t in m.tensors if t.dtype.is_floating_point]
        for device in ("cpu", "cuda"):
            est = memory.estimate(m.tensors, 2, "dare_ties", "float32", device=device, chunks=chunks)
            assert est.host_state == TABLE_BYTES * 2 * sum(min(t.numel, chunks << 16) for t in floats)
            assert held <= est.host_state + 32 * chunks * len(floats)  # + each table's leading 0, starts, scales
            line = memory.format_estimate(est.as_dict())[0]
            assert f"host memory for the kept-L1 tables {est.host_state / memory.GiB:.2f} GiB" in line
    assert memory.estimate(m.tensors, 2, "della", "float32", device="cpu").host_state == 0


def test_a_studys_chunks_reach_the_estimate():
    from types import SimpleNamespace

    from mergesearch.memory import study_chunks

    def chunking(chunks, max_chunks=8):
        return SimpleNamespace(chunks=chunks, max_chunks=max_chunks)
    assert study_chunks(SimpleNamespace(fit=None, space=chunking(3))) == 3
    assert study_chunks(SimpleNamespace(fit=chunking(4), space=chunking(1))) == 4  # the fit's chunks are merged
    assert study_chunks(SimpleNamespace(fit=None, space=chunking("auto", 6))) == 6
