"""Security: nothing from a checkpoint, a study file or a recipe can run code; the dashboard stays on
loopback unless told otherwise; an export writes only inside its target folder.

The package scan walks the AST of every module (comments and error messages do not count, calls do)
and a text grep catches `trust_remote_code=True` anywhere in the package, YAML and JSON included.
"""

from __future__ import annotations

import ast
import inspect
import json
import pickle
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergesearch
from mergesearch.cli import build_parser, main
from mergesearch.config import load_config
from mergesearch.study import records
from mergesearch.study import run_study

from conftest import make_tiny_model
from study_helpers import zoo_study_dict

PACKAGE = Path(mergesearch.__file__).resolve().parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _safe_loader_classes(tree: ast.AST) -> set[str]:
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
            and any(_dotted(b).endswith(("SafeLoader", "CSafeLoader")) for b in n.bases)}


def unsafe_calls(source: str, where: str = "<src>") -> list[str]:
    """Every way to run code from data found in `source`: pickle, torch.load without weights_only=True,
    unsafe YAML loading, numpy allow_pickle, trust_remote_code, eval/exec."""
    tree = ast.parse(source)
    safe_loaders = _safe_loader_classes(tree)
    found = []
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{line}: from {node.module} import ...")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        if name in ("eval", "exec") or name.endswith(("read_pickle", ".unsafe_load", ".full_load")):
            found.append(f"{line}: {name}(...)")
        if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
            if const.get("weights_only") is not True:
                found.append(f"{line}: {name}(...) without weights_only=True")
        if name in ("yaml.load", "yaml.load_all"):
            loader = _dotted(kw["Loader"]) if "Loader" in kw else (_dotted(node.args[1]) if len(node.args) > 1 else "")
            if not (loader.endswith(("SafeLoader", "CSafeLoader")) or loader in safe_loaders):
                found.append(f"{line}: {name}(...) with Loader={loader or 'default'}")
        if name.endswith(("np.load", "numpy.load")) and const.get("allow_pickle") is not False and "allow_pickle" in kw:
            found.append(f"{line}: {name}(..., allow_pickle=...)")
        if "trust_remote_code" in kw and const.get("trust_remote_code") is not False:
            found.append(f"{line}: {name}(..., trust_remote_code=<not False>)")
    return found


def test_the_scanner_finds_each_unsafe_pattern():
    bad = """
import pickle
from dill import loads
import torch, yaml, numpy as np
torch.load("x.bin")
torch.load("x.bin", weights_only=False)
yaml.load(open("a.yaml"))
yaml.load(text, Loader=yaml.FullLoader)
yaml.unsafe_load(text)
np.load("a.npy", allow_pickle=True)
AutoModel.from_pretrained(p, trust_remote_code=True)
AutoConfig.from_pretrained(p, trust_remote_code=flag)
eval("1+1")
"""
    flagged = sorted(int(f.split(":")[1]) for f in unsafe_calls(bad))
    assert flagged == [n for n in range(2, 14) if n != 4], unsafe_calls(bad)  # every line but the plain import
    good = """
import torch, yaml
class L(yaml.SafeLoader):
    pass
torch.load("x.pt", weights_only=True)
yaml.safe_load(text); yaml.load(text, Loader=yaml.SafeLoader); yaml.load(text, Loader=L)
AutoModel.from_pretrained(p, trust_remote_code=False)
model.eval()
"""
    assert unsafe_calls(good) == []


def test_package_never_loads_pickle_or_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [f for p in files for f in unsafe_calls(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert found == []
    for p in PACKAGE.rglob("*"):
        if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".json", ".html", ".cfg", ".toml"):
            text = p.read_text(errors="replace")
            assert "trust_remote_code=True" not in text and "trust_remote_code: true" not in text.lower(), p


# --- checkpoints and files that would run code ---------------------------------------------------------


class _Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle ran\n"))


def test_a_malicious_pickle_checkpoint_is_never_loaded(zoo_test, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil-expert"
    evil.mkdir()
    (evil / "config.json").write_text((zoo_test / "base" / "config.json").read_text())
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    for argv in (["inspect", str(zoo_test / "base"), str(evil)],
                 ["eval", str(evil), "--task", str(next((zoo_test / "data").glob("*.calib.jsonl")))]):
        assert main(argv) == 2
        assert "pickle" in capsys.readouterr().err
    d = zoo_study_dict(zoo_test, tmp_path, name="evil", n_trials=1, baselines=False, top_k_test=0, limit=4)
    d["models"]["experts"][next(iter(d["models"]["experts"]))] = str(evil)
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(d))
    assert main(["run", str(tmp_path / "evil.yaml"), "--no-progress"]) == 2
    assert "only pickle weights" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "evil.db").exists()


