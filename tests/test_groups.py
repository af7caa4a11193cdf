"""A candidate's large chunks merged in one call (mergesearch.groups, operators' `group` contract).

The group path must give exactly the weights of the same compiled formula run chunk by chunk (which
test_fused.py checks against the eager kernel, itself checked against mergekit), for every method of the
task-arithmetic family, with parameters that differ from chunk to chunk, in float32 and under the CUDA policy's
bf16 (run here on the CPU: CI has no GPU). Every test checks which calls ran (`fused.calls`).
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch

from test_fused import FAMILY, PARAMS

from mergesearch import operators
from mergesearch.errors import CandidateError
from mergesearch.groups import MIN_BLOCK, plan_group
from mergesearch.materializer import Materializer
from mergesearch.operators import fused
from mergesearch.plan import Plan


def _varied(m: Materializer, values: dict):
    """A plan whose weights and densities differ by tensor and chunk (and stay inside DELLA's band)."""
    plan = m.plan(**values)
    g = torch.Generator().manual_seed(5)
    for name in ("weight", "density"):
        if name in plan.params:
            p = plan.params[name]
            lo, hi = (0.2, 0.8) if name == "density" else (-0.5, 1.0)
            p.copy_(lo + (hi - lo) * torch.rand(p.shape, generator=g))
    return plan


def _run(m: Materializer, plan) -> tuple[dict, dict]:
    before = fused.calls.copy()
    m.materialize(plan)
    return {k: v.clone() for k, v in m.state_dict().items()}, dict(fused.calls - before)


@pytest.mark.parametrize("method", FAMILY)
def test_one_call_gives_the_chunk_by_chunk_weights(method, tiny_family):
    base, experts = tiny_family("llama", 3)
    values = {k: (v + [0.5] if isinstance(v, list) else v) for k, v in PARAMS[method].items()}
    got = {}
    for grouped in (True, False):
        m = Materializer(base, experts, method, device="cpu", chunks=2, seed=3, compiled=True, grouped=grouped)
        plan = _varied(m, values)
        got[grouped], ran = _run(m, plan)
        groups = {k for k in ran if k[0].startswith("group_")}
        assert bool(groups) is grouped, ran
        if grouped:
            assert sum(ran.values()) == 1, ran  # one call for the candidate
            again, _ = _run(m, m.plan())  # another candidate in between: nothing sticks
            assert not all(torch.equal(again[k], got[True][k]) for k in again)
            assert all(torch.equal(v, _run(m, plan)[0][k]) for k, v in got[True].items())
    for k, v in got[True].items():
        assert torch.equal(v, got[False][k]), k


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della", "dare_linear"])
def test_the_cuda_policys_bf16_group_gives_the_chunk_by_chunk_weights(method, tiny_family, monkeypatch):
    """bf16 under the CUDA policy: one call for the candidate, also where the mask's stored sources take more
    bytes per entry than the delta (DARE's and DELLA's with rescale)."""
    monkeypatch.setitem(operators.registry.COMPILED_DTYPES, "cpu", (torch.float32, torch.bfloat16))
    base, experts = tiny_family("llama", 3)
    values = {k: (v + [0.5] if isinstance(v, list) else v) for k, v in PARAMS[method].items()}
    values = {**values, "rescale": 1.0} if "rescale" in operators.get(method).param_names else values
    got = {}
    for grouped in (True, False):
        m = Materializer(base, experts, method, device="cpu", dtype="bfloat16", chunks=2, seed=3, compiled=True,
                         grouped=grouped)
        got[grouped], ran = _run(m, _varied(m, values))
        if grouped:
            assert sum(ran.values()) == 1 and next(iter(ran))[0].startswith("group_"), ran
    for k, v in got[True].items():
        assert torch.equal(v, got[False][k]), k


def test_the_models_parameters_are_views_of_the_group_and_tied_weights_stay_tied(tiny_family):
    base, experts = tiny_family("gpt2", 2)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    logits = {}
    for grouped in (True, False):
        m = Materializer(base, experts, "ties", device="cpu", compiled=True, grouped=grouped)
        _, ran = _run(m, m.plan(weight=[0.7, 0.4], density=0.5))
        model = m.model
        assert model.lm_head.weight is model.transformer.wte.weight or (
            model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr())
        if grouped:
            out = m._group.buffers["out"]
            inside = [p for p in model.parameters()
                      if out.data_ptr() <= p.data_ptr() < out.data_ptr() + out.numel() * out.element_size()]
            assert len(inside) == len(m._group.members)
        with torch.no_grad():
            logits[grouped] = model(ids).logits
    assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_stock_in_one_call_gives_its_chunk_by_chunk_and_written_out_weights(dtype, tiny_family):
    """model_stock runs task arithmetic's formula at t / N per chunk: in one call the weights of its chunk-by-chunk
    kernel, and within float rounding base + t mean_i(d_i) with t written out from the angles (module docstring)."""
    base, experts = tiny_family("llama", 3)
    got = {}
    for grouped in (True, False):
        m = Materializer(base, experts, "model_stock", device="cpu", chunks=2, compiled=True, grouped=grouped,
                         dtype=dtype)
        got[grouped], ran = _run(m, m.plan())
        assert ran and bool({k for k in ran if k[0].startswith("group_")}) is grouped, ran
    for k, v in got[True].items():
        assert torch.equal(v, got[False][k]), k
    i = next(i for i, t in enumerate(m.tensors) if t.name.endswith("layers.0.mlp.up_proj.weight"))
    b, ds, bounds, _ = m.sources(i)
    lo, hi = bounds[0]
    d = [x[lo:hi].double().flatten() for x in ds]
    pairs = [(a, c) for j, a in enumerate(d) for c in d[j + 1:]]
    cos = sum(float(a @ c / (a.norm() * c.norm())) for a, c in pairs) / len(pairs)
    t = 3 * cos / (1 + 2 * cos)
    want = b[lo:hi].double() + t * sum(x[lo:hi].double() for x in ds) / 3
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[True][m.tensors[i].name][lo:hi].double(), want, rtol=0, atol=tol)


