"""A filter threshold read off known-clean pairs, for filters whose P(match) is under-confident.

BLIP's filter drops a text when ITM says "unmatched" (P(match) < 0.5). A filter fine-tuned
briefly, with ITM's 1 positive : 2 negatives training mix, can rank captions well and still put
every P(match) below 0.5, and then keeps nothing. The human-annotated pairs are clean by
definition, so the q-quantile of the filter's P(match) over them is the threshold that keeps a
share 1 - q of clean captions. They are also the filter's fine-tuning data, so their scores run
high and the threshold errs toward strict. No test or truth data is involved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capfilt.config import Config
from capfilt.embed import image_features, itm_match, load_filter, resolve_device, tokenize
from capfilt.evaluate import read_split
from capfilt.images import ImageError, decode_image


def human_match_scores(filter_dir: str | Path, human_dir: str | Path, cfg: Config) -> np.ndarray:
    """ITM P(match) of every human pair with an image, scored as the CapFilt pipeline scores."""
    blip = load_filter(filter_dir, resolve_device(cfg.eval.device))
    split = read_split(human_dir, cfg.run.columns)
    pairs: list[tuple[Image.Image, str]] = []
    for data, caption in zip(split.images, split.captions):
        try:
            pairs.append((decode_image(data, cfg.run.image), caption))
        except ImageError:  # the pipeline would not score it either
            continue
    scores = []
    step = cfg.eval.batch_size
    for start in range(0, len(pairs), step):
        images, captions = zip(*pairs[start:start + step])
        embeds, _ = image_features(blip, list(images))  # [B, L, D]
        ids, mask = tokenize(blip, list(captions), cfg.eval.max_text_len)  # [B, T]
        scores.append(itm_match(blip, embeds, ids, mask).float().cpu())
    if not scores:
        raise ValueError(f"{human_dir}: no human pair with an image to calibrate the filter threshold on")
    return torch.cat(scores).numpy()


def threshold_from_human(filter_dir: str | Path, human_dir: str | Path, cfg: Config, quantile: float) -> float:
    """The `quantile` of the human pairs' P(match): a threshold keeping at least 1 - quantile of them."""
    # "lower": an actual score at or below the quantile, so the kept share is never short of 1 - q.
    return float(np.quantile(human_match_scores(filter_dir, human_dir, cfg), quantile, method="lower"))
