"""Torch threads for the long-running commands (run, worker, demo): a fair share of the machine's cores.

torch starts one intra-op thread per core in every process. Three mergesearch processes on two cores
then run six busy threads, and OpenMP threads that wait for each other spin: demo trials went from
0.35 s to 8.8 s. So `run`, `worker` and `demo` register themselves (a pid file in a folder under the
temp dir) and take `cores // live registered processes` threads (at least 1), re-checked before each
evaluation (`rebalance`), so that the processes already running shrink when a worker joins and grow
back when it leaves. `--threads N` fixes the count instead. A zoo build keeps its preset's fixed count (its
weights depend on it) but is counted all the same (`occupying`): a study beside a build shrinks to its share.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

REGISTRY = Path(tempfile.gettempdir()) / "mergesearch-processes"
# Seconds between two looks at the registry from `rebalance` (a look lists a folder of a few files).
RECHECK_S = 5.0


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def fair_share(n_cores: int, n_processes: int) -> int:
    """Threads per process when `n_processes` share `n_cores`: an equal split, at least one."""
    return max(1, n_cores // max(1, n_processes))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def live_processes(registry: Path = REGISTRY) -> int:
    """Registered mergesearch processes still running (their pid files); stale files are removed."""
    if os.name != "posix":  # no cheap existence check without side effects: count only this process
        return 1
    n = 0
    try:
        entries = list(registry.iterdir())
    except FileNotFoundError:
        return 0
    for f in entries:
        if not f.name.isdigit():
            continue
        if _alive(int(f.name)):
            n += 1
        else:
            f.unlink(missing_ok=True)
    return n


class _Share:
    """This process's registration and the thread count it applied."""

    def __init__(self, registry: Path, fixed: int | None):
        self.registry = registry
        self.fixed = fixed
        self.applied = 0
        self.checked = 0.0
        self.pid_file: Path | None = None

    def register(self) -> None:
        if self.fixed is not None or os.name != "posix":
            return
        self.registry.mkdir(parents=True, exist_ok=True)
        self.pid_file = self.registry / str(os.getpid())
        self.pid_file.touch()
        atexit.register(self.unregister)

    def unregister(self) -> None:
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
            self.pid_file = None

    def target(self) -> tuple[int, int]:
        """(threads, processes sharing the cores)."""
        if self.fixed is not None:
            return self.fixed, 1
        n = max(1, live_processes(self.registry))
        return fair_share(cores(), n), n

    def apply(self) -> int:
        n, procs = self.target()
        self.checked = time.monotonic()
        if n != self.applied:
            torch.set_num_threads(n)
            if self.applied:
                log.debug("torch threads: %d (%d cores shared by %d mergesearch processes)", n, cores(), procs)
            self.applied = n
        return n


_share: _Share | None = None


def apply_threads(threads: int | None = None, *, registry: Path = REGISTRY) -> int:
    """Set torch's threads for this process: `threads`, or (None) a fair share of the cores among the
    mergesearch processes registered on this machine, kept up to date by `rebalance`. Returns the count."""
    global _share
    if threads is not None and threads < 1:
        from mergesearch.errors import ConfigError

        raise ConfigError(f"--threads must be >= 1 (got {threads}); omit it for a fair share of the cores")
    if _share is not None:
        _share.unregister()
    _share = _Share(registry, threads)
    _share.register()
    n = _share.apply()
    try:
        # inter-op threads can be set once per process, before any inter-op work; later calls keep the first
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass
    how = "fixed by --threads" if threads is not None else \
        f"a fair share of {cores()} cores among {max(1, live_processes(registry))} mergesearch processes"
    log.debug("torch threads: %d (%s)", n, how)
    return n


@contextlib.contextmanager
def occupying(n: int, *, registry: Path = REGISTRY):
    """Run the block with exactly `n` torch threads (a result that depends on the reduction order stays the
    same) while the fair-share processes count this one (its pid file; left as it was if already there)."""
    old = torch.get_num_threads()
    pid_file = registry / str(os.getpid())
    mine = os.name == "posix" and not pid_file.exists()
    if mine:
        registry.mkdir(parents=True, exist_ok=True)
        pid_file.touch()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
        if mine:
            pid_file.unlink(missing_ok=True)


def rebalance() -> int | None:
    """Re-apply the fair share if other mergesearch processes started or ended since the last look.
    A no-op unless `apply_threads()` chose the fair share; looks at most every RECHECK_S seconds."""
    if _share is None or _share.fixed is not None or time.monotonic() - _share.checked < RECHECK_S:
        return None
    return _share.apply()


def release() -> None:
    """Leave the registry (tests; a process leaves it at exit by itself)."""
    global _share
    if _share is not None:
        _share.unregister()
        _share = None
