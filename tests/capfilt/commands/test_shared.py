"""Every command reports an expected error the same way (one line, exit status 1) and is a
plain module-level function; a bug still surfaces as a traceback."""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

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


# --- the console of a command that runs on Ray ----------------------------------------------------

# What Ray prints unasked, and the transformers bars of saving and loading weights.
RAY_LINES = ("streaming_executor.py", "Execution plan", "core_worker.cc", "issues/53727",
             "Token authentication is enabled", "Writing model shards", "Loading weights")
QUIET_RUN = ["--set", "run.resources.cpus_per_actor=0.5", "--set", "run.resources.decode_cpus=0.25",
             "--set", "run.caption.batch_size=4", "--set", "run.filter.batch_size=4",
             "--set", "run.caption.max_length=3", "--set", "run.caption.min_length=1"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, blip_dirs) -> list[str]:
    """`capfilt run` arguments over one shard of 6 rows and the tiny models."""
    from tests.tiny_blip import shard_rows, write_shard

    shards = tmp_path_factory.mktemp("world")
    write_shard(shards / "00000.parquet", shard_rows("a", 6))
    return ["run", "--input", str(shards), "--captioner", str(blip_dirs["captioner"]),
            "--filter", str(blip_dirs["filter"]), *QUIET_RUN]


def run_process(args: list[str], tmp_path: Path) -> tuple[str, str, Path]:
    """`capfilt ARGS --out OUT` in a process of its own that starts its own Ray, as a user's does:
    (stdout, stderr, Ray's temp folder)."""
    import subprocess
    import sys
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="ray"))  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "CAPFILT_VERBOSE"}
    result = subprocess.run([sys.executable, "-m", "capfilt.cli", *args, "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**env, "RAY_TMPDIR": str(ray_tmp)})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, result.stderr, ray_tmp


def test_capfilt_run_prints_our_lines_and_none_of_rays(tiny_world, tmp_path):
    """Our lines; none of Ray's. What the console leaves out is in Ray's session folder."""
    import re
    import shutil

    stdout, stderr, ray_tmp = run_process(tiny_world, tmp_path)
    try:
        console = stdout + stderr
        assert [line for line in console.splitlines() if any(noise in line for noise in RAY_LINES)] == []
        assert "the tokenizer's own tokens" not in console  # blip_ops logs the ordinary [DEC]/[ENC] at DEBUG
        assert re.search(r"^\d\d:\d\d:\d\d input: 1 shards, 6 rows in .*; 1 to process, 0 committed before$",
                         stderr, re.M), console
        assert re.search(r"^\d\d:\d\d:\d\d Ray: a local Ray, .* CPUs, 0 GPUs; its logs: ", stderr, re.M)
        assert re.search(r"^\d\d:\d\d:\d\d progress: 6/6 rows \(100.0%\), 1/1 shards committed", stderr, re.M)
        assert "read 6  kept " in stdout and "this run: 1 shards processed" in stdout
        logs = Path(re.search(r"^Ray's full logs in (.+)$", stdout, re.M).group(1))
        assert logs.parent.parent == ray_tmp / "ray"
        assert "Execution plan" in (logs / "ray-data" / "ray-data.log").read_text()
        assert any("issues/53727" in p.read_text() for p in logs.glob("python-core-driver-*.log"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_verbose_brings_rays_lines_back(tiny_world, tmp_path):
    import shutil

    stdout, stderr, ray_tmp = run_process([*tiny_world, "--verbose"], tmp_path)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "Execution plan of Dataset" in stderr and "issues/53727" in stderr
    assert "progress: 6/6 rows" in stderr and "read 6  kept " in stdout


def test_the_console_leaves_out_the_ordinary_special_ids(caplog):
    """A model loaded in the command's own process (eval, the audit, the bootstrap's evaluation)
    logs the tokenizer's own [DEC]/[ENC] ids below the console's INFO: the line came once per load."""
    from transformers import BlipTextConfig

    from capfilt.commands._shared import console
    from capfilt.model import blip_ops
    from capfilt.model.tokenizer import build_tokenizer

    with console(verbose=False):
        assert blip_ops.special_token_ids(build_tokenizer(), BlipTextConfig()) == (30522, 30523)
    assert "the tokenizer's own tokens" not in caplog.text
