"""After the suite: every required test ran and passed, and the counts. Usage: check_required.py RESULTS.xml

The browser, PostgreSQL, mergekit and locked-install tests skip on a laptop without their component; in CI they
must run. tests/required.py already fails them under CI=true; this also catches a required test
that was deselected, renamed away or never collected. Exit 1 with the missing ones named.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

# (file, test name prefix): at least one test case of each must have passed.
REQUIRED = [
    ("tests/test_report_browser.py", "test_reports_render_in_chromium"),  # headless Chromium
    ("tests/test_reliability.py", "test_four_workers_on_postgresql"),  # a real PostgreSQL server
    ("tests/test_vs_mergekit.py", "test_deterministic_methods_match_mergekit"),  # mergekit, in-process
    ("tests/test_vs_mergekit.py", "test_bf16_checkpoints_with_ties_match_mergekit"),
    ("tests/test_ci.py", "test_the_suite_runs_on_the_locked_versions"),  # the environment is requirements.lock
]


def _outcome(case: ET.Element) -> str:
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return tag
    return "passed"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_required.py RESULTS.xml", file=sys.stderr)
        return 2
    try:
        root = ET.parse(argv[0]).getroot()
    except (OSError, ET.ParseError) as exc:
        print(f"error: cannot read the test results {argv[0]}: {exc}; did the suite run?", file=sys.stderr)
        return 1
    cases = list(root.iter("testcase"))
    counts: dict[str, int] = {}
    by_file: dict[str, list[tuple[str, str]]] = {}
    for c in cases:
        out = _outcome(c)
        counts[out] = counts.get(out, 0) + 1
        path = c.get("classname", "").replace(".", "/") + ".py"
        by_file.setdefault(path, []).append((c.get("name", ""), out))
    print("tests: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failure", "error", "skipped")))
    missing = []
    for path, prefix in REQUIRED:
        got = [(n, o) for n, o in by_file.get(path, []) if n.startswith(prefix)]
        passed = sum(o == "passed" for _, o in got)
        print(f"required {path}::{prefix}: {passed}/{len(got)} passed")
        if not got or passed != len(got):
            missing.append(f"{path}::{prefix} ({', '.join(o for _, o in got) or 'not collected'})")
    if missing:
        print("error: required tests did not all run and pass: " + "; ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
