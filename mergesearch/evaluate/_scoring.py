"""The fast path: prompts tokenised once into device tensors, scored with as few forward passes as possible.

Conventions shared with lm-eval (so that scores and log-likelihoods agree with it):
- multiple choice: the log-likelihood of a choice is lm-eval's: trailing whitespace of the context
  moves into the continuation, the whole string is tokenised and the context tokens are split off
  (`_encode_pair`); acc and acc_norm rank those numbers as lm-eval does;
- exact match: greedy generation starts right after the full prompt's tokens, stops at the stop
  string or EOS, and the text is cut at the first stop string. The gold log-prob of an exact-match
  task is log P(answer tokens | prompt tokens), the tokens generation would have to emit.

The one-pass exact-match decision: one teacher-forced pass over prompt + gold answer shows greedy
decoding's tokens for as long as they follow the gold ones, and the first token where they part. The
text known from there on (`decide`) settles most examples exactly: an output that has ended, or one
whose known text already differs from every answer. Only an alternative tokenisation of the answer
(BPE) needs more passes (`follow_greedy`: teacher-forced along greedy's own tokens); a special token
or a near-tie leaves the example to real generation.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from dataclasses import dataclass

import torch

from mergesearch.errors import TaskError
from mergesearch.evaluate.tasks import BIGBENCH_DEFAULT_REGEX, Example, Task
from mergesearch.evaluate.text import encode, encode_pair

# Two top logits closer than this many units of the logits' dtype precision (relative to their size,
# at least 1) are a tie that floating-point noise between a full pass and cached decoding could flip:
# the one-pass decision is then left to real generation. float32: 64 eps, ~8e-6. 16-bit floats: 8 eps
# (bf16: 1/16 of the top logit). Measured in bf16 on the CPU: between a full pass and cached decoding the
# gap between the two top logits moved by at most 1.6-3.1 eps x |top| (random Llamas of 2-24 layers,
# hidden 256-2048: the larger, the more), the logits by at most 3.4 (the demo zoo's experts); on the demo
# zoo's six models (9,600 test questions) one-pass decisions first differed from generation's at a guard of
# 1 eps (3 questions) and never at 2, 4, 8 or 16, where one pass decided 87%, 76%, 56% and 31%. 64 eps in
# bf16, half the top logit, left every example to generation (bench_gpu's 1B study on an H200: 4 of 256
# decided by one pass).
TIE_EPS = {torch.float32: 64, torch.float64: 64}
TIE_EPS_16BIT = 8
# A near-tie whose tokens all part from the gold answer still decides an example where each of them does alike
# (greedy emits one of them): at most this many tied tokens are followed.
TIED_MOST = 3


def tie_tolerance(dtype: torch.dtype) -> float:
    """Relative gap (x max(|top logit|, 1)) below which two top logits count as a tie."""
    return TIE_EPS.get(dtype, TIE_EPS_16BIT) * torch.finfo(dtype).eps


def tokenizer_is_unique(tokenizer) -> bool:
    """True when every non-special token is one distinct character, so a string has exactly one token
    sequence: then "greedy output == gold" is the same as "every gold token is the argmax"."""
    special = set(tokenizer.all_special_ids)
    seen = set()
    for _, idx in tokenizer.get_vocab().items():
        if idx in special:
            continue
        text = tokenizer.decode([idx])
        if len(text) != 1 or text in seen:
            return False
        seen.add(text)
    return True


# Decoders that turn a token sequence into the concatenation of its tokens' texts (the first token's
# leading space at most stripped once): the text of a greedy output's first tokens is then a prefix
# of the whole output's text, which the one-pass decision relies on.
_CONCATENATIVE = {"ByteLevel", "Fuse", "ByteFallback", "Replace"}


def _decoder_concatenates(spec: dict | None) -> bool:
    if not spec:
        return False
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_decoder_concatenates(d) for d in spec.get("decoders", []))
    if kind == "Strip":
        return spec.get("stop", 0) == 0  # a leading strip keeps prefixes prefixes; a trailing one does not
    return kind in _CONCATENATIVE


def decode_is_prefix_stable(tokenizer) -> bool:
    """True when decoding more tokens only appends text: byte-level BPE (GPT-2, Llama 3, Qwen) and
    character tokenizers, without transformers' `clean_up_tokenization_spaces` (which rewrites " ." as ".")."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return _decoder_concatenates(json.loads(backend.to_str()).get("decoder"))


