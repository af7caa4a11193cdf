"""Optuna samplers and pruners by name, seeded; `auto` picks one and says why."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import optuna

from mergesearch.config import sampler_objectives_problem
from mergesearch.errors import ConfigError

log = logging.getLogger(__name__)

ConstraintsFunc = Callable[[optuna.trial.FrozenTrial], Sequence[float]]


def choose_sampler(name: str, *, n_params: int, n_objectives: int, has_constraints: bool) -> tuple[str, str]:
    """(sampler name, reason); `auto` decides from the number of parameters and objectives."""
    if name != "auto":
        return name, "chosen in the config"
    if n_objectives > 1:
        return "nsga2", f"{n_objectives} objectives: NSGA-II builds a Pareto front"
    if has_constraints:
        return "tpe", "constraints: TPE honours them (CMA-ES does not)"
    if n_params <= 8:
        return "gp", f"{n_params} parameters: a Gaussian process is the most sample-efficient in few dimensions"
    return "cmaes", (f"{n_params} continuous parameters: CMA-ES scales to many dimensions, costs little per "
                     "trial and starts from the best baseline merge")


def make_sampler(name: str, *, seed: int, n_params: int, n_objectives: int = 1,
                 x0: dict[str, float] | None = None, constraints_func: ConstraintsFunc | None = None,
                 n_startup_trials: int = 10, consider_pruned: bool = False) -> tuple[optuna.samplers.BaseSampler, str]:
    """A seeded sampler and the reason it was chosen. Same seed and history -> same proposals."""
    chosen, reason = choose_sampler(name, n_params=n_params, n_objectives=n_objectives,
                                    has_constraints=constraints_func is not None)
    problem = sampler_objectives_problem(chosen, n_objectives)
    if problem:
        raise ConfigError(problem)
    if constraints_func is not None and chosen in ("cmaes", "random"):
        log.warning("sampler %s ignores constraints; use tpe, gp or nsga2 to honour them", chosen)
    with warnings.catch_warnings():  # x0 and GPSampler carry Optuna deprecation/experimental warnings
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return _build(chosen, seed, x0, constraints_func, n_startup_trials, consider_pruned), reason


def _build(chosen: str, seed: int, x0, constraints_func, n_startup_trials: int,
           consider_pruned: bool) -> optuna.samplers.BaseSampler:
    if chosen == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=n_startup_trials,
                                             constraints_func=constraints_func)
    elif chosen == "cmaes":
        # Warm start: the search distribution is centred on x0 (the study's start point). With pruning,
        # a pruned candidate counts at its last reported (partial) score: otherwise every pruned trial
        # is lost to CMA-ES and a generation needs many more candidates to fill.
        sampler = optuna.samplers.CmaEsSampler(seed=seed, x0=x0, n_startup_trials=0,
                                               warn_independent_sampling=False,
                                               consider_pruned_trials=consider_pruned)
    elif chosen == "gp":
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials,
                                            constraints_func=constraints_func)
    elif chosen == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_func)
    elif chosen == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        raise ConfigError(f"unknown sampler {chosen!r}: use auto, tpe, cmaes, gp, nsga2 or random")
    return sampler


def make_pruner(name: str, *, n_slices: int, n_objectives: int) -> optuna.pruners.BasePruner:
    """Median or successive-halving pruning over calibration slices (single objective only)."""
    if name == "none" or n_objectives > 1 or n_slices < 2:
        return optuna.pruners.NopPruner()
    if name == "median":
        # n_min_trials: a median over fewer than 5 trials that reported at a step is noise.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0, n_min_trials=5)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    raise ConfigError(f"unknown pruner {name!r}: use none, median or halving")
