"""Checker for notebook 04 (pretraining a tiny LLaMA): the loss of a model that knows nothing yet,
ln(V) nats, told apart from bits, log10, the probability itself and LLaMA's vocabulary.
"""
from __future__ import annotations

import math

from .feedback import CheckResult, _ok, _no, _missing, _is_blank, _as_float


def check_uniform_loss(answer, vocab_size: int = 640) -> CheckResult:
    """Exercise: the cross-entropy loss of a model that predicts every token with equal probability."""
    if _is_blank(answer):
        return _missing("a number (the loss in nats)")
    x, err = _as_float(answer, "the loss")
    if err is not None:
        return err
    expected = math.log(vocab_size)

    def near(a: float, b: float) -> bool:
        return abs(a - b) <= 2e-3 * max(1.0, abs(b))

    if near(x, expected):
        return _ok(f"-log(1/V) = ln({vocab_size}) = {expected:.3f} nats. A freshly initialised model starts "
                   "close to this: it knows nothing yet, so every token is equally likely.")
    mistakes = [
        (math.log2(vocab_size), f"is log2({vocab_size}), the loss in bits. PyTorch's cross-entropy uses the natural "
                                "log (nats)."),
        (math.log10(vocab_size), "uses log10; PyTorch's cross-entropy uses the natural log."),
        (1 / vocab_size, "is the probability of each token. The loss is -log of that probability."),
        (-expected, "has the wrong sign: the loss is -log p, and log p < 0, so the loss is positive."),
        (math.log(32000), f"uses LLaMA's vocabulary of 32000; the tiny model has V = {vocab_size}."),
        (float(vocab_size), "is V itself; the loss is the log of it."),
    ]
    for value, message in mistakes:
        if near(x, value):
            return _no(f"{x:g} {message}")
    return _no(f"{x:g} is not it. If every one of the V = {vocab_size} tokens has probability 1/V, what is "
               "-log(probability of the right token)?")
