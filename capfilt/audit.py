"""The filter audit: how well a filter removes noise, estimated without ground truth.

Users have no truth file for their web data, but they have human-annotated pairs, clean by
definition. Pairs the filter was not fine-tuned on give two labelled score samples, scored
exactly as `capfilt run` scores (`capfilt.calibrate.score_human`: the decode, captioner and
filter stages with the run's settings, the extra texts in the same filter call per image):

- clean:    every held-out image with its own caption                       s ~ F_c
- mismatch: every held-out image with another held-out pair's caption       s ~ F_n
  (`derangement`, seeded by `audit.seed`: no image keeps its own caption, nor one that BLIP's
  cleaning makes identical to it)

F(t) is the share of scores below t, what a threshold t removes (the keep policy keeps s >= t).
At the threshold t (`run.filter.threshold`, or the one the CapFilt run used):

- clean keep rate    1 - F_c(t)
- ROC-AUC            P(s_clean > s_mismatch), ties 1/2 (`metrics.roc_auc`)
- target threshold   the (1 - `audit.target_keep_rate`) quantile of the clean scores: the highest
                     threshold that keeps at least that share of clean pairs
- removal recall     R = F_n(t), the share of noisy captions removed
- noise share pi     of the run's web captions (their `caption_itm` in data/ and rejected/),
                     reading the web scores as the mixture F_w = pi F_n + (1 - pi) F_c and
                     solving it for the means (method of moments):
                         pi = (mu_c - mu_w) / (mu_c - mu_n), clipped to [0, 1]
                     (`unclipped` keeps the raw value; none when mu_n >= mu_c)
- removal precision  P = pi F_n(t) / (pi F_n(t) + (1 - pi) F_c(t)), the share of removed web
                     captions that were noise
- fit check          the web removal rate the run shows, F_w(t), beside the mixture's
                     pi F_n(t) + (1 - pi) F_c(t); a gap means the web is not that mixture
                     (no gap does not prove it is: the means fit by construction)

Bias. The estimates hold when the web's clean captions score like the held-out human captions
and its noisy captions like shuffled ones. The second is optimistic: a shuffled caption is an
easy negative (about another picture altogether), while web noise also has hard negatives (the
right caption with one attribute wrong, alt text that half fits) scoring between the two.
Hence recall is over-estimated (hard negatives pass the threshold more often than shuffled
captions) and pi is under-estimated (a hard negative scoring s counts as only
(mu_c - s) / (mu_c - mu_n) of a noisy caption). Precision moves either way: pi too low lowers
it, F_n(t) too high raises it. Human captions are often better than clean alt text, which biases
pi up and the clean removal rate down. The slice is a sample: a rate p measured on n pairs has a
standard error of about sqrt(p (1 - p) / n). docs/audit.md measures the estimates against the
demo world's truth file.

The named scorers (`run.scorers`, `--scorer`: CLIP, SigLIP, a BLIP folder's ITM or ITC) score the
same clean and mismatched pairs in the same filter call; for each, `scorers.<name>` holds its
ROC-AUC, its clean keep rate (and mismatch keep rate, recall) at its threshold (the one in the
run's config.yaml with `capfilt_out`; none for a scorer without a threshold) and the threshold
that keeps `audit.target_keep_rate` of the clean pairs (`scorer_audit`). The noise share and
precision stay the filter's (they need the run's web scores of one score).

A CLIP or SigLIP filter folder is what `capfilt run` makes of it (`filter_as_scorer`): the scorer
`filter` and no BLIP. Its score then stands for P(match) above: the filter's figures, the noise
share (from the run's `score_filter`) and the captioner half are of it (`filter_score` names the
column), and `scorers.filter` has its figures as any scorer's. `synthetic_decision` is not made
(`not_applicable`): its MARGIN is in ITM P(match).

The captioner half (given a captioner): the captioner stage writes captions for the held-out
images as `capfilt run` would (`run.caption`: nucleus sampling seeded by the row key, not
`capfilt eval`'s beam search), because those are the captions CapFilt adds to the next corpus.
They are scored against the image's human caption (CIDEr-D and BLEU-4, one reference; sampled
captions score below beam-search ones, so the figures do not compare with eval.json's) and
through the filter in the same call as the human caption. When their mean P(match) is below the
human captions' on the same images, the audit warns: the synthetic captions then add text the
filter itself rates worse than human text, which is likely to hurt the next round (on the demo
world, round-1 CIDEr fell while the filtering half alone helped, docs/results.md).

`run.filter.keep=auto` (the bootstrap's default) lets the captioner half decide, label-free,
whether the synthetic captions go into the next pre-training (`synthetic_decision`). Per held-out
image i, two paired differences, each with the standard error of its mean over the n images:

- score gap   g_i = mean P(match) of its synthetic captions - P(match) of its human caption
- description gain  c_i = CIDEr-D of its synthetic captions against its human caption - CIDEr-D of
              another image's human caption (the audit's shuffled one) against it

They are kept (`both`) when mean(g) - Z SE(g) >= -MARGIN (no worse than the human captions by
more than MARGIN, with Z standard errors of evidence) and mean(c) - Z SE(c) > 0 (they describe
their own image better than a caption of another image does); otherwise left out (`web`). The
burden of proof is on the synthetic captions: with few held-out images the standard errors are
wide and the rule leaves them out, which costs at most what BLIP's captioner would add, while
feeding a poor captioner's text into pre-training measurably hurts (docs/results.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from capfilt import metrics, schema
from capfilt.calibrate import quantile_threshold, score_human
from capfilt.config import Config, ConfigError, load_config
from capfilt.evaluate import caption_scores
from capfilt.model_folders import FILTER_SCORER, check_filter_and_scorers, check_model_folder, filter_as_scorer
from capfilt.model.text import has_words, scoring_text
from capfilt.model.utf8 import utf8_text
from capfilt.storage import parquet_files

CURVE = np.linspace(0.0, 1.0, 101)  # thresholds of the keep-rate curves in audit.json
EXAMPLES = 6  # synthetic captions copied into audit.json for a look
# run.filter.keep=auto (`synthetic_decision`): how far below the human captions' mean P(match) the
# synthetic captions may score and still join the corpus (a filter's P(match) for clean pairs sits
# around 0.3-0.4 on the demo world, shuffled pairs 0.15 below), and how many standard errors of
# evidence each of the rule's two tests must clear.
MARGIN = 0.05
Z = 2.0


# ---------------------------------------------------------------------------------------------
# The held-out slice


def key_fraction(key: str) -> float:
    """A number in [0, 1), uniform over keys and fixed by the key alone (the same on every run)."""
    digest = hashlib.blake2b(str(key).encode(), digest_size=8, person=b"capfilt-audit").digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_holdout(human_dir: str | Path, out: str | Path, share: float, key_column: str = "key") -> dict:
    """Copy the rows of `human_dir` into `out/finetune/` and `out/audit/` (the held-out slice).

    A row is held out when `key_fraction(key) < share`, so a pair's side depends on its key only,
    not on the files or the other rows. Rows with a null key stay on the fine-tuning side. Each
    input file gives a file of the same name on each side that gets rows; every row lands on
    exactly one side.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"bootstrap.audit_holdout must be within (0, 1) to split, got {share}")
    out = Path(out)
    counts = {"read": 0, "finetune": 0, "audit": 0}
    for path in parquet_files(human_dir):  # a local folder or a URI (capfilt.storage); `out` is local
        writers: dict[str, pq.ParquetWriter] = {}
        with path.open_input_file() as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches():
                keys = batch.column(batch.schema.get_field_index(key_column)).to_pylist()
                held = np.array([k is not None and key_fraction(k) < share for k in keys], dtype=bool)
                counts["read"] += batch.num_rows
                for side, mask in (("audit", held), ("finetune", ~held)):
                    if not mask.any():
                        continue
                    if side not in writers:
                        (out / side).mkdir(parents=True, exist_ok=True)
                        writers[side] = pq.ParquetWriter(out / side / (path.name + ".tmp"), parquet.schema_arrow)
                    writers[side].write_batch(batch.filter(mask))
                    counts[side] += int(mask.sum())
        for side, writer in writers.items():
            writer.close()
            (out / side / (path.name + ".tmp")).replace(out / side / path.name)
    for side in ("audit", "finetune"):
        if counts[side] == 0:
            raise ValueError(f"bootstrap.audit_holdout={share} leaves no human pair for the {side} side of "
                             f"the {counts['read']} in {human_dir}; change it (0 turns the audit off)")
    return counts