@functools.lru_cache(maxsize=None)
def _cache_kw(model_type: type) -> str:
    """The forward argument that takes a KV cache: `cache` in current transformers (passing the old
    `past_key_values` prints a FutureWarning on every call), `past_key_values` before it."""
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model, cache=None, **kw):
    """model(**kw) with `cache` passed under the name this transformers version takes."""
    if cache is not None:
        kw[_cache_kw(type(model))] = cache
    return model(**kw)


def cache_of(out):
    """The KV cache a forward pass returned, read without the deprecated `past_key_values` alias."""
    keys = out.keys()
    return out["cache"] if "cache" in keys else out["past_key_values"] if "past_key_values" in keys else None


def postprocess(text: str, task: Task) -> str | None:
    """Cut at the first stop string, then BIG-bench post-processing (stop_string kept, first regex match),
    then the task's `extract` regex. None: `extract` found no answer (scored wrong)."""
    text = task.cut(text)
    if task.bigbench_stop_string:
        idx = text.find(task.bigbench_stop_string)
        if idx > 0:
            text = text[: idx + len(task.bigbench_stop_string)]
    if task.output_regex is not None:
        text = next(iter(re.findall(task.output_regex, text)), "")
    return task.extract_answer(text)


def is_match(text: str, task: Task, answers) -> bool:
    """Exact match of a generated text (not yet cut) against the gold answers, after `postprocess`."""
    found = postprocess(text, task)
    return found is not None and found in {task.gold(a) for a in answers}


# BIG-bench's default output regex keeps the first run of characters outside this set.
_REGEX_BREAKS = frozenset(".?!;\n")


def _decide_default_regex(text: str, answers) -> bool | None:
    """BIG-bench's default regex on an output known only to start with `text` (no stop in it yet).

    The regex keeps the first run of characters outside .?!;\n: once that run has started and ended
    inside `text`, it is known; while it runs to the end of `text`, only its start is known."""
    start = next((k for k, c in enumerate(text) if c not in _REGEX_BREAKS), None)
    if start is None:
        return None  # only breaks so far: the run has not started
    end = next((k for k in range(start, len(text)) if text[k] in _REGEX_BREAKS), None)
    if end is not None:
        return text[start:end] in answers
    run = text[start:]
    possible = any(a.startswith(run) and not _REGEX_BREAKS.intersection(a) for a in answers)
    return None if possible else False


def decide(text: str, complete: bool, prefix_stable: bool, task: Task, answers) -> tuple[bool | None, str | None]:
    """Exact match from the text greedy decoding is proven to start with: (match, or None where the
    unknown rest of the output could still change it; the output cut at the stop, where it is known).

    complete: the output is exactly `text` (EOS or the stop token came, or the tokens ran out).
    Otherwise the output is `text` + something unknown, which `prefix_stable` decoding guarantees.
    """
    if not complete:
        if not prefix_stable:
            return None, None  # a decode that may rewrite earlier text
        # the bytes of a character not yet complete decode to U+FFFD and become that character once the
        # rest arrives: the output is only known to start with the text before the trailing ones
        text = text.rstrip("\ufffd")
    if complete or any(stop in text for stop in task.until):
        output = task.cut(text)
        return is_match(output, task, answers), output
    if task.bigbench_stop_string or task.extract is not None:
        return None, None
    if task.output_regex is None:
        # the output is `text` + more, cut at the first stop: it can be an answer only while `text` starts
        # one followed by a stop (a stop may begin inside `text` and end after it)
        ends = task.until or ("",)
        return (None if any((a + stop).startswith(text) for a in answers for stop in ends) else False), None
    if task.output_regex == BIGBENCH_DEFAULT_REGEX and all(len(stop) <= 1 for stop in task.until):
        return _decide_default_regex(text, answers), None
    return None, None


# --- prepared examples --------------------------------------------------------------------------


@dataclass
class GenItem:
    """One exact-match example, tokenised."""

    example: Example
    prompt_ids: list[int]  # what generation starts from
    whole: list[int]  # prompt tokens + gold answer tokens (the gold log-prob is taken over the answer's)
    n_context: int
    gen_start: int | None  # where the answer starts; None: leave this example to generation


@dataclass
class ChoiceItem:
    """One multiple-choice example, tokenised: every choice shares the first `shared` tokens."""

    example: Example
    wholes: list[list[int]]
    n_context: list[int]
    shared: int


