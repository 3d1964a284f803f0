"""/metrics on CPU with the real model: the ``vllm:sepllm_*`` metrics (metrics.py) agree with
the per-request figures returned in ``kv_transfer_params["sepllm"]`` and with vLLM's own
metrics; gauges show one request's bounded KV mid-stream and an empty pool after an abort."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.shared_server import SERVER_SEPLLM
from vllm_sepllm.testing.server import post_json, scrape, wait_idle

# num_sinks, sep_cap, window of the server (the sepllm_http fixture, shared with test_serve_cpu.py)
A, S, W = SERVER_SEPLLM["num_sinks"], SERVER_SEPLLM["sep_cap"], SERVER_SEPLLM["window"]


def test_stats_survive_engine_core_serialization():
    """The SepLLM figures cross the engine-core -> front-end boundary (msgspec, patches.py
    item 7) and vLLM's own fields stay intact."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    import vllm_sepllm
    from vllm_sepllm.metrics import SepLLMSchedulerStats, SepLLMStepStats

    vllm_sepllm.register()
    step = SepLLMStepStats(evicted_tokens=7, freed_blocks=2, compaction_seconds=0.25,
                           retained_tokens=84, kv_blocks_used=3, kv_blocks_free=100)
    stats = SepLLMSchedulerStats(num_running_reqs=5, kv_cache_usage=0.03, sepllm=step)
    out = MsgpackDecoder(EngineCoreOutputs).decode(
        MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats)))
    assert out.scheduler_stats.sepllm == step
    assert out.scheduler_stats.num_running_reqs == 5
    assert out.scheduler_stats.kv_cache_usage == 0.03


def test_worker_stats_ride_the_model_output():
    """Compaction time is attached to real model outputs (also pickled, as the multiprocess
    executor sends them), to async ones when fetched, never to vLLM's shared empty output."""
    import pickle

    from vllm.v1.outputs import (
        EMPTY_MODEL_RUNNER_OUTPUT,
        AsyncModelRunnerOutput,
        ModelRunnerOutput,
    )

    from vllm_sepllm.metrics import CompactionTimer, attach_worker_stats, worker_stats_of

    timer = CompactionTimer(torch.device("cpu"))
    timer.start()
    time.sleep(0.01)
    timer.stop()
    assert attach_worker_stats(EMPTY_MODEL_RUNNER_OUTPUT, timer) is EMPTY_MODEL_RUNNER_OUTPUT
    assert worker_stats_of(EMPTY_MODEL_RUNNER_OUTPUT) is None
    out = attach_worker_stats(ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}), timer)
    seconds = worker_stats_of(pickle.loads(pickle.dumps(out))).compaction_seconds
    assert 0.01 <= seconds < 5
    assert timer.take() == 0.0  # taken once

    class Pending(AsyncModelRunnerOutput):
        def get_output(self):
            return ModelRunnerOutput(req_ids=["b"], req_id_to_index={"b": 0})

    timer.start()
    timer.stop()
    pending = attach_worker_stats(Pending(), timer)
    assert worker_stats_of(pending.get_output()).compaction_seconds > 0
    assert attach_worker_stats(None, timer) is None


@pytest.mark.gpu
def test_cuda_compaction_timer_taken_from_another_thread():
    """vLLM fetches async model outputs (and so ``take()``s the timer) on another thread; one
    ``take()`` between ``start()`` and ``stop()`` crashed TP=2 W1 on the H200 ('Both events
    must be recorded'): an unrecorded end event queries as complete."""
    import threading

    from vllm_sepllm.metrics import CompactionTimer

    timer = CompactionTimer(torch.device("cuda"))
    x = torch.randn(2048, 2048, device="cuda")
    reference_start = torch.cuda.Event(enable_timing=True)
    reference_end = torch.cuda.Event(enable_timing=True)
    taken = []
    reference_start.record()
    timer.start()
    worker = threading.Thread(target=lambda: taken.append(timer.take()))
    worker.start()
    worker.join()
    for _ in range(20):
        x = x @ x / 2048
    timer.stop()
    reference_end.record()
    torch.cuda.synchronize()
    assert taken == [0.0]
    seconds = timer.take()
    assert 0 < seconds <= reference_start.elapsed_time(reference_end) / 1000.0 + 1e-4
    assert timer.take() == 0.0


