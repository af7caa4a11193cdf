"""Bad input, end to end through the CLI: exit code 2, one line saying what is wrong, nothing written.

Every case snapshots the files it could touch (the study folder, the working directory, the bad
model folders and the zoo) with their sizes and mtimes, runs the command, and compares: a refused
command leaves no .db, no half-written folder and no changed file behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergesearch.cli import main
from mergesearch.config import load_config
from mergesearch.study import run_study

from conftest import make_tiny_model
from study_helpers import zoo_study_dict

REPO = Path(__file__).resolve().parent.parent


def _db_content(path: Path) -> str:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()
    finally:
        con.close()


def _snapshot(*roots: Path) -> dict:
    """Path -> (is dir, size, mtime) of everything under `roots`; an SQLite database by its content, since
    reading a WAL database may fold its -wal file into the main file (same data, new bytes)."""
    out = {}
    for root in roots:
        out[str(root)] = root.exists()
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.name.endswith(("-wal", "-shm")):
                    continue
                st = p.lstat()
                out[str(p)] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns if p.is_file() else 0)
                if p.suffix == ".db" and p.read_bytes()[:16] == b"SQLite format 3\x00":
                    out[str(p)] = ("sqlite", _db_content(p))
    return out


def _copy_expert(zoo: Path, dest: Path, edit) -> Path:
    src = zoo / "expert-reverse"
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def bad_models(zoo_test, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-models")
    out = {"gpt2": make_tiny_model(root / "gpt2", "gpt2")}

    def shape(t):  # one MLP matrix with a different inner size
        t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 96)

    def vocab(t):  # four added tokens
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            t[k] = torch.cat([t[k], torch.zeros(4, t[k].shape[1])])

    out["shape"] = _copy_expert(zoo_test, root / "shape", shape)
    out["vocab"] = _copy_expert(zoo_test, root / "vocab", vocab)
    pk = root / "pickle-only"
    pk.mkdir()
    shutil.copy(zoo_test / "expert-reverse" / "config.json", pk / "config.json")
    (pk / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a torch.save zip archive would be here")
    out["pickle"] = pk
    return out


def _first_expert(d: dict, path) -> None:
    name = next(iter(d["models"]["experts"]))
    d["models"]["experts"][name] = str(path)


def _set(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
    d[last] = value


def _empty_calib(d: dict, tmp: Path) -> None:
    (tmp / "empty.jsonl").write_text("")
    d["objectives"]["tasks"][0]["calib"] = str(tmp / "empty.jsonl")


# case -> (edit of the study dict (d, tmp, models) or the raw YAML text, expected words in the message)
CASES = {
    "missing model folder": (lambda d, t, m: _set(d, "models.base", str(t / "no-such-model")),
                             "model folder not found"),
    "architecture mismatch": (lambda d, t, m: _first_expert(d, m["gpt2"]), "architecture GPT2LMHeadModel"),
    "shape mismatch": (lambda d, t, m: _first_expert(d, m["shape"]), "shape [64, 96] != base [64, 128]"),
    "vocabulary mismatch": (lambda d, t, m: _first_expert(d, m["vocab"]), "merge_common_vocab"),
    "pickle-only checkpoint": (lambda d, t, m: _first_expert(d, m["pickle"]), "only pickle weights"),
    "malformed YAML": ("models: {base: [unclosed\nstudy: {n_trials: 2}\n", "malformed YAML"),
    "not a mapping": ("- just\n- a list\n", "must be a mapping"),
    "unknown key": (lambda d, t, m: _set(d, "study.n_trails", 3), "did you mean 'n_trials'"),
    "unknown top-level key": (lambda d, t, m: d.update(objective=d["objectives"]), "did you mean 'objectives'"),
    "unknown method": (lambda d, t, m: _set(d, "merge.method", "tiez"), "did you mean 'ties'"),
    "unknown sampler": (lambda d, t, m: _set(d, "study.sampler", "tpee"), "study.sampler"),
    "unknown pruner": (lambda d, t, m: _set(d, "study.pruner", "meridian"), "study.pruner"),
    "unknown device": (lambda d, t, m: _set(d, "merge.device", "tpu"), "merge.device"),
    "fixed parameter out of range": (lambda d, t, m: (_set(d, "merge.method", "ties"),
                                                      _set(d, "space.parameters", {"density": {"fixed": 1.5}})),
                                     "outside its allowed range"),
    "searched range out of range": (lambda d, t, m: _set(d, "space.parameters", {"weight": {"low": -9, "high": 1}}),
                                    "leaves its allowed range"),
    "unknown method parameter": (lambda d, t, m: _set(d, "space.parameters", {"densty": {"fixed": 0.5}}),
                                 "densty"),
    "low above high": (lambda d, t, m: _set(d, "space.parameters", {"weight": {"low": 0.9, "high": 0.1}}),
                       "low 0.9 > high 0.1"),
    "zero trials": (lambda d, t, m: _set(d, "study.n_trials", 0), "study.n_trials"),
    "zero chunks": (lambda d, t, m: _set(d, "space.chunks", 0), "chunks must be >= 1"),
    "empty calibration set": (lambda d, t, m: _empty_calib(d, t), "empty"),
    "missing calibration file": (lambda d, t, m: _set(d["objectives"]["tasks"][0], "calib", str(t / "nope.jsonl")),
                                 "nope.jsonl"),
    "same split for calib and test": (
        lambda d, t, m: _set(d["objectives"]["tasks"][0], "test", d["objectives"]["tasks"][0]["calib"]),
        "same file for calib and test"),
    "extract regex that does not compile": (
        lambda d, t, m: _set(d["objectives"]["tasks"][0], "extract", "The answer is (\\S+"), "does not compile"),
    "until not a list": (lambda d, t, m: _set(d["objectives"]["tasks"][0], "until", "\n"),
                         "until"),
    "one-objective sampler on many objectives": (
        lambda d, t, m: (_set(d, "objectives.mode", "per_task"), _set(d, "study.sampler", "cmaes")),
        "handles one objective"),
}


def _write_case(case: str, zoo: Path, tmp: Path, models: dict) -> Path:
    edit, _ = CASES[case]
    path = tmp / "bad.yaml"
    if isinstance(edit, str):
        path.write_text(edit)
        return path
    d = zoo_study_dict(zoo, tmp, name="bad", n_trials=2, baselines=False, top_k_test=0, limit=4)
    edit(d, tmp, models)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _one_line_error(err: str, expected: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def _refused(argv: list[str], expected: str, capsys, *watched: Path) -> str:
    before = _snapshot(*watched)
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.err + captured.out
    line = _one_line_error(captured.err, expected)
    assert _snapshot(*watched) == before, f"{argv[0]} wrote or changed files although it refused: {line}"
    return line


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_study_refused_with_one_line_and_nothing_written(case, command, zoo_test, bad_models, tmp_path,
                                                            monkeypatch, capsys):
    path = _write_case(case, zoo_test, tmp_path, bad_models)
    monkeypatch.chdir(tmp_path)
    argv = [command, str(path)] + (["--no-progress"] if command == "run" else [])
    _refused(argv, CASES[case][1], capsys, tmp_path, bad_models["gpt2"].parent, zoo_test)
    assert not list(tmp_path.rglob("*.db")) and not list(tmp_path.rglob("*.db-*"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _storage_cases(tmp: Path) -> dict[str, tuple[str, str]]:
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "notes.db").write_text("these are my notes, not a database\n")
    return {
        "unknown scheme": ("redis://127.0.0.1/0", "is not understood"),
        "server not listening": (f"postgresql://nobody@127.0.0.1:{_closed_port()}/x", "cannot be opened"),
        "folder is a file": (f"sqlite:///{tmp / 'a-file' / 'study.db'}", "cannot create the folder"),
        "not an SQLite file": (f"sqlite:///{tmp / 'notes.db'}", "cannot be opened as SQLite"),
    }


def test_storage_that_cannot_be_opened(zoo_test, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cases = _storage_cases(tmp_path)
    for i, (what, (url, expected)) in enumerate(cases.items()):
        d = zoo_study_dict(zoo_test, tmp_path, name=f"s{i}", storage=url, n_trials=1, baselines=False,
                           top_k_test=0, limit=4)
        path = tmp_path / f"s{i}.yaml"
        path.write_text(yaml.safe_dump(d))
        for cmd in (["run", str(path), "--no-progress"], ["worker", str(path), "--no-progress"],
                    ["status", url], ["export", url, "--out", str(tmp_path / "out")]):
            line = _refused(cmd, "", capsys, tmp_path)
            # Only `run` creates a storage; the others, given a path where none can be, say there is none.
            want = "no study storage" if what == "folder is a file" and cmd[0] != "run" else expected
            assert want in line, (what, cmd[0], line)
        assert (tmp_path / "notes.db").read_text().startswith("these are my notes")
    assert not (tmp_path / "out").exists()


def test_worker_without_a_study_creates_no_database(zoo_test, tmp_path, monkeypatch, capsys):
    d = zoo_study_dict(zoo_test, tmp_path, name="nobody", n_trials=1, baselines=False, top_k_test=0, limit=4)
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(d))
    monkeypatch.chdir(tmp_path)
    _refused(["worker", str(path), "--no-progress"], "start the study with `mergesearch run`", capsys, tmp_path)
    _refused(["status", str(path)], "no study storage", capsys, tmp_path)
    _refused(["status", str(tmp_path / "missing.db")], "neither a study YAML", capsys, tmp_path)


def test_export_refuses_an_existing_target_and_changes_nothing(zoo_test, tmp_path, monkeypatch, capsys):
    d = zoo_study_dict(zoo_test, tmp_path, name="ex", n_trials=1, baselines=False, top_k_test=0, limit=4)
    path = tmp_path / "ex.yaml"
    path.write_text(yaml.safe_dump(d))
    run_study(load_config(path), progress=False)
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    _refused(["export", str(path), "--out", str(target)], "already exists", capsys, tmp_path)
    _refused(["export", str(path), "--trial", "7", "--out", str(tmp_path / "new")], "no trial 7", capsys, tmp_path)
    _refused(["export", str(path), "--trial", "first", "--out", str(tmp_path / "new")], "'best', a trial number or a baseline name",
             capsys, tmp_path)
    assert (target / "keep.txt").read_text() == "mine\n" and sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    # With --force the target is replaced, atomically (no temporary sibling left behind).
    assert main(["export", str(path), "--out", str(target), "--force"]) == 0
    capsys.readouterr()
    assert (target / "recipe.yaml").is_file() and not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_bad_recipe_for_merge(zoo_test, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    manifest = json.loads((zoo_test / "zoo.json").read_text())
    good = {"method": "ties", "base_model": str(zoo_test / manifest["base"]),
            "models": [{"model": str(zoo_test / p), "parameters": {"weight": 0.5, "density": 0.5}}
                       for p in manifest["experts"].values()]}
    bad = {
        "unknown method": ({**good, "method": "tiez"}, "did you mean 'ties'"),
        "unknown key": ({**good, "dtyp": "float32"}, "did you mean 'dtype'"),
        "missing model": ({**good, "base_model": str(tmp_path / "gone")}, "model folder not found"),
        "out of range": ({**good, "models": [{**m, "parameters": {"weight": 0.5, "density": 7}}
                                             for m in good["models"]]}, "density"),
    }
    for what, (recipe, expected) in bad.items():
        p = tmp_path / "recipe.yaml"
        p.write_text(yaml.safe_dump(recipe))
        _refused(["merge", str(p), "--out", str(tmp_path / "out")], expected, capsys, tmp_path, zoo_test)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing model folder", "malformed YAML", "unknown key", "pickle-only checkpoint"])
def test_real_process_exit_code_and_single_line(case, zoo_test, bad_models, tmp_path):
    """The same through a real `python -m mergesearch run` process: stderr holds the one error line only."""
    path = _write_case(case, zoo_test, tmp_path, bad_models)
    before = _snapshot(tmp_path)
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "mergesearch", "run", str(path), "--no-progress"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    _one_line_error(res.stderr, CASES[case][1])
    assert res.stdout == ""
    assert _snapshot(tmp_path) == before
