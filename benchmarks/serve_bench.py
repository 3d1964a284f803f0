"""``vllm bench serve`` over a request file of real text, each request replaying its continuation.

    python benchmarks/serve_bench.py --requests REQS.json  <any `vllm bench serve` arguments>

Everything but the requests is vLLM's own ``vllm bench serve`` (``vllm.benchmarks.serve.main``:
arrivals, the OpenAI client, TTFT/TPOT/ITL/E2EL percentiles, goodput, the result JSON). The
requests come from ``REQS.json`` (written by ``serve.py``; no pandas needed) instead of one of
vLLM's datasets:

    {"requests": [{"prompt_ids": [...], "continuation": [...]}, ...], ...}

Each request sends its prompt as token ids (so both backends see exactly the same tokens, and
the prompt lengths are exact), asks for ``len(continuation)`` tokens with ``ignore_eos``, and
carries ``vllm_xargs: {"replay": continuation}``: the server's ``--logits-processors
benchmarks.replay:ReplayLogitsProcessor`` then makes it emit that real text whatever the
weights (see replay.py), so generated tokens hold separators at their natural rate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_requests(path: str | Path, num: int | None = None) -> list:
    """``SampleRequest`` s of ``path`` (the first ``num``, or all; the file's order: serve.py
    shuffles when it writes)."""
    from vllm.benchmarks.datasets import SampleRequest

    data = json.loads(Path(path).read_text())
    reqs = data["requests"]
    if num is not None and num > 0:
        if num > len(reqs):
            raise SystemExit(f"--num-prompts {num}: {path} holds only {len(reqs)} requests")
        reqs = reqs[:num]
    out = []
    for i, r in enumerate(reqs):
        cont = [int(t) for t in r["continuation"]]
        out.append(SampleRequest(prompt=[int(t) for t in r["prompt_ids"]],
                                 prompt_len=len(r["prompt_ids"]), expected_output_len=len(cont),
                                 request_id=f"sepllm-bench-{i}",
                                 request_overrides={"vllm_xargs": {"replay": cont}}))
    return out


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks import serve as vllm_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--requests" not in argv:
        raise SystemExit("serve_bench.py: --requests REQS.json is required")
    i = argv.index("--requests")
    path = argv[i + 1]
    del argv[i:i + 2]
    parser = FlexibleArgumentParser(description=__doc__)
    vllm_serve.add_cli_args(parser)
    # vLLM's dataset checks want a name; ours replaces the loading (get_samples below).
    args = parser.parse_args(["--dataset-name", "custom", "--dataset-path", path, *argv])
    args.ignore_eos = True
    requests = load_requests(path, args.num_prompts)
    vllm_serve.get_samples = lambda _args, _tokenizer: list(requests)
    vllm_serve.main(args)


if __name__ == "__main__":
    main()
