"""The task-arithmetic family's compiled formula (operators/fused.py) against its eager block kernel.

The eager kernel is itself checked against mergekit (test_vs_mergekit.py) and against formulas written out
(test_operators.py); here the compiled path must give its weights: float32 within 1e-6, for every method of
the family, every kind of expert (dense, empty, negative weight), chunked, streamed, and on a tensor large
enough that the L1 rescale sums millions of entries in another order than the eager kernel's blocks.
Every test checks that the compiled formula really ran (`fused.calls`): a compiler that silently fell back
to the eager kernel would make the comparisons pass without testing anything.
"""

from __future__ import annotations

import logging

import pytest
import torch

from test_merge import STREAMED

from mergesearch import operators
from mergesearch.materializer import Materializer
from mergesearch.operators import fused, merge_tensor
from mergesearch.operators import registry, task_arithmetic

FAMILY = [n for n in operators.names() if operators.get(n).kernel.__module__ == task_arithmetic.__name__]
PARAMS = {m: v for m, v in STREAMED if m in FAMILY}


def test_the_family_is_every_task_arithmetic_method():
    assert set(FAMILY) == {"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                           "breadcrumbs_ties", "della", "della_linear"}


def _sources(shape, n, seed=0, anti=False):
    """Base and n experts; `anti`: the second expert's task vector nearly cancels the first's, so that many
    entries' sign votes are close to zero (where a rescale factor one ulp off flips the elected sign)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = [0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    if anti and n > 1:
        deltas[1] = -deltas[0] + 1e-3 * torch.randn(shape, generator=g)
    return base, [base + d for d in deltas]


def _params(method, n, **over):
    op = operators.get(method)
    kw = {}
    if "weight" in op.param_names:
        kw["weight"] = [0.7, -0.4, 0.5, 0.3][:n]
    if "density" in op.param_names:
        kw["density"] = 0.4
    if "epsilon" in op.param_names:
        kw["epsilon"] = 0.1
    if "gamma" in op.param_names:
        kw["gamma"] = 0.05
    return {**kw, **over}


def _both(method, base, experts, **kw):
    """(compiled, eager) merges of the same call; asserts that the compiled formula ran."""
    before = sum(fused.calls.values())
    got = merge_tensor(method, base, experts, compiled=True, **kw)
    assert sum(fused.calls.values()) > before, f"{method}: the compiled formula did not run"
    return got, merge_tensor(method, base, experts, compiled=False, **kw)


@pytest.mark.parametrize("method", FAMILY)
def test_compiled_equals_eager_for_every_method(method):
    base, experts = _sources((300, 256), 2)
    for kw in (_params(method, 2), _params(method, 2, rescale=1.0) if "rescale" in operators.get(method).param_names
               else {}):
        got, want = _both(method, base, experts, chunks=3, seed=4, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{method} {kw}")


@pytest.mark.parametrize("method", [m for m in FAMILY if "density" in operators.get(m).param_names])
def test_dense_and_empty_experts_and_zero_weights(method):
    """density 1 (the dense rule: keep all), a near-empty expert (density 0 keeps nothing in mergekit's rules,
    DELLA's epsilon band aside), and one expert at weight 0 beside a live one."""
    base, experts = _sources((128, 600), 2, seed=1)
    op = operators.get(method)
    cases = [_params(method, 2, density=1.0), _params(method, 2, density=[0.0, 0.6])]
    if "epsilon" in op.param_names:
        cases[1]["epsilon"] = 0.0
    if "weight" in op.param_names:
        cases.append(_params(method, 2, weight=[0.0, 0.8]))
    for kw in cases:
        got, want = _both(method, base, experts, seed=2, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{method} {kw}")


@pytest.mark.parametrize("n", [1, 3])
def test_other_expert_counts(n):
    base, experts = _sources((256, 300), n, seed=n)
    for method in ("ties", "dare_ties"):
        got, want = _both(method, base, experts, seed=1, **_params(method, n))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{method} n={n}")


@pytest.mark.parametrize("method", ["dare_ties", "della", "ties"])
def test_a_large_tensor_with_near_zero_votes_elects_the_same_signs(method):
    """4M entries, the two experts' task vectors nearly cancelling: the L1 rescale sums millions of entries in
    one compiled reduction against 32 eager blocks, and many votes sit next to zero. The factors are summed in
    float64 on both paths, so they round to the same float32 value and no elected sign differs (a flipped sign
    would move an entry by ~0.1, not 1e-6)."""
    base, experts = _sources((2048, 2048), 2, seed=7, anti=True)
    kw = _params(method, 2, weight=[0.6, 0.6], rescale=1.0)
    got, want = _both(method, base, experts, seed=3, chunks=2, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_cpu_compiles_bf16_chunks_but_not_fp16():
    """The CPU's policy (registry.COMPILED_DTYPES): bf16 chunks run the compiled formula (faster there than the eager
    kernel for every sparse method since torch 2.13), fp16 ones the eager kernel; the weights as the test below
    checks them against the eager kernel."""
    base, experts = _sources((64, 64), 2)
    for dtype, compiles in ((torch.bfloat16, True), (torch.float16, False)):
        before = sum(fused.calls.values())
        merge_tensor("ties", base.to(dtype), [e.to(dtype) for e in experts], compiled=True, density=0.5)
        assert (sum(fused.calls.values()) > before) is compiles, dtype


@pytest.mark.parametrize("method", FAMILY)
def test_the_cuda_policys_compiled_bf16_gives_the_eager_bf16_weights(method, monkeypatch):
    """CUDA compiles bf16 chunks too: that formula run here on the CPU against the eager bf16 kernel, within two
    bf16 steps of the weight (rtol 2**-6) or 1e-2. The formula rounds to bf16 wherever the eager kernel writes a
    bf16 tensor; without that (inductor's default: float32 intermediates), near-zero votes elect other signs and
    entries move by a whole term (0.3-2.2 here). What remains is the last bit of sums: ATen's vectorised CPU add
    rounds its alpha to bf16 (0.7 -> 0.69921875) where the formula keeps it in float32, which moves a sum of
    three terms by up to two bf16 steps."""
    monkeypatch.setitem(operators.registry.COMPILED_DTYPES, "cpu", (torch.float32, torch.bfloat16))
    base, experts = _sources((256, 512), 3, seed=5)
    base, experts = base.bfloat16(), [e.bfloat16() for e in experts]
    got, want = _both(method, base, experts, seed=2, chunks=2, **_params(method, 3, rescale=1.0)
                      if "rescale" in operators.get(method).param_names else _params(method, 3))
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=1e-2)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della"])
def test_the_cuda_policys_compiled_fp16_gives_the_eager_fp16_weights(method, monkeypatch):
    """CUDA compiles float16 chunks as well, and no other test runs that formula on any device: here on the
    CPU against the eager fp16 kernel, within two fp16 steps (rtol 2**-9) or 1e-3."""
    monkeypatch.setitem(operators.registry.COMPILED_DTYPES, "cpu", (torch.float32, torch.float16))
    base, experts = _sources((256, 512), 3, seed=5)
    base, experts = base.half(), [e.half() for e in experts]
    got, want = _both(method, base, experts, seed=2, chunks=2, **_params(method, 3, rescale=1.0)
                      if "rescale" in operators.get(method).param_names else _params(method, 3))
    assert got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -9, atol=1e-3)


@pytest.mark.parametrize("method, dtype", [("dare_ties", torch.float32), ("dare_ties", torch.bfloat16),
                                           ("della_linear", torch.float32), ("della_linear", torch.bfloat16),
                                           ("ties", torch.bfloat16)])
def test_a_rescaled_chunk_is_one_call_in_every_dtype(method, dtype, monkeypatch):
    """The kept L1 norms, the coefficients and the merge in one compiled call per chunk, also where the mask's
    stored sources take more bytes per entry than a bf16 delta (DARE's float32 uniforms, DELLA's packed int32,
    TIES's int32 ranks): writing the kept entries for a second call to read was slower on a CPU. The eager
    weights (the bf16 ones under the CUDA policy, as above)."""
    monkeypatch.setitem(operators.registry.COMPILED_DTYPES, "cpu", (torch.float32, torch.bfloat16))
    base, experts = _sources((256, 512), 3, seed=4)
    base, experts = base.to(dtype), [e.to(dtype) for e in experts]
    sp = {"dare_ties": "_Random", "della_linear": "_Della", "ties": "_Top"}[method]
    before = fused.calls.copy()
    got, want = _both(method, base, experts, seed=2, chunks=2, **_params(method, 3, rescale=1.0))
    ran = fused.calls - before  # by (what, sparsifier, *flags)
    assert {key[:2] for key in ran} == {("rescaled", sp)}, ran
    tol = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2 ** -6, "atol": 1e-2}
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("method", FAMILY)
def test_the_materialiser_compiled_streamed_and_resident_gives_the_eager_weights(method, tiny_family):
    """Candidate after candidate, with another in between: nothing of one candidate may stick to the next."""
    base, experts = tiny_family("llama", 2)
    values = PARAMS[method]
    got = {}
    for compiled, streaming in ((False, False), (True, False), (True, True)):
        m = Materializer(base, experts, method, device="cpu", chunks=2, seed=3, streaming=streaming,
                         compiled=compiled)
        before = sum(fused.calls.values())
        m.materialize(m.plan(**values))
        assert (sum(fused.calls.values()) > before) is compiled
        first = {k: v.clone() for k, v in m.state_dict().items()}
        m.materialize(m.plan())
        m.materialize(m.plan(**values))
        assert all(torch.equal(first[k], v) for k, v in m.state_dict().items())
        got[compiled, streaming] = first
    eager, resident, streamed = got.values()
    for k in eager:
        assert torch.equal(resident[k], streamed[k]), k  # streaming is exact
        torch.testing.assert_close(resident[k], eager[k], rtol=0, atol=1e-6, msg=k)


def test_the_policy_compiles_float32_chunks_of_large_models_on_cpu_and_cuda(monkeypatch):
    monkeypatch.delenv("MERGESEARCH_FUSED", raising=False)
    big, small = operators.COMPILED_MIN_MODEL["cpu"], operators.COMPILED_MIN_MODEL["cpu"] - 1
    assert operators.compiled_min_entries("cpu", None, big) == operators.COMPILED_MIN_ENTRIES
    assert operators.compiled_min_entries("cpu", None, small) is None  # the compile would cost more
    assert operators.compiled_min_entries("cuda", None, operators.COMPILED_MIN_MODEL["cuda"]) is not None
    assert operators.compiled_min_entries("mps", None, big) is None
    assert operators.compiled_min_entries("cpu", True) == 0
    assert operators.compiled_min_entries("cpu", False, big) is None
    assert operators.compiled_dtypes("cpu") == (torch.float32, torch.bfloat16)
    assert torch.bfloat16 in operators.compiled_dtypes(torch.device("cuda", 1))
    assert operators.compiled_dtypes("mps") == ()
    monkeypatch.setenv("MERGESEARCH_FUSED", "0")
    assert operators.compiled_min_entries("cpu", True, big) is None
    monkeypatch.setenv("MERGESEARCH_FUSED", "1")
    assert operators.compiled_min_entries("cpu", None, 10) == 0
    scratch = operators.Scratch(compiled_min=operators.COMPILED_MIN_ENTRIES)
    x = torch.zeros(operators.COMPILED_MIN_ENTRIES)
    assert scratch.compiled(x) and not scratch.compiled(x[1:]) and scratch.compiled(x.bfloat16())
    assert not scratch.compiled(x.half())  # fp16: eager on the CPU
    assert operators.Scratch(compiled_min=0, compiled_dtypes=operators.compiled_dtypes("cuda")).compiled(x.half())
    # plain task arithmetic: float32 compiled; bf16 on the eager adds of an AVX2 CPU unless forced, compiled with
    # AVX-512; a chunk alone or a group alike (streamed and resident weights are the same)
    monkeypatch.setattr(registry, "wide_cpu", lambda: False)
    assert scratch.compiled(x, plain=True) and not scratch.compiled(x.bfloat16(), plain=True)
    assert scratch.compiled(x.bfloat16()) and not scratch.compiled(x[1:], plain=True)
    assert operators.Scratch(compiled_min=0).compiled(x.bfloat16(), plain=True)
    monkeypatch.setattr(registry, "wide_cpu", lambda: True)
    assert scratch.compiled(x.bfloat16(), plain=True) and not scratch.compiled(x[1:].bfloat16(), plain=True)


@pytest.mark.parametrize("wide", [False, True])
def test_streamed_and_resident_weights_are_the_same_under_the_default_policy(wide, tiny_family, monkeypatch):
    """The policy a large model gets (not forced: `compiled_min_entries` of a model past COMPILED_MIN_MODEL), for the
    methods whose plain chunks the CPU may merge with its eager adds: the streamed model (chunk by chunk) equals the
    resident one (its chunks in one group call) bit for bit, in float32 and bf16, on either CPU vector width."""
    monkeypatch.delenv("MERGESEARCH_FUSED", raising=False)
    monkeypatch.setitem(operators.COMPILED_MIN_MODEL, "cpu", 1)
    monkeypatch.setattr(registry, "COMPILED_MIN_ENTRIES", 1024)  # the tiny model's matrices; its norms stay eager
    monkeypatch.setattr(registry, "wide_cpu", lambda: wide)
    base, experts = tiny_family("llama", 3)
    cases = (("task_arithmetic", {"weight": [0.3, 0.9, -0.4]}), ("linear", {"weight": [0.2, 0.5, 0.3]}),
             ("model_stock", {}))
    for method, values in cases:
        for dtype in ("float32", "bfloat16"):
            got = {}
            for streaming in (False, True):
                m = Materializer(base, experts, method, device="cpu", streaming=streaming, dtype=dtype)
                assert m.scratch.compiled_min is not None and m.grouped is not streaming
                m.materialize(m.plan(**values))
                got[streaming] = {k: v.clone() for k, v in m.state_dict().items()}
            for k, v in got[False].items():
                assert torch.equal(v, got[True][k]), (method, dtype, k)


def test_the_demo_sized_model_merges_eagerly_by_default(tiny_family, monkeypatch):
    monkeypatch.delenv("MERGESEARCH_FUSED", raising=False)
    base, experts = tiny_family("llama", 2)
    assert Materializer(base, experts, "ties", device="cpu").scratch.compiled_min is None


def test_a_compiler_failure_falls_back_to_the_eager_kernel_once_logged(monkeypatch, caplog):
    def broken(*key):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "_BROKEN", set())
    base, experts = _sources((64, 64), 2)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        for _ in range(3):
            got = merge_tensor("dare_ties", base, experts, compiled=True, seed=1, density=0.5)
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: no C++ compiler" in warnings[0].getMessage()
    assert "second line" not in warnings[0].getMessage()
    assert torch.equal(got, merge_tensor("dare_ties", base, experts, compiled=False, seed=1, density=0.5))


