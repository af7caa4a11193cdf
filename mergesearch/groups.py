"""One flat layout for a model's large chunks, so that a merge method with a `group` kernel merges them in one call.

Why: on a GPU a compiled call costs ~0.1 ms of host time (guards, the wrapper, the launch), more than the kernel of
a mid-sized chunk, so a candidate merged chunk by chunk is bounded by the host (a 0.5B model has ~110 chunks large
enough to compile). Here the sources of those chunks (base, task vectors, the method's per-entry state) and the
model's own parameters are views into flat buffers, one per source, in the same order; every chunk is a whole
number of blocks of B entries (B: the gcd of their sizes), so that the buffers viewed as (blocks, B) let the
candidate's numbers vary by block (operators' `group` contract). The buffers are filled as the sources are read:
no second copy of the model is ever held.

Used by the materialiser only; the rest of the package sees the same per-tensor views as before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from mergesearch.checkpoints import TensorInfo

__all__ = ["Group", "plan_group"]

MIN_BLOCK = 16  # a smaller gcd (odd shapes): the per-block numbers would cost more reads than they save


class Group:
    """The tensors `members` (indices into the materialiser's tensors), each split into its chunks of `sizes`
    entries, laid out one after another in flat buffers of `total` entries, in blocks of `block` entries."""

    def __init__(self, members: list[int], shapes: dict[int, tuple[int, ...]], bounds: dict[int, list],
                 block: int):
        self.members, self.block = members, block
        self.offsets: dict[int, int] = {}  # tensor -> first entry
        self.chunk_offsets: dict[tuple[int, int], int] = {}  # (tensor, chunk) -> first entry
        self.chunk_index: dict[tuple[int, int], int] = {}  # (tensor, chunk) -> its place in `sizes`
        self.sizes: list[int] = []  # entries per chunk, in layout order
        self.shapes = shapes
        at = 0
        for i in members:
            row = math.prod(shapes[i][1:])
            self.offsets[i] = at
            for c, (lo, hi) in enumerate(bounds[i]):
                self.chunk_offsets[i, c] = at + lo * row
                self.chunk_index[i, c] = len(self.sizes)
                self.sizes.append((hi - lo) * row)
            at += math.prod(shapes[i])
        self.total = at
        self.buffers: dict[object, torch.Tensor] = {}  # slot -> (total,) flat buffer
        self.state: dict[str, object] = {}  # the group's state (operators' `group` contract), made by `add_state`
        self._norms: dict[str, list[torch.Tensor]] = {}  # per-chunk (E,) state tensors, stacked by `finish_state`
        self._host: dict[str, list] = {}  # per-chunk state that is not tensors (kept in host memory), listed

    def __contains__(self, i: int) -> bool:
        return i in self.offsets

    def _buffer(self, slot, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(slot)
        if buf is None:
            buf = self.buffers[slot] = torch.empty(self.total, dtype=like.dtype, device=like.device)
        return buf

    def place(self, slot, i: int, t: torch.Tensor) -> torch.Tensor:
        """Copy tensor i's values `t` into the flat buffer `slot` and return its view there (t's shape)."""
        at = self.offsets[i]
        view = self._buffer(slot, t)[at:at + t.numel()].view(t.shape)
        view.copy_(t)
        return view

    def view(self, slot, i: int, like: torch.Tensor) -> torch.Tensor:
        """Tensor i's view in the flat buffer `slot` (made like `like`: dtype, device), without a copy."""
        at = self.offsets[i]
        return self._buffer(slot, like)[at:at + math.prod(self.shapes[i])].view(self.shapes[i])

    def add_state(self, i: int, c: int, state: dict) -> dict:
        """Chunk c of tensor i's prepared state, its per-entry tensors moved into the group's flat buffers (the
        returned dict holds their views); its (E,) tensors (norms) and its other values (host-memory state such as
        TIES's rank order on CUDA) are kept for `finish_state`."""
        at, n = self.chunk_offsets[i, c], self.sizes[self.chunk_index[i, c]]
        out = {}
        for key, value in state.items():
            if isinstance(value, list) and all(isinstance(v, torch.Tensor) and v.numel() == n for v in value):
                views = []
                for e, v in enumerate(value):
                    view = self._buffer(("state", key, e), v)[at:at + n].view(v.shape)
                    view.copy_(v)
                    views.append(view)
                out[key] = views
            else:
                if isinstance(value, torch.Tensor):
                    self._norms.setdefault(key, []).append(value)
                else:
                    self._host.setdefault(key, []).append(value)
                out[key] = value
        return out

    def finish_state(self, n_experts: int, device: torch.device) -> None:
        """Make the group's state: each per-entry state as (blocks, B) views per expert, each per-chunk (E,) state
        stacked to (chunks, E) (norms, the uniforms' keys; any per-chunk tensors of one shape are stacked so), each
        other per-chunk value as a list in layout order
        (or joined into one by its type's `join`: DARE's kept L1 lookup),
        "cob" (blocks,) int64 each block's chunk, and "at" (blocks, 1) int64 each block's first entry in its
        chunk."""
        for slot, buf in self.buffers.items():
            if isinstance(slot, tuple) and slot[0] == "state":
                _, key, e = slot
                self.state.setdefault(key, [None] * n_experts)[e] = self.blocks(buf)
        for key, rows in self._norms.items():  # per-chunk tensors of differing shapes (model_stock's per-row
            # factors, which its group does not read) stay a list in layout order
            self.state[key] = torch.stack(rows) if len({r.shape for r in rows}) == 1 else rows
        for key, rows in self._host.items():  # one per chunk, or one for the group where its type can join them
            join = getattr(type(rows[0]), "join", None)
            self.state[key] = join(rows) if join is not None else rows
        counts = torch.tensor([n // self.block for n in self.sizes])
        cob = torch.repeat_interleave(torch.arange(len(self.sizes)), counts)
        self.state["cob"] = cob.to(device)
        # (blocks, 1) int64: each block's first entry within its chunk (hashed uniforms count entries per chunk)
        first = torch.cumsum(counts, 0) - counts
        self.state["at"] = ((torch.arange(len(cob)) - first[cob]) * self.block).view(-1, 1).to(device)
        self._norms, self._host = {}, {}

    def blocks(self, buf: torch.Tensor) -> torch.Tensor:
        """A flat buffer viewed as (blocks, B)."""
        return buf.view(-1, self.block)


def plan_group(tensors: Sequence[TensorInfo], bounds: Sequence[list], wanted: Sequence[bool]) -> Group | None:
    """The group of the tensors `wanted` (every chunk large enough for the compiled formula, in its dtypes), or
    None: none wanted, MERGESEARCH_GROUPED=0, or chunk sizes whose gcd is under MIN_BLOCK."""
    if os.environ.get("MERGESEARCH_GROUPED", "") == "0":
        return None
    members = [i for i, w in enumerate(wanted) if w and tensors[i].shape]
    if not members:
        return None
    shapes = {i: tuple(tensors[i].shape) for i in members}
    sizes = [(hi - lo) * math.prod(shapes[i][1:]) for i in members for lo, hi in bounds[i]]
    block = math.gcd(*sizes)
    if block < MIN_BLOCK:
        return None
    return Group(members, shapes, {i: bounds[i] for i in members}, block)
