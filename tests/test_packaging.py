"""The installed package: a wheel built from the source tree, installed into a fresh virtual
environment, validates a study copied outside the repository (shipped search spaces are package data)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_validates_a_copied_example_study(tiny_family, tmp_path):
    # The source tree as a fresh clone has it (no build/ left-overs), built offline with this setuptools.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mergesearch", src / "mergesearch", ignore=shutil.ignore_patterns("__pycache__", ".*.tmp-*"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
          src], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("mergesearch-*.whl"))

    # A fresh venv with the wheel; the dependencies come from this environment through a .pth entry
    # (which adds the folder but runs none of its .pth files, so the editable install stays out).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
                .stdout.strip())
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zz_deps.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
         cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    where = _run([py, "-c", "import mergesearch; print(mergesearch.__file__)"], cwd=tmp_path, env=env).stdout
    assert Path(where.strip()).is_relative_to(venv), where
    # The shipped zoos are package data: every file of each is in the wheel, and the demo zoo loads (checked
    # by sha256) from the installed package.
    from mergesearch.zoo import SHIPPED_DIR, load_manifest

    names = set(zipfile.ZipFile(wheel).namelist())
    for zoo in sorted(p for p in SHIPPED_DIR.iterdir() if not p.name.startswith(".")):
        for rel in [*load_manifest(zoo)["files"], "zoo.json"]:
            assert f"mergesearch/zoo/shipped/{zoo.name}/{rel}" in names, (zoo.name, rel)
    demo = _run([py, "-c", "from mergesearch.zoo import shipped_zoo; print(shipped_zoo('demo'))"], cwd=tmp_path,
                env=env).stdout.strip()
    assert Path(demo).is_relative_to(venv) and Path(demo).name == "demo-s0", demo

    # The README's `cp studies/example_...yaml my.yaml` into a folder outside the repository, with
    # its model paths pointed at tiny models and its data files written where it expects them.
    work = tmp_path / "elsewhere"
    (work / "data").mkdir(parents=True)
    base, experts = tiny_family("qwen2", 2)
    raw = yaml.safe_load((REPO / "studies" / "example_qwen2.5_math_coder.yaml").read_text())
    assert raw["space"] == "per_layer_ties.yaml"
    raw["models"]["base"] = str(base)
    raw["models"]["experts"] = {"math": str(experts[0]), "coder": str(experts[1])}
    for task in raw["objectives"]["tasks"]:
        for split in ("calib", "test"):
            rows = [{"prompt": f"Q: {split} {i}\nA:", "answer": f" {i}"} for i in range(8)]
            (work / task[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = work / "my.yaml"
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert not (work / "search_spaces").exists() and not (work.parent / "search_spaces").exists()

    res = _run([venv / "bin" / "mergesearch", "validate", study, "--json"], cwd=work, env=env)
    summary = json.loads(res.stdout)
    assert summary["method"] == "ties" and summary["space"]["granularity"] == "per_layer"
    assert summary["n_params"] == 2 * 2 * (2 + 1)  # weight and density x 2 experts x (2 layers + io)
