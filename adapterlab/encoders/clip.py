"""Zero-init gated prompts on the vision tower of a Hugging Face CLIP model, for users who have one.

It imports only the core (adapter). transformers is optional: it is imported inside the functions
that need it, with a clear error when it is missing.

The mechanism is the one of adapter.py (Eq. 7, written once there), applied to the top L layers
of ``CLIPVisionModel``'s encoder. Each adapted layer's self-attention is wrapped, not rewritten:

    y = CLIPAttention(x)  +  W_o [ g * softmax(Q P_k^T / sqrt(d)) P_v ]       (W_o without its bias)

    with Q = q_proj(x) per head, P_k = k_proj(P), P_v = v_proj(P): the prompts P (K x width) pass
    through the layer's frozen projections and carry no position, as in LLaMA-Adapter.

CLIP's attention is bidirectional and scales its scores by 1/sqrt(d) like ours, so the second
term is exactly the adapter's :func:`~adapterlab.adapter.gated_prompt_attention`. The frozen
attention runs untouched, and at g = 0 the added term is exactly 0: the adapted tower's output
is bit-identical to the original's. The ungated deep prompts (one softmax over [P; tokens],
VPT-deep), for comparison, are a study variant: ``adapterlab.studies.variants.add_ungated_prompts(vision,
config)`` swaps in its prompts and this wrapper hands them the token keys and attention.

    vision = load_clip_vision("path/to/clip")            # a local folder; never downloads
    add_clip_prompts(vision, AdapterConfig(prompt_len=10, layers=8))
    vision(pixel_values=...).pooler_output                 # only the prompts and gates train
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import AdapterConfig, AdaptionPrompt

PathLike = Union[str, Path]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class NotACLIPFolder(FileNotFoundError, ValueError):
    """A folder load_clip_vision cannot read. A ValueError, and a FileNotFoundError for code that
    catches that (as io.UnsupportedOperation is both an OSError and a ValueError)."""


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("adapterlab.encoders.clip needs Hugging Face transformers: pip install transformers "
                          "(or the package's test extra)") from None
    return transformers


# --------------------------------------------------------------------------- loading
def load_clip_vision(folder: PathLike):
    """CLIP's vision tower (transformers' ``CLIPVisionModel``, eval mode) from a local folder that a
    ``CLIPModel`` or ``CLIPVisionModel`` was saved to (``save_pretrained``). Never downloads.

    A wrong or missing folder raises :class:`NotACLIPFolder` (a ValueError) naming the folder and
    what it must contain.
    """
    transformers = require_transformers()
    folder = Path(folder)
    need = ("config.json (model_type 'clip' or 'clip_vision_model') and the weights "
            f"({' or '.join(WEIGHT_FILES)}), as written by CLIPModel.save_pretrained or CLIPVisionModel.save_pretrained; "
            "download e.g. openai/clip-vit-large-patch14 once and pass its local folder")

    def refuse(reason: str):
        return NotACLIPFolder(f"{folder} is not a transformers CLIP folder: {reason}. It must hold {need}")

    if not folder.is_dir():
        raise refuse("no such folder")
    if not (folder / "config.json").is_file():
        raise refuse("it has no config.json")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise refuse("its config.json is not a JSON object") from None
    if model_type not in ("clip", "clip_vision_model"):
        raise refuse(f"its config.json says model_type={model_type!r}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise refuse("it has no weights file")
    return transformers.CLIPVisionModel.from_pretrained(folder, local_files_only=True).eval()


# --------------------------------------------------------------------------- the gated attention
class GatedCLIPAttention(nn.Module):
    """One CLIP self-attention (``.attention``, frozen, unchanged) plus the adaption prompts (``.adapter``).

    Exposes what :class:`~adapterlab.adapter.AdaptionPrompt` reads from an attention (``wk``,
    ``wv``, ``split_heads``, ``n_heads``, ``n_kv_heads``, ``layer_id``), so the prompts' keys and
    values are computed by the adapter's own code.
    """

    def __init__(self, attention: nn.Module, adapter: AdaptionPrompt, layer_id: int):
        super().__init__()
        if abs(attention.scale - attention.head_dim ** -0.5) > 1e-12:
            raise ValueError(f"CLIP layer {layer_id} scales its scores by {attention.scale}, not 1/sqrt(head_dim): "
                             "the adapter's softmax would not match it")
        self.attention = attention
        self.adapter = adapter
        self.layer_id = layer_id
        self.n_heads = self.n_kv_heads = attention.num_heads
        self.head_dim = attention.head_dim

    @property
    def wk(self) -> nn.Linear:
        return self.attention.k_proj

    @property
    def wv(self) -> nn.Linear:
        return self.attention.v_proj

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.unflatten(-1, (n_heads, self.head_dim)).transpose(1, 2)  # (B, T, C) -> (B, H, T, d)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        out, weights = self.attention(hidden_states, attention_mask, **kwargs)  # the frozen layer, as it was
        B, T, _ = hidden_states.shape
        q = self.split_heads(self.attention.q_proj(hidden_states), self.n_heads)  # (B, H, T, d)
        if self.adapter.gate is not None:
            term = self.adapter(q, self)  # Eq. 7's prompt term: g * softmax(Q P_k^T / sqrt d) P_v, (B, H, T, d)
        else:
            term = self.ungated_term(q, hidden_states, attention_mask)
        return out + F.linear(term.transpose(1, 2).reshape(B, T, -1), self.attention.out_proj.weight), weights

    def ungated_term(self, q, hidden_states, attention_mask):
        """Ungated prompts (adapterlab.studies.variants): the share the prompts take in one softmax with
        the tokens (needs the tokens' keys and attention, recomputed here; the vision tower attends to every token)."""
        if attention_mask is not None:
            raise ValueError("ungated CLIP prompts (adapterlab.studies.variants.add_ungated_prompts) support the "
                             "vision tower only (no attention mask)")
        k = self.split_heads(self.attention.k_proj(hidden_states), self.n_heads)  # (B, H, T, d)
        v = self.split_heads(self.attention.v_proj(hidden_states), self.n_heads)
        token_out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d), before out_proj
        everyone = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
        return self.adapter(q, self, keys=k, token_out=token_out, token_mask=everyone)


