"""The demo world's filter comparison: BLIP ITM alone, the MED's ITC alone, and both, against the truth.

    python benchmarks/scorer_compare.py demo-out                  # round 1 of a finished `capfilt demo` workdir
    python benchmarks/scorer_compare.py /tmp/demo_ev20 --build    # runs `capfilt demo --workdir` first if unfinished
    python benchmarks/scorer_compare.py demo-out --round 1 --json /tmp/compare.json

The round's fine-tuned filter gives every web caption two scores in the CapFilt run
(round-r/capfilt/{data,rejected}): ITM P(match) (`caption_itm`, what the filter thresholds) and
the ITC cosine of its unimodal image and text embeddings (`caption_itc`), the contrastive score
a CLIP scorer gives, here from the filter's own towers. Each score's threshold is calibrated as
the bootstrap calibrates ITM (`bootstrap.threshold_quantile`, capfilt/calibrate.py): the
q-quantile of that score over the human pairs the round fine-tuned and calibrated on, which the
pipeline's prepare and filter stages score with the run's settings. The rules:

- ITM: a web caption is removed when its P(match) is below the ITM threshold (the run's rule;
  the threshold recomputed here is checked against the round's);
- ITC: removed when its cosine is below the ITC threshold;
- both: kept only when it passes both thresholds;
- both, joint q: kept only when both scores are at or above the same human-pair percentile p,
  p chosen so that the rule keeps 1 - q of the human pairs, as each single rule does (the rule
  above removes more human pairs than either alone, so it trades clean captions for recall).

Figures against the demo world's truth.parquet, as `capfilt eval --truth` defines them: positive
class a noisy web caption (mismatch, attribute swap, junk) removed; precision, recall, the clean
web captions kept, and ROC-AUC of the score (for "both": the smaller of the two human-pair
percentiles, the score whose q-threshold is the both-rule), with standard errors from a paired
bootstrap over the web captions (`--resamples`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from capfilt import metrics, schema  # noqa: E402
from capfilt.calibrate import quantile_threshold  # noqa: E402
from capfilt.config import Config, load_config, model_batch_size  # noqa: E402
from capfilt.storage import parquet_files  # noqa: E402

NOISE = ("mismatch", "swap", "junk")


def human_scores(filter_dir: Path, human_dir: Path, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(ITM P(match) [N], ITC cosine [N]) of the human pairs' own captions, through the prepare and
    filter stages with the run's settings, as calibrate.score_human scores them for the ITM
    threshold (it keeps the ITM column only)."""
    from capfilt.stages.filter import Filter
    from capfilt.stages.prepare import Prepare

    run = replace(cfg.run, filter=replace(cfg.run.filter, model=str(filter_dir)))
    scorer, prepare, cols = Filter(run), Prepare(run), run.columns
    itm: list[float] = []
    itc: list[float] = []
    for path in parquet_files(str(human_dir)):
        names = [cols.key, cols.text, cols.image] + [c for c in (cols.status, "error_message")
                                                     if c in path.read_schema().names]
        with path.open_input_file() as handle:
            batch_size = model_batch_size(run.filter, scorer.blip.device.type == "cuda")
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=names):
                table = prepare(pa.Table.from_batches([batch]))
                none = pa.array([[] for _ in range(table.num_rows)], pa.list_(pa.string()))
                scored = scorer(table.append_column(schema.SYNTHETIC, none))
                for a, b in zip(scored[schema.CAPTION_ITM].to_pylist(), scored[schema.CAPTION_ITC].to_pylist()):
                    if a is not None:
                        itm.append(a)
                        itc.append(b)
    # float32 as stored in the run's output, so the recomputed ITM threshold is the run's to the bit
    return np.asarray(itm, np.float32).astype(np.float64), np.asarray(itc, np.float32).astype(np.float64)


