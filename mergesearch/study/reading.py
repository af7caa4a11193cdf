"""Find a stored study from what a user names: a study YAML, a storage URL, or a .db/.log file.

Reading never creates a storage: status, export, reports and the dashboard open what `run` made.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from mergesearch.config import Config, config_from_dict, load_config
from mergesearch.errors import StudyError
from mergesearch.study import records
from mergesearch.study.storage import open_storage, quiet_optuna, require_existing


def resolve_storage(spec: str | Path, study_name: str | None = None) -> tuple[str, str, Config | None]:
    """(storage URL, study name, config or None) of a study YAML, a storage URL or a .db/.log file
    (then `study_name` or the only study in it). The storage must exist: reading never creates one."""
    text = str(spec)
    cfg = None
    if text.endswith((".yaml", ".yml")):
        cfg = load_config(text)
        url, name = cfg.storage_url, study_name or cfg.study.name
    else:
        if "://" in text:
            url = text
        elif text.endswith((".log", ".journal")):
            url = f"journal:///{Path(text).resolve()}"
        else:
            if not Path(text).is_file():
                raise StudyError(f"{text} is neither a study YAML, a storage URL nor an existing .db/.log file")
            url = f"sqlite:///{Path(text).resolve()}"
        name = study_name
    require_existing(url, "start the study with `mergesearch run STUDY.yaml`")
    names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(url, heartbeat=False),
                                                                  include_best_trial=False)]
    if name is None:
        if len(names) != 1:
            raise StudyError(f"{url} holds {len(names)} studies ({', '.join(names) or 'none'}): pass --study-name")
        name = names[0]
    if name not in names:
        raise StudyError(f"no study {name!r} in {url} (it holds: {', '.join(names) or 'none'}); "
                         "start it with `mergesearch run STUDY.yaml`")
    return url, name, cfg


def resolve_study(spec: str | Path, study_name: str | None = None) -> tuple[optuna.Study, Config | None]:
    """A study from a study YAML, a storage URL or a .db/.log file (then `study_name` or the only study)."""
    quiet_optuna()
    url, name, cfg = resolve_storage(spec, study_name)
    study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))
    if cfg is None:
        raw = records.meta(study).get("config")
        if raw:
            cfg = config_from_dict(raw, Path(records.meta(study).get("config_path") or "."))
    return study, cfg


def load_study(spec: str | Path, study_name: str | None = None) -> optuna.Study:
    """The Optuna study of a study YAML or storage (read-only use: reports, analysis)."""
    return resolve_study(spec, study_name)[0]
