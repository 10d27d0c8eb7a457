"""BLIP's scoring, in one place: task-token ids, inference device, text preparation, ITM and ITC.

Everything that scores an image-text pair goes through here: the pipeline's filter stage,
threshold calibration, `capfilt eval`, dedup's image features, and MED's ITM loss. The functions
take the modules themselves (`Towers`), so a transformers `BlipForImageTextRetrieval` and our MED
score with the same code.

- ITM P(match): the text encoder with cross-attention to the image, first token `[ENC]` (BLIP's
  blip_retrieval.py fine-tuned ITM that way), itm_head on the first token, softmax class 1; the
  softmax runs in fp32 whatever the model's dtype.
- ITC cosine: the unimodal text encoder ([CLS] first, no image) -> text_proj on token 0, against
  vision_proj on the image's token 0, both L2-normalised in fp32; what
  `BlipForImageTextRetrieval(use_itm_head=False)` computes.
Each image goes through the vision tower once; its N texts refer to it by an `owner` index.
Inference scores (`score`, `itm_match`, `text_features`) run the text encoder through
`text_pass.TextPass`: ITM and ITC rows in one pass, each image's cross-attention K/V projected
once for all of its texts, texts bucketed by length; equal to the stock forward
(`unimodal_states`, `grounded_state`, which MED's training losses use) up to summation order.

The published Salesforce transformers folders carry the plain bert-base-uncased tokenizer (30522
tokens, no `[DEC]`/`[ENC]`) while their text embedding has 30524 rows; `special_token_ids` gives
BLIP's ids for them instead of falling back to `[CLS]`, which scores every pair differently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .text import scoring_text
from .text_pass import BUCKET_TOKENS, TextPass
from .transfer import upload
from .tokenizer import DEC_TOKEN, ENC_TOKEN

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def special_token_ids(tokenizer: Any, text_config: Any) -> tuple[int, int]:
    """(`[DEC]` id, `[ENC]` id) for a BLIP text model and its tokenizer; logged with the reason.

    1. The tokenizer's own `[DEC]` and `[ENC]` (our exports, BLIP's init_tokenizer).
    2. Else, when the text embedding has exactly two rows more than the tokenizer and the
       config's bos_token_id is the first of them (the published folders: 30522 + 2 = 30524,
       bos 30522): BLIP's ids, `[DEC]` = bos_token_id and `[ENC]` = bos_token_id + 1.
    3. Else `[CLS]` for both, the only first token such a model can have been trained with.
    """
    vocab = tokenizer.get_vocab()
    size = len(tokenizer)
    bos = getattr(text_config, "bos_token_id", None)
    # The ordinary case logs at DEBUG: it repeated on the console once per model load and says
    # nothing a user must check; the two inferred cases below stay at INFO.
    level = logging.INFO
    if DEC_TOKEN in vocab and ENC_TOKEN in vocab:
        ids, why = (vocab[DEC_TOKEN], vocab[ENC_TOKEN]), "the tokenizer's own tokens"
        level = logging.DEBUG
    elif text_config.vocab_size == size + 2 and bos == size:
        ids = (bos, bos + 1)
        why = (f"BLIP's ids: the tokenizer ({size} tokens) lacks them and the text embedding has "
               f"{text_config.vocab_size} rows = tokenizer + 2, bos_token_id {bos}")
    else:
        ids = (tokenizer.cls_token_id, tokenizer.cls_token_id)
        why = (f"[CLS]: the tokenizer ({size} tokens) lacks [DEC]/[ENC] and the text embedding "
               f"({text_config.vocab_size} rows, bos_token_id {bos}) is not BLIP's tokenizer + 2")
    log.log(level, "%s = %d, %s = %d (%s)", DEC_TOKEN, ids[0], ENC_TOKEN, ids[1], why)
    return ids


def pick_device(dtype: str = "auto", device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where and in what precision a model runs inference.

    `device` "auto": CUDA when this process sees a GPU (Ray hides GPUs from actors it gave none),
    else CPU; anything else is a torch device name ("cpu", "cuda:1"). `dtype` "auto": bf16 on CUDA
    (BLIP runs fine in bf16, twice the throughput), fp32 elsewhere (bf16 matmuls are slow on most
    CPUs); or "float32" / "bfloat16".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.device(device)
    if dtype == "auto":
        return where, torch.bfloat16 if where.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {['auto', *DTYPES]}")
    return where, DTYPES[dtype]


@dataclass(frozen=True)
class Towers:
    """The modules BLIP scores with; `Towers.of(model)` for a BlipForImageTextRetrieval or a MED."""

    vision: nn.Module  # BlipVisionModel
    text_encoder: nn.Module  # BlipTextModel with cross-attention layers
    vision_proj: nn.Module  # vision width -> ITC embedding
    text_proj: nn.Module  # text width -> ITC embedding
    itm_head: nn.Module  # text width -> 2 (no match, match)

    @classmethod
    def of(cls, model: nn.Module) -> Towers:
        vision = model.vision_model if hasattr(model, "vision_model") else model.vision  # transformers | MED
        return cls(vision, model.text_encoder, model.vision_proj, model.text_proj, model.itm_head)


def tokenize(tokenizer: Any, texts: list[str], max_tokens: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as BLIP scores them (`scoring_text`: cut, cleaned) -> ([N, T] ids, [CLS] first; [N, T] mask)."""
    tokens = tokenizer([scoring_text(t, max_tokens) for t in texts], padding="longest", truncation=True,
                       max_length=max_tokens, return_tensors="pt")
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)


