"""Separator-id derivation: the documented rule, and SmolLM2's real tokenizer."""

import pytest

from vllm_sepllm.config import SepLLMConfig, SepLLMConfigError
from vllm_sepllm.separators import (
    is_separator_text,
    official_style_ids,
    separator_token_ids,
)

SEPS = SepLLMConfig().separators


@pytest.mark.parametrize("text", [".", ",", "?", "!", ";", ":", " ", "\t", "\n", " .", ". ",
                                  ".\n", "\n\n", "...", "?!", " \n ", ",\n\n"])
def test_separator_texts(text):
    assert is_separator_text(text, SEPS)


@pytest.mark.parametrize("text", ["", "a", " the", "end.", ".a", "),", "'.", "-", "1.", "\"."])
def test_non_separator_texts(text):
    assert not is_separator_text(text, SEPS)


def test_custom_separator_characters():
    assert is_separator_text("|", "|") and not is_separator_text(".", "|")
    assert not is_separator_text(" ", "|")


def test_smollm2_separators(tokenizer):
    ids = separator_token_ids(tokenizer, SepLLMConfig())
    decoded = {tokenizer.decode([i]) for i in ids}
    # single characters and the merged punctuation/whitespace tokens
    for text in [".", ",", "?", "!", ";", ":", "\n", "\n\n", ".\n", " .", "..."]:
        ids_of = tokenizer.encode(text, add_special_tokens=False)
        if len(ids_of) == 1:
            assert ids_of[0] in ids, text
    assert {".", ",", "\n", "\n\n"} <= decoded
    # every id the official recipe finds is found by the rule
    assert official_style_ids(tokenizer, SEPS) <= ids
    # words with punctuation attached are not separators
    assert all(not any(c.isalnum() for c in t) for t in decoded)
    for word in [" the", " Paris", "hello"]:
        assert not set(tokenizer.encode(word, add_special_tokens=False)) & ids


def test_explicit_ids_override(tokenizer):
    cfg = SepLLMConfig(separator_token_ids=[30, 28])
    assert separator_token_ids(tokenizer, cfg) == {30, 28}
    assert separator_token_ids(None, cfg) == {30, 28}


def test_no_tokenizer_needs_explicit_ids():
    with pytest.raises(SepLLMConfigError, match="separator_token_ids"):
        separator_token_ids(None, SepLLMConfig())
