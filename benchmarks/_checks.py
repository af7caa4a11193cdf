"""The targets one benchmark run checks: an `ok` or `MISS` line per target, and exit code 1 on any MISS.

A benchmark is a check, not prose: `make bench` stops at the first script that misses a target.

    checks = Checks()
    checks.check(f"task_arithmetic at {share:.2f} of add bandwidth (target >= {TARGET})", share >= TARGET)
    return checks.finish()  # from main(): 0 when every target was met, else 1
"""

from __future__ import annotations

MISSED = 1


class Checks:
    """Targets checked by one run, in the order they were checked; printed together by `finish`."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def check(self, text: str, met: bool) -> bool:
        """Record one target: `text` says what was measured against what. A NaN comparison is a miss."""
        self.results.append((text, bool(met)))
        return bool(met)

    def finish(self) -> int:
        """Print one `ok`/`MISS` line per target and a summary; the exit code: 0 when all were met, else 1."""
        for text, met in self.results:
            print(("ok    " if met else "MISS  ") + text)
        missed = sum(not met for _, met in self.results)
        if not self.results:
            print("no target checked in this run")
        elif missed:
            print(f"targets MISSED: {missed}/{len(self.results)}")
        else:
            print(f"targets met: {len(self.results)}/{len(self.results)}")
        return MISSED if missed else 0
