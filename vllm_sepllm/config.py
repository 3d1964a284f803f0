"""The one configuration module of vllm-sepllm.

Settings come from ``--additional-config '{"sepllm": {...}}'`` (or ``LLM(...,
additional_config={"sepllm": {...}})``); environment variables ``VLLM_SEPLLM_<KEY>`` fill in
keys the additional config does not set. Everything is validated at start-up; a bad value
fails with one line that names the field and the value.

Keys (defaults follow the official SepLLM code, see README "Configuration"):

=====================  =========  =============================================================
key                    default    meaning
=====================  =========  =============================================================
mode                   "sepllm"   "sepllm": sinks + separators + window; "streamingllm":
                                  sinks + window only; "full": no eviction (plain attention).
num_sinks              4          a: the first ``a`` tokens are always kept.
sep_cap                64         s: keep at most the ``s`` newest separators that left the
                                  window; ``null`` keeps all of them.
window                 256        w: the ``w`` most recent tokens (the query included).
separators             ".,?!;:"   separator characters, plus space, tab and newline
                       + " \\t\\n"
separator_token_ids    null       explicit separator token ids; overrides derivation from
                                  the tokenizer (see separators.py).
cache_size             null       c: batched eviction (SepCache's and the official streaming
                                  code's c). The cache grows to c tokens, then drops to the
                                  retained a + s + w; queries see the whole cache (plain
                                  causal attention, no mask: FlashAttention for prefill
                                  too). null: exact per-step eviction (the training-free
                                  mask). Needs c >= a + s + w (a + w in streamingllm mode).
                                  Engine-wide.
pe_shift               false      positions relative to the cache (the paper's PE shift, see
                                  rope_shift.py): a request can run past the model's
                                  max_position_embeddings. Needs a bounded cache (mode sepllm
                                  with a sep_cap, or streamingllm). Engine-wide.
=====================  =========  =============================================================
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

MODES = ("sepllm", "streamingllm", "full")
#: ``--kv-cache-dtype`` values SEPLLM runs: fp8 is e4m3 with vLLM's per-tensor scales; e5m2
#: and per-token-head fp8 are refused at start-up.
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3")


def is_fp8_cache_dtype(kv_cache_dtype: str) -> bool:
    """Whether a ``--kv-cache-dtype`` value (one of :data:`KV_CACHE_DTYPES`) stores e4m3."""
    return kv_cache_dtype in ("fp8", "fp8_e4m3")
DEFAULT_SEPARATORS = ".,?!;: \t\n"
ENV_PREFIX = "VLLM_SEPLLM_"


class SepLLMConfigError(Exception):
    """A bad SepLLM setting. The message is one line naming the field and the value.

    Not a ValueError on purpose: pydantic would wrap a ValueError raised while vLLM builds its
    config into a multi-line ValidationError."""


@dataclasses.dataclass(frozen=True)
class SepLLMConfig:
    mode: str = "sepllm"
    num_sinks: int = 4
    sep_cap: int | None = 64
    window: int = 256
    separators: str = DEFAULT_SEPARATORS
    separator_token_ids: tuple[int, ...] | None = None
    pe_shift: bool = False
    cache_size: int | None = None

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_int("num_sinks", self.num_sinks, minimum=0)
        if self.sep_cap is not None:
            _check_int("sep_cap", self.sep_cap, minimum=0)
        _check_int("window", self.window, minimum=1)
        if not isinstance(self.separators, str) or not self.separators:
            raise SepLLMConfigError(
                f"sepllm.separators must be a non-empty string, got {self.separators!r}"
            )
        if self.separator_token_ids is not None:
            ids = self.separator_token_ids
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise SepLLMConfigError(
                    "sepllm.separator_token_ids must be a list of non-negative integers, "
                    f"got {ids!r}"
                )
            object.__setattr__(self, "separator_token_ids", tuple(ids))
        if self.cache_size is not None:
            _check_int("cache_size", self.cache_size, minimum=1)
            if self.mode == "full":
                raise SepLLMConfigError(
                    f"sepllm.cache_size={self.cache_size} needs an evicting mode; got mode='full'")
            kept = self.retained_tokens
            if kept is not None and self.cache_size < kept:
                if self.mode == "sepllm" and self.sep_cap is not None:
                    what = (f"a + s + w = {kept} (num_sinks={self.num_sinks}, "
                            f"sep_cap={self.sep_cap}, window={self.window})")
                else:
                    what = f"a + w = {kept} (num_sinks={self.num_sinks}, window={self.window})"
                raise SepLLMConfigError(
                    f"sepllm.cache_size={self.cache_size} is below the retained {what}")
        if not isinstance(self.pe_shift, bool):
            raise SepLLMConfigError(f"sepllm.pe_shift must be true or false, got {self.pe_shift!r}")
        if self.pe_shift and self.max_cache_tokens is None:
            what = "mode full keeps every token" if self.mode == "full" else "sep_cap null keeps every separator"
            raise SepLLMConfigError(
                f"sepllm.pe_shift=true needs a bounded cache ({what}); got mode={self.mode!r}, "
                f"sep_cap={self.sep_cap!r}")

    # ------------------------------------------------------------------ derived
    @property
    def evicts(self) -> bool:
        """Whether this config evicts anything (``full`` mode keeps every token)."""
        return self.mode != "full"

    @property
    def retained_tokens(self) -> int | None:
        """``a + s + w``: what eviction keeps (``s = 0`` in streamingllm mode, ``a + w`` with
        no separator cap, the separators not counted); None in mode full."""
        if self.mode == "full":
            return None
        if self.mode == "streamingllm" or self.sep_cap is None:
            return self.num_sinks + self.window
        return self.num_sinks + self.sep_cap + self.window

    @property
    def max_cache_tokens(self) -> int | None:
        """The most tokens a request keeps between steps: ``cache_size`` when set, else
        ``a + s + w``; None when unbounded (mode full, or no separator cap)."""
        if self.mode == "full" or (self.mode == "sepllm" and self.sep_cap is None):
            return None
        return self.cache_size if self.cache_size is not None else self.retained_tokens

    @property
    def retention(self) -> "Retention":
        """The (a, s, w) triple the policy applies; see :class:`Retention`."""
        from vllm_sepllm.policy import FULL_WINDOW, Retention

        if self.mode == "full":
            return Retention(num_sinks=0, sep_cap=None, window=FULL_WINDOW)
        cap = 0 if self.mode == "streamingllm" else self.sep_cap
        return Retention(num_sinks=self.num_sinks, sep_cap=cap, window=self.window)

    @property
    def prefix_cache_key(self) -> str:
        """What a prompt block's KV depends on besides the tokens up to it, under prefix
        caching (the scheduler computes a prompt before evicting): with ``cache_size`` or in
        mode full the prompt runs with plain causal attention, whatever a, s and w are;
        otherwise each prompt query sees what the exact rule (mode, a, s, w) lets it see.
        Blocks are shared only between requests with the same key (patches.py, item 5)."""
        if self.cache_size is not None or self.mode == "full":
            return "causal"
        r = self.retention
        return f"{self.mode}:a={r.num_sinks}:s={r.sep_cap}:w={r.window}"

    def with_overrides(self, overrides: dict[str, Any], where: str = "sepllm") -> SepLLMConfig:
        """A copy with ``overrides`` applied (validated like the start-up config)."""
        return _from_mapping(overrides, base=self, where=where)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["separator_token_ids"] is not None:
            d["separator_token_ids"] = list(d["separator_token_ids"])
        return d


# ---------------------------------------------------------------------- parsing
_FIELDS = {f.name: f for f in dataclasses.fields(SepLLMConfig)}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "an integer >= 0"
        raise SepLLMConfigError(f"sepllm.{name} must be {kind}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SepLLMConfigError(
            f"sepllm.{name} must be one of {', '.join(choices)}; got {value!r}"
        )


def _from_mapping(
    raw: Any, base: SepLLMConfig | None = None, where: str = "sepllm"
) -> SepLLMConfig:
    if not isinstance(raw, dict):
        raise SepLLMConfigError(f"{where} must be a JSON object, got {raw!r}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise SepLLMConfigError(
            f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(_FIELDS)})"
        )
    values = dataclasses.asdict(base) if base is not None else {}
    values.update(raw)
    return SepLLMConfig(**values)


def _parse_env_value(name: str, text: str) -> Any:
    if name in ("separators", "mode"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise SepLLMConfigError(
            f"{ENV_PREFIX}{name.upper()} must be JSON (e.g. 64, null, [13, 11]), got {text!r}"
        ) from None


def from_additional_config(additional_config: Any, environ: dict[str, str] | None = None
                           ) -> SepLLMConfig:
    """Build the engine-wide config from vLLM's ``additional_config`` and the environment.

    ``additional_config["sepllm"]`` may be a dict or a JSON string. Environment variables
    ``VLLM_SEPLLM_<KEY>`` (e.g. ``VLLM_SEPLLM_WINDOW=128``) apply to keys it leaves unset.
    """
    environ = os.environ if environ is None else environ
    section: Any = {}
    if additional_config:
        if not isinstance(additional_config, dict):
            raise SepLLMConfigError(
                f"additional_config must be a JSON object, got {additional_config!r}"
            )
        section = additional_config.get("sepllm", {})
        if isinstance(section, str):
            try:
                section = json.loads(section)
            except json.JSONDecodeError as e:
                raise SepLLMConfigError(
                    f"additional_config.sepllm is not valid JSON ({e.msg}): {section!r}"
                ) from None
        if not isinstance(section, dict):
            raise SepLLMConfigError(f"additional_config.sepllm must be an object, got {section!r}")
    values = {}
    for name in _FIELDS:
        env = environ.get(ENV_PREFIX + name.upper())
        if env is not None and name not in section:
            values[name] = _parse_env_value(name, env)
    values.update(section)
    return _from_mapping(values, where="additional_config.sepllm")


def check_limits(cfg: SepLLMConfig, max_model_len: int, where: str = "sepllm") -> None:
    """Refuse sizes past the context (one line naming the field): ``num_sinks``, ``sep_cap``
    and ``window`` must be at most ``max_model_len`` (in every mode, so that one rule holds).
    Larger values mean nothing more (a cap or window past the context keeps everything) and
    would not fit the workers' int32/int64 metadata nor vLLM's 64-bit request messages."""
    for name in ("num_sinks", "sep_cap", "window"):
        value = getattr(cfg, name)
        if value is not None and value > max_model_len:
            raise SepLLMConfigError(
                f"{where}.{name}={value} is above max_model_len={max_model_len}")


#: Keys a request may override through ``SamplingParams.extra_args["sepllm"]``.
PER_REQUEST_KEYS = ("mode", "num_sinks", "sep_cap", "window")


def request_entries(extra_args: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """Every SepLLM setting a request's ``extra_args`` gives, in the order they apply: a
    ``"sepllm"`` object (Python API), then, through the OpenAI API's ``vllm_xargs`` (flat scalar
    values only), ``"sepllm_<key>"`` entries, e.g. ``{"sepllm_window": 128, "sepllm_sep_cap":
    "none"}``, which win over the object's."""
    if not extra_args:
        return []
    entries: list[tuple[str, Any]] = []
    nested = extra_args.get("sepllm")
    if nested is not None:
        if not isinstance(nested, dict):
            raise SepLLMConfigError(f"extra_args.sepllm must be an object, got {nested!r}")
        key = next((k for k in nested if not isinstance(k, str)), None)
        if key is not None:
            raise SepLLMConfigError(f"extra_args.sepllm keys must be strings, got {key!r}")
        entries.extend(nested.items())
    for key, value in extra_args.items():
        if isinstance(key, str) and key.startswith("sepllm_"):
            name = key[len("sepllm_"):]
            if name == "sep_cap" and isinstance(value, str) and value.lower() in ("none", "null"):
                value = None
            entries.append((name, value))
    return entries