@pytest.fixture
def server(sepllm_http):
    """The SEPLLM server (conftest.sepllm_http: max_num_seqs 8, prefill chunks of 256)."""
    return sepllm_http


def _delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_counters_match_request_stats(server, tokenizer):
    base, model = server
    from vllm_sepllm.testing.texts import real_text_prompts

    prompts = [p for n in (150, 400, 700, 950) for p in real_text_prompts(tokenizer, 2, n,
                                                                          seed=n)]
    before = scrape(base)
    assert before["vllm:sepllm_config_info"] == 1

    def complete(prompt: str) -> dict:
        status, body = post_json(base + "/v1/completions",
                                 {"model": model, "prompt": prompt, "max_tokens": 24,
                                  "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        return body

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as pool:
        bodies = list(pool.map(complete, prompts))
    elapsed = time.monotonic() - t0
    after = wait_idle(base)

    stats = [b["kv_transfer_params"]["sepllm"] for b in bodies]
    for s, b in zip(stats, bodies):
        # KV was computed for every token but the last sampled one
        assert s["tokens"] == b["usage"]["total_tokens"] - 1
        assert s["kv_retained"] + s["kv_evicted"] == s["tokens"]
        assert s["kv_retained"] <= A + S + W
    # the SepLLM counters add up to the per-request figures
    assert _delta(after, before, "vllm:sepllm_evicted_tokens_total") == sum(
        s["kv_evicted"] for s in stats) > 0
    assert _delta(after, before, "vllm:sepllm_freed_blocks_total") == sum(
        s["kv_blocks_freed"] for s in stats) > 0
    compactions = sum(s["compactions"] for s in stats)
    assert _delta(after, before, "vllm:sepllm_compactions_total") == compactions > 0
    moved = _delta(after, before, "vllm:sepllm_moved_tokens_total")
    assert 0 < moved <= sum(s["kv_evicted"] for s in stats)  # a hole is filled at most once
    for name in ("vllm:sepllm_compaction_seconds_total", "vllm:sepllm_eviction_seconds_total"):
        assert 0 < _delta(after, before, name) < elapsed, name
    # ... and ride the same stats stream as vLLM's own counters
    assert _delta(after, before, "vllm:prompt_tokens_total") == sum(
        b["usage"]["prompt_tokens"] for b in bodies)
    # drained: nothing held
    for name in ("vllm:sepllm_retained_tokens", "vllm:sepllm_context_tokens",
                 "vllm:sepllm_kv_blocks_used", "vllm:sepllm_num_requests",
                 "vllm:kv_cache_usage_perc"):
        assert after[name] == 0, name
    assert after["vllm:sepllm_kv_blocks_free"] > 0


def test_gauges_mid_stream_and_after_abort(server, tokenizer):
    base, model = server
    from vllm_sepllm.testing.texts import real_text_prompts

    prompt = real_text_prompts(tokenizer, 1, 1000, seed=7)[0]
    num_prompt = len(tokenizer(prompt).input_ids)
    body = {"model": model, "prompt": prompt, "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=300)
    chunks = 0
    for line in resp:
        if line.startswith(b"data: {"):
            chunks += 1
            if chunks == 20:
                break
    mid = scrape(base)
    resp.close()  # the client goes away: vLLM aborts the request
    after = wait_idle(base)

    assert mid["vllm:sepllm_num_requests"] == 1
    assert mid["vllm:sepllm_context_tokens"] >= num_prompt + 19
    # decoding: the cache holds at most a + s + w tokens (+1 scheduled ahead, async)
    assert 0 < mid["vllm:sepllm_retained_tokens"] <= A + S + W + 1
    used, free = mid["vllm:sepllm_kv_blocks_used"], mid["vllm:sepllm_kv_blocks_free"]
    assert used >= 1
    # our block gauges agree with vLLM's usage gauge
    assert mid["vllm:kv_cache_usage_perc"] == pytest.approx(used / (used + free))
    # the abort returned everything
    assert after["vllm:sepllm_kv_blocks_used"] == 0
    assert after["vllm:sepllm_num_requests"] == 0
    assert after["vllm:sepllm_kv_blocks_free"] == used + free
