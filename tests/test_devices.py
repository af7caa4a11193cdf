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
