"""`capfilt audit`: the filter's (and captioner's) quality estimated on human pairs, no truth file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from capfilt.commands._shared import ConfigOption, ScorerOption, SetOption, config_from


def audit_command(
    filter: Path = typer.Option(..., "--filter", help="Filter folder to audit: BlipForImageTextRetrieval (ITM "
                                "P(match)), or a CLIP/SigLIP folder, audited as `capfilt run` uses it: the scorer "
                                "`filter` (docs/audit.md)."),
    human: str = typer.Option(..., "--human", help="Human-annotated shards the filter was NOT fine-tuned on: "
                              "a folder or URI."),
    captioner: Optional[Path] = typer.Option(None, "--captioner", help="Captioner folder of any family (BLIP, "
                                             "BLIP-2, LLaVA, Florence-2, ...; docs/models.md): also audit its "
                                             "captions of the human images."),
    capfilt_out: Optional[Path] = typer.Option(None, "--capfilt-out", help="A CapFilt run with this filter: "
                                               "its threshold, and its web scores for the noise share."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the audit as JSON here."),
    scorers: ScorerOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Clean keep rate, ROC-AUC clean vs shuffled captions, the threshold for a target keep rate,
    and the estimated precision/recall of noise removal; CIDEr/BLEU and P(match) of synthetic
    captions, with a warning when they score below the human ones; each named scorer's (--scorer,
    run.scorers) ROC-AUC, clean keep rate at its threshold, and threshold for the target keep rate."""
    from capfilt.audit import audit
    from capfilt.evaluate import format_table

    results = audit(config_from(config, overrides, scorers=scorers), filter, human, captioner, capfilt_out)
    typer.echo(format_table({k: v for k, v in results.items() if k not in ("curve", "scores")}))
    for name, figures in results.get("scorers", {}).items():
        typer.echo(scorer_line(name, figures))
    if "synthetic_decision" in results:
        decision = results["synthetic_decision"]
        typer.echo(f"run.filter.keep=auto would give {decision['keep']}: {decision['reason']}")
    for figure, why in results.get("not_applicable", {}).items():
        typer.echo(f"{figure}: not applicable: {why}")
    for warning in results["warnings"]:
        typer.echo(f"WARNING: {warning}", err=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        typer.echo(f"wrote {out}")


def scorer_line(name: str, figures: dict) -> str:
    """One named scorer's audit in a line: its clean keep rate at its threshold, ROC-AUC, and the
    threshold keeping the target share of clean pairs."""
    at, target = figures["at_threshold"], figures["at_target"]
    kept = "no threshold" if at is None else f"clean keep rate {at['clean_keep_rate']:.4f} at threshold " \
                                              f"{figures['threshold']:.4f}"
    return (f"scorer {name}: {kept}, ROC-AUC {figures['roc_auc']:.4f}; threshold {target['threshold']:.4f} keeps "
            f"{target['clean_keep_rate']:.4f} of clean pairs (target {figures['target_keep_rate']:g})")


COMMANDS = {"audit": audit_command}
