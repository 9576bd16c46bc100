"""Checkers for notebook 03 (zero-init attention), one also used by notebook 01: Eq. 5-8 written by
hand, the adapter's number of trainable values, and which tensors get a gradient at step 0.

The right attention output comes from ``adapter.zero_init_attention_literal``; the mistakes recognised
are the ones the paper's two-softmax design avoids (one softmax, the gate on the wrong part, ...).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch

from ..adapter import zero_init_attention_literal
from .feedback import CheckResult, _ok, _no, _missing, _is_blank, _as_int, _check_count, _call, _same, _diagnose


def check_zero_init_attention(fn: Optional[Callable]) -> CheckResult:
    """Exercise: write Eq. 5-8 yourself: ``fn(q, k, v, prompt_k, prompt_v, gate) -> S^g V``.

    q, k, v: (B, H, T, d) with causal token attention; prompt_k, prompt_v: (1, H, K, d);
    gate: the effective gate (already tanh'ed), shape (1, H, 1, 1).
    """
    if _is_blank(fn):
        return _missing("your function my_zero_init_attention(q, k, v, prompt_k, prompt_v, gate)")
    if not callable(fn):
        return _no(f"pass the function itself, not {type(fn).__name__}.")
    gen = torch.Generator().manual_seed(0)
    B, H, T, K, d = 2, 3, 5, 4, 8
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))
    pk, pv = (torch.randn(1, H, K, d, generator=gen) for _ in range(2))
    gate = torch.tensor([0.5, -0.25, 0.9]).view(1, H, 1, 1)
    args = (q, k, v, pk, pv, gate)
    out, err = _call(fn, tuple(a.clone() for a in args), "your function")
    if err is not None:
        return err
    expected = zero_init_attention_literal(*args)

    # The mistakes, written the way people write them.
    scale = 1 / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keys, values = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)

    def two_softmax(S, g_prompt=gate, g_tokens=1.0, mask=True):
        S_K, S_T = S[..., :K], S[..., K:]
        if mask:
            S_T = S_T.masked_fill(~causal, float("-inf"))
        return torch.cat([g_prompt * S_K.softmax(-1), g_tokens * S_T.softmax(-1)], -1) @ values

    S = q @ keys.transpose(-2, -1) * scale
    full_mask = torch.cat([torch.ones(T, K, dtype=torch.bool), causal], 1)
    one = S.masked_fill(~full_mask, float("-inf")).softmax(-1)
    mistakes = {
        "you use ONE softmax over prompts and tokens together. Eq. 7 has two separate softmaxes: "
        "softmax(S^K) for the prompts and softmax(S^{M+1}) for the tokens, so the tokens' attention "
        "still sums to 1 and the output is unchanged when the gate is 0.":
            torch.cat([gate * one[..., :K], one[..., K:]], -1) @ values,
        "one softmax over prompts and tokens, and no gate. Eq. 7 gates the prompt part and uses "
        "two separate softmaxes.": one @ values,
        "one softmax over prompts and tokens, and no causal mask. Eq. 7 uses two separate softmaxes "
        "(prompts | tokens), gates the prompt part, and a token sees only itself and earlier tokens.":
            S.softmax(-1) @ values,
        "the gate multiplies the token part; it belongs on the prompt part: [g * softmax(S^K); softmax(S^{M+1})].":
            two_softmax(S, g_prompt=1.0, g_tokens=gate),
        "the prompt part is not gated: multiply softmax(S^K) by the gate.":
            two_softmax(S, g_prompt=1.0),
        "the gate you are given is already the effective gate (tanh(g)); do not apply tanh again.":
            two_softmax(S, g_prompt=torch.tanh(gate)),
        "the causal mask is missing: a token may only attend to itself and earlier tokens "
        "(the prompts are visible to every token).": two_softmax(S, mask=False),
        "the scores are not scaled: divide Q K^T by sqrt(d) (Eq. 5).":
            two_softmax(q @ keys.transpose(-2, -1)),
        "you divide the scores by d; Eq. 5 divides by sqrt(d).":
            two_softmax(q @ keys.transpose(-2, -1) / d),
    }
    if _same(out, expected):
        return _ok("Concatenated scores (Eq. 5-6), two separate softmaxes with the gate on the prompt "
                   "part (Eq. 7), times the concatenated values (Eq. 8).")
    return _diagnose(out, expected, mistakes, "your function")


def check_adapter_param_count(answer, prompt_len: int = 10, layers: int = 30, dim: int = 4096,
                              n_heads: int = 32, n_layers: int = 32) -> CheckResult:
    """Exercise: trainable values of LLaMA-Adapter (default: 7B, K=10, L=30 of N=32, C=4096, H=32, gate per head)."""
    if _is_blank(answer):
        return _missing("the number of trainable values (an integer)")
    n, err = _as_int(answer, "the number of trainable values")
    if err is not None:
        return err
    K, L, C, H = prompt_len, layers, dim, n_heads
    prompts, gates = K * L * C, L * H
    expected = prompts + gates
    mistakes = [  # (wrong value, what it means)
        (prompts, f"counts the prompts (K*L*C) but not the gates: one per head in each adapted layer, "
                  f"L*H = {gates:,}."),
        (prompts + L, "counts one gate per layer (as PEFT does); the paper's release learns one gate per "
                      "head: L*H."),
        (K * n_layers * C + n_layers * H,
         f"adapts all N={n_layers} layers; LLaMA-Adapter puts prompts in the top L={L} layers only."),
        (K * n_layers * C,
         f"adapts all N={n_layers} layers and forgets the gates. Prompts go in the top L={L} layers; add L*H gates."),
        (2 * prompts + gates, "counts separate key and value prompts. There is one prompt P_l (K x C) per "
                              "layer; its keys and values come from the layer's frozen W_k and W_v."),
        (K * L * (C // H) + gates, f"uses the head width d={C // H}; prompts live in the residual width C={C}."),
        (3 * prompts + gates, "adds new query/key/value projections; the adapter has none, it reuses the "
                              "frozen W_k and W_v."),
    ]
    return _check_count(n, expected, mistakes, "the adapter's size",
                        f"{prompts:,} prompt values (K*L*C) + {gates:,} gates (L*H) = {expected:,}: "
                        f"about {expected / 6.74e9 * 100:.3f}% of LLaMA-7B.")


STEP0_NAMES = ("prompt", "gate", "wq", "wk", "wv", "wo", "embedding")


def check_step0_gradients(answer: Optional[Iterable[str]]) -> CheckResult:
    """Exercise: which tensors get a NON-ZERO gradient at the very first training step?

    Answer with a set of names from ``STEP0_NAMES``: "prompt", "gate", "wq", "wk", "wv", "wo", "embedding".
    """
    if _is_blank(answer):
        return _missing('a set of names, e.g. {"prompt", "wq"}')
    if isinstance(answer, str):
        answer = {answer}
    try:
        names = {str(a).strip().lower() for a in answer}
        names = {n[:-1] if n not in STEP0_NAMES and n[:-1] in STEP0_NAMES else n for n in names}  # "gates"
    except TypeError:
        return _no(f"answer with a set of names such as {{'gate'}}; got {type(answer).__name__}.")
    unknown = names - set(STEP0_NAMES)
    if unknown:
        return _no(f"unknown name(s) {sorted(unknown)}; choose from {list(STEP0_NAMES)}.")
    problems = []
    if "prompt" in names:
        problems.append("the prompts' whole contribution is multiplied by tanh(g) = tanh(0) = 0, so the loss "
                        "does not depend on them yet: their gradient is exactly zero at step 0.")
    frozen = sorted(names & {"wq", "wk", "wv", "wo", "embedding"})
    if frozen:
        problems.append(f"{frozen} belong to the frozen base model (requires_grad=False): they get no gradient "
                        "at all, at any step.")
    if "gate" not in names:
        problems.append("the gate does get a gradient: d tanh(g)/dg = 1 at g = 0, times the prompt attention "
                        "output softmax(Q P_k^T / sqrt(d)) P_v, which is not zero (prompts start random).")
    if problems:
        return _no(" ".join(problems))
    return _ok("Only the gate. It opens first; once tanh(g) is no longer 0 the prompts start to learn too.")
