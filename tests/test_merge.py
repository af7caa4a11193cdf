"""The materialiser, the Plan, both recipe formats and the `merge` command."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergesearch.cli import main
from mergesearch.errors import CandidateError, CheckpointError, ConfigError, MergeSearchError, OperatorError
from mergesearch.materializer import Materializer, materialize_recipe
from mergesearch.plan import Plan
from mergesearch.recipe import load_recipe, plan_to_mergekit, plan_to_recipe, recipe_from_dict, write_recipe


def _weights(path):
    return load_file(path / "model.safetensors")


# --- materialiser --------------------------------------------------------------------------------


def test_candidates_are_written_in_place_into_one_model(tiny_family):
    base, experts = tiny_family("llama", 2)
    m = Materializer(base, experts, "task_arithmetic", device="cpu")
    model = m.model
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    b, e0, e1 = _weights(base), _weights(experts[0]), _weights(experts[1])
    for w in ([0.3, 0.7], [1.0, 0.0]):
        out = m.materialize(m.plan(weight=w))
        assert out is model
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
        sd = m.state_dict()
        for name in b:
            ref = b[name] + w[0] * (e0[name] - b[name]) + w[1] * (e1[name] - b[name])
            torch.testing.assert_close(sd[name], ref, rtol=0, atol=1e-6)
    assert [t.name for t in m.tensors] == list(b)
    assert m.expert_names == [p.name for p in experts] and m.num_layers == 2


def test_weighted_sum_plan_is_an_expert_alone_or_the_written_out_sum_whatever_the_method(tiny_family):
    """Plan.weighted_sum (baselines, distill teachers) means base + sum_e w_e (expert_e - base) on a materialiser
    built for another method too; one-hot weights give an expert's own weights."""
    base, experts = tiny_family("llama", 2)
    m = Materializer(base, experts, "ties", device="cpu", chunks=2)
    b, e0, e1 = _weights(base), _weights(experts[0]), _weights(experts[1])
    m.materialize(Plan.weighted_sum(m.tensors, [0.0, 1.0], chunks=m.chunks))
    for name, want in e1.items():
        torch.testing.assert_close(m.state_dict()[name], want, rtol=0, atol=1e-6)
    m.materialize(Plan.weighted_sum(m.tensors, [0.4, -0.3], chunks=m.chunks))
    for name in b:
        ref = b[name] + 0.4 * (e0[name] - b[name]) - 0.3 * (e1[name] - b[name])
        torch.testing.assert_close(m.state_dict()[name], ref, rtol=0, atol=1e-6)


def test_per_layer_and_per_chunk_values_land_on_the_right_rows(tiny_family):
    base, experts = tiny_family("llama", 1)
    m = Materializer(base, experts, "task_arithmetic", device="cpu", chunks=3)
    plan = m.plan(weight=0.0)
    i = [t.name for t in m.tensors].index("model.layers.1.mlp.down_proj.weight")
    plan.params["weight"][i, 0, :3] = torch.tensor([0.25, 0.5, 1.0])
    m.materialize(plan)
    b, e = _weights(base), _weights(experts[0])
    name = m.tensors[i].name
    ref = torch.cat([bc + w * (ec - bc) for bc, ec, w in
                     zip(torch.chunk(b[name], 3), torch.chunk(e[name], 3), [0.25, 0.5, 1.0])])
    torch.testing.assert_close(m.state_dict()[name], ref, rtol=0, atol=1e-6)
    other = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(m.state_dict()[other], b[other])


def test_gpt2_tied_weights_written_once(tiny_family):
    base, experts = tiny_family("gpt2", 2)
    m = Materializer(base, experts, "linear", device="cpu")
    m.materialize(m.plan(weight=[0.5, 0.5]))
    model = m.model
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    e0, e1 = _weights(experts[0]), _weights(experts[1])
    ref = (e0["transformer.wte.weight"] + e1["transformer.wte.weight"]) / 2
    torch.testing.assert_close(model.lm_head.weight.data, ref, rtol=0, atol=1e-6)


