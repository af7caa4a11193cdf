"""DARE's and DELLA's counter-based uniforms (operators/counter.py): the int32 arithmetic a GPU runs gives the int64
numbers the CPU stores, the numbers are uniform and independent across keys, and the compiled formula that
computes them in the kernel (the CUDA policy, run here on the CPU) gives the weights of the stored fields, bitwise."""

from __future__ import annotations

import pytest
import torch

from test_fused import PARAMS

from mergesearch.materializer import Materializer
from mergesearch.operators import counter, fused, registry
from mergesearch.operators.task_arithmetic import _prepare_della, _prepare_random


def test_int32_arithmetic_gives_the_int64_numbers():
    g = torch.Generator().manual_seed(0)
    index = torch.cat([torch.arange(70_000), torch.randint(0, 2 ** 31, (70_000,), generator=g),
                       torch.tensor([2 ** 31 - 1, 2 ** 31 - 2, 2 ** 16, 2 ** 16 - 1])])
    for key in [0, 1, 65_535, 2 ** 31 - 1, *torch.randint(0, 2 ** 31, (5,), generator=g).tolist()]:
        wide = counter.uniform(index, key, wide=True)
        assert torch.equal(counter.uniform(index, key, wide=False), wide), key
        assert torch.equal(counter.uniform(index.int(), torch.tensor(key), wide=False), wide), key
        assert float(wide.min()) >= 0.0 and float(wide.max()) < 1.0
        assert torch.equal(wide, torch.round(wide * 2 ** 16) / 2 ** 16)  # a grid of 2**-16


