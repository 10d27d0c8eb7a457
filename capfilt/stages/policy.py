"""Stage 5: the keep policy, a cheap CPU step that turns scores into decisions and routes rows.

A text is kept when its ITM P(match) is at least `run.filter.threshold` and the policy allows its
kind (`both`, `web` only, `synthetic` only). `texts` lists the kept texts in order (web caption
first, exact duplicates dropped): the training targets. A row goes to `data` with at least one
kept text, to `rejected` with none, to `failed` when any stage recorded an error (the writer
routes them: `capfilt.commit.route`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from capfilt import schema
from capfilt.config import RunConfig


def _keep(score: float | None, text: str | None, threshold: float, allowed: bool) -> bool:
    return allowed and score is not None and isinstance(text, str) and bool(text.strip()) and score >= threshold


class KeepPolicy:
    """Fills `caption_keep`, `synthetic_keep`, `texts`, the provenance and the final `error`."""

    def __init__(self, cfg: RunConfig):
        self.threshold = cfg.filter.threshold
        self.keep = cfg.filter.keep
        self.text_column = cfg.columns.text
        self.provenance = {
            schema.ROUND: (cfg.round, pa.int32()),
            schema.CAPTIONER: (cfg.caption.model, pa.string()),
            schema.FILTER: (cfg.filter.model, pa.string()),
            schema.THRESHOLD: (cfg.filter.threshold, pa.float32()),
            schema.KEEP_POLICY: (cfg.filter.keep, pa.string()),
        }

    def decide(self, web: str | None, web_itm: float | None, synthetic: list[str],
               synthetic_itm: list[float]) -> tuple[bool, list[bool], list[str]]:
        """(caption_keep, synthetic_keep, texts) for one scored row."""
        caption_keep = _keep(web_itm, web, self.threshold, self.keep in ("both", "web"))
        synthetic_keep = [_keep(score, text, self.threshold, self.keep in ("both", "synthetic"))
                          for text, score in zip(synthetic, synthetic_itm)]
        candidates = ([web] if caption_keep else []) + [t for t, k in zip(synthetic, synthetic_keep) if k]
        texts = list(dict.fromkeys(t.strip() for t in candidates))
        return caption_keep, synthetic_keep, texts

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        # The first recorded error wins: download/decode, then captioner, then filter.
        error = batch[schema.ERROR]
        for name in (schema.CAPTION_ERROR, schema.FILTER_ERROR):
            if name in batch.column_names:
                error = pc.coalesce(error, batch[name])
        errors = error.to_pylist()
        web = batch[self.text_column].to_pylist()
        web_itm = batch[schema.CAPTION_ITM].to_pylist()
        synthetic = batch[schema.SYNTHETIC].to_pylist()
        synthetic_itm = batch[schema.SYNTHETIC_ITM].to_pylist()
        caption_keep, synthetic_keep, texts = [], [], []
        for i in range(n):
            if errors[i] is not None:
                decision = (None, None, None)
            else:
                decision = self.decide(web[i], web_itm[i], synthetic[i], synthetic_itm[i])
            for column, value in zip((caption_keep, synthetic_keep, texts), decision):
                column.append(value)

        # `_shard` and `_row` travel on to the writer; the pixels and per-stage errors end here.
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

