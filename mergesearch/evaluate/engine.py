"""The generation engine: batched greedy decoding for every exact-match path that has to generate.

Used by the evaluator (exact match the one-pass shortcut cannot decide, chains with `extract`), by the
lm-eval model (`generate_until`) and by the distill fit, on either device:

- a preallocated KV cache (`SlotCache`): per layer one (slots, kv_heads, length, head_dim) key and value
  tensor written in place, each row at its own positions;
- prompts sorted by length, longest first; the prefix every prompt of a run shares (a task template, a
  fixed few-shot block) computed once; its keys and values are kept once per layer and attended by all
  rows in one product (cascade.py), or, with fixed shapes, copied into every slot;
- a row ends at EOS or a one-token stop, or once its text holds one of its stop strings (lm-eval's
  `until`: the caller cuts the text at the first occurrence of any); only the last few tokens are
  decoded to look for a stop, and only when the newest token could end one;
- a finished row's slot is refilled with the next waiting prompt, so the batch stays full;
- fixed shapes (`fixed_shapes`): the decode step always runs every slot over the whole cache length, so
  that on CUDA it can be captured once as a CUDA graph and replayed. The materialiser writes weights
  in place (`copy_`), so a captured graph stays valid across candidates; the cached keys and values
  of one run are never reused by the next (every run prefills again).

The result of a row is the token list greedy decoding emits (the stop token included), the same as
HF `generate` (greedy, left padding) gives for that prompt.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from mergesearch.evaluate import _scoring as scoring
from mergesearch.evaluate import cascade

log = logging.getLogger(__name__)

# Slots are refilled once 1/REFILL_FRACTION of the batch is free (each refill is one prefill pass); with no
# prompt waiting, the finished slots are dropped as often (each drop moves the live rows' cache).
REFILL_FRACTION = 8
# Tokens decoded to look for a stop string: enough for its characters at 4 bytes each (byte-level BPE).
_BYTES_PER_CHAR = 4


@dataclass(frozen=True)
class GenRequest:
    """One prompt to continue greedily."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()  # tokens that end generation (kept in the output)
    until: tuple[str, ...] = ()  # stop strings looked for in the decoded text


@functools.lru_cache(maxsize=None)
def _keep_kw(model_type: type) -> str | None:
    """The forward argument that limits the logits to the last positions (`logits_to_keep` in current
    transformers, `num_logits_to_keep` before); None where the model has neither."""
    params = inspect.signature(model_type.forward).parameters
    return next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)


class SlotCache(Cache):
    """Preallocated keys and values, one row per slot, each row written at its own positions.

    Before each forward the engine sets which slots the input rows are (`rows`, None: every slot in
    order), the cache position of every input token (`write_pos`) and how many positions the
    attention reads (`view`). `update` is what the model's attention layers call.
    """

    def __init__(self, n_layers: int, slots: int, length: int):
        try:
            super().__init__(layers=[])  # transformers >= 4.56: a cache is a list of layers; ours are below
        except TypeError:
            super().__init__()
        self.n_layers, self.slots, self.length = n_layers, slots, length
        self.keys_: list[torch.Tensor | None] = [None] * n_layers  # (slots, kv_heads, length, head_dim)
        self.values_: list[torch.Tensor | None] = [None] * n_layers
        self.rows: torch.Tensor | None = None  # (R,)
        self.write_pos: torch.Tensor | None = None  # (R, q)
        self.view = length
        self.width = slots  # decode runs over slots [0, width)
        # with a cascade prefix (set_prefix): its keys and values once per layer (kv_heads, prefix, head_dim),
        # float32; the slots hold only the positions after it, and `update` returns only those
        self.prefix = 0
        self.prefix_keys: list[torch.Tensor] = []
        self.prefix_values: list[torch.Tensor] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys_[layer_idx] is None:
            shape = (self.slots, key_states.shape[1], self.length, key_states.shape[3])
            self.keys_[layer_idx] = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
            vshape = (self.slots, value_states.shape[1], self.length, value_states.shape[3])
            self.values_[layer_idx] = torch.zeros(vshape, dtype=value_states.dtype, device=value_states.device)
        keys, values = self.keys_[layer_idx], self.values_[layer_idx]
        if self.rows is None:  # decode: slots [0, width), one token each
            w = self.width
            slot = torch.arange(w, device=keys.device)
            pos = self.write_pos[:, 0]
            keys[slot, :, pos] = key_states[:, :, 0]
            values[slot, :, pos] = value_states[:, :, 0]
            return keys[:w, :, self.prefix: self.view], values[:w, :, self.prefix: self.view]
        rows = self.rows[:, None]
        keys[rows, :, self.write_pos] = key_states.transpose(1, 2)  # (R, q, heads, head_dim)
        values[rows, :, self.write_pos] = value_states.transpose(1, 2)
        return keys[self.rows, :, self.prefix: self.view], values[self.rows, :, self.prefix: self.view]

    def broadcast_prefix(self, n: int) -> None:
        """Copy slot 0's first `n` positions (the shared prefix) into every slot."""
        for keys, values in zip(self.keys_, self.values_):
            if keys is not None:
                keys[1:, :, :n] = keys[:1, :, :n]
                values[1:, :, :n] = values[:1, :, :n]

    def set_prefix(self, n: int) -> None:
        """Keep slot 0's first `n` positions (the shared prefix) once, for the cascade attention; from now on
        the slots hold, and `update` returns, only the positions after it."""
        self.prefix_keys = [k[0, :, :n].to(torch.float32, copy=True) for k in self.keys_]
        self.prefix_values = [v[0, :, :n].to(torch.float32, copy=True) for v in self.values_]
        self.prefix = n

    def compact(self, keep: list[int], used: int) -> None:
        """Move the slots `keep` to the front (in that order) and decode only those from now on.

        `used`: the cache positions any of them has written (those below it); only those are moved."""
        idx = torch.tensor(keep, device=self.keys_[0].device)
        lo, hi = self.prefix, min(used, self.length)
        for layer in range(self.n_layers):
            self.keys_[layer][: len(keep), :, lo:hi] = self.keys_[layer][idx, :, lo:hi]
            self.values_[layer][: len(keep), :, lo:hi] = self.values_[layer][idx, :, lo:hi]
        self.width = len(keep)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # every forward passes its own position ids


