"""BLIP's MED (Multimodal mixture of Encoder-Decoder) with its three pre-training losses.

One vision transformer and one text transformer used three ways (BLIP, Li et al. 2022):

- unimodal text encoder: `[CLS] text`, bidirectional, no cross-attention -> ITC features;
- image-grounded text encoder: `[ENC] text`, bidirectional, cross-attends to the image -> ITM head;
- image-grounded text decoder: `[DEC] text`, causal, cross-attends to the image -> LM head.

All three are real transformers modules: `BlipVisionModel`, `BlipTextModel` (built with
`is_decoder=True` only so that its layers own cross-attention; it runs bidirectionally because
its forward gets `is_decoder=False`, and text-only because cross-attention is skipped when
`encoder_hidden_states` is None) and `BlipTextLMHeadModel`. Encoder and decoder share every
text module except self-attention (BLIP's `tie_encoder_decoder_weights(..., '/attention')`):
the decoder's embeddings, cross-attention, feed-forward and their layer norms ARE the encoder's
module objects, so one optimiser step moves both.

ITM uses `[ENC]` as the first token, as the original BLIP does. The stock transformers
`BlipForImageTextRetrieval` feeds whatever first token it is given (`[CLS]` from its
processor), so callers of an exported filter must put `[ENC]` first themselves for ITM and
keep `[CLS]` for ITC (`use_itm_head=False`); `blip_ops` does both, for MED and for exported
or published filters alike.

Losses follow BLIP's retrieval variant (`blip_retrieval.py`): ITC targets come from sample ids
(rows with equal `idx` are positives, so an image with several captions is not pushed away
from its own captions), with momentum distillation against a queue of momentum features.
ITM hard negatives are drawn from the current process's batch only (BLIP gathers them across
ranks; the queue and ITC targets are gathered here, the negatives are not).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from . import blip_ops
from .image_norm import IMAGE_MEAN, IMAGE_STD
from .tokenizer import VOCAB_SIZE
from .weights import safe_weights


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class MEDConfig:
    size: str = "tiny"  # preset name, kept for records only; presets come from med_config(name)
    # --- vision transformer
    image_size: int = 64  # input side in pixels (BLIP pretrains at 224, fine-tunes at 384)
    patch_size: int = 8  # ViT patch side (16 for BLIP's ViT-B/16 and ViT-L/16)
    vision_hidden: int = 192  # ViT width (768 base, 1024 large)
    vision_layers: int = 3  # ViT depth (12 base, 24 large)
    vision_heads: int = 3  # ViT attention heads (12 base, 16 large)
    vision_mlp: int = 768  # ViT MLP width (4 x hidden)
    vision_ln_eps: float = 1e-6  # ViT layer-norm epsilon: BLIP's (timm) ViT; transformers' BLIP config says 1e-5
    # --- text transformer (BERT)
    text_hidden: int = 128  # BERT width (768 for BLIP base and large)
    text_layers: int = 3  # BERT depth (12)
    text_heads: int = 4  # BERT attention heads (12)
    text_intermediate: int = 512  # BERT feed-forward width (3072)
    text_max_positions: int = 512  # BERT position table (512, as bert-base)
    text_dropout: float = 0.1  # BERT hidden and attention dropout (BLIP's med_config uses 0.1)
    vocab_size: int = VOCAB_SIZE  # bert-base-uncased + [DEC] + [ENC]
    # --- contrastive head and momentum distillation (BLIP's constants)
    embed_dim: int = 128  # ITC feature size (256 in BLIP)
    queue_size: int = 1024  # momentum feature queue length (57600 in BLIP)
    momentum: float = 0.995  # EMA factor for the momentum encoders
    temp: float = 0.07  # initial ITC temperature (learnable)
    temp_min: float = 0.001  # temperature is clamped to [temp_min, temp_max] every step
    temp_max: float = 0.5
    alpha: float = 0.4  # full distillation weight; the trainer ramps up to it and passes `alpha`
    label_smoothing: float = 0.1  # LM loss label smoothing, as BLIP's decoder
    # --- images
    image_mean: tuple[float, float, float] = IMAGE_MEAN  # CLIP mean, as BLIP
    image_std: tuple[float, float, float] = IMAGE_STD  # CLIP std, as BLIP
    # --- token ids (those of model.tokenizer.build_tokenizer)
    pad_token_id: int = 0  # [PAD]
    cls_token_id: int = 101  # [CLS]: unimodal encoder's first token
    sep_token_id: int = 102  # [SEP]: end of text; the decoder's eos
    dec_token_id: int = 30522  # [DEC]: decoder's first token (bos)
    enc_token_id: int = 30523  # [ENC]: image-grounded encoder's first token


_PRESETS: dict[str, dict] = {
    # Trains on the demo world on 2 CPU cores in minutes.
    "tiny": {},
    # tiny's vision + a text transformer shaped like the packaged MiniLM BERT (first 3 of its 6
    # layers), so `model.bert_init` can start it pre-trained as BLIP starts from BERT.
    "small": dict(text_hidden=384, text_layers=3, text_heads=12, text_intermediate=1536),
    # BLIP-base: ViT-B/16 + BERT-base, pre-trained at 224 px (override image_size=384 to fine-tune).
    "base": dict(image_size=224, patch_size=16, vision_hidden=768, vision_layers=12, vision_heads=12,
                 vision_mlp=3072, text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
                 embed_dim=256, queue_size=57600),
    # BLIP-large: ViT-L/16 + BERT-base.
    "large": dict(image_size=224, patch_size=16, vision_hidden=1024, vision_layers=24, vision_heads=16,
                  vision_mlp=4096, text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
                  embed_dim=256, queue_size=57600),
}


def med_config(name: str, **overrides) -> MEDConfig:
    """A preset ("tiny" | "small" | "base" | "large") with field overrides; unknown fields are refused by name."""
    if name not in _PRESETS:
        raise ValueError(f"unknown MED size {name!r}; choose one of {sorted(_PRESETS)}")
    known = {f.name for f in dataclasses.fields(MEDConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown MEDConfig field {unknown[0]!r}")
    return MEDConfig(**{**_PRESETS[name], "size": name, **overrides})


def config_from_dict(data: dict) -> MEDConfig:
    """Inverse of dataclasses.asdict (JSON turns tuples into lists); unknown keys are refused."""
    known = {f.name for f in dataclasses.fields(MEDConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown MEDConfig field {unknown[0]!r} in {CONFIG_NAME}")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return MEDConfig(**data)


def vision_config(cfg: MEDConfig) -> BlipVisionConfig:
    """The transformers ViT config of `cfg`."""
    return BlipVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_mlp, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.vision_ln_eps,
        initializer_range=0.02,  # transformers' default (1e-10) suits loading weights, not training from scratch
    )


def text_config(cfg: MEDConfig, cross_attention: bool = True) -> BlipTextConfig:
    """BERT config; `cross_attention` makes transformers build the cross-attention blocks (is_decoder)."""
    return BlipTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, encoder_hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.text_max_positions,
        hidden_dropout_prob=cfg.text_dropout, attention_probs_dropout_prob=cfg.text_dropout,
        bos_token_id=cfg.dec_token_id, eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id,
        sep_token_id=cfg.sep_token_id, is_decoder=cross_attention, label_smoothing=cfg.label_smoothing,
        initializer_range=0.02,
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` over ranks along dim 0 (ranks may hold different row counts); identity on one process."""
    if not _distributed():
        return t
    world = dist.get_world_size()
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])


