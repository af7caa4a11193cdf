"""The device memory a study needs, estimated from tensor shapes alone (no weights loaded).

What the materialiser, evaluator and fit hold on the merge device, in bytes:

  sources    base + one task vector per expert in the merge dtype, plus the method's precomputed
             state per entry and expert that the device stores (`Operator.stored_state_bytes`: on the CPU
             TIES's rank order int32 (in host memory, which is the CPU's), DARE's uniforms float32 and
             DELLA's uniform and row rank in one int32; on CUDA, which computes the uniforms in the kernel
             and leaves TIES's rank order in host memory (`host_state`), DELLA's row ranks int16 only); with
             streaming they stay in host memory and only the largest tensor's are on the device at a time
  model      the one preallocated model the candidates are written into
  scratch    the kernels' reusable buffers: as many blocks of min(largest chunk, the device's block) and
             whole-chunk buffers as the method declares (`Operator.scratch_bytes`); the compiled formula
             writes none
  evaluator  the larger of one-pass scoring, one batch of logits (batch x tokens x vocab, float32) and the
             hidden states of a layer, and generation: the engine's preallocated KV cache (batch slots x
             the generated tokens plus a prompt, keys and values of every layer; the few-shot prefix shared
             by a batch is held once and not counted) and the prefill's hidden states
  fit        with a fit: one gradient at a time, activations kept for the backward pass, and the
             linear parts of methods whose parts are not the task vectors themselves (with streaming, of
             every method: the fit copies them to the device)

`choose_streaming` turns `merge.streaming: auto` into a decision against the free memory, saying why.
The numbers are estimates (allocator rounding, CUDA context, library workspaces come on top: `HEADROOM`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from mergesearch import operators
from mergesearch.checkpoints import TensorInfo, parse_dtype
from mergesearch.config import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, LMEVAL_MAX_GEN_TOKS
from mergesearch.evaluate.tasks import is_lmeval_spec

log = logging.getLogger(__name__)

HEADROOM = 0.10  # share of the free memory left for the CUDA context, allocator rounding, cuBLAS workspaces
GiB = 1 << 30
# A row's prompt past the shared few-shot prefix, in tokens, for the KV cache of generation: a guess (the
# estimate does not read the tasks), on top of the most tokens a task generates.
PROMPT_TOKENS = 128


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a study needs on its merge device (see the module docstring for each part)."""

    device: str
    streaming: bool
    sources: int  # on the device (streaming: the largest tensor's only)
    host_sources: int  # in host memory (streaming), else 0
    # state a merge keeps in host memory, streaming or not: TIES's rank order on a GPU (on the CPU it is in
    # `sources`), DARE's kept-L1 tables on every device (an upper bound: 2**16 values per chunk and expert at most)
    host_state: int
    model: int
    scratch: int
    evaluator: int
    fit: int
    host_what: str = ""  # what `host_state` holds (Operator.host_state_doc)

    @property
    def total(self) -> int:
        return self.sources + self.model + self.scratch + self.evaluator + self.fit

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def estimate(tensors: Sequence[TensorInfo], n_experts: int, method: str, dtype: str | torch.dtype, *,
             device: str | torch.device = "cuda", streaming: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
             tokens: int = 256, gen_tokens: int | None = None, vocab: int | None = None, hidden: int | None = None,
             fit: bool = False, chunks: int = 1) -> MemoryEstimate:
    """The memory a study on these tensors needs on `device` (shapes only: a meta-device model will do).
    `tokens`: a scored row's length; `gen_tokens`: the KV cache's length per slot when generating (default:
    short answers, `generated_tokens` of a study whose tasks set no `max_new_tokens`); `chunks`: the most row
    chunks a tensor is split into (`study_chunks`), each with its own DARE kept-L1 table."""
    size = torch.finfo(parse_dtype(dtype)).bits // 8
    floats = [t for t in tensors if t.dtype.is_floating_point]
    n = sum(t.numel for t in floats)
    largest = max((t.numel for t in floats), default=0)
    op = operators.get(method)
    state_bytes = op.stored_state_bytes(device)  # DARE's and DELLA's uniforms are not stored on CUDA
    per_entry = size * (1 + n_experts) + state_bytes * n_experts
    resident = n * per_entry
    block = operators.block_entries(device)
    scratch = op.scratch_bytes(n_experts, largest, block, size)
    if vocab is None or hidden is None:  # from the embedding: (vocab, hidden)
        emb = max(floats, key=lambda t: t.numel if len(t.shape) == 2 else 0, default=None)
        vocab, hidden = (emb.shape[0], emb.shape[1]) if emb is not None and len(emb.shape) == 2 else (1, 1)
    scoring = batch_size * tokens * (vocab * 4 + 8 * hidden * size)
    gen = PROMPT_TOKENS + DEFAULT_MAX_NEW_TOKENS if gen_tokens is None else gen_tokens
    generation = batch_size * gen * (kv_bytes_per_token(floats, hidden, size) + 8 * hidden * size) \
        + batch_size * vocab * 4
    evaluator = max(scoring, generation)
    # DARE's kept-L1 tables: at most 2**16 values per chunk and expert
    tables = op.table_bytes * n_experts * sum(min(t.numel, chunks << 16) for t in floats)
    fit_bytes = 0
    if fit:
        layers = _layers(floats)
        # task arithmetic's parts are the task vectors themselves (a fit runs it at lambda 1: parts_are_deltas),
        # unless they are streamed: the fit then holds a device copy of every one for its session
        # (CoefficientFitter.linear_parts); the other fittable methods' parts (masked, rescaled) are copies
        parts = 0 if op.parts_are_deltas and not streaming else n * n_experts * size
        fit_bytes = largest * size + batch_size * tokens * hidden * layers * 16 * size + parts
    return MemoryEstimate(device=str(device), streaming=streaming,
                          sources=largest * per_entry if streaming else resident,
                          host_sources=resident if streaming else 0,
                          host_state=n * n_experts * op.host_state_bytes(device) + tables, model=n * size,
                          scratch=scratch, evaluator=evaluator, fit=fit_bytes, host_what=op.host_state_doc)