def test_the_numbers_are_uniform_and_independent_across_keys():
    n = 1 << 20
    a, b = counter.uniform(torch.arange(n), 7), counter.uniform(torch.arange(n), 8)
    for u in (a, b):
        assert abs(float(u.mean()) - 0.5) < 2e-3
        for p in (0.01, 0.3, 0.9, 0.123456):  # a DARE density keeps a fraction p, within 5 standard deviations
            p16 = -(-p * 2 ** 16 // 1) / 2 ** 16  # and 2**-16 (the grid)
            assert abs(float((u < p).float().mean()) - p16) < 5 * (p * (1 - p) / n) ** 0.5
            assert abs(p16 - p) <= 2 ** -16
        counts = torch.histc(u, bins=64, min=0, max=1)
        assert float(((counts - n / 64) ** 2 / (n / 64)).sum()) < 150  # chi-square, 63 degrees of freedom
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / n ** 0.5
    assert abs(float(torch.corrcoef(torch.stack([a[1:], a[:-1]]))[0, 1])) < 5 / n ** 0.5  # neighbours too


def test_the_compiled_hash_is_the_eager_one():
    index, key = torch.arange(50_000), torch.tensor(123_456_789)
    compiled = torch.compile(lambda i, k: counter.uniform(i, k), dynamic=True)
    assert torch.equal(compiled(index, key), counter.uniform(index, key))


@pytest.mark.parametrize("prepare", [_prepare_random, _prepare_della])
def test_prepare_stores_the_hash_of_each_experts_key(prepare):
    base = torch.randn(40, 30)
    deltas = [0.1 * torch.randn(40, 30) for _ in range(3)]
    state = prepare(base, deltas, torch.Generator().manual_seed(3))
    keys = state["key"].tolist()
    assert len(set(keys)) == 3 and all(0 <= k < 2 ** counter.KEY_BITS for k in keys)
    for u, k in zip(state["u"], keys):
        assert u.dtype == torch.int16  # 2 bytes per entry; decoded exactly to the hash's uniforms
        assert torch.equal(counter.stored(u), counter.uniform(torch.arange(1200), k))
        assert torch.equal(counter.stored(u, out=torch.empty(1200)), counter.uniform(torch.arange(1200), k))
    again = prepare(base, deltas, torch.Generator().manual_seed(3))
    assert again["key"].tolist() == keys  # a seed gives the same fields


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_uniforms_computed_in_the_kernel_give_the_stored_fields_weights(method, dtype, tiny_family, monkeypatch):
    """The CUDA policy (bf16 compiled, uniforms hashed in the kernel) on the CPU, chunk by chunk and in one call,
    against the stored fields: the same weights bit for bit."""
    monkeypatch.setitem(registry.COMPILED_DTYPES, "cpu", (torch.float32, torch.bfloat16))
    base, experts = tiny_family("llama", 3)
    values = {k: (v + [0.5] if isinstance(v, list) else v) for k, v in PARAMS[method].items()}
    values["rescale"] = 1.0
    got = {}
    for hashed in (False, True):
        monkeypatch.setattr(registry, "HASHED_DEVICES", {"cuda", "cpu"} if hashed else {"cuda"})
        for grouped in (False, True):
            m = Materializer(base, experts, method, device="cpu", dtype=dtype, chunks=2, seed=3, compiled=True,
                             grouped=grouped)
            assert m.scratch.hashed is hashed
            before = fused.calls.copy()
            m.materialize(m.plan(**values))
            ran = fused.calls - before
            assert any(k[1].startswith("_Hashed") for k in ran) is hashed, ran
            got[hashed, grouped] = {k: v.clone() for k, v in m.state_dict().items()}
    want = got[False, False]
    for key, state in got.items():
        assert all(torch.equal(v, want[k]) for k, v in state.items()), key


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_a_hashed_device_stores_no_uniforms_and_its_eager_kernel_hashes_them(method, tiny_family, monkeypatch):
    """Where the device computes the uniforms (CUDA; here the CPU made one) prepare keeps only the keys, the eager
    kernel (streaming, a dtype the compiled formula does not take) hashes each block's positions, and the weights
    are those of the stored fields bit for bit; the memory estimate counts the state the materialiser holds."""
    from mergesearch import memory

    base, experts = tiny_family("llama", 3)
    values = {k: (v + [0.5] if isinstance(v, list) else v) for k, v in PARAMS[method].items()}
    values["rescale"] = 1.0
    got, held = {}, {}
    for hashed in (False, True):
        monkeypatch.setattr(registry, "HASHED_DEVICES", {"cuda", "cpu"} if hashed else {"cuda"})
        m = Materializer(base, experts, method, device="cpu", dtype="float32", chunks=2, seed=3, compiled=False)
        states = [s for i in range(len(m.tensors)) for s in m.sources(i)[3]]
        assert all(("u" in s) is not hashed and len(s["key"]) == 3 for s in states if "key" in s)
        held[hashed] = sum(v.nbytes for s in states for xs in s.values() if isinstance(xs, list)
                           for v in xs if isinstance(v, torch.Tensor) and v.dim())
        est = memory.estimate(m.tensors, 3, method, "float32", device="cpu")
        assert est.sources - memory.estimate(m.tensors, 3, "task_arithmetic", "float32", device="cpu").sources \
            == held[hashed]
        m.materialize(m.plan(**values))
        got[hashed] = {k: v.clone() for k, v in m.state_dict().items()}
    assert held[False] - held[True] == 2 * 3 * sum(t.numel for t in m.tensors if t.dtype.is_floating_point)
    assert all(torch.equal(v, got[False][k]) for k, v in got[True].items())


@pytest.mark.parametrize("ncols", [1, 2, 7, 4096, 32_769, 70_000])
def test_dellas_row_ranks_are_stored_in_16_bits_and_decoded_exactly(ncols):
    """rank / (ncols - 1) on a grid of 2**-15: 0 and 1 exact at the ends of a row, within half a step elsewhere,
    still distinct up to 32,769 columns; the eager (out=) and the formula's decoding give the same floats."""
    ranks = torch.arange(ncols)
    codes = fused.rank_codes(ranks, ncols)
    assert codes.dtype == torch.int16
    got = fused.row_ranks(codes)
    assert torch.equal(got, fused.row_ranks(codes, out=torch.empty(ncols)))
    want = ranks.double() / max(1, ncols - 1)
    assert float(got[0]) == 0.0 and float(got[-1]) == (1.0 if ncols > 1 else 0.0)
    assert float((got.double() - want).abs().max()) <= 2 ** -16
    assert bool((got[1:] > got[:-1]).all()) is (ncols <= 32_769) or ncols == 1