def _where(task: Task, ex: Example) -> str:
    return f"{task.source}:{ex.line}" if task.source.endswith(".jsonl") else f"{task.source}: example {ex.line}"


def prepare_generate(task: Task, tokenizer, max_len: int | None) -> list[GenItem]:
    items = []
    for ex in task.examples:
        prompt_ids = encode(tokenizer, ex.prompt)
        if not ex.prompt.rstrip():
            raise TaskError(f"{_where(task, ex)}: the prompt is only whitespace")
        # scored and decided on the tokens greedy decoding would have to emit after the prompt's tokens
        answer_ids = encode(tokenizer, ex.answers[0])
        # the one-pass decision follows greedy decoding wherever it goes, so any answer will do; one whose
        # tokens do not spell it (unknown characters) or that holds the stop only wastes the pass
        whole, n_context, gen_start = prompt_ids + answer_ids, len(prompt_ids), len(prompt_ids)
        if (tokenizer.decode(answer_ids) != ex.answers[0] or task.cut(ex.answers[0]) != ex.answers[0]
                or task.extract is not None):
            gen_start = None  # a chain (extract) is decided by generation and the extraction
        if max_len is not None and len(whole) + 1 > max_len:
            raise TaskError(f"{_where(task, ex)}: prompt + answer is {len(whole)} tokens, longer than the model's "
                            f"context of {max_len}; shorten the prompt or use fewer few-shot examples")
        items.append(GenItem(ex, prompt_ids, whole, n_context, gen_start))
    return items


def follow_greedy(item: GenItem, tokens: list[int], text: str, tokenizer, max_len: int | None) -> GenItem | None:
    """The example to teacher-force next when greedy decoding spelt the start of the answer with other
    tokens than the answer's own (BPE): its proven tokens, then the rest of the answer's text, tokenised.
    None when its text does not start an answer (then only generation can tell)."""
    answer = next((a for a in item.example.answers if a.startswith(text)), None)
    if answer is None or "\ufffd" in text:
        return None
    whole = item.prompt_ids + tokens + encode(tokenizer, answer[len(text):])
    if max_len is not None and len(whole) + 1 > max_len:
        return None
    return GenItem(item.example, item.prompt_ids, whole, item.n_context, len(item.prompt_ids))


def prepare_choice(task: Task, tokenizer, max_len: int | None) -> list[ChoiceItem]:
    items = []
    for ex in task.examples:
        if not ex.prompt.rstrip():
            raise TaskError(f"{_where(task, ex)}: the prompt is only whitespace")
        pairs = [encode_pair(tokenizer, ex.prompt, c) for c in ex.choices]
        wholes = [w for w, _ in pairs]
        longest = max(len(w) for w in wholes)
        if max_len is not None and longest > max_len:
            raise TaskError(f"{_where(task, ex)}: prompt + choice is {longest} tokens, longer than the model's "
                            f"context of {max_len}; shorten the prompt or use fewer few-shot examples")
        shared = min(len(w) for w in wholes)
        for w in wholes[1:]:
            shared = next((i for i in range(shared) if w[i] != wholes[0][i]), shared)
        # the shared pass must own at least the first token (a left context is needed to score anything)
        items.append(ChoiceItem(ex, wholes, [n for _, n in pairs], max(shared, 1)))
    return items


# --- batches: padded device tensors built once ----------------------------------------------------


def _pad(rows: list[list[int]], pad: int, device, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r):] = torch.tensor(r)
            else:
                out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


# Below this many shared tokens a batch is run without the prefix pass (one plain causal pass is faster).
MIN_PREFIX = 4


def lcp(rows: list[list[int]], cap: int) -> int:
    """Length of the longest common prefix of `rows`, at most `cap`."""
    n = min(cap, *(len(r) for r in rows))
    first = rows[0]
    for r in rows[1:]:
        n = next((i for i in range(n) if r[i] != first[i]), n)
    return n


@dataclass
class Prefix:
    """Tokens every row of a batch starts with: run once, its KV cache shared by all rows."""

    ids: torch.Tensor | None  # (1, P) or None when not worth a separate pass

    @property
    def length(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]


def _make_prefix(rows: list[list[int]], cap: int, device) -> Prefix:
    n = lcp(rows, cap) if len(rows) > 1 else 0
    return Prefix(torch.tensor([rows[0][:n]], device=device) if n >= MIN_PREFIX else None)


