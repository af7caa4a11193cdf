"""Fitted coefficients (mergesearch.fit and the study's fit stage).

The coefficient gradient is checked against central finite differences and against autograd through
torch.func.functional_call on a float64 model; the linear parts against the merge kernels; a fitted
study against its export. Nothing here depends on the exact weights the zoo trains.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from study_helpers import zoo_study_dict

from mergesearch import operators
from mergesearch.checkpoints import open_checkpoint
from mergesearch.config import SpaceConfig, config_from_dict, load_config
from mergesearch.errors import ConfigError
from mergesearch.evaluate import load_task
from mergesearch.fit import CoefficientFitter, FitOptions, split_calib
from mergesearch.materializer import Materializer
from mergesearch.plan import Plan
from mergesearch.operators import Scratch
from mergesearch.space import SearchSpace
from mergesearch.study import export_trial, run_study
from mergesearch.study import records
from mergesearch.zoo import load_manifest

GTA = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear"]
CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}


def _params(op, w):
    vals = {"weight": w, "density": [0.5, 0.3, 0.7], "gamma": [0.02] * 3, "epsilon": [0.1] * 3}
    return {p.name: (tuple(vals.get(p.name, [p.default] * 3)) if p.per_expert else p.default) for p in op.params}


@pytest.mark.parametrize("method", GTA)
def test_linear_parts_reproduce_the_kernel(method):
    """base + sum_e w_e part_e is the method's merge at the candidate; without sign consensus at every weight."""
    op = operators.get(method)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 40, generator=g)
    deltas = [0.1 * torch.randn(48, 40, generator=g) for _ in range(3)]
    state = op.prepare(base, deltas, torch.Generator().manual_seed(1)) if op.prepare else {}
    p = _params(op, [0.7, 0.5, 0.9])
    parts = op.linear_parts(base, deltas, p, state)
    out = torch.empty_like(base)
    op.kernel(out, base, deltas, p, state, Scratch())
    torch.testing.assert_close(base + sum(w * x for w, x in zip(p["weight"], parts)), out, rtol=0, atol=2e-6)
    if method not in CONSENSUS:  # linear in the weights: the same parts hold at other weights
        q = _params(op, [0.2, 1.1, 0.4])
        op.kernel(out, base, deltas, q, state, Scratch())
        torch.testing.assert_close(base + sum(w * x for w, x in zip(q["weight"], parts)), out, rtol=0, atol=2e-6)


def test_task_arithmetic_parts_are_the_task_vectors_themselves():
    op = operators.get("task_arithmetic")
    base, deltas = torch.zeros(4, 3), [torch.randn(4, 3) for _ in range(2)]
    parts = op.linear_parts(base, deltas, _params(op, [0.3, 0.4]), {})
    assert all(p.data_ptr() == d.data_ptr() for p, d in zip(parts, deltas))  # no copy of the sources


def test_the_gradient_contraction_casts_16_bit_chunks_block_by_block(monkeypatch):
    """A bf16 model's gradient and parts are contracted in float32 a block at a time (no whole float32 copy of
    a chunk): the same dot as one float32 pass up to summation order; float32 inputs take one dot, unchanged."""
    from mergesearch import fit

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10_000, generator=g), torch.randn(10_000, generator=g)
    exact = float(torch.dot(a.bfloat16().double(), b.bfloat16().double()))
    whole = fit.dot_in(a.bfloat16(), b.bfloat16(), torch.float32)
    monkeypatch.setattr(fit, "DOT_BLOCK", 1_000)
    blocks = fit.dot_in(a.bfloat16(), b.bfloat16(), torch.float32)
    assert blocks.dtype == torch.float32 and float(blocks) == pytest.approx(exact, abs=1e-3)
    assert float(whole) == pytest.approx(exact, abs=1e-3)
    assert torch.equal(fit.dot_in(a, b, torch.float32), torch.dot(a, b))


# --- the fitter on the test zoo -------------------------------------------------------------------


