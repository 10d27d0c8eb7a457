"""How close the label-free filter audit gets: its estimates next to the truth file's figures.

    capfilt demo --workdir demo-out
    python benchmarks/audit_vs_truth.py demo-out                  # round 1 of a finished demo workdir
    python benchmarks/audit_vs_truth.py WORK --truth world/truth.parquet --round 2

Reads a bootstrap round's `audit.json` (held-out human pairs only, no labels) and that round's
CapFilt output, and scores the same web captions against the demo world's `truth.parquet`, at
the same thresholds the audit reports: the run's and the one keeping `audit.target_keep_rate` of
the clean held-out pairs. Truth-side definitions are `capfilt eval --truth`'s (positive class: a
noisy web caption removed, removed meaning caption_itm < threshold); the clean keep rate is the
share of the web's clean captions kept. Prints a markdown table, then the removal rate per noise
type, which shows where the shuffled-caption model of web noise holds (mismatch) and where it
does not (attribute swaps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from capfilt import metrics, schema  # noqa: E402
from capfilt.audit import removed  # noqa: E402


def web_scores(capfilt_out: Path, truth_path: Path, key_column: str = "key") -> tuple[np.ndarray, np.ndarray]:
    """(caption_itm [N], noise type [N]) of the scored web captions of a run, from the truth file."""
    noise = dict(zip(*pq.read_table(truth_path, columns=["key", "noise"]).to_pydict().values()))
    scores, kinds = [], []
    for sub in (schema.DATA, schema.REJECTED):
        for path in sorted((capfilt_out / sub).glob("*.parquet")):
            table = pq.read_table(path, columns=[key_column, schema.CAPTION_ITM])
            for key, itm in zip(table[key_column].to_pylist(), table[schema.CAPTION_ITM].to_pylist()):
                if itm is not None:
                    scores.append(itm)
                    kinds.append(noise[key])
    return np.asarray(scores, np.float32).astype(np.float64), np.asarray(kinds)


def truth_at(threshold: float, scores: np.ndarray, kinds: np.ndarray) -> dict:
    """The truth's figures at one threshold, under the audit's names."""
    noisy, cut = kinds != "clean", scores < threshold
    counts = metrics.binary_counts(cut.tolist(), noisy.tolist())
    return {"noise_share": float(noisy.mean()), "clean_keep_rate": 1.0 - removed(scores[~noisy], threshold),
            "recall": counts["recall"], "precision": counts["precision"], "web_removed": float(cut.mean()),
            "roc_auc": metrics.roc_auc(scores, ~noisy),
            "per_noise": {k: (int((kinds == k).sum()), removed(scores[kinds == k], threshold))
                          for k in sorted(set(kinds.tolist()))}}


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path, help="a `capfilt demo` workdir (or a bootstrap workdir with --truth)")
    parser.add_argument("--truth", type=Path, help="truth.parquet (default: WORKDIR/world/truth.parquet)")
    parser.add_argument("--round", type=int, default=1)
    args = parser.parse_args()
    rounds = args.workdir / "bootstrap" if (args.workdir / "bootstrap").is_dir() else args.workdir
    audit = json.loads((rounds / f"round-{args.round}" / "audit.json").read_text())
    truth_path = args.truth or args.workdir / "world" / "truth.parquet"
    scores, kinds = web_scores(Path(audit["inputs"]["capfilt_out"]), truth_path)

    share = audit["noise_share"]
    print(f"round {args.round}: audit on {audit['pairs']['clean']} held-out human pairs "
          f"({audit['inputs']['human']}); truth on the {len(scores)} scored web captions ({truth_path})\n")
    print("| threshold | figure | audit (label-free) | truth |\n|---|---|---|---|")
    notes = []
    for label, at in (("run", audit["at_threshold"]),
                      (f"keeps {audit['target_keep_rate']:.0%} clean", audit["at_target"])):
        truth = truth_at(at["threshold"], scores, kinds)
        name = f"{label} {at['threshold']:.4f}"
        rows = [("noise share of the web", share["estimate"], truth["noise_share"]),
                ("clean keep rate", at["clean_keep_rate"], truth["clean_keep_rate"]),
                ("removal recall", at["recall"], truth["recall"]),
                ("removal precision", at["precision"], truth["precision"]),
                ("web captions removed (the mixture's / observed)", at.get("web_removed_predicted"),
                 truth["web_removed"]),
                ("ROC-AUC (clean vs shuffled / clean vs noisy web)", audit["roc_auc"], truth["roc_auc"])]
        for figure, estimate, real in rows:
            print(f"| {name} | {figure} | {fmt(estimate)} | {fmt(real)} |")
        per_noise = ", ".join(f"{k} {fmt(rate)} (n={n})" for k, (n, rate) in truth["per_noise"].items())
        notes.append(f"removed at {at['threshold']:.4f}: shuffled human {fmt(at['recall'])}; "
                     f"web per noise type {per_noise}")
    print("\n" + "\n".join(notes))
    print(f"means: clean {share['clean_mean']:.3f}, shuffled {share['mismatch_mean']:.3f}, "
          f"web {share['web_mean']:.3f}; truth per noise type: "
          + ", ".join(f"{k} {scores[kinds == k].mean():.3f}" for k in sorted(set(kinds.tolist()))))


if __name__ == "__main__":
    main()
