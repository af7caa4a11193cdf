"""Devices: which device a study runs on, refused in one line when the machine lacks it; what it needs."""

from __future__ import annotations

import pytest
import torch

from mergesearch.checkpoints import resolve_device
from mergesearch.errors import CheckpointError


def test_a_device_index_the_machine_lacks_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(CheckpointError, match=r"'cuda:2' requested but this machine has 2 CUDA device\(s\): "
                                              r"use cuda:0 to cuda:1$"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CheckpointError, match="no CUDA device is available"):
        resolve_device("cuda:0")
    with pytest.raises(CheckpointError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.parametrize("command", ["run", "worker"])
def test_run_and_worker_refuse_a_gpu_index_the_machine_lacks_before_any_work(command, zoo_test, tmp_path, capsys,
                                                                             monkeypatch):
    from study_helpers import write_study

    from mergesearch.cli import main

    path = write_study(zoo_test, tmp_path, n_trials=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([command, str(path), "--device", "cuda:3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'cuda:3' requested but this machine has 1 CUDA device(s): use cuda:0" in err
    assert not (tmp_path / "t.db").exists()  # nothing was created


def test_the_device_override_reaches_the_trials(zoo_test, tmp_path, capsys):
    from study_helpers import write_study

    from mergesearch.cli import main
    from mergesearch.study import load_study, records

    path = write_study(zoo_test, tmp_path, n_trials=1, top_k_test=0)
    assert main(["run", str(path), "--device", "cpu", "--no-progress"]) == 0
    study = load_study(path)
    assert [records.record(t)["device"] for t in records.search_trials(study)] == ["cpu"]


# --- the memory a study needs (mergesearch.memory) ---------------------------------------------------


def _llama_tensors(hidden, inter, layers, heads, kv, vocab):
    """A Llama's tensors, shapes only: built on the meta device (no weights, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergesearch.checkpoints import TensorInfo

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return [TensorInfo(n, tuple(p.shape), torch.bfloat16, None, "other") for n, p in model.named_parameters()]


def test_a_7b_model_with_3_experts_fits_80gb_resident_and_a_larger_set_streams():
    from mergesearch import memory

    tensors = _llama_tensors(4096, 11008, 32, 32, 32, 32000)  # Llama-2-7B's shapes
    assert 6.7e9 < sum(t.numel for t in tensors) < 6.8e9
    gpu80 = 80 * memory.GiB
    three = memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", device="cuda")
    assert memory.fits(three, gpu80) and three.total > 60 * memory.GiB  # (1 + 3 + 1) x 13.5 GB and a batch
    assert memory.choose_streaming("auto", three, gpu80)[0] is False
    five = memory.estimate(tensors, 5, "task_arithmetic", "bfloat16", device="cuda")
    streams, why = memory.choose_streaming("auto", five, gpu80)
    assert streams and "streaming on (auto)" in why and "cuda has 80.0 GiB free" in why
    streamed = memory.estimate(tensors, 5, "task_arithmetic", "bfloat16", device="cuda", streaming=True)
    assert memory.fits(streamed, gpu80) and streamed.host_sources == five.sources
    # TIES keeps its rank order in host memory on CUDA: 3 experts fit resident too (tests/test_ordered.py)
    assert memory.fits(memory.estimate(tensors, 3, "ties", "bfloat16", device="cuda"), gpu80)
    assert memory.choose_streaming(True, three, gpu80)[0] is True  # an explicit setting is kept
    assert memory.choose_streaming("auto", five, 0)[0] is True


def test_generation_counts_its_kv_cache_and_a_long_chain_study_of_7b_streams():
    """The engine preallocates keys and values for every slot of a batch (CUDA graphs need fixed shapes): at
    batch 64, 256 generated tokens of Llama-2-7B are 64 x 384 x 32 layers x 2 x 4096 x 2 bytes = 12 GiB, which
    short answers do not need; grouped-query attention (Llama-3-8B's 8 key-value heads) stores a quarter."""
    from types import SimpleNamespace

    from mergesearch import memory

    def task(calib, max_new_tokens=None):
        return SimpleNamespace(calib=calib, max_new_tokens=max_new_tokens)

    def study(*tasks):
        return SimpleNamespace(objectives=SimpleNamespace(tasks=list(tasks)))

    short = memory.generated_tokens(study(task("a.jsonl"), task("b.json")))
    assert short == memory.PROMPT_TOKENS + 32
    assert memory.generated_tokens(study(task("a.jsonl"), task("lmeval:gsm8k_cot"))) == memory.PROMPT_TOKENS + 256
    chain = memory.generated_tokens(study(task("a.jsonl", 256), task("b.yaml", 64)))
    assert chain == memory.PROMPT_TOKENS + 256

    tensors = _llama_tensors(4096, 11008, 32, 32, 32, 32000)
    assert memory.kv_bytes_per_token(tensors, 4096, 2) == 32 * 2 * 4096 * 2
    gqa = _llama_tensors(4096, 14336, 32, 32, 8, 128256)  # Llama-3-8B's shapes
    assert memory.kv_bytes_per_token(gqa, 4096, 2) == 32 * 2 * 1024 * 2
    gpu80 = 80 * memory.GiB
    three = memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", device="cuda", gen_tokens=short)
    assert three == memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", device="cuda")  # the default
    long = memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", device="cuda", gen_tokens=chain)
    kv = 64 * chain * 32 * 2 * 4096 * 2
    assert long.evaluator >= kv and long.total - three.total >= kv - three.evaluator
    assert memory.fits(three, gpu80) and not memory.fits(long, gpu80)
    assert memory.choose_streaming("auto", long, gpu80)[0] is True
    halved = memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", device="cuda", gen_tokens=chain,
                             batch_size=32)
    assert memory.fits(halved, gpu80)  # or a smaller batch keeps the sources resident


def test_a_fit_over_streamed_sources_counts_every_task_vector_on_the_device():
    """A fit builds its linear parts on the merge device: for task arithmetic those are the resident task
    vectors themselves (no copy), but streamed ones are copied there for the fit's session."""
    from mergesearch import memory

    tensors = _llama_tensors(4096, 11008, 32, 32, 32, 32000)
    n = sum(t.numel for t in tensors)
    kw = {"device": "cuda", "fit": True}
    resident = memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", **kw)
    streamed = memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", streaming=True, **kw)
    assert streamed.fit - resident.fit == 3 * n * 2
    ties = memory.estimate(tensors, 3, "ties", "bfloat16", streaming=True, **kw)
    assert ties.fit == streamed.fit


def test_the_estimate_counts_the_state_each_device_stores_and_the_kernels_blocks():
    """Scratch: the eager kernel's declared blocks and nothing more (the compiled formula writes no buffers).
    Sources per entry and expert: the delta plus the state the device stores: TIES's int32 rank order (in host
    memory, the CPU's own), DARE's float32 uniforms and DELLA's 16-bit uniform and row rank (4 bytes) on the CPU;
    on CUDA the uniforms are computed in the kernel, not stored, and TIES's rank order stays in host memory: TIES
    and DARE keep nothing per entry there, DELLA its row ranks (int16, 2 bytes)."""
    from mergesearch import memory, operators

    tensors = _llama_tensors(4096, 11008, 32, 32, 32, 32000)
    largest = max(t.numel for t in tensors)
    n = sum(t.numel for t in tensors)
    for device, n_experts, dtype, size in (("cuda", 3, "bfloat16", 2), ("cuda", 2, "float32", 4),
                                           ("cpu", 3, "bfloat16", 2), ("cpu", 2, "float32", 4)):
        ta = memory.estimate(tensors, n_experts, "task_arithmetic", dtype, device=device)
        for method, state in (("ties", 4 if device == "cpu" else 0), ("dare_ties", 4 if device == "cpu" else 0),
                              ("della", 4 if device == "cpu" else 2)):
            est = memory.estimate(tensors, n_experts, method, dtype, device=device)
            blocks = operators.get(method).scratch_bytes(n_experts, largest, operators.block_entries(device), size)
            assert est.scratch == blocks > 0, (method, device, dtype)
            assert est.sources - ta.sources == n * n_experts * state, (method, device, dtype)


def test_the_sources_estimate_is_what_the_materialiser_holds(tiny_family):
    from mergesearch import memory
    from mergesearch.materializer import Materializer

    base, experts = tiny_family("llama", 2)
    for method in ("task_arithmetic", "ties", "dare_ties", "della"):
        m = Materializer(base, experts, method, device="cpu", dtype="bfloat16", chunks=2)
        held = 0
        for i in range(len(m.tensors)):
            b, ds, _, states = m.sources(i)
            held += b.nbytes + sum(d.nbytes for d in ds)
            held += sum(v.nbytes for s in states for xs in s.values() if isinstance(xs, list)
                        for v in xs if isinstance(v, torch.Tensor) and v.dim())
            held += sum(s["order"].nbytes for s in states if "order" in s)  # TIES: host memory, the CPU's own
        est = memory.estimate(m.tensors, 2, method, "bfloat16", device="cpu")
        assert est.sources == held, method
        assert est.model == sum(p.nbytes for p in m.model.parameters())


def test_validate_prints_the_memory_a_study_needs(zoo_test, tmp_path, capsys):
    from study_helpers import write_study

    from mergesearch.cli import main

    path = write_study(zoo_test, tmp_path)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "device memory on cpu (sources resident): " in out and "device memory on cpu (streaming): " in out
    assert "host memory for the streamed sources" in out and "free on cpu now: " in out


def test_streaming_auto_is_decided_by_the_workbench_and_said(zoo_test, tmp_path, caplog):
    import logging

    from study_helpers import zoo_study_dict

    from mergesearch.config import config_from_dict
    from mergesearch.study.workbench import Workbench

    raw = zoo_study_dict(zoo_test, tmp_path)
    raw["merge"]["streaming"] = "auto"
    with caplog.at_level(logging.INFO, logger="mergesearch.study.workbench"):
        bench = Workbench(config_from_dict(raw), load_evaluator=False)
    assert bench.mat.streaming is False and "streaming off (auto)" in caplog.text
    raw["merge"]["streaming"] = "sometimes"
    with pytest.raises(Exception, match="streaming"):
        config_from_dict(raw)


def test_validate_estimates_a_cuda_study_on_a_machine_without_one(zoo_test, tmp_path, monkeypatch):
    import yaml
    from study_helpers import write_study

    from mergesearch.study import validate_study

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    path = write_study(zoo_test, tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["merge"]["device"] = "cuda:0"
    path.write_text(yaml.safe_dump(raw))
    mem = validate_study(path)["memory"]
    assert mem["resident"]["device"] == "cuda:0" and mem["resident"]["total"] > 0
    assert mem["streams"] is None and "not decided here" in mem["why"]


def test_the_estimate_counts_each_methods_own_scratch():
    """Task arithmetic holds no scratch; model_stock per row holds a whole tensor's (the largest: the embedding,
    far more than any block); the sparse methods their declared blocks (checked against the kernels in
    tests/test_operators.py)."""
    from mergesearch import memory

    tensors = _llama_tensors(4096, 11008, 32, 32, 32, 32000)
    largest = max(t.numel for t in tensors)
    for device in ("cpu", "cuda"):
        assert memory.estimate(tensors, 3, "task_arithmetic", "bfloat16", device=device).scratch == 0
        assert memory.estimate(tensors, 3, "model_stock", "bfloat16", device=device).scratch == largest * 2
        assert memory.estimate(tensors, 3, "ties", "bfloat16", device=device).scratch > 0
