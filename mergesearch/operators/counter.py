"""Counter-based uniform numbers for DARE and DELLA: u = hash(key, j), entry j of a chunk, one key per expert and chunk.

Why not torch.rand: a field drawn from a generator must be stored (4 bytes per entry and expert) and read by every
candidate; on a GPU that read is most of a DARE candidate's bytes (a bf16 delta is 2). A hash of the entry's index
is computed where it is used: the compiled formula on CUDA computes it in the kernel and reads nothing
(operators/fused.py), while the CPU, where integer arithmetic costs more than the read, keeps the field stored
(`prepare`). Both give the same numbers bit for bit, so a seed gives the same masks on every device and path.

The hash is two rounds of a 32-bit integer mix (a "hash prospector" triple by C. Wellons, both multipliers below
2**31) with the key between them. Computed in int64 holding 32-bit values (every product fits: the CPU's C++ and
eager torch never overflow), or in wrapping int32 (a GPU's native width; int64 multiplies are emulated there),
which gives the same low 32 bits: tests/test_counter.py checks the two against each other.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x21F0AAAD, 0x735A2D97
KEY_BITS = 31  # keys are drawn below 2**31, so that they are int32 values too


def _mix(x: torch.Tensor, wide: bool) -> torch.Tensor:
    if wide:  # int64 holding a uint32
        x = x ^ (x >> 16)
        x = (x * _C1) & _M32
        x = x ^ (x >> 15)
        x = (x * _C2) & _M32
        return x ^ (x >> 15)
    # int32, wrapping: a logical shift is the arithmetic one masked to the bits that stay
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _C2
    return x ^ ((x >> 15) & 0x1FFFF)


UNIT = 2.0 ** -16  # the uniforms' grid: 16 bits, so that DELLA stores a uniform and a row rank in one int32


def bits(index: torch.Tensor, key: torch.Tensor | int, wide: bool = True) -> torch.Tensor:
    """The 16-bit values (0 .. 2**16 - 1, in index's int64 or int32) behind `uniform`."""
    dtype = torch.int64 if wide else torch.int32
    h = _mix(_mix(index.to(dtype), wide) ^ (key.to(dtype) if isinstance(key, torch.Tensor) else key), wide)
    return (h >> 16) & 0xFFFF


def uniform(index: torch.Tensor, key: torch.Tensor | int, wide: bool = True) -> torch.Tensor:
    """float32 uniforms in [0, 1) on a grid of 2**-16, one per entry of `index` (the entries' positions in their
    chunk, >= 0 and < 2**31) under `key` (< 2**31; a tensor broadcasting with index, or an int). `wide`: int64
    arithmetic, else wrapping int32 (see the module docstring); the same numbers. An entry kept iff u < p is kept
    with probability ceil(p * 2**16) / 2**16, within 2**-16 of p: 16 bits, not torch.rand's 24, so that DELLA
    stores its uniform and its row rank in 4 bytes (operators/fused.py, `pack`)."""
    return bits(index, key, wide).to(torch.float32) * UNIT


def draw_key(gen: torch.Generator) -> int:
    """One key from the seeded generator (the materialiser draws them in plan order)."""
    return int(torch.randint(0, 2 ** KEY_BITS, (1,), generator=gen))


def field(n: int, key: int, device) -> torch.Tensor:
    """(n,) the uniforms of a chunk's n entries under `key`, computed on `device` (int64: exact everywhere)."""
    return uniform(torch.arange(n, device=device), key, wide=True)
