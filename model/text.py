"""Caption text as BLIP prepares it, for training and for scoring.

`pre_caption` is BLIP's rule (salesforce/BLIP data/utils.py): lowercase, each of `.!"()*#:;~`
becomes a space, runs of two or more whitespace characters become one space, a trailing newline
and surrounding spaces go, and at most `max_words` space-separated words stay. Everything else
(apostrophes, commas, hyphens, slashes, other unicode) is left for the tokenizer, as BLIP left it.

`scoring_text` is what the filter scores: a text cut to `CHARS_PER_TOKEN` characters per allowed
token, then cleaned with BLIP's retrieval-evaluation word cap (`RETRIEVAL_MAX_WORDS`); the tokenizer
then truncates to the token limit.
"""

from __future__ import annotations

import re

# BLIP's retrieval evaluation cleans captions to 30 words (coco_karpathy_retrieval_eval) before
# its tokenizer cuts them to 35 tokens.
RETRIEVAL_MAX_WORDS = 30

# Texts are cut to this many characters per allowed token before cleaning and tokenising: a
# megabyte caption then costs what a normal one does. BERT's word pieces never span more than
# 100 characters (a longer word is one [UNK]), so the cut only changes texts padded with long
# runs of whitespace or of characters the cleaning and the tokenizer drop.
CHARS_PER_TOKEN = 100

_BLIP_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int) -> str:
    """BLIP's caption cleaning (data/utils.py `pre_caption`), rule for rule."""
    text = _WHITESPACE_RUN.sub(" ", _BLIP_PUNCTUATION.sub(" ", text.lower()))
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def scoring_text(text: str, max_tokens: int) -> str:
    """The text the filter scores for `text`: cut to `max_tokens` x CHARS_PER_TOKEN characters, cleaned."""
    return pre_caption(text[: max_tokens * CHARS_PER_TOKEN], RETRIEVAL_MAX_WORDS)


def has_words(text: str, max_tokens: int) -> bool:
    """Whether the filter scores anything of `text`: a text of only `.!"()*#:;~` and whitespace it does not."""
    return bool(scoring_text(text, max_tokens).strip())