def unimodal_states(text_encoder: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unimodal text encoder: bidirectional, no image; `input_ids` [N, T] start with [CLS]. -> [N, T, H]"""
    return text_encoder(input_ids=input_ids, attention_mask=mask, is_decoder=False).last_hidden_state


def grounded_state(text_encoder: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                   image_embeds: torch.Tensor, enc_token_id: int) -> torch.Tensor:
    """Image-grounded text encoder on `[ENC] text` against image_embeds [N, P, D]. -> first token [N, H]"""
    enc_ids = input_ids.clone()
    enc_ids[:, 0] = enc_token_id  # [N, T]
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)  # [N, P]
    out = text_encoder(input_ids=enc_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                       encoder_attention_mask=image_mask, is_decoder=False)
    return out.last_hidden_state[:, 0, :]  # [N, H]


@torch.no_grad()
def image_side(towers: Towers, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [B, 3, S, S] -> (ITM image embeddings [B, P, D], normalised fp32 ITC features [B, E])."""
    embeds = towers.vision(pixel_values=pixels).last_hidden_state  # [B, P, D]
    feats = F.normalize(towers.vision_proj(embeds[:, 0, :]).float(), dim=-1)  # [B, E]
    return embeds, feats


@torch.no_grad()
def text_features(towers: Towers, input_ids: torch.Tensor, mask: torch.Tensor,
                  bucket_tokens: int = BUCKET_TOKENS) -> torch.Tensor:
    """Normalised fp32 ITC text features [N, E] ([CLS]-first ids, as `tokenize` gives them)."""
    first, _ = TextPass(towers.text_encoder).first_states(input_ids, mask, bucket_tokens=bucket_tokens)  # [N, H]
    return _itc_features(towers, first)


@torch.no_grad()
def itm_match(towers: Towers, image_embeds: torch.Tensor, owner: Sequence[int] | torch.Tensor,
              input_ids: torch.Tensor, mask: torch.Tensor, enc_token_id: int,
              bucket_tokens: int = BUCKET_TOKENS) -> torch.Tensor:
    """ITM P(match) [N] of text n against image owner[n] (image_embeds [B, P, D], owner [N])."""
    _, state = TextPass(towers.text_encoder).first_states(
        input_ids, mask, unimodal=False, image_embeds=image_embeds, owner=owner, enc_token_id=enc_token_id,
        bucket_tokens=bucket_tokens)  # [N, H]
    return _itm_probability(towers, state)


@torch.no_grad()
def score(towers: Towers, pixels: torch.Tensor, owner: Sequence[int] | torch.Tensor, input_ids: torch.Tensor,
          mask: torch.Tensor, enc_token_id: int,
          bucket_tokens: int = BUCKET_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """B images, N texts (text n belongs to image owner[n]) -> (ITM P(match) [N], ITC cosine [N]), fp32.

    One pass over the text encoder for both scores (`text_pass`): each image's cross-attention
    K/V projected once for all of its texts, texts bucketed by `bucket_tokens`.
    """
    image_embeds, image_feat = image_side(towers, pixels)  # [B, P, D], [B, E]
    owner = owner.tolist() if isinstance(owner, torch.Tensor) else list(owner)  # host ints, [N]
    unimodal, grounded = TextPass(towers.text_encoder).first_states(
        input_ids, mask, image_embeds=image_embeds, owner=owner, enc_token_id=enc_token_id,
        bucket_tokens=bucket_tokens)  # [N, H] each
    per_text = image_feat.index_select(0, upload(torch.tensor(owner, dtype=torch.long), image_feat.device))  # [N, E]
    return _itm_probability(towers, grounded), (per_text * _itc_features(towers, unimodal)).sum(dim=-1)  # [N], [N]


def _itc_features(towers: Towers, first: torch.Tensor) -> torch.Tensor:
    """Unimodal first-token states [N, H] -> normalised fp32 ITC text features [N, E]."""
    return F.normalize(towers.text_proj(first).float(), dim=-1)


def _itm_probability(towers: Towers, grounded: torch.Tensor) -> torch.Tensor:
    """Grounded first-token states [N, H] -> P(match) [N], the softmax in fp32."""
    return towers.itm_head(grounded).float().softmax(dim=-1)[:, 1]
