import json

import pytest
import torch
from safetensors.torch import save_file

from mergesearch.checkpoints import (check_compatible, open_checkpoint, parse_dtype, resolve_device, save_model,
                                     tensor_kind)
from mergesearch.cli import main
from mergesearch.errors import CheckpointError

from conftest import make_tiny_model

NAMES = {
    # Llama / Mistral / Qwen2 / Qwen3 / Gemma
    "model.embed_tokens.weight": (None, "embed"),
    "model.layers.3.self_attn.q_proj.weight": (3, "attn_q"),
    "model.layers.3.self_attn.k_proj.bias": (3, "attn_k"),
    "model.layers.3.self_attn.v_proj.weight": (3, "attn_v"),
    "model.layers.3.self_attn.o_proj.weight": (3, "attn_o"),
    "model.layers.3.self_attn.q_norm.weight": (3, "norm"),
    "model.layers.12.mlp.gate_proj.weight": (12, "mlp_gate"),
    "model.layers.12.mlp.up_proj.weight": (12, "mlp_up"),
    "model.layers.12.mlp.down_proj.weight": (12, "mlp_down"),
    "model.layers.0.input_layernorm.weight": (0, "norm"),
    "model.layers.0.post_attention_layernorm.weight": (0, "norm"),
    "model.layers.0.pre_feedforward_layernorm.weight": (0, "norm"),
    "model.norm.weight": (None, "norm"),
    "lm_head.weight": (None, "lm_head"),
    # Phi-3
    "model.layers.1.self_attn.qkv_proj.weight": (1, "attn_qkv"),
    "model.layers.1.mlp.gate_up_proj.weight": (1, "mlp_gate_up"),
    # GPT-2
    "transformer.wte.weight": (None, "embed"),
    "transformer.wpe.weight": (None, "embed"),
    "transformer.h.5.ln_1.weight": (5, "norm"),
    "transformer.h.5.attn.c_attn.weight": (5, "attn_qkv"),
    "transformer.h.5.attn.c_proj.bias": (5, "attn_o"),
    "transformer.h.5.mlp.c_fc.weight": (5, "mlp_up"),
    "transformer.h.5.mlp.c_proj.weight": (5, "mlp_down"),
    "transformer.ln_f.bias": (None, "norm"),
    # GPT-NeoX
    "gpt_neox.embed_in.weight": (None, "embed"),
    "gpt_neox.layers.7.attention.query_key_value.weight": (7, "attn_qkv"),
    "gpt_neox.layers.7.attention.dense.weight": (7, "attn_o"),
    "gpt_neox.layers.7.mlp.dense_h_to_4h.weight": (7, "mlp_up"),
    "gpt_neox.layers.7.mlp.dense_4h_to_h.weight": (7, "mlp_down"),
    "gpt_neox.final_layer_norm.weight": (None, "norm"),
    "embed_out.weight": (None, "lm_head"),
    # unknown architecture: layer from the first integer after blocks.
    "encoder.blocks.4.something.weight": (4, "other"),
}


@pytest.mark.parametrize("name", list(NAMES))
def test_tensor_kind(name):
    assert tensor_kind(name) == NAMES[name]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_open_tiny_checkpoint(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch, layers=3)
    ck = open_checkpoint(path)
    assert ck.num_layers == 3
    assert {t.layer for t in ck.tensors.values()} == {None, 0, 1, 2}
    kinds = {t.kind for t in ck.tensors.values()}
    assert {"embed", "norm"} <= kinds and "other" not in kinds
    sd = ck.load(dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert ck.num_parameters == sum(t.numel() for t in sd.values())


def test_missing_and_pickle_folders(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(tmp_path / "empty")
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pick / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(pick)


def test_compatibility_lists_every_mismatch(tmp_path, tiny_family):
    base, experts = tiny_family("llama", n_experts=1)
    other = make_tiny_model(tmp_path / "other", "llama", layers=3)
    with pytest.raises(CheckpointError) as exc:
        check_compatible(open_checkpoint(base), [open_checkpoint(experts[0]), open_checkpoint(other)])
    msg = str(exc.value)
    assert "other" in msg and "layers.2" in msg and "expert0" not in msg
    gpt = make_tiny_model(tmp_path / "gpt", "gpt2")
    with pytest.raises(CheckpointError, match="architecture"):
        check_compatible(open_checkpoint(base), [open_checkpoint(gpt)])


def test_vocab_mismatch_is_named_and_can_be_merged(tmp_path, tiny_family):
    base, _ = tiny_family("llama", n_experts=0)
    big = make_tiny_model(tmp_path / "added-tokens", "llama", vocab_size=104)
    with pytest.raises(CheckpointError, match="vocabulary.*merge_common_vocab"):
        check_compatible(open_checkpoint(base), [open_checkpoint(big)])
    check_compatible(open_checkpoint(base), [open_checkpoint(big)], merge_common_vocab=True)


def test_sharded_checkpoint(tmp_path, tiny_family):
    base, _ = tiny_family("llama", n_experts=0)
    ck = open_checkpoint(base)
    sd = ck.load()
    out = save_model(sd, tmp_path / "sharded", base=ck, provenance={"x": 1}, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    re = open_checkpoint(out)
    assert re.tensors.keys() == ck.tensors.keys()
    for k, v in re.load().items():
        assert torch.equal(v, sd[k])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_model_roundtrip_and_atomic(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = make_tiny_model(tmp_path / "src", arch)
    ck = open_checkpoint(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    out = save_model(model, tmp_path / "merged", base=ck, provenance={"recipe": {"merge_method": "linear"},
                                                                      "sources": [ck.fingerprint()]})
    again = AutoModelForCausalLM.from_pretrained(out)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    AutoTokenizer.from_pretrained(out)
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["sources"][0]["config_sha256"]) == 64
    with pytest.raises(CheckpointError, match="--force"):
        save_model(model, out, base=ck, provenance={})
    save_model(ck.load(), out, base=ck, provenance={"second": True}, force=True)
    assert json.loads((out / "provenance.json").read_text()) == {"second": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "src"]  # no temp folders left


def test_unreadable_safetensors(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"a": torch.zeros(2)}, d / "model.safetensors")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="cannot read"):
        open_checkpoint(d)


def test_dtype_and_device(monkeypatch):
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(CheckpointError, match="unknown dtype"):
        parse_dtype("int3")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(CheckpointError, match="no CUDA"):
        resolve_device("cuda")


def test_inspect_cli(tiny_family, capsys):
    base, experts = tiny_family("llama", n_experts=2)
    assert main(["inspect", str(base), *map(str, experts)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "cosine" in out and "total" in out
    # An expert equal to base + noise of scale 0.02 has a clearly non-zero task vector.
    total = [line for line in out.splitlines() if line.startswith("total")][0]
    assert all(float(v.rstrip("%")) > 0.1 for v in total.split()[1:])


def test_inspect_cli_bad_path_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
