"""The zoo's skills: question generators, their exact phrasing, and disjoint calib/test/train draws.

Every example reads `Q: {question}\\nA: {answer}\\n`, the prefixes BIG-bench uses by default, so a
prompt ends with "A: " and greedy generation of the answer stops at the newline.

A chain-of-thought skill (`extract` set) trains on the whole chain (the intermediate steps, then
`The answer is X.`) and is scored on the final answer only: the answer that the skill's regex pulls
out of the generated chain, as lm-eval's gsm8k_cot scores a generated chain.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mergesearch.errors import ConfigError, did_you_mean

PROMPT = "Q: {question}\nA: "


@dataclass(frozen=True)
class Skill:
    """One skill: draws a (question, answer) pair from a random generator.

    With `extract`, the answer is a chain and the scored answer is the regex's group 1 in it (in the
    generated chain and in the gold one alike); such a skill is scored by generating up to
    `max_new_tokens` tokens, never by the one-pass shortcut. `parts`: the one-step skills a chain is made
    of, in order (a merge of their experts alone is measured on the chain: `zoo.tables.composition_report`).
    """

    name: str
    description: str
    draw: Callable[[random.Random], tuple[str, str]]
    extract: str | None = None
    max_new_tokens: int | None = None
    parts: tuple[str, ...] = ()

    def example(self, rng: random.Random) -> tuple[str, str]:
        return self.draw(rng)

    def task_settings(self) -> dict:
        """The study task keys that score this skill (empty for a one-step skill: the defaults do)."""
        if self.extract is None:
            return {}
        return {"until": ["\n"], "max_new_tokens": self.max_new_tokens, "extract": self.extract}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"Reverse the word {w}.", w[::-1]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"Uppercase the word {w}.", w.upper()


def _successor(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 4998)
    return f"What number comes after {n}?", str(n + 1)


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"Sort the letters of {w}.", "".join(sorted(w))


def _short_word(rng: random.Random) -> str:
    # 3 letters (17,576 words): a chain repeats the word three times, a build's cost grows with the
    # sequence, and with 3-4 letters the chain's expert reached only ~10% in the demo preset's budget
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(3))


def _reverse_uppercase_chain(rng: random.Random) -> tuple[str, str]:
    w = _short_word(rng)
    r = w[::-1]
    return f"Reverse and uppercase the word {w}.", f"{r} -> {r.upper()}. The answer is {r.upper()}."


CHAIN_EXTRACT = r"The answer is (\S+)\."


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1000), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


# Required phrasings (outside tools test the zoo with them) come first; order is the manifest order.
SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("reverse", "reverse a word of 3-5 lowercase letters", _reverse),
        Skill("uppercase", "uppercase a word of 3-5 lowercase letters", _uppercase),
        Skill("successor", "the integer after n, for n in 0-4998", _successor),
        Skill("sort", "sort the letters of a word of 3-5 lowercase letters", _sort),
        Skill("larger", "the larger of two distinct integers in 0-999", _larger),
        Skill("chain", "reverse then uppercase a word of 3 letters, step by step, ending 'The answer is X.'",
              _reverse_uppercase_chain, extract=CHAIN_EXTRACT, max_new_tokens=32, parts=("reverse", "uppercase")),
    )
}


def get_skill(name: str) -> Skill:
    if name not in SKILLS:
        raise ConfigError(f"unknown zoo skill {name!r}{did_you_mean(name, SKILLS)}; choose from {', '.join(SKILLS)}")
    return SKILLS[name]


def skill_rng(seed: int, skill: str, stream: str) -> random.Random:
    """A generator for one (seed, skill, stream); crc32 keeps it stable across processes (unlike hash())."""
    return random.Random(seed * 1_000_003 + zlib.crc32(f"{skill}/{stream}".encode()))


def format_prompt(question: str) -> str:
    return PROMPT.format(question=question)


def eval_splits(skill: str, sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Disjoint held-out splits (e.g. calib, test) of distinct questions for one skill.

    Rows are `{"id", "prompt", "answer", "question", "skill"}`; ids are stable for a seed. A chain
    skill's "answer" is the whole chain: the text trained on, shown as a few-shot demonstration and
    fitted to; the evaluator reduces it with the task's `extract` regex before comparing.
    """
    sk = get_skill(skill)
    rng = skill_rng(seed, skill, "eval")
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        rows: list[dict] = []
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise ConfigError(f"skill {skill!r} has too few distinct questions for {n} {split} examples; "
                                  "lower the split size")
            q, a = sk.example(rng)
            if q in seen:
                continue
            seen.add(q)
            rows.append({"id": f"{skill}-{split}-{len(rows):04d}", "prompt": format_prompt(q), "answer": a,
                         "question": q, "skill": skill})
        out[split] = rows
    return out


def train_stream(skill: str, seed: int, held_out: set[str], stream: str = "train") -> Iterator[tuple[str, str]]:
    """Endless (question, answer) training draws for one skill, never a held-out question."""
    sk = get_skill(skill)
    rng = skill_rng(seed, skill, stream)
    while True:
        q, a = sk.example(rng)
        if q not in held_out:
            yield q, a
