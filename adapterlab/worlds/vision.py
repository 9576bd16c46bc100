"""Visual encoders and the projection of the multi-modal LLaMA-Adapter (Sec. 3.3 of the paper).

    image -> frozen visual encoder -> multi-scale global features {I_m}, concatenated  (B, visual_dim)
          -> VisualProjection (learnable MLP)                 -> one image token I_p  (B, C)
          -> added to the K adaption prompts of every adapted layer: P_l^v = P_l + Repeat(I_p)

This module holds the encoders (the first step); the last two belong to the adapter and live in
:mod:`adapterlab.adapter` (:class:`~adapterlab.adapter.VisualProjection`, and ``model(tokens, visual=I_p)``
or ``model(tokens, image_features=...)``).

Two encoders give the same kind of output:
- :class:`SceneEncoder`, the embedded default: a small convolutional network that our own code
  pretrains on the embedded scenes (:mod:`adapterlab.worlds.scenes`) to recognise their attributes,
  then freezes. Its global features are the average-pooled maps of its three stages.
- :class:`CLIPEncoder`: CLIP's vision tower through transformers' ``CLIPVisionModel``, for real
  pictures, when the user has the weights on disk. Its global features are the class-token
  states of several layers (the last one through CLIP's post-layernorm), as the paper uses.

Images enter as float tensors (B, 3, H, W) with values in [0, 1] (uint8 (B, 3, H, W) is
converted); :func:`check_images` explains what is wrong with anything else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .scenes import COLOURS, CORNERS, COUNTS, IMAGE_SIZE, SHAPES, Scene


# --------------------------------------------------------------------------- input checks
def check_images(images, size: Optional[int] = None, name: str = "images") -> torch.Tensor:
    """Validate a batch of pictures and return it as float in [0, 1], shape (B, 3, H, W).

    Accepts float tensors in [0, 1] and uint8 tensors in [0, 255]; a single picture (3, H, W)
    becomes a batch of one. size: the side the encoder needs (None: any size).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, 3, height, width); "
                        f"got {type(images).__name__}. Convert with torch.as_tensor(...)")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (batch, 3, height, width); got {tuple(images.shape)}")
    if images.shape[1] != 3:
        hint = ""
        if images.shape[-1] == 3:
            hint = " It looks channels-last (B, H, W, 3): use images.permute(0, 3, 1, 2)."
        elif images.shape[1] in (1, 4):
            hint = (" Grey pictures: images.expand(-1, 3, -1, -1); RGBA pictures: drop alpha with "
                    "images[:, :3].")
        raise ValueError(f"{name} must have 3 colour channels (RGB) in dimension 1; got shape "
                         f"{tuple(images.shape)} with {images.shape[1]} channels.{hint}")
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"{name} must be {size}x{size} pixels for this encoder; got "
                         f"{images.shape[-2]}x{images.shape[-1]}. Resize them first, e.g. with "
                         f"torch.nn.functional.interpolate(images, size=({size}, {size}), mode='bilinear')")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"{name} must be float in [0, 1] or uint8 in [0, 255]; got dtype {images.dtype}")
    lo, hi = images.min().item(), images.max().item()
    if not (torch.isfinite(images).all() and lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"{name} must hold values in [0, 1]; found values in [{lo:.3g}, {hi:.3g}]. "
                         f"Divide 0..255 pictures by 255 (or pass them as uint8)")
    return images.float()


# --------------------------------------------------------------------------- the embedded encoder
ATTRIBUTES = ("shape", "colour", "count", "corner")
ATTRIBUTE_VALUES = (SHAPES, COLOURS, COUNTS, CORNERS)


@dataclass
class SceneEncoderConfig:
    image_size: int = IMAGE_SIZE
    widths: tuple[int, ...] = (16, 32, 64)  # channels of the three stages (each halves the resolution)

    def to_dict(self) -> dict:
        return asdict(self)


