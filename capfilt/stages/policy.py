"""Stage 5: the keep policy, a cheap CPU step that turns scores into decisions and routes rows.

A text passes when its ITM P(match) is at least `run.filter.threshold` (unless that is null, as
it is without a BLIP filter), its score of every named scorer with a threshold (`run.scorers`) is
at least that threshold, the policy allows its kind (`both`, `web` only, `synthetic` only) and
BLIP's cleaning leaves words of it. Every passing text is kept, except that with
`run.filter.top_k_synthetic` = k > 0 only the k best synthetic captions are, by
`run.filter.rank_synthetic_by` (`itm`, `itc` or a scorer's name; see `top_k`). `texts` lists the
kept texts in order (web caption first, exact duplicates dropped): the training targets. A row
goes to `data` with at least one kept text, to `rejected` with none, to `failed` when any stage
recorded an error (the commit routes them: `capfilt.commit.route`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from capfilt import schema
from capfilt.config import RunConfig
from capfilt.model.text import has_words


def _keep(text: str | None, allowed: bool, max_tokens: int) -> bool:
    return allowed and isinstance(text, str) and has_words(text, max_tokens)


def _passes(scores: list[float | None], thresholds: list[float]) -> bool:
    """Every thresholded scorer's score (a null one fails) is at least its threshold."""
    return all(score is not None and score >= threshold for score, threshold in zip(scores, thresholds))


def rank_columns(cfg: RunConfig) -> dict[str, str]:
    """What run.filter.rank_synthetic_by may name -> the column of synthetic scores it ranks by."""
    named = {s.name: schema.synthetic_score_column(s.name) for s in cfg.scorers}
    return {"itm": schema.SYNTHETIC_ITM, "itc": schema.SYNTHETIC_ITC, **named}


def top_k(texts: list[str], passing: list[bool], rank: list[float], k: int, taken: set[str]) -> list[bool]:
    """Which of the passing `texts` to keep: the k best by `rank` (ties: the earlier caption).

    A text equal (after strip) to one already kept, the web caption in `taken` or a better-ranked
    caption, is passed over, so k counts distinct new texts.
    """
    order = sorted((i for i, ok in enumerate(passing) if ok), key=lambda i: -rank[i])  # stable sort
    chosen = [False] * len(texts)
    taken, kept = set(taken), 0
    for i in order:
        text = texts[i].strip()
        if kept < k and text not in taken:
            taken.add(text)
            chosen[i] = True
            kept += 1
    return chosen


class KeepPolicy:
    """Fills `caption_keep`, `synthetic_keep`, `texts`, the provenance and the final `error`."""

    def __init__(self, cfg: RunConfig):
        self.keep = cfg.filter.keep
        self.max_tokens = cfg.filter.max_text_tokens
        self.top_k = cfg.filter.top_k_synthetic
        ranks = rank_columns(cfg)
        if cfg.filter.rank_synthetic_by not in ranks:
            raise ValueError(f"run.filter.rank_synthetic_by: {cfg.filter.rank_synthetic_by!r} is not one of "
                             f"{sorted(ranks)} (itm, itc or a run.scorers name)")
        self.rank_column = ranks[cfg.filter.rank_synthetic_by]
        # Every score with a threshold: (web score column, synthetic scores column, threshold); the
        # BLIP filter's ITM first (none with a null run.filter.threshold), then the named scorers'.
        threshold = cfg.filter.threshold
        itm = [(schema.CAPTION_ITM, schema.SYNTHETIC_ITM, threshold)] if threshold is not None else []
        self.gates = itm + [(schema.score_column(s.name), schema.synthetic_score_column(s.name), s.threshold)
                             for s in cfg.scorers if s.threshold is not None]
        self.text_column = cfg.columns.text
        self.provenance = {
            schema.ROUND: (cfg.round, pa.int32()),
            schema.CAPTIONER: (cfg.caption.model, pa.string()),
            schema.FILTER: (cfg.filter.model, pa.string()),
            schema.THRESHOLD: (cfg.filter.threshold, pa.float32()),  # null: no ITM threshold
            schema.KEEP_POLICY: (cfg.filter.keep, pa.string()),
        }

    def decide(self, web: str | None, synthetic: list[str], synthetic_rank: list[float], web_gates: tuple,
               synthetic_gates: tuple) -> tuple[bool, list[bool], list[str]]:
        """(caption_keep, synthetic_keep, texts) for one scored row; `synthetic_rank` orders top_k;
        `web_gates` / `synthetic_gates`: the web caption's / each synthetic caption's scores of the
        thresholded scores (`self.gates`' order; a null list: every caption unscored)."""
        thresholds = [threshold for _, _, threshold in self.gates]
        caption_keep = (_keep(web, self.keep in ("both", "web"), self.max_tokens)
                        and _passes(list(web_gates), thresholds))
        synthetic_keep = [_keep(text, self.keep in ("both", "synthetic"), self.max_tokens)
                          and _passes([None if gate is None else gate[j] for gate in synthetic_gates], thresholds)
                          for j, text in enumerate(synthetic)]
        if self.top_k:
            synthetic_keep = top_k(synthetic, synthetic_keep, synthetic_rank, self.top_k,
                                   {web.strip()} if caption_keep else set())
        candidates = ([web] if caption_keep else []) + [t for t, k in zip(synthetic, synthetic_keep) if k]
        texts = list(dict.fromkeys(t.strip() for t in candidates))
        return caption_keep, synthetic_keep, texts

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        # The first recorded error wins: download/input, decode, then captioner, then filter.
        error = batch[schema.ERROR]
        for name in (schema.DECODE_ERROR, schema.CAPTION_ERROR, schema.FILTER_ERROR):
            if name in batch.column_names:
                error = pc.coalesce(error, batch[name])
        errors = error.to_pylist()
        web = batch[self.text_column].to_pylist()
        synthetic = batch[schema.SYNTHETIC].to_pylist()
        synthetic_rank = batch[self.rank_column].to_pylist()
        web_gates = [batch[column].to_pylist() for column, _, _ in self.gates]
        synthetic_gates = [batch[column].to_pylist() for _, column, _ in self.gates]
        caption_keep, synthetic_keep, texts = [], [], []
        for i in range(n):
            if errors[i] is not None:
                decision = (None, None, None)
            else:
                decision = self.decide(web[i], synthetic[i], synthetic_rank[i], tuple(g[i] for g in web_gates),
                                       tuple(g[i] for g in synthetic_gates))
            for column, value in zip((caption_keep, synthetic_keep, texts), decision):
                column.append(value)

        # `_shard` and `_row` travel on to the writer; the per-stage errors end here.
        batch = batch.drop_columns([c for c in (schema.ERROR, *schema.TRANSIENT)
                                    if c in batch.column_names and c not in (schema.SHARD, schema.ROW)])
        added = {
            schema.CAPTION_KEEP: pa.array(caption_keep, pa.bool_()),
            schema.SYNTHETIC_KEEP: pa.array(synthetic_keep, pa.list_(pa.bool_())),
            schema.TEXTS: pa.array(texts, pa.list_(pa.string())),
            schema.ERROR: pa.array(errors, pa.string()),
        }
        for name, (value, arrow_type) in self.provenance.items():
            added[name] = pa.array([value] * n, arrow_type)
        for name, array in added.items():
            batch = batch.append_column(name, array)
        return batch

