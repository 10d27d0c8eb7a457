"""What every command shares: its common options, one way from flags to config, one way to report
an expected error, one console.

A command module lists its commands in `COMMANDS` (name -> plain module-level function);
`capfilt.cli` registers each through `handled`, so any command can be imported and called.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

# The options of every command (--config, --set), of every command that starts Ray (--address) and
# the captioner's of `run` and `bootstrap` (--captioner), declared once: `config: ConfigOption = None`.
ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", exists=True, dir_okay=False,
    help="YAML config file (capfilt/configs/*.yaml); the command reads its sections, unknown keys are errors.")]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Config override key=value, e.g. run.filter.threshold=0.3 (repeatable; applied after "
                  "--config, before the command's own flags).")]
AddressOption = Annotated[Optional[str], typer.Option(
    "--address", help="Ray cluster to join: auto, host:port or ray://host:10001; default: a local Ray "
                      "that this command starts (and stops).")]
ScorerOption = Annotated[Optional[list[str]], typer.Option(
    "--scorer", help="A named scorer (repeatable; after run.scorers): NAME=FOLDER[,threshold=T][,kind=itm|itc]"
                     "[,threshold_quantile=Q], FOLDER a CLIP, SigLIP or BLIP retrieval folder or hub id; "
                     "its scores go to score_NAME and synthetic_score_NAME (docs/models.md).")]
# `capfilt run`'s captioner, and `capfilt bootstrap`'s external one (used as it is every round).
CaptionerOption = Annotated[Optional[str], typer.Option(
    "--captioner", help="Captioner folder or hub id org/name[@revision]: BLIP, BLIP-2, LLaVA, Florence-2, ... "
                        "(run.caption.model, docs/models.md). `capfilt bootstrap` then uses it as it is in "
                        "every round instead of fine-tuning BLIP's captioner.")]
VerboseOption = Annotated[bool, typer.Option(
    "--verbose", help="Also print Ray's own lines (its INFO stream, the workers' output, progress bars); "
                      "or set CAPFILT_VERBOSE=1. They are always in Ray's session folder.")]


class _ConsoleFormat(logging.Formatter):
    """`HH:MM:SS message`; a warning or an error says which."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            record.message = f"{record.levelname.lower()}: {record.message}"
        return super().formatMessage(record)


@contextlib.contextmanager
def console(verbose: bool) -> Iterator[None]:
    """capfilt's own lines on stderr for a command that runs on Ray (`run`, `bootstrap`, `export`,
    `demo`): its INFO lines (what runs where, what was found, progress), every library's warnings;
    Ray's lines and transformers' progress bars only when `verbose` or CAPFILT_VERBOSE=1
    (capfilt.pipelines.ray_env)."""
    from capfilt.pipelines import ray_env

    saved = {name: os.environ.get(name) for name in (ray_env.VERBOSE_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")}
    if verbose:
        os.environ[ray_env.VERBOSE_ENV] = "1"  # read by init_ray, inherited by Ray's workers
    if not ray_env.verbose():  # "Writing model shards" / "Loading weights" bars, here and in the workers
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler()
    handler.setFormatter(_ConsoleFormat())
    logging.basicConfig(level=logging.INFO if ray_env.verbose() else logging.WARNING, handlers=[handler])
    logging.getLogger("capfilt").setLevel(logging.INFO)
    try:
        with ray_env.quiet_stderr():
            yield
    finally:  # a command called in-process (tests, notebooks) leaves the environment as it found it
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def config_from(path: Optional[Path], overrides: Optional[list[str]], flags: dict[str, Any] | None = None,
                scorers: Optional[list[str]] = None) -> Any:
    """The YAML file, then the --set overrides, then the command's own flags (None: not given),
    then the --scorer flags appended to run.scorers.

    Flags are typed by typer already, so they replace keys as they are (a glob must not be
    re-read as YAML); --set values are read as YAML, so `3`, `0.5` and `true` get their types.
    Every value is checked against its allowed range here, before the command starts anything, and
    the `storage` section takes effect here, for the whole command.
    """
    from capfilt.config import check, load_config, parse_scorer, replace_key
    from capfilt.storage import configure

    cfg = load_config(path, list(overrides or []))
    for dotted, value in (flags or {}).items():
        if value is not None:
            cfg = replace_key(cfg, dotted, value.value if isinstance(value, Enum) else value)
    if scorers:
        cfg = replace_key(cfg, "run.scorers", cfg.run.scorers + tuple(parse_scorer(text) for text in scorers))
    cfg = check(cfg)
    configure(cfg.storage)  # every storage call of the command (and of its workers) retries as it says
    return cfg


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (bad config or input, a busy or mismatched output, a failed stage):
    reported as one line, not a traceback. Imported late so `capfilt --help` stays fast."""
    from capfilt.commit import ConfigMismatch, OutputBusy
    from capfilt.config import ConfigError
    from capfilt.download import DownloadError
    from capfilt.export_pairs import ExportError
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
