"""The CUDA paths, against the CPU: materialise, stream sources from host memory, evaluate, run a study.

Every test here carries the `gpu` marker and skips without a CUDA device (conftest.py), as on CI's
CPU runners; `benchmarks/bench_gpu.py` runs them (and fails when any skips) on a GPU machine. The
gradient fit's GPU test belongs with mergesearch/fit.py.
"""

from __future__ import annotations

import pytest
import torch

from mergesearch.materializer import Materializer

pytestmark = pytest.mark.gpu

METHODS = [("task_arithmetic", {"weight": [0.3, 0.9]}), ("ties", {"weight": [0.5, 0.5], "density": 0.4}),
           ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}), ("dare_ties", {"weight": [0.6, 0.4], "density": 0.5}),
           ("della", {"density": 0.5, "epsilon": 0.1}), ("model_stock", {}), ("linear", {"weight": [0.2, 0.8]})]


def _merged(base, experts, method, values, **kw) -> dict[str, torch.Tensor]:
    m = Materializer(base, experts, method, chunks=2, seed=5, **kw)
    m.materialize(m.plan(**values))
    assert {p.device.type for p in m.model.parameters()} == {torch.device(kw["device"]).type}
    return {k: v.float().cpu() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("method, values", METHODS, ids=[m for m, _ in METHODS])
def test_materialize_on_cuda_matches_cpu(method, values, dtype, atol, tiny_family):
    """Same masks (ranks by a stable sort, random fields drawn on the CPU), same weights up to rounding."""
    base, experts = tiny_family("llama", 2)
    cpu = _merged(base, experts, method, values, device="cpu", dtype=dtype)
    gpu = _merged(base, experts, method, values, device="cuda", dtype=dtype)
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=0, atol=atol, msg=f"{method} {dtype} {k}")


@pytest.mark.parametrize("method, values", METHODS[:4], ids=[m for m, _ in METHODS[:4]])
def test_streaming_from_host_memory_to_cuda(method, values, tiny_family):
    """streaming=True: sources stay in page-locked host memory and are copied per tensor; same weights
    as sources resident on the device, candidate after candidate."""
    base, experts = tiny_family("llama", 2)
    m = Materializer(base, experts, method, device="cuda", chunks=2, seed=5, streaming=True)
    sources = [m.sources(i) for i in range(len(m.tensors))]
    assert m.streaming and all(b.device.type == "cpu" and b.is_pinned() for b, _, _, _ in sources)
    assert all(d.is_pinned() for _, ds, _, _ in sources for d in ds)
    resident = _merged(base, experts, method, values, device="cuda")
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
    from mergesearch.study import records as R
    from mergesearch.study import run_study

    from study_helpers import zoo_study_dict

    raw = zoo_study_dict(zoo_test, tmp_path, n_trials=3, limit=16)
    raw["merge"].update(device="cuda", streaming=True)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    study = run_study(load_config(path), progress=False)
    searched = R.search_trials(study)
    assert len(searched) == 3 and all(R.record(t)["device"].startswith("cuda") for t in searched)
    assert all(R.record(t)["device"].startswith("cuda") for t in R.baseline_trials(study))