def kv_bytes_per_token(tensors: Sequence[TensorInfo], hidden: int, size: int) -> int:
    """Bytes of keys and values one token takes in a KV cache of every layer: 2 x the key projection's
    output width (grouped-query attention: the key-value heads only) per layer; a model without `k_proj`
    tensors (GPT-2's fused `c_attn`) counts `hidden` per layer."""
    kv = [t.shape[0] for t in tensors if t.name.endswith("k_proj.weight") and len(t.shape) == 2]
    if kv:
        return 2 * sum(kv) * size
    return 2 * _layers(tensors) * hidden * size


def _layers(tensors: Sequence[TensorInfo]) -> int:
    """Decoder layers, counted by their input norms (Llama/Qwen2/Mistral, GPT-2); at least 1."""
    return max(1, sum(1 for t in tensors if t.name.endswith(("input_layernorm.weight", "ln_1.weight"))))


def generated_tokens(cfg) -> int:
    """The KV cache's length per slot a study's evaluator needs, estimated from its tasks: the most tokens
    any of them generates (`max_new_tokens`; else DEFAULT_MAX_NEW_TOKENS, or LMEVAL_MAX_GEN_TOKS for an lm-eval
    task) + PROMPT_TOKENS."""
    def most(t) -> int:
        if t.max_new_tokens is not None:
            return t.max_new_tokens
        return LMEVAL_MAX_GEN_TOKS if is_lmeval_spec(t.calib) else DEFAULT_MAX_NEW_TOKENS

    return PROMPT_TOKENS + max((most(t) for t in cfg.objectives.tasks), default=DEFAULT_MAX_NEW_TOKENS)


