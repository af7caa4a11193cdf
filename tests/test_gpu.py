"""The CUDA paths, against the CPU: materialise, stream sources from host memory, evaluate, run a study.

Every test here carries the `gpu` marker and skips without a CUDA device (conftest.py), as on CI's
CPU runners; `benchmarks/bench_gpu.py` runs them (and fails when any skips) on a GPU machine. The
gradient fit's GPU test belongs with mergesearch/fit.py.
"""

from __future__ import annotations

import pytest
import torch

from test_merge import STREAMED as METHODS  # one candidate per registered method

from mergesearch import operators
from mergesearch.materializer import Materializer

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_compiled_formula_falls_back_on_cuda():
    """operators/fused.py falls back to the eager kernel, with one logged warning, when a formula fails to
    compile, so a Triton failure would pass every equality test here and show only as a slow merge: on CUDA
    each one fails the test that met it."""
    from mergesearch.operators import fused

    before = set(fused._BROKEN)
    yield
    new = sorted(str(sig) for sig in fused._BROKEN - before if sig[-1] == "cuda")
    assert not new, f"compiled formulas fell back to the eager kernel on CUDA: {new}"


def _experts(method: str) -> int:
    return 1 if method == "slerp" else 2


def _merged(base, experts, method, values, **kw) -> dict[str, torch.Tensor]:
    m = Materializer(base, experts, method, chunks=2, seed=5, **kw)
    m.materialize(m.plan(**values))
    assert {p.device.type for p in m.model.parameters()} == {torch.device(kw["device"]).type}
    return {k: v.float().cpu() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("dtype, rtol, atol", [("float32", 0.0, 1e-6), ("bfloat16", 2 ** -7, 1e-2)])
@pytest.mark.parametrize("method, values", METHODS, ids=[m for m, _ in METHODS])
def test_materialize_on_cuda_matches_cpu(method, values, dtype, rtol, atol, tiny_family):
    """Same masks (ranks by a stable sort, random fields drawn on the CPU), same weights up to rounding:
    float32 within 1e-6; bf16 within one bf16 step of the weight (2**-7 relative) or of a rescaled
    task-vector term (under 1e-2 in these models), since float32 sums (L1 norms, angles) reduce in
    another order on the GPU, and a last-bit change of a factor rounded to bf16 moves a term by one
    bf16 step. The CPU runs its own block policy and also the GPU's (operators.block_entries("cuda")):
    the GPU must match both."""
    base, experts = tiny_family("llama", _experts(method))
    gpu = _merged(base, experts, method, values, device="cuda", dtype=dtype)
    for block in (None, operators.block_entries("cuda")):
        cpu = _merged(base, experts, method, values, device="cpu", dtype=dtype, block=block)
        for k in cpu:
            torch.testing.assert_close(gpu[k], cpu[k], rtol=rtol, atol=atol, msg=f"{method} {dtype} {k}")


FAMILY = [(m, v) for m, v in METHODS if operators.get(m).kernel.__module__.endswith(".task_arithmetic")]


@pytest.mark.parametrize("dtype, rtol, atol", [("float32", 0.0, 1e-6), ("bfloat16", 2 ** -6, 1e-2)])
@pytest.mark.parametrize("method, values", FAMILY, ids=[m for m, _ in FAMILY])
def test_the_compiled_formula_on_cuda_matches_the_cpu(method, values, dtype, rtol, atol, tiny_family):
    """The task-arithmetic family's compiled formula (operators/fused.py: Triton on CUDA), forced on these
    small tensors, against the CPU's eager kernel: float32 within 1e-6; bf16 within two bf16 steps (the
    formula rounds where eager writes bf16; ATen's CPU add rounds its alpha to bf16, tests/test_fused.py).
    Streamed exactly as resident."""
    from mergesearch.operators import fused

    base, experts = tiny_family("llama", 2)
    before = fused.calls.copy()
    gpu = _merged(base, experts, method, values, device="cuda", compiled=True, dtype=dtype)
    assert fused.calls != before, "the compiled formula did not run on CUDA"
    streamed = _merged(base, experts, method, values, device="cuda", compiled=True, streaming=True, dtype=dtype)
    assert all(torch.equal(streamed[k], gpu[k]) for k in gpu)
    cpu = _merged(base, experts, method, values, device="cpu", compiled=False, dtype=dtype)
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=rtol, atol=atol, msg=f"{method} {dtype} {k}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method, values", METHODS, ids=[m for m, _ in METHODS])
def test_streaming_from_host_memory_to_cuda(method, values, dtype, tiny_family):
    """streaming=True: sources stay in page-locked host memory and are copied per tensor; exactly the
    weights of sources resident on the device, candidate after candidate."""
    base, experts = tiny_family("llama", _experts(method))
    m = Materializer(base, experts, method, device="cuda", chunks=2, seed=5, streaming=True, dtype=dtype)
    sources = [m.sources(i) for i in range(len(m.tensors))]
    assert m.streaming and all(b.device.type == "cpu" and b.is_pinned() for b, _, _, _ in sources)
    assert all(d.is_pinned() for _, ds, _, _ in sources for d in ds)
    resident = _merged(base, experts, method, values, device="cuda", dtype=dtype)
    for _ in range(2):  # the second time after another candidate
        m.materialize(m.plan(**values))
        got = {k: v.float().cpu() for k, v in m.state_dict().items()}
        assert all(torch.equal(got[k], resident[k]) for k in got)
        m.materialize(m.plan())


