"""Checker for notebook 10 (real weights and data): reorder a Hugging Face q/k weight's rows into
Meta's rotary layout, compared with ``io.weights.hf_to_meta_rows``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..io.weights import hf_to_meta_rows
from .feedback import CheckResult, _ok, _no, _missing, _is_blank, _call, _same, _diagnose


def check_hf_to_meta_rows(fn: Optional[Callable]) -> CheckResult:
    """Exercise: write ``fn(w, n_heads)`` that reorders the rows of a Hugging Face q or k weight
    (n_heads*d, C) into Meta's layout: Meta's row h*d + 2i + c is HF's row h*d + c*d/2 + i."""
    if _is_blank(fn):
        return _missing("your function my_hf_to_meta(w, n_heads)")
    if not callable(fn):
        return _no(f"pass the function itself, not {type(fn).__name__}.")
    n_heads, d, C = 3, 8, 5
    w = torch.arange(n_heads * d * C, dtype=torch.float32).reshape(n_heads * d, C)  # every row is different
    out, err = _call(fn, (w.clone(), n_heads), "my_hf_to_meta(w, n_heads)")
    if err is not None:
        return err
    expected = hf_to_meta_rows(w, n_heads)
    mistakes = {
        "your function returns the rows unchanged: HF stores the two halves of each rotary pair d/2 rows apart, "
        "Meta stores them next to each other, so the rows must be reordered.": w,
        "this is the opposite direction (Meta -> HF): the half that HF keeps at row c*d/2 + i must land at Meta's "
        "row 2i + c.": w.reshape(n_heads, d // 2, 2, C).transpose(1, 2).reshape(w.shape),
        "you reorder across the whole matrix as if it were one head; the permutation is applied within each "
        "head's d rows.": w.reshape(1, 2, n_heads * d // 2, C).transpose(1, 2).reshape(w.shape),
    }
    if _same(out, expected, tol=0):
        return _ok("within each head, row c*d/2 + i moves to row 2i + c: reshape (H, 2, d/2, C), swap the middle "
                   "axes, reshape back.")
    return _diagnose(out, expected, mistakes, "my_hf_to_meta")
