"""Two more model families for zero-init attention: a small ViT and a small RoBERTa-style encoder.

The adapter reaches these models through the one ``self.adapter`` slot of :class:`EncoderAttention`,
exactly as in model.py.

    ViT:   images (B, 3, H, W) -> patches (a strided conv) -> [CLS; patches] + positions
           -> [ LayerNorm -> attention (bidirectional) -> LayerNorm -> GELU MLP ] x n_layers
           -> LayerNorm -> the CLS state (B, dim) -> head -> class scores
    text:  tokens (B, T) -> token embedding + position embedding
           -> the same blocks (padding keys masked)  -> LayerNorm -> head, per token

What changes from LLaMA (model.py): positions are learned vectors added at the input (no rotary),
attention is bidirectional (every token sees every non-padding token), the projections have
biases (as ViT and RoBERTa), LayerNorm and a GELU MLP. What does not change: the attention keeps
model.Attention's names (``wq wk wv wo``, ``split_heads``, ``n_heads``, ``adapter``), so
``adapter.add_adapter`` attaches the same adaption prompts with the same zero-init gates (Eq. 7,
written once in adapter.py): the prompts pass through the frozen W_k, W_v and carry no position.
:func:`add_input_prompts` gives the shallow prompts of prompt tuning / VPT-shallow (input only); the
ungated deep prompts of VPT-deep / P-tuning v2 are a study variant (:mod:`adapterlab.studies.variants`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..io.files import atomic_write_bytes, atomic_write_text

PathLike = Union[str, Path]


# --------------------------------------------------------------------------- configs
@dataclass
class EncoderConfig:
    """Shape of the transformer blocks shared by both encoders."""

    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 256
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer; got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"{type(self).__name__}: dim={self.dim} is not divisible by n_heads={self.n_heads}")

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads  # plain multi-head attention (the adapter asks for it)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, params: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})


@dataclass
class ViTConfig(EncoderConfig):
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    n_classes: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size={self.image_size} is not divisible by patch_size={self.patch_size}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(kw_only=True)  # vocab_size has no sensible default: TextEncoderConfig(vocab_size=..., ...)
class TextEncoderConfig(EncoderConfig):
    vocab_size: int
    max_seq_len: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be a positive integer; got {value!r}")


# --------------------------------------------------------------------------- attention
class EncoderAttention(nn.Module):
    """Bidirectional multi-head self-attention; only padding keys are hidden from a query."""

    def __init__(self, config: EncoderConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.dim)
        self.wk = nn.Linear(config.dim, config.dim)
        self.wv = nn.Linear(config.dim, config.dim)
        self.wo = nn.Linear(config.dim, config.dim)
        self.adapter: Optional[nn.Module] = None  # set by adapterlab.adapter.add_adapter

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.unflatten(-1, (n_heads, self.head_dim)).transpose(1, 2)  # (B, T, C) -> (B, H, T, d)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, T, dim); mask (B, T) bool, True = a real token (None: all real) -> (B, T, dim)."""
        B, T, _ = x.shape
        q, k, out = self.attend_tokens(x, mask)  # (B, H, T, d) each

        # Zero-init attention: add the gated term over the adaption prompts (Eq. 7, sum form), as
        # model.Attention does.
        if self.adapter is not None:
            out = out + self.adapter(q, self)

        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def attend_tokens(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """The frozen layer's own attention over the tokens -> (queries, keys, output).
        Every query sees every real token (no causal mask); padding keys are hidden."""
        q = self.split_heads(self.wq(x), self.n_heads)  # (B, H, T, d)
        k = self.split_heads(self.wk(x), self.n_kv_heads)  # (B, H, T, d)
        v = self.split_heads(self.wv(x), self.n_kv_heads)  # (B, H, T, d)
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, T, d)
        return q, k, out


