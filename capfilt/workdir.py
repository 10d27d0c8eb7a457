"""Folder and file names of capfilt's outputs, defined once (as `schema.py` defines the columns).

A training output (`capfilt pretrain|finetune --out OUT`): `OUT/med/`, plus `OUT/captioner/` or
`OUT/filter/` for a fine-tuning, and `OUT/metrics.json`. A bootstrap workdir is laid out as
pipelines/bootstrap.py's docstring shows, from the names below.
"""

from __future__ import annotations

import re
from pathlib import Path

MED = "med"  # a saved MED, in every training output
CAPTIONER = "captioner"  # BlipForConditionalGeneration folder; in a workdir round, also its training's stage
FILTER = "filter"  # BlipForImageTextRetrieval folder; in a workdir round, also its training's stage
METRICS = "metrics.json"  # a training's final metrics

PRETRAIN = "pretrain"  # a round's pre-training output (its MED is PRETRAIN/MED)
CAPFILT = "capfilt"  # a round's CapFilt output over the web shards
EVAL_MODEL = "eval-model"  # a round's MED exported as CAPTIONER/ and FILTER/ for evaluation
EVAL_STAGE = "eval"  # the stage folder whose done-marker holds a round's evaluation
EVAL = "eval.json"  # a round's evaluation results, read by the report
AUDIT_STAGE = "audit"  # the stage folder whose done-marker holds a round's filter audit
AUDIT = "audit.json"  # a round's filter audit (capfilt/audit.py), read by the report
HUMAN_SPLIT = "human-split"  # the human pairs split into finetune/ and the held-out audit/
ROUND = "round-"  # round r's folder is ROUND + str(r)


def round_dir(work: str | Path, r: int) -> Path:
    return Path(work) / f"{ROUND}{r}"


def round_dirs(work: str | Path) -> list[Path]:
    """The round folders of a bootstrap workdir, in round order."""
    found = [d for d in Path(work).glob(f"{ROUND}*") if d.is_dir() and re.fullmatch(r"\d+", d.name[len(ROUND):])]
    return sorted(found, key=lambda d: int(d.name[len(ROUND):]))