class SceneEncoder(nn.Module):
    """A small CNN for the embedded scenes. ``encoder(images)`` -> global features (B, visual_dim).

    Two coordinate channels (x, y in [-1, 1]) are appended to the RGB input (CoordConv), so that
    pooled features still know *where* things are. Each stage: 3x3 conv stride 2 + GELU, 3x3
    conv + GELU. A linear read-out on top names the scene's shape, colour, count and corner
    (it is what pretraining teaches; like CLIP's final embedding it is the most semantic level).

    Multi-scale global features, concatenated (Sec. 3.3): the spatial mean and max of every
    stage (the max keeps small local evidence - a corner, an edge - that tells shapes apart)
    and the read-out's 16 scores; each feature standardised with the training pictures'
    mean and std (buffers set when pretraining ends), so every level reaches the projection
    at the same scale. visual_dim = 2 * sum(widths) + 16.
    """

    def __init__(self, config: SceneEncoderConfig = SceneEncoderConfig()):
        super().__init__()
        self.config = config
        stages, c_in = [], 3 + 2
        for w in config.widths:
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            ))
            c_in = w
        self.stages = nn.ModuleList(stages)
        pooled_dim = 2 * sum(config.widths)
        self.readout = nn.Linear(pooled_dim, sum(len(v) for v in ATTRIBUTE_VALUES))
        self.visual_dim = pooled_dim + self.readout.out_features
        self.register_buffer("feature_mean", torch.zeros(self.visual_dim))
        self.register_buffer("feature_std", torch.ones(self.visual_dim))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Mean- and max-pooled maps of every stage -> (B, 2 * sum(widths))."""
        x = check_images(images, self.config.image_size).to(self.readout.weight.device)
        B, _, H, W = x.shape
        ys = torch.linspace(-1, 1, H, device=x.device)[:, None].expand(H, W)
        xs = torch.linspace(-1, 1, W, device=x.device)[None, :].expand(H, W)
        x = torch.cat([x - 0.5, xs.expand(B, 1, H, W), ys.expand(B, 1, H, W)], dim=1)  # (B, 5, H, W)
        feats = []
        for stage in self.stages:
            x = stage(x)  # (B, w, H/2^s, W/2^s)
            feats += [x.mean(dim=(2, 3)), x.amax(dim=(2, 3))]  # global features of this scale: (B, w) each
        return torch.cat(feats, dim=1)

    def attribute_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Scores of the shape, colour, count and corner classes -> 4 tensors (B, 4)."""
        return list(self.readout(self.pooled(images)).split([len(v) for v in ATTRIBUTE_VALUES], dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(images)
        feats = torch.cat([pooled, self.readout(pooled)], dim=1)  # (B, visual_dim)
        return (feats - self.feature_mean) / self.feature_std


def pretrain_scene_encoder(
    images: torch.Tensor,
    scenes: Sequence[Scene],
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SceneEncoder, dict]:
    """Train a SceneEncoder to recognise every attribute of the scenes, then freeze it.

    images: uint8 (N, 3, H, W); scenes: their N ground truths. Returns (frozen encoder in eval
    mode, {"heldout_accuracy": {attribute: acc}, "steps": ..}) - accuracy measured on the last
    512 pictures (a quarter, for fewer than 2048), which the encoder does not train on.
    """
    from ..train import TrainConfig, train

    if steps < 1:
        raise ValueError(f"pretrain_scene_encoder: steps must be >= 1; got {steps}")
    if len(images) != len(scenes):
        raise ValueError(f"pretrain_scene_encoder: {len(images)} images but {len(scenes)} scenes")
    if len(images) < 8:
        raise ValueError(f"pretrain_scene_encoder needs at least 8 pictures (a quarter is held out); got {len(images)}")
    torch.manual_seed(seed)
    encoder = SceneEncoder(SceneEncoderConfig(image_size=images.shape[-1]))
    labels = torch.tensor([s.attribute_ids() for s in scenes])  # (N, 4)
    n_train = len(images) - min(512, len(images) // 4)  # the rest measures the encoder
    gen = torch.Generator().manual_seed(seed)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)  # drawn with replacement
        return images[idx], labels[idx]  # uint8 (B, 3, H, W), (B, 4)

    def loss_fn(encoder: SceneEncoder, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pictures, truth = batch
        return sum(F.cross_entropy(lg, truth[:, j]) for j, lg in enumerate(encoder.attribute_logits(pictures)))

    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10), weight_decay=0.0,
                         betas=(0.9, 0.999), seed=seed, checkpoint=False, progress=progress,
                         desc="pretrain the scene encoder")
    after_init = torch.get_rng_state()  # train() reseeds torch's generator; the caller's next draws (the
    # multimodal projection's init) go on from where the encoder's init left it, as they always have
    train(encoder, images[:n_train], config, batch_fn=batch, loss_fn=loss_fn)
    torch.set_rng_state(after_init)
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        preds = [lg.argmax(-1) for lg in encoder.attribute_logits(images[n_train:])]
        feats = encode_images(encoder, images[:n_train])
        encoder.feature_mean.copy_(feats.mean(0))
        encoder.feature_std.copy_(feats.std(0).clamp(min=1e-5))
    acc = {n: (p == labels[n_train:, j]).float().mean().item() for j, (n, p) in enumerate(zip(ATTRIBUTES, preds))}
    return encoder, {"heldout_accuracy": acc, "steps": steps}


@torch.no_grad()
def encode_images(encoder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Global features of many pictures with a frozen encoder -> (N, visual_dim), no autograd graph."""
    encoder.eval()
    return torch.cat([encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


# --------------------------------------------------------------------------- CLIP
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPEncoder(nn.Module):
    """CLIP's vision tower (transformers' CLIPVisionModel), frozen, with multi-scale global features.

    layers: which hidden states give a global feature, counted like Python indices over the
    num_hidden_layers + 1 states (0 = the embeddings). For each, the class token's state; the last
    layer's through CLIP's post-layernorm (the pooled output). visual_dim = hidden_size * len(layers).
    Pictures are resized (bicubic) to the model's image_size and normalised with CLIP's mean/std.
    """

    def __init__(self, vision_model, layers: Sequence[int] = (-1,), resize: bool = True):
        super().__init__()
        config = vision_model.config
        n_states = config.num_hidden_layers + 1
        for layer in layers:
            if not -n_states <= layer < n_states:
                raise ValueError(f"CLIPEncoder: layer {layer} does not exist; this model has hidden states "
                                 f"0..{n_states - 1} (or -{n_states}..-1)")
        self.model = vision_model.eval().requires_grad_(False)
        self.layers = tuple(int(l) % n_states for l in layers)
        self.image_size = config.image_size
        self.resize = resize
        self.visual_dim = config.hidden_size * len(self.layers)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, layers: Sequence[int] = (-1,), **kwargs) -> "CLIPEncoder":
        """Load a local CLIP folder (a CLIPModel or CLIPVisionModel saved by transformers). Never downloads.
        A folder that is not one raises :class:`adapterlab.encoders.clip.NotACLIPFolder` (a ValueError and a FileNotFoundError)."""
        from ..encoders.clip import load_clip_vision

        return cls(load_clip_vision(path), layers, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, None if self.resize else self.image_size)
        x = x.to(self.mean.device)
        if self.resize and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        last = len(out.hidden_states) - 1
        feats = [out.pooler_output if l == last else out.hidden_states[l][:, 0] for l in self.layers]
        return torch.cat(feats, dim=-1).float()  # (B, hidden_size * len(layers))