def _run_prefix(model, prefix: Prefix, n_rows: int):
    """The prefix's KV cache, repeated for `n_rows` rows (None without a prefix)."""
    if prefix.ids is None:
        return None
    cache = cache_of(model(input_ids=prefix.ids, use_cache=True))
    cache.reorder_cache(torch.zeros(n_rows, dtype=torch.long, device=prefix.ids.device))
    return cache


@dataclass
class GenBatch:
    """Exact-match examples decided by one teacher-forced pass (right padding, causal: pads never seen)."""

    items: list[GenItem]
    prefix: Prefix
    input_ids: torch.Tensor  # (B, L) whole sequences after the shared prefix, right-padded
    position_ids: torch.Tensor | None  # (B, L)
    ll_pos: torch.Tensor  # (B, C) positions (after the prefix) whose logits predict the scored answer tokens
    ll_tok: torch.Tensor  # (B, C) those tokens
    ll_mask: torch.Tensor  # (B, C) bool
    g_pos: torch.Tensor | None  # (B, G+1) positions predicting each answer token and then the next one


def build_gen_batch(items: list[GenItem], device, pad: int, one_pass: bool) -> GenBatch:
    # every logit we read lies at or after n_context - 1, so the prefix stops before the first of them
    prefix = _make_prefix([it.whole for it in items], min(it.n_context for it in items) - 1, device)
    p = prefix.length
    ids = _pad([it.whole[p:] for it in items], pad, device)
    pos = None
    if p:
        pos = (p + torch.arange(ids.shape[1], device=device)).expand(len(items), -1)
    ll_rows = [list(range(it.n_context - 1 - p, len(it.whole) - 1 - p)) for it in items]
    width = max(len(r) for r in ll_rows)
    ll_pos = torch.zeros((len(items), width), dtype=torch.long)
    ll_tok = torch.zeros_like(ll_pos)
    ll_mask = torch.zeros_like(ll_pos, dtype=torch.bool)
    for i, (it, r) in enumerate(zip(items, ll_rows)):
        ll_pos[i, : len(r)] = torch.tensor(r)
        ll_tok[i, : len(r)] = torch.tensor(it.whole[it.n_context:])
        ll_mask[i, : len(r)] = True
    g_pos = None
    if one_pass and all(it.gen_start is not None for it in items):
        gw = max(len(it.whole) - it.gen_start + 1 for it in items)
        g_pos = torch.zeros((len(items), gw), dtype=torch.long)  # padded slots read position 0, never used
        for i, it in enumerate(items):
            g_pos[i, : len(it.whole) - it.gen_start + 1] = torch.arange(it.gen_start - 1 - p, len(it.whole) - p)
        g_pos = g_pos.to(device)
    return GenBatch(items, prefix, ids, pos, ll_pos.to(device), ll_tok.to(device), ll_mask.to(device), g_pos)


@dataclass
class ChoiceBatch:
    """Multiple-choice examples: the batch's common prefix once, each example's shared prompt once (on
    that cache), then every choice's tail on the example's cache."""

    items: list[ChoiceItem]
    prefix: Prefix
    shared_ids: torch.Tensor  # (B, S) each example's shared tokens after the batch prefix, right-padded
    shared_mask: torch.Tensor  # (B, P + S) attention over [batch prefix, shared part]
    shared_pos: torch.Tensor  # (B, S)
    row_example: torch.Tensor | None  # (R,) which example each tail row continues
    tail_ids: torch.Tensor | None  # (R, T) choice tails (inputs only: the last token is never an input)
    tail_mask: torch.Tensor | None  # (R, P + S + T) attention over [batch prefix, shared part, tail]
    tail_pos: torch.Tensor | None  # (R, T) position ids continuing each example's shared part
    # log-prob terms: [example, position, token] read from the shared pass and the flat
    # (example * n_choices + choice) slot each term is added to; the same for the tail pass
    shared_idx: torch.Tensor  # (K1, 3)
    shared_dst: torch.Tensor  # (K1,)
    tail_idx: torch.Tensor | None  # (K2, 3) [row, position, token]
    tail_dst: torch.Tensor | None  # (K2,)
    n_choices: int  # slots per example (max over the batch)