def _setup(zoo, method="task_arithmetic", dtype=torch.float32, granularity="per_tensor", chunks=2, limit=6):
    from transformers import AutoTokenizer

    m = load_manifest(zoo)
    skills = m["skills"]
    base = open_checkpoint(zoo / m["base"])
    tensors = [t for t in base.tensors.values() if t.dtype.is_floating_point]
    fixed = {p.name: {"fixed": p.default} for p in operators.get(method).params if p.name != "weight"}
    sc = SpaceConfig(granularity=granularity, chunks=chunks, parameters={**fixed, "weight": {"low": 0.0, "high": 2.0}})
    space = SearchSpace(sc, method, tensors, skills, base.num_layers)
    mat = Materializer(base, [zoo / m["experts"][s] for s in skills], method, dtype=dtype, device="cpu",
                       chunks=space.want_chunks)
    tasks = [load_task(str(zoo / m["data"][s]["calib"]), name=s, limit=limit, seed=0) for s in skills]
    train, val = zip(*[split_calib(t, 0.34, 0) for t in tasks])
    fitter = CoefficientFitter(mat, AutoTokenizer.from_pretrained(zoo / m["base"]), train, val,
                               teachers={s: i for i, s in enumerate(skills)})
    return fitter, space, mat, skills


def _plan(mat, method, w=0.7, **kw):
    return Plan.full(method, mat.tensors, len(mat.experts), chunks=mat.chunks, weight=w, **kw)


