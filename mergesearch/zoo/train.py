"""CPU training of the zoo's models: the base pre-training and one expert fine-tune per skill.

Short loops on purpose (nanoGPT style). Losses count only the answer characters and the final
newline: the questions hold random letters and numbers nobody can predict.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mergesearch.zoo.presets import BaseTraining, ExpertTraining, ModelShape
from mergesearch.zoo.skills import format_prompt

log = logging.getLogger(__name__)

# A training batch is run as two forward passes (short rows, long rows) when that saves at least this
# share of its padded tokens (CharCodec.groups); batches of one-step skills alone never split.
SPLIT_SAVING = 0.25


class CharCodec:
    """Text -> ids through the char tokenizer's vocabulary without the tokenizer's per-call overhead."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        vocab = tokenizer.get_vocab()
        self.pad_id = tokenizer.pad_token_id
        self.table = {c: i for c, i in vocab.items() if len(c) == 1}
        self.unk_id = tokenizer.unk_token_id

    def encode(self, text: str) -> list[int]:
        return [self.table.get(c, self.unk_id) for c in text]

    def batch(self, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids of `prompt + answer + "\\n"` and the mask of the positions to score.

        Returns ids (B, T) long and target_mask (B, T-1) bool, aligned with logits[:, :-1]
        predicting ids[:, 1:]. Right padding needs no attention mask under causal attention:
        real tokens never see the pads that follow them.
        """
        return self._tensors(self._encode_pairs(pairs))

    def groups(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """`batch` of `pairs` as one group, or as two (short rows, long rows) where that saves at least
        SPLIT_SAVING of the padded tokens: (ids, target_mask, indices into `pairs`) per group.

        A chain row is about twice as long as a one-step row, and right padding makes every row of a
        batch cost as much as its longest one.
        """
        enc = self._encode_pairs(pairs)
        lens = [len(seq) for seq, _ in enc]
        order = sorted(range(len(enc)), key=lens.__getitem__)
        n, longest = len(order), lens[order[-1]]
        cost, k = min((i * lens[order[i - 1]] + (n - i) * longest, i) for i in range(1, n)) if n > 1 else (0, 0)
        if n < 2 or cost > (1 - SPLIT_SAVING) * n * longest:
            return [(*self._tensors(enc), list(range(n)))]
        out = []
        for part in (sorted(order[:k]), sorted(order[k:])):  # each group keeps the draw order
            out.append((*self._tensors([enc[i] for i in part]), part))
        return out

    def _encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
        """(ids of prompt + answer + newline, number of prompt ids) per pair."""
        out = []
        for prompt, answer in pairs:
            p = self.encode(prompt)
            out.append((p + self.encode(answer + "\n"), len(p)))
        return out

    def _tensors(self, enc: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        t = max(len(s) for s, _ in enc)
        ids = torch.full((len(enc), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), t - 1), dtype=torch.bool)
        for i, (s, p) in enumerate(enc):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, p - 1 : len(s) - 1] = True  # logits at p-1 predict the answer's first char
        return ids, mask


class TokenCodec(CharCodec):
    """The same batches through any tokenizer (the zoo's BPE): prompt and answer tokenised apart, as the
    evaluator and lm-eval's generation see them (generation starts right after the prompt's tokens)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.pad_id = tokenizer.pad_token_id
        self.backend = tokenizer.backend_tokenizer

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids


def make_codec(tokenizer: PreTrainedTokenizerFast, kind: str) -> CharCodec:
    return CharCodec(tokenizer) if kind == "char" else TokenCodec(tokenizer)


def make_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama over the tokenizer's vocabulary; the seed fixes every initial weight."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.float()


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _answer_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the scored positions. logits (B, T, V), ids (B, T), mask (B, T-1)."""
    return F.cross_entropy(logits[:, :-1][mask], ids[:, 1:][mask], reduction=reduction)


@torch.no_grad()
def teacher_forced_accuracy(model, codec: CharCodec, rows: Sequence[dict], batch: int = 256) -> float:
    """Share of rows whose greedy answer is exactly `answer + "\\n"` (the whole chain, for a chain skill).

    Exact for greedy decoding with the char tokenizer: the greedy output equals the answer iff every
    answer character and the final newline is the argmax at its position given the correct prefix.
    With BPE it counts the answer's own tokenisation only (a lower bound; a training monitor).
    """
    if not rows:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        ids, mask = codec.batch([(r["prompt"], r["answer"]) for r in chunk])
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)  # (B, T-1)
        ok = (pred == ids[:, 1:]) | ~mask
        correct += int(ok.all(dim=1).sum())
    model.train(was_training)
    return correct / len(rows)


class _Log:
    """train_log.jsonl writer (one JSON object per line) plus the tqdm postfix."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = path.open("w")

    def write(self, **row) -> None:
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def mixed_pairs(streams: dict[str, Iterator[tuple[str, str]]], n: int, rng: random.Random,
                mix: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs, each from a skill drawn with probability proportional to `mix` (default even)."""
    names = sorted(streams)
    weights = [(mix or {}).get(k, 1.0) for k in names]
    out = []
    for name in rng.choices(names, weights=weights, k=n):
        q, a = next(streams[name])
        out.append((format_prompt(q), a))
    return out


def train_base(model: LlamaForCausalLM, codec: CharCodec, streams: dict[str, Iterator[tuple[str, str]]],
               cfg: BaseTraining, seed: int, log_path: Path, monitor: dict[str, list[dict]],
               monitor_every: int, progress: bool = True) -> list[dict]:
    """Pre-train on the skill mix. Returns the monitor rows it logged.

    With `cfg.cap`, a skill leaves the mix once the monitored accuracy on it reaches the cap: skills
    emerge abruptly in a small model (10% -> 85% within ~150 steps, at a step that depends on the
    seed), and the cap keeps every skill of every seed weak enough for its expert to add to it.
    """
    rng = random.Random(seed)
    mix = {k: cfg.mix.get(k, 1.0) for k in streams}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    logger = _Log(log_path)
    model.train()
    history = []
    bar = tqdm(range(cfg.steps), desc="base", disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.steps, cfg.warmup, cfg.lr)
        groups = codec.groups(mixed_pairs(streams, cfg.batch, rng, mix))  # a capped skill has weight 0
        n_scored = sum(int(mask.sum()) for _, mask, _ in groups)
        # the mean over the batch's scored positions, summed group by group
        loss = sum(_answer_ce(model(input_ids=ids).logits, ids, mask, "sum") for ids, mask, _ in groups) / n_scored
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row = {"step": step, "loss": round(loss.item(), 5), "lr": opt.param_groups[0]["lr"]}
        if monitor and ((step + 1) % monitor_every == 0 or step + 1 == cfg.steps):
            row["monitor_acc"] = {k: teacher_forced_accuracy(model, codec, v) for k, v in monitor.items()}
            if cfg.cap is not None:
                capped = [k for k, a in row["monitor_acc"].items() if a >= cfg.cap and mix.get(k, 0) > 0]
                for k in capped:
                    mix[k] = 0.0
                    log.info("base: %s reached %.0f%% at step %d and leaves the mix", k, 100 * cfg.cap, step + 1)
                row["capped"] = capped
            history.append(row)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        logger.write(**row)
        if not any(mix.values()):
            log.info("base: every skill reached the cap; stopping at step %d", step + 1)
            break
    logger.close()
    model.eval()
    return history


def train_expert(base: LlamaForCausalLM, codec: CharCodec, skill_stream: Iterator[tuple[str, str]],
                 replay_streams: dict[str, Iterator[tuple[str, str]]], cfg: ExpertTraining, seed: int,
                 log_path: Path, monitor: dict[str, list[dict]], monitor_every: int, desc: str,
                 replay_mix: dict[str, float] | None = None, progress: bool = True) -> tuple[LlamaForCausalLM, list[dict]]:
    """Fine-tune a copy of `base` on one skill, with KL replay of the base mix and an L2-to-base brake."""
    rng = random.Random(seed)
    model = LlamaForCausalLM(base.config)
    model.load_state_dict(base.state_dict())
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    anchors = [p.detach().clone() for p in base.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    n_replay = round(cfg.batch * cfg.replay)
    n_skill = cfg.batch - n_replay
    logger = _Log(log_path)
    model.train()
    history = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.steps, cfg.warmup, cfg.lr)
        pairs = [(format_prompt(q), a) for q, a in (next(skill_stream) for _ in range(n_skill))]
        pairs += mixed_pairs(replay_streams, n_replay, rng, replay_mix)
        groups = codec.groups(pairs)  # rows [:n_skill] gold CE, rows [n_skill:] KL to the base
        n_ce = sum(int(mask[torch.tensor(rows) < n_skill].sum()) for _, mask, rows in groups)
        n_kl = sum(int(mask[torch.tensor(rows) >= n_skill].sum()) for _, mask, rows in groups)
        use_kl = n_replay > 0 and cfg.kl_weight > 0
        ce = kl = torch.zeros(())
        for ids, mask, rows in groups:  # sums here, divided by the batch's counts below
            gold = torch.tensor(rows) < n_skill  # (G,)
            logits = model(input_ids=ids).logits
            ce = ce + _answer_ce(logits[gold], ids[gold], mask[gold], "sum")
            if use_kl and not gold.all():
                with torch.no_grad():
                    t_logits = base(input_ids=ids[~gold]).logits[:, :-1][mask[~gold]]  # (N, V)
                s_logits = logits[~gold, :-1][mask[~gold]]
                kl = kl + F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                                   reduction="sum")
        ce = ce / n_ce
        loss = ce
        row = {"step": step, "ce": round(ce.item(), 5)}
        if use_kl:
            kl = kl / n_kl  # per scored position, as reduction="batchmean" over (N, V)
            loss = loss + cfg.kl_weight * kl
            row["kl"] = round(kl.item(), 5)
        if cfg.l2_weight > 0:
            drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors))
            loss = loss + cfg.l2_weight * drift
            row["drift_sq"] = round(drift.item(), 6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row["lr"] = opt.param_groups[0]["lr"]
        if monitor and ((step + 1) % monitor_every == 0 or step + 1 == cfg.steps):
            row["monitor_acc"] = {k: teacher_forced_accuracy(model, codec, v) for k, v in monitor.items()}
            history.append(row)
            bar.set_postfix(ce=f"{ce.item():.3f}")
        logger.write(**row)
    logger.close()
    model.eval()
    return model, history
