"""Ungated prompts: the design zero-init attention improves on (prefix tuning, P-tuning v2, VPT-deep).

The K prompts of every adapted layer join the word tokens' softmax - keys/values [P; T], ONE
softmax, no gate - instead of Eq. 7's separate, gated prompt softmax. The paper's ablations
compare the two; the core (:mod:`adapterlab.adapter`) holds the paper's method only, so this
variant plugs into the model from here:

    add_ungated_prompts(model, AdapterConfig(prompt_len=10, layers=4))   # LLaMA, ViT / text encoder, CLIP

The ungated term needs what the gated one does not: the layer's token keys and its token
attention. :class:`UngatedAttention` (LLaMA) and :class:`UngatedEncoderAttention` (the encoders)
replace an adapted layer's attention, share its frozen weights (same modules, same names in the
state dict) and hand both to :class:`UngatedPrompt`. CLIP's wrapped attention already does.
The prompts are drawn as the paper's adapter draws them (same seed, same prompts).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import AdapterConfig, AdaptionPrompt, adapted_layers, add_adapter, visible_keys
from ..encoders.transformer import EncoderAttention
from ..model import Attention, KVCache


# --------------------------------------------------------------------------- the math
def joint_prompt_attention(q: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor, keys: torch.Tensor,
                           token_out: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ungated alternative to Eq. 7: prompts and word tokens share ONE softmax.

        Eq. 7 (gated):  S^g V = softmax(S^{M+1}) V  +  g * softmax(S^K) P_v
        one softmax:    softmax([S^K, S^{M+1}]) [P_v; V]
                      = softmax(S^{M+1}) V  +  w * (softmax(S^K) P_v - softmax(S^{M+1}) V)
        with  w = sum exp(S^K) / (sum exp(S^K) + sum exp(S^{M+1})) = sigmoid(lse(S^K) - lse(S^{M+1}))

    w is the share of attention the prompts take from the tokens: a "gate" no parameter controls,
    set by the scores alone, and far from 0 at initialisation - so the frozen model's output
    changes before anything is learned. token_out: softmax(S^{M+1}) V, the attention over the
    tokens the layer already computed, (B, H, T, d). keys: (B, H_kv, S, d) token keys (rotated
    for LLaMA), S >= T (query i sees keys 0..S-T+i, as with a KV cache). prompt_k, prompt_v:
    (1 or B, H_kv, K, d). token_mask: which keys each query sees, bool broadcastable to (B, H, T, S)
    (None: causal; see :func:`adapterlab.adapter.visible_keys`). Returns the correction to add to
    token_out, (B, H, T, d).
    """
    n_rep = q.shape[1] // keys.shape[1]  # grouped-query attention: share K/V heads
    if n_rep > 1:
        keys, prompt_k, prompt_v = (x.repeat_interleave(n_rep, dim=1) for x in (keys, prompt_k, prompt_v))
    T, S, d = q.shape[2], keys.shape[2], q.shape[-1]
    prompt_scores = (q @ prompt_k.transpose(-2, -1)).float() / math.sqrt(d)  # S^K: (B, H, T, K)
    token_scores = (q @ keys.transpose(-2, -1)).float() / math.sqrt(d)  # S^{M+1}: (B, H, T, S)
    token_scores = token_scores.masked_fill(~visible_keys(token_mask, T, S, q.device), float("-inf"))
    w = torch.sigmoid(prompt_scores.logsumexp(-1) - token_scores.logsumexp(-1))[..., None]  # (B, H, T, 1)
    prompt_out = F.softmax(prompt_scores, dim=-1).type_as(q) @ prompt_v  # softmax(S^K) P_v: (B, H, T, d)
    return w.type_as(q) * (prompt_out - token_out)


def joint_attention_literal(q, k, v, prompt_k, prompt_v, token_mask=None):
    """The ungated form as prefix tuning writes it: keys/values [P; T], ONE softmax, no gate.

    Shapes and token_mask as :func:`adapterlab.adapter.zero_init_attention_literal` (None: causal).
    There the prompt scores S^K and the token scores S^{M+1} get their own softmax and the gate
    scales the prompt block; here every prompt competes with every token for the same unit of attention.
    """
    B, H, T, d = q.shape
    K = prompt_k.shape[2]
    keys = torch.cat([prompt_k.expand(B, -1, -1, -1), k], dim=2)  # [P; T]  (B, H, K+T, d)
    values = torch.cat([prompt_v.expand(B, -1, -1, -1), v], dim=2)
    S = q @ keys.transpose(-2, -1) / math.sqrt(d)  # (B, H, T, K+T)
    tokens = visible_keys(token_mask, T, T, q.device).expand(B, H, T, T)
    visible = torch.cat([tokens.new_ones(B, H, T, K), tokens], dim=-1)  # prompts: always visible
    return S.masked_fill(~visible, float("-inf")).softmax(-1) @ values  # (B, H, T, d)