def test_evaluate_on_cuda_matches_cpu(zoo_test):
    """The zoo's expert scored by the same evaluator on both devices: the same exact-match decisions,
    log-probabilities within float tolerance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.evaluate import Evaluator, load_task
    from mergesearch.zoo import study_inputs

    models, tasks = study_inputs(zoo_test)
    expert = next(iter(models["experts"].values()))
    tok = AutoTokenizer.from_pretrained(expert)
    specs = [load_task(t["calib"], name=t["name"], limit=48) for t in tasks]
    out = {}
    for device in ("cpu", "cuda"):
        model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32).to(device).eval()
        out[device] = Evaluator(model, tok, specs, batch_size=16).evaluate()
    for t in specs:
        cpu, gpu = out["cpu"].records[t.name], out["cuda"].records[t.name]
        assert [r["exact_match"] for r in cpu] == [r["exact_match"] for r in gpu], t.name
        for a, b in zip(cpu, gpu):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3), t.name


def test_study_runs_on_cuda(zoo_test, tmp_path):
    """A short study on the GPU: every trial merged and scored there, with streaming."""
    import yaml

    from mergesearch.config import load_config
    from mergesearch.study import records
    from mergesearch.study import run_study

    from study_helpers import zoo_study_dict

    raw = zoo_study_dict(zoo_test, tmp_path, n_trials=3, limit=16)
    raw["merge"].update(device="cuda", streaming=True)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    study = run_study(load_config(path), progress=False)
    searched = records.search_trials(study)
    assert len(searched) == 3 and all(records.record(t)["device"].startswith("cuda") for t in searched)
    assert all(records.record(t)["device"].startswith("cuda") for t in records.baseline_trials(study))


def test_generation_on_cuda_replays_its_captured_step_and_equals_hf_generate(tmp_path, device="cuda"):
    """The engine on CUDA (float32; prompts sharing a prefix, rows stopping at EOS and refilled): its decode step
    captured as a CUDA graph, its rows equal HF `generate` on the same device and the CPU engine's. After the
    weights are written in place (the materialiser's copy_), the kept engine's graph replays on them: its rows
    equal HF `generate` on the new weights."""
    from test_evaluate import newline_model, prompts
    from test_generate import hf_tokens

    from mergesearch.evaluate.engine import GenerationEngine, GenRequest

    model, tok = newline_model(tmp_path / "a")
    other = newline_model(tmp_path / "b", seed=7)[0].to(device)
    first = newline_model(tmp_path / "c")[0].to(device)  # the first weights, kept for the reference
    texts = prompts(20, seed=4)
    reqs = [GenRequest(tuple(tok(t, add_special_tokens=False).input_ids), 16, frozenset({2})) for t in texts]
    with torch.inference_mode():
        on_cpu = GenerationEngine(model, batch_size=8, pad_id=0).generate(reqs)
    model = model.to(device)
    engine = GenerationEngine(model, batch_size=8, pad_id=0)
    with torch.inference_mode():
        before = engine.generate(reqs)
        captured = engine.graph_state
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)
        after = engine.generate(reqs)
    if device == "cuda":
        assert captured == engine.graph_state == "captured", engine.graph_state
    assert before == on_cpu == hf_tokens(first, tok, texts, 16)
    assert after == hf_tokens(other, tok, texts, 16) and after != before


def test_bf16_one_pass_decisions_on_cuda_equal_generation(device="cuda"):
    """The bf16 tie guard (`_scoring.TIE_EPS_16BIT`, measured on the CPU) on CUDA, whose kernels round otherwise:
    the shipped demo zoo's experts in bf16 on their calib questions, every one-pass decision equal to
    generation's, and some decided by one pass (the check is not empty)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.evaluate import Evaluator, load_task
    from mergesearch.zoo import load_manifest
    from mergesearch.zoo.shipped import shipped_zoo

    zoo = shipped_zoo("demo")
    m = load_manifest(zoo)
    tok = AutoTokenizer.from_pretrained(zoo / m["base"])
    decided = 0
    for skill in m["skills"]:
        model = AutoModelForCausalLM.from_pretrained(zoo / m["experts"][skill], dtype=torch.bfloat16).to(device)
        task = load_task(str(zoo / m["data"][skill]["calib"]), name=skill, limit=60)
        fast = Evaluator(model.eval(), tok, [task], batch_size=32).evaluate().records[skill]
        slow = Evaluator(model, tok, [task], batch_size=32, shortcut=False).evaluate().records[skill]
        assert [r["exact_match"] for r in fast] == [r["exact_match"] for r in slow], skill
        decided += sum(r["decided_by"] == "one-pass" for r in fast)
    assert decided > 0

