"""Reliability with real processes and real databases: kill -9 and resume, concurrent workers on
SQLite (WAL) and PostgreSQL, failing candidates.

Nothing here mocks the storage. The crash tests run `python -m mergesearch run` in subprocesses
and kill them with SIGKILL at chosen stages (MERGESEARCH_PAUSE_AT makes the runner stop there)
and at a random moment; a lowered heartbeat (MERGESEARCH_HEARTBEAT=1,3) lets the next process
declare the killed trial dead within seconds.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mergesearch.config import load_config
from mergesearch.errors import CandidateError, StudyError
from mergesearch.study import records
from mergesearch.study import format_status, run_study, study_status
from mergesearch.study.opening import open_study
from mergesearch.study.owners import dead_reason, fail_dead_trials, owner_record, process_alive
from mergesearch.study.runner import MAX_FAILURES_IN_A_ROW, StudyRunner
from mergesearch.study.storage import GRACE_S, open_storage

from required import require
from study_helpers import write_study

REPO = Path(__file__).resolve().parent.parent
LOCK_WORDS = ("database is locked", "OperationalError", "Traceback")
GRACE = 3
HEARTBEAT = f"1,{GRACE}"  # MERGESEARCH_HEARTBEAT: beat every second, dead after GRACE seconds


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGESEARCH_")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _spawn(args: list[str], log: Path, env: dict, pause: str | None = None) -> subprocess.Popen:
    """`mergesearch ARGS` in a subprocess; with `pause` (STAGE:N) through tests/pause_at.py, which stops there."""
    # stderr to a file, not a pipe: a full pipe would block the child and look like a hang.
    fh = open(log, "w")
    cmd = [str(REPO / "tests" / "pause_at.py"), pause] if pause else ["-m", "mergesearch"]
    try:
        return subprocess.Popen([sys.executable, *cmd, *args], stdout=subprocess.DEVNULL, stderr=fh,
                                env=env, cwd=log.parent)
    finally:
        fh.close()


def _wait_for_text(proc: subprocess.Popen, log: Path, text: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {text!r} within {timeout}s:\n{log.read_text()[-3000:]}")


def _n_trials_sqlite(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM trials").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        con.close()


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))


def _key(trial) -> tuple:
    return tuple(sorted(trial.params.items()))


# --- kill -9 and resume ------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_at_every_stage_then_resume(zoo_test, tmp_path):
    n_trials = 6
    path = write_study(zoo_test, tmp_path, n_trials=n_trials, baselines=False, top_k_test=0, limit=8)
    db = tmp_path / "t.db"
    # (stage, n-th arrival): the 2nd merge of run 1; the 2nd evaluation of run 2; run 3's first storage
    # write, which is the retry of run 2's victim (a candidate killed twice); then a random moment.
    plan = [("merge", 2), ("evaluate", 2), ("store", 1), ("random", 0)]
    rng = random.Random(8)
    kills, killed_at = 0, float("-inf")

    def after_grace() -> None:  # the next process must see the killed trial as stale (no beat for > 3 s)
        time.sleep(max(0.0, killed_at + GRACE + 0.5 - time.monotonic()))

    for i, (stage, nth) in enumerate(plan):
        log = tmp_path / f"run{i}.log"
        before = _n_trials_sqlite(db) if db.exists() else 0
        after_grace()
        proc = _spawn(["run", str(path), "--no-progress"], log, _env(MERGESEARCH_HEARTBEAT=HEARTBEAT),
                      pause=None if stage == "random" else f"{stage}:{nth}")
        try:
            if stage == "random":
                end = time.monotonic() + 180
                while (not db.exists() or _n_trials_sqlite(db) <= before) and time.monotonic() < end:
                    assert proc.poll() is None, log.read_text()[-3000:]
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 2.5))
                if proc.poll() is not None:  # finished first: no kill to count
                    continue
            else:
                _wait_for_text(proc, log, f"mergesearch: paused at {stage}")
            _kill9(proc)
            kills, killed_at = kills + 1, time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert kills >= 3

    log = tmp_path / "final.log"
    after_grace()
    proc = _spawn(["run", str(path), "--no-progress"], log, _env(MERGESEARCH_HEARTBEAT=HEARTBEAT))
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    err = log.read_text()
    assert not any(w in err for w in LOCK_WORDS), err[-3000:]

    study = _load(f"sqlite:///{db}", "t")
    trials = records.search_trials(study, states=tuple(TrialState))
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    complete, failed = by_state[TrialState.COMPLETE], by_state[TrialState.FAIL]
    assert len(complete) == n_trials and not by_state[TrialState.PRUNED]  # exactly n_trials counted
    assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
    assert len({t.number for t in trials}) == len(trials)
    # Every killed trial was failed (stale heartbeat) and retried with the same parameters.
    assert 3 <= len(failed) <= kills
    retried_from = {}
    for t in trials:
        for n in t.system_attrs.get("retry_history", []):
            retried_from.setdefault(n, []).append(t)
    for f in failed:
        retries = retried_from.get(f.number)
        assert retries, f"failed trial {f.number} was not retried"
        assert all(_key(r) == _key(f) for r in retries)
    # The kill in the storage write landed after the scores were computed, the others before.
    assert any("objective_scores" in records.record(f) for f in failed)
    assert any("merge_s" not in records.record(f) for f in failed)
    # Each retry chain ends in a completed trial.
    chains = {}
    for t in trials:
        chains.setdefault(t.system_attrs.get("failed_trial", t.number), []).append(t)
    for first, chain in chains.items():
        assert chain[-1].state == TrialState.COMPLETE, (first, [(t.number, t.state.name) for t in chain])
    # No parameter set twice except along a retry chain (a resumed sampler must not replay its seed).
    owner = {}
    for first, chain in chains.items():
        for t in chain:
            assert owner.setdefault(_key(t), first) == first, f"trial {t.number} repeats chain {owner[_key(t)]}"
    assert len({_key(t) for t in complete}) == n_trials

    # Every stored score is what a fresh process computes for the same parameters.
    runner = StudyRunner(load_config(path))
    for t in complete:
        values = runner.score_plan(runner.plan_for(t.params))[0]
        assert values[0] == pytest.approx(t.values[0], abs=1e-9), t.number
    print(f"\nkill -9 survived: {kills} (stages merge, evaluate, store, random); trials {len(trials)} "
          f"({len(complete)} complete, {len(failed)} failed and retried); lost 0")


# --- dead trials: the owner's host and process ----------------------------------------------------


def _stopped_pid() -> int:
    """The process id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _running_trial(tmp: Path, owner: dict | None) -> tuple[optuna.Study, int]:
    """A study with one RUNNING trial (x in [0, 1]) whose owner record is `owner` (None: no record)."""
    study = optuna.create_study(study_name="d", storage=open_storage(f"sqlite:///{tmp / 'd.db'}", heartbeat=False))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    if owner is not None:
        trial.set_user_attr(records.OWNER_KEY, owner)
    return study, trial.number