def build_choice_batch(items: list[ChoiceItem], device, pad: int) -> ChoiceBatch:
    # the prefix ends before the first logit we read and leaves every example >= 1 shared token
    cap = min(min(it.n_context) - 1 for it in items)
    cap = min(cap, min(it.shared for it in items) - 1)
    prefix = _make_prefix([it.wholes[0] for it in items], cap, device)
    p = prefix.length
    shared_rows = [it.wholes[0][p: it.shared] for it in items]
    shared_ids = _pad(shared_rows, pad, device)
    smax = shared_ids.shape[1]
    shared_mask = torch.zeros((len(items), p + smax), dtype=torch.long)
    shared_mask[:, :p] = 1
    for i, r in enumerate(shared_rows):
        shared_mask[i, p: p + len(r)] = 1
    shared_pos = (p + torch.arange(smax)).expand(len(items), -1)
    n_choices = max(len(it.wholes) for it in items)
    s_idx, s_dst, t_idx, t_dst = [], [], [], []
    tails, row_example = [], []
    for b, it in enumerate(items):
        for c, (whole, n_context) in enumerate(zip(it.wholes, it.n_context)):
            slot = b * n_choices + c
            tail = whole[it.shared: len(whole) - 1]
            row = len(tails)
            if tail:
                tails.append(tail)
                row_example.append(b)
            for t in range(n_context, len(whole)):  # token t is predicted by the logits at t - 1
                if t - 1 < it.shared:
                    s_idx.append((b, t - 1 - p, whole[t]))
                    s_dst.append(slot)
                else:
                    t_idx.append((row, t - 1 - it.shared, whole[t]))
                    t_dst.append(slot)
    tail = None
    if tails:
        tail_ids = _pad(tails, pad, device)
        tmax = tail_ids.shape[1]
        tail_mask = torch.zeros((len(tails), p + smax + tmax), dtype=torch.long)
        tail_pos = torch.zeros((len(tails), tmax), dtype=torch.long)
        for r, (b, tl) in enumerate(zip(row_example, tails)):
            tail_mask[r, : p + smax] = shared_mask[b]
            tail_mask[r, p + smax: p + smax + len(tl)] = 1
            tail_pos[r] = torch.arange(items[b].shared, items[b].shared + tmax)
        tail = (torch.tensor(row_example, device=device), tail_ids, tail_mask.to(device), tail_pos.to(device),
                torch.tensor(t_idx, dtype=torch.long, device=device).reshape(-1, 3),
                torch.tensor(t_dst, dtype=torch.long, device=device))
    return ChoiceBatch(items, prefix, shared_ids, shared_mask.to(device), shared_pos.to(device),
                       *(tail[:4] if tail else (None,) * 4),
                       torch.tensor(s_idx, dtype=torch.long, device=device).reshape(-1, 3),
                       torch.tensor(s_dst, dtype=torch.long, device=device),
                       *(tail[4:] if tail else (None, None)), n_choices)


# --- scoring --------------------------------------------------------------------------------------


