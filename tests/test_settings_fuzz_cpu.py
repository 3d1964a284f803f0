"""Seeded fuzz of the per-request settings (benchmarks/fuzz_settings.py, full size): 10,000
random ``extra_args`` payloads, nested and flat (``vllm_xargs``) forms, every JSON value type,
negative, huge and boundary sizes. The front-end check agrees with an independent statement of
the rules on every one; through a live engine (engine core in its own process) every refused
payload fails in the front end with a ``ValueError``, every accepted one finishes with KV
figures inside its own policy; refused payloads sent past the front end are served with the
engine's settings; afterwards the engine still serves and holds no block."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ten_thousand_payloads(tmp_path):
    out = tmp_path / "fuzz.json"
    # its own process, bounded: a hang fails the test instead of stalling the suite
    proc = subprocess.run([sys.executable, "benchmarks/fuzz_settings.py", "--payloads", "10000",
                           "--seed", "0", "--bypass", "300", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.is_file(), proc.stderr[-6000:]
    record = json.loads(out.read_text())
    contract, live = record["contract"], record["live"]
    assert contract["disagreements"] == 0, contract["examples"]
    assert live["problems"] == 0, live["examples"]
    counts = live["counts"]
    # the draw covers both sides: many accepted (most of them evicting) and many refused
    assert contract["accepted"] > 2500 and contract["refused"] > 5000, contract
    assert counts["finished"] == contract["accepted"]
    assert counts["refused_front_end"] == contract["refused"]
    assert counts["evicting"] > 1000 and counts["other_errors"] == 0, counts
    assert counts["bypassed"] > 250 and counts["bypassed_finished"] == counts["bypassed"]
    for check, ok in record["checks"].items():
        assert ok, (check, live["gauges_after"])
    assert proc.returncode == 0
