"""Every command reports an expected error the same way (one line, exit status 1) and is a
plain module-level function; a bug still surfaces as a traceback."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import typer
from typer.testing import CliRunner

import capfilt.commands
from capfilt.cli import app
from capfilt.commands._shared import config_from, handled

runner = CliRunner()


def _argv(command: str, tmp_path) -> list[str]:
    d = str(tmp_path)
    return {
        "run": ["run", "--out", f"{d}/out", "--input", d],
        "pretrain": ["pretrain", "--data", d, "--out", f"{d}/out"],
        "finetune": ["finetune", "--role", "filter", "--data", d, "--out", f"{d}/out", "--init", d],
        "bootstrap": ["bootstrap", "--workdir", f"{d}/work", "--human", d, "--web", d],
        "demo": ["demo", "--workdir", f"{d}/demo"],
        "demo-data": ["demo-data", f"{d}/world"],
        "download": ["download", f"{d}/urls.txt", f"{d}/out"],
        "eval": ["eval", "--data", d],
        "dedup": ["dedup", "--input", d, "--out", f"{d}/out", "--filter", d],
        "export": ["export", f"{d}/out", "--to", f"{d}/export"],
        "audit": ["audit", "--filter", d, "--human", d, "--out", f"{d}/out"],
        "select": ["select", f"{d}/run", "--to", f"{d}/out"],
    }[command]


CONFIGURED = ["run", "pretrain", "finetune", "bootstrap", "demo", "demo-data", "download", "eval", "dedup", "export",
              "audit", "select"]


@pytest.mark.parametrize("command", CONFIGURED)
def test_a_bad_config_key_is_one_line_and_exit_status_1(tmp_path, command):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    result = runner.invoke(app, [*_argv(command, tmp_path), "--set", "run.filter.treshold=0.3"])
    assert result.exit_code == 1, result.output
    assert "error: unknown config key run.filter.treshold" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # refused before any work


def test_every_command_is_registered_and_a_module_level_function():
    modules = [importlib.import_module(f"capfilt.commands.{m.name}")
               for m in pkgutil.iter_modules(capfilt.commands.__path__) if not m.name.startswith("_")]
    commands = {name: fn for module in modules for name, fn in module.COMMANDS.items()}
    assert set(CONFIGURED) | {"report"} == set(commands)
    for name, fn in commands.items():
        assert fn.__qualname__ == fn.__name__, name  # importable, not a closure
        assert getattr(importlib.import_module(fn.__module__), fn.__name__) is fn


def test_an_unexpected_error_is_not_swallowed():
    def broken() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        handled(broken)()
    with pytest.raises(typer.Exit) as exit_:
        handled(lambda: (_ for _ in ()).throw(FileNotFoundError("no such shard")))()
    assert exit_.value.exit_code == 1


def test_flags_replace_keys_after_set_and_keep_their_type(tmp_path):
    cfg = config_from(None, ["run.input=a", "run.filter.threshold=0.2"],
                      {"run.input": "s3://b/*.parquet", "run.filter.threshold": None, "run.round": 2})
    assert (cfg.run.input, cfg.run.filter.threshold, cfg.run.round) == ("s3://b/*.parquet", 0.2, 2)
