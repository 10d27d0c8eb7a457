"""`capfilt download`: fetch a URL list with img2dataset into CapFilt input shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capfilt.commands._shared import ConfigOption, SetOption, config_from

URL_LIST_HELP = (
    "URL list: .txt (one URL per line) or .csv/.tsv/.parquet with url and caption columns "
    "(names: download.url_col, download.caption_col); other columns are kept."
)
OUT_HELP = ("Output folder or URI (s3://bucket/web, gs://...) for the parquet shards; re-running into it "
            "resumes finished shards.")


def download(
    url_list: Annotated[Path, typer.Argument(help=URL_LIST_HELP)],
    out: Annotated[str, typer.Argument(help=OUT_HELP)],
    image_size: Annotated[Optional[int], typer.Option(
        "--image-size", help="Resize images to this side (overrides download.image_size).",
    )] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Download images with img2dataset into CapFilt input shards; every URL gets a row."""
    from capfilt.config import write_resolved
    from capfilt.download import download as run_download

    cfg = config_from(config, overrides, {"download.image_size": image_size})
    summary = run_download(url_list, out, cfg.download)
    write_resolved(cfg, out)
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"shards in {out}")


COMMANDS = {"download": download}
