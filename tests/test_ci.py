"""What CI relies on: required components fail instead of skipping under CI=true, the check that
every required test ran, and the locked install (requirements.lock, whose versions are pyproject's floors)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from required import require

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception),
                                         ("false", pytest.skip.Exception)])
def test_a_missing_required_component_fails_only_under_ci(ci, outcome, monkeypatch):
    monkeypatch.setenv("CI", ci)
    require(True, "chromium", "present")  # nothing happens
    with pytest.raises(outcome, match="chromium: not installed"):
        require(None, "chromium", "not installed")


def test_ci_entry_point_sets_ci_and_checks_required_tests():
    run = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^export CI=true\b", run, re.M)
    assert "check_required.py" in run and "--junitxml" in run
    assert "best effort" not in run.lower() and "will skip" not in run


def _junit(tmp_path: Path, cases: list[tuple[str, str, str]]) -> Path:
    body = ""
    for classname, name, outcome in cases:
        inner = {"passed": "", "skipped": "<skipped message='x'/>", "failure": "<failure message='x'/>"}[outcome]
        body += f"<testcase classname='{classname}' name='{name}'>{inner}</testcase>"
    path = tmp_path / "r.xml"
    path.write_text(f"<testsuites><testsuite name='pytest'>{body}</testsuite></testsuites>")
    return path


def test_check_required_fails_when_a_required_test_skipped(tmp_path):
    sys.path.insert(0, str(REPO / ".ci"))
    try:
        import check_required
    finally:
        sys.path.pop(0)
    required = [(f.removesuffix(".py").replace("/", "."), n, "passed") for f, n in check_required.REQUIRED]
    for f, name in check_required.REQUIRED:  # each names a test that exists
        assert re.search(rf"^def {re.escape(name)}\(", (REPO / f).read_text(), re.M), (f, name)
    script = [sys.executable, str(REPO / ".ci" / "check_required.py")]
    ok = subprocess.run(script + [str(_junit(tmp_path, required + [("tests.test_x", "test_y", "skipped")]))],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"{len(required)} passed" in ok.stdout and "1 skipped" in ok.stdout
    skipped = [(c, n, "skipped" if i == 0 else o) for i, (c, n, o) in enumerate(required)]
    bad = subprocess.run(script + [str(_junit(tmp_path, skipped))], capture_output=True, text=True)
    assert bad.returncode == 1 and "skipped" in bad.stderr and required[0][1] in bad.stderr
    missing = subprocess.run(script + [str(_junit(tmp_path, required[1:]))], capture_output=True, text=True)
    assert missing.returncode == 1 and "not collected" in missing.stderr


def _lock_module():
    sys.path.insert(0, str(REPO / ".ci"))
    try:
        import lock
    finally:
        sys.path.pop(0)
    return lock


def test_every_declared_package_is_locked_and_its_floor_is_the_locked_version():
    """A floor is a version the suite ran on: the one requirements.lock pins (`make lock` raises both)."""
    from packaging.specifiers import SpecifierSet

    lock = _lock_module()
    pins = lock.read_lock((REPO / "requirements.lock").read_text())
    assert "mergesearch" not in pins and "torch" in pins
    for spec in lock.declared((REPO / "pyproject.toml").read_text()):
        name, specifier = lock.split_spec(spec)
        assert name in pins, f"pyproject declares {spec!r} but requirements.lock does not pin it: run `make lock`"
        assert lock.floor_of(spec) == pins[name], (f"pyproject declares {spec!r} but the suite runs on {name} "
                                                   f"{pins[name]} (requirements.lock): run `make lock`")
        assert pins[name] in SpecifierSet(specifier), (spec, pins[name])


def test_the_lock_is_exactly_what_the_declared_packages_need():
    """Every package the declared ones need, transitively with the extras they ask for (as this environment's
    metadata says), is pinned, and nothing else is: `make install` then installs the whole lock."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    lock = _lock_module()
    pins = lock.read_lock((REPO / "requirements.lock").read_text())
    todo = [Requirement(spec) for spec in lock.declared((REPO / "pyproject.toml").read_text())]
    seen: set[str] = set()
    done: set[tuple[str, str]] = set()
    while todo:
        req = todo.pop()
        name = lock.canonical(req.name)
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in done:
                continue
            done.add((name, extra))
            seen.add(name)
            try:
                requires = distribution(req.name).requires or []
            except PackageNotFoundError:
                continue  # the next test reports packages that are not installed
            for sub in map(Requirement, requires):
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):  # an extra only when asked for
                    todo.append(sub)
    assert not sorted(seen - set(pins)), (f"requirements.lock misses {sorted(seen - set(pins))}, needed by the "
                                          "declared packages: run `make lock`")
    assert not sorted(set(pins) - seen), (
        f"requirements.lock pins {sorted(set(pins) - seen)}, which no declared package needs: run `make lock`")
    assert len(seen) > 40  # the walk went through the dependency tree, not just the declared names


