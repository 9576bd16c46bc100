"""Checker for notebook 12 (a real model): the adapter's trainable values on a model with
grouped-query attention (SmolLM2-135M-Instruct: 9 query heads share 3 key/value heads).

The count is that of ``add_adapter`` on the model's shape; the mistakes recognised are the ones GQA
invites (gates or prompts sized by the key/value heads) and the usual ones of notebook 3's count.
"""
from __future__ import annotations

from typing import Optional

from ..model import LlamaConfig
from .feedback import CheckResult, _as_int, _check_count, _is_blank, _missing, _no

# SmolLM2-135M-Instruct's shape (read from its GGUF file by adapterlab.load_llama("smollm2"))
SMOLLM2_SHAPE = LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152)


def check_gqa_adapter_param_count(answer, config: Optional[LlamaConfig] = None, prompt_len: int = 10,
                                  layers: int = 30, notebook_layers: int = 8) -> CheckResult:
    """Exercise: how many values does LLaMA-Adapter train on this model with K=``prompt_len`` prompts
    in the top L=``layers`` layers, one gate per head? config: the model's shape (default: SmolLM2-135M's).
    notebook_layers: the L the notebook trained with (a count for it is named as such)."""
    if _is_blank(answer):
        return _missing("the number of trainable values (an integer)")
    n, err = _as_int(answer, "the number of trainable values")
    if err is not None:
        return err
    c = config or SMOLLM2_SHAPE
    if layers > c.n_layers:
        return _no(f"the exercise asks for L={layers} adapted layers but the model has only {c.n_layers}; "
                   "pass the model's config and an L it has.")
    K, L, C, H, H_kv, d = prompt_len, layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim
    prompts, gates = K * L * C, L * H
    expected = prompts + gates
    kv_width = H_kv * d  # the width of the keys and values under GQA
    mistakes = [  # (wrong value, what it means)
        (prompts, f"counts the prompts (K*L*C) but not the gates: one per head in each adapted layer, L*H = {gates:,}."),
        (prompts + L * H_kv, f"gives one gate per key/value head ({H_kv}); the gate scales each QUERY head's "
                             f"attention to the prompts, so there are H = {H} per layer."),
        (prompts + L, "counts one gate per layer (as PEFT does); the paper's release learns one gate per head: L*H."),
        (K * L * kv_width + gates, f"sizes the prompts by the key/value width ({H_kv} heads x {d} = {kv_width}). "
                                   f"A prompt is a token in the residual stream, C = {C} wide; the frozen W_k and "
                                   f"W_v turn it into the (narrower) keys and values."),
        (2 * K * L * kv_width + gates, "counts prompt keys and values in the key/value width. The adapter stores one "
                                       f"prompt P_l (K x C = {K} x {C}) per layer; its keys and values are computed "
                                       "from it by the frozen W_k and W_v, they are not trained."),
        (2 * prompts + gates, "counts separate key and value prompts. There is one prompt P_l (K x C) per layer; "
                              "its keys and values come from the layer's frozen W_k and W_v."),
        (K * L * d + gates, f"uses the head width d = {d}; prompts live in the residual width C = {C}."),
        (K * notebook_layers * C + notebook_layers * H,
         f"is the notebook's adapter (L = {notebook_layers}); the exercise asks for L = {L} layers."),
    ]
    return _check_count(n, expected, mistakes, "the adapter's size",
                        f"{prompts:,} prompt values (K*L*C) + {gates:,} gates (L*H, one per query head) = "
                        f"{expected:,}. Grouped-query attention changes nothing here: prompts live in the "
                        f"residual width and gates belong to the query heads.")
