"""SEPLLM under tensor parallelism: greedy tokens at TP=2 equal TP=1 for the same weights.

    python3 benchmarks/tp_check.py --out /tmp/tp.json        # on a machine with 2 GPUs

Weights: a random Llama checkpoint written once (seeded) and loaded by both runs. vLLM's dummy
loader initialises each TP shard on its own, so TP=1 and TP=2 dummy models would differ; a real
checkpoint sliced by vLLM's loader is the same model at any TP size. float32 end to end (our
Triton decode and prefill kernels; FA3 has no fp32), so the only TP difference is the
all-reduce summation order.

Each run is a fresh engine in a subprocess: real-text prompts (SmolLM2's tokenizer), SepLLM
a4/s16/w64 so eviction and compaction run on every rank from the one scheduler decision.
Recorded: tokens equal per request, the first divergence if any, per-request KV figures
(retained/evicted must be identical: they depend only on the tokens), time per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = {  # small Llama: 8 KV heads split over 2 ranks
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
    "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
}
SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}


def run_one(args) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.common import real_prompt_ids

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = real_prompt_ids(tok, args.num_prompts, args.prompt_len, seed=1)
    t0 = time.perf_counter()
    llm = LLM(args.model, tensor_parallel_size=args.tp, attention_backend="SEPLLM",
              dtype="float32", max_model_len=args.prompt_len + args.max_tokens + 16,
              additional_config={"sepllm": SEPLLM}, seed=0, enable_prefix_caching=False,
              gpu_memory_utilization=0.5)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                       ignore_eos=True), use_tqdm=False)
    rec = {"tp": args.tp, "startup_s": round(startup, 1),
           "generate_s": round(time.perf_counter() - t0, 2),
           "tokens": [list(o.outputs[0].token_ids) for o in outs],
           "kv": [(o.kv_transfer_params or {}).get("sepllm") for o in outs]}
    print("RESULT " + json.dumps(rec), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=700)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tokenizer-dir", default=str(ROOT / ".gpu" / "tok"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=None, help=argparse.SUPPRESS)  # one run
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tp is not None:
        return run_one(args)

    os.environ.setdefault("VLLM_SEPLLM_DECODE_KERNEL", "triton")  # fp32: FA3 has none
    from benchmarks.common import make_random_model

    model = make_random_model(Path(tempfile.mkdtemp()) / "llama-small", Path(args.tokenizer_dir),
                              SHAPE, args.seed)
    runs = {}
    for tp in (1, 2):
        cmd = [sys.executable, __file__, "--tp", str(tp), "--model", str(model),
               "--num-prompts", str(args.num_prompts), "--prompt-len", str(args.prompt_len),
               "--max-tokens", str(args.max_tokens)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-4000:])
            raise SystemExit(f"TP={tp} run failed (rc {proc.returncode})")
        runs[tp] = json.loads(lines[-1][len("RESULT "):])
    t1, t2 = runs[1]["tokens"], runs[2]["tokens"]
    equal = sum(a == b for a, b in zip(t1, t2))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                  for a, b in zip(t1, t2)]
    kv_equal = sum(a == b for a, b in zip(runs[1]["kv"], runs[2]["kv"]))
    tokens_equal = sum(x == y for a, b in zip(t1, t2) for x, y in zip(a, b))
    summary = {
        "shape": SHAPE, "sepllm": SEPLLM, "dtype": "float32",
        "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "requests_equal": equal, "tokens_equal": tokens_equal,
        "tokens_total": sum(len(a) for a in t1), "first_divergence": first_diff,
        "kv_stats_equal": kv_equal,
        "kv_example": runs[1]["kv"][0],
        "startup_s": {tp: r["startup_s"] for tp, r in runs.items()},
        "generate_s": {tp: r["generate_s"] for tp, r in runs.items()},
    }
    from benchmarks.common import environment

    summary.update(environment())
    print(json.dumps({k: v for k, v in summary.items() if k != "shape"}, indent=1))
    print(f"TP=2 vs TP=1: {equal}/{len(t1)} requests token-identical, "
          f"{tokens_equal}/{summary['tokens_total']} tokens; KV figures identical for "
          f"{kv_equal}/{len(t1)}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(summary, runs=runs), indent=1))


if __name__ == "__main__":
    main()
