"""Host-time accounting of the SepLLM step, for finding per-step overheads (off by default).

``VLLM_SEPLLM_PROFILE=1`` makes the engine-core process print (to stderr), every ``VLLM_SEPLLM_PROFILE_EVERY``
steps (default 500), the mean host milliseconds per step spent in each timed section:

    sepllm profile: 500 steps | schedule 3.10 ms (evict 1.20) | update_states 0.80 ...

Sections are timed where they run (scheduler, model runner, metadata builder); the model runner
section ``execute`` is the whole ``execute_model`` call (with async scheduling it returns before
the GPU finishes). Off, each hook costs one global bool test.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

ENABLED = os.environ.get("VLLM_SEPLLM_PROFILE", "0") not in ("", "0")
EVERY = int(os.environ.get("VLLM_SEPLLM_PROFILE_EVERY", "500"))

_totals: dict[str, float] = defaultdict(float)
_steps = 0


class section:
    """``with section("name"):`` adds the block's host time to ``name`` (when enabled)."""

    __slots__ = ("name", "t0")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        if ENABLED:
            self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if ENABLED:
            _totals[self.name] += time.perf_counter() - self.t0


def step_done() -> None:
    """Count one engine step; log and reset the means every ``EVERY`` steps."""
    global _steps
    if not ENABLED:
        return
    _steps += 1
    if _steps % EVERY:
        return
    parts = " | ".join(f"{k} {1e3 * v / EVERY:.2f} ms" for k, v in sorted(_totals.items()))
    # stderr, not vLLM's logger: vLLM logs to stdout, which harnesses often capture.
    print(f"sepllm profile: {EVERY} steps | {parts}", file=sys.stderr, flush=True)
    _totals.clear()