def web_scores(capfilt_out: Path, truth_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ITM [N], ITC [N], noise type [N], the run's threshold per row [N]) of the scored web captions."""
    noise = dict(zip(*pq.read_table(truth_path, columns=["key", "noise"]).to_pydict().values()))
    rows = []
    for sub in (schema.DATA, schema.REJECTED):
        for path in sorted((capfilt_out / sub).glob("*.parquet")):
            table = pq.read_table(path, columns=["key", schema.CAPTION_ITM, schema.CAPTION_ITC, schema.THRESHOLD])
            rows += [r for r in zip(*table.to_pydict().values()) if r[1] is not None]
    keys, itm, itc, threshold = zip(*rows)
    as64 = lambda v: np.asarray(v, np.float32).astype(np.float64)  # noqa: E731
    return as64(itm), as64(itc), np.asarray([noise[k] for k in keys]), as64(threshold)


def percentile(human: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each score's share of human-pair scores at or below it: the human pairs' CDF."""
    return np.searchsorted(np.sort(human), scores, side="right") / len(human)


def figures(removed: np.ndarray, score: np.ndarray, kinds: np.ndarray) -> dict:
    noisy = kinds != "clean"
    counts = metrics.binary_counts(removed.tolist(), noisy.tolist())
    return {"precision": counts["precision"], "recall": counts["recall"], "f1": counts["f1"],
            "clean_kept": float(1.0 - removed[~noisy].mean()), "web_removed": float(removed.mean()),
            "roc_auc": metrics.roc_auc(score, ~noisy),
            "removed_per_noise": {k: float(removed[kinds == k].mean()) for k in NOISE if (kinds == k).any()}}


def compare(itm_h: np.ndarray, itc_h: np.ndarray, itm: np.ndarray, itc: np.ndarray, kinds: np.ndarray,
            quantile: float, resamples: int, seed: int = 0) -> dict:
    t_itm, t_itc = quantile_threshold(itm_h, quantile), quantile_threshold(itc_h, quantile)
    both = np.minimum(percentile(itm_h, itm), percentile(itc_h, itc))
    both_h = np.minimum(percentile(itm_h, itm_h), percentile(itc_h, itc_h))
    t_joint = quantile_threshold(both_h, quantile)  # a human-pair percentile both scores must reach
    rules = {"ITM": (itm < t_itm, itm), "ITC": (itc < t_itc, itc), "both": ((itm < t_itm) | (itc < t_itc), both),
             "both, joint q": (both < t_joint, both)}
    human_kept = {"ITM": itm_h >= t_itm, "ITC": itc_h >= t_itc, "both": (itm_h >= t_itm) & (itc_h >= t_itc),
                  "both, joint q": both_h >= t_joint}
    out = {"thresholds": {"ITM": t_itm, "ITC": t_itc, "joint_percentile": t_joint}, "quantile": quantile,
           "human_pairs": len(itm_h), "web_scored": len(itm), "noise_share": float((kinds != "clean").mean()),
           "rules": {name: figures(removed, score, kinds) for name, (removed, score) in rules.items()}}
    # Paired bootstrap over the web captions (thresholds fixed: they come from the human pairs).
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, list[float]]] = {name: {} for name in rules}
    for _ in range(resamples):
        pick = rng.integers(0, len(kinds), len(kinds))
        for name, (removed, score) in rules.items():
            f = figures(removed[pick], score[pick], kinds[pick])
            for key in ("precision", "recall", "clean_kept", "roc_auc"):
                if f[key] is not None:
                    draws[name].setdefault(key, []).append(f[key])
    for name in rules:
        out["rules"][name]["human_kept"] = float(human_kept[name].mean())
        out["rules"][name]["se"] = {key: float(np.std(v, ddof=1)) for key, v in draws[name].items()}
    for name in ("ITC", "both", "both, joint q"):
        diff = np.asarray(draws[name]["roc_auc"]) - np.asarray(draws["ITM"]["roc_auc"])
        out["rules"][name]["roc_auc_minus_itm"] = {"value": out["rules"][name]["roc_auc"]
                                                   - out["rules"]["ITM"]["roc_auc"], "se": float(diff.std(ddof=1))}
    return out


def table(result: dict) -> str:
    se = lambda r, k: f"{r[k]:.3f} ± {r['se'][k]:.3f}" if r[k] is not None else "n/a"  # noqa: E731
    t = result["thresholds"]
    thresholds = {"ITM": f"{t['ITM']:.4f}", "ITC": f"{t['ITC']:.4f}", "both": f"{t['ITM']:.4f} and {t['ITC']:.4f}",
                  "both, joint q": f"each at its human {t['joint_percentile']:.3f} quantile"}
    lines = ["| filter | threshold | human pairs kept | clean web kept | removal precision | removal recall "
             "| ROC-AUC | removed: mismatch / swap / junk |", "|---|---|---|---|---|---|---|---|"]
    for name, rule in result["rules"].items():
        per = " / ".join(f"{rule['removed_per_noise'].get(k, float('nan')):.2f}" for k in NOISE)
        lines.append(f"| {name} | {thresholds[name]} | {rule['human_kept']:.3f} | {se(rule, 'clean_kept')} "
                     f"| {se(rule, 'precision')} "
                     f"| {se(rule, 'recall')} | {se(rule, 'roc_auc')} | {per} |")
    notes = [f"{name} ROC-AUC - ITM's: {rule['roc_auc_minus_itm']['value']:+.3f} "
             f"± {rule['roc_auc_minus_itm']['se']:.3f}" for name, rule in result["rules"].items()
             if "roc_auc_minus_itm" in rule]
    return "\n".join(lines) + "\n\n" + "; ".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path, help="a `capfilt demo` workdir (WORKDIR/world, WORKDIR/bootstrap)")
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--build", action="store_true", help="run `capfilt demo --workdir WORKDIR` first "
                        "when the round is not finished (about 6-10 minutes on 2 CPU cores)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the standard errors")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    rounds = args.workdir / "bootstrap"
    rd = rounds / f"round-{args.round}"
    if not (rd / "DONE.json").is_file():
        if not args.build:
            sys.exit(f"{rd} is not a finished round: run `capfilt demo --workdir {args.workdir}` or pass --build")
        subprocess.run([str(Path(sys.executable).parent / "capfilt"), "demo", "--workdir", str(args.workdir)],
                       check=True)
    cfg = load_config(rounds / "config.yaml")  # the resolved config the bootstrap ran with
    quantile = cfg.bootstrap.threshold_quantile
    if not quantile:
        sys.exit(f"{rounds}: bootstrap.threshold_quantile is off; this comparison calibrates by it")
    # The human pairs the round fine-tuned on and calibrated its threshold on (Bootstrap._finetune_human).
    split = rounds / "human-split" / "finetune"
    human = split if split.is_dir() else args.workdir / "world" / "human"
    filter_dir = rd / "filter" / "filter"
    itm_h, itc_h = human_scores(filter_dir, human, cfg)
    itm, itc, kinds, run_threshold = web_scores(rd / "capfilt", args.workdir / "world" / "truth.parquet")
    result = compare(itm_h, itc_h, itm, itc, kinds, quantile, args.resamples)
    result |= {"workdir": str(args.workdir), "round": args.round, "filter": str(filter_dir), "human": str(human),
               "run_threshold": sorted(set(run_threshold.tolist()))}
    print(f"round {args.round} of {args.workdir}: filter {filter_dir}; thresholds at the {quantile:g} quantile of "
          f"{len(itm_h)} human pairs ({human}); {len(itm)} scored web captions, noise share "
          f"{result['noise_share']:.3f}; the run's ITM threshold {result['run_threshold']}, recomputed "
          f"{round(result['thresholds']['ITM'], 4)}\n")
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