@pytest.fixture
def fp64_norms(monkeypatch):
    """Llama's RMSNorm computes in float32 whatever the model's dtype; in float64 end to end the loss is
    smooth enough for central differences at h = 1e-5."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


@pytest.mark.parametrize("method,extra", [("task_arithmetic", {}), ("ties", {"density": 0.6})])
def test_coefficient_gradient_matches_finite_differences(zoo_test, fp64_norms, method, extra):
    fitter, space, mat, _ = _setup(zoo_test, method, dtype=torch.float64)
    plan = _plan(mat, method, **extra)
    g = torch.Generator().manual_seed(3)
    coef = 0.7 + 0.2 * torch.rand(space.n_params, generator=g, dtype=torch.float64)
    opts = FitOptions(objective="supervised")
    loss, grad = fitter.gradient(plan, space, coef, opts)
    assert grad.dtype == torch.float64 and grad.abs().max() > 0
    picks = torch.argsort(grad.abs(), descending=True)[:3].tolist() + [space.n_params // 2, space.n_params - 1]
    h = 1e-5
    for j in picks:
        e = torch.zeros_like(coef)
        e[j] = h
        up, _ = fitter.gradient(plan, space, coef + e, opts)
        down, _ = fitter.gradient(plan, space, coef - e, opts)
        fd = (up - down) / (2 * h)
        assert fd == pytest.approx(float(grad[j]), rel=1e-6, abs=1e-9), space.slots[j].key


def test_coefficient_gradient_matches_autograd_through_functional_call(zoo_test):
    """The hooked contraction equals autograd on W(c) = base + sum c * delta fed to torch.func.functional_call."""
    fitter, space, mat, _ = _setup(zoo_test, "task_arithmetic", dtype=torch.float64)
    plan = _plan(mat, "task_arithmetic", **{"lambda": 1.0})
    coef = torch.linspace(0.3, 1.2, space.n_params, dtype=torch.float64)
    opts = FitOptions(objective="supervised")
    _, grad = fitter.gradient(plan, space, coef, opts)

    c = coef.clone().requires_grad_(True)
    ix = space.slot_numbers("weight")
    params = {}
    names = dict(mat.model.named_parameters(remove_duplicate=False))
    for i, t in enumerate(mat.tensors):
        if not mat.is_written(i) or t.name not in names:
            continue
        base, deltas, bounds, _ = mat.sources(i)
        rows = []
        for k, (lo, hi) in enumerate(bounds):
            rows.append(base[lo:hi] + sum(c[ix[i, e, k]] * d[lo:hi] for e, d in enumerate(deltas)))
        params[t.name] = torch.cat(rows)
    # the loss written out: per example mean CE over its gold answer + stop tokens, per task mean, task mean
    train, _ = fitter.sequences("supervised")
    per_task = []
    for s in train:
        losses = []
        for ids, start in zip(s.ids, s.start):
            x = torch.tensor([ids])
            logits = torch.func.functional_call(mat.model, params, (x,)).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits[start - 1: len(ids) - 1],
                                                            torch.tensor(ids[start:])))
        per_task.append(torch.stack(losses).mean())
    torch.stack(per_task).mean().backward()
    torch.testing.assert_close(grad, c.grad, rtol=1e-8, atol=1e-10)


def test_fit_holds_one_gradient_at_a_time_and_frees_it(zoo_test, monkeypatch):
    from mergesearch import fit as fit_module

    fitter, space, mat, _ = _setup(zoo_test)
    params = [p for _, p in mat.model.named_parameters()]
    alive = []
    orig = fit_module._Session._hook

    def spy(self, w, ps, bounds):
        inner = orig(self, w, ps, bounds)

        def hook(p):
            alive.append(sum(q.grad is not None for q in params))
            inner(p)

        return hook

    monkeypatch.setattr(fit_module._Session, "_hook", spy)
    # rows of unequal length each in their own group: the test zoo's rows are too alike to make groups otherwise
    monkeypatch.setattr(fit_module, "_GROUP_STRETCH", 1.0)
    fitter.gradient(_plan(mat, "task_arithmetic"), space, torch.full((space.n_params,), 0.7), FitOptions())
    assert alive and max(alive) == 1
    assert all(p.grad is None and not p.requires_grad for p in params)
    # Autograd sums a parameter's gradients from every forward that used it before the hooks run, holding the
    # partial sums where `.grad` does not show them: with one backward over several length groups, the whole
    # model's gradients from the later groups. One backward per group runs each hook once per group instead.
    train, _ = fitter.sequences("supervised")
    groups = fit_module._length_groups([len(ids) for s in train for ids in s.ids])
    written = sum(1 for _, _, p in fitter.targets if p is not None)
    assert len(groups) > 1 and len(alive) == written * len(groups)


def _noisy_zoo(zoo, out, scale=0.5):
    """The zoo's base and data with every expert replaced by base + seeded Gaussian noise (`scale` x each
    tensor's RMS). Whatever the base's trained weights, adding an expert's noise hurts every example, so a fit
    from 0.7 must lower the loss by lowering the coefficients: no test depends on this machine's zoo."""
    import shutil

    from safetensors.torch import load_file, save_file

    m = load_manifest(zoo)
    shutil.copytree(zoo / "data", out / "data")
    shutil.copytree(zoo / m["base"], out / m["base"])
    (out / "zoo.json").write_text(json.dumps(m))
    base = load_file(zoo / m["base"] / "model.safetensors")
    g = torch.Generator().manual_seed(11)
    for s in m["skills"]:
        shutil.copytree(zoo / m["base"], out / m["experts"][s])
        noisy = {k: v + scale * v.float().pow(2).mean().sqrt() * torch.randn(v.shape, generator=g, dtype=v.dtype)
                 for k, v in base.items()}
        save_file(noisy, out / m["experts"][s] / "model.safetensors", metadata={"format": "pt"})
    return out


def test_fit_is_seeded_improves_its_loss_and_stays_clamped(zoo_test, tmp_path, monkeypatch):
    fitter, space, mat, _ = _setup(_noisy_zoo(zoo_test, tmp_path))
    plan = _plan(mat, "task_arithmetic")
    # 2 of each task's 4 training examples per step: the seed decides the batches, hence the coefficients
    opts = FitOptions(steps=12, eval_every=4, patience=10, lr=0.05, clamp=(0.5, 0.9), batch_size=8, seed=5)
    looks = []
    monkeypatch.setattr("mergesearch.fit.rebalance", lambda: looks.append(1))
    a = fitter.fit(plan, space, opts)
    assert len(looks) == a.steps_run > 0  # the fair share of the cores is followed step by step (threads.rebalance)
    b = fitter.fit(plan, space, opts)
    assert torch.equal(a.coef, b.coef) and a.history == b.history
    val = [h["val_loss"] for h in a.history]
    assert min(val) < val[0] and a.best_step > 0 and a.best_step == a.history[val.index(min(val))]["step"]
    assert a.coef.mean() < 0.7  # less of the noise
    assert a.coef.min() == 0.5 and a.coef.max() <= 0.9  # held at the clamp, never beyond
    # the model holds the best coefficients: writing them again changes nothing
    before = {k: v.clone() for k, v in mat.state_dict().items()}
    with fitter.session(plan, space) as sess:
        sess.write(a.coef)
    assert all(torch.equal(before[k], v) for k, v in mat.state_dict().items())
    c = fitter.fit(plan, space, FitOptions(**{**opts.__dict__, "seed": 6}))
    assert not torch.equal(a.coef, c.coef)  # another seed, other batches


