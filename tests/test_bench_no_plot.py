"""Every benchmark finishes, prints its tables and exits 0 without matplotlib (an optional
dependency): the report/plot entry point of each script that can plot runs on a stored result in
a subprocess where matplotlib (and seaborn, pandas) cannot be imported, even if installed; and no
benchmark imports them anywhere but ``benchmarks.common.pyplot``. CPU only, a few seconds."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import NO_PLOT

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
PLOTTING = ("matplotlib", "seaborn", "pandas")

# An import hook ahead of every other that refuses the plotting libraries.
NO_PLOTTING = f"""
import importlib.abc, os, runpy, sys
class _NoPlotting(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {PLOTTING!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)",
                                      name=name)
        return None
sys.meta_path.insert(0, _NoPlotting())
"""
# Then runs a script as `python script.py ARGS` would.
WRAPPER = NO_PLOTTING + """
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))
runpy.run_path(script, run_name="__main__")
"""


def run_without_plotting(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(BENCH / script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, (f"{script} {' '.join(args)} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert proc.stdout.count(NO_PLOT) == 1, proc.stdout[-3000:]
    return proc.stdout


def stored(name: str, tmp_path: Path) -> Path:
    """A copy of a stored result (the scripts write their PNG next to the JSON)."""
    return Path(shutil.copy(RESULTS / name, tmp_path / name))


def test_blocker_blocks():
    for name in PLOTTING:
        proc = subprocess.run([sys.executable, "-c", NO_PLOTTING + f"import {name}"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "blocked by the test" in proc.stderr, proc.stderr


def test_ppl_plot_only(tmp_path):
    src = stored("cpu_ppl_punct_separators.json.xz", tmp_path)
    out = run_without_plotting("ppl.py", "--plot-only", str(src))
    assert "Perplexity, 1 x 8192 tokens" in out
    row = next(line for line in out.splitlines() if line.startswith("sepllm:a4s64w256+shift"))
    assert row.split()[1:3] == ["324", "28.900"], row
    assert not list(tmp_path.glob("*.png"))


def test_throughput_plot_only(tmp_path):
    src = stored("cpu_throughput_tiny_smollm2.json", tmp_path)
    out = run_without_plotting("throughput.py", "--plot-only", str(src))
    assert "speed-up" in out and "SEPLLM a4s64w256" in out and "workload tiny" in out
    assert not list(tmp_path.glob("*.png"))


def test_plot_prefix(tmp_path):
    out = run_without_plotting("plot_prefix.py", "--dir", str(RESULTS), "--points", "light",
                               "--out", str(tmp_path / "prefix.png"))
    assert "### light" in out and "| SEPLLM / FLASH_ATTN |" in out
    assert not list(tmp_path.glob("*.png"))


def test_stream_plot(tmp_path):
    src = stored("h200_stream_4m.json", tmp_path)
    out = run_without_plotting("stream.py", "--plot", str(src))
    assert '"tok_per_s"' in out and '"kv_blocks_used_max"' in out
    assert not list(tmp_path.glob("*.png"))


def test_kernels_plot_only(tmp_path):
    src = stored("h200_kernels.json", tmp_path)
    out = run_without_plotting("kernels.py", "--plot-only", str(src))
    assert "decode:" in out and "compact:" in out and "prefill:" in out
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_plotting_imported_only_through_pyplot(path):
    """A plotting import anywhere else (top level or in a function) would fail without it."""
    tree = ast.parse(path.read_text())
    allowed: set[int] = set()
    if path.name == "common.py":
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "pyplot")
        allowed = {id(n) for n in ast.walk(fn)}
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        for name in names:
            if name.partition(".")[0] in PLOTTING:
                assert id(node) in allowed, (f"{path.name}:{node.lineno} imports {name}: use "
                                             "benchmarks.common.pyplot()")
