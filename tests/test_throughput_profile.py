"""``throughput.py --profile-steps``: the summary of the table vLLM's profiler writes in the
engine core, read from a real H200 table (torch.profiler's format, kept in results/logs)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.throughput import profile_summary

LOG = (Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "logs"
       / "h200_timeline_c356_after_3bb30d7.txt")


def test_profile_summary_reads_kernel_time(tmp_path):
    text = LOG.read_text()
    # The first torch.profiler table of the timeline (sorted by device time), 20 steps.
    start = text.index("-" * 60)
    table = text[start:text.index("Self CUDA time total", start)]
    table += text[text.index("Self CUDA time total", start):].splitlines()[0] + "\n"
    (tmp_path / "profiler_out_0.txt").write_text(table)
    got = profile_summary(tmp_path, steps=20, delay=600)
    cuda_ms = float(table.split("Self CUDA time total: ")[1].split("ms")[0])
    assert got["gpu_kernel_ms_per_step"] == round(cuda_ms / 20, 3)
    assert 15 < got["gpu_kernel_ms_per_step"] < 25  # the H200 decode step measured there
    assert got["cpu_op_ms_per_step"] is not None
    # the table's first eight rows, in order: FA3 first, the lm_head GEMM (a short,
    # right-aligned name) fifth
    assert len(got["top"]) == 8
    assert got["top"][0].startswith("void cutlass::device_kernel<flash::")
    assert got["top"][4].startswith("aten::mm ")


def test_profile_summary_without_table(tmp_path):
    got = profile_summary(tmp_path, steps=5, delay=10)
    assert got["error"] == "no profiler_out_0.txt written" and got["steps"] == 5


def _trace(path, events):
    import gzip
    import json

    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def _x(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}


def test_trace_gaps_splits_busy_idle_and_attributes_the_host(tmp_path):
    """Three steps of 1,000 us (four step annotations): GPU busy 800 / 700 / 900 us; the idle
    stretches are covered by a SepLLM scope (150 us), a runner scope (300 us) and nothing
    (150 us, of which 100 us between the last two steps)."""
    from benchmarks.trace_gaps import find_trace, load_events, summarize

    step = "execute_context_0(0)_generation_512(512)"
    events = [_x("gpu_user_annotation", step, t, 900) for t in (0, 1000, 2000, 3000)]
    events += [_x("kernel", "gemm", 0, 500), _x("kernel", "attn", 450, 350),  # overlapping
               _x("kernel", "gemm", 1000, 700), _x("gpu_memcpy", "HtoD", 2000, 100),
               _x("kernel", "gemm", 2100, 800), _x("kernel", "gemm", 3000, 500)]
    events += [_x("user_annotation", "sepllm: eviction", 750, 200),
               _x("user_annotation", "gpu_model_runner: preprocess", 1650, 450),
               _x("user_annotation", step, 0, 10),  # the step's CPU twin: not a host phase
               {"ph": "i", "cat": "kernel", "name": "instant", "ts": 10}]
    sub = tmp_path / "profile" / "rank0"
    sub.mkdir(parents=True)
    _trace(sub / "host.123.pt.trace.json.gz", events)
    path = find_trace(tmp_path / "profile")
    assert path is not None and path.name == "host.123.pt.trace.json.gz"
    got = summarize(load_events(path), min_gap_us=10)
    assert got["steps"] == 3
    assert got["period_ms"] == 1.0
    assert got["gpu_busy_ms"] == 0.8 and got["gpu_idle_ms"] == 0.2
    assert got["gpu_idle_share"] == 0.2
    assert got["gaps_per_step"] == 1.0 and got["gap_ms_per_step"] == 0.2
    assert got["idle_by_host_annotation_ms_per_step"] == {
        "gpu_model_runner: preprocess": 0.1, "sepllm: eviction": 0.05, "unannotated": 0.05}
    assert got["largest_gaps_us"] == [300.0, 200.0, 100.0]
    # A larger minimum gap drops the 100 us stretch from the attribution, not from idle.
    got = summarize(load_events(path), min_gap_us=150)
    assert got["gpu_idle_ms"] == 0.2 and got["gaps_per_step"] == round(2 / 3, 2)
    assert got["idle_by_host_annotation_ms_per_step"]["unannotated"] == round(50 / 3 / 1e3, 3)


def test_trace_gaps_without_steps(tmp_path):
    from benchmarks.trace_gaps import find_trace, summarize

    assert find_trace(tmp_path) is None
    got = summarize([_x("kernel", "gemm", 0, 10)])
    assert got["steps"] == 0 and "fewer than two" in got["error"]
    step = "execute_context_1(16)_generation_0(0)"
    got = summarize([_x("gpu_user_annotation", step, t, 5) for t in (0, 10)])
    assert got["steps"] == 1 and got["error"] == "no GPU work in the trace"
