"""lm-eval's model interface on our generation engine: every lm-eval task, lm-eval's prompts, at our speed.

`MergesearchLM` (registered with lm-eval as `mergesearch`) answers lm-eval's three request types on an
in-memory model, so lm-eval keeps its own prompts, few-shot sampling, filters and metrics:
- `generate_until` through the `GenerationEngine` (batch kept full, stop strings per row);
- `loglikelihood` / `loglikelihood_rolling` by right-padded batched forward passes.
It keeps HFLM's conventions, so results agree per example with `lm_eval --model hf`: contexts
tokenised as HFLM does (its BOS rule, left truncation to max_length - max_gen_toks), EOS added to the
stop strings, the text decoded without special tokens and cut at the first stop; lm-eval's own
`_encode_pair` (TemplateLM) and rolling windows for the log-likelihoods.

Also usable from lm-eval's command line on a model folder: `lm_eval --model mergesearch
--model_args pretrained=FOLDER --tasks ...` (importing this module registers the name).
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mergesearch.config import DEFAULT_BATCH_SIZE, LMEVAL_MAX_GEN_TOKS
from mergesearch.errors import TaskError
from mergesearch.evaluate.engine import GenerationEngine, GenRequest
from mergesearch.evaluate.text import decode, n_ctx, pad_id

log = logging.getLogger(__name__)



@register_model("mergesearch")
class MergesearchLM(TemplateLM):
    """An lm-eval LM over an in-memory HF model whose weights may change between calls (read each time)."""

    def __init__(self, pretrained=None, *, model=None, tokenizer=None, engine: GenerationEngine | None = None,
                 batch_size: int | str = DEFAULT_BATCH_SIZE, device: str | None = None, max_length: int | None = None,
                 add_bos_token: bool | None = None, **kwargs):
        super().__init__()
        if model is None:
            if not isinstance(pretrained, str):
                raise TaskError("the mergesearch lm-eval model needs pretrained=FOLDER (a local HF folder)")
            from mergesearch.evaluate.run import load_model

            model, tokenizer = load_model(pretrained, device or "auto")
        if kwargs:
            log.warning("mergesearch lm-eval model: ignoring arguments %s", sorted(kwargs))
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        self.max_length = max_length or n_ctx(model) or 2048
        self.add_bos_token = add_bos_token
        self.pad_id = pad_id(tokenizer)
        self._device = next(model.parameters()).device  # LM's own field behind its `device` property
        self.engine = engine or GenerationEngine(model, batch_size=self.batch_size, pad_id=self.pad_id,
                                                 decode=self._decode, max_len=self.max_length)
        # HF generate stops at the generation config's EOS; HFLM also stops at the tokenizer's (as a string)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_ids = frozenset(i for i in [*eos, tokenizer.eos_token_id] if i is not None)

    # --- tokens, as HFLM ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def _special_kwargs(self, string: str, add_special_tokens: bool | None) -> dict:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            return {"add_special_tokens": False}
        return {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, **self._special_kwargs(string, add_special_tokens))

    def _context_ids(self, context: str, left_truncate: int) -> list[int]:
        """A generation context as HFLM's tok_batch_encode gives it (its BOS rule), cut from the left."""
        bos = getattr(self.tokenizer, "bos_token", None)
        kw = ({"add_special_tokens": False} if has_bos_prefix(context, bos)
              else {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token})
        return self.tokenizer(context, **kw).input_ids[-left_truncate:]

    def _decode(self, tokens: list[int]) -> str:
        return decode(self.tokenizer, tokens)

    # --- log-likelihoods ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding emits exactly the continuation)."""
        rows = []
        for _, context_enc, continuation_enc in requests:
            # HFLM: the last max_length + 1 tokens, the final one only predicted
            rows.append(((context_enc + continuation_enc)[-(self.max_length + 1):][:-1], len(continuation_enc),
                         tuple(continuation_enc)))
        unique: dict[tuple, int] = {}
        keys = []
        for inp, n_cont, cont in rows:
            key = (tuple(inp), cont)
            keys.append(unique.setdefault(key, len(unique)))
        items = list(unique)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(items)
        order = sorted(range(len(items)), key=lambda k: -len(items[k][0]))
        with torch.inference_mode():
            for lo in range(0, len(order), self.batch_size):
                chunk = order[lo: lo + self.batch_size]
                width = max(len(items[k][0]) for k in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                for r, k in enumerate(chunk):
                    ids[r, : len(items[k][0])] = torch.tensor(items[k][0])
                # right padding: the causal mask alone is exact for every real position
                logits = self.model(input_ids=ids.to(self._device)).logits  # (B, L, V)
                lls, greedies = [], []
                for r, k in enumerate(chunk):
                    inp, cont = items[k]
                    end = len(inp)
                    lp = torch.log_softmax(logits[r, end - len(cont): end].float(), dim=-1)  # (C, V)
                    target = torch.tensor(cont, device=lp.device)
                    lls.append(lp.gather(-1, target[:, None]).sum())
                    greedies.append((lp.argmax(-1) == target).all())
                # one read back per batch (on a GPU each float()/bool() per request waited for the device)
                for k, ll, greedy in zip(chunk, torch.stack(lls).tolist(), torch.stack(greedies).tolist()):
                    results[k] = (ll, greedy)
        out = []
        for (ctx_cont, _, _), k in zip(requests, keys):
            out.append(results[k])
            if ctx_cont is not None:
                self.cache_hook.add_partial("loglikelihood", ctx_cont, results[k])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scores: the text in max_length windows, each token predicted once (HFLM's)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # --- generation --------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the first stop string, grouped by generation settings."""
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), LMEVAL_MAX_GEN_TOKS)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise TaskError("the mergesearch lm-eval model decodes greedily only: set do_sample: false "
                                "(temperature 0) in the task's generation_kwargs")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if self.max_length - max_gen <= 0:
                raise TaskError(f"max_gen_toks {max_gen} leaves no room for a prompt in the model's context "
                                f"of {self.max_length}; lower max_gen_toks")
            reqs = [GenRequest(tuple(self._context_ids(requests[i].args[0], self.max_length - max_gen)), max_gen,
                               self.stop_ids, tuple(u for u in until if u)) for i in idx]
            with torch.inference_mode():
                gen = self.engine.generate(reqs)
            for i, toks in zip(idx, gen):
                text = postprocess_generated_text(self._decode(toks), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
