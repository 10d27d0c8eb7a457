"""`capfilt select`: re-filter a finished run's stored scores with other keep settings, no model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def select(
    out: Annotated[str, typer.Argument(help="A `capfilt run` output folder or URI (its committed shards).")],
    to: Annotated[str, typer.Option(
        "--to", help="Destination folder or URI; re-running into it skips the shards already written.")],
    overrides: Annotated[Optional[list[str]], typer.Option(
        "--set", help="New keep settings: run.filter.threshold, .keep, .top_k_synthetic, .rank_synthetic_by, "
                      "run.scorers (thresholds only). Repeatable.")] = None,
) -> None:
    """Apply new thresholds, keep rules or top-k to a run's stored scores: the rows `capfilt run` with
    those settings writes, with no model loaded."""
    from capfilt.select import select_run

    stats = select_run(out, to, list(overrides or []))
    last = stats["last_run"]
    typer.echo(f"read {stats['read']}  kept {stats['kept']}  rejected {stats['rejected']}  "
               f"failed {stats['failed']}  (over {stats['shards']} committed shards)")
    typer.echo(f"synthetic captions {stats['synthetic_generated']} generated, {stats['synthetic_kept']} kept; "
               f"web captions kept {stats['web_kept']}")
    typer.echo(f"this select: {last['shards_processed']} shards selected, {last['shards_skipped']} skipped")
    typer.echo(f"output in {to}")


COMMANDS = {"select": select}
