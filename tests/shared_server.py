"""Settings of the SEPLLM OpenAI server that test_serve_cpu.py and test_metrics_cpu.py share
(the ``sepllm_http`` fixture of conftest.py)."""

#: a, s, w of the server's engine-level SepLLM config.
SERVER_SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}
#: ``max_num_batched_tokens``: long prompts are prefilled in chunks.
SERVER_CHUNK = 256
SERVER_KWARGS = dict(max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=SERVER_CHUNK,
                     kv_cache_gib=1)
