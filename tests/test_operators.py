"""Contract tests run over EVERY registered merge operator, plus written-out formula checks."""

from __future__ import annotations

import pytest
import torch

from mergesearch import operators
from mergesearch.errors import OperatorError
from mergesearch.operators import chunk_bounds, merge_tensor

NAMES = operators.names()


def _n_experts(op) -> int:
    return op.max_experts if op.max_experts is not None and op.max_experts < 3 else 3


def _sources(shape=(12, 10), n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [e.to(dtype) for e in experts]


def test_registry_has_every_method_of_the_issue():
    want = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
            "della", "slerp", "model_stock"}
    assert want <= set(NAMES)


def test_unknown_method_suggests_the_closest():
    with pytest.raises(OperatorError, match="did you mean 'ties'"):
        operators.get("tie")


def test_unknown_parameter_is_an_operator_error():
    base, experts = _sources()
    with pytest.raises(OperatorError, match="did you mean 'density'"):
        merge_tensor("ties", base, experts, densty=0.5)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_declared_once_and_consistently(name):
    op = operators.get(name)
    names = [p.name for p in op.params]
    assert len(names) == len(set(names))
    for p in op.params:
        assert p.low <= p.default <= p.high, p
        lo, hi = p.search_range
        assert p.low <= lo <= hi <= p.high, p
        assert p.doc and p.kind in ("float", "bool")
        if p.kind == "bool":
            assert (p.low, p.high) == (0.0, 1.0) and p.default in (0.0, 1.0)
    assert op.doc and op.reference.startswith("https://")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_finiteness(name, dtype):
    op = operators.get(name)
    for shape in [(12, 10), (7,), (5, 3)]:
        base, experts = _sources(shape, _n_experts(op), dtype=dtype)
        kw = {"density": 0.5} if "density" in op.param_names else {}
        if "epsilon" in op.param_names:
            kw["epsilon"] = 0.1
        out = merge_tensor(name, base, experts, chunks=2, **kw)
        assert out.shape == base.shape and out.dtype == dtype and out.device == base.device
        assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_every_block_policy_gives_the_same_merge(name, dtype):
    """A chunk of 280K entries merged in the CPU's blocks (128K: three blocks), whole (the CUDA policy)
    and in odd small blocks: float32 within 1e-6; bf16 within one bf16 step of the weight or of a
    rescaled term, the only difference being the order of the float32 sum behind the L1 rescale
    (test_merge.py says why)."""
    op = operators.get(name)
    base, experts = _sources((700, 400), _n_experts(op), dtype=dtype)
    kw = {"density": 0.4} if "density" in op.param_names else {}
    if "epsilon" in op.param_names:
        kw["epsilon"] = 0.1
    outs = [merge_tensor(name, base, experts, seed=2, block=b, **kw).float()
            for b in (operators.block_entries("cpu"), operators.block_entries("cuda"), 4099)]
    rtol, atol = (0, 1e-6) if dtype == torch.float32 else (2 ** -7, 1e-2)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=rtol, atol=atol)


def test_block_policy_is_the_devices():
    assert operators.block_entries("cpu") == operators.BLOCK_ENTRIES["cpu"] < operators.block_entries("cuda")
    assert operators.block_entries(torch.device("cuda", 1)) == operators.BLOCK_ENTRIES["cuda"]
    assert operators.block_entries("cuda") >= 1 << 24  # tens of millions of entries: a chunk whole