# ---------------------------------------------------------------------------------------------
# Known mismatches


def derangement(texts: Sequence[str], seed: int) -> np.ndarray:
    """partner [N]: a permutation with partner[i] != i and texts[partner[i]] != texts[i].

    Rows with equal texts form groups; the groups, and the rows in each, are laid out in a seeded
    random order, and each row takes the text `m` places further on (cyclically), m the largest
    group's size. A group of at most m consecutive places is left entirely, so no row meets its
    own text; this needs m <= N / 2.
    """
    n = len(texts)
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(text, []).append(i)
    shift = max((len(g) for g in groups.values()), default=0)
    if n < 2 or 2 * shift > n:
        raise ValueError(f"cannot give every one of {n} pairs another caption: {shift} of them share "
                         "one caption (at most half may)")
    rng = np.random.default_rng(seed)
    blocks = list(groups.values())
    order = np.concatenate([rng.permutation(blocks[b]) for b in rng.permutation(len(blocks))])
    partner = np.empty(n, dtype=np.int64)
    partner[order] = order[(np.arange(n) + shift) % n]
    return partner


def mismatched_captions(human_dir: str | Path, cfg: Config) -> dict[str, list[str]]:
    """{key: [another row's caption]} for the rows whose caption the filter scores (seeded)."""
    cols, max_tokens = cfg.run.columns, cfg.run.filter.max_text_tokens
    keys, captions = [], []
    for path in parquet_files(human_dir):
        table = path.read_table(columns=[cols.key, cols.text])
        texts, bad = utf8_text(table[cols.text])  # the decode stage fails invalid UTF-8 rows
        for key, text, invalid in zip(table[cols.key].to_pylist(), texts.to_pylist(), bad):
            if key is not None and not invalid and isinstance(text, str) and has_words(text, max_tokens):
                keys.append(key)
                captions.append(text)
    if len(set(keys)) != len(keys):
        raise ValueError(f"{human_dir}: row keys (run.columns.key={cols.key!r}) are not unique")
    partner = derangement([scoring_text(c, max_tokens) for c in captions], cfg.audit.seed)
    return {key: [captions[j]] for key, j in zip(keys, partner)}


