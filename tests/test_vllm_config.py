"""Start-up: selecting SEPLLM configures the engine; bad input fails with one line; any other
backend leaves vLLM untouched. No engine is started (config building only)."""

from __future__ import annotations

import json
import shutil

import pytest

from vllm_sepllm.config import SepLLMConfigError


def engine_config(model, **kwargs):
    import vllm.plugins
    from vllm.engine.arg_utils import EngineArgs

    vllm.plugins.load_general_plugins()
    return EngineArgs(model=model, max_model_len=2048, **kwargs).create_engine_config()


def test_sepllm_configures_engine(model_path):
    cfg = engine_config(model_path, attention_backend="SEPLLM",
                        additional_config={"sepllm": {"window": 64}})
    assert cfg.scheduler_config.scheduler_cls.startswith("vllm_sepllm.scheduler.SepLLM")
    assert cfg.parallel_config.worker_cls == "vllm_sepllm.worker.SepLLMCPUWorker"
    assert cfg.cache_config.enable_prefix_caching is True  # vLLM's default, kept
    assert cfg.use_v2_model_runner is False
    resolved = cfg.additional_config["sepllm"]
    assert resolved["window"] == 64 and resolved["num_sinks"] == 4
    assert 30 in resolved["separator_token_ids"]  # "." in SmolLM2


def test_prefix_caching_setting(model_path):
    """Prefix caching stays as the user set it (on by default); only pe_shift turns it off."""
    off = engine_config(model_path, attention_backend="SEPLLM", enable_prefix_caching=False)
    assert off.cache_config.enable_prefix_caching is False
    shift = engine_config(model_path, attention_backend="SEPLLM",
                          additional_config={"sepllm": {"pe_shift": True}})
    assert shift.cache_config.enable_prefix_caching is False


def test_prefix_cache_keys():
    """The key in a request's block hashes: equal exactly when prompt KV is equal."""
    from vllm_sepllm.config import SepLLMConfig

    base = SepLLMConfig()
    assert base.prefix_cache_key == "sepllm:a=4:s=64:w=256"
    assert SepLLMConfig(window=128).prefix_cache_key != base.prefix_cache_key
    assert SepLLMConfig(mode="streamingllm", sep_cap=7).prefix_cache_key == \
        SepLLMConfig(mode="streamingllm").prefix_cache_key  # s plays no part there
    assert SepLLMConfig(mode="full").prefix_cache_key == "causal"
    # Batched eviction computes every prompt with plain causal attention.
    assert {SepLLMConfig(cache_size=400, window=w).prefix_cache_key for w in (64, 256)} == {"causal"}


def test_other_backend_untouched(model_path):
    cfg = engine_config(model_path)
    assert cfg.scheduler_config.scheduler_cls is None
    assert cfg.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
    assert cfg.cache_config.enable_prefix_caching is True
    assert "sepllm" not in (cfg.additional_config or {})


@pytest.mark.parametrize("sepllm, message", [
    ({"window": 0}, "sepllm.window must be a positive integer, got 0"),
    ({"windw": 3}, "unknown key 'windw'"),
    ({"mode": "snap"}, "sepllm.mode must be one of sepllm, streamingllm, full; got 'snap'"),
    ({"window": 4096}, "sepllm.window=4096 is above max_model_len=2048"),
    ({"num_sinks": -4}, "sepllm.num_sinks must be an integer >= 0, got -4"),
    ({"num_sinks": 10 ** 30}, "sepllm.num_sinks=1000000000000000000000000000000 is above "
                              "max_model_len=2048"),
    ({"sep_cap": 2049}, "sepllm.sep_cap=2049 is above max_model_len=2048"),
])
def test_bad_settings_fail_with_one_line(model_path, sepllm, message):
    with pytest.raises(SepLLMConfigError) as e:
        engine_config(model_path, attention_backend="SEPLLM",
                      additional_config={"sepllm": sepllm})
    assert message in str(e.value) and "\n" not in str(e.value)


def config_folder(model_path, folder, **changes) -> str:
    """SmolLM2's config with ``changes`` and its tokenizer in ``folder`` (no weights: start-up
    checks do not load them)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_path}/{name}", folder / name)
    with open(f"{model_path}/config.json") as f:
        config = json.load(f)
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_sliding_window_model_is_refused(model_path, tmp_path):
    """A Mistral-style config with a sliding window."""
    model = config_folder(model_path, tmp_path, architectures=["MistralForCausalLM"],
                          model_type="mistral", sliding_window=512)
    with pytest.raises(SepLLMConfigError, match="sliding-window.*--disable-sliding-window"):
        engine_config(model, attention_backend="SEPLLM")
    # vLLM's --disable-sliding-window: full attention, max_model_len at most the window.
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=model, max_model_len=512, attention_backend="SEPLLM",
                     disable_sliding_window=True).create_engine_config()
    assert cfg.model_config.get_sliding_window() is None
    assert cfg.additional_config["sepllm"]["window"] == 256


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_cache_dtype="fp8_e5m2"),
     "SEPLLM does not support kv_cache_dtype='fp8_e5m2'; use one of auto, float16, bfloat16, "
     "fp8, fp8_e4m3"),
    (dict(kv_cache_dtype="fp8", additional_config={"sepllm": {"pe_shift": True}}),
     "sepllm.pe_shift=true needs a 16-bit KV cache, not kv_cache_dtype='fp8'"),
])
def test_unsupported_kv_cache_fails_with_one_line(model_path, kwargs, message):
    with pytest.raises(SepLLMConfigError) as e:
        engine_config(model_path, attention_backend="SEPLLM", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fp8_kv_cache_accepted(model_path):
    cfg = engine_config(model_path, attention_backend="SEPLLM", kv_cache_dtype="fp8")
    assert cfg.cache_config.cache_dtype == "fp8"


@pytest.mark.parametrize("kwargs, message", [
    (dict(pipeline_parallel_size=2),
     "SEPLLM does not support pipeline parallelism (pipeline_parallel_size=2)"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                              "prompt_lookup_max": 3}),
     "SEPLLM does not support speculative decoding (speculative_config is set)"),
    (dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
     "SEPLLM does not support KV connectors (kv_transfer_config is set): external KV loads "
     "assume an uncompacted cache"),
], ids=["pipeline", "speculative", "kv-connector"])
def test_unsupported_engine_features_fail_with_one_line(model_path, kwargs, message):
    with pytest.raises(SepLLMConfigError) as e:
        engine_config(model_path, attention_backend="SEPLLM", **kwargs)
    assert str(e.value) == message


def test_mla_model_is_refused(model_path, tmp_path):
    """A DeepSeek-V2-style config (MLA: compressed KV)."""
    model = config_folder(model_path, tmp_path, architectures=["DeepseekV2ForCausalLM"],
                          model_type="deepseek_v2", kv_lora_rank=64, q_lora_rank=None,
                          qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                          n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                          first_k_dense_replace=1, n_shared_experts=1)
    with pytest.raises(SepLLMConfigError) as e:
        engine_config(model, attention_backend="SEPLLM")
    assert str(e.value) == "SEPLLM does not support MLA attention (model DeepseekV2ForCausalLM)"