def test_bf16_and_streaming(tiny_family):
    base, experts = tiny_family("qwen2", 2)
    m = Materializer(base, experts, "ties", device="cpu", dtype="bfloat16", streaming=True)
    m.materialize(m.plan(weight=[0.5, 0.5], density=0.5))
    assert all(p.dtype == torch.bfloat16 for p in m.model.parameters())
    ref = Materializer(base, experts, "ties", device="cpu", dtype="float32")
    ref.materialize(ref.plan(weight=[0.5, 0.5], density=0.5))
    b, es = _weights(base), [_weights(e) for e in experts]
    off = total = 0
    for name, t in m.state_dict().items():
        # Each source is rounded to bf16 (half a step of its magnitude), and so are the delta and the result: one
        # bf16 step (2^-7) of |base| + sum |expert| bounds every entry whose keep decisions match fp32's.
        tol = 2**-7 * (b[name].abs() + sum(e[name].abs() for e in es))
        off += int(((t.float() - ref.state_dict()[name]).abs() > tol).sum())
        total += t.numel()
    # bf16 rounding moves a few top-k thresholds (ties in |d|): 32 of 25120 entries here. An entry wrongly
    # dropped or kept is off by about half its delta, far outside the bound.
    assert off <= 0.005 * total, (off, total)


# One candidate per registered method (tests/test_gpu.py reads this list too: every method on every path).
STREAMED = [("linear", {"weight": [0.2, 0.8]}), ("task_arithmetic", {"weight": [0.3, 0.9]}),
            ("ties", {"weight": [0.5, 0.5], "density": 0.4}), ("dare_linear", {"weight": [0.6, 0.7], "density": 0.3}),
            ("dare_ties", {"weight": [0.6, 0.4], "density": 0.5}),
            ("breadcrumbs", {"density": 0.7, "gamma": 0.05}), ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}),
            ("della", {"density": 0.5, "epsilon": 0.1}),
            ("della_linear", {"weight": [0.9, -0.3], "density": 0.4, "epsilon": 0.2}),
            ("slerp", {"t": 0.3}), ("model_stock", {"filter_wise": 1.0})]


def test_every_method_is_covered_by_the_path_tests():
    from mergesearch import operators

    assert {m for m, _ in STREAMED} == set(operators.names())


@pytest.mark.parametrize("method, values", STREAMED, ids=[m for m, _ in STREAMED])
def test_streaming_matches_resident_sources_on_cpu(method, values, tiny_family):
    """streaming=True keeps the sources (and precomputed states) in host memory, apart from the model, and
    hands each tensor's to the kernel when it is merged: on the CPU too, with the same weights."""
    n = 1 if method == "slerp" else 2
    base, experts = tiny_family("llama", n)
    got = {}
    for streaming in (False, True):
        m = Materializer(base, experts, method, device="cpu", chunks=2, seed=3, streaming=streaming)
        assert m.streaming is streaming
        plan = m.plan(**values)
        m.materialize(plan)
        first = {k: v.clone() for k, v in m.state_dict().items()}
        m.materialize(m.plan())  # another candidate in between: nothing of the first may stick
        m.materialize(plan)
        assert all(torch.equal(first[k], v) for k, v in m.state_dict().items())
        got[streaming] = first
        targets = {v.data_ptr() for v in m.state_dict().values()}
        sources = [m.sources(i)[0] for i in range(len(m.tensors))]
        assert not any(b.data_ptr() in targets for b in sources)  # sources apart from the model
    assert all(torch.equal(got[False][k], got[True][k]) for k in got[False])


