"""Shared-prefix ("cascade") attention: the prefix's keys and values once per layer, each row's own tail apart.

When every prompt of a generation run starts with the same tokens (a few-shot block, a task template),
the engine keeps that prefix's keys and values once per layer (`SlotCache.set_prefix`) instead of a copy
in every slot. The attention of all rows' queries against the prefix is then one matrix product per
layer (it reads the prefix once, not once per row), the attention against each row's own positions
after the prefix another, and one softmax spans both: mathematically the attention over the whole row,
computed in float32 (as the CPU's SDPA accumulates).

It runs as a transformers attention function registered under `NAME`, selected (`selected`) only for
the engine's own forward passes, which hand it the cache through the forward's keyword arguments
(transformers passes them down to every attention layer). Only models whose attention is plain causal
self-attention use it (`supports`): no sliding window shorter than the run, no soft-capping, no sinks.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

NAME = "mergesearch_cascade"
KWARG = "mergesearch_cascade"  # the forward keyword that carries the SlotCache down to the attention
# causal self-attention; llama, qwen2 and gpt2 are checked against HF generate (tests/test_generate.py), mistral's
# attention is llama's plus the sliding window that `supports` checks
_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


def supports(model, length: int) -> bool:
    """Whether the cascade computes this model's attention exactly for runs of `length` positions."""
    config = model.config.get_text_config()
    if config.model_type not in _MODEL_TYPES:
        return False
    window = getattr(config, "sliding_window", None)
    sliding = window is not None and getattr(config, "use_sliding_window", True)
    return not sliding or window >= length


@contextlib.contextmanager
def selected(model):
    """Within the block, the model's attention layers call `attention` (the previous choice restored after)."""
    config = model.config
    # transformers' attention layers read config._attn_implementation at every call; its public setter,
    # model.set_attn_implementation, re-validates every submodule, too slow for once per forward
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        # the model's own choice back (see above for why the private attribute)
        config._attn_implementation = before


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """query (R, Hq, q, D); key, value (R, Hkv, T, D): the rows' positions after the prefix, as the cache's
    `update` returned them; attention_mask (R, 1, q, P + T) additive. Returns ((R, q, Hq, D), None)."""
    cache = kwargs[KWARG]
    layer = module.layer_idx
    kp, vp = cache.prefix_keys[layer], cache.prefix_values[layer]  # (Hkv, P, D) float32
    n_prefix = kp.shape[1]
    rows, n_heads, q, dim = query.shape
    n_kv = kp.shape[0]
    gq = n_heads // n_kv * q  # a kv head serves n_heads // n_kv query heads (repeat_kv's order), q queries each
    scale = dim ** -0.5 if scaling is None else scaling
    qg = query.float().reshape(rows, n_kv, gq, dim)
    # every row against the prefix: one (Hkv, R*gq, D) x (Hkv, D, P) product
    sp = torch.bmm(qg.transpose(0, 1).reshape(n_kv, rows * gq, dim), kp.transpose(1, 2))
    sp = sp.mul_(scale).view(n_kv, rows, gq, n_prefix)
    # every row against its own tail
    mask = attention_mask[..., n_prefix:].float()  # (R, 1, q, T)
    st = torch.matmul(qg, key.float().transpose(2, 3)).mul_(scale)  # (R, Hkv, gq, T)
    st = st.view(rows, n_kv, -1, q, st.shape[-1]).add_(mask[:, :, None]).view(rows, n_kv, gq, -1)
    # one softmax over both parts
    top = torch.maximum(sp.amax(-1).transpose(0, 1), st.amax(-1))  # (R, Hkv, gq)
    ep = sp.sub_(top.transpose(0, 1)[..., None]).exp_()
    et = st.sub_(top[..., None]).exp_()
    total = ep.sum(-1).transpose(0, 1) + et.sum(-1)
    out = torch.matmul(et, value.float())  # (R, Hkv, gq, D)
    out.add_(torch.bmm(ep.view(n_kv, rows * gq, n_prefix), vp).view(n_kv, rows, gq, dim).transpose(0, 1))
    out = out.div_(total[..., None]).view(rows, n_heads, q, dim).transpose(1, 2)
    return out.to(query.dtype).contiguous(), None


AttentionInterface.register(NAME, attention)
