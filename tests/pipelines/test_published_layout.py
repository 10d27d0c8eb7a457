"""`capfilt run` on models laid out as the published Salesforce folders (no [ENC] in the tokenizer).

The filter's `caption_itm` must be BLIP's ITM, `[ENC]` = 30523 first, as plain transformers computes
it, not the `[CLS]`-first score the tokenizer alone would lead to; calibration on the same rows gives
the same numbers; `run.filter.top_k_synthetic` keeps the best synthetic caption.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from capfilt import schema
from capfilt.calibrate import human_match_scores
from capfilt.cli import app
from capfilt.config import load_config
from capfilt.model.text import RETRIEVAL_MAX_WORDS, pre_caption
from tests.pipelines.test_run import RESOURCES
from tests.tiny_blip import shard_rows, write_shard

THRESHOLD = 0.5
SETTINGS = [*RESOURCES, "run.caption.num_captions=3", f"run.filter.threshold={THRESHOLD}",
            "run.filter.top_k_synthetic=1"]


@pytest.fixture(scope="module")
def published_run(ray_local, published_blip_dirs, tmp_path_factory) -> dict:
    """One shard of 10 rows (1 corrupt image, 1 failed download), some captions with BLIP punctuation."""
    root = tmp_path_factory.mktemp("published-run")
    rows = shard_rows("p", 10, failed=1, corrupt=1, seed=7)
    rows[0]["caption"] = "A Photo: of (thing) ZERO!!"
    rows[3]["caption"] = 'the "third" photo; of a thing ~ really'
    write_shard(root / "in" / "00000.parquet", rows)
    out = root / "out"
    args = ["run", "--input", str(root / "in"), "--captioner", str(published_blip_dirs["captioner"]),
            "--filter", str(published_blip_dirs["filter"]), "--out", str(out)]
    for item in SETTINGS:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    scored = pa.concat_tables([pq.read_table(out / d / "00000.parquet") for d in (schema.DATA, schema.REJECTED)])
    return {"inputs": root / "in", "rows": scored.to_pylist()}


def plain_transformers_itm(filter_dir, rows: list[dict], first_id: int) -> np.ndarray:
    """BlipForImageTextRetrieval forward on BlipProcessor inputs, input_ids[:, 0] = first_id, softmax class 1."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    model = BlipForImageTextRetrieval.from_pretrained(filter_dir, use_safetensors=True).eval()
    processor = BlipProcessor.from_pretrained(filter_dir)
    scores = []
    for row in rows:
        image = Image.open(io.BytesIO(row["jpg"])).convert("RGB")
        inputs = processor(images=image, text=pre_caption(row["caption"], RETRIEVAL_MAX_WORDS), truncation=True,
                           max_length=35, return_tensors="pt")
        inputs["input_ids"][:, 0] = first_id
        with torch.no_grad():
            scores.append(model(**inputs).itm_score.softmax(-1)[0, 1].item())
    return np.asarray(scores)


def test_caption_itm_is_blip_itm_with_enc_first(published_run, published_blip_dirs):
    rows = published_run["rows"]
    assert len(rows) == 8  # every row with a usable image was scored
    written = np.asarray([row[schema.CAPTION_ITM] for row in rows])
    enc = plain_transformers_itm(published_blip_dirs["filter"], rows, 30523)
    cls = plain_transformers_itm(published_blip_dirs["filter"], rows, 101)
    enc_gap, cls_gap = np.abs(written - enc).max(), np.abs(written - cls).max()
    print(f"published layout: max |caption_itm - ITM([ENC]=30523)| = {enc_gap:.2e}, "
          f"max |caption_itm - ITM([CLS])| = {cls_gap:.4f}")
    assert enc_gap < 1e-3
    assert cls_gap > 1e-2


def test_calibration_scores_are_the_runs_caption_itm(published_run, published_blip_dirs):
    cfg = load_config(None, SETTINGS)
    keys, scores = human_match_scores(published_blip_dirs["filter"], published_run["inputs"], cfg)
    written = {row["key"]: row[schema.CAPTION_ITM] for row in published_run["rows"]}
    assert sorted(keys) == sorted(written)
    # The same function on the same texts; the run's batches pad to their own longest text, so
    # SDPA sums in another order (fp32 noise of a few 1e-6 here, up to ~2e-5 on other CPUs;
    # [CLS] instead of [ENC] moves scores by ~0.04).
    np.testing.assert_allclose(scores, [written[k] for k in keys], rtol=0, atol=1e-4)


def test_top_k_keeps_the_best_passing_synthetic_caption(published_run):
    rows = published_run["rows"]
    for row in rows:
        itm = row[schema.SYNTHETIC_ITM]
        passing = [i for i, score in enumerate(itm) if score >= THRESHOLD]
        best = max(passing, key=lambda i: (itm[i], -i)) if passing else None  # ties: the earlier caption
        assert row[schema.SYNTHETIC_KEEP] == [i == best for i in range(len(itm))], row["key"]
    assert sum(len([s for s in row[schema.SYNTHETIC_ITM] if s >= THRESHOLD]) > 1 for row in rows) > 0  # k bit
