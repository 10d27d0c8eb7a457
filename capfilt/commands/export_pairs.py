"""`capfilt export`: a CapFilt output's kept rows as webdataset tars, an HF dataset or parquet files."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from capfilt.commands._shared import AddressOption, ConfigOption, SetOption, VerboseOption, config_from, console


class FormatChoice(str, Enum):
    """--format choices, as in `ExportConfig.format`."""

    webdataset = "webdataset"
    hf = "hf"
    parquet = "parquet"


def export(
    out: Annotated[str, typer.Argument(
        help="A `capfilt run` output folder or URI (its committed data/ shards are exported).")],
    to: Annotated[str, typer.Option(
        "--to", help="Destination folder or URI (s3://bucket/prefix, ...). Re-running into it skips the files "
                     "already written.")],
    format_: Annotated[Optional[FormatChoice], typer.Option(
        "--format", help="webdataset: tars for open_clip / webdataset loaders; hf: a datasets.load_from_disk "
                         "folder; parquet: parquet files (export.format).")] = None,
    explode: Annotated[Optional[bool], typer.Option(
        "--explode/--no-explode", help="One sample per kept text (the image repeated) instead of one per image "
                                       "(export.explode).")] = None,
    samples_per_shard: Annotated[Optional[int], typer.Option(
        "--samples-per-shard", min=0, help="Samples per output file; 0: one file per data/ shard "
                                           "(export.samples_per_shard).")] = None,
    address: AddressOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an export of other settings (or of an earlier state of OUT) in --to.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Export the kept image-text pairs for trainers: every kept row (or text) exactly once."""
    cfg = config_from(config, overrides, {"export.format": format_, "export.explode": explode,
                                          "export.samples_per_shard": samples_per_shard, "export.address": address})
    with console(verbose):
        from capfilt.pipelines.export_pairs import run_export

        summary = run_export(cfg, out, to, force=force)
    last = summary["last_run"]
    typer.echo(f"{summary['samples']} samples ({summary['images']} images, {summary['texts']} texts) in "
               f"{summary['files_committed']} of {summary['files']} {summary['format']} files in {to}")
    typer.echo(f"this run: {last['files_written']} files written, {last['files_skipped']} skipped, "
               f"{last['samples_per_second']} samples/s")
    for name, problem in last["files_failed"].items():
        typer.echo(f"error: file {name} was not written: {problem}; re-run to retry it", err=True)
    if "train_data" in summary:
        typer.echo(f"open_clip: --train-data '{summary['train_data']}' --train-num-samples {summary['samples']}")
    if last["files_failed"]:
        raise typer.Exit(1)


COMMANDS = {"export": export}
