"""Evaluation that only the demo world allows: it knows each caption's attributes and each web row's noise.

Attribute accuracy of captions: the share of the attributes a reference names (colour, shape,
size, position, background, read by the demo world's `parse_caption`) that the generated caption
names too.

Filter quality (`capfilt eval --truth T --capfilt-out O`): the positive class is a NOISY web
caption (mismatch, swap or junk) and the prediction "removed" is the filter's decision,
`caption_itm < threshold` (the run's threshold, per row). Precision = share of removed captions
that were noisy; recall = share of noisy captions removed. ROC-AUC is P(caption_itm of a clean
caption > caption_itm of a noisy one). Rows CapFilt could not score (failed downloads, bad images)
are counted apart, per noise type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from capfilt import metrics, schema
from capfilt.demo_world import parse_caption

Parse = Callable[[str], set]  # a caption -> its set of (attribute, value), as `parse_caption` reads it


def attribute_scores(generated: Sequence[str], references: Sequence[str], parse: Parse) -> dict[str, Any]:
    """How many of the attributes each reference names the generated caption also names.

    recall (the attribute accuracy): named-and-true / true; precision: named-and-true / named;
    per attribute (colour, shape, ...) the recall restricted to that attribute. recall_se: the
    standard error of recall, a ratio of per-caption sums: sqrt(sum (h_i - recall t_i)^2 / (n (n-1))) / mean t.
    """
    hit = true = named = 0
    per: dict[str, list[int]] = {}
    hits, trues = [], []  # per caption, for recall_se
    for gen, ref in zip(generated, references):
        want, got = parse(ref), parse(gen)
        hit += len(want & got)
        true += len(want)
        named += len(got)
        hits.append(len(want & got))
        trues.append(len(want))
        for attribute, value in want:
            counts = per.setdefault(attribute, [0, 0])
            counts[0] += (attribute, value) in got
            counts[1] += 1
    n, recall = len(hits), hit / true if true else None
    residual = np.subtract(hits, np.multiply(recall or 0.0, trues))
    se = (float(np.sqrt(np.sum(residual**2) / (n * (n - 1))) / np.mean(trues))
          if recall is not None and n > 1 else None)
    return {
        "recall": recall,
        "recall_se": se,
        "precision": hit / named if named else None,
        "per_attribute": {a: h / t for a, (h, t) in sorted(per.items())},
    }


def _read_dir(directory: Path, wanted: list[str]) -> list[dict]:
    rows = []
    for path in sorted(directory.glob("*.parquet")) if directory.is_dir() else []:
        names = set(pq.read_schema(path).names)
        rows += pq.read_table(path, columns=[c for c in wanted if c in names]).to_pylist()
    return rows


def filter_quality(capfilt_out: str | Path, truth_path: str | Path, key_column: str = "key") -> dict[str, Any]:
    """Precision / recall / ROC-AUC of removing noisy web captions, keep rates per noise type,
    and the share and attribute accuracy of the synthetic captions kept."""
    capfilt_out = Path(capfilt_out)
    if not any((capfilt_out / d).is_dir() for d in schema.OUTPUT_DIRS):
        raise FileNotFoundError(f"{capfilt_out}: not a CapFilt output (none of {schema.OUTPUT_DIRS})")
    truth = {r["key"]: r for r in pq.read_table(truth_path, columns=["key", "clean_caption", "noise"]).to_pylist()}
    wanted = [key_column, schema.CAPTION_ITM, schema.THRESHOLD, schema.SYNTHETIC, schema.SYNTHETIC_KEEP]
    per_noise: dict[str, Counter] = {}
    scores, clean, removed = [], [], []
    synth = {"all": [], "kept": [], "removed": []}  # (generated, clean caption)
    not_in_truth = 0
    for where in schema.OUTPUT_DIRS:
        for row in _read_dir(capfilt_out / where, wanted):
            t = truth.get(row[key_column])
            if t is None:
                not_in_truth += 1
                continue
            counts = per_noise.setdefault(t["noise"], Counter())
            counts["rows"] += 1
            counts[where] += 1
            itm = row.get(schema.CAPTION_ITM)
            if where == schema.FAILED or itm is None:
                counts["unscored"] += 1
                continue
            threshold = row.get(schema.THRESHOLD)
            if threshold is None:
                raise KeyError(f"{capfilt_out / where}: column {schema.THRESHOLD!r} is missing")
            counts["scored"] += 1
            counts["kept"] += itm >= threshold
            counts["itm_sum"] += itm
            scores.append(itm)
            clean.append(t["noise"] == "clean")
            removed.append(itm < threshold)
            for text, keep in zip(row.get(schema.SYNTHETIC) or [], row.get(schema.SYNTHETIC_KEEP) or []):
                synth["all"].append((text, t["clean_caption"]))
                synth["kept" if keep else "removed"].append((text, t["clean_caption"]))
    noisy = [not c for c in clean]
    out: dict[str, Any] = {"positive_class": "noisy web caption (mismatch/swap/junk) removed",
                           "scored": len(scores), "not_in_truth": not_in_truth}
    out |= metrics.binary_counts(removed, noisy)
    out["roc_auc"] = metrics.roc_auc(scores, clean) if 0 < sum(clean) < len(clean) else None
    out["per_noise"] = {
        noise: {"rows": c["rows"], "data": c["data"], "rejected": c["rejected"], "failed": c["failed"],
                "unscored": c["unscored"], "kept": c["kept"],
                "keep_rate": c["kept"] / c["scored"] if c["scored"] else None,
                "mean_itm": c["itm_sum"] / c["scored"] if c["scored"] else None}
        for noise, c in sorted(per_noise.items())
    }
    generated = len(synth["all"])
    out["synthetic"] = {"generated": generated, "kept": len(synth["kept"]),
                        "kept_share": len(synth["kept"]) / generated if generated else None}
    for part, pairs in synth.items():
        if pairs:
            gen, ref = zip(*pairs)
            out["synthetic"][f"attributes_{part}"] = attribute_scores(gen, ref, parse_caption)["recall"]
    return out
