"""The named scorers of `run.scorers`, one interface over every family the filter stage runs.

A scorer gives one float per text for each image's texts: `score(images, rows, texts)` with the
block's `DecodedImages`, the rows to score and each row's texts. Two kinds, picked from the
folder's config.json (`capfilt.model.families`):

- `PictureScorer`: CLIP cosine or SigLIP/SigLIP2 probability (`capfilt.model.scorers`), on the
  decoded pictures at their own shape (its processor resizes them), in fp32;
- `BlipScorer`: a BLIP retrieval folder's ITM P(match) or ITC cosine, exactly as the filter
  computes its `caption_itm` / `caption_itc` (`blip_scores`: the same text preparation,
  `run.filter.max_text_tokens` and `bucket_tokens`, the same dtype), on the block's pixels at the
  folder's side.

`sides` are the square sides a scorer needs the block decoded at; `keep_rgb` whether it needs the
decoded pictures as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capfilt.config import FilterConfig, ScorerConfig
from capfilt.embed import Blip, load_filter
from capfilt.images import DecodedImages
from capfilt.model import blip_ops
from capfilt.model.families import detect
from capfilt.model.scorers import ContrastiveScorer


def nest(flat: list[float], texts: list[list[str]]) -> list[list[float]]:
    """`flat` scores cut into `texts`' nesting."""
    out, start = [], 0
    for group in texts:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


@torch.no_grad()
def blip_scores(blip: Blip, pixels: torch.Tensor, texts: list[list[str]],
                cfg: FilterConfig) -> tuple[list[list[float]], list[list[float]]]:
    """Normalised [B, 3, S, S] images (`DecodedImages.tensor`) and each image's texts -> (ITM
    P(match), ITC cosine) per text, texts cut at `cfg.max_text_tokens`, run by `cfg.bucket_tokens`."""
    flat = [text for group in texts for text in group]
    if not flat:
        return [[] for _ in texts], [[] for _ in texts]
    owner = [i for i, group in enumerate(texts) for _ in group]  # [N] host ints: text n's image
    # On the host: the text pass plans its length buckets from the mask without a device sync.
    ids, mask = blip_ops.tokenize(blip.tokenizer, flat, cfg.max_text_tokens)  # [N, T]
    itm, itc = blip_ops.score(blip.towers, pixels, owner, ids, mask, blip.enc_token_id, cfg.bucket_tokens)  # [N]
    return nest(itm.cpu().tolist(), texts), nest(itc.cpu().tolist(), texts)


class PictureScorer:
    """A CLIP or SigLIP folder: scores the decoded pictures as they are."""

    sides: frozenset[int] = frozenset()  # its processor resizes the pictures itself
    keep_rgb = True

    def __init__(self, folder: str | Path, device: torch.device):
        self.model = ContrastiveScorer(folder, device)  # fp32: scores are stored and compared as computed

    def score(self, images: DecodedImages, rows: list[int], texts: list[list[str]]) -> list[list[float]]:
        return self.model.score(images.pictures(rows), texts)


class BlipScorer:
    """One of a BLIP retrieval folder's two scores: `use_itc` picks ITC's cosine over ITM's P(match)."""

    keep_rgb = False

    def __init__(self, blip: Blip, use_itc: bool, cfg: FilterConfig):
        self.blip, self.use_itc, self.cfg = blip, use_itc, cfg
        self.sides = frozenset({blip.spec.size})

    def score(self, images: DecodedImages, rows: list[int], texts: list[list[str]]) -> list[list[float]]:
        blip = self.blip
        return blip_scores(blip, images.tensor(rows, blip.spec, blip.device, blip.dtype), texts, self.cfg)[self.use_itc]


def load_scorer(scorer: ScorerConfig, folder: str | Path, cfg: FilterConfig, device: torch.device,
                dtype: torch.dtype) -> PictureScorer | BlipScorer:
    """`scorer`'s model from its local `folder`: a BLIP retrieval folder in the filter's `dtype` (so
    its ITM equals the filter's on the same folder), a CLIP or SigLIP one in fp32."""
    if detect(folder).kind == "blip-itm":
        return BlipScorer(load_filter(folder, device, dtype), scorer.kind == "itc", cfg)
    return PictureScorer(folder, device)