def test_distill_needs_no_labels(zoo_test):
    fitter, space, mat, skills = _setup(zoo_test, granularity="per_layer", chunks=1)
    train, val = fitter.sequences("distill")
    # the teacher of a task is its expert: its answers are what that expert generates, not the gold ones
    assert [s.task for s in train] == skills and all(s.teacher is not None for s in train + val)
    res = fitter.fit(_plan(mat, "task_arithmetic"), space, FitOptions(objective="distill", steps=4, eval_every=2))
    assert all(math.isfinite(h["val_loss"]) for h in res.history)


def test_distill_teachers_stop_where_the_evaluator_stops(zoo_test):
    """A stop string of several tokens ends the teacher's answer as it ends the evaluator's generation (the fit
    once ended only on the first stop string, when it was one token, and ran the rest to max_new_tokens)."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from mergesearch.evaluate import Evaluator
    from mergesearch.fit import distill_seqs

    m = load_manifest(zoo_test)
    mat = Materializer(zoo_test / m["base"], [zoo_test / m["experts"]["reverse"]], "task_arithmetic", device="cpu")
    mat.materialize(_plan(mat, "task_arithmetic", w=1.0, **{"lambda": 1.0}))
    tok = AutoTokenizer.from_pretrained(zoo_test / m["base"])
    task = load_task(str(zoo_test / m["data"]["reverse"]["calib"]), name="reverse", limit=12, seed=0,
                     max_new_tokens=12)
    free = distill_seqs(task, tok, mat.model, pad=0, batch_size=8)
    texts = [tok.decode(ids[s:], skip_special_tokens=True) for ids, s in zip(free.ids, free.start)]
    # a stop of two characters the expert writes inside its first answer, so that it ends that answer early
    stop = next(t[1:3] for t in texts if len(t.rstrip("\n")) >= 4 and "\n" not in t[1:3])
    assert len(tok(stop, add_special_tokens=False).input_ids) == 2
    cut = replace(task, until=(stop, "\n"))
    seqs = distill_seqs(cut, tok, mat.model, pad=0, batch_size=8)
    outputs = Evaluator(mat.model, tok, [cut], shortcut=False).evaluate().records["reverse"]
    ended = 0
    for ids, s, rec in zip(seqs.ids, seqs.start, outputs):
        text = tok.decode(ids[s:], skip_special_tokens=True)
        if stop in text:  # ended by the stop string: nothing generated after it, as the evaluator cut it
            assert text.endswith(stop) and text[: -len(stop)] == rec["output"], (text, rec["output"])
            ended += 1
    assert ended >= 1


# --- the study's fit stage ------------------------------------------------------------------------


def _fit_study(zoo, tmp, **fit):
    raw = zoo_study_dict(zoo, tmp, name="fitted", n_trials=2, sampler="random", limit=12,
                         space={"granularity": "global"}, baselines=False, top_k_test=1)
    raw["fit"] = {"granularity": "per_tensor", "chunks": 2, "steps": 6, "eval_every": 3, "val_fraction": 0.34,
                  "search": {"lr": {"low": 0.01, "high": 0.05, "log": True}}, **fit}
    path = tmp / "fitted.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_fitted_study_exports_the_merge_it_scored(zoo_test, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.evaluate import Evaluator
    from mergesearch.study.runner import StudyRunner

    path = _fit_study(zoo_test, tmp_path)
    cfg = load_config(path)
    study = run_study(cfg, progress=False)
    searched = records.search_trials(study)
    assert len(searched) == 2
    first = min(searched, key=lambda t: t.number)
    assert first.params == {"fit.lr": 0.02} and first.user_attrs.get("start") == "plain fit"
    for t in searched:
        rec = records.record(t)[records.FIT_KEY]
        assert rec["granularity"] == "per_tensor" and len(rec["coef"]) == len(records.meta(study)["fit"]["per_tensor"])
        # the fit's seconds are the trial's own line, not lumped into "other (sampler, storage)"
        fit_s = records.record(t)["fit_s"]
        assert 0 < fit_s < t.duration.total_seconds() - records.record(t)["eval_s"]
    from mergesearch.study import study_status
    from mergesearch.timings import format_timings

    timings = study_status(path)["timings"]["trials"]
    assert timings["fit_s"] == pytest.approx(sum(records.record(t)["fit_s"] for t in searched) / 2)  # median of 2
    assert "per trial (median): fit " in format_timings({"trials": timings})[-1]
    best = max(searched, key=lambda t: t.values[0])
    out = export_trial(path, best.number, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out)
    runner = StudyRunner(cfg, load_evaluator=False)
    res = Evaluator(model, AutoTokenizer.from_pretrained(out), runner.calib_tasks).evaluate()
    assert res.mean == pytest.approx(best.values[0], abs=1e-9)  # scored on the calib validation slice
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["fit"]["granularity"] == "per_tensor" and prov["fit"]["history"]
    # the recipe carries the per-tensor, per-chunk coefficients: `mergesearch merge` gives the same weights
    from mergesearch.cli import main

    assert main(["merge", str(out / "recipe.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    # the report shows the fitted coefficients and the fit's losses
    from mergesearch.report import build_report, fit_info, heatmap_info

    rep = build_report(study, trial=best.number)
    assert "fit" in rep.figures and "heatmap" in rep.figures
    panel = next(p for p in heatmap_info(study, best.number).panels if p.param == "weight (fitted)")
    assert "L00.self_attn_q_proj" in panel.rows and panel.n_chunks == 2 and (panel.low, panel.high) == (0.0, 1.5)
    info = fit_info(study, best.number)
    assert info.steps[0] == 0 and info.best_step in info.steps and len(info.val_loss) == len(info.steps)
    # resuming rebuilds the same merge from the stored coefficients
    assert records.test_score(study, best)["test_mean"] is not None
    runner.mat.materialize(runner.plan_for_trial(best))
    for (k, a), b in zip(model.state_dict().items(), runner.mat.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_fit_config_errors(zoo_test, tmp_path):
    raw = zoo_study_dict(zoo_test, tmp_path, space={"granularity": "global", "chunks": 2})
    raw["fit"] = {}
    with pytest.raises(ConfigError, match="fit.chunks"):
        config_from_dict(raw)
    raw["space"] = {"granularity": "global"}
    raw["fit"] = {"search": {"lrr": {"low": 0.1, "high": 0.2}}}
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        config_from_dict(raw)
    raw["fit"] = {"start": 2.0}
    with pytest.raises(ConfigError, match="outside fit.clamp"):
        config_from_dict(raw)
    from mergesearch.study.runner import StudyRunner

    raw["fit"] = {"objective": "distill"}
    raw["objectives"]["tasks"][0]["name"] = "renamed"
    with pytest.raises(ConfigError, match="fit.teachers"):
        StudyRunner(config_from_dict(raw), load_evaluator=False)


def test_fit_refuses_a_method_without_fittable_weights(zoo_test, tmp_path):
    from mergesearch.study import validate_study

    path = _fit_study(zoo_test, tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["merge"]["method"] = "slerp"
    raw["models"]["experts"] = dict(list(raw["models"]["experts"].items())[:1])
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="no fittable weights; use one of task_arithmetic, ties"):
        validate_study(path)
    raw["merge"]["method"] = "ties"
    path.write_text(yaml.safe_dump(raw))
    v = validate_study(path)
    assert v["fit"]["coefficients"] > 0 and v["fit"]["knobs"] == ["lr"] and v["fit"]["steps"] == 6
    raw["fit"]["search"]["steps"] = {"low": 4, "high": 20}
    path.write_text(yaml.safe_dump(raw))
    v = validate_study(path)  # "up to N steps per trial": a searched range's top, not fit.steps
    assert v["fit"]["steps"] == 20 and v["fit"]["knobs"] == ["lr", "steps"]


def adam_path_bound(opts: FitOptions) -> float:
    """How far one coefficient can move in a fit of opts.steps Adam steps under the cosine schedule.

    An Adam step is lr_t * m/sqrt(v) per coordinate (bias-corrected); by Cauchy-Schwarz |m|/sqrt(v) is at
    most sqrt(max_i a_i / b_i), a_i and b_i the weights the two moving averages give step i's gradient:
    (1 - b1) b1^(t-i) / (1 - b1^t) and (1 - b2) b2^(t-i) / (1 - b2^t). The path is at most the sum
    over the steps of lr_t times that ratio."""
    b1, b2 = 0.9, 0.999  # torch.optim.Adam's defaults, which fit.py uses
    total = 0.0
    for t in range(1, opts.steps + 1):
        ratio = max(((1 - b1) * b1 ** (t - i) / (1 - b1 ** t)) / ((1 - b2) * b2 ** (t - i) / (1 - b2 ** t))
                    for i in range(1, t + 1))
        lr_t = opts.lr * 0.5 * (1 + math.cos(math.pi * (t - 1) / opts.steps))
        total += lr_t * math.sqrt(ratio)
    return total


def _streamed_fit(zoo, method, device, fitter, space, opts):
    """The same fit as `fitter`'s over a streaming materialiser on `device`."""
    m = load_manifest(zoo)
    smat = Materializer(zoo / m["base"], [zoo / m["experts"][s] for s in m["skills"]], method, device=device,
                        chunks=space.want_chunks, streaming=True)
    sfit = CoefficientFitter(smat, fitter.tokenizer, fitter.train_tasks, fitter.val_tasks)
    return sfit.fit(_plan(smat, method, density=0.5), space, opts)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_a_fit_over_streamed_sources_is_the_resident_fit(zoo_test, method):
    """With streaming the sources and the method's prepared state stay in host memory and the materialiser
    moves them per merge; the fit's linear parts must be built from the same state, on the merge device
    (on CUDA the state stayed on the host: a device mismatch in every trial). Here on the CPU: same result."""
    opts = FitOptions(steps=3, eval_every=1, patience=10, lr=0.05)
    fitter, space, mat, _ = _setup(zoo_test, method)
    resident = fitter.fit(_plan(mat, method, density=0.5), space, opts)
    streamed = _streamed_fit(zoo_test, method, "cpu", fitter, space, opts)
    assert torch.equal(streamed.coef, resident.coef) and streamed.best_step == resident.best_step


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_a_fit_over_streamed_sources_on_cuda_is_the_resident_fit(zoo_test, method):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    opts = FitOptions(steps=3, eval_every=1, patience=10, lr=0.05)
    fitter, space, _, _ = _setup(zoo_test, method)
    m = load_manifest(zoo_test)
    gmat = Materializer(zoo_test / m["base"], [zoo_test / m["experts"][s] for s in m["skills"]], method,
                        device="cuda", chunks=space.want_chunks)
    resident = CoefficientFitter(gmat, fitter.tokenizer, fitter.train_tasks, fitter.val_tasks).fit(
        _plan(gmat, method, density=0.5), space, opts)
    streamed = _streamed_fit(zoo_test, method, "cuda", fitter, space, opts)
    torch.testing.assert_close(streamed.coef, resident.coef, rtol=0, atol=1e-5)