# ---------------------------------------------------------------------------------------------
# Estimates from score samples


def removed(scores: np.ndarray, threshold: float) -> float:
    """F(t): the share of `scores` a threshold removes (the keep policy keeps score >= threshold)."""
    return float(np.mean(np.asarray(scores) < threshold))


def noise_share(web: np.ndarray, clean: np.ndarray, mismatch: np.ndarray) -> dict[str, Any]:
    """pi of the mixture F_w = pi F_n + (1 - pi) F_c, by the means; clipped to [0, 1]."""
    means = {"web_mean": float(np.mean(web)), "clean_mean": float(np.mean(clean)),
             "mismatch_mean": float(np.mean(mismatch))}
    gap = means["clean_mean"] - means["mismatch_mean"]
    raw = (means["clean_mean"] - means["web_mean"]) / gap if gap > 0 else None
    return {"estimate": None if raw is None else float(np.clip(raw, 0.0, 1.0)), "unclipped": raw,
            "method": "means", "web_scored": int(len(web)), **means}


def estimates_at(threshold: float, clean: np.ndarray, mismatch: np.ndarray, pi: float | None,
                 web: np.ndarray | None) -> dict[str, Any]:
    """Keep rates, removal recall and (with pi) precision at one threshold; the fit check with web."""
    f_c, f_n = removed(clean, threshold), removed(mismatch, threshold)
    out: dict[str, Any] = {"threshold": float(threshold), "clean_keep_rate": 1.0 - f_c,
                           "mismatch_keep_rate": 1.0 - f_n, "recall": f_n, "precision": None}
    if pi is not None:
        predicted = pi * f_n + (1.0 - pi) * f_c
        out["precision"] = pi * f_n / predicted if predicted > 0 else None
        out["web_removed_predicted"] = predicted
    if web is not None and len(web):
        out["web_removed_observed"] = removed(web, threshold)
    return out


