"""Shared fixtures: tiny random checkpoints built inside the tests (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `make test` runs pytest-xdist workers (-n): they share the cores, one thread each on two cores rather than two
# each (OpenMP threads that wait for each other spin).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))

ARCHS = ("llama", "qwen2", "gpt2")

# The seed of the `test` zoo the suite runs on: 0 is the zoo shipped in the package (the same weights on
# every machine); another seed is trained here. Trained weights differ between machines (float reduction
# order), so no test may depend on one seed's exact weights: run the suite with other seeds
# (MERGESEARCH_TEST_ZOO_SEED=1 make test) to check.
ZOO_SEED = int(os.environ.get("MERGESEARCH_TEST_ZOO_SEED", "0"))


def tiny_config(arch: str = "llama", *, vocab_size: int = 100, layers: int = 2):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(arch)


def make_tiny_model(out: Path, arch: str = "llama", *, seed: int = 0, base: Path | None = None,
                    delta_scale: float = 0.02, vocab_size: int = 100, layers: int = 2,
                    tokenizer: bool = True) -> Path:
    """Write a tiny random HF folder. With `base`, the weights are base + delta_scale * noise (an "expert")."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(delta_scale * torch.randn_like(p))
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=vocab_size, layers=layers))
    model.save_pretrained(out)
    if tokenizer:
        from mergesearch.zoo.tokenizer import build_char_tokenizer

        build_char_tokenizer().save_pretrained(out)
    return Path(out)


@pytest.fixture
def tiny_family(tmp_path):
    """Factory: (base, [experts]) tiny random folders of one architecture."""

    def build(arch: str = "llama", n_experts: int = 3, **kw) -> tuple[Path, list[Path]]:
        base = make_tiny_model(tmp_path / f"{arch}-base", arch, seed=0, **kw)
        experts = [make_tiny_model(tmp_path / f"{arch}-expert{i}", arch, seed=i + 1, base=base)
                   for i in range(n_experts)]
        return base, experts

    return build


@pytest.fixture(scope="session")
def zoo_test() -> Path:
    """The `test` preset zoo (base/, expert-<skill>/, data/<skill>.{calib,test}.jsonl, zoo.json), read-only.

    Seed 0: the zoo shipped in the package (mergesearch/zoo/shipped/test-s0, checked by sha256). Another
    ZOO_SEED: built once into <repo>/.cache/zoo-test-s<seed>-<code hash>/ and reused by later sessions until
    the zoo code or preset changes. Weak models on purpose: for structure and determinism tests.
    """
    from mergesearch.zoo import get_zoo

    return get_zoo(Path(__file__).resolve().parent.parent / ".cache", "test", seed=ZOO_SEED, progress=False)


@pytest.fixture(scope="session")
def zoo_test_bpe() -> Path:
    """The `test` preset zoo with the byte-level BPE tokenizer (`--tokenizer bpe`), shipped or cached like
    `zoo_test`."""
    from mergesearch.zoo import get_zoo

    return get_zoo(Path(__file__).resolve().parent.parent / ".cache", "test", seed=ZOO_SEED, progress=False,
                   tokenizer="bpe")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip with the reason on a machine without CUDA (CI's CPU runners included)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here): run benchmarks/bench_gpu.py on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