def test_remote_code_in_a_checkpoint_is_never_imported(tmp_path, capsys):
    """A folder whose config points at its own modelling code (auto_map) must not run that code."""
    marker = tmp_path / "PWNED"
    base = make_tiny_model(tmp_path / "base", "llama")
    evil = make_tiny_model(tmp_path / "evil", "llama", seed=1, base=base)
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilForCausalLM"})
    (evil / "config.json").write_text(json.dumps(cfg))
    (evil / "evil_code.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    recipe = {"method": "linear", "base_model": str(evil), "models": [{"model": str(evil), "parameters": {"weight": 1}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()  # the models' save progress bars
    rc = main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert main(["eval", str(evil), "--task", str(_jsonl(tmp_path))]) == 2
    capsys.readouterr()
    assert not marker.exists() and not (tmp_path / "out").exists()


def _jsonl(tmp: Path) -> Path:
    p = tmp / "t.jsonl"
    p.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    return p


@pytest.mark.parametrize("where", ["study", "space", "recipe"])
def test_yaml_tags_that_would_run_code_are_refused(where, zoo_test, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    payload = f"!!python/object/apply:os.system [\"touch {marker}\"]"
    monkeypatch.chdir(tmp_path)
    if where == "recipe":
        (tmp_path / "r.yaml").write_text(f"method: linear\nbase_model: {payload}\nmodels: []\n")
        argv = ["merge", "r.yaml", "--out", "out"]
    else:
        d = zoo_study_dict(zoo_test, tmp_path, name="y", n_trials=1, baselines=False, top_k_test=0, limit=4)
        if where == "space":
            d["space"] = "evil_space.yaml"
            (tmp_path / "evil_space.yaml").write_text(f"granularity: {payload}\n")
        text = yaml.safe_dump(d)
        if where == "study":
            text = text.replace("seed: 0", f"seed: {payload}", 1)
        (tmp_path / "y.yaml").write_text(text)
        argv = ["validate", "y.yaml"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "YAML" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


# --- dashboard ------------------------------------------------------------------------------------------


def test_dashboard_binds_to_loopback_unless_told_otherwise(tmp_path, caplog):
    from mergesearch.report import make_dashboard_server
    from mergesearch.study.storage import open_storage

    args = build_parser().parse_args(["dashboard", "x.db"])
    assert args.host == "127.0.0.1"
    assert inspect.signature(make_dashboard_server).parameters["host"].default == "127.0.0.1"
    db = tmp_path / "d.db"
    optuna.create_study(study_name="d", storage=open_storage(f"sqlite:///{db}", heartbeat=False))
    server, url = make_dashboard_server(db, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1" and url.startswith("http://127.0.0.1:")
    finally:
        server.server_close()
    with caplog.at_level("WARNING"):
        server, _ = make_dashboard_server(db, host="0.0.0.0", port=0)
        server.server_close()
    assert "without authentication" in caplog.text or "no authentication" in caplog.text


# --- export stays inside its folder ---------------------------------------------------------------------


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_export_writes_only_inside_its_target(zoo_test, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    # chunks: auto, so that the layers have different chunk counts and the recipe needs the per-layer form
    space = {"granularity": "per_layer", "chunks": "auto", "chunk_budget": 5, "max_chunks": 3,
             "parameters": {"lambda": {"fixed": 1.0}}}
    d = zoo_study_dict(zoo_test, work, name="ex", n_trials=2, baselines=False, top_k_test=0, limit=4, space=space)
    (work / "ex.yaml").write_text(yaml.safe_dump(d))
    study = run_study(load_config(work / "ex.yaml"), progress=False)
    assert len(set(records.meta(study)["space"]["layer_chunks"])) > 1
    monkeypatch.chdir(work)
    before, zoo_before = _files(tmp_path), _files(zoo_test)
    out = tmp_path / "exports" / "merged"
    assert main(["export", str(work / "ex.yaml"), "--out", str(out)]) == 0
    capsys.readouterr()
    added = _files(tmp_path) - before
    assert added and all(a == "exports" or a.startswith(("exports/merged",)) for a in added), added
    assert _files(zoo_test) == zoo_before
    for p in out.rglob("*"):
        assert not p.is_symlink() and p.resolve().is_relative_to(out.resolve()), p
    assert {"config.json", "model.safetensors", "recipe.yaml", "provenance.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    # The exported recipe reproduces the exported weights through `mergesearch merge`.
    assert main(["merge", str(out / "recipe.yaml"), "--out", str(tmp_path / "again"), "--device", "cpu"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["../escape", "../../../tmp/escape", "a/b", "evil\\name", "/abs"])
def test_a_study_name_cannot_place_its_database_elsewhere(name, zoo_test, tmp_path, capsys):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    d = zoo_study_dict(zoo_test, work, name="x", n_trials=1, baselines=False, top_k_test=0, limit=4)
    d["study"]["name"] = name
    d["study"].pop("storage")  # the default storage path is built from the name
    (work / "s.yaml").write_text(yaml.safe_dump(d))
    before = _files(tmp_path)
    assert main(["run", str(work / "s.yaml"), "--no-progress"]) == 2
    assert "study.name" in capsys.readouterr().err
    assert _files(tmp_path) == before
