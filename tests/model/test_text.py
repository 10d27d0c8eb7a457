"""Caption cleaning as BLIP's data/utils.py `pre_caption` does it, on strings where rules differ."""

from __future__ import annotations

import pytest

from capfilt.model.text import CHARS_PER_TOKEN, RETRIEVAL_MAX_WORDS, has_words, pre_caption, scoring_text

# (text, max_words, what BLIP's pre_caption returns), checked against salesforce/BLIP's function.
BLIP_CASES = [
    ("  A Dog's  ball,\n(on) the GRASS!!  ", 30, "a dog's ball, on the grass"),  # commas stay
    ("don't stop: it's Bob's car", 30, "don't stop it's bob's car"),  # apostrophes stay
    ("red, white, and blue", 30, "red, white, and blue"),
    ("a t-shirt -- well-known   x-ray", 30, "a t-shirt -- well-known x-ray"),  # hyphens stay
    ("Café Ñandú — naïve ÉCOLE 東京 😀", 30, "café ñandú — naïve école 東京 😀"),  # unicode lowercased, kept
    # a URL: its ':' and '.' become spaces, the rest stays
    ("see http://example.com/a_b.jpg?x=1&y=2 #tag", 30, "see http //example com/a_b jpg?x=1&y=2 tag"),
    ('say "hi" (now)!', 30, "say hi now"),
    ("word;word:word", 30, "word word word"),
    ("100% of $5 @ 3/4 + [x] {y} <z> | _ ^ ` \\", 30, "100% of $5 @ 3/4 + [x] {y} <z> | _ ^ ` \\"),
    ("a ,b", 30, "a ,b"),
    ("a\tb\nc", 30, "a\tb\nc"),  # a single whitespace character is not a run: it stays
    ("trailing newline\n\n", 30, "trailing newline"),
    ("trailing\n", 30, "trailing"),
    ("...", 30, ""),
    ("~*~", 30, ""),
    ("", 30, ""),
    ("one two three four", 2, "one two"),
    ("a  b   c", 2, "a b"),
]


@pytest.mark.parametrize("text, max_words, expected", BLIP_CASES)
def test_pre_caption_is_blips(text, max_words, expected):
    assert pre_caption(text, max_words) == expected


def test_scoring_text_cuts_then_cleans_to_30_words():
    words = " ".join(f"w{i}." for i in range(50))
    assert scoring_text(words, 35) == " ".join(f"w{i}" for i in range(RETRIEVAL_MAX_WORDS))
    # A megabyte caption is cut to 100 characters per token before the regexes see it.
    huge = "a" * 10 + " " * 1_000_000 + "tail"
    assert scoring_text(huge, 4) == "a" * 10
    assert scoring_text("X" * (5 * CHARS_PER_TOKEN + 7), 5) == "x" * (5 * CHARS_PER_TOKEN)


def test_has_words():
    assert has_words("A dog.", 35) and has_words("東京", 35)
    assert not has_words("", 35) and not has_words(" ... !!! \t", 35) and not has_words("(*)", 35)
    assert not has_words(" " * 400 + "late", 4)  # the filter would score nothing of it
