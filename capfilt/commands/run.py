"""`capfilt run`: caption and filter input shards on Ray into clean parquet."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from capfilt.commands._shared import (AddressOption, CaptionerOption, ConfigOption, ScorerOption, SetOption,
                                      VerboseOption, config_from, console)


class Keep(str, Enum):
    """--keep choices, as in `FilterConfig.keep`."""

    both = "both"
    web = "web"
    synthetic = "synthetic"


def run(
    out: Annotated[str, typer.Option(
        "--out", help="Output folder or URI (s3://bucket/prefix, ...): data/, rejected/, failed/, "
                      "_commits/, stats.json, config.yaml. Re-running into it skips committed shards.")],
    input: Annotated[Optional[str], typer.Option(
        "--input", help="Input shards: a folder of img2dataset *.parquet or a glob (quote it), local or a "
                        "URI (s3://, gs://, hdfs://).")] = None,
    captioner: CaptionerOption = None,
    filter_model: Annotated[Optional[str], typer.Option(
        "--filter",
        help="Filter folder or hub id: BlipForImageTextRetrieval (ITM P(match)), or a CLIP/SigLIP folder, "
             "then the only scorer besides --scorer ones, no BLIP (docs/models.md).")] = None,
    scorers: ScorerOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    address: AddressOption = None,
    num_captions: Annotated[Optional[int], typer.Option(
        "--num-captions", min=1, help="Synthetic captions per image (run.caption.num_captions).")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", min=0.0, max=1.0,
        help="Keep a text when the --filter score (ITM P(match)) is at least this (run.filter.threshold).")] = None,
    keep: Annotated[Optional[Keep], typer.Option(
        "--keep", help="Which texts may be kept (run.filter.keep).")] = None,
    image_col: Annotated[Optional[str], typer.Option(
        "--image-col", help="Column with the encoded image bytes (run.columns.image).")] = None,
    text_col: Annotated[Optional[str], typer.Option(
        "--text-col", help="Column with the web caption (run.columns.text).")] = None,
    key_col: Annotated[Optional[str], typer.Option(
        "--key-col", help="Column with the unique row key (run.columns.key).")] = None,
    round_: Annotated[Optional[int], typer.Option(
        "--round", min=0, help="Bootstrap round recorded in every output row (run.round).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Discard outputs of an earlier run with other settings and start over.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Caption and filter web image-text pairs: every input row ends in data/, rejected/ or failed/."""
    cfg = config_from(config, overrides, {
        "run.input": input, "run.caption.model": captioner, "run.filter.model": filter_model,
        "run.resources.address": address, "run.caption.num_captions": num_captions,
        "run.filter.threshold": threshold, "run.filter.keep": keep, "run.columns.image": image_col,
        "run.columns.text": text_col, "run.columns.key": key_col, "run.round": round_,
    }, scorers)
    with console(verbose):
        from capfilt.pipelines.run import run_capfilt

        stats = run_capfilt(cfg, out, force=force)
    _print_summary(stats, out)


def _print_summary(stats: dict, out: str) -> None:
    """The totals over every committed shard, this run's work, and each shard that needs a look."""
    last = stats["last_run"]
    typer.echo(f"read {stats['read']}  kept {stats['kept']}  rejected {stats['rejected']}  "
               f"failed {stats['failed']}  (over {stats['shards']} committed shards)")
    if stats["failed_by_reason"]:
        typer.echo("failed by reason: " + ", ".join(f"{k} {v}" for k, v in stats["failed_by_reason"].items()))
    typer.echo(f"synthetic captions {stats['synthetic_generated']} generated, {stats['synthetic_kept']} kept; "
               f"web captions kept {stats['web_kept']}")
    typer.echo(f"this run: {last['shards_processed']} shards processed, {last['shards_skipped']} skipped, "
               f"{last['rows_through_models']} rows through the models, {last['images_per_second']} images/s")
    for name, problem in last["shards_failed_whole"].items():
        typer.echo(f"warning: shard {name}: every row failed: {problem}", err=True)
    for name, problem in last["shards_unreadable"].items():
        typer.echo(f"error: shard {name} could not be read and is not committed: {problem}", err=True)
    for name, problem in last["shards_uncommitted"].items():
        typer.echo(f"error: shard {name} was not committed: {problem}; re-run to retry it", err=True)
    typer.echo(f"output in {out}")
    if last["pipeline_started"] or last["shards_processed"]:
        from capfilt.pipelines.ray_env import ray_logs

        if ray_logs():
            typer.echo(f"Ray's full logs in {ray_logs()}")
    if last["shards_unreadable"] or last["shards_uncommitted"]:
        raise typer.Exit(1)


COMMANDS = {"run": run}
