"""Checkers for notebook 02 (LLaMA from its blocks): RMSNorm by hand, the parameter count of a
LLaMA shape, and the size of the KV cache.

The right answers come from the model itself (``RMSNorm``, ``Llama.num_params`` on the meta device);
the wrong ones the checkers recognise are LayerNorm, a tied head, a 4C feed-forward, missing norms, ...
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..model import Llama, LlamaConfig, RMSNorm
from .feedback import CheckResult, _ok, _no, _missing, _is_blank, _as_int, _check_count, _call, _same, _diagnose


def check_rmsnorm(fn: Optional[Callable]) -> CheckResult:
    """Exercise: write ``my_rmsnorm(x, weight, eps)`` = x / sqrt(mean(x^2) + eps) * weight over the last dim."""
    if _is_blank(fn):
        return _missing("your function my_rmsnorm(x, weight, eps)")
    if not callable(fn):
        return _no(f"pass the function itself (my_rmsnorm), not {type(fn).__name__}.")
    gen = torch.Generator().manual_seed(0)
    eps = 1e-5
    # Small values make eps matter; a non-zero mean tells RMSNorm from LayerNorm.
    x = (torch.randn(3, 4, 8, generator=gen) + 0.5) * 3e-3
    weight = torch.rand(8, generator=gen) + 0.5
    out, err = _call(fn, (x.clone(), weight.clone(), eps), "my_rmsnorm(x, weight, eps)")
    if err is not None:
        return err
    norm = RMSNorm(8, eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        expected = norm(x)
    ms = x.pow(2).mean(-1, keepdim=True)
    centered = x - x.mean(-1, keepdim=True)
    mistakes = {
        "you subtract the mean first: that is LayerNorm. RMSNorm only rescales, it never centres.":
            centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * weight,
        "the values are right before the last step: multiply by the learned `weight` at the end.":
            x * torch.rsqrt(ms + eps),
        "eps belongs inside the square root: x / sqrt(mean(x^2) + eps).":
            x / (ms.sqrt() + eps) * weight,
        "eps is missing: with tiny inputs, mean(x^2) is about the size of eps, so it matters.":
            x * torch.rsqrt(ms) * weight,
        "you divide by mean(x^2) + eps; take its square root first.":
            x / (ms + eps) * weight,
        "you sum x^2 over the features; RMSNorm takes the mean (root *mean* square).":
            x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight,
        "you average over the wrong dimension: normalise over the last one (the features), keepdim=True.":
            x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * weight,
        "you average over all elements; each token (last dimension) is normalised on its own.":
            x * torch.rsqrt(x.pow(2).mean() + eps) * weight,
    }
    if _same(out, expected):
        return _ok("Every token vector is divided by its root mean square, then scaled by the learned weight.")
    return _diagnose(out, expected, mistakes, "my_rmsnorm")


def llama_param_count(
    config: LlamaConfig,
    tied_embeddings: bool = False,
    norms: bool = True,
    ffn_hidden: Optional[int] = None,
    ffn_matrices: int = 3,
    kv_heads: Optional[int] = None,
) -> int:
    """Parameter count of a LLaMA shape, term by term (the variants model common mistakes)."""
    C, N, V, d = config.dim, config.n_layers, config.vocab_size, config.head_dim
    hidden = config.ffn_hidden_dim if ffn_hidden is None else ffn_hidden
    kv = config.n_kv_heads if kv_heads is None else kv_heads
    attention = C * C + 2 * C * kv * d + C * C  # wq, wk, wv, wo
    ffn = ffn_matrices * C * hidden  # w1, w2, w3
    per_layer = attention + ffn + (2 * C if norms else 0)
    head = 0 if tied_embeddings else V * C
    return V * C + N * per_layer + (C if norms else 0) + head


def check_llama_param_count(answer, config: Optional[LlamaConfig] = None) -> CheckResult:
    """Exercise: count the parameters of a LLaMA shape by hand (default: LLaMA-13B)."""
    if config is None:
        config = LlamaConfig(dim=5120, n_layers=40, n_heads=40)
    if _is_blank(answer):
        return _missing("your count (an integer)")
    n, err = _as_int(answer, "the parameter count")
    if err is not None:
        return err
    with torch.device("meta"):  # shapes only, no memory
        expected = Llama(config).num_params()
    C, V = config.dim, config.vocab_size
    mistakes = [  # (wrong value, what it means)
        (expected - V * C,
         f"is one {V}x{C} matrix short: LLaMA has both a token embedding and a separate output head "
         "(they are not tied)."),
        (llama_param_count(config, norms=False),
         "leaves out the RMSNorm weights: two per block (C each) plus the final norm."),
        (llama_param_count(config, ffn_hidden=4 * C),
         f"uses a feed-forward width of 4*C = {4 * C}; SwiGLU uses about 2/3 of that, rounded up to "
         f"multiple_of: config.ffn_hidden_dim = {config.ffn_hidden_dim}."),
        (llama_param_count(config, ffn_hidden=int(8 * C / 3)),
         f"uses 8C/3 = {int(8 * C / 3)} for the feed-forward width without rounding up to "
         f"multiple_of={config.multiple_of}: it is {config.ffn_hidden_dim}."),
        (llama_param_count(config, ffn_matrices=2),
         "counts two feed-forward matrices; SwiGLU has three (w1 and w3 go up, w2 comes down)."),
        (llama_param_count(config, kv_heads=config.n_heads),
         f"gives wk and wv {config.n_heads} heads; with grouped-query attention they have "
         f"n_kv_heads={config.n_kv_heads}."),
    ]
    return _check_count(n, expected, mistakes, "the parameter count",
                        f"{expected:,} parameters: embedding + output head (V*C each), and per block "
                        "wq, wk, wv, wo, w1, w2, w3 plus two norms, plus the final norm.")


def check_kv_cache_bytes(answer, config: Optional[LlamaConfig] = None, seq_len: int = 2048,
                         batch_size: int = 1, bytes_per_value: int = 2) -> CheckResult:
    """Exercise: memory of the KV cache for one sequence (default: LLaMA-7B, 2048 tokens, fp16)."""
    if config is None:
        config = LlamaConfig()
    if _is_blank(answer):
        return _missing("the number of bytes (an integer)")
    n, err = _as_int(answer, "the number of bytes")
    if err is not None:
        return err
    per_value = batch_size * seq_len * config.n_layers * config.n_kv_heads * config.head_dim
    expected = 2 * per_value * bytes_per_value
    mistakes = [  # (wrong value, what it means)
        (per_value * bytes_per_value, "counts only the keys (or only the values); the cache stores both."),
        (2 * per_value, f"counts numbers, not bytes: each one takes {bytes_per_value} bytes."),
        (2 * per_value * 4, "uses 4 bytes per number (fp32); the question asks for fp16 (2 bytes)."),
        (2 * batch_size * seq_len * config.n_layers * config.n_heads * config.head_dim * bytes_per_value,
         f"uses n_heads={config.n_heads}; keys/values have n_kv_heads={config.n_kv_heads} heads."),
        (2 * batch_size * seq_len * config.n_kv_heads * config.head_dim * bytes_per_value,
         f"is the size for one layer; every one of the {config.n_layers} layers keeps its own cache."),
    ]
    return _check_count(n, expected, mistakes, "the cache size",
                        f"{expected:,} bytes = 2 (k and v) x {config.n_layers} layers x {seq_len} tokens x "
                        f"{config.n_kv_heads} kv heads x {config.head_dim} x {bytes_per_value} bytes "
                        f"= {expected / 2**30:.3g} GiB.")
