"""Torch threads of the long-running commands: a fair share of the cores among mergesearch processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from mergesearch import threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    threads.release()
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, procs, share", [(2, 1, 2), (2, 3, 1), (16, 3, 5), (8, 2, 4), (1, 4, 1), (4, 0, 4)])
def test_fair_share(cores, procs, share):
    assert threads.fair_share(cores, procs) == share


def test_registry_counts_live_processes_and_drops_dead_ones(tmp_path):
    reg = tmp_path / "reg"
    assert threads.live_processes(reg) == 0
    reg.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (reg / str(other.pid)).touch()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (reg / str(dead.pid)).touch()
        (reg / "not-a-pid").touch()
        assert threads.live_processes(reg) == 1
        assert not (reg / str(dead.pid)).exists()  # a stale entry is removed
    finally:
        other.kill()
        other.wait()
    assert threads.live_processes(reg) == 0


def test_apply_threads_fixed_and_fair_share(tmp_path, monkeypatch):
    reg = tmp_path / "reg"
    assert threads.apply_threads(1, registry=reg) == 1 and torch.get_num_threads() == 1
    assert not reg.exists()  # a fixed count does not register: it takes no share from the others
    monkeypatch.setattr(threads, "cores", lambda: 6)
    assert threads.apply_threads(None, registry=reg) == 6 and torch.get_num_threads() == 6
    assert (reg / str(__import__("os").getpid())).is_file()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (reg / str(sleeper.pid)).touch()  # a second mergesearch process joins
        monkeypatch.setattr(threads, "RECHECK_S", 0.0)
        assert threads.rebalance() == 3 and torch.get_num_threads() == 3
    finally:
        sleeper.kill()
        sleeper.wait()
    time.sleep(0.01)
    assert threads.rebalance() == 6  # it left: the share grows back
    threads.release()
    assert not any(reg.iterdir())
    with pytest.raises(Exception, match="--threads must be >= 1"):
        threads.apply_threads(0, registry=reg)


def test_a_zoo_build_keeps_its_threads_but_counts_for_the_fair_share(tmp_path, monkeypatch):
    """`occupying`: the build runs at exactly its preset's threads (its weights depend on them) while a
    fair-share process beside it (a study) sees one more process and shrinks; both undone afterwards."""
    import os

    reg = tmp_path / "reg"
    monkeypatch.setattr(threads, "cores", lambda: 4)
    monkeypatch.setattr(threads, "RECHECK_S", 0.0)
    me = reg / str(os.getpid())
    torch.set_num_threads(3)
    with threads.occupying(1, registry=reg):
        assert torch.get_num_threads() == 1 and me.is_file() and threads.live_processes(reg) == 1
    assert torch.get_num_threads() == 3 and not me.exists()
    # a process that already has its fair share (demo building its zoo) keeps its registration
    threads.apply_threads(None, registry=reg)
    with threads.occupying(2, registry=reg):
        assert torch.get_num_threads() == 2
    assert me.is_file() and threads.live_processes(reg) == 1
    threads.release()
    # another process's build: this fair-share process halves while it runs
    threads.apply_threads(None, registry=reg)
    assert torch.get_num_threads() == 4
    code = ("import sys, time; from pathlib import Path; from mergesearch import threads; "
            "ctx = threads.occupying(1, registry=Path(sys.argv[1])); ctx.__enter__(); print('in', flush=True); "
            "time.sleep(60)")
    build = subprocess.Popen([sys.executable, "-c", code, str(reg)], stdout=subprocess.PIPE, text=True)
    try:
        assert build.stdout.readline().strip() == "in"
        assert threads.rebalance() == 2 and torch.get_num_threads() == 2
    finally:
        build.kill()
        build.wait()
    assert threads.rebalance() == 4


def test_rebalance_is_a_noop_with_fixed_threads_or_unset():
    assert threads.rebalance() is None
    threads.apply_threads(2)
    assert threads.rebalance() is None


@pytest.mark.parametrize("command", ["run", "worker", "demo"])
def test_cli_threads_flag_is_applied(command, monkeypatch, tmp_path, capsys):
    """`--threads N` reaches torch before the command's work starts (the work itself is stubbed)."""
    import mergesearch.cli as cli

    seen = {}

    def fake_run_study(cfg, **kw):
        seen["threads"] = torch.get_num_threads()
        raise KeyboardInterrupt  # stop here: the study itself is not what this test checks

    def fake_run_demo(**kw):
        seen["threads"] = torch.get_num_threads()
        raise KeyboardInterrupt

    monkeypatch.setattr("mergesearch.study.run_study", fake_run_study)
    monkeypatch.setattr("mergesearch.demo.run_demo", fake_run_demo)
    monkeypatch.setattr("mergesearch.config.load_config", lambda path, overrides=None: object())
    argv = [command, "--threads", "1"] if command == "demo" else [command, str(tmp_path / "s.yaml"), "--threads", "1"]
    torch.set_num_threads(2)
    assert cli.main(argv) == 130
    assert seen["threads"] == 1
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--threads N" in help_text and "fair share" in help_text