@pytest.mark.parametrize("name", NAMES)
def test_experts_equal_to_base_give_the_base(name):
    op = operators.get(name)
    base, _ = _sources()
    experts = [base.clone() for _ in range(_n_experts(op))]
    kw = {"density": 0.5, "epsilon": 0.1} if "epsilon" in op.param_names else (
        {"density": 0.5} if "density" in op.param_names else {})
    torch.testing.assert_close(merge_tensor(name, base, experts, **kw), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_full_weight_on_one_expert_reproduces_it(name):
    op = operators.get(name)
    base, experts = _sources(n=_n_experts(op))
    if "weight" in op.param_names:
        w = [1.0] + [0.0] * (len(experts) - 1)
        out = merge_tensor(name, base, experts, weight=w)  # density defaults to 1: nothing dropped
    elif name == "slerp":
        out = merge_tensor(name, base, experts, t=1.0)
    else:  # model_stock: identical experts -> cos = 1 -> t = 1 -> their average, i.e. the expert
        out = merge_tensor(name, base, [experts[0]] * len(experts))
    torch.testing.assert_close(out, experts[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(name):
    op = operators.get(name)
    base, experts = _sources(n=_n_experts(op))
    kw = {"density": 0.4, "epsilon": 0.1} if "epsilon" in op.param_names else (
        {"density": 0.4} if "density" in op.param_names else {})
    a = merge_tensor(name, base, experts, seed=3, **kw)
    b = merge_tensor(name, base, experts, seed=3, **kw)
    assert torch.equal(a, b)
    if name.startswith(("dare", "della")):
        assert not torch.equal(a, merge_tensor(name, base, experts, seed=4, **kw))


@pytest.mark.parametrize("name", NAMES)
def test_chunks_are_independent_merges_of_torch_chunk_pieces(name):
    """Per-chunk parameters = merging each torch.chunk piece on its own with that chunk's values."""
    op = operators.get(name)
    base, experts = _sources((11, 6), _n_experts(op))
    n = len(experts)
    pieces = len(torch.chunk(base, 3))
    kw, per_chunk = {}, []
    for c in range(pieces):
        vals = {}
        for p in op.params:
            lo, hi = p.search_range
            v = lo + (hi - lo) * (0.3 + 0.2 * c)
            if p.name == "epsilon":
                v = 0.05
            if p.name == "density" and name.startswith(("dare", "della")):
                v = 1.0  # random masks are drawn chunk after chunk; here only the routing is checked
            if p.kind == "bool":
                v = float(c % 2)
            vals[p.name] = [min(p.high, v + 0.01 * e) for e in range(n)] if p.per_expert else v
        per_chunk.append(vals)
    for p in op.params:
        if p.per_expert:
            kw[p.name] = [[per_chunk[c][p.name][e] for c in range(pieces)] for e in range(n)]
        else:
            kw[p.name] = [per_chunk[c][p.name] for c in range(pieces)]
    whole = merge_tensor(name, base, experts, chunks=3, **kw)
    for c, (b, *es) in enumerate(zip(torch.chunk(base, 3), *[torch.chunk(e, 3) for e in experts])):
        ref = merge_tensor(name, b, es, **per_chunk[c])
        torch.testing.assert_close(whole[sum(len(x) for x in torch.chunk(base, 3)[:c]):][: len(b)], ref,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows,chunks", [(5, 4), (10, 3), (1, 8), (64, 8), (7, 7), (3, 1)])
def test_chunk_bounds_match_torch_chunk(rows, chunks):
    want = [len(c) for c in torch.chunk(torch.zeros(rows), chunks)]
    assert [hi - lo for lo, hi in chunk_bounds(rows, chunks)] == want


def test_density_one_ties_with_one_expert_equals_task_arithmetic():
    base, experts = _sources(n=1)
    ties = merge_tensor("ties", base, experts, weight=0.7, density=1.0, normalize=0, **{"lambda": 1.3})
    ta = merge_tensor("task_arithmetic", base, experts, weight=0.7, **{"lambda": 1.3})
    torch.testing.assert_close(ties, ta, rtol=0, atol=1e-6)
    # normalize divides by the kept weight: weight cancels
    ties_n = merge_tensor("ties", base, experts, weight=0.7, density=1.0)
    torch.testing.assert_close(ties_n, experts[0], rtol=0, atol=1e-6)


def test_task_arithmetic_formula():
    base, (a, b) = _sources(n=2)
    out = merge_tensor("task_arithmetic", base, [a, b], weight=[0.3, 0.9], **{"lambda": 0.5})
    torch.testing.assert_close(out, base + 0.5 * (0.3 * (a - base) + 0.9 * (b - base)), rtol=0, atol=1e-6)
    out = merge_tensor("task_arithmetic", base, [a, b], weight=[0.3, 0.9], normalize=1)
    torch.testing.assert_close(out, base + (0.3 * (a - base) + 0.9 * (b - base)) / 1.2, rtol=0, atol=1e-6)


def test_linear_formula_and_zero_weight_sum():
    base, (a, b) = _sources(n=2)
    torch.testing.assert_close(merge_tensor("linear", base, [a, b], weight=[0.5, 1.5]), (0.5 * a + 1.5 * b) / 2,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(merge_tensor("linear", base, [a, b], weight=[0.5, 0.25], normalize=0),
                               0.5 * a + 0.25 * b, rtol=0, atol=1e-6)
    from mergesearch.errors import CandidateError

    with pytest.raises(CandidateError, match="sum to 0"):
        merge_tensor("linear", base, [a, b], weight=[1.0, -1.0])


def test_ties_formula_written_out():
    """TIES by hand: top-k per task vector, elected sign = sign of the weighted sum, mean of agreeing."""
    base, experts = _sources((8, 8), 3, seed=5)
    w, dens = [0.5, 1.0, 0.8], [0.5, 0.3, 0.7]
    ds = []
    for e, d in zip(experts, dens):
        t = (e - base).reshape(-1)
        k = max(1, int(d * t.numel()))
        keep = torch.zeros_like(t)
        keep[t.abs().topk(k).indices] = 1
        ds.append((t * keep).reshape(base.shape))
    wd = torch.stack([wi * d for wi, d in zip(w, ds)])
    sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(wd) == sign).float()
    div = (torch.tensor(w).view(3, 1, 1) * agree).sum(0)
    ref = base + (wd * agree).sum(0) / torch.where(div == 0, torch.ones_like(div), div)
    out = merge_tensor("ties", base, experts, weight=w, density=dens)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_out_of_range_parameter_is_rejected():
    base, experts = _sources()
    with pytest.raises(OperatorError, match="density"):
        merge_tensor("ties", base, experts, density=1.5)


def test_slerp_takes_exactly_one_expert():
    base, experts = _sources(n=2)
    with pytest.raises(OperatorError, match="exactly 1"):
        merge_tensor("slerp", base, experts)


@pytest.mark.parametrize(("density", "epsilon", "bad"), [
    (0.5, 0.1, False), (0.9, 0.2, True), (0.1, 0.1, True), (0.12, 0.119, False), (1.0, 0.3, False), (0.0, 0.3, False),
])
def test_della_rule_is_one_rule_for_kernel_plan_and_space(density, epsilon, bad):
    """The kernel refuses, and Plan.validate rejects, exactly the pairs `della_out_of_range` flags;
    the search space's cap always lands inside it."""
    from mergesearch.checkpoints import TensorInfo
    from mergesearch.errors import CandidateError
    from mergesearch.operators.task_arithmetic import della_epsilon_cap, della_out_of_range
    from mergesearch.plan import Plan

    assert bool(della_out_of_range(density, epsilon)) is bad
    assert bool(della_out_of_range(torch.tensor(density), torch.tensor(epsilon))) is bad
    base, experts = _sources(n=1)
    plan = Plan.full("della", [TensorInfo("w", tuple(base.shape), torch.float32, 0, "mlp_up")], 1, density=density,
                     epsilon=epsilon)
    if bad:
        with pytest.raises(CandidateError, match=r"must stay inside \(0, 1\)"):
            merge_tensor("della", base, experts, density=density, epsilon=epsilon)
        with pytest.raises(OperatorError, match=r"must stay inside \(0, 1\) \(tensor w, expert 0\)"):
            plan.validate()
    else:
        merge_tensor("della", base, experts, density=density, epsilon=epsilon)
        plan.validate()
    capped = della_epsilon_cap(torch.tensor(density), torch.tensor(epsilon))
    assert not bool(della_out_of_range(torch.tensor(density), capped))
    # declared with the methods in the registry, which Plan.validate and the search space read
    ruled = {op.name: [r.params for r in op.rules] for op in operators.all_operators() if op.rules}
    assert ruled == {"della": [("density", "epsilon")], "della_linear": [("density", "epsilon")]}
    assert operators.get("della").rules[0].repair is della_epsilon_cap


def _kernel_params(op, n: int, values: dict) -> dict:
    """A kernel's parameters for n experts: `values` where given, else each parameter's default."""
    from mergesearch.operators.registry import resolve_chunk_params

    return resolve_chunk_params(op, {p.name: [float(values.get(p.name, p.default))] * (n if p.per_expert else 1)
                                     for p in op.params})


# the settings that allocate the most scratch: sparsified (density < 1), rescaled, per-row angles
_SCRATCH_SETTINGS = [{}, {"density": 0.5, "epsilon": 0.1}, {"density": 0.5, "epsilon": 0.1, "rescale": 0.0},
                     {"density": 0.5, "epsilon": 0.1, "rescale": 1.0}, {"filter_wise": 1.0}]


@pytest.mark.parametrize("name", NAMES)
def test_declared_scratch_is_what_the_eager_kernel_holds(name):
    """mergesearch.memory counts a method's Scratch from its declaration (`Operator.scratch_bytes`): the
    eager kernel, over a chunk of several blocks, holds at most that in every setting and exactly that in
    float32 in the largest (1, 3 and 5 experts)."""
    from mergesearch.operators.registry import Scratch

    op = operators.get(name)
    block = 512
    for n in sorted({min(k, op.max_experts or k) for k in (1, 3, 5)} - set(range(op.min_experts))):
        for dtype in (torch.float32, torch.bfloat16):
            base, experts = _sources((16, 100), n=n, dtype=dtype)  # 1,600 entries: 4 blocks
            deltas = [e - base for e in experts]
            declared = op.scratch_bytes(n, base.numel(), block, base.element_size())
            held = []
            for setting in _SCRATCH_SETTINGS:
                params = _kernel_params(op, n, setting)
                scratch = Scratch(block)  # the eager kernel (no compiled formula)
                state = op.prepare(base, deltas, torch.Generator().manual_seed(0)) if op.prepare else {}
                op.kernel(torch.empty_like(base), base, deltas, params, state, scratch)
                held.append(scratch.nbytes)
            assert max(held) <= declared, (n, dtype, held, declared)
            if dtype == torch.float32:
                assert max(held) == declared, (n, held, declared)


@pytest.mark.parametrize("name", [n for n in NAMES if operators.get(n).linear_parts is not None])
def test_linear_parts_are_the_deltas_themselves_exactly_where_declared(name):
    """mergesearch.memory counts no copy of the task vectors for a fit whose parts are the task vectors (at
    lambda 1, as a fit runs): the parts must then be views of the deltas, and elsewhere need not be."""
    op = operators.get(name)
    n = _n_experts(op)
    base, experts = _sources(n=n)
    deltas = [e - base for e in experts]
    params = _kernel_params(op, n, {"lambda": 1.0, "density": 0.5})
    state = op.prepare(base, deltas, torch.Generator().manual_seed(0)) if op.prepare else {}
    parts = op.linear_parts(base, deltas, params, state)
    shared = [p.untyped_storage().data_ptr() == d.untyped_storage().data_ptr() for p, d in zip(parts, deltas)]
    assert all(shared) == op.parts_are_deltas, (name, shared)