def request_overrides(extra_args: dict[str, Any] | None) -> dict[str, Any]:
    """The request's SepLLM overrides (:func:`request_entries`, later entries winning)."""
    return dict(request_entries(extra_args))


def _check_request_value(name: str, value: Any, max_model_len: int | None) -> None:
    if name == "mode":
        _check_choice(name, value, MODES)
        return
    if name == "sep_cap" and value is None:
        return
    _check_int(name, value, minimum=1 if name == "window" else 0)
    if max_model_len is not None and value > max_model_len:
        raise SepLLMConfigError(
            f"extra_args.sepllm.{name}={value} is above max_model_len={max_model_len}")


def request_config(engine: SepLLMConfig, extra_args: dict[str, Any] | None,
                   max_model_len: int | None = None) -> SepLLMConfig:
    """The config of one request: the engine config with its overrides applied
    (:func:`request_overrides`).

    Separator sets are engine-wide (they shape the worker's lookup table), so a request may
    override only :data:`PER_REQUEST_KEYS`. Every value given is checked, also one a flat entry
    overrides (it still travels to the engine core), and, with ``max_model_len``, sizes must be
    at most that.
    """
    entries = request_entries(extra_args)
    if not entries:
        return engine
    bad = sorted({name for name, _ in entries} - set(PER_REQUEST_KEYS))
    if bad:
        raise SepLLMConfigError(
            f"extra_args.sepllm: key {bad[0]!r} cannot be set per request "
            f"(per-request keys: {', '.join(PER_REQUEST_KEYS)})"
        )
    for name, value in entries:
        _check_request_value(name, value, max_model_len)
    return engine.with_overrides(dict(entries), where="extra_args.sepllm")
