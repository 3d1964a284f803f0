"""Configuration: defaults, parsing, one-line errors naming the field and the value."""

import pytest

from vllm_sepllm.config import (
    SepLLMConfig,
    SepLLMConfigError,
    from_additional_config,
    request_config,
)
from vllm_sepllm.policy import FULL_WINDOW, Retention


def test_defaults_follow_official_code():
    cfg = from_additional_config({}, environ={})
    assert (cfg.mode, cfg.num_sinks, cfg.sep_cap, cfg.window) == ("sepllm", 4, 64, 256)
    assert cfg.retention == Retention(4, 64, 256)


def test_modes_map_to_retention():
    assert SepLLMConfig(mode="streamingllm").retention == Retention(4, 0, 256)
    assert SepLLMConfig(mode="full").retention == Retention(0, None, FULL_WINDOW)
    assert SepLLMConfig(sep_cap=None).retention.sep_cap is None


def test_additional_config_dict_json_and_env():
    cfg = from_additional_config({"sepllm": {"window": 64, "sep_cap": None}}, environ={})
    assert cfg.window == 64 and cfg.sep_cap is None
    cfg = from_additional_config({"sepllm": '{"num_sinks": 3}'}, environ={})
    assert cfg.num_sinks == 3
    env = {"VLLM_SEPLLM_WINDOW": "128", "VLLM_SEPLLM_MODE": "streamingllm",
           "VLLM_SEPLLM_SEP_CAP": "null"}
    cfg = from_additional_config({"sepllm": {"window": 32}}, environ=env)
    assert (cfg.window, cfg.mode, cfg.sep_cap) == (32, "streamingllm", None)


@pytest.mark.parametrize("section, message", [
    ({"window": 0}, "sepllm.window must be a positive integer, got 0"),
    ({"window": -5}, "sepllm.window must be a positive integer, got -5"),
    ({"window": "64"}, "sepllm.window must be a positive integer, got '64'"),
    ({"num_sinks": -1}, "sepllm.num_sinks must be an integer >= 0, got -1"),
    ({"sep_cap": -2}, "sepllm.sep_cap must be an integer >= 0, got -2"),
    ({"sep_cap": True}, "sepllm.sep_cap must be an integer >= 0, got True"),
    ({"mode": "h2o"}, "sepllm.mode must be one of sepllm, streamingllm, full; got 'h2o'"),
    ({"windw": 3}, "unknown key 'windw'"),
    ({"separator_token_ids": [1, -2]}, "sepllm.separator_token_ids must be a list"),
    ({"separators": ""}, "sepllm.separators must be a non-empty string"),
    ({"cache_size": 0}, "sepllm.cache_size must be a positive integer, got 0"),
    ({"cache_size": 300}, "sepllm.cache_size=300 is below the retained a + s + w = 324 "
                          "(num_sinks=4, sep_cap=64, window=256)"),
    ({"mode": "streamingllm", "cache_size": 259}, "sepllm.cache_size=259 is below the retained "
                                                  "a + w = 260 (num_sinks=4, window=256)"),
    ({"sep_cap": None, "cache_size": 100}, "sepllm.cache_size=100 is below the retained "
                                           "a + w = 260"),
    ({"mode": "full", "cache_size": 512}, "sepllm.cache_size=512 needs an evicting mode"),
])
def test_bad_values_name_field_and_value(section, message):
    with pytest.raises(SepLLMConfigError) as e:
        from_additional_config({"sepllm": section}, environ={})
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_cache_size_bounds_the_cache():
    cfg = from_additional_config({"sepllm": {"cache_size": 356}}, environ={})
    assert (cfg.cache_size, cfg.retained_tokens, cfg.max_cache_tokens) == (356, 324, 356)
    assert from_additional_config({"sepllm": {}}, environ={}).max_cache_tokens == 324
    # no separator cap: unbounded whatever c is (separators accumulate)
    assert from_additional_config({"sepllm": {"sep_cap": None, "cache_size": 400}},
                                  environ={}).max_cache_tokens is None
    # a request may not push a + s + w above the engine's c
    with pytest.raises(SepLLMConfigError, match="cache_size=356 is below"):
        request_config(cfg, {"sepllm": {"window": 512}})


def test_bad_json_and_env():
    with pytest.raises(SepLLMConfigError, match="not valid JSON"):
        from_additional_config({"sepllm": "{window: 3"}, environ={})
    with pytest.raises(SepLLMConfigError, match="VLLM_SEPLLM_WINDOW must be JSON"):
        from_additional_config({}, environ={"VLLM_SEPLLM_WINDOW": "big"})
    with pytest.raises(SepLLMConfigError, match="must be an object"):
        from_additional_config({"sepllm": [1]}, environ={})