def lm_labels(decoder_ids: torch.Tensor, pad_token_id: int, prompt_len: int = 0) -> torch.Tensor:
    """LM targets for `[DEC] prompt text [SEP] [PAD]...`: padding and the prompt become -100.

    Position 0 ([DEC]) is never predicted (the loss is shifted by one); `prompt_len` more
    positions after it are context, not targets (BLIP's captioner fine-tuning prompt).
    """
    labels = decoder_ids.masked_fill(decoder_ids == pad_token_id, -100)  # [B, T]
    labels[:, : 1 + prompt_len] = -100
    return labels


def contrastive_targets(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """ITC targets [B, N]: uniform over the columns whose sample id equals the row's (itself included)."""
    positives = torch.eq(idx.view(-1, 1), idx_all.view(1, -1)).float()  # [B, N]
    return positives / positives.sum(1, keepdim=True)


def sample_hard_negatives(sim: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `sim` [N, M] draw one column that is not a positive, with P ~ softmax(sim).

    Vectorised (one torch.multinomial over the whole matrix). Returns (columns [N], has_negative
    [N] bool): a row whose every column is a positive has no negative; its column is garbage
    and must be dropped by the caller. Positives are masked before the softmax so the draw stays
    well defined even when the softmax of the positives would underflow everything else.
    """
    has_negative = ~positive.all(dim=1)  # [N]
    logits = sim.float().masked_fill(positive, float("-inf"))  # [N, M]
    logits = logits.masked_fill(~has_negative[:, None], 0.0)  # rows without negatives: any column
    weights = torch.softmax(logits, dim=1)  # [N, M]
    return torch.multinomial(weights, 1).squeeze(1), has_negative


class MED(nn.Module):
    """Vision encoder + shared text encoder/decoder + ITC/ITM heads, with momentum copies and queues."""

    def __init__(self, cfg: MEDConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = BlipVisionModel(vision_config(cfg))
        self.text_encoder = BlipTextModel(text_config(cfg), add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text_config(cfg))
        self._tie_decoder_to_encoder()
        self.vision_proj = nn.Linear(cfg.vision_hidden, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_hidden, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_hidden, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))

        # Momentum encoders: EMA copies, never trained. The text one only runs text-only, so it
        # is built without cross-attention (BLIP keeps unused cross-attention weights there).
        self.vision_m = copy.deepcopy(self.vision)
        self.text_encoder_m = BlipTextModel(text_config(cfg, cross_attention=False), add_pooling_layer=False)
        online_text = self.text_encoder.state_dict()
        self.text_encoder_m.load_state_dict({name: online_text[name] for name in self.text_encoder_m.state_dict()})
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for module in self._momentum_modules():
            module.requires_grad_(False)

        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        # -100 never equals a sample id, so the random initial queue entries are all negatives.
        self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _tie_decoder_to_encoder(self) -> None:
        """Make the decoder use the encoder's modules for everything but self-attention."""
        enc, dec = self.text_encoder, self.text_decoder.bert
        dec.embeddings = enc.embeddings
        for enc_layer, dec_layer in zip(enc.encoder.layer, dec.encoder.layer):
            dec_layer.crossattention = enc_layer.crossattention
            dec_layer.intermediate = enc_layer.intermediate
            dec_layer.output = enc_layer.output
        # The LM head's output matrix is the (shared) word-embedding matrix, as in BERT/BLIP.
        self.text_decoder.cls.predictions.decoder.weight = enc.embeddings.word_embeddings.weight

    def _momentum_modules(self) -> list[nn.Module]:
        return [self.vision_m, self.text_encoder_m, self.vision_proj_m, self.text_proj_m]

    def _momentum_pairs(self):
        """(online parameter, momentum parameter) pairs, matched by name."""
        for online, momentum in zip([self.vision, self.text_encoder, self.vision_proj, self.text_proj],
                                    self._momentum_modules()):
            params = dict(online.named_parameters())
            for name, param_m in momentum.named_parameters():
                yield params[name], param_m

    @torch.no_grad()
    def momentum_update(self) -> None:
        """param_m <- momentum * param_m + (1 - momentum) * param."""
        for param, param_m in self._momentum_pairs():
            param_m.mul_(self.cfg.momentum).add_(param.detach(), alpha=1.0 - self.cfg.momentum)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        """Write the batch's momentum features at the queue pointer, wrapping around the end.

        Gathers over ranks first when distributed, so every rank holds the same queue. A batch
        that does not divide the queue size simply wraps; one larger than the queue keeps its tail.
        """
        image_feat, text_feat, idx = gather_rows(image_feat), gather_rows(text_feat), gather_rows(idx)
        size = self.cfg.queue_size
        image_feat, text_feat, idx = image_feat[-size:], text_feat[-size:], idx[-size:]
        ptr = int(self.queue_ptr)
        slots = (ptr + torch.arange(idx.shape[0], device=idx.device)) % size  # [n]
        self.image_queue[:, slots] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feat.T.to(self.text_queue.dtype)
        self.idx_queue[0, slots] = idx
        self.queue_ptr[0] = (ptr + idx.shape[0]) % size

    # ------------------------------------------------------------------------------------------
    # Encoders

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixel_values).last_hidden_state  # [B, 1+P, Dv]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text encoder: bidirectional, no image. `input_ids` start with [CLS]."""
        return blip_ops.unimodal_states(self.text_encoder, input_ids, attention_mask)  # [B, T, Dt]

    def encode_grounded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        image_embeds: torch.Tensor) -> torch.Tensor:
        """Image-grounded text encoder: first token replaced by [ENC]; returns the first token's state."""
        return blip_ops.grounded_state(self.text_encoder, input_ids, attention_mask, image_embeds,
                                       self.cfg.enc_token_id)  # [B, Dt]

    # ------------------------------------------------------------------------------------------
    # Training

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                idx: torch.Tensor, alpha: float, itc: bool = True, itm: bool = True, lm: bool = True,
                lm_prompt_len: int = 0) -> dict[str, torch.Tensor]:
        """BLIP losses for a batch. The queues move only in training mode with itc; the momentum
        encoders move only by `momentum_update`, which the trainer calls once per optimiser step
        (BLIP calls it inside forward, where one forward is one step; under gradient accumulation
        a step is several forwards).

        pixel_values [B,3,H,W] (CLIP-normalised), input_ids/attention_mask [B,T] ([CLS] first,
        padded), idx [B] sample ids (equal idx = positive pair for ITC and never an ITM negative),
        alpha = this step's distillation weight, lm_prompt_len = prompt tokens after [DEC] that
        are context rather than LM targets.
        """
        if not (itc or itm or lm):
            raise ValueError("forward needs at least one of itc, itm, lm")
        if lm_prompt_len < 0 or lm_prompt_len >= input_ids.shape[1] - 1:
            raise ValueError(f"lm_prompt_len={lm_prompt_len} leaves no LM target in {input_ids.shape[1]} tokens")
        out: dict[str, torch.Tensor] = {}
        image_embeds = self.encode_image(pixel_values)  # [B, 1+P, Dv]

        if itc or itm:
            # Unimodal features: trained by ITC; without it they only rank ITM's hard negatives.
            with torch.set_grad_enabled(itc and torch.is_grad_enabled()):
                text_embeds = self.encode_text(input_ids, attention_mask)  # [B, T, Dt]
                image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)  # [B, E]
                text_feat = F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)  # [B, E]
        if itc:
            out["loss_itc"] = self._itc_loss(pixel_values, input_ids, attention_mask, idx, alpha,
                                             image_feat, text_feat)
        if itm:
            out["loss_itm"] = self._itm_loss(input_ids, attention_mask, idx, image_embeds, image_feat, text_feat)
        if lm:
            out["loss_lm"] = self._lm_loss(input_ids, attention_mask, image_embeds, lm_prompt_len)
        out["loss"] = sum(out[k] for k in ("loss_itc", "loss_itm", "loss_lm") if k in out)
        return out

    def _itc_loss(self, pixel_values, input_ids, attention_mask, idx, alpha, image_feat, text_feat):
        with torch.no_grad():
            self.temp.clamp_(self.cfg.temp_min, self.cfg.temp_max)
        sim_targets = contrastive_targets(idx, torch.cat([idx, self.idx_queue[0]]))  # [B, B+Q]

        with torch.no_grad():
            image_embeds_m = self.vision_m(pixel_values=pixel_values).last_hidden_state  # [B, 1+P, Dv]
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)  # [B, E]
            image_feat_m_all = torch.cat([image_feat_m.T, self.image_queue.clone()], dim=1)  # [E, B+Q]
            text_embeds_m = self.text_encoder_m(input_ids=input_ids, attention_mask=attention_mask,
                                                is_decoder=False).last_hidden_state  # [B, T, Dt]
            text_feat_m = F.normalize(self.text_proj_m(text_embeds_m[:, 0, :]), dim=-1)  # [B, E]
            text_feat_m_all = torch.cat([text_feat_m.T, self.text_queue.clone()], dim=1)  # [E, B+Q]
            sim_i2t_m = image_feat_m @ text_feat_m_all / self.temp  # [B, B+Q]
            sim_t2i_m = text_feat_m @ image_feat_m_all / self.temp  # [B, B+Q]
            i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets

        sim_i2t = image_feat @ text_feat_m_all / self.temp  # [B, B+Q]
        sim_t2i = text_feat @ image_feat_m_all / self.temp  # [B, B+Q]
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(1).mean()
        if self.training:
            self.dequeue_and_enqueue(image_feat_m, text_feat_m, idx)
        return (loss_i2t + loss_t2i) / 2

    def _itm_loss(self, input_ids, attention_mask, idx, image_embeds, image_feat, text_feat):
        batch = input_ids.shape[0]
        with torch.no_grad():
            positive = torch.eq(idx.view(-1, 1), idx.view(1, -1))  # [B, B]
            sim_i2t = image_feat @ text_feat.T / self.temp  # [B, B]
            neg_text, image_has_neg = sample_hard_negatives(sim_i2t, positive)  # a negative text per image
            neg_image, text_has_neg = sample_hard_negatives(sim_i2t.T, positive)  # a negative image per text

        # Pairs: (image_i, text_i) positives, then (neg image, text_j), then (image_i, neg text).
        text_ids_all = torch.cat([input_ids, input_ids[text_has_neg], input_ids[neg_text[image_has_neg]]])
        text_atts_all = torch.cat([attention_mask, attention_mask[text_has_neg],
                                   attention_mask[neg_text[image_has_neg]]])
        image_embeds_all = torch.cat([image_embeds, image_embeds[neg_image[text_has_neg]],
                                      image_embeds[image_has_neg]])  # [B+N, 1+P, Dv]
        vl = self.encode_grounded(text_ids_all, text_atts_all, image_embeds_all)  # [B+N, Dt]
        logits = self.itm_head(vl)  # [B+N, 2]
        labels = torch.cat([torch.ones(batch, dtype=torch.long, device=logits.device),
                            torch.zeros(logits.shape[0] - batch, dtype=torch.long, device=logits.device)])
        return F.cross_entropy(logits, labels)

    def _lm_loss(self, input_ids, attention_mask, image_embeds, lm_prompt_len):
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.cfg.dec_token_id
        labels = lm_labels(decoder_ids, self.cfg.pad_token_id, lm_prompt_len)  # [B, T]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        # transformers shifts logits/labels by one and applies config.label_smoothing (mean over targets).
        out = self.text_decoder(input_ids=decoder_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                labels=labels, reduction="mean")
        return out.loss

    # ------------------------------------------------------------------------------------------
    # Persistence

    def save(self, directory: str | Path) -> None:
        """config.json + model.safetensors (every parameter and buffer: momentum copies, queues)."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")
        # save_model stores each shared tensor once (encoder/decoder sharing, tied LM head).
        save_model(self, str(directory / WEIGHTS_NAME))

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> MED:
        """Inverse of `save`. Only safetensors is read; anything else is refused, never unpickled."""
        from safetensors.torch import load_model

        directory = Path(directory)
        weights = safe_weights(directory, WEIGHTS_NAME)
        model = cls(config_from_dict(json.loads((directory / CONFIG_NAME).read_text())))
        load_model(model, str(weights), strict=True, device=str(map_location))
        return model

    @classmethod
    def from_blip(cls, captioner_dir_or_id: str | Path, filter_dir_or_id: str | Path, **overrides) -> MED:
        """A MED initialised from transformers BLIP checkpoints (directories or hub ids).

        BLIP's captioner and filter are fine-tuned separately from one pre-trained MED, so they
        disagree on shared weights. The filter provides the vision encoder and every shared
        text module (ITC/ITM depend on them); the captioner provides what only the decoder has:
        its self-attention and the LM head bias. Momentum copies start equal to the result and
        the queues start fresh. `overrides` set MEDConfig fields not read from the checkpoints.
        The `[DEC]`/`[ENC]` ids come from the filter's tokenizer and config (`blip_ops.special_token_ids`:
        BLIP's 30522/30523 for the published folders, whose tokenizer lacks both).
        """
        from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipForImageTextRetrieval

        cap = BlipForConditionalGeneration.from_pretrained(str(captioner_dir_or_id), use_safetensors=True)
        fil = BlipForImageTextRetrieval.from_pretrained(str(filter_dir_or_id), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(filter_dir_or_id))
        dec, enc = blip_ops.special_token_ids(tokenizer, fil.config.text_config)
        model = cls(_config_from_blip(fil, {"cls_token_id": tokenizer.cls_token_id, "dec_token_id": dec,
                                            "enc_token_id": enc, **overrides}))
        model.vision.load_state_dict(fil.vision_model.state_dict())
        model.text_encoder.load_state_dict(fil.text_encoder.state_dict())
        model.vision_proj.load_state_dict(fil.vision_proj.state_dict())
        model.text_proj.load_state_dict(fil.text_proj.state_dict())
        model.itm_head.load_state_dict(fil.itm_head.state_dict())
        for layer, cap_layer in zip(model.text_decoder.bert.encoder.layer, cap.text_decoder.bert.encoder.layer):
            layer.attention.load_state_dict(cap_layer.attention.state_dict())
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias.copy_(cap.text_decoder.cls.predictions.bias)
            model.text_decoder.cls.predictions.transform.load_state_dict(
                cap.text_decoder.cls.predictions.transform.state_dict())
            for param, param_m in model._momentum_pairs():
                param_m.copy_(param)
        return model


def _config_from_blip(fil, overrides: dict) -> MEDConfig:
    v, t = fil.config.vision_config, fil.config.text_config
    fields = dict(
        size="blip", image_size=v.image_size, patch_size=v.patch_size, vision_hidden=v.hidden_size,
        vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads, vision_mlp=v.intermediate_size,
        vision_ln_eps=v.layer_norm_eps, text_hidden=t.hidden_size, text_layers=t.num_hidden_layers,
        text_heads=t.num_attention_heads, text_intermediate=t.intermediate_size,
        text_max_positions=t.max_position_embeddings, vocab_size=t.vocab_size,
        embed_dim=fil.config.image_text_hidden_size,
        pad_token_id=t.pad_token_id, sep_token_id=t.sep_token_id,
    )
    return med_config("base", **{**fields, **overrides})
