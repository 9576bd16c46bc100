"""The language-model loss without a (B, T, vocab) logits tensor.

:func:`loss_sum` is the loss the training loop takes; :func:`lm_loss` its fast path.

The loss of a language model needs, for every token, the log-sum-exp of its logits over the
vocabulary and the logit of its target; its gradient with respect to the final hidden state h
is (softmax(h W^T) - onehot(target)) W. Both can be computed a chunk of tokens at a time, so
the full logits never exist at once. At LLaMA-7B with a batch of 8 x 512 tokens, the full
logits are 8 * 512 * 32000 floats = 0.5 GiB in float32, and autograd keeps them (or their
bfloat16 copy) plus the softmax for the backward pass.

    hidden = model(tokens, return_hidden=True)                 # (B, T, C), final norm applied
    loss = cross_entropy_from_hidden(hidden, model.output.weight, targets)
    # or, with labels aligned to tokens as in Hugging Face and the official release:
    loss = lm_loss(model, tokens, labels)

Three ways to compute the same number (``mode``):

- ``"full"``: logits = h W^T for all tokens, then ``F.cross_entropy``. The reference.
- ``"checkpoint"``: one chunk at a time under activation checkpointing; backward recomputes
  each chunk's logits, so no chunk's logits are kept either.
- ``"fused"`` (default, fastest): the gradient with respect to h (and W, if W trains) is
  computed chunk by chunk *during the forward pass* and kept instead of the logits; backward
  only scales it. Costs one matmul less per chunk than ``"checkpoint"``.

Tokens whose target is ``ignore_index`` (-100: the prompt part of an Alpaca example, padding)
are dropped *before* the output head, so their logits are never computed at all.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX  # -100: the label the loss ignores (prompt, padding)
from .distributed import strategy_of, unwrap
from .model import Llama

MODES = ("fused", "checkpoint", "full")


# --------------------------------------------------------------------------- the loss
def cross_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    mode: str = "fused",
) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    hidden: (..., C) final hidden states.  weight: (V, C) output head.  targets: (...) token ids
    aligned with hidden (already shifted for next-token prediction), ``ignore_index`` where no loss.
    reduction: "mean" over the targets that are not ignored (as ``F.cross_entropy``), or "sum".
    If every target is ignored the loss is 0 (with zero gradient), not NaN.
    Returns a float32 scalar.
    """
    if mode not in MODES:
        raise ValueError(f"cross_entropy_from_hidden: mode must be one of {MODES}; got {mode!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy_from_hidden: reduction must be 'mean' or 'sum'; got {reduction!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"cross_entropy_from_hidden: chunk_size must be an integer >= 1; got {chunk_size!r}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy_from_hidden: hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
            "must agree in every dimension but the last"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"cross_entropy_from_hidden: hidden width {hidden.shape[-1]} does not match the output "
            f"head {tuple(weight.shape)} (expected (vocab, {hidden.shape[-1]}))"
        )
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    t = targets.reshape(-1)  # (N,)

    if mode == "full":
        logits = (h @ weight.t()).float()  # (N, V): the tensor the other modes avoid
        total = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
        n_valid = (t != ignore_index).sum()
        return total / n_valid.clamp(min=1) if reduction == "mean" else total

    keep = (t != ignore_index).nonzero().squeeze(1)  # only these tokens need the output head
    h, t = h.index_select(0, keep), t.index_select(0, keep)  # (n, C), (n,)
    n_valid = max(len(keep), 1)
    scale = 1.0 / n_valid if reduction == "mean" else 1.0

    if mode == "fused":
        return _FusedLinearCrossEntropy.apply(h, weight, t, chunk_size, scale)

    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, max(len(t), 1), chunk_size):  # one (empty) chunk when nothing is kept: loss 0
        h_c, t_c = h[start : start + chunk_size], t[start : start + chunk_size]
        total = total + checkpoint(_chunk_loss_sum, h_c, weight, t_c, use_reentrant=False)
    return total * scale


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: h (n, C), weight (V, C), t (n,) -> scalar."""
    logits = (h @ weight.t()).float()  # (n, V)
    return F.cross_entropy(logits, t, reduction="sum")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss and its gradient in one pass over the chunks; backward only rescales the gradient.

    For a chunk with logits z = h W^T and p = softmax(z):
        loss  = sum_i  logsumexp(z_i) - z_i[t_i]
        dL/dz = p - onehot(t)        dL/dh = (p - onehot(t)) W        dL/dW = (p - onehot(t))^T h
    """

    @staticmethod
    def forward(ctx, h, weight, t, chunk_size: int, scale: float):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute_dtype = weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None  # (n, C)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, len(t), chunk_size):
            h_c, t_c = h[start : start + chunk_size], t[start : start + chunk_size]
            logits = (h_c.to(compute_dtype) @ weight.t()).float()  # (n_c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n_c,)
            total += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                dz = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                dz[torch.arange(len(t_c), device=dz.device), t_c] -= 1.0  # p - onehot(t)
                dz = dz.to(compute_dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = (dz @ weight).to(h.dtype)
                if need_w:
                    grad_w += (dz.t() @ h_c.to(compute_dtype)).float()
        if grad_h is not None:
            grad_h.mul_(scale)
        if grad_w is not None:
            grad_w = grad_w.mul_(scale).to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def lm_loss(
    model: nn.Module,
    tokens: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    mode: str = "fused",
    **forward_kwargs,
) -> torch.Tensor:
    """Next-token loss of ``model`` (an adapterlab ``Llama``, or DDP around one) on tokens (B, T).

    labels: (B, T) aligned with tokens, as in Hugging Face and the official release: the
    prediction at position i is scored against labels[:, i + 1]; ``ignore_index`` where no loss
    (prompt, padding). None: labels = tokens. forward_kwargs go to the model (e.g. visual=...).
    Equals ``F.cross_entropy(model(tokens)[:, :-1], labels[:, 1:])`` without the logits tensor.
    Under FSDP, whose output head is only whole inside the model's forward, use mode="full".
    """
    if labels is None:
        labels = tokens
    if labels.shape != tokens.shape:
        raise ValueError(f"lm_loss: labels {tuple(labels.shape)} must have the shape of tokens {tuple(tokens.shape)}")
    hidden = model(tokens, return_hidden=True, **forward_kwargs)  # (B, T, C)
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T): the last position has no target
    head = unwrap(model).output.weight
    return cross_entropy_from_hidden(
        hidden, head, targets, chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction, mode=mode
    )