@pytest.mark.parametrize("method, values", STREAMED, ids=[m for m, _ in STREAMED])
def test_streaming_through_page_locked_slabs_matches_resident_sources(method, values, tiny_family, monkeypatch):
    """Streaming to a GPU copies every source (base, task vectors, precomputed state) into page-locked slabs
    as soon as it exists (mergesearch.pinned: torch pins each tensor in a power-of-two allocation). The same
    code on the CPU, with plain memory standing in for pinned and small slabs, so that tensors share slabs and
    the largest get allocations of their own: every source lies in the arena's memory and the weights are the
    resident sources' weights."""
    from mergesearch import materializer, pinned

    allocated = []

    def plain(n: int) -> torch.Tensor:
        allocated.append(torch.empty(n, dtype=torch.uint8))
        return allocated[-1]

    monkeypatch.setattr(materializer, "_pins", lambda device: True)
    monkeypatch.setattr(pinned, "_pinned_bytes", plain)
    monkeypatch.setattr(pinned, "SLAB_BYTES", 4 << 10)
    base, experts = tiny_family("llama", 1 if method == "slerp" else 2)
    got = {}
    for streaming in (False, True):
        m = Materializer(base, experts, method, device="cpu", chunks=2, seed=3, streaming=streaming)
        m.materialize(m.plan(**values))
        got[streaming] = {k: v.clone() for k, v in m.state_dict().items()}
    assert all(torch.equal(got[False][k], got[True][k]) for k in got[False])
    slabs = [a for a in allocated if a.numel() == 4 << 10]
    assert 1 < len(slabs) < len(allocated)  # tensors share slabs; the largest have their own memory
    spans = [(a.data_ptr(), a.data_ptr() + a.numel()) for a in allocated]

    def inside(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi for lo, hi in spans)

    sources = [t for i in range(len(m.tensors)) for t in (m.sources(i)[0], *m.sources(i)[1])]
    states = [t for per_chunk in m._state for st in per_chunk for t in _tensors_of(st)]
    assert sources and all(inside(t) for t in sources + states)
    spans = sorted({(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in sources + states})
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two share a byte
    assert all((t.data_ptr() - s.data_ptr()) % pinned.ALIGN == 0 for t in sources + states for s in slabs
               if s.data_ptr() <= t.data_ptr() < s.data_ptr() + s.numel())


def _tensors_of(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    items = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return [t for v in items for t in _tensors_of(v)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method, values", STREAMED, ids=[m for m, _ in STREAMED])
def test_the_gpu_block_policy_gives_the_cpu_weights(method, values, dtype, tiny_family):
    """The CUDA branch's arithmetic (chunks processed whole: operators.block_entries("cuda")) run here on
    the CPU, against blocks far smaller than the tensors (many blocks per chunk), streaming and not.

    float32: within 1e-6. bfloat16: within one bf16 step of the weight (2**-7 relative) or of a rescaled
    task-vector term (under 1e-2 here): the two policies differ only in the order of the float32 sum
    behind the L1 rescale, and a last-bit change of that factor, rounded to bf16, moves a term by one
    bf16 step."""
    from mergesearch import operators

    n = 1 if method == "slerp" else 2
    base, experts = tiny_family("llama", n)
    got = {}
    for block, streaming in ((257, False), (operators.block_entries("cuda"), False),
                             (operators.block_entries("cuda"), True)):
        m = Materializer(base, experts, method, device="cpu", chunks=2, seed=3, streaming=streaming, dtype=dtype,
                         block=block)
        assert m.scratch.block == block
        m.materialize(m.plan(**values))
        got[block, streaming] = {k: v.float().clone() for k, v in m.state_dict().items()}
    small, whole, streamed = got.values()
    for k in small:
        assert torch.equal(whole[k], streamed[k]), k  # streaming is exact
        if dtype == "float32":
            torch.testing.assert_close(whole[k], small[k], rtol=0, atol=1e-6, msg=k)
        else:
            torch.testing.assert_close(whole[k], small[k], rtol=2 ** -7, atol=1e-2, msg=k)
    assert operators.block_entries("cpu") == Materializer(base, experts, method, device="cpu").scratch.block


def test_dare_same_seed_same_weights(tiny_family):
    base, experts = tiny_family("llama", 2)
    runs = []
    for seed in (7, 7, 8):
        m = Materializer(base, experts, "dare_ties", device="cpu", seed=seed)
        plan = m.plan(weight=[0.5, 0.5], density=0.3)
        m.materialize(plan)
        first = {k: v.clone() for k, v in m.state_dict().items()}
        m.materialize(plan)  # the same candidate twice on one materialiser
        assert all(torch.equal(first[k], v) for k, v in m.state_dict().items())
        runs.append(first)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_nan_candidate_is_a_candidate_error(tiny_family, tmp_path):
    base, experts = tiny_family("llama", 2)
    w = _weights(experts[1])
    w["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(w, experts[1] / "model.safetensors", metadata={"format": "pt"})
    m = Materializer(base, experts, "task_arithmetic", device="cpu")
    m.materialize(m.plan(weight=[1.0, 0.0]))  # the NaN expert has weight 0: fine
    with pytest.raises(CandidateError, match="up_proj"):
        m.materialize(m.plan(weight=[0.5, 0.5]))


def test_merge_common_vocab_keeps_the_base_rows(tiny_family, tmp_path):
    import shutil

    base, experts = tiny_family("llama", 1)
    big = tmp_path / "big-vocab-expert"
    shutil.copytree(experts[0], big)
    w = _weights(experts[0])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w[name] = torch.cat([w[name], torch.randn(4, w[name].shape[1])])
    save_file(w, big / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((big / "config.json").read_text())
    cfg["vocab_size"] = 104
    (big / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="merge_common_vocab"):
        Materializer(base, [big], "task_arithmetic", device="cpu")
    m = Materializer(base, [big], "task_arithmetic", device="cpu", merge_common_vocab=True)
    m.materialize(m.plan(weight=0.5))
    b = _weights(base)["model.embed_tokens.weight"]
    ref = b + 0.5 * (w["model.embed_tokens.weight"][:100] - b)
    torch.testing.assert_close(m.state_dict()["model.embed_tokens.weight"], ref, rtol=0, atol=1e-6)


def test_plan_checks(tiny_family):
    base, experts = tiny_family("llama", 2)
    m = Materializer(base, experts, "ties", device="cpu")
    plan = m.plan(density=0.5)
    plan.params["density"][3, 1, 0] = 1.5
    with pytest.raises(OperatorError, match=r"density=1.5 .*outside its range \[0, 1\]"):
        m.materialize(plan)
    with pytest.raises(OperatorError, match="prepared for 'ties'"):
        m.materialize(Plan.full("dare_ties", m.tensors, 2))  # needs random fields this one lacks
    # a state-free method (a study's baseline) runs on any materialiser
    m.materialize(Plan.full("task_arithmetic", m.tensors, 2, weight=[1.0, 0.0]))
    e0 = _weights(experts[0])
    torch.testing.assert_close(m.state_dict()["lm_head.weight"], e0["lm_head.weight"], rtol=0, atol=1e-6)
    # methods with the same precomputation share a materialiser
    shared = Plan.full("breadcrumbs", m.tensors, 2, density=0.6, gamma=0.1)
    m.materialize(shared)
    own = Materializer(base, experts, "breadcrumbs", device="cpu")
    own.materialize(shared)
    assert all(torch.equal(v, own.state_dict()[k]) for k, v in m.state_dict().items())
    della = Plan.full("della", m.tensors, 2, density=0.9, epsilon=0.2)
    with pytest.raises(OperatorError, match="epsilon"):
        della.validate()


# --- recipes -------------------------------------------------------------------------------------


def _ours(base, experts, **kw):
    data = {"method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]}
    data.update(kw)
    return data


def test_our_grammar_scalar_layers_chunks_kinds_and_names(tiny_family):
    base, experts = tiny_family("llama", 2, layers=3)
    m = Materializer(base, experts, "task_arithmetic", device="cpu", chunks=2)
    data = _ours(base, experts, chunks=2)
    data["models"][0]["parameters"]["weight"] = [0.1, 0.2, 0.3]
    data["models"][1]["parameters"]["weight"] = {
        "default": [[0.1, 0.15], [0.2, 0.25], [0.3, 0.35]],
        "attn_q": 0.9,
        "model.layers.1.mlp.up_proj.weight": [0.6, 0.7],
    }
    data["parameters"] = {"lambda": 1.5}
    plan = recipe_from_dict(data).to_plan(m.tensors, m.num_layers)
    names = [t.name for t in m.tensors]
    w = plan.params["weight"]

    def at(name, e):
        i = names.index(name)
        return [round(x, 6) for x in w[i, e, : plan.chunks[i]].tolist()]

    assert at("model.layers.2.mlp.down_proj.weight", 0) == [0.3, 0.3]
    assert at("model.embed_tokens.weight", 0) == [0.1, 0.1]  # embeddings: layer 0's entry
    assert at("lm_head.weight", 0) == [0.3, 0.3]  # after the layers: the last layer's entry
    assert at("model.norm.weight", 1) == [0.3, 0.35]
    assert at("model.layers.0.self_attn.q_proj.weight", 1) == [0.9, 0.9]
    assert at("model.layers.1.mlp.up_proj.weight", 1) == [0.6, 0.7]
    assert at("model.layers.1.mlp.down_proj.weight", 1) == [0.2, 0.25]
    assert torch.all(plan.params["lambda"] == 1.5)


@pytest.mark.parametrize("bad,match", [
    ({"method": "tie"}, "did you mean 'ties'"),
    ({"parameters": {"lambda": 9.0}}, r"lambda=9 .*outside its range"),
    ({"parameters": {"weight": [0.1, 0.2, 0.3]}}, r"one value per layer \(2\), got 3"),
    ({"parameters": {"wieght": 0.1}}, "did you mean 'weight'"),
    ({"parameters": {"weight": {"attn": 0.1}}}, "unknown key 'attn'"),
    ({"chunk": 2}, "did you mean 'chunks'"),
])
def test_recipe_errors_are_one_line_user_errors(tiny_family, bad, match):
    base, experts = tiny_family("llama", 2)
    data = _ours(base, experts)
    data.update(bad)
    with pytest.raises(MergeSearchError, match=match):
        recipe_from_dict(data).to_plan(Materializer(base, experts, "task_arithmetic", device="cpu").tensors, 2)


def test_method_level_parameter_under_a_model_is_rejected(tiny_family):
    base, experts = tiny_family("llama", 1)
    data = _ours(base, experts)
    data["models"][0]["parameters"]["lambda"] = 2.0
    m = Materializer(base, experts, "task_arithmetic", device="cpu")
    with pytest.raises(ConfigError, match="method-level"):
        recipe_from_dict(data).to_plan(m.tensors, m.num_layers)


def _random_plan(m: Materializer, rng: random.Random, style: str) -> Plan:
    plan = m.plan()
    op = m.op
    for p in op.params:
        v = plan.params[p.name]
        lo, hi = p.search_range
        draw = (lambda: float(rng.random() > 0.5)) if p.kind == "bool" else (lambda: rng.uniform(lo, hi))
        if style == "per_tensor_chunk":
            for idx in range(v.numel()):
                v.view(-1)[idx] = draw()
        elif style == "per_layer":
            vals = {(layer, e): draw() for layer in range(m.num_layers) for e in range(v.shape[1])}
            for i, t in enumerate(m.tensors):
                layer = t.layer if t.layer is not None else (0 if t.kind == "embed" else m.num_layers - 1)
                for e in range(v.shape[1]):
                    v[i, e, :] = vals[(layer, e)]
    return plan.canonical()


@pytest.mark.parametrize("style", ["per_layer", "per_tensor_chunk"])
@pytest.mark.parametrize("method", ["ties", "della", "slerp", "linear"])
def test_our_recipe_round_trips_exactly(tiny_family, tmp_path, method, style):
    base, experts = tiny_family("llama", 1 if method == "slerp" else 2, layers=3)
    chunks = 3 if style == "per_tensor_chunk" else 1
    m = Materializer(base, experts, method, device="cpu", chunks=chunks)
    plan = _random_plan(m, random.Random(0), style)
    if method == "della":
        plan.params["epsilon"].clamp_(max=0.05)
        plan.params["density"].clamp_(0.1, 0.9)
    recipe = plan_to_recipe(plan, m.tensors, m.num_layers, base_model=base, models=experts, chunks=chunks)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    back = load_recipe(path)
    assert back.to_plan(m.tensors, m.num_layers).same_as(plan)
    if style == "per_layer":  # written compactly: per-layer lists, not one key per tensor
        assert len(path.read_text()) < 3000


def test_mergekit_writer_round_trips_and_refuses_chunks(tiny_family):
    base, experts = tiny_family("llama", 2, layers=3)
    m = Materializer(base, experts, "ties", device="cpu")
    plan = _random_plan(m, random.Random(1), "per_layer")
    data = plan_to_mergekit(plan, m.tensors, m.num_layers, base_model=base, models=experts)
    assert data["merge_method"] == "ties"
    assert recipe_from_dict(data).to_plan(m.tensors, m.num_layers).same_as(plan)
    chunked = Materializer(base, experts, "ties", device="cpu", chunks=2)
    with pytest.raises(OperatorError, match="per-chunk"):
        plan_to_mergekit(_random_plan(chunked, random.Random(2), "per_tensor_chunk"), chunked.tensors,
                         chunked.num_layers, base_model=base, models=experts)


def test_mergekit_gradient_interpolation(tiny_family):
    base, experts = tiny_family("llama", 1, layers=3)
    data = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(experts[0]), "parameters": {"weight": [0.0, 1.0]}}]}
    m = Materializer(base, experts, "task_arithmetic", device="cpu")
    plan = recipe_from_dict(data).to_plan(m.tensors, m.num_layers)
    w = {t.name: float(plan.params["weight"][i, 0, 0]) for i, t in enumerate(m.tensors)}
    assert w["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert w["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.5)
    assert w["model.layers.2.mlp.up_proj.weight"] == 1.0
    assert w["lm_head.weight"] == 0.0 and w["model.embed_tokens.weight"] == 0.0  # mergekit: t = 0 outside layers


def test_mergekit_missing_weight_and_unsupported_slices(tiny_family):
    base, experts = tiny_family("llama", 1)
    m = Materializer(base, experts, "task_arithmetic", device="cpu")
    data = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(experts[0])}]}
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        recipe_from_dict(data).to_plan(m.tensors, m.num_layers)
    with pytest.raises(ConfigError, match="slices"):
        recipe_from_dict({"merge_method": "linear", "slices": [{"sources": []}]})