def test_a_trial_of_a_gone_process_of_this_host_is_failed_at_once_and_queued_again(tmp_path):
    study, number = _running_trial(tmp_path, {**owner_record(0), "pid": _stopped_pid()})
    url = f"sqlite:///{tmp_path / 'd.db'}"
    st = study_status(url)  # read-only: says so, fails nothing
    assert st["running_gone"] == [number] and st["trials"]["running"] == 1
    assert "process on this host is gone" in format_status(st)
    assert fail_dead_trials(study) == [number]
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == number
    assert fail_dead_trials(study) == []  # failed once, queued once
    assert study_status(url)["running_gone"] == []


@pytest.mark.parametrize("owner, why", [
    (lambda: owner_record(0), "this very process"),
    (lambda: {**owner_record(0), "host": "another-host", "pid": _stopped_pid()}, "another host's: the heartbeat's"),
    (lambda: {**owner_record(0), "machine": "another-boot/pid:[1]", "pid": _stopped_pid()},
     "another pid namespace or boot"),
    (lambda: {**owner_record(7), "pid": _stopped_pid()}, "copied from the trial it retries, and young"),
    (lambda: None, "no record yet, and young"),
])
def test_a_trial_whose_process_may_live_is_left_running(tmp_path, owner, why):
    study, number = _running_trial(tmp_path, owner())
    assert fail_dead_trials(study) == [], why
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.RUNNING], why