# --------------------------------------------------------------------------- the modules
class UngatedPrompt(AdaptionPrompt):
    """The K prompts of one layer without a gate: they take a share of the tokens' softmax."""

    def __init__(self, prompt: nn.Parameter):
        nn.Module.__init__(self)  # AdaptionPrompt's own __init__ would build a gate
        self.prompt = prompt  # P_l: (K, C)
        self.register_parameter("gate", None)

    def gate_value(self) -> torch.Tensor:
        raise ValueError("these prompts are ungated (adapterlab.studies.variants.add_ungated_prompts): they have no "
                         "gate value; they take a share of the tokens' softmax instead (joint_prompt_attention)")

    def forward(self, q, attn, cache: Optional[KVCache] = None, visual=None, keys: Optional[torch.Tensor] = None,
                token_out: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None):
        """The correction to the layer's token attention. q: (B, H, T, d) queries; keys, token_out: the
        layer's token keys and token attention; token_mask: which keys each query saw there (None: causal)."""
        if keys is None or token_out is None:
            raise ValueError("ungated prompts need the layer's token keys and token attention (keys=..., "
                             "token_out=...): attach them with add_ungated_prompts, which installs an attention "
                             "that passes both")
        pk, pv = self.cached_prompt_kv(attn, cache, visual)
        return joint_prompt_attention(q, pk.to(q.dtype), pv.to(q.dtype), keys.to(q.dtype), token_out, token_mask)


def _share_weights(new: nn.Module, attn: nn.Module) -> None:
    """``new`` takes over ``attn``'s frozen projections and shape (the same modules, not copies)."""
    nn.Module.__init__(new)
    new.layer_id, new.n_heads, new.n_kv_heads, new.head_dim = attn.layer_id, attn.n_heads, attn.n_kv_heads, attn.head_dim
    new.wq, new.wk, new.wv, new.wo = attn.wq, attn.wk, attn.wv, attn.wo
    new.adapter = attn.adapter
    new.train(attn.training)


class UngatedAttention(Attention):
    """model.Attention, with the token keys and attention handed to ungated prompts (the same weights)."""

    def __init__(self, attn: Attention):
        _share_weights(self, attn)

    def forward(self, x, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None, visual=None):
        B, T, _ = x.shape
        q, k, out = self.attend_tokens(x, cos, sin, start_pos, cache)  # as model.Attention
        if isinstance(self.adapter, UngatedPrompt):  # one softmax over [P; T] (token_mask None: causal)
            out = out + self.adapter(q, self, cache=cache, visual=visual, keys=k, token_out=out)
        elif self.adapter is not None:  # a gated adapter attached later: as model.Attention
            out = out + self.adapter(q, self, cache=cache, visual=visual)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class UngatedEncoderAttention(EncoderAttention):
    """The encoders' bidirectional attention, with the token keys, attention and padding mask handed
    to ungated prompts (the same weights)."""

    def __init__(self, attn: EncoderAttention):
        _share_weights(self, attn)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, out = self.attend_tokens(x, mask)  # as EncoderAttention
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T)
        if isinstance(self.adapter, UngatedPrompt):  # every real token visible (not causal)
            visible = key_mask if key_mask is not None else torch.ones(1, 1, 1, T, dtype=torch.bool, device=x.device)
            out = out + self.adapter(q, self, keys=k, token_out=out, token_mask=visible)
        elif self.adapter is not None:
            out = out + self.adapter(q, self)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


# --------------------------------------------------------------------------- attach
def add_ungated_prompts(model: nn.Module, config: AdapterConfig, seed: Optional[int] = 0) -> nn.Module:
    """Attach ungated prompts to the top ``config.layers`` layers, in place, and freeze the base.

    model: a LLaMA (adapterlab.model.Llama), a ViT or text encoder (adapterlab.encoders.transformer),
    or a transformers CLIP vision tower (adapterlab.encoders.clip). config: prompt_len, layers
    (and visual_dim for LLaMA); gate and gate_activation do not apply (there is no gate).
    Afterwards only the prompts (and a multi-modal projection, if any) train; the model's output
    changes at once (the prompts take attention from the tokens). Returns the model.
    """
    if config.init != "zero":
        raise ValueError(f"add_ungated_prompts: AdapterConfig.init={config.init!r} says where a gate starts, but "
                         "ungated prompts have no gate; leave init at 'zero' (the prompts start at their random draw)")
    if not hasattr(model, "layers"):
        return _add_ungated_clip_prompts(model, config, seed)
    add_adapter(model, config, seed=seed)  # checks the config, freezes the base, draws the prompts as the paper's
    for i in adapted_layers(model):
        block = model.layers[i]
        attn = block.attention
        attn.adapter = UngatedPrompt(attn.adapter.prompt)
        if isinstance(attn, EncoderAttention):
            block.attention = UngatedEncoderAttention(attn)
        elif isinstance(attn, Attention):
            block.attention = UngatedAttention(attn)
        else:
            raise TypeError(f"add_ungated_prompts: layer {i} has a {type(attn).__name__}; expected adapterlab's "
                            "model.Attention or encoders.transformer.EncoderAttention")
    return model


def _add_ungated_clip_prompts(model: nn.Module, config: AdapterConfig, seed: Optional[int]) -> nn.Module:
    """CLIP's wrapped attention computes the token keys and attention for ungated prompts itself."""
    from ..encoders.clip import GatedCLIPAttention, add_clip_prompts, clip_encoder_layers

    add_clip_prompts(model, config, seed=seed)
    for layer in clip_encoder_layers(model):
        if isinstance(layer.self_attn, GatedCLIPAttention):
            layer.self_attn.adapter = UngatedPrompt(layer.self_attn.adapter.prompt)
    return model


def is_ungated(model: nn.Module) -> bool:
    """Whether the model's adapted layers carry ungated prompts."""
    return any(isinstance(m, UngatedPrompt) for m in model.modules())


__all__ = ["joint_prompt_attention", "joint_attention_literal", "UngatedPrompt", "UngatedAttention",
           "UngatedEncoderAttention", "add_ungated_prompts", "is_ungated"]
