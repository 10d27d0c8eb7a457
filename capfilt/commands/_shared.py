"""What every command shares: one way from flags to config, one way to report an expected error.

A command module lists its commands in `COMMANDS` (name -> plain module-level function);
`capfilt.cli` registers each through `handled`, so any command can be imported and called.
"""

from __future__ import annotations

import functools
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer


def config_from(path: Optional[Path], overrides: Optional[list[str]], flags: dict[str, Any] | None = None) -> Any:
    """The YAML file, then the --set overrides, then the command's own flags (None: not given).

    Flags are typed by typer already, so they replace keys as they are (a glob must not be
    re-read as YAML); --set values are read as YAML, so `3`, `0.5` and `true` get their types.
    The `storage` section takes effect here, for the whole command.
    """
    from capfilt.config import load_config, replace_key
    from capfilt.storage import configure

    cfg = load_config(path, list(overrides or []))
    for dotted, value in (flags or {}).items():
        if value is not None:
            cfg = replace_key(cfg, dotted, value.value if isinstance(value, Enum) else value)
    configure(cfg.storage)  # every storage call of the command (and of its workers) retries as it says
    return cfg


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (bad config or input, a busy or mismatched output, a failed stage):
    reported as one line, not a traceback. Imported late so `capfilt --help` stays fast."""
    from capfilt.commit import ConfigMismatch, OutputBusy
    from capfilt.config import ConfigError
    from capfilt.download import DownloadError
    from capfilt.export import ExportError
    from capfilt.pipelines.bootstrap import ResumeRefused
    from capfilt.pipelines.run import StageFailed
    from capfilt.storage import StorageUnavailable

    return (ConfigError, ConfigMismatch, OutputBusy, StageFailed, ResumeRefused, DownloadError,
            ExportError, StorageUnavailable, FileNotFoundError, FileExistsError, ImportError, KeyError, ValueError)


def handled(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with its expected errors turned into `error: ...` on stderr and exit status 1."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:  # noqa: BLE001 - re-raised below unless it is expected
            if not isinstance(err, expected_errors()):
                raise
            from capfilt.storage import StorageUnavailable

            resume = "; what was committed stays, re-run the same command to resume" \
                if isinstance(err, StorageUnavailable) else ""
            typer.echo(f"error: {err}{resume}", err=True)
            raise typer.Exit(1) from None

    return run
