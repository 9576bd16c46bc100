"""LLaMA-Adapter: learnable adaption prompts and zero-init gated attention (arXiv 2303.16199).

The core a student reads: model -> adapter -> data -> losses -> train -> generate. The method in
words: docs/method.md.

For a query token t in adapted layer l, with K prompt tokens P_l and M earlier word tokens:

    Q = W_q t;  K = W_k [P_l; T; t];  V = W_v [P_l; T; t]              (Eq. 2-4)
    S = Q K^T / sqrt(d) = [S^K ; S^{M+1}]                               (Eq. 5-6)
    S^g = [ g_l * softmax(S^K) ; softmax(S^{M+1}) ]                      (Eq. 7)
    out = W_o (S^g V)                                                    (Eq. 8)

Because the two softmaxes are separate, S^g V splits into a sum:

    S^g V = softmax(S^{M+1}) V_tokens  +  g_l * softmax(Q P_k^T / sqrt d) P_v

The first term is ordinary causal attention (a fused kernel in model.Attention); the second is
:func:`gated_prompt_attention` below - the only new computation the adapter adds.
:func:`zero_init_attention_literal` writes Eq. 5-8 literally (one score matrix, two softmaxes)
for teaching and for the tests that prove both forms equal (its ``token_mask``: which token keys
a query may see - all but padding in the bidirectional encoders; None: causal, LLaMA's).
Study variants (ungated prompts, :mod:`adapterlab.studies.variants`) plug into the same
``self.adapter`` slot from outside the core.

The prompts live in the residual width C and pass through the layer's *frozen* W_k and W_v;
their keys get no rotary embedding. g_l starts at 0, so at initialisation the adapted model
computes exactly what the frozen model computes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import Attention, KVCache, Llama

GATES = ("head", "layer")
ACTIVATIONS = ("tanh", "identity")
INITS = ("zero", "random")


@dataclass
class AdapterConfig:
    """What to attach.

    prompt_len: K prompt tokens per adapted layer.   layers: L, the top L layers are adapted.
    gate: "head" (one gate per head, as the official release) or "layer" (one scalar, as PEFT).
    gate_activation: "tanh" (paper) or "identity" (PEFT).
    init: "zero" (paper: gates start at 0) or "random" (ablation: gates start at N(0, 1) draws).
    visual_dim: width of the visual features for the multi-modal adapter (None: text only).
    visual_hidden: hidden width of the multi-modal adapter's projection MLP (Sec. 3.3).
    """

    prompt_len: int = 10
    layers: int = 30
    gate: str = "head"
    gate_activation: str = "tanh"
    init: str = "zero"
    visual_dim: Optional[int] = None
    visual_hidden: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_len, int) or self.prompt_len < 1:
            raise ValueError(f"AdapterConfig.prompt_len must be an integer >= 1; got {self.prompt_len!r}")
        if not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"AdapterConfig.layers must be an integer >= 1; got {self.layers!r}")
        for name, value, allowed in (
            ("gate", self.gate, GATES),
            ("gate_activation", self.gate_activation, ACTIVATIONS),
            ("init", self.init, INITS),
        ):
            if value not in allowed:
                hint = (" (ungated prompts are a study variant: adapterlab.studies.variants.add_ungated_prompts)"
                        if value == "none" else "")
                raise ValueError(f"AdapterConfig.{name} must be one of {allowed}; got {value!r}{hint}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- the math
def gated_prompt_attention(q: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor, gate: torch.Tensor):
    """The adapter's term of Eq. 7 in "sum" form: gate * softmax(Q P_k^T / sqrt(d)) P_v.

    q: (B, H, T, d) rotated queries.  prompt_k, prompt_v: (1 or B, H_kv, K, d), not rotated.
    gate: effective gate, (1, H, 1, 1) per head or (1,) per layer.  Returns (B, H, T, d).
    """
    n_rep = q.shape[1] // prompt_v.shape[1]  # grouped-query attention: share K/V heads
    prompt_v = prompt_v.repeat_interleave(n_rep, dim=1) if n_rep > 1 else prompt_v
    return gated_prompt_scores(q, prompt_k, gate) @ prompt_v  # (B, H, T, d)


def gated_prompt_scores(q: torch.Tensor, prompt_k: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The prompt block of S^g in Eq. 7: gate * softmax(Q P_k^T / sqrt(d)) -> (B, H, T, K).

    Each row sums to its head's gate (the token block, softmax(S_M1), sums to 1).
    """
    n_rep = q.shape[1] // prompt_k.shape[1]
    prompt_k = prompt_k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else prompt_k
    scores = q @ prompt_k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, K)
    probs = F.softmax(scores.float(), dim=-1).type_as(q)  # the prompts' own softmax
    return gate.to(q.dtype) * probs


def visible_keys(token_mask: Optional[torch.Tensor], T: int, S: int, device) -> torch.Tensor:
    """Which token keys each query may see, broadcastable to (B, H, T, S); True = visible.

    None: causal, as LLaMA (query i sees keys 0..S-T+i, S >= T as with a KV cache). An encoder
    passes its own mask (all keys but padding: bidirectional attention).
    """
    if token_mask is None:
        return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)  # (T, S)
    return token_mask.to(device=device, dtype=torch.bool)