# --- the merge command ---------------------------------------------------------------------------


def test_merge_command_end_to_end(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, experts = tiny_family("llama", 2)
    data = {"method": "ties", "base_model": "llama-base",
            "models": [{"model": f"llama-expert{i}", "parameters": {"weight": 0.5, "density": [0.3, 0.6]}}
                       for i in range(2)],
            "parameters": {"lambda": 1.2}}
    recipe = tmp_path / "recipe.yaml"  # model paths relative to the recipe file
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["recipe"]["method"] == "ties" and prov["base"]["config_sha256"]
    ref = materialize_recipe(recipe, device="cpu").state_dict()
    for n, p in model.state_dict().items():
        torch.testing.assert_close(p, ref[n], rtol=0, atol=0)
    assert main(["merge", str(recipe), "--out", str(out)]) == 2  # exists, no --force
    assert main(["merge", str(recipe), "--out", str(out), "--force", "--dtype", "bfloat16"]) == 0
    saved = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert saved and all(v.dtype == torch.bfloat16 for v in saved.values() if v.is_floating_point())
    ref16 = materialize_recipe(recipe, device="cpu", dtype="bfloat16").state_dict()
    for n, v in saved.items():  # what --dtype asked for is what is written
        assert torch.equal(v, ref16[n]), n


def test_merge_command_reads_mergekit_yaml(tiny_family, tmp_path):
    base, experts = tiny_family("gpt2", 2)
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                                      "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts]}))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "o")]) == 0
    saved = {k: v for f in (tmp_path / "o").glob("*.safetensors") for k, v in load_file(f).items()}
    e0, e1 = _weights(experts[0]), _weights(experts[1])
    assert set(saved) <= set(e0) and saved
    for n, v in saved.items():  # mergekit's linear normalises by default: (e0 + e1) / 2, written out
        torch.testing.assert_close(v, (e0[n] + e1[n]) / 2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(method="tis"), "did you mean 'ties'"),
    (lambda d: d["models"][0].update(model="does-not-exist"), "model folder not found"),
    (lambda d: d["models"][0]["parameters"].update(density=[0.1, 0.2, 0.3]), "one value per layer"),
    (lambda d: d["models"][0]["parameters"].update(density=2), "outside its range"),
])
def test_merge_command_errors_exit_2(tiny_family, tmp_path, capsys, edit, match):
    base, experts = tiny_family("llama", 2)
    data = {"method": "ties", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]}
    edit(data)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: the fixture's progress bars
    assert last.startswith("error: ") and match in last


def test_merge_help_lists_every_registered_method():
    import argparse

    from mergesearch import operators
    from mergesearch.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["merge"].format_help().replace("\n", " ")
    assert all(name in text for name in operators.names())


def test_missing_expert_folder_is_a_checkpoint_error(tiny_family, tmp_path):
    base, experts = tiny_family("llama", 1)
    with pytest.raises(CheckpointError):
        Materializer(base, [tmp_path / "nope"], "task_arithmetic", device="cpu")
