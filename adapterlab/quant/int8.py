"""An int8 weight-only frozen base: every frozen matrix of the base stored as int8 with one scale per
output channel, the base's ``nn.Linear`` modules swapped for :class:`Int8Linear`.

Why: the adapter trains a few thousand numbers and the base is frozen, so its weights need no
gradient and no optimizer state, only a forward (and the activation gradient through it). Decoding
one token reads every weight once, so on a CPU generation is bound by the bytes of weights it moves:
int8 moves a quarter of float32's. The quantization is symmetric, per output channel j:

    scale_j = max_k |W_jk| / 127        W_jk ~= scale_j * q_jk,  q_jk = round(W_jk / scale_j) in [-127, 127]
    y = x W^T ~= (x q^T) * scale         (the scale applies to the output column: one multiply per output)

How the product runs (``compute_dtype``, bfloat16 by default; activations are cast to it and the
result back to the input's dtype, so the rest of the model keeps its own dtype):
  * a few rows (decoding: batch x 1 token) on the CPU: PyTorch's own int8 weight-only kernel,
    ``torch.ops.aten._weight_int8pack_mm``, which reads the int8 matrix directly (its fast path
    takes bfloat16 activations; with float32 activations it is many times slower);
  * many rows (training, prefill), or another device: ``(x q^T) * scale`` with q cast to the compute
    dtype for the call (int8 values are exact in bfloat16), so the matrix product runs at the
    dtype's full matmul speed; the cast costs one pass over the weight, small next to the product.
The backward pass gives the activation gradient only, ``dL/dx = (dL/dy * scale) q``: the weights
are buffers, never parameters, so nothing can train them.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..model import Llama

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Up to this many rows per call (batch x new tokens) the CPU uses the int8 kernel; above it, the
# dequantized product is faster (the kernel works row by row; measured on a 576 x 1536 matrix, where
# the two cross between 4 and 8 rows).
KERNEL_MAX_ROWS = 4
# The base's frozen matrices in each block (Meta's names); the output head is added by quantize_base.
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


# --------------------------------------------------------------------------- the numbers
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float matrix (out, in) -> (q int8 (out, in), scale float32 (out,)) with weight ~= scale[:, None] * q."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight expects a matrix (out_features, in_features); got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0  # (out,); an all-zero row keeps q = 0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """x (..., in) times the int8 matrix q (out, in) with per-row scales (out,) -> (..., out) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)  # (N, in)
    if x.device.type == "cpu" and compute_dtype != torch.float32 and x2.shape[0] <= KERNEL_MAX_ROWS:
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale.to(compute_dtype))  # (N, out)
    else:
        y = F.linear(x2, q.to(compute_dtype)) * scale.to(compute_dtype)  # (N, out)
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


class _Int8MatmulFn(torch.autograd.Function):
    """:func:`int8_matmul` with the activation gradient: dL/dx = (dL/dy * scale) q; no weight gradient."""

    @staticmethod
    def forward(ctx, x, q, scale, compute_dtype):
        ctx.save_for_backward(q, scale)
        ctx.compute_dtype, ctx.x_dtype = compute_dtype, x.dtype
        return int8_matmul(x, q, scale, compute_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        q, scale = ctx.saved_tensors
        scaled = (grad_y.float() * scale).to(ctx.compute_dtype)  # (..., out)
        grad_x = (scaled @ q.to(ctx.compute_dtype)).to(ctx.x_dtype)  # (..., in)
        return grad_x, None, None, None


# --------------------------------------------------------------------------- the module
class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` (no bias) stored as int8 + one float32 scale per output channel.

    ``weight`` gives the dequantized matrix (a new tensor in the replaced layer's dtype) for code that
    needs the matrix itself, e.g. the fused loss's output head or a dtype check; ``forward`` never
    builds it in full precision.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise ValueError(f"Int8Linear needs q int8 (out, in) and scale (out,); got q {q.dtype} {tuple(q.shape)}, "
                             f"scale {tuple(scale.shape)}. Make them with quantize_weight(weight).")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"Int8Linear: compute_dtype must be one of {COMPUTE_DTYPES}; got {compute_dtype}")
        self.register_buffer("weight_int8", q)  # (out, in)
        self.register_buffer("scale", scale.float())  # (out,)
        self.dtype, self.compute_dtype = dtype, compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free layers (LLaMA has none); this nn.Linear has a bias")
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, dtype=linear.weight.dtype, compute_dtype=compute_dtype)

    @property
    def in_features(self) -> int:
        return self.weight_int8.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_int8.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """scale[:, None] * q in the replaced layer's dtype: (out, in), materialized on every access."""
        return (self.weight_int8.float() * self.scale[:, None]).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _Int8MatmulFn.apply(x, self.weight_int8, self.scale, self.compute_dtype)
        return int8_matmul(x, self.weight_int8, self.scale, self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, "
                f"compute_dtype={self.compute_dtype}")


# --------------------------------------------------------------------------- the swap
def quantize_base(model: Llama, compute_dtype: torch.dtype = torch.bfloat16, head: bool = True) -> Llama:
    """Swap the base's matrices for int8 ones, in place: wq, wk, wv, wo, w1, w2, w3 of every block and
    (``head=True``) the output head. The token embedding stays as it is (a lookup reads one row per token),
    so a head tied to it becomes a separate int8 copy. An attached adapter is not touched; attach one
    before or after. Returns the model.
    """
    if not isinstance(model, Llama):
        raise TypeError(f"quantize_base expects an adapterlab Llama; got {type(model).__name__}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"quantize_base: compute_dtype must be one of {COMPUTE_DTYPES}; got {compute_dtype}")
    for block in model.layers:
        for path in BLOCK_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, _swapped(getattr(parent, name), compute_dtype))
    if head:
        model.output = _swapped(model.output, compute_dtype)
    return model


def _swapped(module: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    if isinstance(module, Int8Linear):  # already quantized: keep it
        return module
    with torch.no_grad():
        return Int8Linear.from_linear(module, compute_dtype).to(module.weight.device)


def is_quantized(model: nn.Module) -> bool:
    """True when any module of ``model`` is an :class:`Int8Linear`."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def base_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (a tied head counts once)."""
    seen: set = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


__all__ = ["Int8Linear", "quantize_base", "quantize_weight", "int8_matmul", "is_quantized", "base_bytes",
           "KERNEL_MAX_ROWS", "COMPUTE_DTYPES"]
