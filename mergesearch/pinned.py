"""Page-locked host memory for streamed sources, packed into slabs.

Streaming keeps a study's sources (base, task vectors, precomputed state) in page-locked host memory so that
each tensor's copy to the GPU is asynchronous and at full bus speed. Pinning them one by one through torch
(`Tensor.pin_memory()`) costs up to twice their size: torch's pinned allocator rounds every allocation up to a
power of two (ATen/core/CachingHostAllocator.h; a Llama-2-7B MLP weight of 86 MiB takes 128), and page-locked
memory cannot be swapped. `PinnedArena` takes a few large slabs instead and places the tensors in them one
after another: the waste is the unused end of each slab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SLAB_BYTES = 1 << 30  # a power of two: what torch's allocator would round a slab to anyway
ALIGN = 512  # every tensor starts on this byte boundary (any dtype's alignment; DMA-friendly)


def _pinned_bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8, pin_memory=True)


class PinnedArena:
    """Copies tensors into page-locked slabs; each copy is a view of its slab (`is_pinned()` is True on CUDA).

    `alloc(n)` returns n bytes (a uint8 tensor): torch's pinned allocator by default; tests pass plain memory
    to run the packing on a machine without CUDA. A tensor larger than a slab gets an allocation of its own.
    Nothing is ever freed: the arena lives as long as the sources it holds.
    """

    def __init__(self, slab_bytes: int | None = None, alloc: Callable[[int], torch.Tensor] | None = None):
        self.slab_bytes = slab_bytes or SLAB_BYTES
        self._alloc = alloc or _pinned_bytes
        self._slab: torch.Tensor | None = None
        self._used = 0
        self.reserved = 0  # bytes allocated (slabs and tensors of their own)
        self.stored = 0  # bytes of the tensors copied in

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A page-locked copy of `t` (contiguous, same dtype and shape)."""
        n = t.numel() * t.element_size()
        if n > self.slab_bytes:
            buf = self._alloc(n)
            self.reserved += n
        else:
            start = -(-self._used // ALIGN) * ALIGN
            if self._slab is None or start + n > self.slab_bytes:
                self._slab = self._alloc(self.slab_bytes)
                self.reserved += self.slab_bytes
                start = 0
            buf = self._slab[start:start + n]
            self._used = start + n
        self.stored += n
        out = buf.view(t.dtype).view(t.shape)
        out.copy_(t)
        return out
