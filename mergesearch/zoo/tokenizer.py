"""The zoo's tokenizers, saved as PreTrainedTokenizerFast (tokenizer.json), loadable offline.

- char: one token per character, so a string has exactly one tokenisation (the default);
- bpe: a byte-level BPE, as real LLMs have (GPT-2, Llama 3, Qwen), trained on the zoo's own text, so
  words and numbers have several tokenisations and the evaluator meets what real checkpoints give it.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
# Printable ASCII and the newline: every zoo prompt, answer and BIG-bench arithmetic file fits.
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    # no special token is added automatically: prompts are scored exactly as written
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; `tokenizer(text).input_ids` has exactly `len(text)` ids for ASCII text."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _wrap(tok)


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's pre-tokenizer and decoder) trained on `texts`: the 4 special tokens,
    the 256 bytes, then merges up to `vocab_size`. The same texts give the same tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok)


assert set(string.ascii_letters + string.digits + " .:?\n") <= set(CHARS)