def test_out_of_memory_in_the_compiled_formula_is_raised_and_does_not_retire_it(monkeypatch):
    """A merge that runs out of (device) memory is the user's error to see, not a compiler failure: the formula
    must stay available for the next call, which may fit."""
    def oom(*key):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fused, "_compiled", oom)
    monkeypatch.setattr(fused, "_BROKEN", set())
    base, experts = _sources((64, 64), 2)
    with pytest.raises(torch.OutOfMemoryError):
        merge_tensor("ties", base, experts, compiled=True, density=0.5)
    assert fused._BROKEN == set()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "della_linear"])
def test_the_compiled_formulas_own_sum_still_catches_weights_that_overflow(method, tiny_family):
    """The compiled formula returns the sum of what it wrote, and the materialiser's NaN/inf check uses it
    instead of reading the tensor again: an overflow (finite sources, weight 2) must still be refused, by name."""
    from mergesearch.errors import CandidateError

    base, experts = tiny_family("llama", 2)
    m = Materializer(base, experts, method, device="cpu", compiled=True)
    i = next(i for i, t in enumerate(m.tensors) if t.name.endswith("layers.1.mlp.up_proj.weight"))
    for d in m.sources(i)[1]:
        d.view(-1)[:64] = 3e38  # finite, but twice it is not
    params = {"weight": [2.0, 2.0], "density": 1.0} if method != "task_arithmetic" else {"weight": [2.0, 2.0]}
    before = sum(fused.calls.values())
    with pytest.raises(CandidateError, match=r"not finite .*layers\.1\.mlp\.up_proj\.weight"):
        m.materialize(m.plan(**params))
    assert sum(fused.calls.values()) > before


