"""`capfilt demo-data`: write the procedural demo world (human/web/test shards and truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capfilt.commands._shared import ConfigOption, SetOption, config_from


def demo_data(
    out: Annotated[Path, typer.Argument(
        help="Output folder: OUT/human/, OUT/web/, OUT/test/ shards, OUT/truth.parquet and "
             "OUT/config.yaml.")],
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="World seed (overrides demo.seed); the same seed gives identical files.")] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a demo world already in OUT (only its parquet files).")] = False,
) -> None:
    """Write the demo world: clean human pairs, noisy web pairs, a clean test split, and truth."""
    from capfilt.config import write_resolved
    from capfilt.demo_world import NOISE_TYPES, write_world

    cfg = config_from(config, overrides, {"demo.seed": seed})
    counts = write_world(cfg.demo, out, overwrite=overwrite)
    write_resolved(cfg, out)
    for split, by_noise in counts.items():
        detail = ", ".join(f"{noise} {by_noise[noise]}" for noise in NOISE_TYPES if by_noise[noise])
        typer.echo(f"{split}: {sum(by_noise.values())} rows ({detail or 'empty'})")
    typer.echo(f"truth: {out / 'truth.parquet'}")


COMMANDS = {"demo-data": demo_data}