def free_bytes(device: str | torch.device) -> int:
    """Free memory on `device` now: the GPU's (cudaMemGetInfo), or the host's available RAM."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def fits(est: MemoryEstimate, free: int) -> bool:
    return _within(est.total, free)


def _within(nbytes: int, free: int) -> bool:
    """Whether `nbytes` fit `free` bytes, `HEADROOM` left over."""
    return nbytes <= (1.0 - HEADROOM) * free


def choose_streaming(setting: bool | str, resident: MemoryEstimate, free: int) -> tuple[bool, str]:
    """`merge.streaming` resolved: True/False as given; `auto` streams when the resident plan does not fit."""
    if setting != "auto":
        return bool(setting), f"streaming {'on' if setting else 'off'} (merge.streaming: {str(setting).lower()})"
    if torch.device(resident.device).type == "cpu":
        return False, "streaming off (auto): on the CPU the sources are in host memory either way"
    if fits(resident, free):
        return False, (f"streaming off (auto): resident sources need {resident.total / GiB:.1f} GiB of "
                       f"{free / GiB:.1f} GiB free on {resident.device}")
    return True, (f"streaming on (auto): resident sources would need {resident.total / GiB:.1f} GiB, "
                  f"{resident.device} has {free / GiB:.1f} GiB free: sources stay in host memory and are "
                  "copied per tensor")


def study_estimates(cfg, tensors: Sequence[TensorInfo], n_experts: int) -> dict:
    """Both plans of a study (sources resident, streaming) on its device, the free memory now and the
    choice `merge.streaming` makes there: what `validate` reports."""
    from mergesearch.checkpoints import resolve_device
    from mergesearch.errors import CheckpointError

    try:
        dev, missing = resolve_device(cfg.merge.device), None
    except CheckpointError as exc:  # validating on another machine than the one that will run it
        dev, missing = torch.device(cfg.merge.device), str(exc)
    kw = {"device": dev, "batch_size": cfg.objectives.batch_size, "fit": cfg.fit is not None,
          "gen_tokens": generated_tokens(cfg), "chunks": study_chunks(cfg)}
    resident = estimate(tensors, n_experts, cfg.merge.method, cfg.merge.dtype, streaming=False, **kw)
    streamed = estimate(tensors, n_experts, cfg.merge.method, cfg.merge.dtype, streaming=True, **kw)
    if missing:
        return {"resident": resident.as_dict(), "streaming": streamed.as_dict(), "free": 0, "streams": None,
                "why": f"not decided here: {missing}", "host_warning": None}
    free = free_bytes(dev)
    streaming, why = choose_streaming(cfg.merge.streaming, resident, free)
    return {"resident": resident.as_dict(), "streaming": streamed.as_dict(), "free": free,
            "streams": streaming, "why": why, "host_warning": host_shortfall(resident, cfg.merge.method)}


def study_chunks(cfg) -> int:
    """The most row chunks a study splits a tensor into: the fit's where there is one (the materialiser merges its
    fitted coefficients' chunks), else the search space's; `chunks: auto` at most `max_chunks`."""
    chunking = cfg.fit if cfg.fit is not None else cfg.space
    return chunking.max_chunks if chunking.chunks == "auto" else chunking.chunks


def host_shortfall(est: MemoryEstimate, method: str, free: int | None = None) -> str | None:
    """A warning where the state a merge keeps in host memory whether streaming or not (`host_state`: TIES's rank
    order on CUDA, DARE's kept-L1 tables) will not fit the host's available memory (`free`: now), else None."""
    free = free_bytes("cpu") if free is None else free
    if not est.host_state or not free or _within(est.host_state, free):
        return None
    fix = ("fewer experts, or a method without magnitude ranks such as dare_ties" if "magnitude" in est.host_what
           else "fewer experts")
    return (f"{method} keeps its {est.host_what} in host memory on {est.device}: "
            f"{est.host_state / GiB:.1f} GiB, and the host has {free / GiB:.1f} GiB available (expect swapping or "
            f"an out-of-memory kill: {fix})")


def format_estimate(est: dict, free: int | None = None) -> list[str]:
    """Lines for `validate`: the parts of the estimate, in GiB."""
    parts = ", ".join(f"{k} {est[k] / GiB:.2f}" for k in ("sources", "model", "scratch", "evaluator", "fit")
                      if est[k])
    line = (f"device memory on {est['device']} ({'streaming' if est['streaming'] else 'sources resident'}): "
            f"{est['total'] / GiB:.2f} GiB ({parts} GiB)")
    if est["host_sources"]:
        line += f"; host memory for the streamed sources {est['host_sources'] / GiB:.2f} GiB"
    if est.get("host_state"):
        line += f"; host memory for the {est['host_what']} {est['host_state'] / GiB:.2f} GiB"
    lines = [line]
    if free is not None:
        lines.append(f"free on {est['device']} now: {free / GiB:.1f} GiB")
    return lines
