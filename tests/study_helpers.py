"""Study configs on the test zoo, shared by the study, reliability and report tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from mergesearch.zoo import study_inputs


def zoo_study_dict(zoo: Path, tmp: Path, *, name: str = "t", n_trials: int = 4, method: str = "task_arithmetic",
                   space: dict | None = None, sampler: str = "random", limit: int | None = 24, mode: str = "mean",
                   storage: str | None = None, **study) -> dict:
    models, tasks = study_inputs(zoo)
    return {
        "models": models,
        "merge": {"method": method, "device": "cpu"},
        "space": space or {"granularity": "per_layer", "parameters": {"lambda": {"fixed": 1.0}}},
        "objectives": {"tasks": [{**t, "limit": limit} for t in tasks], "mode": mode},
        "study": {"name": name, "storage": storage or f"sqlite:///{tmp / (name + '.db')}", "n_trials": n_trials,
                  "sampler": sampler, "seed": 0, "n_slices": 2, "top_k_test": 2, "pruner": "none", **study},
    }


def write_study(zoo: Path, tmp: Path, **kw) -> Path:
    path = tmp / f"{kw.get('name', 't')}.yaml"
    path.write_text(yaml.safe_dump(zoo_study_dict(zoo, tmp, **kw), sort_keys=False))
    return path
