"""Which process runs a trial, and failing the trials of processes that are gone.

Optuna's heartbeat declares a trial dead only after a grace period without a beat (storage.GRACE_S),
and only while some process is still running trials to notice: a study killed with kill -9 and
resumed could finish its remaining trials before the killed trial went stale, leaving it RUNNING
forever. So every trial records its owner (host, process id and the process's start time) as
soon as it starts, and a run or worker opening the study, and again when it finishes, fails at
once every RUNNING trial whose owner was a process of this host that no longer exists, and
re-queues its parameters as the heartbeat would (storage.retry_callback). A trial of another
host is left to the heartbeat: from here one cannot tell whether its process is alive.

"This host" is the hostname, the boot and the process-id namespace together: a container with
the host's name but its own process ids, or the same machine after a reboot, is another host.
A trial without an owner record (its process died in the few milliseconds between Optuna
claiming the trial and the record being written; a heartbeat may not even have been written
then, and Optuna never fails a trial without one) is failed once it is older than the grace period.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import socket
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergesearch.study import records
from mergesearch.study.storage import heartbeat_settings, retry_callback

log = logging.getLogger(__name__)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@functools.cache
def this_host() -> dict[str, str]:
    """This machine as an owner record names it: hostname, and its boot and process-id namespace (Linux)."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "machine": f"{_read('/proc/sys/kernel/random/boot_id')}/{pidns}"}


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc; None without /proc."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name before ")" may hold spaces
    return fields[0], int(fields[19])


def owner_record(trial_number: int) -> dict:
    """The owner of a trial this process runs (stored under records.OWNER_KEY)."""
    stat = _proc_stat(os.getpid())
    return {"trial": trial_number, **this_host(), "pid": os.getpid(), "started": stat[1] if stat else None}


def process_alive(pid: int, started: int | None) -> bool:
    """Whether process `pid` of this host still exists and is the one that started at `started`
    (a process id can be reused; a zombie, killed but not yet reaped by its parent, is gone)."""
    if os.name == "nt":
        return True  # Windows' os.kill(pid, 0) terminates the process: leave its trials to the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: existing is all we can know
    state, start = stat
    return state != "Z" and (started is None or start == started)


def dead_reason(trial: FrozenTrial, now: dt.datetime, grace_s: float) -> str | None:
    """Why a RUNNING trial's process is known to be gone, or None (alive, or another host's)."""
    owner = records.owner(trial)
    if owner is None or owner.get("trial") != trial.number:
        # no record, or one copied from the trial this one retries
        age = (now - trial.datetime_start).total_seconds() if trial.datetime_start else 0.0
        return f"no owner recorded {age:.0f} s after it started" if age > grace_s else None
    if {k: owner.get(k) for k in this_host()} != this_host():
        return None
    if process_alive(int(owner["pid"]), owner.get("started")):
        return None
    return f"its process {owner['pid']} on this host is gone"


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials of processes of this host that no longer exist, and re-queue their
    parameters; returns their numbers. A trial finished meanwhile (by a sibling doing the same) is skipped."""
    now = dt.datetime.now()
    grace = heartbeat_settings()[1]
    retry = retry_callback()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = dead_reason(trial, now, grace)
        if reason is None:
            continue
        try:
            frozen = study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):  # no longer RUNNING: finished by its process or failed by another
            continue
        retry(study, frozen)
        log.warning("trial %d failed and its parameters queued again: %s", trial.number, reason)
        failed.append(trial.number)
    return failed