# --------------------------------------------------------------------------- feed-forward and block
class MLP(nn.Module):
    """w2( gelu(w1 x) ), with biases (ViT's and RoBERTa's feed-forward)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.mlp_hidden)
        self.w2 = nn.Linear(config.mlp_hidden, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: EncoderConfig, layer_id: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attention = EncoderAttention(config, layer_id)
        self.ffn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = MLP(config)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), mask)
        return h + self.feed_forward(self.ffn_norm(h))


# --------------------------------------------------------------------------- ViT
def check_pixels(images, config: ViTConfig) -> torch.Tensor:
    """The pictures a ViT takes: float (B, channels, image_size, image_size) with values in [0, 1]."""
    want = f"(batch, {config.channels}, {config.image_size}, {config.image_size})"
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape {want}; got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (config.channels, config.image_size, config.image_size):
        raise ValueError(f"images must have shape {want} (channels first, values in [0, 1]); "
                         f"got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be float with values in [0, 1]; got dtype {images.dtype} "
                        f"(for 0..255 pictures use images.float() / 255)")
    return images


class ViT(nn.Module):
    """A small Vision Transformer. ``model(images)`` (B, 3, H, W) in [0, 1] -> class scores (B, n_classes).

    The picture is cut into patch_size x patch_size patches, each embedded by one strided
    convolution; a learned CLS token goes in front, learned position embeddings are added, and
    the normalised CLS state after the last block is the picture's feature (:meth:`features`).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        p = config.patch_size
        self.patch_embed = nn.Conv2d(config.channels, config.dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + config.n_patches, config.dim))
        self.layers = nn.ModuleList(EncoderBlock(config, i) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.n_classes)
        self.register_parameter("input_prompts", None)  # (n, dim) by add_input_prompts (shallow prompt tuning)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[CLS; patches] + positions, then the input prompts (if any) after CLS -> (B, 1 + n + N, dim)."""
        x = check_pixels(images, self.config).to(self.patch_embed.weight.dtype)
        x = self.patch_embed(2 * x - 1)  # pixels [0, 1] -> [-1, 1]; (B, dim, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, dim)
        h = torch.cat([cls, x], dim=1) + self.pos_embedding  # (B, 1 + N, dim)
        if self.input_prompts is not None:  # no position: inserted after the positions were added
            prompts = self.input_prompts.to(h.dtype).expand(h.shape[0], -1, -1)  # (B, n, dim)
            h = torch.cat([h[:, :1], prompts, h[:, 1:]], dim=1)
        return h

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The picture's feature: the normalised CLS state after the last block -> (B, dim)."""
        h = self.embed(images)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, n_classes)

    def num_params(self) -> int:
        """All parameters, frozen or not (``adapterlab.adapter.count_trainable`` counts those that train)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device


# --------------------------------------------------------------------------- text encoder
class TextEncoder(nn.Module):
    """A small RoBERTa-style encoder. ``model(tokens, mask)`` (B, T) -> head outputs per token (B, T, n_out).

    Token embedding + learned position embedding, the blocks, a final LayerNorm and a linear
    head (vocab_size outputs for masked-language modelling; :func:`set_head` swaps it, e.g. for
    the start/end scores of extractive question answering). mask (B, T): True at real tokens,
    False at padding; padding keys are hidden from every query.

    RoBERTa itself is post-norm (LayerNorm after each residual sum); we keep the pre-norm block
    of the ViT (and of LLaMA) so that one block, and one attention with one adapter slot, serves
    both encoders. Pre-norm also trains from scratch without a warm-up-sensitive start, which
    suits the small bases built here. Nothing in zero-init attention depends on where the norm sits.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embeddings = nn.Embedding(config.max_seq_len, config.dim)
        self.layers = nn.ModuleList(EncoderBlock(config, i) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size)
        self.register_parameter("input_prompts", None)  # (n, dim) by add_input_prompts (shallow prompt tuning)

    def check_inputs(self, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor of shape (batch, seq_len); got {got}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than max_seq_len={self.config.max_seq_len}")
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"mask must have the tokens' shape {tuple(tokens.shape)} (True = real token, "
                             f"False = padding); got {tuple(mask.shape)}")
        mask = mask.to(device=tokens.device, dtype=torch.bool)
        if not mask.any(dim=1).all():
            raise ValueError("mask: every sequence needs at least one real token (a row of the mask is all False)")
        return mask

    def hidden(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final normalised hidden states -> (B, T, dim) (input prompts, if any, are left out)."""
        mask = self.check_inputs(tokens, mask)
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device)
        h = self.tok_embeddings(tokens) + self.pos_embeddings(positions)  # (B, T, dim)
        n = 0
        if self.input_prompts is not None:  # no position: inserted after the positions were added
            n = self.input_prompts.shape[0]
            h = torch.cat([self.input_prompts.to(h.dtype).expand(B, -1, -1), h], dim=1)  # (B, n + T, dim)
            if mask is not None:
                mask = torch.cat([mask.new_ones(B, n), mask], dim=1)
        for layer in self.layers:
            h = layer(h, mask)
        return self.norm(h[:, n:])  # (B, T, dim)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.hidden(tokens, mask))  # (B, T, n_out)

    def num_params(self) -> int:
        """All parameters, frozen or not (``adapterlab.adapter.count_trainable`` counts those that train)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device


Encoder = Union[ViT, TextEncoder]


# --------------------------------------------------------------------------- heads and input prompts
def set_head(model: Encoder, n_out: int, seed: int = 0, std: float = 0.02) -> Encoder:
    """Replace ``model.head`` by a fresh nn.Linear(dim, n_out): weights N(0, std^2), bias 0. It trains
    (requires_grad) whatever the rest of the model does; returns the model."""
    if not isinstance(n_out, int) or n_out < 1:
        raise ValueError(f"set_head: n_out must be a positive integer; got {n_out!r}")
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(model.config.dim, n_out)
    with torch.no_grad():
        head.weight.copy_(torch.randn(n_out, model.config.dim, generator=gen) * std)
        head.bias.zero_()
    model.head = head.to(device=model.device, dtype=model.norm.weight.dtype)
    return model


def add_input_prompts(model: Encoder, n: int, seed: int = 0) -> Encoder:
    """Shallow prompt tuning (Lester et al.'s prompt tuning; VPT-shallow): n learnable vectors in
    front of the tokens (after CLS for the ViT), at the input only, in place; freezes the base.

    They join after the position embeddings (they have no position) and every layer treats them
    as tokens; their outputs are dropped, so shapes and the ViT's CLS feature stay as they were.
    Initialisation as the originals: the ViT's from VPT (Xavier uniform over patch_size^2 *
    channels + dim), the text encoder's from n rows of its token embedding (prompt tuning's
    "sampled vocabulary"). Only the prompts train afterwards (unfreeze the head yourself, or call
    :func:`set_head`); ``model.input_prompts = None`` removes them.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"add_input_prompts: n must be a positive integer; got {n!r}")
    if model.input_prompts is not None:
        raise ValueError("this model already has input prompts; remove them with model.input_prompts = None first")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    dim = model.config.dim
    if isinstance(model, ViT):
        bound = math.sqrt(6.0 / (model.config.channels * model.config.patch_size ** 2 + dim))
        prompts = (torch.rand(n, dim, generator=gen) * 2 - 1) * bound
    else:
        rows = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
        prompts = model.tok_embeddings.weight.detach().cpu().float()[rows].clone()
    model.input_prompts = nn.Parameter(prompts.to(device=model.device, dtype=model.norm.weight.dtype))
    return model


# --------------------------------------------------------------------------- initialisation
def init_encoder_weights(model: Encoder, seed: int, std: float = 0.02) -> Encoder:
    """Random initialisation for pretraining from scratch, deterministic given ``seed``: matrices,
    embeddings, CLS and positions N(0, std^2) (the residual outputs wo, w2 scaled by 1/sqrt(2 n_layers),
    as model.init_weights); biases 0, LayerNorm weights 1. Adapters and prompts are left alone."""
    gen = torch.Generator().manual_seed(seed)
    scaled = std / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if ".adapter." in name or name == "input_prompts" or "lora_" in name:
            continue
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                scale = scaled if name.endswith(("wo.weight", "w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


# --------------------------------------------------------------------------- save / load
KINDS = {"vit": (ViT, ViTConfig), "text": (TextEncoder, TextEncoderConfig)}
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_encoder(model: Encoder, folder: PathLike) -> Path:
    """Write the base encoder to ``folder``: model.safetensors (its weights, the head included; an
    adapter, input prompts and LoRA branches left out) and config.json ({"kind": "vit" | "text", the
    config's fields, "head_out"}). Each file is written atomically. Returns the folder."""
    from safetensors.torch import save

    kind = next((k for k, (cls, _) in KINDS.items() if isinstance(model, cls)), None)
    if kind is None:
        raise TypeError(f"save_encoder saves a ViT or a TextEncoder; got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if ".adapter." not in k and k != "input_prompts" and "lora_" not in k}
    config = {"kind": kind, **model.config.to_dict(), "head_out": model.head.out_features}
    atomic_write_bytes(folder / WEIGHTS, save(state))
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2))
    return folder


def load_encoder(folder: PathLike, device: Union[str, torch.device, None] = None) -> Encoder:
    """Read what :func:`save_encoder` wrote -> the encoder (eval mode, every parameter trainable)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; an encoder folder holds {WEIGHTS} and {CONFIG} "
                                f"(written by adapterlab.encoders.transformer.save_encoder)")
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {' and no '.join(missing)}; an encoder folder holds {WEIGHTS} and "
                                f"{CONFIG} (written by adapterlab.encoders.transformer.save_encoder)")
    try:
        params = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / CONFIG} is not valid JSON: {e}") from None
    kind = params.get("kind") if isinstance(params, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{folder / CONFIG} is not an adapterlab encoder's config (kind={kind!r}, expected one of "
                         f"{tuple(KINDS)}); LLaMA folders load with load_llama, CLIP folders with "
                         f"adapterlab.encoders.clip.load_clip_vision")
    model_cls, config_cls = KINDS[kind]
    model = model_cls(config_cls.from_dict(params))
    if params.get("head_out", model.head.out_features) != model.head.out_features:
        set_head(model, params["head_out"])
    state = load_file(str(folder / WEIGHTS))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / WEIGHTS} does not fit the model described by {folder / CONFIG}: {e}") from None
    return model.to(device or "cpu").eval()