# --------------------------------------------------------------------------- attach / inspect
def clip_encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a CLIPVisionModel (or CLIPModel, or CLIPVisionTransformer)."""
    tower = getattr(model, "vision_model", model)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if layers is None:
        raise ValueError("expected a transformers CLIPVisionModel (with .vision_model.encoder.layers); "
                         f"got {type(model).__name__}")
    return layers


def add_clip_prompts(model: nn.Module, config: AdapterConfig, seed: Optional[int] = 0) -> nn.Module:
    """Attach adaption prompts with zero-init gates to the top ``config.layers`` layers of CLIP's
    vision tower, in place, and freeze everything else. Returns the model.

    The base weights keep their values; in ``state_dict`` their names gain ``.attention`` inside
    adapted layers (``remove_clip_prompts`` restores the original modules). The prompts' names
    contain ``.adapter.``, as with LLaMA.
    """
    if config.visual_dim is not None:
        raise ValueError("AdapterConfig.visual_dim is for the multi-modal LLaMA adapter; CLIP prompts take none")
    layers = clip_encoder_layers(model)
    n = len(layers)
    if config.layers > n:
        raise ValueError(f"AdapterConfig.layers={config.layers} but this CLIP tower has {n} layers; "
                         f"choose layers between 1 and {n}")
    if clip_adapted_layers(model):
        raise ValueError("this CLIP model already has prompts; call remove_clip_prompts(model) first")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for i in range(n - config.layers, n):  # the top L layers, bottom adapted layer first
        attention = layers[i].self_attn
        prompt = AdaptionPrompt(config, attention.embed_dim, attention.num_heads, generator)
        prompt = prompt.to(attention.q_proj.weight.device)
        layers[i].self_attn = GatedCLIPAttention(attention, prompt, layer_id=i)
    return model


def remove_clip_prompts(model: nn.Module) -> nn.Module:
    """Put the original attentions back (the base stays frozen)."""
    for layer in clip_encoder_layers(model):
        if isinstance(layer.self_attn, GatedCLIPAttention):
            layer.self_attn = layer.self_attn.attention
    return model


def clip_adapted_layers(model: nn.Module) -> list[int]:
    """Indices of the CLIP layers that carry prompts, bottom first."""
    return [i for i, layer in enumerate(clip_encoder_layers(model)) if isinstance(layer.self_attn, GatedCLIPAttention)]


def clip_gate_values(model: nn.Module) -> torch.Tensor:
    """Effective gates of the adapted CLIP layers -> (L, H), as adapter.gate_values gives for LLaMA
    (a per-layer gate repeated over the heads; ungated layers have no row)."""
    layers = clip_encoder_layers(model)
    gated = [layers[i].self_attn for i in clip_adapted_layers(model) if layers[i].self_attn.adapter.gate is not None]
    rows = [a.adapter.gate_value().detach().float().reshape(-1).expand(a.n_heads) for a in gated]
    if rows:
        return torch.stack(rows)
    top = layers[-1].self_attn
    return torch.zeros(0, top.n_heads if isinstance(top, GatedCLIPAttention) else top.num_heads)
