"""How text and tokens convert for scoring: the conventions lm-eval's HFLM keeps, read by every path that scores.

The evaluator, the lm-eval model (`mergesearch` in lm-eval), the generation engine's callers and the
coefficient fit (mergesearch.fit) tokenise prompts, continuations and stop strings with these functions,
so that a fitted coefficient is trained on the tokens the evaluator then scores.
"""

from __future__ import annotations


def n_ctx(model) -> int | None:
    """The model's context length from its config (None where it states none): where inputs are cut."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (what lm-eval's HFLM.tok_encode gives for a context)."""
    return tokenizer(text, add_special_tokens=False).input_ids


def decode(tokenizer, tokens: list[int]) -> str:
    """The text of generated tokens, special tokens left out (what stop strings and answers are read from)."""
    return tokenizer.decode(tokens, skip_special_tokens=True)


def pad_id(tokenizer) -> int:
    """The id padding writes: the tokenizer's pad token, else 0 (padded positions are masked or never read)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def stop_tokens(tokenizer, until, eos_id: int | None) -> set[int]:
    """The tokens greedy decoding ends on for a task with stop strings `until`: EOS and every stop string that is
    one token (longer ones are found in the decoded text: GenRequest.until)."""
    ids = {eos_id} if eos_id is not None else set()
    for stop in until:
        toks = encode(tokenizer, stop)
        if len(toks) == 1:
            ids.add(toks[0])
    return ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(whole token ids, number of context tokens), split the way lm-eval's `_encode_pair` does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    return whole, len(encode(tokenizer, context))
