"""Independent reference for SepLLM with PE shift: a hand-written streaming loop over the Hugging
Face Llama modules that stores keys **un-rotated** and applies RoPE afresh at every step (the
official code's design), where the plugin re-rotates rotated keys in place.

Nothing here comes from the plugin: the model is Hugging Face transformers in float32 (its
embedding, norms, projections, MLP, its ``LlamaRotaryEmbedding`` and ``apply_rotary_pos_emb``);
visibility is the independent oracle's (tests/oracle_hf.py).

Semantics (the plugin's, stated in vllm_sepllm/rope_shift.py): the sequence is processed in
steps (prefill chunks of ``chunk`` tokens, then one token per step). Before a step that starts
at logical position ``n`` the cache holds ``R(n)``, the keys query ``n`` sees; they sit at RoPE
positions ``0..|R(n)|-1`` in logical order, and the step's tokens at ``|R(n)|, |R(n)|+1, ...``.
Each query of the step attends the keys of ``R(n)`` and of the step that it sees (SepLLM mask on
logical positions).
"""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.oracle_hf import _visible_rows, load_model


@torch.inference_mode()
def stream(model_path: str, token_ids: list[int], sep_ids, a: int, s: int | None, w: int,
           chunk: int, num_prompt: int, max_new_tokens: int = 0, mode: str = "sepllm",
           pe_shift: bool = True) -> tuple[list[float], list[int]]:
    """Run ``token_ids[:num_prompt]`` in chunks of ``chunk`` tokens, then greedily generate
    ``max_new_tokens`` tokens one per step.

    Args:
        token_ids: the prompt (only the first ``num_prompt`` ids are used).
        sep_ids, a, s, w: SepLLM retention; ``mode="streamingllm"`` drops separators.
        pe_shift: RoPE positions relative to the cache (True) or logical positions (False).

    Returns:
        (prompt_logprobs, generated): ``prompt_logprobs[i]`` is the log-probability of prompt
        token ``i + 1`` given tokens ``0..i`` (``num_prompt - 1`` values); the generated ids.
    """
    if mode == "streamingllm":
        sep_ids = ()
    model = load_model(model_path)
    inner = model.model
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    groups = heads // kv_heads
    layers = inner.layers

    tokens = list(token_ids[:num_prompt])
    kept: list[int] = []  # logical positions of the cached keys, ascending
    keys = [torch.zeros(kv_heads, 0, head_dim) for _ in layers]  # un-rotated
    values = [torch.zeros(kv_heads, 0, head_dim) for _ in layers]
    logprobs: list[float] = []
    generated: list[int] = []

    def rope(x: torch.Tensor, pos: list[int]) -> torch.Tensor:
        """[H, T, D] rotated at positions ``pos`` with the model's own RoPE."""
        cos, sin = inner.rotary_emb(x, torch.tensor([pos]))
        return apply_rotary_pos_emb(x[None], x[None], cos, sin)[0][0]

    n = 0
    while n < len(tokens):
        step = min(chunk, num_prompt - n) if n < num_prompt else 1
        ids = tokens[n:n + step]
        visible = torch.from_numpy(_visible_rows(tokens[:n + step], sep_ids, a, s, w, n))
        # Evict what query n cannot see (visibility is monotone: no later query sees it).
        keep = [i for i, p in enumerate(kept) if bool(visible[0, p])]
        kept = [kept[i] for i in keep]
        keys = [k[:, keep] for k in keys]
        values = [v[:, keep] for v in values]
        base = len(kept) if pe_shift else n
        key_pos = list(range(len(kept))) if pe_shift else kept
        q_pos = list(range(base, base + step))
        mask = visible[:, kept + list(range(n, n + step))]  # [step, |R| + step]

        x = inner.embed_tokens(torch.tensor(ids))  # [step, hidden]
        for li, layer in enumerate(layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(step, heads, head_dim).transpose(0, 1)
            k = attn.k_proj(h).view(step, kv_heads, head_dim).transpose(0, 1)
            v = attn.v_proj(h).view(step, kv_heads, head_dim).transpose(0, 1)
            keys[li] = torch.cat((keys[li], k), dim=1)
            values[li] = torch.cat((values[li], v), dim=1)
            k_all = rope(keys[li], key_pos + q_pos).repeat_interleave(groups, dim=0)
            v_all = values[li].repeat_interleave(groups, dim=0)
            scores = rope(q, q_pos) @ k_all.transpose(1, 2) / math.sqrt(head_dim)
            scores = scores.masked_fill(~mask[None], float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v_all  # [H, step, D]
            x = x + attn.o_proj(out.transpose(0, 1).reshape(step, heads * head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = model.lm_head(inner.norm(x)).float()  # [step, vocab]
        lp = torch.log_softmax(logits, dim=-1)
        kept += list(range(n, n + step))
        for i in range(step):
            target = n + i + 1
            if target < num_prompt:
                logprobs.append(float(lp[i, tokens[target]]))
        n += step
        if n == len(tokens) and len(generated) < max_new_tokens:
            generated.append(int(logits[-1].argmax()))
            tokens.append(generated[-1])
    return logprobs, generated