def test_the_suite_runs_on_the_locked_versions():
    """What makes the floors honest: the environment under test is the lock (make install). A laptop's own
    environment may differ (skipped, said so); CI's may not."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from packaging.version import Version

    lock = _lock_module()
    pins = lock.read_lock((REPO / "requirements.lock").read_text())
    off = []
    for name, pinned in sorted(pins.items()):
        try:
            have = installed(name)
        except PackageNotFoundError:
            off.append(f"{name} (not installed, locked {pinned})")
            continue
        if Version(have).public != Version(pinned).public:  # torch 2.13.0+cpu is the locked 2.13.0
            off.append(f"{name} {have} (locked {pinned})")
    require(not off, "the locked install", f"this environment is not requirements.lock ({', '.join(off[:5])}"
            f"{' ...' if len(off) > 5 else ''}): `make install`")


def test_make_installs_exactly_the_lock_and_make_lock_runs_the_suite_on_the_new_one():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^LOCK \?= requirements\.lock$", make, re.M)
    recipe = re.search(r"^\$\(VENV\)/\.installed: (.*)\n((?:\t.*\n)+)", make, re.M)
    assert recipe and "$(LOCK)" in recipe[1]  # a new lock reinstalls
    installs = [line for line in recipe[2].splitlines() if "pip install" in line]
    assert len(installs) == 2 and all("-c $(LOCK)" in line for line in installs), installs
    assert "torch" in installs[0] and "-e '.[dev]'" in installs[1]  # the CPU torch first, as before
    assert "$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))" in installs[0]  # a CPU index, where asked for
    lock_recipe = re.search(r"^lock:\n((?:\t.*\n)+)", make, re.M)[1]
    assert "pip freeze --all --exclude-editable" in lock_recipe and ".ci/lock.py" in lock_recipe
    assert lock_recipe.rstrip().splitlines()[-1].strip() == "$(MAKE) test VENV=$(LOCK_VENV)"


def test_lock_file_from_pip_freeze(tmp_path):
    lock = _lock_module()
    text = lock.lock_text("torch==2.13.0+cpu\nOptuna==5.1.0\n# comment\nmergesearch==0.1\npip==26.0\nlm_eval==0.4.13\n")
    assert text.startswith("#") and text.endswith("Optuna==5.1.0\ntorch==2.13.0\n")
    assert lock.read_lock(text) == {"lm-eval": "0.4.13", "optuna": "5.1.0", "torch": "2.13.0"}
    with pytest.raises(ValueError, match="not name==version"):
        lock.lock_text("foo @ file:///tmp/foo.whl\n")
    with pytest.raises(ValueError, match="pinned twice"):
        lock.read_lock("a==1\nA==2\n")
    with pytest.raises(ValueError, match="not an exact"):
        lock.read_lock("a>=1\n")
    pyproject = ('[project]\ndependencies = [\n    "torch>=2.12",\n    "pydantic>=2.6,<3",\n    "tqdm",\n]\n'
                 '[project.optional-dependencies]\ndev = ["lm_eval[x]>=0.4"]\n')
    out = lock.with_floors(pyproject, {"torch": "2.13.0", "pydantic": "2.14.4", "tqdm": "4.70.1", "lm-eval": "0.4.13"})
    assert lock.declared(out) == ["torch>=2.13.0", "pydantic>=2.14.4,<3", "tqdm>=4.70.1", "lm_eval[x]>=0.4.13"]
    with pytest.raises(ValueError, match="not installed"):
        lock.with_floors(pyproject, {"torch": "2.13.0"})


def _bench_gpu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_gpu_bench_says_it_needs_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench_gpu.py measures instead of refusing")
    res = _bench_gpu()
    assert res.returncode == 77 and "needs a CUDA device" in res.stderr, res.stderr


@pytest.mark.slow
def test_gpu_bench_script_runs_end_to_end_on_the_cpu(tmp_path):
    """The GPU check must not break on its first GPU run: its merge and evaluator parts run on the CPU
    (tiny model; the targets are for a GPU, so MISS lines are expected here). Each row of the merge table
    times its own method, though methods share a materialiser (its plan was once the materialiser's:
    task arithmetic timed as linear), and no compiled formula fell back to the eager kernel."""
    res = _bench_gpu("--device", "cpu", "--size", "tiny", "--skip-tests", "--examples", "32", "--repeat", "2",
                     "--json", str(tmp_path / "gpu.json"))
    assert res.returncode in (0, 1), res.stderr[-3000:]
    out = res.stdout
    assert "2. merge" in out and "task_arithmetic (streaming)" in out and "dare_ties" in out
    assert "3. evaluator: 32 exact-match prompts" in out and "same decision on 32/32" in out
    assert "one-pass decisions equal to generation's (every example generated)" in out
    got = json.loads((tmp_path / "gpu.json").read_text())
    rows = got["merge"]
    assert {r["method"] for r in rows} >= {"task_arithmetic", "dare_ties", "breadcrumbs_ties", "della_linear"}
    assert all(r["ran"] == r["method"].split(" ")[0] for r in rows), [(r["method"], r["ran"]) for r in rows]
    assert got["compile_failures"] == [] and "fell back to the eager kernel: 0 (target: none)" in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generate_bench_runs_end_to_end_on_the_cpu(dtype):
    """bench_generate's GPU run must not break on a script error: both of its parts, and in bf16 the check
    against a float32 copy of the weights, run on the CPU with a tiny model (its speed targets are CUDA's)."""
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generate.py"), "--device", "cpu",
                          "--dtype", dtype, "--gen-rows", "6", "--gen-tokens", "8", "--short-prompts", "8",
                          "--repeats", "1", "--batch-size", "4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode in (0, 1), res.stderr[-3000:]
    out = res.stdout
    assert "rows identical to HF generate:" in out and "decided_by: one-pass" in out
    if dtype == "bfloat16":
        assert "against HF generate in float32 (same weights)" in out and "HF generate against itself" in out
    else:
        assert "rows identical to HF generate (target >= 95%)" in out