class _Row:
    """A slot's current request and what it has generated so far."""

    __slots__ = ("index", "request", "tokens", "pos", "budget", "window")

    def __init__(self, index: int, request: GenRequest, pos: int, budget: int):
        self.index, self.request, self.tokens, self.pos, self.budget = index, request, [], pos, budget
        longest = max((len(u) for u in request.until), default=0)
        self.window = _BYTES_PER_CHAR * longest + 2


class GenerationEngine:
    """Greedy decoding of many prompts on one model, `batch_size` rows at a time (see the module docstring).

    decode: token ids -> text (skipping special tokens), used to look for stop strings (needed only by
    requests that have some).
    max_len: the model's context; a row ends when its next position would not fit (None: no limit).
    fixed_shapes: every decode step runs all slots over the whole cache (what a CUDA graph needs);
    cuda_graphs: capture that step on CUDA (implies fixed shapes); a failed capture falls back to eager.
    """

    def __init__(self, model, *, batch_size: int, pad_id: int, decode: Callable[[list[int]], str] | None = None,
                 max_len: int | None = None, fixed_shapes: bool | None = None, cuda_graphs: bool | None = None):
        self.model = model
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.decode = decode
        self.max_len = max_len
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        # the device decides, here only: CUDA replays a captured step, the CPU runs the shapes it needs
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.fixed_shapes = self.cuda_graphs if fixed_shapes is None else (fixed_shapes or self.cuda_graphs)
        self.n_layers = model.config.get_text_config().num_hidden_layers
        self._cache: SlotCache | None = None
        self._graph = None  # (graph, token buffer, position buffer, next-token buffer)
        self._pieces: dict[int, str] = {}
        self.graph_failed: str | None = None

    @property
    def graph_state(self) -> str:
        """'captured', 'failed: <why>' (decoding eagerly with fixed shapes) or 'off'."""
        if self._graph is not None:
            return "captured"
        return f"failed: {self.graph_failed}" if self.graph_failed else "off"

    # --- one forward ------------------------------------------------------------------------------

    def _forward(self, cache: SlotCache, ids, pos, mask, keep_last: bool):
        kw = {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "use_cache": True}
        keep = _keep_kw(type(self.model)) if keep_last else None
        if keep is not None:
            kw[keep] = 1
        if not cache.prefix:
            return scoring.forward(self.model, cache, **kw).logits[:, -1]  # (R, V)
        with cascade.selected(self.model):
            return scoring.forward(self.model, cache, **kw, **{cascade.KWARG: cache}).logits[:, -1]

    def _mask(self, query_pos: torch.Tensor, view: int) -> torch.Tensor:
        """Additive mask (R, 1, q, view): a query at position p reads the cache positions <= p."""
        dtype = self.model.dtype
        cols = torch.arange(view, device=query_pos.device)
        allowed = cols[None, None, :] <= query_pos[:, :, None]  # (R, q, view)
        return torch.zeros(allowed.shape, dtype=dtype, device=query_pos.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)[:, None]

    def _prefill(self, cache: SlotCache, slots: list[int], prompts: list[tuple[int, ...]], start: int) -> list[int]:
        """Run each prompt's tokens after the shared prefix into its slot; the first generated token of each.

        Left padding, so every row's last token is the last column and only those logits are computed;
        a pad column writes at a position after its row's tokens, which decoding overwrites before any
        query reads it."""
        tails = [p[start:] for p in prompts]
        q = max(len(t) for t in tails)
        ids = torch.full((len(tails), q), self.pad_id, dtype=torch.long)
        pos = torch.empty((len(tails), q), dtype=torch.long)
        for r, t in enumerate(tails):
            n_pad = q - len(t)
            ids[r, n_pad:] = torch.tensor(t)
            pos[r, n_pad:] = torch.arange(start, start + len(t))
            pos[r, :n_pad] = torch.arange(start + len(t), start + len(t) + n_pad)
        ids, pos = ids.to(self.device), pos.to(self.device)
        cache.rows = torch.tensor(slots, device=self.device)
        cache.write_pos = pos
        cache.view = cache.length if self.fixed_shapes else start + q + 1
        # a pad query reads its own position at most (its row's real tokens lie before it): no empty rows
        logits = self._forward(cache, ids, pos, self._mask(pos, cache.view), keep_last=True)
        return logits.argmax(-1).tolist()

    def _decode_step(self, cache: SlotCache, tokens: torch.Tensor, pos: torch.Tensor) -> list[int]:
        """One token for every slot in [0, width): tokens (w,), pos (w,) the positions they take."""
        if self._graph is not None:
            graph, tok_buf, pos_buf, out_buf = self._graph
            tok_buf.copy_(tokens[:, None])
            pos_buf.copy_(pos[:, None])
            graph.replay()
            return out_buf.tolist()
        cache.rows = None
        cache.write_pos = pos[:, None]
        cache.view = cache.length if self.fixed_shapes else int(pos.max()) + 1
        logits = self._forward(cache, tokens[:, None], pos[:, None], self._mask(pos[:, None], cache.view), False)
        return logits.argmax(-1).tolist()

    def _capture(self, cache: SlotCache) -> None:
        """Capture the fixed-shape decode step as a CUDA graph (eager fallback, logged, if that fails)."""
        b = cache.slots
        tok_buf = torch.zeros((b, 1), dtype=torch.long, device=self.device)
        pos_buf = torch.full((b, 1), cache.length - 1, dtype=torch.long, device=self.device)

        def step():
            cache.rows = None
            cache.write_pos = pos_buf
            cache.view = cache.length
            logits = self._forward(cache, tok_buf, pos_buf, self._mask(pos_buf, cache.length), False)
            return logits.argmax(-1)

        # Everything on the model's device, the capture stream included: torch.cuda.graph's own side stream
        # is the current device's, and on cuda:1 of a process whose current device is cuda:0 the model's
        # kernels would go to cuda:1's stream, outside the capture (an empty graph that replays nothing).
        with torch.cuda.device(self.device):
            main = torch.cuda.current_stream(self.device)
            try:
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up writes only position length - 1, overwritten before it is read
                        step()
                main.wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    out_buf = step()
                self._graph = (graph, tok_buf, pos_buf, out_buf)
            except Exception as exc:  # capture fails for many reasons (host syncs in a model's forward, ...)
                # a capture that failed inside CUDA leaves its stream current (torch.cuda.graph ends the
                # capture before it restores the stream): back to the device's own for the eager decode
                torch.cuda.set_stream(main)
                self.graph_failed = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed (%s); decoding eagerly with fixed shapes", self.graph_failed)
                self._graph = None

    def _cache_for(self, slots: int, length: int) -> SlotCache:
        """The run's cache: kept (with its captured graph) while the shapes fit, else built anew."""
        if self.fixed_shapes and self._cache is not None and self._cache.slots == slots \
                and self._cache.length >= length:
            self._cache.width = slots
            return self._cache
        self._graph = None
        cache = SlotCache(self.n_layers, slots, length)
        if self.fixed_shapes:
            self._cache = cache
        return cache

    # --- stop strings -----------------------------------------------------------------------------

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.decode([token])
        return piece

    def _hit_stop_string(self, row: _Row) -> bool:
        """Whether the row's text now holds one of its stop strings (exact: confirmed on the full text)."""
        until = row.request.until
        piece = self._piece(row.tokens[-1])
        # the newest token can complete a stop only if its text holds the stop's last character (or its
        # text is not known alone: empty, or part of a multi-byte character)
        if piece and "\ufffd" not in piece and not any(u[-1] in piece for u in until):
            return False
        tail = self.decode(row.tokens[-row.window:])
        if not any(u in tail for u in until):
            return False
        text = self.decode(row.tokens)
        return any(u in text for u in until)

    # --- the loop ---------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenRequest]) -> list[list[int]]:
        """Greedy continuations of every request (the stop token included), in the requests' order."""
        if not requests:
            return []
        if self.decode is None and any(r.until for r in requests):
            raise ValueError("stop strings need the engine's decode function")
        if any(not r.prompt for r in requests):
            raise ValueError("an empty prompt: greedy decoding needs at least one token to start from")
        # always in inference mode: the kept cache (and a captured graph) must never meet autograd state
        with torch.inference_mode():
            return self._generate(requests)

    def _generate(self, requests: Sequence[GenRequest]) -> list[list[int]]:
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].prompt), requests[i].prompt))
        prompts = [requests[i].prompt for i in order]
        shared = 0
        if len(prompts) > 1:
            shared = scoring.lcp([list(p) for p in prompts], min(len(p) for p in prompts) - 1)
        if shared < scoring.MIN_PREFIX:
            shared = 0
        budgets = []
        for r in requests:
            room = r.max_new_tokens if self.max_len is None else min(r.max_new_tokens, self.max_len - len(r.prompt))
            budgets.append(max(1, room))
        length = max(len(r.prompt) + b for r, b in zip(requests, budgets))
        slots = min(self.batch_size, len(requests))
        if self.fixed_shapes:
            slots = self.batch_size
        cache = self._cache_for(slots, length)
        if shared:
            cache.rows = torch.zeros(1, dtype=torch.long, device=self.device)
            pos = torch.arange(shared, device=self.device)[None]
            cache.write_pos = pos
            cache.view = cache.length if self.fixed_shapes else shared
            self._forward(cache, torch.tensor([prompts[0][:shared]], device=self.device), pos,
                          self._mask(pos, cache.view), keep_last=True)
            if self.fixed_shapes or not cascade.supports(self.model, length):
                cache.broadcast_prefix(shared)  # a fixed-shape step reads every slot's whole cache
            else:
                cache.set_prefix(shared)
        if self.cuda_graphs and self._graph is None and self.graph_failed is None:
            self._capture(cache)
        results: list[list[int] | None] = [None] * len(requests)
        waiting = list(order)  # request indices, longest prompt first
        rows: list[_Row | None] = [None] * cache.slots
        next_tok = [self.pad_id] * cache.slots
        pos_of = [cache.length - 1] * cache.slots

        def fill(free: list[int]) -> None:
            take = [waiting.pop(0) for _ in free[: len(waiting)]]
            free = free[: len(take)]
            first = self._prefill(cache, free, [requests[i].prompt for i in take], shared)
            for slot, i, tok in zip(free, take, first):
                row = _Row(i, requests[i], len(requests[i].prompt), budgets[i])
                rows[slot] = row
                self._accept(row, tok, results)
                if results[i] is not None:
                    rows[slot] = None
                else:
                    next_tok[slot], pos_of[slot] = tok, row.pos

        fill(list(range(cache.slots)))
        while True:
            active = [s for s in range(cache.width) if rows[s] is not None]
            free = [s for s in range(cache.width) if rows[s] is None]
            enough_free = len(free) >= max(1, cache.width // REFILL_FRACTION)
            if waiting and (not active or enough_free):
                fill(free)
                continue
            if not active:
                break
            if not waiting and not self.fixed_shapes and enough_free:
                # only finished slots are dropped (the rows keep their order): a decode step's cost is its rows
                cache.compact(active, used=max(pos_of[s] for s in active))
                rows[: len(active)] = [rows[s] for s in active]
                next_tok[: len(active)] = [next_tok[s] for s in active]
                pos_of[: len(active)] = [pos_of[s] for s in active]
                for s in range(len(active), cache.slots):
                    rows[s] = None
                continue
            w = cache.width
            toks = torch.tensor(next_tok[:w], device=self.device)
            pos = torch.tensor(pos_of[:w], device=self.device)
            out = self._decode_step(cache, toks, pos)
            for s in active:
                row = rows[s]
                row.pos += 1
                self._accept(row, out[s], results)
                if results[row.index] is not None:
                    rows[s] = None
                else:
                    next_tok[s], pos_of[s] = out[s], row.pos
        return results

    def _accept(self, row: _Row, token: int, results: list) -> None:
        """Append a generated token; store the row's result when it has ended."""
        row.tokens.append(token)
        req = row.request
        if (token in req.stop_ids or len(row.tokens) >= row.budget
                or (req.until and self._hit_stop_string(row))):
            results[row.index] = row.tokens
