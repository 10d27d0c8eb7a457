"""CLIP, SigLIP and SigLIP2 scorers against transformers' own forward, pair by pair, on tiny random folders."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

from capfilt.model.scorers import ContrastiveScorer
from tests.model import tiny_models

CPU = torch.device("cpu")
# Each picture's texts: uneven counts, one picture without texts, a text longer than the positions.
TEXTS = [["a picture of the image", "the"], [], ["one", "describe the image in one sentence", "photo"],
         ["a " * 40 + "picture"]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {"clip": tiny_models.clip_dir(root / "clip"), "siglip": tiny_models.siglip_dir(root / "siglip"),
            "siglip2": tiny_models.siglip2_dir(root / "siglip2")}


@torch.no_grad()
def direct(model, processor, family: str, image, text: str) -> float:
    """One pair through the stock model's forward, as transformers' docs score it."""
    max_tokens = model.config.text_config.max_position_embeddings
    siglip = family.startswith("siglip")
    tokens = processor.tokenizer([text], padding="max_length" if siglip else True, truncation=True,
                                 max_length=max_tokens, return_tensors="pt")
    if siglip:
        tokens.pop("attention_mask", None)  # as SigLIP's own tokenizer gives it (input_ids only)
    logits = model(**tokens, **processor.image_processor(images=[image], return_tensors="pt")).logits_per_image[0, 0]
    if family == "clip":
        return float(logits / model.logit_scale.exp())  # the cosine
    return float(torch.sigmoid(logits))


def transformers_class(family: str):
    from transformers import CLIPModel, Siglip2Model, SiglipModel

    return {"clip": CLIPModel, "siglip": SiglipModel, "siglip2": Siglip2Model}[family]


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
def test_scores_equal_the_stock_forward(folders, family):
    images = tiny_models.pictures(len(TEXTS), sizes=((48, 40), (32, 64)))
    scorer = ContrastiveScorer(folders[family], CPU)
    kind = "clip" if family == "clip" else "siglip"
    assert scorer.kind == kind and scorer.name == family
    scores = scorer.score(images, TEXTS)
    assert [len(s) for s in scores] == [len(t) for t in TEXTS]
    model = transformers_class(family).from_pretrained(folders[family]).eval()
    processor = AutoProcessor.from_pretrained(folders[family])
    expected = [[direct(model, processor, family, image, text) for text in texts]
                for image, texts in zip(images, TEXTS)]
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, abs=1e-4)
    flat = [s for group in scores for s in group]
    assert len(set(round(s, 6) for s in flat)) >= len(flat) - 1  # the pairs are told apart, not one constant
    if kind == "siglip":
        assert all(0.0 < s < 1.0 for s in flat)
    else:
        assert all(-1.0 <= s <= 1.0 for s in flat)


def test_a_picture_without_texts_and_mismatched_lengths(folders):
    scorer = ContrastiveScorer(folders["clip"], CPU)
    assert scorer.score(tiny_models.pictures(2), [[], []]) == [[], []]
    with pytest.raises(ValueError, match="2 images but texts for 1"):
        scorer.score(tiny_models.pictures(2), [["a"]])
