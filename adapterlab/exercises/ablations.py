"""Checker for notebook 07 (ablations): the fp32 training state AdamW keeps per trainable parameter
(weight, gradient, two moments), which is why training only the adapter is cheap.
"""
from __future__ import annotations

from .feedback import CheckResult, _missing, _is_blank, _as_int, _check_count


def check_training_state_bytes(answer, n_params: int, bytes_per_value: int = 4) -> CheckResult:
    """Exercise: fp32 training state per trainable parameter with AdamW: weight + gradient + 2 moments."""
    if _is_blank(answer):
        return _missing("a number of bytes (an integer)")
    n, err = _as_int(answer, "the number of bytes")
    if err is not None:
        return err
    expected = 4 * bytes_per_value * n_params
    mistakes = [
        (bytes_per_value * n_params, "counts the weights only; training also keeps a gradient and AdamW's two "
                                     "moments (exp_avg, exp_avg_sq) per parameter."),
        (2 * bytes_per_value * n_params, "counts weights and gradients; AdamW adds two moment estimates per parameter."),
        (3 * bytes_per_value * n_params, "is one tensor short: weight, gradient, and TWO AdamW moments = 4 per parameter."),
        (4 * 2 * n_params, "uses 2 bytes per value (fp16); the question keeps everything in fp32 (4 bytes)."),
        (4 * n_params, "counts the values, not the bytes: each fp32 value takes 4 bytes."),
    ]
    return _check_count(n, expected, mistakes, "the training state",
                        f"4 tensors (weight, gradient, exp_avg, exp_avg_sq) x {bytes_per_value} bytes x "
                        f"{n_params:,} = {expected:,} bytes ({expected / 1e9:.3g} GB). Activations come on top.")
