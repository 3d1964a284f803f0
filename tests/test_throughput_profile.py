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


def test_trace_gaps_steps_from_the_runner_scope():
    """vLLM 0.26's trace on the H200 marks ``execute_context_*`` on the host only: steps then
    start at the GPU side of ``gpu_model_runner: preprocess`` (not at the host annotation,
    which runs ahead of the GPU). Two regimes: a host-bound step (GPU idle 600 of 1,000 us)
    then GPU-bound ones (idle 0)."""
    from benchmarks.trace_gaps import step_starts, summarize

    step = "execute_context_0(0)_generation_512(512)"
    events = [_x("user_annotation", step, t, 300) for t in (-5000, -4000, -3000, -2000)]
    events += [_x("gpu_user_annotation", "gpu_model_runner: preprocess", t, 50)
               for t in (0, 1000, 2000, 3000)]
    events += [_x("kernel", "gemm", 0, 400), _x("kernel", "gemm", 1000, 1000),
               _x("kernel", "gemm", 2000, 1000)]
    # Host phases per host step: one scope of 100 us in the first two steps, two of 60 us in
    # the third (summed: 120 us); the median is 100 us.
    events += [_x("user_annotation", "sepllm: eviction", t, d)
               for t, d in ((-4900, 100), (-3900, 100), (-2900, 60), (-2800, 60))]
    assert step_starts(events) == [0.0, 1000.0, 2000.0, 3000.0]
    got = summarize(events)
    assert got["steps"] == 3 and got["steps_ms"] == [[1.0, 0.6], [1.0, 0.0], [1.0, 0.0]]
    assert got["host_phase_ms_per_step"] == {"execute_context": 0.3, "sepllm: eviction": 0.1}
    # Without the runner scope on the GPU, the host annotation marks the steps.
    host_only = [e for e in events if e["cat"] != "gpu_user_annotation"]
    assert step_starts(host_only) == [-5000.0, -4000.0, -3000.0, -2000.0]


def test_step_log_summary_splits_the_wall_time():
    """A timed window of 10 s: 1 s before the first step, two prompt steps of 1 s, then decode
    steps of 0.5 s, one of them 2 s (slow: 1.5 s beyond 1.25 x its median of 0.5 s), and a
    collector pause inside the window (another before it is left out)."""
    from benchmarks.trace_gaps import step_log_summary

    t0 = 100.0
    steps = [[99.0, 5, 1]]  # the warm-up, before the window
    t = t0 + 1.0
    for _ in range(2):
        steps.append([t, 4096, 3])
        t += 1.0
    periods = [0.5] * 7 + [2.0] + [0.5] * 3
    for p in periods:
        steps.append([t, 8, 8])
        t += p
    assert t == t0 + 10.0
    gc_log = {"pauses": [[99.5, 2, 0.2], [105.0, 2, 0.03], [106.0, 0, 0.002]],
              "totals": [[50, 0.01], [5, 0.01], [2, 0.23]]}
    got = step_log_summary(steps, gc_log, t0, t0 + 10.0)
    assert got["wall_s"] == 10.0 and got["before_first_step_s"] == 1.0 and got["steps"] == 13
    assert got["with_prompt_tokens"] == {"steps": 2, "time_s": 2.0, "p50_ms": 1000.0,
                                         "tokens": 8192}
    d = got["decode"]
    assert d["steps"] == 11 and d["time_s"] == 7.0 and d["p50_ms"] == 500.0
    assert d["max_ms"] == 2000.0 and d["slow_steps"] == 1 and d["slow_excess_s"] == 1.38
    assert d["mean_rows"] == 8.0
    assert got["gc"]["pauses_over_1ms"] == 2 and got["gc"]["pause_s"] == 0.032
    assert got["gc"]["max_pause_ms"] == 30.0 and got["gc"]["by_generation"] == {
        "0": 1, "1": 0, "2": 1}
    assert step_log_summary(steps, None, 0.0, 50.0) == {"error": "no steps in the timed window"}


def test_step_log_of_the_tracking_scheduler(tmp_path, monkeypatch):
    """The tracking schedulers (both backends' benchmarks) log each step's wall time, tokens and
    rows, and the collector's work, into the KV trace file; at shutdown the collector hook
    goes."""
    import gc
    import json
    import types

    from vllm_sepllm.instrument import TRACE_ENV, _TrackingMixin

    class Pool:
        num_gpu_blocks = 101

        def get_num_free_blocks(self):
            return 60

    class Base:
        def __init__(self):
            self.kv_cache_manager = types.SimpleNamespace(block_pool=Pool())
            self.running = [1, 2, 3]
            self.outputs = iter([(3, {"a": 1, "b": 1, "c": 1}), (40, {"a": 38, "b": 1, "c": 1})])

        def schedule(self):
            total, per = next(self.outputs)
            return types.SimpleNamespace(total_num_scheduled_tokens=total,
                                         num_scheduled_tokens=per)

        def shutdown(self):
            pass

    class Sched(_TrackingMixin, Base):
        pass

    path = tmp_path / "kv.json"
    monkeypatch.setenv(TRACE_ENV, str(path))
    s = Sched()
    assert s._gc_callback in gc.callbacks
    s.schedule()
    s.schedule()
    before = sum(n for n, _ in s._gc_totals)
    gc.collect()
    assert s._gc_totals[2][0] >= 1 and sum(n for n, _ in s._gc_totals) > before
    s.shutdown()
    assert s._gc_callback not in gc.callbacks
    data = json.loads(path.read_text())
    assert data["peak_kv_blocks"] == 40 and data["peak_running"] == 3
    assert [st[1:] for st in data["steps"]] == [[3, 3], [40, 3]]
    assert data["steps"][0][0] <= data["steps"][1][0]
    assert data["gc"]["totals"][2][0] >= 1
    # Without the variable nothing is logged and no hook is installed.
    monkeypatch.delenv(TRACE_ENV)
    quiet = Sched()
    quiet.schedule()
    assert quiet._step_log is None and quiet._gc_callback not in gc.callbacks