def test_the_fixed_point_l1_norm_is_exact_in_any_order_and_cannot_overflow():
    """The rescale's L1 norms are integers held in float64 (`fused.fixed_l1` at `fused.l1_scale`): the same sum
    whole, by blocks in any order, per row, and below 2**53 even when every entry is the chunk's largest; each entry
    is rounded to within half a unit of the scale."""
    g = torch.Generator().manual_seed(0)
    n = (1 << 20) + 3  # rounds up to 2**21 in the scale's bound
    d = torch.randn(n, generator=g) * 0.02
    scale = fused.l1_scale(d)
    whole = fused.fixed_l1(d.abs(), scale)
    assert whole.dtype == torch.float64 and float(whole) == int(whole)
    pieces = [fused.fixed_l1(d[lo:lo + 4099].abs(), scale) for lo in range(0, n, 4099)]
    assert float(whole) == sum(int(p) for p in reversed(pieces))
    rows = fused.fixed_l1(d[:1 << 20].abs().view(256, -1), scale, dim=1)
    assert int(rows.sum()) == int(fused.fixed_l1(d[:1 << 20].abs(), scale))
    exact = d.double().abs().sum()
    assert abs(float(whole) / scale - float(exact)) <= n * 0.5 / scale
    worst = torch.full((n,), float(d.abs().max()))  # every entry the largest: the bound's case
    total = fused.fixed_l1(worst, scale)
    assert float(total) <= 2 ** 52 and float(total) == n * round(float(worst[0]) * scale)


