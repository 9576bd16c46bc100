"""LLaMA, written top to bottom in the order the data flows through it.

    tokens -> embedding -> [ RMSNorm -> attention (rotary, grouped-query, KV cache)
                             -> RMSNorm -> SwiGLU feed-forward ] x n_layers
           -> RMSNorm -> output head -> logits

Weights use Meta's names (``layers.{i}.attention.wq.weight`` ...) and Meta's rotary
layout (interleaved pairs), so a Meta ``consolidated.*.pth`` loads as is; the Hugging Face
layout is converted in :mod:`adapterlab.io.weights`.

The LLaMA-Adapter hooks in at one place only: :class:`Attention` calls
``self.adapter`` (see :mod:`adapterlab.adapter`, Eq. 5-8 of the paper) when one is attached.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- config
@dataclass
class LlamaConfig:
    """Model shape. Field names are those of Meta's ``params.json``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None -> n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            problems.append(f"head width dim/n_heads={self.dim // self.n_heads} must be even for rotary embeddings")
        if problems:
            raise ValueError("Invalid LlamaConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times the optional multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, params: dict) -> "LlamaConfig":
        """Build from a params.json-style dict; unknown keys are ignored, vocab_size=-1 is left to the caller."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 like Meta's code."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# --------------------------------------------------------------------------- rotary
def rope_angles(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle of every (position, pair) -> each (T, head_dim/2), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... of x: (B, H, T, d) by the angles (T, d/2)."""
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, d/2, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# --------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of the tokens seen so far, for every layer, preallocated to max_len.

    The adapter stores its prompt keys/values here too (``self.prompt_kv``), so they are
    computed once per generation instead of once per token.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, d) at positions start..start+T; return all keys/values up to there."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# --------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query heads (n_kv_heads <= n_heads)."""

    def __init__(self, config: LlamaConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.adapter: Optional[nn.Module] = None  # set by adapterlab.adapter.add_adapter

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.unflatten(-1, (n_heads, self.head_dim)).transpose(1, 2)  # (B, T, C) -> (B, H, T, d)

    def forward(self, x, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None, visual=None):
        B, T, _ = x.shape
        q, k, out = self.attend_tokens(x, cos, sin, start_pos, cache)  # (B, H, T, d), (B, H_kv, S, d), (B, H, T, d)

        # LLaMA-Adapter: add the gated attention over the adaption prompts (Eq. 7, "sum" form).
        if self.adapter is not None:
            out = out + self.adapter(q, self, cache=cache, visual=visual)

        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def attend_tokens(self, x, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None):
        """The frozen layer's own attention over the word tokens -> (queries, keys, output)."""
        B, T, _ = x.shape
        q = apply_rope(self.split_heads(self.wq(x), self.n_heads), cos, sin)  # (B, H, T, d)
        k = apply_rope(self.split_heads(self.wk(x), self.n_kv_heads), cos, sin)  # (B, H_kv, T, d)
        v = self.split_heads(self.wv(x), self.n_kv_heads)  # (B, H_kv, T, d)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (B, H_kv, start+T, d)

        # Causal attention over the word tokens (fused kernel). A query at position start+i
        # may look at keys 0..start+i.
        S = k.shape[2]
        if T == 1 or (T == S):
            mask, causal = None, T > 1
        else:  # prefill after earlier tokens: causal mask shifted by start_pos
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, T, d)
        return q, k, out


# --------------------------------------------------------------------------- feed-forward
class FeedForward(nn.Module):
    """SwiGLU: w2( silu(w1 x) * w3 x )."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# --------------------------------------------------------------------------- block
class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, config: LlamaConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None, visual=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, cache, visual)
        return h + self.feed_forward(self.ffn_norm(h))


# --------------------------------------------------------------------------- model
class Llama(nn.Module):
    """The whole model. ``model(tokens)`` with tokens (B, T) returns logits (B, T, vocab_size)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)  # untied from the embedding
        self.activation_checkpointing = False  # recompute adapted blocks in backward (saves memory)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: Optional[KVCache] = None,
        visual: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
        image_features: Optional[torch.Tensor] = None,
        has_image: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in float32.

        start_pos/cache: generation with a KV cache. visual: optional (B, dim) image token that
        the multi-modal adapter adds to its prompts. image_features (B, visual_dim): make that
        token here with the adapter's trainable projection, ``visual = visual_proj(image_features)``
        (has_image (B,): 0/False for rows without a picture, whose token is 0). return_hidden:
        return the final normalised hidden states (B, T, dim) instead of logits (for chunked losses).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq_len); got {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + T} tokens is longer than max_seq_len={self.config.max_seq_len}"
            )
        positions = torch.arange(start_pos, start_pos + T, device=tokens.device)
        cos, sin = rope_angles(self.config.head_dim, positions, self.config.rope_theta)
        if image_features is not None:
            visual = self.image_token(image_features, has_image)  # (B, dim)

        h = self.tok_embeddings(tokens)  # (B, T, dim)
        h = self.run_layers(h, cos, sin, start_pos, cache, visual)
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h).float()

    def run_layers(self, h, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None, visual=None):
        """The blocks, bottom first: (B, T, dim) -> (B, T, dim). Two savings in training, same numbers:
        blocks below the first trainable one run without autograd (no graph to keep), and with
        ``activation_checkpointing`` the others keep no activations (recomputed in backward)."""
        n_frozen = self.frozen_prefix() if torch.is_grad_enabled() else 0
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if i < n_frozen:
                with torch.no_grad():
                    h = layer(h, cos, sin, start_pos, cache, visual)
            elif checkpointing:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, start_pos, cache, visual, use_reentrant=False)
            else:
                h = layer(h, cos, sin, start_pos, cache, visual)
        return h

    def image_token(self, image_features: torch.Tensor, has_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The multi-modal adapter's image token I_p (B, dim) from frozen-encoder features (B, visual_dim)."""
        projection = getattr(self, "visual_proj", None)  # set by adapterlab.adapter.add_adapter
        if projection is None:
            raise ValueError("image_features need a multi-modal adapter: attach one with "
                             "add_adapter(model, AdapterConfig(visual_dim=...)) first")
        return projection(image_features, has_image)

    def frozen_prefix(self) -> int:
        """How many bottom layers (with the embedding) have no trainable parameter."""
        if self.tok_embeddings.weight.requires_grad:
            return 0
        for i, layer in enumerate(self.layers):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return len(self.layers)

    def num_params(self) -> int:
        """All parameters, frozen or not (``adapterlab.adapter.count_trainable`` counts those that train)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device


def init_weights(model: Llama, seed: Optional[int] = None, std: float = 0.02) -> Llama:
    """Random initialisation for pretraining from scratch (normal(0, std); output projections scaled)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif "adapter" in name:
            continue
        else:
            scale = std / math.sqrt(2 * model.config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


# --------------------------------------------------------------------------- device policy
def autocast_for(device: torch.device):
    """How the model runs on ``device``: bf16 autocast on CUDA, plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
