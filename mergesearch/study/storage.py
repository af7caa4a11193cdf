"""Optuna storages for studies: SQLite (WAL), PostgreSQL/MySQL, or a journal file.

SQLite is the default. Optuna's RDB storage writes every suggested parameter in its own
transaction; with SQLite's default rollback journal and full fsync that was measured here at
~100 ms per 50-parameter trial, with WAL + synchronous=NORMAL at ~45 ms, and a journal file
at ~20 ms (benchmarks/bench_study.py). WAL+NORMAL stays crash-safe for a killed process (only
an OS crash can lose the last commits) and lets several workers read while one writes.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sqlite3
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from mergesearch.errors import StudyError

log = logging.getLogger(__name__)

HEARTBEAT_S = 5  # a worker's trials are marked alive this often ...
GRACE_S = 20  # ... and declared dead (FAILED, then retried) after this long without a beat
MAX_RETRY = 3  # a candidate whose worker died this many times is not retried again
SQLITE_BUSY_MS = 60_000
# MERGESEARCH_HEARTBEAT="INTERVAL,GRACE" (seconds) overrides the two above: the crash-resume tests
# use "1,3" so that a killed worker's trial is declared dead within seconds, not 20 s.
HEARTBEAT_ENV = "MERGESEARCH_HEARTBEAT"


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: the defaults, or MERGESEARCH_HEARTBEAT."""
    spec = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not spec:
        return HEARTBEAT_S, GRACE_S
    try:
        beat, grace = (int(x) for x in spec.split(","))
    except ValueError:
        raise StudyError(f"{HEARTBEAT_ENV}={spec!r}: give two whole numbers of seconds, INTERVAL,GRACE") from None
    if not 0 < beat < grace:
        raise StudyError(f"{HEARTBEAT_ENV}={spec!r}: need 0 < INTERVAL < GRACE so a live worker is never declared dead")
    return beat, grace


def _sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def require_existing(url: str, hint: str) -> None:
    """Refuse an SQLite URL whose file does not exist: opening it would create an empty database
    (for a reader or a joining worker there is nothing to read or join). `hint` says what to run first."""
    if url.startswith("sqlite:///") and not _sqlite_path(url).is_file():
        raise StudyError(f"no study storage at {_sqlite_path(url)}: {hint}")


def _prepare_sqlite(url: str) -> None:
    path = _sqlite_path(url)
    if str(path) in ("", ":memory:"):
        return
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"cannot create the folder of storage {url!r}: {exc.strerror}") from None
    try:
        con = sqlite3.connect(path, timeout=SQLITE_BUSY_MS / 1000)
        # WAL is a property of the database file: set once, every later connection uses it.
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
    except sqlite3.DatabaseError as exc:
        raise StudyError(f"storage {url!r} cannot be opened as SQLite ({exc}): give another storage path") from None


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cur.close()
    dbapi_connection.isolation_level = None  # transactions are begun by _sqlite_begin, not by the driver


def _sqlite_begin(conn) -> None:
    # Optuna claims a queued trial by reading its state and then writing RUNNING, relying on
    # SELECT ... FOR UPDATE, which SQLite ignores: two workers could claim (and run, and tell) the
    # same trial. BEGIN IMMEDIATE takes the write lock first, so every read-then-write is atomic.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines off: mergesearch logs and draws its own progress."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def quietly(fn, *args, **kwargs):
    """Call fn without Optuna's experimental-feature warnings (heartbeat and retry are stable in use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kwargs)


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as the psycopg (3) driver; use psycopg2 when only it is installed."""
    scheme, sep, rest = url.partition("://")
    if scheme == "postgresql" and sep:
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
    return url


def retry_callback() -> RetryFailedTrialCallback:
    """What happens to a trial whose worker died: its parameters are queued again (WAITING), at most
    MAX_RETRY times. The heartbeat and study.owners both use it, so a retry means the same either way."""
    return quietly(RetryFailedTrialCallback, max_retry=MAX_RETRY)


def open_storage(url: str, *, heartbeat: bool = True) -> BaseStorage:
    """An Optuna storage for `url`: sqlite:///PATH, postgresql://..., mysql://..., or journal:///PATH.

    RDB storages get a heartbeat: trials of a dead worker are marked FAILED after GRACE_S seconds
    and their parameters re-enqueued (RetryFailedTrialCallback) for the next worker to retry.
    """
    if url.startswith("journal:///") or url.endswith((".log", ".journal")):
        path = Path(url.removeprefix("journal:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        except OSError as exc:
            raise StudyError(f"journal storage {url!r} cannot be opened: {exc.strerror}") from None
    if not url.startswith(("sqlite:///", "postgresql", "mysql")):
        raise StudyError(f"storage {url!r} is not understood: use sqlite:///PATH, postgresql://USER@HOST/DB, "
                         "mysql://USER@HOST/DB or journal:///PATH")
    kwargs: dict = {}
    driver_url = _with_driver(url)
    if url.startswith("sqlite:///"):
        _prepare_sqlite(url)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_BUSY_MS / 1000}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    if heartbeat:
        # Optuna >= 4.9 renamed the callback argument; older releases only know the first name.
        cb_arg = ("heartbeat_stale_trial_callback"
                  if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage).parameters
                  else "failed_trial_callback")
        beat, grace = heartbeat_settings()
        kwargs.update(heartbeat_interval=beat, grace_period=grace)
        kwargs[cb_arg] = retry_callback()
    try:
        storage = quietly(RDBStorage, driver_url, **kwargs)
    except Exception as exc:  # sqlalchemy / driver errors carry the useful text
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "DB access module" in first:
            first = "no database driver for it: pip install psycopg2-binary (PostgreSQL) or mysqlclient (MySQL)"
        raise StudyError(f"storage {url!r} cannot be opened: {first}") from None
    if url.startswith("sqlite:///"):
        from sqlalchemy import event

        event.listen(storage.engine, "connect", _sqlite_pragmas)
        event.listen(storage.engine, "begin", _sqlite_begin)
        storage.engine.dispose()  # reconnect so every pooled connection runs the pragmas
    return storage


def study_exists(storage: BaseStorage, name: str) -> bool:
    return name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
