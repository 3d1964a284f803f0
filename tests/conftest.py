"""Shared fixtures: the real model (SmolLM2-135M-Instruct, built from a PyPI package),
real-text prompts, and one SEPLLM OpenAI server for the serving tests. GPU-only tests carry the
``gpu`` marker and skip without CUDA."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU machines)")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: count the tests that will run
def pytest_collection_modifyitems(config, items):
    # The tests of the shared server run one after another (from the first one's place), so
    # it is not left idle while other files run.
    users = [item for item in items if "sepllm_http" in getattr(item, "fixturenames", ())]
    if users:
        first = items.index(users[0])
        others = [item for item in items if item not in users]
        items[:] = others[:first] + users + others[first:]
    config.sepllm_http_users = len(users)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _probe_host():
    """The probe host (tests.engine.start_probe: one process runs the in-process engines of
    every module's probe) stops at the end of the session."""
    yield
    from tests.engine import close_probe_host

    close_probe_host()


@pytest.fixture(scope="session", autouse=True)
def _oracle_cache(tmp_path_factory):
    """The Hugging Face oracle's disk cache (tests/oracle_hf.py): ``SEPLLM_ORACLE_CACHE`` where
    set (CI), else a folder for this session, so that a module can compute its references
    while its engines run in a probe process (tests.engine.prefetch) and its tests find them."""
    if os.environ.get("SEPLLM_ORACLE_CACHE"):
        yield
        return
    os.environ["SEPLLM_ORACLE_CACHE"] = str(tmp_path_factory.mktemp("oracle-cache"))
    try:
        yield
    finally:
        os.environ.pop("SEPLLM_ORACLE_CACHE", None)


@pytest.fixture(scope="session")
def model_path() -> str:
    from vllm_sepllm.testing.model import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def _sepllm_http_state(request):
    """The shared server's state; whatever is still running stops at the end of the session."""
    state = {"stack": None, "base": None, "left": getattr(request.config, "sepllm_http_users", 0)}
    yield state
    if state["stack"] is not None:
        state["stack"].close()


@pytest.fixture
def sepllm_http(_sepllm_http_state, model_path, tmp_path_factory) -> tuple[str, str]:
    """(base URL, model) of a ``vllm-sepllm serve MODEL --attention-backend SEPLLM`` server
    (tests.shared_server.SERVER_SEPLLM, float32, eager, on loopback), shared by
    test_serve_cpu.py and test_metrics_cpu.py: one start-up for both. Started by the first
    test that asks for it, stopped after the last one (counted at collection)."""
    from tests.shared_server import SERVER_KWARGS, SERVER_SEPLLM
    from vllm_sepllm.testing.server import sepllm_server

    state = _sepllm_http_state
    if state["stack"] is None:
        stack = contextlib.ExitStack()
        log = tmp_path_factory.mktemp("sepllm-http") / "server.log"
        state["base"] = stack.enter_context(sepllm_server(model_path, SERVER_SEPLLM, log,
                                                          **SERVER_KWARGS))
        state["stack"] = stack
    yield state["base"], model_path
    state["left"] -= 1
    if state["left"] <= 0 and state["stack"] is not None:
        state["stack"].close()
        state["stack"] = None