def test_a_candidate_the_group_refuses_is_refused_chunk_by_chunk_by_name(tiny_family):
    """An overflow inside the group is found by the group's own sum, and named."""
    base, experts = tiny_family("llama", 2)
    m = Materializer(base, experts, "ties", device="cpu", compiled=True)
    i = next(i for i, t in enumerate(m.tensors) if t.name.endswith("layers.1.mlp.up_proj.weight"))
    assert i in m._group
    for d in m.sources(i)[1]:
        d.view(-1)[:64] = 3e38
    with pytest.raises(CandidateError, match=r"not finite .*layers\.1\.mlp\.up_proj\.weight"):
        m.materialize(m.plan(weight=[2.0, 2.0], density=1.0))


class _Info:
    def __init__(self, shape):
        self.shape = shape


def test_which_tensors_form_the_group(tiny_family, monkeypatch):
    base, experts = tiny_family("llama", 2)
    m = Materializer(base, experts, "ties", device="cpu", chunks=2, compiled=True)
    assert m._group is not None and len(m._group.members) == len(m.tensors)
    assert all(n % m._group.block == 0 for n in m._group.sizes) and m._group.block >= MIN_BLOCK
    assert Materializer(base, experts, "ties", device="cpu", compiled=False)._group is None  # eager: no group
    assert Materializer(base, experts, "ties", device="cpu", compiled=True, streaming=True)._group is None
    # a method without a group kernel keeps the layout for the plans of state-free ones (task arithmetic)
    other = Materializer(base, experts[:1], "slerp", device="cpu", compiled=True)
    assert other._group is not None
    _, ran = _run(other, other.plan(t=0.3))
    assert ran == {}  # slerp itself: its own kernel, chunk by chunk
    _, ran = _run(other, Plan.full("task_arithmetic", other.tensors, 1, weight=[0.5]))
    assert set(ran) == {("group_merge", "_Dense", False, False)}
    # model_stock runs task arithmetic's group at its per-chunk coefficients; per row (filter_wise) its own kernel
    stock = Materializer(base, experts, "model_stock", device="cpu", compiled=True)
    _, ran = _run(stock, stock.plan())
    assert set(ran) == {("group_merge", "_Dense", False, False)}
    _, ran = _run(stock, stock.plan(filter_wise=1.0))
    assert ran == {}
    monkeypatch.setenv("MERGESEARCH_GROUPED", "0")
    assert Materializer(base, experts, "ties", device="cpu", compiled=True)._group is None
    bounds = [[(0, 3)], [(0, 5)]]
    monkeypatch.delenv("MERGESEARCH_GROUPED")
    assert plan_group([_Info((3, 7)), _Info((5, 7))], bounds, [True, True]) is None  # gcd 7 < MIN_BLOCK
    assert plan_group([_Info((3, 64)), _Info((5, 64))], bounds, [True, True]).block == 64
    assert plan_group([_Info((3, 64)), _Info((5, 64))], bounds, [False, True]).members == [1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_grouped_model_saves_as_the_chunk_by_chunk_one(arch, tiny_family, tmp_path):
    """safetensors refuses views of one buffer: the export copies them out, a tied weight saved once."""
    from safetensors.torch import load_file

    from mergesearch.checkpoints import save_model

    base, experts = tiny_family(arch, 2)
    saved = {}
    for grouped in (True, False):
        m = Materializer(base, experts, "ties", device="cpu", compiled=True, grouped=grouped)
        assert (m._group is not None) is grouped
        m.materialize(m.plan(weight=[0.7, 0.4], density=0.5))
        out = save_model(m.model, tmp_path / f"{arch}-{grouped}", base=m.base, provenance={})
        saved[grouped] = load_file(out / "model.safetensors")
        state = save_model(m.state_dict(), tmp_path / f"{arch}-{grouped}-state", base=m.base, provenance={})
        assert set(load_file(state / "model.safetensors")) >= set(saved[grouped])
    assert set(saved[True]) == set(saved[False])
    assert all(torch.equal(v, saved[False][k]) for k, v in saved[True].items())


def test_linear_is_task_arithmetics_one_call_where_it_is_task_arithmetic(tiny_family):
    """linear with normalize (or weights summing to 1) is task arithmetic at lambda 1 with normalize: it takes
    task arithmetic's one call and gives its weights; W * base (normalize off, W != 1) merges chunk by chunk."""
    from mergesearch.plan import Plan

    base, experts = tiny_family("llama", 3)
    m = Materializer(base, experts, "linear", device="cpu", chunks=2, seed=3, compiled=True)
    w = [0.2, 0.5, 0.9]
    got, ran = _run(m, m.plan(weight=w))
    assert {k for k in ran if k[0].startswith("group_")}, ran
    ta = Plan.full("task_arithmetic", m.tensors, 3, chunks=m.chunks, weight=w, normalize=1.0)
    want, _ = _run(m, ta)  # a method that prepares nothing runs on any materialiser
    assert all(torch.equal(v, want[k]) for k, v in got.items())
    plain, ran = _run(m, m.plan(weight=w, normalize=0.0))
    assert not ran  # W * base: the eager adds
    assert not all(torch.equal(v, got[k]) for k, v in plain.items())


def test_each_formula_compiles_once_for_all_chunks_and_runs(tiny_family, monkeypatch):
    """One graph per compiled formula for a whole study: chunks of 2-d weights and of 1-d norms alike, and a group
    (DELLA in bf16 on the CPU). dynamo had guarded an input view's base, and sizes and strides of the bounds that
    happened to match, and compiled formulas again for chunks they had served (a recompile costs seconds on a
    CPU, more on CUDA; ten graphs for the four formulas this test ran until 2026-12-07)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fused, "_compiled", functools.cache(fused._compiled.__wrapped__))  # graphs of its own
    base, experts = tiny_family("llama", 3)
    values = {k: (v + [0.5] if isinstance(v, list) else v) for k, v in PARAMS["della"].items()}
    before, ran = counters["stats"]["unique_graphs"], collections.Counter()
    for grouped in (False, True):
        m = Materializer(base, experts, "della", device="cpu", dtype="bfloat16", chunks=2, seed=3, compiled=True,
                         grouped=grouped)
        ran.update(_run(m, _varied(m, values))[1])
    assert {k[0] for k in ran} == {"rescaled", "group_rescaled"}, ran
    assert counters["stats"]["unique_graphs"] - before == len(ran), ran