def _logprobs(logits: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    """log p(token) at `logits[index[:-1]]` for the tokens `index[-1]` (index tensors broadcast together): the
    read positions are picked out before the float32 log-softmax, which on the whole (batch, length, vocab)
    would take a float32 copy and output of every position (~29 GB at batch 64, 300 tokens, 152k vocab)."""
    *where, tok = index
    picked = logits[tuple(where)].float()
    return torch.log_softmax(picked, dim=-1).gather(-1, tok.expand(picked.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def score_choice_batch(model, batch: ChoiceBatch) -> list[list[float]]:
    """Log-likelihood of every choice of every example: [[ll per choice] per example]."""
    b = len(batch.items)
    cache = _run_prefix(model, batch.prefix, b)
    if cache is None and batch.tail_ids is None:
        out = model(input_ids=batch.shared_ids)
    else:
        # causal mask alone, as in score_gen_batch: the shared part is right-padded after a real prefix
        out = forward(model, cache, input_ids=batch.shared_ids, position_ids=batch.shared_pos, use_cache=True)
    flat = torch.zeros(b * batch.n_choices, dtype=torch.float32, device=out.logits.device)
    si = batch.shared_idx
    flat.index_add_(0, batch.shared_dst, _logprobs(out.logits, si[:, 0], si[:, 1], si[:, 2]))
    if batch.tail_ids is not None:
        cache = cache_of(out)
        cache.reorder_cache(batch.row_example)  # (R, heads, P + S, head_dim): one copy per tail
        tail_out = forward(model, cache, input_ids=batch.tail_ids, attention_mask=batch.tail_mask,
                           position_ids=batch.tail_pos, use_cache=False)
        ti = batch.tail_idx
        flat.index_add_(0, batch.tail_dst, _logprobs(tail_out.logits, ti[:, 0], ti[:, 1], ti[:, 2]))
    flat = flat.view(b, batch.n_choices).tolist()
    return [row[: len(it.wholes)] for row, it in zip(flat, batch.items)]


def score_gen_batch(model, batch: GenBatch, max_new_tokens: int, stop_ids: set[int], skipped: set[int],
                    max_len: int | None) -> tuple[list[float], list[list[tuple[list[int], bool]]]]:
    """One teacher-forced pass: gold log-probs and the first tokens greedy decoding is proven to emit.

    Greedy decoding emits the gold tokens for as long as each is the argmax at its position; the first
    argmax that is not the gold token (or is a stop) is its next token, and after that the pass knows
    nothing more. Returns (gold log-prob per example, per example the starts greedy's output is proven to
    take: one (tokens, complete), or one per token of a near-tie where every tied token parts from the gold
    answer (greedy takes one of them, float noise decides which: `TIE_EPS`), or none where the pass proves
    nothing usable). complete: generation ends right there (a stop/EOS token, or max_new_tokens used up).
    None proven: a special token other than EOS (it decodes to nothing, so the text is unchanged but
    generation goes on), a near-tie the gold token is part of, one of more than TIED_MOST tokens, or logits that
    are NaN or inf (a merge whose forward overflows: generation scores it, whatever it emits).
    """
    cache = _run_prefix(model, batch.prefix, len(batch.items))
    if cache is None:
        logits = model(input_ids=batch.input_ids).logits  # (B, L, V)
    else:
        # no attention mask: the prefix is real for every row and right padding sits after each row's
        # tokens, so the causal mask alone is exact (and lets attention take its fast causal path)
        logits = forward(model, cache, input_ids=batch.input_ids, position_ids=batch.position_ids,
                         use_cache=False).logits
    rows = torch.arange(len(batch.items), device=logits.device)[:, None]
    ll = (_logprobs(logits, rows, batch.ll_pos, batch.ll_tok) * batch.ll_mask).sum(-1).tolist()
    if batch.g_pos is None:
        return ll, [[] for _ in batch.items]
    k = min(TIED_MOST + 1, logits.shape[-1])
    top = logits[rows, batch.g_pos].topk(k, dim=-1)  # (B, G+1, k)
    values = top.values.float()
    # the largest difference noise could explain at each position, and the tokens within it of the top
    tol = tie_tolerance(logits.dtype) * values[..., 0].abs().clamp(min=1.0)
    tied = (values >= values[..., :1] - tol[..., None]).tolist()  # (B, G+1, k)
    index = top.indices.tolist()
    proven: list[list[tuple[list[int], bool]]] = []
    for i, it in enumerate(batch.items):
        gold = it.whole[it.gen_start:]
        starts = [gold[:max_new_tokens]]  # if greedy follows gold until the tokens run out
        for j in range(min(len(gold) + 1, max_new_tokens)):
            ties = [t for t, near in zip(index[i][j], tied[i][j]) if near]
            if not ties:  # NaN or inf logits (a broken merge): the top is not even within reach of itself
                starts = []
                break
            if len(ties) > 1:  # a near-tie: decidable only where no tied token is the gold one
                parts = len(ties) < k and (j == len(gold) or gold[j] not in ties)
                starts = [gold[:j] + [t] for t in ties] if parts else []
                break
            b = ties[0]
            if j == len(gold) or b != gold[j] or b in stop_ids or b in skipped:
                starts = [gold[:j] + [b]]
                break
        out = []
        for toks in starts:
            complete = toks[-1] in stop_ids or len(toks) >= max_new_tokens
            cut_short = (complete and toks[-1] not in stop_ids and max_len is not None
                         and len(it.prompt_ids) + max_new_tokens > max_len)
            if toks[-1] in skipped or cut_short:
                # a special token: the text stays, generation goes on; or generation may be cut by the context
                # length before max_new_tokens
                out = []
                break
            out.append((toks, complete))
        proven.append(out)
    return ll, proven