def test_request_overrides():
    engine = SepLLMConfig()
    assert request_config(engine, None) is engine
    assert request_config(engine, {"other": 1}) is engine
    cfg = request_config(engine, {"sepllm": {"window": 32, "mode": "streamingllm"}})
    assert cfg.window == 32 and cfg.retention.sep_cap == 0
    with pytest.raises(SepLLMConfigError, match="extra_args.sepllm: key 'separators' cannot"):
        request_config(engine, {"sepllm": {"separators": "."}})
    with pytest.raises(SepLLMConfigError, match="sepllm.window must be a positive integer"):
        request_config(engine, {"sepllm": {"window": 0}})


def test_request_overrides_flat_keys_from_openai_xargs():
    engine = SepLLMConfig()
    cfg = request_config(engine, {"sepllm_window": 128, "sepllm_sep_cap": "none",
                                  "unrelated": 1})
    assert cfg.window == 128 and cfg.sep_cap is None
    with pytest.raises(SepLLMConfigError, match="sepllm.window must be a positive integer"):
        request_config(engine, {"sepllm_window": -3})
    with pytest.raises(SepLLMConfigError, match="key 'windoww' cannot be set per request"):
        request_config(engine, {"sepllm_windoww": 3})


def test_decode_kernel_choice_names_variable_and_value(monkeypatch):
    """VLLM_SEPLLM_DECODE_KERNEL: a bad value, or 'flash' on a GPU without vLLM's
    FlashAttention, is refused by name (decode would otherwise fail on the first step)."""
    import torch

    from vllm_sepllm import backend

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    monkeypatch.setattr(backend, "_flash_attn", lambda: None)
    monkeypatch.delenv("VLLM_SEPLLM_DECODE_KERNEL", raising=False)
    assert backend.decode_kernel_choice(cuda) == "triton"
    assert backend.decode_kernel_choice(torch.device("cpu")) == "torch"
    monkeypatch.setenv("VLLM_SEPLLM_DECODE_KERNEL", "flash")
    with pytest.raises(ValueError, match="VLLM_SEPLLM_DECODE_KERNEL='flash'.*not available"):
        backend.decode_kernel_choice(cuda)
    monkeypatch.setenv("VLLM_SEPLLM_DECODE_KERNEL", "fast")
    with pytest.raises(ValueError, match="flash, triton or torch; got 'fast'"):
        backend.decode_kernel_choice(cuda)
    monkeypatch.setenv("VLLM_SEPLLM_DECODE_KERNEL", "triton")
    assert not backend.always_plain(356, cuda)  # masked prefill: the worker keeps its records
    monkeypatch.setattr(backend, "_flash_attn", lambda: object())
    monkeypatch.setenv("VLLM_SEPLLM_DECODE_KERNEL", "flash")
    assert backend.always_plain(356, cuda) and not backend.always_plain(None, cuda)