def filter_audit(clean: np.ndarray, mismatch: np.ndarray, threshold: float, target_keep_rate: float,
                 web: np.ndarray | None = None) -> dict[str, Any]:
    """The filter's estimates from clean and mismatch score samples (and the web's, for pi)."""
    clean, mismatch = np.asarray(clean, np.float64), np.asarray(mismatch, np.float64)
    web = None if web is None else np.asarray(web, np.float64)
    share = noise_share(web, clean, mismatch) if web is not None and len(web) else None
    pi = share["estimate"] if share else None
    target = quantile_threshold(clean, 1.0 - target_keep_rate)
    curve = {"threshold": CURVE.round(4).tolist(),
             "clean_keep_rate": [round(1 - removed(clean, t), 5) for t in CURVE],
             "mismatch_keep_rate": [round(1 - removed(mismatch, t), 5) for t in CURVE]}
    if web is not None and len(web):
        curve["web_keep_rate"] = [round(1 - removed(web, t), 5) for t in CURVE]
    scores = np.concatenate([clean, mismatch])
    labels = np.r_[np.ones(len(clean), bool), np.zeros(len(mismatch), bool)]
    return {
        "pairs": {"clean": int(len(clean)), "mismatch": int(len(mismatch))},
        "roc_auc": metrics.roc_auc(scores, labels),
        "noise_share": share,
        "at_threshold": estimates_at(threshold, clean, mismatch, pi, web),
        "target_keep_rate": target_keep_rate,
        "at_target": estimates_at(target, clean, mismatch, pi, web),
        "curve": curve,
        "scores": {"clean": clean.round(5).tolist(), "mismatch": mismatch.round(5).tolist()},
    }


def scorer_audit(clean: np.ndarray, mismatch: np.ndarray, threshold: float | None,
                 target_keep_rate: float) -> dict[str, Any]:
    """A named scorer's figures on the same pairs: its ROC-AUC, its clean keep rate (and the rest of
    `estimates_at`) at its threshold (none without one) and at the threshold keeping
    `target_keep_rate` of the clean pairs."""
    clean, mismatch = np.asarray(clean, np.float64), np.asarray(mismatch, np.float64)
    scores = np.concatenate([clean, mismatch])
    labels = np.r_[np.ones(len(clean), bool), np.zeros(len(mismatch), bool)]
    target = quantile_threshold(clean, 1.0 - target_keep_rate)
    return {"pairs": {"clean": int(len(clean)), "mismatch": int(len(mismatch))},
            "roc_auc": metrics.roc_auc(scores, labels),
            "threshold": threshold,
            "at_threshold": None if threshold is None else estimates_at(threshold, clean, mismatch, None, None),
            "target_keep_rate": target_keep_rate,
            "at_target": estimates_at(target, clean, mismatch, None, None)}


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """The mean of `values` and its standard error sd / sqrt(n) (none below 2 values)."""
    values = np.asarray(values, np.float64)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return {"mean": float(values.mean()), "se": se, "n": int(len(values))}


def captioner_audit(human: Sequence[str], human_itm: np.ndarray, synthetic: Sequence[Sequence[str]],
                    synthetic_itm: Sequence[Sequence[float]], threshold: float,
                    keys: Sequence[str] = (), shuffled: Sequence[str] = (), score: str = "P(match)") -> dict[str, Any]:
    """Synthetic captions vs the human ones of the same images: CIDEr-D, BLEU-4, the filter's P(match)
    (or the score its warning names as `score`: a CLIP or SigLIP filter's).

    Per image, the score gap (its synthetic captions' mean P(match) - its human caption's) and,
    given `shuffled` (another image's human caption per image), the description gain (CIDEr-D of
    its synthetic captions - CIDEr-D of the shuffled caption, both against its human caption),
    each as mean and standard error: the evidence `synthetic_decision` weighs.
    """
    rows = [i for i, s in enumerate(synthetic) if s]
    generated = [text for i in rows for text in synthetic[i]]
    if not generated:
        raise ValueError("the captioner wrote no caption for any held-out image")
    references = [human[i] for i in rows for _ in synthetic[i]]
    synth = np.asarray([s for i in rows for s in synthetic_itm[i]], np.float64)
    own = np.asarray([human_itm[i] for i in rows], np.float64)
    text = caption_scores(generated, references, None)
    out: dict[str, Any] = {
        "images": len(rows), "captions": len(generated),
        "cider_d": text["cider_d"], "bleu_4": text["bleu_4"],
        "synthetic_mean_itm": float(synth.mean()), "human_mean_itm": float(own.mean()),
        "synthetic_keep_rate": 1.0 - removed(synth, threshold), "human_keep_rate": 1.0 - removed(own, threshold),
        "score_gap": mean_se([np.mean(synthetic_itm[i]) - human_itm[i] for i in rows]),
        "warning": None,
        "examples": [{"key": keys[i] if keys else None, "human": human[i], "human_itm": float(human_itm[i]),
                      "synthetic": list(synthetic[i]), "synthetic_itm": [float(s) for s in synthetic_itm[i]]}
                     for i in rows[:EXAMPLES]],
    }
    if shuffled:
        # Both against the images' human captions (repeated per caption for the synthetic ones, which
        # leaves CIDEr-D's document frequencies as they are when every image has as many captions).
        refs = [[human[i]] for i in rows]
        per_caption = metrics.cider_d(generated, [[r] for r in references])[1]
        starts = np.cumsum([0] + [len(synthetic[i]) for i in rows])
        own_cider = [float(np.mean(per_caption[a:b])) for a, b in zip(starts[:-1], starts[1:])]
        other_cider = metrics.cider_d([shuffled[i] for i in rows], refs)[1]
        out["description_gain"] = mean_se(np.subtract(own_cider, other_cider))
    if out["synthetic_mean_itm"] < out["human_mean_itm"]:
        out["warning"] = (
            f"the captioner's captions score below the human captions of the same images (mean filter "
            f"{score} {out['synthetic_mean_itm']:.3f} vs {out['human_mean_itm']:.3f}; kept at the threshold "
            f"{out['synthetic_keep_rate']:.2f} vs {out['human_keep_rate']:.2f}): its synthetic captions are "
            "likely to hurt the next round (run.filter.keep=web leaves them out)")
    return out