def zero_init_attention_literal(q, k, v, prompt_k, prompt_v, gate, token_mask=None):
    """Eq. 5-8 as written in the paper: one score matrix, two separate softmaxes.

    q: (B, H, T, d) queries; k, v: (B, H, T, d) token keys/values (rotated keys, causal);
    prompt_k, prompt_v: (B or 1, H, K, d); gate: effective gate broadcastable to (B, H, T, K).
    token_mask: bool, broadcastable to (B, H, T, T), True where a query may see a token key
    (None: causal, as LLaMA; an encoder: every key but padding). The prompts are always visible.
    Returns S^g V: (B, H, T, d) (W_o not applied). Slow and simple on purpose.
    """
    B, H, T, d = q.shape
    K = prompt_k.shape[2]
    keys = torch.cat([prompt_k.expand(B, -1, -1, -1), k], dim=2)  # [P; T; t]  (B, H, K+T, d)
    values = torch.cat([prompt_v.expand(B, -1, -1, -1), v], dim=2)
    S = q @ keys.transpose(-2, -1) / math.sqrt(d)  # Eq. 5: (B, H, T, K+T)
    S_K, S_M1 = S[..., :K], S[..., K:]  # Eq. 6: prompt scores | token scores
    S_M1 = S_M1.masked_fill(~visible_keys(token_mask, T, T, q.device), float("-inf"))
    S_g = torch.cat([gate * S_K.softmax(-1), S_M1.softmax(-1)], dim=-1)  # Eq. 7
    return S_g @ values  # Eq. 8 (before W_o)