def loss_sum(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not IGNORE_INDEX.

    tokens, labels: (B, T). Position t predicts labels[:, t + 1]. forward_kwargs go to the model
    (e.g. ``image_features=``, see :class:`adapterlab.data.TokenDataset`). What it computes is this:

        logits = model(tokens, **forward_kwargs)                 # (B, T, vocab)
        F.cross_entropy(logits[:, :-1], labels[:, 1:], reduction="sum", ignore_index=-100)

    When the output head is frozen (adapter or LoRA tuning of an adapterlab Llama, alone or in DDP)
    the same value comes from :func:`lm_loss`, which never builds the (B, T, vocab) logits and skips
    the head on prompt tokens (label -100): less memory and less work (measured in
    benchmarks/README.md). Other models (full fine-tuning, FSDP, wrappers) take the line above.
    """
    if _head_is_fusable(model):
        return lm_loss(model, tokens, labels, reduction="sum", mode="fused", **forward_kwargs)
    logits = model(tokens, **forward_kwargs)  # (B, T, vocab)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _head_is_fusable(model: nn.Module) -> bool:
    """An adapterlab Llama (or DDP around one) whose output head is frozen."""
    raw = unwrap(model)
    return isinstance(raw, Llama) and strategy_of(model) != "fsdp" and not raw.output.weight.requires_grad
