"""The `diptych` entry point: every listed command loads and answers --help; no dead commands."""

from __future__ import annotations

import pytest

from diptych.cli import COMMANDS, _load, main
from diptych.core.config import ConfigError


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_listed_command_is_implemented(name, capsys):
    mod = _load(name)
    assert mod is not None, f"`diptych {name}` is listed but its module {COMMANDS[name][0]} is missing"
    assert callable(mod.add_arguments) and callable(mod.run)
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert name in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_backend_argument_choices_come_from_the_registry(monkeypatch):
    import argparse

    from diptych.cli import add_backend_argument
    from diptych.core import backend as registry

    monkeypatch.setitem(registry._REGISTRY, "mlx", registry._Entry("no.such.module", "MlxBackend", ("mlx",), "mlx"))
    parser = argparse.ArgumentParser()
    add_backend_argument(parser)
    assert parser.parse_args(["--backend", "mlx"]).backend == "mlx"
    assert parser.parse_args([]).backend is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "tensorflow"])


@pytest.mark.parametrize("error, code, shown", [
    (ValueError("model.path: bad file\nsecond line"), 2, "diptych env: ValueError: model.path: bad file"),
    (ConfigError("grpo.x: wrong"), 2, "diptych env: grpo.x: wrong"),
    (FileNotFoundError("no such file x.jsonl"), 2, "diptych env: FileNotFoundError: no such file x.jsonl"),
    (RuntimeError("kernel exploded"), 1, "diptych env: RuntimeError: kernel exploded"),
])
def test_an_uncaught_error_is_one_line_plus_the_debug_hint(monkeypatch, capsys, error, code, shown):
    """A command's unexpected failure: its first line and the --debug hint (2 for bad input, 1 otherwise);
    with --debug the traceback instead."""
    mod = _load("env")

    def boom(args):
        raise error

    monkeypatch.setattr(mod, "run", boom)
    assert main(["env"]) == code
    err = capsys.readouterr().err
    assert err.splitlines() == [shown, "(rerun with --debug for the traceback)"]
    with pytest.raises(type(error)):
        main(["--debug", "env"])
