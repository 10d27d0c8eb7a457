"""`capfilt eval`, `capfilt dedup` and `capfilt report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

CONFIG_HELP = "YAML config file (the eval/dedup/run sections are read)."
SET_HELP = "Override a config key, e.g. --set eval.k=32 (repeatable)."


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        model: Optional[Path] = typer.Option(None, "--model", help="Model dir with captioner/ and/or filter/ "
                                             "(transformers BLIP directories)."),
        data: Optional[str] = typer.Option(None, "--data", help="Split of input shards (image + caption per row): "
                                           "a folder or URI."),
        truth: Optional[Path] = typer.Option(None, "--truth", help="Demo-world truth.parquet (with --capfilt-out)."),
        capfilt_out: Optional[Path] = typer.Option(None, "--capfilt-out", help="CapFilt output dir "
                                                   "(data/rejected/failed) whose filtering is scored."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON here."),
        k: Optional[int] = typer.Option(None, "--k", help="ITC candidates ITM re-ranks (eval.k, default 16)."),
        config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
        overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    ) -> None:
        """Retrieval recall@1/5/10, caption BLEU-4/CIDEr-D and filter precision/recall/ROC-AUC."""
        from capfilt.config import ConfigError, load_config
        from capfilt.evaluate import evaluate, format_table

        try:
            cfg = load_config(config, list(overrides) + ([f"eval.k={k}"] if k is not None else []))
            results = evaluate(cfg, model, data, truth, capfilt_out)
        except (ConfigError, FileNotFoundError, KeyError, ValueError) as exc:
            _fail(exc)
        typer.echo(format_table(results))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
            typer.echo(f"wrote {out}")

    @app.command("dedup")
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
        config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
        overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    ) -> None:
        """Remove near-duplicate images and images that contaminate an evaluation set."""
        from capfilt.config import ConfigError, load_config
        from capfilt.dedup import dedup

        try:
            extra = [f"dedup.threshold={threshold}"] if threshold is not None else []
            cfg = load_config(config, list(overrides) + extra)
            stats = dedup(input, out, filter, cfg, against, overwrite)
        except (ConfigError, FileExistsError, FileNotFoundError, KeyError, ValueError) as exc:
            _fail(exc)
        typer.echo(f"read {stats['read']}  kept {stats['kept']}  removed {stats['removed']} "
                   f"(near-duplicates {stats['near_duplicate']}, contaminating {stats['contaminated']})")

    @app.command("report")
    def report_command(
        directory: Path = typer.Argument(..., help="A CapFilt run dir (stats.json, data/, rejected/) or a "
                                         "bootstrap workdir (round-*/capfilt/, round-*/eval.json)."),
        out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default DIR/report.html)."),
        examples: int = typer.Option(12, "--examples", help="Images in the gallery of each round."),
    ) -> None:
        """A self-contained static HTML report: counts, ITM histograms, metrics, example gallery."""
        from capfilt.report import write_report

        try:
            path = write_report(directory, out or directory / "report.html", examples)
        except (FileNotFoundError, ValueError) as exc:
            _fail(exc)
        typer.echo(f"wrote {path}")
