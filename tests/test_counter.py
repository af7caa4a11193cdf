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
    for e, k in enumerate(keys):
        want = counter.uniform(torch.arange(1200), k)
        if "u" in state:
            assert torch.equal(state["u"][e], want)
        else:  # DELLA: uniform and row rank in one int32, decoded exactly by the formula and the eager kernel
            ur = state["ur"][e]
            assert ur.dtype == torch.int32
            assert torch.equal(fused.packed_uniforms(ur) / 2 ** 16, want)
            out, tmp = torch.empty(1200), torch.empty(1200, dtype=torch.int32)
            assert torch.equal(fused.packed_uniforms(ur, out=out, tmp=tmp) / 2 ** 16, want)
            steps = fused.packed_ranks(ur).view(40, 30)
            assert torch.equal(fused.packed_ranks(ur, out=out, tmp=tmp).view(40, 30), steps)
            order = deltas[e].abs().argsort(dim=1, stable=True)
            assert torch.equal(steps.gather(1, order), torch.round(torch.arange(30) / 29 * 2 ** 14).expand(40, 30))
    again = prepare(base, deltas, torch.Generator().manual_seed(3))
    assert again["key"].tolist() == keys  # a seed gives the same fields


# Each case compiles four formulas (~25-40 s on 2 cores): both dtypes for one DARE and one DELLA method, one dtype
# for their linear variants (the hash and the masks are the same code; only the sign election differs).
@pytest.mark.parametrize("method, dtype", [("dare_ties", "float32"), ("dare_ties", "bfloat16"), ("della", "float32"),
                                           ("della", "bfloat16"), ("dare_linear", "bfloat16"),
                                           ("della_linear", "float32")])
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
        assert all(("u" in s or "ur" in s) is not hashed and len(s["key"]) == 3 for s in states if "key" in s)
        held[hashed] = sum(v.nbytes for s in states for xs in s.values() if isinstance(xs, list)
                           for v in xs if isinstance(v, torch.Tensor) and v.dim())
        est = memory.estimate(m.tensors, 3, method, "float32", device="cpu")
        assert est.sources - memory.estimate(m.tensors, 3, "task_arithmetic", "float32", device="cpu").sources \
            == held[hashed]
        m.materialize(m.plan(**values))
        got[hashed] = {k: v.clone() for k, v in m.state_dict().items()}
    saved = {"dare_ties": 4, "della": 2}[method]  # float32 uniforms; DELLA: int32 packed -> int16 ranks
    assert held[False] - held[True] == saved * 3 * sum(t.numel for t in m.tensors if t.dtype.is_floating_point)
    assert all(torch.equal(v, got[False][k]) for k, v in got[True].items())


@pytest.mark.parametrize("ncols", [1, 2, 7, 4096, 16_385, 70_000])
def test_dellas_row_ranks_take_16_bits_and_decode_exactly(ncols):
    """rank / (ncols - 1) on a grid of 2**-14: 0 and 1 exact at the ends of a row, within half a step elsewhere,
    still distinct up to 16,385 columns; packed with a uniform (int32) and alone (int16), read by the formula and
    by the eager kernel (out=), they are the same steps, and so are the uniforms' 16 bits."""
    ranks = torch.arange(ncols)
    steps = fused.rank_steps(ranks, ncols)
    codes, u_bits = fused.rank_codes(steps), torch.randint(0, 2 ** 16, (ncols,))
    u_bits[:2] = torch.tensor([0, 2 ** 16 - 1])[:ncols]  # the ends of the uniform's bits
    packed = fused.pack(u_bits, steps)
    assert codes.dtype == torch.int16 and packed.dtype == torch.int32 and int(packed.min()) >= 0
    got = fused.row_ranks(codes)
    out, tmp = torch.empty(ncols), torch.empty(ncols, dtype=torch.int32)
    assert torch.equal(got, fused.row_ranks(codes, out=out.clone()))
    assert torch.equal(got, fused.packed_ranks(packed)) and torch.equal(got, fused.packed_ranks(packed, out, tmp))
    assert torch.equal(fused.packed_uniforms(packed), u_bits.float())
    assert torch.equal(fused.packed_uniforms(packed, out, tmp), u_bits.float())
    # What the compiled formula is passed (float32 bits, fused.as_bits): finite (no NaN pattern a copy could
    # change), and the same integers once read back, after a copy too.
    bits = fused.as_bits(packed)
    assert bits.dtype == torch.float32 and bool(torch.isfinite(bits).all())
    assert torch.equal(fused.from_bits(bits.clone()), packed)
    got, want = got.double() / 2 ** 14, ranks.double() / max(1, ncols - 1)
    assert float(got[0]) == 0.0 and float(got[-1]) == (1.0 if ncols > 1 else 0.0)
    assert float((got - want).abs().max()) <= 2 ** -15
    assert bool((got[1:] > got[:-1]).all()) is (ncols <= 16_385) or ncols == 1


def test_dellas_rule_in_integer_units_is_the_real_valued_rule():
    """u16 < k (4 slope) + 2**16 offset (float32, as the formula and the eager kernel compute it) keeps exactly the
    entries of u < (k / 2**14) slope + offset computed in float32, u = u16 / 2**16: scaling by powers of two commutes
    with the roundings."""
    g = torch.Generator().manual_seed(0)
    u16 = torch.randint(0, 2 ** 16, (200_000,), generator=g).float()
    k = torch.randint(0, 2 ** 14 + 1, (200_000,), generator=g).float()
    for slope, offset in [(0.2, 0.4), (0.0123, 0.3456), (2 * 0.07, 0.93 - 0.07), (1e-3, 1e-3)]:
        s32, o32 = torch.tensor(slope), torch.tensor(offset)  # the float32 numbers both rules start from
        real = (u16 / 2 ** 16) < (k / 2 ** 14) * s32 + o32
        units = u16 < k * torch.tensor(slope * fused.DELLA_UNITS[0]) + torch.tensor(offset * fused.DELLA_UNITS[1])
        assert torch.equal(units, real), (slope, offset)