def synthetic_decision(captioner: dict[str, Any]) -> dict[str, Any]:
    """Whether `run.filter.keep=auto` keeps the synthetic captions (`both`) or leaves them out (`web`).

    From `captioner_audit`'s paired evidence: kept when the score gap's lower bound
    mean - Z SE is at least -MARGIN and the description gain's is above 0 (module docstring).
    Evidence that is missing (fewer than 2 images, no shuffled captions) counts as failing.
    """
    def lower(name: str) -> float | None:
        evidence = captioner.get(name) or {}
        return None if evidence.get("se") is None else evidence["mean"] - Z * evidence["se"]

    gap, gain = lower("score_gap"), lower("description_gain")
    tests = {"score_gap": gap is not None and gap >= -MARGIN, "description_gain": gain is not None and gain > 0}
    keep = all(tests.values())

    def shown(name: str) -> str:
        e = captioner.get(name) or {}
        return "n/a" if e.get("se") is None else f"{e['mean']:+.3f} (SE {e['se']:.3f}, n {e['n']})"

    why = (f"synthetic vs human P(match) per held-out image {shown('score_gap')}, "
           f"{'passes' if tests['score_gap'] else 'fails'} mean - {Z:g} SE >= -{MARGIN:g}; "
           f"CIDEr-D gain over another image's caption {shown('description_gain')}, "
           f"{'passes' if tests['description_gain'] else 'fails'} mean - {Z:g} SE > 0; kept at the threshold "
           f"{captioner['synthetic_keep_rate']:.2f} vs human {captioner['human_keep_rate']:.2f}")
    return {"keep_synthetic": keep, "keep": "both" if keep else "web", "tests": tests,
            "rule": f"score_gap mean - {Z:g} SE >= -{MARGIN:g} and description_gain mean - {Z:g} SE > 0",
            "reason": f"synthetic captions {'kept' if keep else 'left out'}: {why}"}


# ---------------------------------------------------------------------------------------------
# The whole audit