def test_a_reused_pid_a_zombie_and_an_old_unowned_trial_count_as_gone(tmp_path):
    me = owner_record(0)
    assert process_alive(me["pid"], me["started"])
    assert not process_alive(me["pid"], me["started"] + 1)  # same pid, another start: the pid was reused
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not reaped until wait()
    try:
        deadline = time.monotonic() + 30
        while process_alive(zombie.pid, None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(zombie.pid, None)
    finally:
        zombie.wait()
    study, number = _running_trial(tmp_path, None)
    trial = study.get_trials(deepcopy=False)[0]
    later = trial.datetime_start + dt.timedelta(seconds=GRACE_S + 1)
    assert dead_reason(trial, trial.datetime_start, GRACE_S) is None
    assert "no owner recorded" in dead_reason(trial, later, GRACE_S)


def _foreign_owner_script(url: str) -> str:
    return (
        "import sys, time, optuna\n"
        "from mergesearch.study import records\n"
        "from mergesearch.study.owners import owner_record\n"
        "from mergesearch.study.storage import open_storage\n"
        f"study = optuna.create_study(study_name='f', storage=open_storage({url!r}))\n"
        "def objective(trial):\n"
        "    trial.suggest_float('x', 0, 1)\n"
        "    trial.set_user_attr(records.OWNER_KEY, {**owner_record(trial.number), 'host': 'another-host'})\n"
        "    sys.stderr.write('running\\n'); sys.stderr.flush()\n"
        "    time.sleep(3600)\n"
        "study.optimize(objective, n_trials=1)\n"
    )


@pytest.mark.slow
def test_a_killed_trial_of_another_host_is_left_to_the_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESEARCH_HEARTBEAT", HEARTBEAT)
    url = f"sqlite:///{tmp_path / 'f.db'}"
    log = tmp_path / "f.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _foreign_owner_script(url)], stderr=fh,
                                env=_env(MERGESEARCH_HEARTBEAT=HEARTBEAT))
    _wait_for_text(proc, log, "running", timeout=120)
    _kill9(proc)
    killed_at = time.monotonic()
    study = optuna.load_study(study_name="f", storage=open_storage(url))
    assert fail_dead_trials(study) == []
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.RUNNING]
    time.sleep(max(0.0, killed_at + GRACE + 1.5 - time.monotonic()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL, TrialState.WAITING]


@pytest.mark.slow
def test_three_kill9s_and_a_resume_leave_no_trial_running(zoo_test, tmp_path):
    """The issue's case: each run killed a moment after it starts a trial, then resumed at once, with a
    heartbeat grace (10 min) no run outlives: only the owner's process id can tell that a trial is dead."""
    n_trials = 6
    path = write_study(zoo_test, tmp_path, n_trials=n_trials, baselines=False, top_k_test=0, limit=8)
    env = _env(MERGESEARCH_HEARTBEAT="1,600")
    stages = [("merge", 2), ("evaluate", 1), ("store", 1)]
    for i, (stage, nth) in enumerate(stages):
        log = tmp_path / f"run{i}.log"
        proc = _spawn(["run", str(path), "--no-progress"], log, env, pause=f"{stage}:{nth}")
        try:
            _wait_for_text(proc, log, f"mergesearch: paused at {stage}")
            _kill9(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = tmp_path / "final.log"
    proc = _spawn(["run", str(path), "--no-progress"], log, env)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]

    trials = records.search_trials(_load(f"sqlite:///{tmp_path / 't.db'}", "t"), states=tuple(TrialState))
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    assert states.count(TrialState.COMPLETE) == n_trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == len(stages)  # each killed trial failed once, by the run after its kill
    for f in failed:
        retries = [t for t in trials if f.number in t.system_attrs.get("retry_history", [])]
        assert retries and all(_key(r) == _key(f) for r in retries), f.number
    assert "its process" in "".join(log.read_text() for log in tmp_path.glob("*.log"))


# --- concurrent workers -------------------------------------------------------------------------


def _stress_storage_script(url: str, name: str, n: int) -> str:
    return (
        "import optuna, sys\n"
        "from mergesearch.study.storage import open_storage\n"
        "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
        f"st = optuna.load_study(study_name={name!r}, storage=open_storage({url!r}, heartbeat=False))\n"
        f"for _ in range({n}):\n"
        "    t = st.ask()\n"
        "    v = sum(t.suggest_float(f'w{i}', 0, 1) for i in range(16))\n"
        "    t.set_user_attr('scores', {'x': v})\n"
        "    st.tell(t, v)\n"
    )


def _run_workers(zoo, tmp: Path, url: str, *, n_workers: int = 4, n_trials: int = 8, stress: int = 0) -> dict:
    """n_workers `mergesearch worker` processes on one study; then, with `stress`, as many processes that
    only ask and tell `stress` trials each as fast as they can (the storage's worst case for locks)."""
    path = write_study(zoo, tmp, name="w", storage=url, n_trials=n_trials, baselines=False, top_k_test=0, limit=4,
                       sampler="tpe")
    open_study(StudyRunner(load_config(path), load_evaluator=False))  # `run` creates; workers join
    logs = [tmp / f"worker{i}.log" for i in range(n_workers)]
    t0 = time.monotonic()
    procs = [_spawn(["worker", str(path), "--no-progress"], log, _env()) for log in logs]
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errs = [log.read_text() for log in logs]
    assert codes == [0] * n_workers, "\n".join(e[-2000:] for e in errs)
    for e in errs:
        assert not any(w in e for w in LOCK_WORDS), e[-3000:]

    study = _load(url, "w")
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    counted = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    assert TrialState.RUNNING not in states and TrialState.FAIL not in states
    assert TrialState.WAITING not in states
    # Each worker stops once the shared count reaches n_trials; trials already running elsewhere finish.
    assert n_trials <= counted <= n_trials + n_workers - 1
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len({t._trial_id for t in trials}) == len(trials)
    keys = [_key(t) for t in trials if t.state == TrialState.COMPLETE]
    assert len(set(keys)) == len(keys), "two workers proposed the same candidate (same sampler seed)"
    for t in trials:
        assert records.objective_scores(t) and t.values is not None

    got = {"workers": n_workers, "trials": len(trials), "counted": counted,
           "workers_s": round(time.monotonic() - t0, 1)}
    if not stress:
        return got
    t0 = time.monotonic()
    queued = optuna.create_study(study_name="stress", storage=open_storage(url, heartbeat=False))
    for i in range(stress):  # queued trials: every process races to claim them (WAITING -> RUNNING)
        queued.enqueue_trial({f"w{j}": (16 * i + j) % 97 / 97 for j in range(16)})
    procs = [subprocess.Popen([sys.executable, "-c", _stress_storage_script(url, "stress", stress)], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(n_workers)]
    outs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n_workers, "\n".join(outs)
    assert not any(w in o for o in outs for w in LOCK_WORDS), "\n".join(outs)
    st = _load(url, "stress").get_trials(deepcopy=False)
    assert len(st) == stress * n_workers and all(t.state == TrialState.COMPLETE for t in st)
    assert sorted(t.number for t in st) == list(range(stress * n_workers))
    assert len({_key(t) for t in st[:stress]}) == stress  # each queued trial was run once
    return {**got, "stress_trials": len(st), "stress_s": round(time.monotonic() - t0, 1)}


@pytest.mark.slow
def test_four_workers_on_sqlite(zoo_test, tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    got = _run_workers(zoo_test, tmp_path, url, stress=20)
    con = sqlite3.connect(tmp_path / "w.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    print(f"\nsqlite: {got}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(cands[-1]) if cands else None


@pytest.fixture(scope="module")
def pg_url():
    """A throwaway PostgreSQL cluster in a temp folder on 127.0.0.1 and a free port; its URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    require(initdb and pg_ctl, "postgresql", "server binaries (initdb, pg_ctl) not found: install Debian's "
            "`postgresql` package (.ci/run does)")
    try:
        import psycopg2
    except ImportError:
        require(False, "psycopg2", "not installed (pip install psycopg2-binary, a dev dependency)")
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the `postgres` user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            require(False, "postgresql", "running as root and there is no `postgres` user to run the server as")
        runuser = shutil.which("runuser")
        require(runuser, "postgresql", "running as root without `runuser` to start the server as `postgres`")
        prefix = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="mergesearch-pg-"))
    if prefix:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, port = root / "data", _free_port()

    def run(cmd: list[str]) -> None:
        res = subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=120, cwd=root)
        if res.returncode != 0:
            log = (root / "server.log").read_text()[-1500:] if (root / "server.log").exists() else ""
            require(False, "postgresql", f"cannot start a throwaway server ({Path(cmd[0]).name} exit "
                    f"{res.returncode}): {(res.stderr or res.stdout).strip()[-1500:]} {log}")

    started = False
    try:
        run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        run([pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
             "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=100", "start"])
        started = True
        con = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE mergesearch")
        con.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/mergesearch"
    finally:
        if started:
            subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_four_workers_on_postgresql(zoo_test, tmp_path, pg_url):
    got = _run_workers(zoo_test, tmp_path, pg_url, stress=20)
    assert not list(tmp_path.glob("*.db"))
    print(f"\npostgresql: {got}")


# --- failing candidates --------------------------------------------------------------------------


def test_failing_candidates_become_failed_trials_and_the_study_goes_on(zoo_test, tmp_path):
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=3, baselines=False, top_k_test=0, limit=4))
    runner = StudyRunner(cfg)
    i_t = next(i for i, t in enumerate(runner.mat.tensors) if t.layer == 0)
    delta = runner.mat.sources(i_t)[1][0]  # the first expert's task vector of a layer-0 tensor, in place
    clean = delta.clone()
    real_iter = runner.evaluator.iter_slices
    calls = {"merge": 0, "evaluate": 0}

    def broken_iter(n):  # the evaluator itself raises half-way through a candidate
        it = real_iter(n)
        yield next(it)
        raise IndexError("simulated evaluator bug: index 7 is out of bounds")

    def hook(stage):
        calls[stage] = calls.get(stage, 0) + 1
        if stage == "merge":
            delta.copy_(clean)
            runner.evaluator.iter_slices = real_iter
            if calls["merge"] == 2:
                delta.view(-1)[0] = float("nan")  # a poisoned task vector: NaN weights
            elif calls["merge"] == 3:
                delta.view(-1)[:5] = float("inf")
            elif calls["merge"] == 7:
                runner.evaluator.iter_slices = broken_iter
        elif stage == "evaluate":
            n = calls["merge"]
            if n == 4:
                raise MemoryError("simulated host allocation failure")
            if n == 5:
                torch.empty(1 << 52, dtype=torch.uint8)  # a real CPU allocator failure (4 PiB)
            if n == 6:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    runner.fault_hook = hook
    study = run_study(cfg, runner=runner, progress=False)
    searched = records.search_trials(study, states=tuple(TrialState))
    failed = [t for t in searched if t.state == TrialState.FAIL]
    reasons = [records.record(t).get("fail_reason", "") for t in failed]
    assert len(failed) == 6, reasons
    assert "not finite" in reasons[0] and "not finite" in reasons[1]
    assert reasons[2].startswith("out of memory") and "simulated host" in reasons[2]
    assert reasons[3].startswith("out of memory") and "can't allocate memory" in reasons[3]
    assert reasons[4].startswith("out of memory: CUDA out of memory")
    assert reasons[5].startswith("IndexError: simulated evaluator bug")
    assert all("\n" not in r for r in reasons)
    complete = [t for t in searched if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and not [t for t in searched if t.state == TrialState.RUNNING]
    # The sources were not damaged by the poisoned candidates: a later candidate scores as it should.
    delta.copy_(clean)
    runner.evaluator.iter_slices = real_iter
    runner.fault_hook = None
    last = complete[-1]
    assert runner.score_plan(runner.plan_for(last.params))[0][0] == pytest.approx(last.values[0], abs=1e-9)


def test_a_failed_trials_tensors_are_freed_before_the_next_trial(zoo_test, tmp_path):
    """A failed candidate's error (chained in the CandidateError, with its traceback's frames) holds the
    trial's tensors in a reference cycle with Optuna's trial machinery: they must be gone when the next
    trial starts (on a GPU, an out-of-memory trial would otherwise leave the next one without the memory)."""
    import weakref

    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=3, baselines=False, top_k_test=0, limit=4))
    runner = StudyRunner(cfg)
    held, alive_at_start = [], []
    real_plan_for = runner.plan_for

    def plan_for(values):
        alive_at_start.append([r() is not None for r in held])
        activations = torch.ones(1 << 16)  # what a failing merge or evaluation had allocated
        held.append(weakref.ref(activations))
        if len(held) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_plan_for(values)

    runner.plan_for = plan_for
    # pytest's log capture keeps Optuna's record of the failure, traceback and all; and the automatic cyclic
    # collector, off here, runs whenever allocations tell it to: the cycle, promoted to an old generation
    # by the trial's own collections, can outlive many trials
    logging.disable(logging.WARNING)
    gc.disable()
    try:
        run_study(cfg, runner=runner, progress=False)
    finally:
        gc.enable()
        logging.disable(logging.NOTSET)
    assert len(alive_at_start) == 4 and not any(any(a) for a in alive_at_start)  # nothing of a trial lived on


def test_a_broken_setup_stops_the_study_instead_of_failing_every_trial(zoo_test, tmp_path):
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=30, baselines=False, top_k_test=0, limit=4))
    runner = StudyRunner(cfg)

    def hook(stage):
        if stage == "merge":
            raise CandidateError("simulated: every candidate fails")

    runner.fault_hook = hook
    with pytest.raises(StudyError, match=f"last {MAX_FAILURES_IN_A_ROW} candidates all failed"):
        run_study(cfg, runner=runner, progress=False)
    study = _load(cfg.storage_url, "t")
    states = [t.state for t in records.search_trials(study, states=tuple(TrialState))]
    assert states == [TrialState.FAIL] * MAX_FAILURES_IN_A_ROW


def test_no_fault_hook_outside_the_tests_and_the_pause_spec_is_validated(monkeypatch):
    """A user's runner has no fault hook (the pause lives in tests/pause_at.py, not in the package)."""
    from pause_at import make_hook

    from mergesearch.study.storage import GRACE_S, HEARTBEAT_S, heartbeat_settings
    from mergesearch.study.workbench import Workbench

    monkeypatch.delenv("MERGESEARCH_HEARTBEAT", raising=False)
    assert Workbench.fault_hook is None
    assert heartbeat_settings() == (HEARTBEAT_S, GRACE_S)
    with pytest.raises(ValueError, match="merge, evaluate or store"):
        make_hook("shopping")
    assert callable(make_hook("store:2"))
    monkeypatch.setenv("MERGESEARCH_HEARTBEAT", "5,2")
    with pytest.raises(StudyError, match="INTERVAL < GRACE"):
        heartbeat_settings()
    monkeypatch.setenv("MERGESEARCH_HEARTBEAT", "1,3")
    assert heartbeat_settings() == (1, 3)
