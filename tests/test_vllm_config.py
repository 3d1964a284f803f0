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
])
def test_bad_settings_fail_with_one_line(model_path, sepllm, message):
    with pytest.raises(SepLLMConfigError) as e:
        engine_config(model_path, attention_backend="SEPLLM",
                      additional_config={"sepllm": sepllm})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sliding_window_model_is_refused(model_path, tmp_path):
    """A Mistral-style config with a sliding window (weights are not needed to refuse it)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_path}/{name}", tmp_path / name)
    with open(f"{model_path}/config.json") as f:
        config = json.load(f)
    config.update(architectures=["MistralForCausalLM"], model_type="mistral",
                  sliding_window=512)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SepLLMConfigError, match="sliding-window"):
        engine_config(str(tmp_path), attention_backend="SEPLLM")
