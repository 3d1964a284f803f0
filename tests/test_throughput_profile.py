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
