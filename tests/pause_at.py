"""Test-only fault injection: `python tests/pause_at.py STAGE[:N] ARGS...` runs `mergesearch ARGS...` and,
at the N-th arrival (default 1) at STAGE ("merge", "evaluate" or "store"), writes "mergesearch: paused at
STAGE" to stderr and sleeps, so that a crash test can kill -9 the process exactly there.

It lives with the tests, not in the package: no environment variable or flag of `mergesearch` can pause
a user's study. The hook is the runner's `fault_hook` seam (study.workbench.Workbench).
"""

from __future__ import annotations

import sys
import time

STAGES = ("merge", "evaluate", "store")


def make_hook(spec: str):
    """A fault hook pausing at the N-th arrival at a stage; ValueError on a malformed STAGE[:N]."""
    stage, _, nth = spec.partition(":")
    if stage not in STAGES or not (nth or "1").isdigit():
        raise ValueError(f"pause spec {spec!r}: give merge, evaluate or store, optionally :N")
    seen = {"n": 0}

    def hook(at: str) -> None:
        if at == stage:
            seen["n"] += 1
            if seen["n"] == int(nth or 1):
                sys.stderr.write(f"mergesearch: paused at {at}\n")
                sys.stderr.flush()
                time.sleep(3600)

    return hook


def main(argv: list[str]) -> int:
    from mergesearch.cli import main as cli_main
    from mergesearch.study.workbench import Workbench

    Workbench.fault_hook = staticmethod(make_hook(argv[0]))
    return cli_main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
