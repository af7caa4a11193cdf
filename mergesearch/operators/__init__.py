"""Merge operators: one registry, one decorator, one file per family (the registry: `registry.py`).

An operator merges ONE chunk of ONE tensor. It is a pure tensor function

    kernel(out, base, deltas, params, state, scratch) -> None | Tensor

that writes the merged chunk into `out` in place (and may return the float32 sum of what it wrote,
computed in the same pass: the materialiser's NaN/inf check then does not read the chunk again),
where `base` is the base model's chunk, `deltas` the experts' task vectors (expert - base, same
shape), `params` the operator's declared parameters resolved for this chunk (a tuple of floats, one
per expert, for per-expert parameters; a float for method-level ones), `state` what the operator's optional
`prepare(base, deltas, generator)` precomputed once per chunk (sorted magnitudes, random
fields, angles), and `scratch` reusable buffers so the hot path allocates nothing.

Parameters are declared once (`Param`) and read from here by the recipe readers, the CLI
and the search space. Semantics follow mergekit (merge_methods/, sparsify.py) so that a
recipe means the same thing in both tools; see each family's module docstring.

An operator may also merge many chunks in one call (`group=` in `register`; the task-arithmetic family):

    group(out, base, deltas, state, sizes, params, scratch) -> None | Tensor

where the chunks (`sizes` entries each, in order, each a whole number of blocks) lie one after another in flat
buffers viewed as (blocks, B): `out`, `base`, each of `deltas`, and each per-entry tensor of `state` (the chunks'
prepared states laid out the same way; "l1": (chunks, 2, E) their norms and scales; host-memory state one per chunk
in layout order, or joined where its type has `join` (DARE's "kept": one lookup for the group); "cob": (blocks,)
int64 each block's chunk);
`params` is one parameter dict per chunk, as the kernel gets them. It returns the float32 sum of what it wrote,
or None where it cannot (the materialiser then runs the kernel chunk by chunk). On a GPU one call per candidate
instead of one per chunk: a call's host time is more than a mid-sized chunk's kernel.

`merge_tensor` is the convenience entry point on plain tensors (no checkpoint, no model):
the materialiser in `mergesearch.materializer` runs the same kernels on cached sources.
"""

from mergesearch.operators.registry import (
    Param,
    WEIGHT,
    LAMBDA,
    DENSITY,
    normalize_param,
    rescale_param,
    ParamRule,
    Kernel,
    Prepare,
    Operator,
    register,
    BUILTIN_FAMILIES,
    get,
    names,
    all_operators,
    chunk_bounds,
    num_chunks,
    exact,
    is_on,
    BLOCK_ENTRIES,
    block_entries,
    COMPILED_DTYPES,
    COMPILED_MIN_ENTRIES,
    COMPILED_MIN_MODEL,
    compiled_min_entries,
    compiled_dtypes,
    Scratch,
    resolve_chunk_params,
    merge_tensor,
)

__all__ = [
    "Param",
    "WEIGHT",
    "LAMBDA",
    "DENSITY",
    "normalize_param",
    "rescale_param",
    "ParamRule",
    "Kernel",
    "Prepare",
    "Operator",
    "register",
    "BUILTIN_FAMILIES",
    "get",
    "names",
    "all_operators",
    "chunk_bounds",
    "num_chunks",
    "exact",
    "is_on",
    "BLOCK_ENTRIES",
    "block_entries",
    "COMPILED_DTYPES",
    "COMPILED_MIN_ENTRIES",
    "COMPILED_MIN_MODEL",
    "compiled_min_entries",
    "compiled_dtypes",
    "Scratch",
    "resolve_chunk_params",
    "merge_tensor",
]