def test_fp8_cache_decodes_with_flash_only_where_fa3_reads_it(monkeypatch):
    """An fp8 KV cache goes to FlashAttention under vLLM's own rule for FLASH_ATTN (FA3, compute
    capability 9.x) and only with a bfloat16 model (FA3 writes e4m3 inputs' outputs in bf16);
    otherwise to the Triton kernel. 16-bit caches are unaffected."""
    from types import SimpleNamespace

    import torch

    from vllm_sepllm import backend

    cuda = torch.device("cuda")  # a device object only: nothing runs on it

    def cfg(cache_dtype, model_dtype):
        return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=cache_dtype),
                               model_config=SimpleNamespace(dtype=model_dtype))

    monkeypatch.delenv("VLLM_SEPLLM_DECODE_KERNEL", raising=False)
    monkeypatch.setattr(backend, "_flash_attn", lambda: SimpleNamespace(version=3))
    monkeypatch.setattr(backend, "_cuda_capability", lambda device: (9, 0))
    bf16, fp16 = torch.bfloat16, torch.float16
    assert backend.decode_kernel_choice(cuda, cfg("fp8", bf16)) == "flash"
    assert backend.decode_kernel_choice(cuda, cfg("auto", fp16)) == "flash"
    assert backend.decode_kernel_choice(cuda, cfg("fp8_e4m3", fp16)) == "triton"
    assert not backend.always_plain(356, cuda, cfg("fp8", fp16))
    monkeypatch.setattr(backend, "_cuda_capability", lambda device: (8, 9))  # Ada: no FA3
    assert backend.decode_kernel_choice(cuda, cfg("fp8", bf16)) == "triton"
    monkeypatch.setattr(backend, "_cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(backend, "_flash_attn", lambda: SimpleNamespace(version=2))
    assert backend.decode_kernel_choice(cuda, cfg("fp8", bf16)) == "triton"
    assert backend.decode_kernel_choice(cuda, cfg("bfloat16", bf16)) == "flash"
    monkeypatch.setenv("VLLM_SEPLLM_DECODE_KERNEL", "flash")
    with pytest.raises(ValueError, match="not available on this GPU for an fp8 KV cache"):
        backend.decode_kernel_choice(cuda, cfg("fp8", bf16))


def test_full_decode_batches_take_triton_by_default_only(monkeypatch):
    """All-decode batches that fill the GPU run our Triton kernel when the decode kernel is
    FlashAttention by default, the cache is 16-bit, heads are at most 128 wide and the engine
    uses batched eviction with cache_size <= TRITON_FULL_DECODE_MAX_KEYS (read from the
    engine's additional_config, as the builder passes it); an explicit
    VLLM_SEPLLM_DECODE_KERNEL, an fp8 cache, exact eviction (a request's window may lengthen
    its cache), a larger cache_size, wider heads, no FlashAttention or the CPU keep the
    backend's one kernel."""
    from types import SimpleNamespace

    import torch

    from vllm_sepllm import backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only

    def cfg(sepllm, cache_dtype="auto"):
        return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=cache_dtype),
                               model_config=SimpleNamespace(dtype=torch.bfloat16),
                               additional_config={"sepllm": sepllm})

    top = backend.TRITON_FULL_DECODE_MAX_KEYS
    c356 = {"cache_size": 356}
    monkeypatch.delenv("VLLM_SEPLLM_DECODE_KERNEL", raising=False)
    monkeypatch.setattr(backend, "_flash_attn", lambda: SimpleNamespace(version=3))
    monkeypatch.setattr(backend, "_cuda_capability", lambda device: (9, 0))
    assert backend.triton_full_decode(cuda, cfg(c356), 128)
    assert backend.triton_full_decode(cuda, cfg({"cache_size": top}), 64)
    assert not backend.triton_full_decode(cuda, cfg({"cache_size": top + 1}), 128)
    assert not backend.triton_full_decode(cuda, cfg({}), 128)  # exact eviction
    assert not backend.triton_full_decode(cuda, cfg(c356), 256)
    assert not backend.triton_full_decode(cuda, cfg(c356, "fp8"), 128)
    assert not backend.triton_full_decode(cpu, cfg(c356), 128)
    for choice in ("flash", "triton"):
        monkeypatch.setenv("VLLM_SEPLLM_DECODE_KERNEL", choice)
        assert not backend.triton_full_decode(cuda, cfg(c356), 128), choice
    monkeypatch.delenv("VLLM_SEPLLM_DECODE_KERNEL")
    monkeypatch.setattr(backend, "_flash_attn", lambda: None)  # the backend is Triton already
    assert not backend.triton_full_decode(cuda, cfg(c356), 128)


def test_request_sizes_past_the_context_and_odd_keys_are_refused():
    from vllm_sepllm.config import check_limits

    engine = SepLLMConfig()
    with pytest.raises(SepLLMConfigError, match="extra_args.sepllm keys must be strings, got 1"):
        request_config(engine, {"sepllm": {1: 64}})
    cfg = request_config(engine, {"sepllm_num_sinks": 10 ** 30})  # a valid integer ...
    with pytest.raises(SepLLMConfigError,  # ... past the context
                       match=r"^extra_args.sepllm.num_sinks=10{30} is above max_model_len=2048$"):
        check_limits(cfg, 2048, "extra_args.sepllm")
    check_limits(request_config(engine, {"sepllm": {"window": 2048, "sep_cap": 2048}}), 2048)
    with pytest.raises(SepLLMConfigError, match="window=1000000000 is above max_model_len"):
        check_limits(request_config(engine, {"sepllm": {"mode": "full", "window": 10 ** 9}}),
                     2048)  # one rule in every mode
    # every value given is checked, also one a flat entry overrides: it still travels
    with pytest.raises(SepLLMConfigError,
                       match=r"^extra_args.sepllm.window=10{30} is above max_model_len=2048$"):
        request_config(engine, {"sepllm": {"window": 10 ** 30}, "sepllm_window": 64}, 2048)
    with pytest.raises(SepLLMConfigError, match="sepllm.mode must be one of"):
        request_config(engine, {"sepllm": {"mode": "x"}, "sepllm_mode": "full"})
