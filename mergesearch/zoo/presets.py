"""Zoo presets: every size, step count and learning rate of a zoo build, declared once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergesearch.errors import ConfigError, did_you_mean


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelShape(_Frozen):
    """The LlamaForCausalLM every zoo model shares."""

    layers: int = Field(4, ge=1)
    hidden: int = Field(128, ge=8)
    intermediate: int = Field(256, ge=8)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(4, ge=1)
    max_positions: int = Field(256, ge=64)


class BaseTraining(_Frozen):
    """Pre-training of the base on an even mix of all skills: a little, so every skill stays weak."""

    steps: int = Field(450, ge=1)
    batch: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(30, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    # Relative share of each skill in the mix (missing skills: 1.0). Skills a small model picks up fast
    # get less, so that the base starts weak everywhere and every expert has something to add.
    mix: dict[str, float] = Field(default_factory=dict)
    # A skill leaves the mix once the base's accuracy on the monitor questions reaches `cap`
    # (checked every `monitor_every` steps); None: never.
    cap: float | None = Field(None, gt=0, le=1)


class ExpertTraining(_Frozen):
    """Fine-tuning of one expert from the base: few steps, low lr, replay and a drift penalty
    keep its task vector small and nearly orthogonal to the other experts'."""

    steps: int = Field(300, ge=1)
    batch: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(20, ge=0)
    # Share of each batch drawn from the base's mix and trained towards the frozen base's
    # next-token distribution (KL), so the expert keeps the base's behaviour on the other skills.
    replay: float = Field(0.3, ge=0, lt=1)
    kl_weight: float = Field(1.0, ge=0)
    # L2 penalty on (theta - theta_base), summed over all tensors: a direct brake on drift.
    l2_weight: float = Field(0.0, ge=0)


class Splits(_Frozen):
    """Held-out questions per skill, disjoint from each other and from every training draw."""

    calib: int = Field(300, ge=1)
    test: int = Field(400, ge=1)
    # A small fixed pool of training-distribution examples (few-shot demonstrations), never in calib/test.
    train: int = Field(50, ge=0)


class ZooPreset(_Frozen):
    """A complete zoo recipe; with a seed it determines every weight of the zoo."""

    name: str
    skills: tuple[str, ...] = ("reverse", "uppercase", "successor", "sort")
    # char: one token per character; bpe: a byte-level BPE trained on the zoo's own text, as real LLMs
    # have (several tokenisations per string), with `bpe_vocab` tokens (4 special + 256 bytes + merges)
    tokenizer: Literal["char", "bpe"] = "char"
    bpe_vocab: int = Field(640, ge=261)
    model: ModelShape = ModelShape()
    base: BaseTraining = BaseTraining()
    expert: ExpertTraining = ExpertTraining()
    splits: Splits = Splits()
    # Held-out questions per skill (never trained on, never in calib/test) whose accuracy is logged
    # during training (teacher-forced exact match) and drives the base's cap.
    monitor_examples: int = Field(64, ge=0)
    monitor_every: int = Field(50, ge=1)
    # Fixed so that the float reduction order, hence the weights, repeat on a machine.
    threads: int = Field(2, ge=1)
    # Global scales tried for task arithmetic in the report (best chosen on calib, shown on test).
    ta_scales: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    report: bool = True


    @model_validator(mode="after")
    def _cap_needs_monitor(self) -> ZooPreset:
        if self.base.cap is not None and self.monitor_examples == 0:
            raise ValueError("base.cap needs monitor_examples > 0 (the cap is checked on the monitor questions)")
        return self


PRESETS: dict[str, ZooPreset] = {
    # Measured (issue 4): at 450 base steps every skill is still weak (12-36%), at 600 reverse and
    # uppercase have already emerged (87-89%), leaving the experts nothing to add, and the step at
    # which a skill emerges depends on the seed: the cap takes a skill out of the base's mix at 35%.
    # Successor and sort are learnt fastest, so they get a smaller share of the base mix.
    # The chain (issue 19) scores ~34 answer characters a row against ~5 for a one-step skill, so at an
    # even share it took most of the base's gradient and left every skill at 0-2% after 300 steps: a
    # quarter share gives it about a fifth of the scored characters. Measured (seed 0, 1 thread, partial
    # build: base, chain and reverse experts), chain test split through the evaluator (generation + the
    # skill's regex): base 44.0%, expert-chain 97.5%, expert-reverse 53.0% (87.3% on reverse), task
    # arithmetic of reverse + chain at 1/1 98.5%; the base's other skills as before (17-36% teacher-forced).
    # That was on the machine that built the zoo shipped until 2026-12-06; the base's trajectory is chaotic (float
    # rounding moves the step at which the cap fires), and the zoo shipped since (built on another machine) has a
    # base at 11.2% on the chain.
    "demo": ZooPreset(
        name="demo",
        skills=("reverse", "uppercase", "successor", "sort", "chain"),
        base=BaseTraining(mix={"reverse": 1.5, "uppercase": 1.5, "successor": 0.5, "sort": 0.8, "chain": 0.25},
                          cap=0.35),
        # 200 expert steps (400 until 2026-12-06): the five-skill build took 493 s on 2 idle cores against the
        # 300 s budget (bench_zoo); at 200 it took 281 s with every issue-4 target still met (seed 0: experts
        # +40 to +92 points over the base on their skill, against +48 to +93 at 400).
        expert=ExpertTraining(steps=200),
        monitor_every=25,
    ),
    # Weak on purpose: it exists for structure and determinism tests and must build in seconds.
    "test": ZooPreset(
        name="test",
        model=ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2),
        base=BaseTraining(steps=400, batch=32, lr=5e-3, warmup=20),
        expert=ExpertTraining(steps=100, batch=32, lr=2e-3, warmup=10),
        splits=Splits(calib=50, test=50, train=20),
        monitor_examples=32,
        monitor_every=40,
        ta_scales=(0.5, 1.0),
        # One thread: tests run beside other processes, and an oversubscribed OpenMP pool spins.
        threads=1,
    ),
}


def get_preset(name: str) -> ZooPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown zoo preset {name!r}{did_you_mean(name, PRESETS)}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
