import pytest

from mergesearch import __version__
from mergesearch.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    import argparse

    from mergesearch.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) > 5 and all(name in out for name in sub.choices)


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage" in capsys.readouterr().out


def test_merge_help_lists_the_registered_methods(capsys):
    from mergesearch import operators

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in operators.names())


def test_eval_batch_size_default_is_the_configs():
    from mergesearch.cli import build_parser
    from mergesearch.config import DEFAULT_BATCH_SIZE, FitConfig, ObjectivesConfig

    args = build_parser().parse_args(["eval", "m", "--task", "t.jsonl"])
    objectives = ObjectivesConfig(tasks=[{"name": "t", "calib": "t.jsonl"}])
    assert args.batch_size == DEFAULT_BATCH_SIZE == objectives.batch_size == FitConfig().batch_size
