"""Separator token ids, derived from the model's tokenizer.

The rule (documented in README "Separator tokens"): a vocabulary entry is a separator when its
decoded text, stripped of surrounding whitespace, is either empty (the token is pure
whitespace: ``" "``, ``"\\n"``, ``"\\n\\n"``, ``"\\t"``) or ends with a separator character
and consists only of separator characters and whitespace (``"."``, ``" ."``, ``". "``,
``".\\n"``, ``"?!"``, ``"),"`` is *not* one: ``)`` is no separator). Tokens that merge
punctuation into a word (``"end."``) are not separators: the official lists cover only
punctuation alone or with a space, and a word's information lives in the word.

The official code encodes each character alone and with a leading or trailing space; every id
it finds is also found by this rule (tested on SmolLM2's tokenizer), and the merged
punctuation/whitespace tokens (``".\\n"``, ``"\\n\\n"``) are added, which the official lists miss.

An explicit ``separator_token_ids`` list in the config replaces the derived set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vllm_sepllm.config import SepLLMConfig, SepLLMConfigError


def is_separator_text(text: str, separators: str) -> bool:
    """Whether a token whose decoded text is ``text`` counts as a separator."""
    if not text:
        return False
    whitespace = {c for c in separators if c.isspace()}
    punct = {c for c in separators if not c.isspace()}
    core = text.strip()
    if not core:
        # Pure whitespace: separator when made only of whitespace separator chars.
        return all(c in whitespace for c in text)
    return core[-1] in punct and all(c in punct or c.isspace() for c in core)


def separator_ids_from_vocab(decoded: Iterable[tuple[int, str]], separators: str) -> set[int]:
    """Ids among ``(id, decoded_text)`` pairs that satisfy :func:`is_separator_text`."""
    return {i for i, text in decoded if is_separator_text(text, separators)}


def _decoded_vocab(tokenizer: Any) -> list[tuple[int, str]]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        out.append((token_id, tokenizer.decode([token_id])))
    return out


def separator_token_ids(tokenizer: Any, config: SepLLMConfig) -> frozenset[int]:
    """The separator ids the engine uses for ``config`` and ``tokenizer``.

    Empty for ``streamingllm`` and ``full`` modes. ``config.separator_token_ids`` wins over
    derivation.
    """
    if config.separator_token_ids is not None:
        return frozenset(config.separator_token_ids)
    if tokenizer is None:
        raise SepLLMConfigError(
            "sepllm: the model has no tokenizer (skip_tokenizer_init?); set "
            "sepllm.separator_token_ids explicitly"
        )
    return frozenset(separator_ids_from_vocab(_decoded_vocab(tokenizer), config.separators))


def official_style_ids(tokenizer: Any, separators: str) -> set[int]:
    """Ids found the way the official SepLLM code finds them: each character encoded alone,
    with a leading space and with a trailing space, keeping single-token encodings. Used by
    the tests to show the derived set is a superset."""
    out: set[int] = set()
    for c in separators:
        for text in (c, " " + c, c + " "):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                out.add(ids[0])
    return out
