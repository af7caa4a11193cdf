"""Devices: which device a study runs on, refused in one line when the machine lacks it; what it needs."""

from __future__ import annotations

import pytest
import torch

from mergesearch.checkpoints import resolve_device
from mergesearch.errors import CheckpointError


def test_a_device_index_the_machine_lacks_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(CheckpointError, match=r"'cuda:2' requested but this machine has 2 CUDA device\(s\): "
                                              r"use cuda:0 to cuda:1$"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CheckpointError, match="no CUDA device is available"):
        resolve_device("cuda:0")
    with pytest.raises(CheckpointError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.parametrize("command", ["run", "worker"])
def test_run_and_worker_refuse_a_gpu_index_the_machine_lacks_before_any_work(command, zoo_test, tmp_path, capsys,
                                                                             monkeypatch):
    from study_helpers import write_study

    from mergesearch.cli import main

    path = write_study(zoo_test, tmp_path, n_trials=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([command, str(path), "--device", "cuda:3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'cuda:3' requested but this machine has 1 CUDA device(s): use cuda:0" in err
    assert not (tmp_path / "t.db").exists()  # nothing was created


def test_the_device_override_reaches_the_trials(zoo_test, tmp_path, capsys):
    from study_helpers import write_study

    from mergesearch.cli import main
    from mergesearch.study import load_study, records

    path = write_study(zoo_test, tmp_path, n_trials=1, top_k_test=0)
    assert main(["run", str(path), "--device", "cpu", "--no-progress"]) == 0
    study = load_study(path)
    assert [records.record(t)["device"] for t in records.search_trials(study)] == ["cpu"]