def _moving_fit(zoo):
    """The CUDA comparison's fit: validated on its training rows, so that early stopping keeps the last step (on
    held-out rows the shipped test zoo's validation loss rises from step 0, both fits return their start and
    the comparison compares nothing)."""
    opts = FitOptions(steps=8, eval_every=4, patience=10, lr=0.05)
    fitter, space, mat, _ = _setup(zoo)
    fitter = CoefficientFitter(mat, fitter.tokenizer, fitter.train_tasks, fitter.train_tasks)
    return fitter, space, mat, opts


def test_the_cuda_comparisons_fit_moves_every_coefficient_on_the_cpu(zoo_test):
    """The premise of `test_fit_on_cuda_matches_the_cpu_fit`, checked where CI runs: the fit runs to its last
    step and moves the coefficients away from their start."""
    fitter, space, mat, opts = _moving_fit(zoo_test)
    res = fitter.fit(_plan(mat, "task_arithmetic"), space, opts)
    assert res.best_step == opts.steps
    assert float((res.coef - 0.7).abs().min()) > 0 and float((res.coef - 0.7).abs().mean()) > opts.lr


@pytest.mark.gpu
def test_fit_on_cuda_matches_the_cpu_fit(zoo_test):
    """The same fit on CUDA (model float32 and bfloat16) lands near the CPU's coefficients.

    float32: within 2e-3 (the gradients differ in reduction order only). bfloat16 is not a defect when
    it lands further: Adam normalises each coordinate's gradient, so a coefficient whose gradient is
    below the bf16 model's rounding noise takes a step of about lr in a direction that noise decides,
    and the CPU's float32 fit may step the other way. On the CPU, a bf16 fit against a float32 one: 1 of
    168 coefficients 0.0975 apart, every other within lr (0.05); an earlier H200 run saw 0.055 on 1 of
    168. What bounds it is the Adam path (`adam_path_bound`: two fits can be at most twice that apart), and
    most coefficients, whose gradients are well above the noise, agree within one step (lr). Both fits must
    run to their last step (`_moving_fit`), or they would be compared at their start."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fitter, space, mat, opts = _moving_fit(zoo_test)
    cpu = fitter.fit(_plan(mat, "task_arithmetic"), space, opts)
    assert cpu.best_step == opts.steps
    bound = 2 * adam_path_bound(opts)
    assert 0.3 < bound < 0.6  # 0.47 for 8 steps at lr 0.05
    for dtype in (torch.float32, torch.bfloat16):
        m = load_manifest(zoo_test)
        gmat = Materializer(zoo_test / m["base"], [zoo_test / m["experts"][s] for s in m["skills"]],
                            "task_arithmetic", dtype=dtype, device="cuda", chunks=space.want_chunks)
        gfit = CoefficientFitter(gmat, fitter.tokenizer, fitter.train_tasks, fitter.val_tasks)
        res = gfit.fit(_plan(gmat, "task_arithmetic"), space, opts)
        assert gmat.device.type == "cuda" and res.coef.dtype == torch.float32
        assert res.best_step == cpu.best_step, f"{dtype}: best step {res.best_step}, the CPU's {cpu.best_step}"
        if dtype == torch.float32:
            torch.testing.assert_close(res.coef, cpu.coef, rtol=0, atol=2e-3)
            continue
        diff = (res.coef - cpu.coef).abs()
        assert float(diff.max()) <= bound, f"bf16 fit {float(diff.max()):.3f} from the CPU's (Adam bound {bound:.2f})"
        assert float((diff <= opts.lr).float().mean()) >= 0.9, f"{int((diff > opts.lr).sum())}/{diff.numel()} " \
                                                                "coefficients more than one step from the CPU's"


def test_per_task_loss_weights_give_a_pareto_study_of_fitted_merges(zoo_test, tmp_path):
    path = _fit_study(zoo_test, tmp_path, steps=2, eval_every=1,
                      search={"task_weights": {"low": 0.25, "high": 4.0, "log": True}})
    raw = yaml.safe_load(path.read_text())
    raw["objectives"]["mode"] = "per_task"
    raw["study"].update(sampler="auto", n_trials=3, top_k_test=0)
    path.write_text(yaml.safe_dump(raw))
    study = run_study(load_config(path), progress=False)
    assert records.meta(study)["sampler"] == "NSGAIISampler"
    searched = records.search_trials(study)
    assert len(searched) == 3 and all(len(t.values) == 4 for t in searched)
    weights = [tuple(v for k, v in sorted(t.params.items()) if k.startswith("task_weight[")) for t in searched]
    assert weights[0] == (1.0,) * 4 and len(set(weights)) == 3  # the plain fit first, then searched weightings


def test_fit_options_take_their_defaults_from_the_fit_section():
    from dataclasses import fields

    from mergesearch.config import FitConfig

    default = FitConfig()
    shared = [f.name for f in fields(FitOptions) if f.name in FitConfig.model_fields]
    assert len(shared) == 10 and all(getattr(FitOptions(), k) == getattr(default, k) for k in shared)
    cfg = FitConfig(lr=0.5, steps=7, batch_size=3, patience=2, clamp=(0.1, 0.9), start=0.5)
    opts = FitOptions.from_config(cfg, steps=9, seed=4)
    assert (opts.lr, opts.steps, opts.batch_size, opts.patience, opts.clamp, opts.start, opts.seed) == \
        (0.5, 9, 3, 2, (0.1, 0.9), 0.5, 4)


def test_fit_knobs_suggest_default_and_become_options_by_their_declared_kind():
    """Every knob of config.FIT_KNOBS searched at once: a trial suggests each as its declared kind, the plain fit's
    values are the fit: section's (clipped into the searched range), and a trial's values reach FitOptions
    (start kept at or below a searched clamp_high; granularity returned beside the options)."""
    import optuna

    from mergesearch.config import FIT_KNOBS, FitConfig
    from mergesearch.study.fitting import FitKnobs

    search = {"lr": {"low": 0.001, "high": 0.01, "log": True}, "steps": {"low": 50, "high": 120},
              "start": {"low": 0.2, "high": 0.9}, "clamp_high": {"low": 0.5, "high": 1.0},
              "pull": {"low": 0.0, "high": 0.1}, "temperature": {"low": 0.5, "high": 2.0},
              "objective": {"choices": ["distill", "supervised"]}, "granularity": {"choices": ["per_layer"]},
              "task_weights": {"low": 0.5, "high": 2.0}}
    assert set(search) == {*FIT_KNOBS, "task_weights"}
    fit = FitConfig(search=search)  # lr 0.02, steps 300, start 0.7, clamp (0, 1.5), pull 0, temperature 1
    knobs = FitKnobs(fit, ["a", "b"])
    assert knobs.defaults() == {"fit.lr": 0.01, "fit.steps": 120, "fit.start": 0.7, "fit.clamp_high": 1.0,
                                "fit.pull": 0.0, "fit.temperature": 1.0, "fit.objective": "supervised",
                                "fit.granularity": "per_layer", "task_weight[a]": 1.0, "task_weight[b]": 1.0}
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).ask()
    got = knobs.suggest(trial)
    assert set(got) == set(knobs.defaults()) and got == trial.params
    assert isinstance(got["fit.steps"], int) and 50 <= got["fit.steps"] <= 120
    assert all(isinstance(got[f"fit.{k}"], float) for k in ("lr", "start", "clamp_high", "pull", "temperature"))
    assert got["fit.objective"] in ("distill", "supervised") and got["fit.granularity"] == "per_layer"

    opts, granularity = knobs.options({**got, "fit.start": 0.9, "fit.clamp_high": 0.6, "task_weight[b]": 1.5}, 7)
    assert granularity == "per_layer" and opts.seed == 7
    assert (opts.lr, opts.steps, opts.pull, opts.temperature, opts.objective) == \
        (got["fit.lr"], got["fit.steps"], got["fit.pull"], got["fit.temperature"], got["fit.objective"])
    assert opts.clamp == (0.0, 0.6) and opts.start == 0.6  # start clipped to the searched clamp_high
    assert opts.task_weights == {"a": got["task_weight[a]"], "b": 1.5}
    # a trial that searched nothing runs the fit: section as written
    plain, g = FitKnobs(FitConfig(), ["a"]).options({}, 0)
    assert g == "per_tensor" and (plain.lr, plain.steps, plain.start, plain.clamp) == (0.02, 300, 0.7, (0.0, 1.5))
    assert plain.task_weights == {"a": 1.0}