def test_the_fixed_point_l1_norm_is_the_same_summed_in_int64():
    """AVX-512 CPUs sum the fixed-point entries in int64 (`registry.wide_cpu`), others in float64: the same integers,
    whole and per row, up to the scale's bound."""
    g = torch.Generator().manual_seed(1)
    d = torch.randn(1 << 16, generator=g) * 0.03
    scale = fused.l1_scale(d)
    for a in (d.abs(), torch.full_like(d, float(d.abs().max()))):
        assert torch.equal(fused.fixed_l1(a, scale, integer=True), fused.fixed_l1(a, scale))
        rows = a.view(64, -1)
        assert torch.equal(fused.fixed_l1(rows, scale, dim=1, integer=True), fused.fixed_l1(rows, scale, dim=1))
    assert fused.fixed_l1(d.abs(), scale, integer=True).dtype == torch.float64


@pytest.mark.parametrize("method", ["della", "della_linear", "dare_ties"])
def test_both_cpu_vector_widths_give_the_same_weights(method, monkeypatch):
    """The formulas an AVX-512 CPU runs (int32 sources read as they are, L1 sums in int64) and those of an AVX2 CPU
    (int32 read as float32 bits, sums in float64) give identical weights, both equal to the eager kernel's: CI
    runs on either kind of CPU, and each forced choice is compiled whatever this one is."""
    base, experts = _sources((384, 512), 2, seed=5, anti=True)
    kw = _params(method, 2, weight=[0.6, 0.5], rescale=1.0)
    got = {}
    for wide in (False, True):
        monkeypatch.setattr(registry, "wide_cpu", lambda wide=wide: wide)
        got[wide], want = _both(method, base, experts, seed=6, chunks=2, **kw)
        assert fused.WIDE_CPU is wide
        torch.testing.assert_close(got[wide], want, rtol=0, atol=1e-6)
    assert torch.equal(got[False], got[True])


def test_the_vector_width_is_inductors_and_falls_back_to_avx2s_choices(monkeypatch):
    """`registry.wide_cpu` asks inductor's own ISA pick (a private API); where that fails, the AVX2 choices stand
    (exact everywhere, only slower on an AVX-512 CPU)."""
    from torch._inductor import cpu_vec_isa

    registry.wide_cpu.cache_clear()
    isa = cpu_vec_isa.pick_vec_isa()
    assert registry.wide_cpu() is (bool(isa) and isa.bit_width() >= 512)

    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", broken)
    registry.wide_cpu.cache_clear()
    try:
        assert registry.wide_cpu() is False
    finally:
        registry.wide_cpu.cache_clear()  # asked again, unpatched, by the next caller