# --------------------------------------------------------------------------- the module
class AdaptionPrompt(nn.Module):
    """The trainable part of one adapted layer: K prompt vectors and the gate."""

    def __init__(self, config: AdapterConfig, dim: int, n_heads: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.gate_activation = config.gate_activation
        self.prompt = nn.Parameter(torch.randn(config.prompt_len, dim, generator=generator))  # P_l
        gate_shape = (1, n_heads, 1, 1) if config.gate == "head" else (1,)
        if config.init == "zero":
            self.gate = nn.Parameter(torch.zeros(gate_shape))  # g_l = 0: output unchanged at init
        else:
            self.gate = nn.Parameter(torch.randn(gate_shape, generator=generator))

    def gate_value(self) -> torch.Tensor:
        """The effective gate: tanh(g) for the paper's gate, g itself for identity."""
        return torch.tanh(self.gate) if self.gate_activation == "tanh" else self.gate

    def prompt_kv(self, attn: Attention, visual: Optional[torch.Tensor] = None):
        """Prompt keys/values through the layer's frozen W_k, W_v (Eq. 3-4), no rotary.

        Without an image: computed once for the whole batch -> (1, H_kv, K, d).
        With an image token visual (B, C): P + Repeat(I_p) per sample -> (B, H_kv, K, d).
        """
        prompt = self.prompt[None]  # (1, K, C)
        if visual is not None:
            prompt = prompt + visual[:, None, :].to(prompt.dtype)  # (B, K, C): Sec. 3.3
        w_dtype = attn.wk.weight.dtype
        pk = attn.split_heads(attn.wk(prompt.to(w_dtype)), attn.n_kv_heads)
        pv = attn.split_heads(attn.wv(prompt.to(w_dtype)), attn.n_kv_heads)
        return pk, pv

    def cached_prompt_kv(self, attn: Attention, cache: Optional[KVCache] = None, visual=None):
        """:meth:`prompt_kv`, computed once per generation: kept in ``cache.prompt_kv`` after the first step."""
        if cache is not None and attn.layer_id in cache.prompt_kv:
            return cache.prompt_kv[attn.layer_id]
        pk, pv = self.prompt_kv(attn, visual)
        if cache is not None:
            cache.prompt_kv[attn.layer_id] = (pk, pv)
        return pk, pv

    def forward(self, q, attn: Attention, cache: Optional[KVCache] = None, visual=None):
        """The term model.Attention adds to its token attention (Eq. 7): q (B, H, T, d) rotated queries -> (B, H, T, d)."""
        pk, pv = self.cached_prompt_kv(attn, cache, visual)
        return gated_prompt_attention(q, pk.to(q.dtype), pv.to(q.dtype), self.gate_value())


# --------------------------------------------------------------------------- the multi-modal projection
class VisualProjection(nn.Module):
    """The learnable projection of Sec. 3.3: global visual features (B, visual_dim) -> image token I_p (B, dim).

    The image token is added to the K prompts of every adapted layer (``model(tokens, visual=I_p)``,
    see :meth:`AdaptionPrompt.prompt_kv`); the encoders that make the features are in
    :mod:`adapterlab.worlds.vision`.

    LayerNorm (features of different encoders and layers have very different scales), a
    two-layer MLP with a narrow hidden width (a bottleneck: hidden=128 by default), and a
    LayerNorm on the output (as the release's projection), so that I_p starts at the prompts'
    scale (about 1 per element) instead of being drowned by them.

    Parameters: 2*visual_dim + visual_dim*hidden + hidden + hidden*dim + dim + 2*dim. At 7B
    (C=4096) with CLIP ViT-L/14's 1024-wide class token that is 669,824 - the paper's "0.6M
    projection"; a hidden width of C would be 21M, more than ten times the prompts.
    """

    def __init__(self, visual_dim: int, dim: int, hidden: int = 128):
        super().__init__()
        for arg, value in (("visual_dim", visual_dim), ("dim", dim), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VisualProjection: {arg} must be a positive integer; got {value!r}")
        self.visual_dim, self.dim, self.hidden = visual_dim, dim, hidden
        self.norm = nn.LayerNorm(visual_dim)
        self.fc1 = nn.Linear(visual_dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, has_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features (B, visual_dim) -> I_p (B, dim); has_image (B,): 0/False where a row has no picture (I_p = 0)."""
        if features.dim() != 2 or features.shape[1] != self.visual_dim:
            raise ValueError(f"VisualProjection expects visual features of shape (batch, {self.visual_dim}); "
                             f"got {tuple(features.shape)}. Did the encoder's visual_dim change?")
        x = self.norm(features.to(self.fc1.weight.dtype))
        image_token = self.out_norm(self.fc2(F.gelu(self.fc1(x))))  # (B, dim)
        if has_image is not None:
            image_token = image_token * has_image.to(image_token.device, image_token.dtype)[:, None]
        return image_token


# --------------------------------------------------------------------------- attach / inspect
def add_adapter(model: Llama, config: AdapterConfig, seed: Optional[int] = 0) -> Llama:
    """Attach adaption prompts to the top ``config.layers`` layers, in place, and freeze the base.

    Afterwards only the prompts and gates (and a multi-modal projection, if any) train.
    """
    n = model.config.n_layers
    if config.layers > n:
        raise ValueError(
            f"AdapterConfig.layers={config.layers} but the model has only n_layers={n}; "
            f"choose layers between 1 and {n}"
        )
    if adapted_layers(model):
        raise ValueError("this model already has an adapter; call remove_adapter(model) first")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = model.device
    for i in range(n - config.layers, n):  # the top L layers, bottom adapted layer first
        model.layers[i].attention.adapter = AdaptionPrompt(config, model.config.dim, model.config.n_heads, generator).to(device)
    model.adapter_config = config
    if config.visual_dim is not None:
        model.visual_proj = VisualProjection(config.visual_dim, model.config.dim, config.visual_hidden).to(device)
    return model


def remove_adapter(model: Llama) -> Llama:
    """Detach the adapter (the base stays frozen; call requires_grad_ yourself to train it)."""
    for layer in model.layers:
        layer.attention.adapter = None
    if hasattr(model, "visual_proj"):
        del model.visual_proj
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def adapted_layers(model: Llama) -> list[int]:
    """Indices of the layers that carry an adapter, bottom first."""
    return [i for i, layer in enumerate(model.layers) if layer.attention.adapter is not None]


def adapter_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors (prompts, gates, visual projection), keyed as in model.state_dict()."""
    return {k: v for k, v in model.state_dict().items() if ".adapter." in k or k.startswith("visual_proj.")}


def gate_values(model: Llama) -> torch.Tensor:
    """Effective gates of the adapted layers -> (L, H) (a per-layer gate is repeated over heads).

    An adapter without a gate (a study variant: ungated prompts) has no row."""
    rows = []
    H = model.config.n_heads
    for i in adapted_layers(model):
        if model.layers[i].attention.adapter.gate is None:
            continue
        g = model.layers[i].attention.adapter.gate_value().detach().float().reshape(-1)
        rows.append(g.expand(H) if g.numel() == 1 else g)
    return torch.stack(rows) if rows else torch.zeros(0, H)


@torch.no_grad()
def prompt_attention_map(model: Llama, tokens: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
    """What each token reads from the prompts of one adapted layer (default: the top one; text
    only, no image token):
    :func:`gated_prompt_scores` of the queries that reach that adapter while the model runs
    on ``tokens`` (B, T) -> (B, H, T, K). Rows sum to the heads' gates."""
    layer = adapted_layers(model)[-1] if layer is None else layer
    attn = model.layers[layer].attention
    if attn.adapter is None:
        raise ValueError(f"layer {layer} carries no adapter; adapted layers: {adapted_layers(model)}")
    captured = {}
    hook = attn.adapter.register_forward_hook(lambda module, args, output: captured.update(q=args[0]))
    try:
        model(tokens)
    finally:
        hook.remove()
    pk, _ = attn.adapter.prompt_kv(attn)  # prompts through the frozen W_k: (1, H_kv, K, d)
    q = captured["q"]  # (B, H, T, d), rotated
    return gated_prompt_scores(q, pk.to(q.dtype), attn.adapter.gate_value())


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, tensor) of every parameter that trains (requires_grad), in the model's order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """How many numbers train: the adapter's (or LoRA's, or all for full fine-tuning)."""
    return sum(p.numel() for _, p in trainable_parameters(model))
