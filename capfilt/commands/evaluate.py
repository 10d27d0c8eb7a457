"""`capfilt eval`, `capfilt dedup` and `capfilt report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from capfilt.commands._shared import ConfigOption, SetOption, config_from

def eval_command(
    model: Optional[Path] = typer.Option(None, "--model", help="Model dir with captioner/ and/or filter/ "
                                         "(transformers BLIP directories)."),
    data: Optional[str] = typer.Option(None, "--data", help="Split of input shards (image + caption per row): "
                                       "a folder or URI."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Demo-world truth.parquet: the filter's quality "
                                         "with --capfilt-out; with --model, also the captions' attribute accuracy."),
    capfilt_out: Optional[Path] = typer.Option(None, "--capfilt-out", help="CapFilt output dir "
                                               "(data/rejected/failed) whose filtering is scored."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON here."),
    k: Optional[int] = typer.Option(None, "--k", help="ITC candidates ITM re-ranks (eval.k, default 16)."),
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Retrieval recall@1/5/10, caption BLEU-4/CIDEr-D and filter precision/recall/ROC-AUC."""
    from capfilt.evaluate import evaluate, format_table

    results = evaluate(config_from(config, overrides, {"eval.k": k}), model, data, truth, capfilt_out)
    typer.echo(format_table(results))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        typer.echo(f"wrote {out}")

def dedup_command(
    input: str = typer.Option(..., "--input", help="Input shards to deduplicate: a folder or URI."),
    out: Path = typer.Option(..., "--out", help="Output dir: data/ (kept), removed/ (with reason), stats.json."),
    filter: Path = typer.Option(..., "--filter", help="BlipForImageTextRetrieval dir whose ITC image "
                                "embeddings are compared."),
    against: Optional[Path] = typer.Option(None, "--against", help="Evaluation split: rows with an image "
                                           "this close to one of its images are removed."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Cosine at or above which two "
                                              "images are duplicates (dedup.threshold, default 0.95)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dedup output in --out."),
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Remove near-duplicate images and images that contaminate an evaluation set."""
    from capfilt.dedup import dedup

    stats = dedup(input, out, filter, config_from(config, overrides, {"dedup.threshold": threshold}), against,
                  overwrite)
    typer.echo(f"read {stats['read']}  kept {stats['kept']}  removed {stats['removed']} "
               f"(near-duplicates {stats['near_duplicate']}, contaminating {stats['contaminated']})")

def report_command(
    directory: Path = typer.Argument(..., help="A CapFilt run dir (stats.json, data/, rejected/) or a "
                                     "bootstrap workdir (round-*/capfilt/, round-*/eval.json)."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default DIR/report.html)."),
    examples: int = typer.Option(12, "--examples", help="Images in the gallery of each round."),
) -> None:
    """A self-contained static HTML report: counts, ITM histograms, metrics, example gallery."""
    from capfilt.report import write_report

    path = write_report(directory, out or directory / "report.html", examples)
    typer.echo(f"wrote {path}")


COMMANDS = {"eval": eval_command, "dedup": dedup_command, "report": report_command}
