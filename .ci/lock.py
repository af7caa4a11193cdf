"""The locked install: requirements.lock pins every package, and pyproject's floors are the locked versions.

`make install` installs with `pip install -c requirements.lock`, so CI runs the same versions next month as
today. `make lock` installs the newest versions into a fresh virtual environment, then runs

    python .ci/lock.py FREEZE.txt

which writes requirements.lock from that environment's `pip freeze --all --exclude-editable` and raises every floor
in pyproject.toml to the locked version (a floor is a version a test run used), then runs the suite on it.
tests/test_ci.py checks the lock and the floors with the functions below.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
PYPROJECT = REPO / "pyproject.toml"
HEADER = """\
# Every package mergesearch installs, direct and transitive, at the versions the suite last passed with.
# Used as constraints: `pip install -c requirements.lock -e '.[dev]'` (make install). Refresh it with
# `make lock` (newest versions in a fresh venv, floors in pyproject.toml raised to them, suite run).
# torch carries no local label (+cpu): a CUDA build of the same version satisfies it.
"""
# Not locked: the project itself, and the installer (setuptools and wheel are, as dependencies need them).
UNLOCKED = ("mergesearch", "pip")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#+]+)(\+\S+)?$")
_SPEC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$")


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): `lm_eval` and `LM-Eval` are `lm-eval`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_text(freeze: str) -> str:
    """requirements.lock's text from `pip freeze --all --exclude-editable` output: sorted `name==version` lines."""
    pins = {}
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _PIN.match(line)
        if not m:
            raise ValueError(f"pip freeze line {line!r} is not name==version: install it from an index, not a path")
        if canonical(m[1]) not in UNLOCKED:
            pins[canonical(m[1])] = f"{m[1]}=={m[2]}"
    return HEADER + "".join(f"{pins[k]}\n" for k in sorted(pins))


def read_lock(text: str) -> dict[str, str]:
    """canonical name -> locked version, from requirements.lock's text (every line must be an exact pin)."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _PIN.match(line.strip())
        if not m or m[3]:
            raise ValueError(f"requirements.lock line {n}: {line!r} is not an exact name==version pin")
        if canonical(m[1]) in out:
            raise ValueError(f"requirements.lock line {n}: {m[1]} is pinned twice")
        out[canonical(m[1])] = m[2]
    return out


def declared(pyproject: str) -> list[str]:
    """Every requirement pyproject.toml declares: the dependencies and each optional group's."""
    import tomllib

    project = tomllib.loads(pyproject)["project"]
    return list(project["dependencies"]) + [d for group in project.get("optional-dependencies", {}).values()
                                            for d in group]


def split_spec(spec: str) -> tuple[str, str]:
    """(canonical name, version specifier) of a requirement such as `pydantic>=2.6,<3`."""
    m = _SPEC.match(spec.split(";")[0].strip())
    if not m:
        raise ValueError(f"cannot read the requirement {spec!r}")
    return canonical(m[1]), m[3].strip()


def floor_of(spec: str) -> str | None:
    """The version after `>=` in a requirement, or None without a floor."""
    m = re.search(r">=\s*([^,\s]+)", spec)
    return m[1] if m else None


def with_floors(pyproject: str, lock: dict[str, str]) -> str:
    """pyproject.toml's text with the floor of every declared requirement set to its locked version."""
    for spec in declared(pyproject):
        name, _ = split_spec(spec)
        if name not in lock:
            raise ValueError(f"{spec!r} is declared in pyproject.toml but not installed: the lock would miss it")
        old = floor_of(spec)
        new = (re.sub(r">=\s*[^,\s]+", f">={lock[name]}", spec) if old is not None
               else re.sub(r"^([A-Za-z0-9._-]+(\[[^\]]*\])?)", rf"\g<1>>={lock[name]}", spec))
        pyproject = pyproject.replace(f'"{spec}"', f'"{new}"', 1)
    return pyproject


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: lock.py FREEZE.txt   (the output of `pip freeze --all --exclude-editable`)", file=sys.stderr)
        return 2
    from mergesearch.fileio import atomic_write

    text = lock_text(Path(argv[0]).read_text())
    lock = read_lock(text)
    atomic_write(LOCK, text)
    atomic_write(PYPROJECT, with_floors(PYPROJECT.read_text(), lock))
    print(f"requirements.lock: {len(lock)} packages; pyproject.toml floors set to the locked versions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