def audit(cfg: Config, filter_dir: str | Path, human_dir: str | Path, captioner_dir: str | Path | None = None,
          capfilt_out: str | Path | None = None, threshold: float | None = None) -> dict[str, Any]:
    """Audit `filter_dir` (and `captioner_dir`) on the pairs of `human_dir`, which it must not
    have been fine-tuned on; with `capfilt_out`, at that run's threshold and against its web scores;
    with `threshold` (the bootstrap's, before its CapFilt run), at that one. A CLIP or SigLIP
    `filter_dir` is what it is to `capfilt run`: the scorer `filter`, whose score the filter's
    figures are then of (`filter_score`); the folders are checked as `capfilt run` checks them,
    before any work."""
    from capfilt.report import run_scores

    source = "run.filter.threshold" if threshold is None else "the round's threshold"
    settings = {"model": str(filter_dir)} | ({} if threshold is None else {"threshold": threshold})
    cfg = filter_as_scorer(replace(cfg, run=replace(cfg.run, filter=replace(cfg.run.filter, **settings))))
    check_filter_and_scorers(cfg.run)
    if captioner_dir is not None:
        check_model_folder(captioner_dir, "captioner", "--captioner")
    score = "itm" if cfg.run.filter.model else FILTER_SCORER  # the score the filter keeps a text by
    thresholds = {s.name: s.threshold for s in cfg.run.scorers} | ({"itm": cfg.run.filter.threshold}
                                                                   if score == "itm" else {})
    web = None
    if capfilt_out is not None:
        if not any((Path(capfilt_out) / d).is_dir() for d in schema.OUTPUT_DIRS):
            raise FileNotFoundError(f"{capfilt_out}: not a CapFilt output (none of {schema.OUTPUT_DIRS})")
        web, _, column_threshold = run_scores(Path(capfilt_out), *schema.score_columns(score))
        resolved = Path(capfilt_out) / "config.yaml"
        if resolved.is_file():  # the exact values the keep policy compared with (the column is float32)
            run = load_config(resolved).run
            ran = {"itm": run.filter.threshold} | {s.name: s.threshold for s in run.scorers}
            thresholds |= {name: value for name, value in ran.items() if name in thresholds}
            source = str(resolved) if score in ran else source
        elif column_threshold is not None and score == "itm":  # the column holds ITM's threshold
            thresholds["itm"], source = column_threshold, f"the {schema.THRESHOLD} column of {capfilt_out}"
    threshold = thresholds[score]
    if threshold is None:
        raise ConfigError("run.filter.threshold is null: the audit reports the filter at a threshold; give one")
    extra = mismatched_captions(human_dir, cfg)
    scored = score_human(cfg.run.filter.model, human_dir, cfg, captioner_dir, generate=captioner_dir is not None,
                         extra=extra)
    by_filter = scored.scores[score]
    rows = [i for i, given in enumerate(by_filter.given) if given]
    if len(rows) < 2:
        raise ValueError(f"{human_dir}: {len(rows)} held-out pair(s) scored; the audit needs at least 2")
    clean = by_filter.own[rows]
    mismatch = np.asarray([by_filter.given[i][0] for i in rows], np.float32)
    out: dict[str, Any] = {"inputs": {"filter": str(filter_dir), "human": str(human_dir),
                                      "captioner": str(captioner_dir) if captioner_dir else None,
                                      "capfilt_out": str(capfilt_out) if capfilt_out else None},
                           "rows": {"read": scored.read, "scored": len(rows)},
                           "filter_score": schema.score_columns(score)[0],
                           "threshold": float(threshold), "threshold_source": source}
    out |= filter_audit(clean, mismatch, threshold, cfg.audit.target_keep_rate, web)
    # Each named scorer on the same pairs, its clean and mismatched scores from the same filter call.
    out["scorers"] = {s.name: {"model": s.model} | scorer_audit(scored.scores[s.name].own[rows],
                                                               [scored.scores[s.name].given[i][0] for i in rows],
                                                               thresholds[s.name], cfg.audit.target_keep_rate)
                      for s in cfg.run.scorers}
    warnings = []
    if captioner_dir is not None:
        out["captioner"] = captioner_audit([scored.captions[i] for i in rows], clean,
                                           [scored.synthetic[i] for i in rows],
                                           [by_filter.synthetic[i] for i in rows], threshold,
                                           [scored.keys[i] for i in rows],
                                           [extra[scored.keys[i]][0] for i in rows],
                                           "P(match)" if score == "itm" else f"score ({out['filter_score']})")
        if score == "itm":
            out["synthetic_decision"] = synthetic_decision(out["captioner"])
        else:  # its margin is in ITM P(match), which a CLIP cosine or a SigLIP probability is not
            out["not_applicable"] = {"synthetic_decision": (
                f"run.filter.keep=auto decides by a BLIP filter's ITM P(match) (score gap margin {MARGIN:g}); "
                f"{filter_dir} scores {out['filter_score']}")}
        # keep=auto acts on the decision (the bootstrap logs it); otherwise a low score is worth a warning
        if out["captioner"]["warning"] and (cfg.run.filter.keep != "auto" or "synthetic_decision" not in out):
            warnings.append(out["captioner"]["warning"])
    out["warnings"] = warnings  # the callers print them: `capfilt audit` and the bootstrap's log
    return out


def with_web(result: dict[str, Any], cfg: Config, capfilt_out: str | Path) -> dict[str, Any]:
    """`result` (an audit made before the CapFilt run, at its threshold) with the run's web scores
    added: the noise share, precision and fit check, from the held-out scores as stored."""
    from capfilt.report import run_scores

    web, _, _ = run_scores(Path(capfilt_out))
    scores = result["scores"]
    out = {**result, "inputs": {**result["inputs"], "capfilt_out": str(capfilt_out)}}
    out |= filter_audit(np.asarray(scores["clean"]), np.asarray(scores["mismatch"]), result["threshold"],
                        cfg.audit.target_keep_rate, web)
    return out
