"""Checker for notebook 09 (multi-modal): the trainable values of the multi-modal adapter, counted
from the library's own ``adapter.VisualProjection``.
"""
from __future__ import annotations

import torch

from ..adapter import VisualProjection
from .feedback import CheckResult, _missing, _is_blank, _as_int, _check_count


def check_multimodal_param_count(answer, visual_dim: int = 1024, prompt_len: int = 10, layers: int = 30,
                                 dim: int = 4096, n_heads: int = 32) -> CheckResult:
    """Exercise: trainable values of the multi-modal adapter = prompts + gates + the projection
    ``adapterlab.adapter.VisualProjection(visual_dim, dim)`` (count it from ``print(VisualProjection(...))``)."""
    if _is_blank(answer):
        return _missing("the number of trainable values (an integer)")
    n, err = _as_int(answer, "the number of trainable values")
    if err is not None:
        return err
    K, L, C, H = prompt_len, layers, dim, n_heads
    with torch.device("meta"):  # the library's projection, counted without allocating it
        projection = VisualProjection(visual_dim, dim)
    proj = sum(p.numel() for p in projection.parameters())
    wide = 2 * visual_dim + (visual_dim + 1) * C + (C + 1) * C + 2 * C  # the same MLP with hidden width C
    adapter = K * L * C + L * H
    expected = adapter + proj
    mistakes = [
        (adapter, "counts the text adapter only; the multi-modal one adds the projection visual_proj."),
        (proj, "counts the projection only; the prompts and gates still train."),
        (adapter + L * proj, "gives every layer its own projection; there is one, shared: I_p is made once and "
                             "added to the prompts of all L layers."),
        (expected - L * H, "forgets the gates (L*H)."),
        (expected - sum(p.numel() for name, p in projection.named_parameters() if name.endswith("bias")),
         "leaves out the biases (of the Linear layers and the LayerNorms)."),
    ]
    for name, module in projection.named_children():
        count = sum(p.numel() for p in module.parameters())
        mistakes.append((expected - count, f"leaves out visual_proj.{name} ({type(module).__name__}, {count:,} values)."))
    return _check_count(n, expected, mistakes, "the multi-modal adapter's size",
                        f"prompts {K * L * C:,} + gates {L * H:,} + projection {proj:,} = {expected:,}. "
                        f"(The projection is a bottleneck, {visual_dim} -> {projection.hidden} -> {C}: {proj / 1e6:.2f}M "
                        f"values, where a hidden layer of width C would make it {wide / 1e6:.0f}M.)")
