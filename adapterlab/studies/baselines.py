"""The baselines of Table 3: LoRA and full fine-tuning, trained by the same loop as the adapter.

LoRA (Hu et al. 2021, arXiv 2106.09685) keeps a weight W frozen and learns a low-rank update
beside it, in the chosen linear layers (Alpaca-LoRA, the paper's Table 3 row: W_q and W_v):

    h = W x + (alpha / r) * B A x          A: (r, in)  random (kaiming-uniform, as PEFT)
                                           B: (out, r) zero

B = 0 at initialisation, so - like the adapter's zero gate - the model computes exactly what the
frozen base computes until training moves B. After training, B A can be folded into W
(:func:`merge_lora`): no extra cost at inference, but the base is then no longer separate.

Full fine-tuning (:func:`prepare_full_finetune`) trains every weight of the base.

:func:`prepare` puts a model in the state each method trains from; :func:`adapterlab.train.train`
then updates whatever requires grad, so the three methods share one loop, one data order and
one learning-rate schedule. LoRA and full fine-tuning have no gates: the training loop records
gates only for a model that carries an adapter.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Llama

METHODS = ("zero_init", "lora", "full")  # older spelling of zero_init: "adapter" (harness.OLD_NAMES)
LORA_TARGETS = {  # short name -> the block's submodule that holds it (model.py, Meta's names)
    "wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
    "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward",
}
LORA_WEIGHTS = "lora.safetensors"
LORA_CONFIG = "lora_config.json"
LORA_FORMAT = "adapterlab-lora"


@dataclass
class LoRAConfig:
    """What :func:`add_lora` attaches.

    rank: r.  alpha: the update is scaled by alpha / r.  targets: linear layers of each block
    (wq wk wv wo: attention; w1 w2 w3: feed-forward).  layers: None (all), an int L (the top L
    layers, as AdapterConfig.layers) or a list of layer indices.  dropout: on the LoRA branch's input.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wv")
    layers: Union[None, int, list[int]] = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1; got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a number > 0; got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if not self.targets or unknown:
            raise ValueError(f"LoRA targets must be a non-empty selection of {tuple(LORA_TARGETS)} (Meta's names: "
                             f"wq/wk/wv/wo attention, w1/w2/w3 feed-forward); got {self.targets!r}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets repeat a layer: {self.targets!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1); got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def layer_indices(self, n_layers: int) -> list[int]:
        """The layers to adapt, bottom first; raises for indices the model does not have."""
        if self.layers is None:
            return list(range(n_layers))
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            if not 1 <= self.layers <= n_layers:
                raise ValueError(f"LoRA layers={self.layers}: the model has {n_layers} layers; choose 1..{n_layers}")
            return list(range(n_layers - self.layers, n_layers))  # the top L layers, as the adapter
        indices = sorted(set(self.layers))
        if not indices or any(not isinstance(i, int) or not 0 <= i < n_layers for i in indices):
            raise ValueError(f"LoRA layers={self.layers!r}: give layer indices in 0..{n_layers - 1}")
        return indices

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


# --------------------------------------------------------------------------- the module
class LoRALinear(nn.Module):
    """A frozen linear layer W plus the trainable low-rank branch (alpha/r) B A.

    Holds the *same* weight tensor as the layer it replaces (no copy), under the same name
    ``weight``, so ``model.state_dict()`` keeps the base's keys and adds ``lora_A``/``lora_B``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # W: (out, in), frozen
        self.bias = base.bias
        self.rank, self.scaling = rank, alpha / rank
        # PEFT's init: kaiming_uniform_(A, a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0.
        bound = 1.0 / math.sqrt(self.in_features)
        A = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(A.to(base.weight.device))  # (r, in), fp32
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A: the update LoRA adds to W -> (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)  # W x
        low = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # A x: (..., r)
        return h + self.scaling * F.linear(low, self.lora_B.to(x.dtype))  # + (alpha/r) B A x

    def to_linear(self, merge: bool) -> nn.Linear:
        """A plain nn.Linear holding W (merge=False) or W + (alpha/r) B A (merge=True, in place)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        if merge:
            with torch.no_grad():
                self.weight.add_(self.delta_weight().to(self.weight.device, self.weight.dtype))
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


# --------------------------------------------------------------------------- attach / inspect
def add_lora(model: Llama, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("wq", "wv"),
             layers: Union[None, int, Sequence[int]] = None, dropout: float = 0.0, seed: Optional[int] = 0) -> Llama:
    """Attach LoRA to the ``targets`` of the chosen layers, in place, and freeze the base.

    Afterwards only the lora_A / lora_B tensors train; at initialisation the output is unchanged.
    The defaults (r=8, alpha=16 on W_q, W_v of every layer) are Alpaca-LoRA's (the paper's Table 3).
    """
    config = LoRAConfig(rank=rank, alpha=alpha, targets=tuple(targets) if not isinstance(targets, str) else targets,
                        layers=layers if layers is None or isinstance(layers, int) else list(layers), dropout=dropout)
    indices = config.layer_indices(model.config.n_layers)
    if lora_modules(model):
        raise ValueError("this model already has LoRA attached; call remove_lora(model) or merge_lora(model) first")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for i in indices:  # bottom layer first, targets in the given order: a fixed draw order
        for name in config.targets:
            parent = getattr(model.layers[i], LORA_TARGETS[name])
            setattr(parent, name, LoRALinear(getattr(parent, name), config.rank, config.alpha, config.dropout, generator))
    model.lora_config = config
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{qualified name: LoRALinear} of every attached LoRA branch, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace_lora(model: Llama, merge: bool) -> Llama:
    for name, module in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module.to_linear(merge))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def remove_lora(model: Llama) -> Llama:
    """Detach LoRA; the base weights are as they were (and stay frozen)."""
    return _replace_lora(model, merge=False)


def merge_lora(model: Llama) -> Llama:
    """Fold each (alpha/r) B A into its W (in place) and drop the branches: same outputs, plain layers.

    The base weights are changed: merge a copy if you still need the original base.
    """
    return _replace_lora(model, merge=True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed as in model.state_dict() (``layers.0.attention.wq.lora_A`` ...)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def lora_param_count(config: LoRAConfig, model_config) -> int:
    """r (in + out) values per adapted linear layer, summed: what add_lora makes trainable."""
    c = model_config
    kv = c.n_kv_heads * c.head_dim
    shapes = {"wq": (c.dim, c.dim), "wk": (c.dim, kv), "wv": (c.dim, kv), "wo": (c.dim, c.dim),
              "w1": (c.dim, c.ffn_hidden_dim), "w3": (c.dim, c.ffn_hidden_dim), "w2": (c.ffn_hidden_dim, c.dim)}
    per_layer = sum(config.rank * sum(shapes[t]) for t in config.targets)
    return per_layer * len(config.layer_indices(c.n_layers))


def save_lora(model: Llama, path: Union[str, os.PathLike]) -> Path:
    """Write folder ``path``: lora.safetensors (fp32) + lora_config.json. Returns the folder."""
    from safetensors.torch import save_file

    config: Optional[LoRAConfig] = getattr(model, "lora_config", None)
    if config is None or not lora_modules(model):
        raise ValueError("this model carries no LoRA; attach one with adapterlab.studies.baselines.add_lora(model)")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(folder / LORA_WEIGHTS), metadata={"format": LORA_FORMAT})
    meta = {"format": LORA_FORMAT, **config.to_dict(), "dim": model.config.dim, "n_layers": model.config.n_layers}
    (folder / LORA_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_lora(model: Llama, path: Union[str, os.PathLike]) -> Llama:
    """Attach the LoRA saved by :func:`save_lora` in folder ``path`` to ``model`` (a matching base)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / LORA_CONFIG).is_file() or not (folder / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: expected {LORA_CONFIG} and {LORA_WEIGHTS} (written by save_lora)")
    meta = json.loads((folder / LORA_CONFIG).read_text())
    for key in ("dim", "n_layers"):
        if meta.get(key) != getattr(model.config, key):
            raise ValueError(f"{folder} was trained on a base with {key}={meta.get(key)}; this model has "
                             f"{key}={getattr(model.config, key)}: load it onto the base it was trained on")
    add_lora(model, rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"], layers=meta["layers"],
             dropout=meta["dropout"], seed=None)
    tensors = load_file(str(folder / LORA_WEIGHTS))
    expected = lora_state_dict(model)
    if set(tensors) != set(expected):
        raise ValueError(f"{folder / LORA_WEIGHTS} does not match {LORA_CONFIG}: "
                         f"{sorted(set(tensors) ^ set(expected))[:4]}")
    model.load_state_dict(tensors, strict=False)
    return model


# --------------------------------------------------------------------------- full fine-tuning
def prepare_full_finetune(model: Llama) -> Llama:
    """Unfreeze every weight of the base (embedding, attention, feed-forward, norms, output head).

    This is the Alpaca row of Table 3: all parameters train, AdamW keeps two moments for each,
    and the result is a whole new model rather than a small file beside the base.
    """
    from ..adapter import adapted_layers

    if adapted_layers(model) or lora_modules(model):
        raise ValueError("full fine-tuning trains the base itself; remove the adapter or LoRA first "
                         "(remove_adapter / remove_lora)")
    return model.requires_grad_(True)


def prepare(model: Llama, method: str, seed: Optional[int] = 0, **kwargs) -> Llama:
    """Put ``model`` in the state ``method`` trains from, in place; returns it.

    "zero_init" (LLaMA-Adapter; also "adapter"): add_adapter with AdapterConfig(**kwargs) (or
    kwargs={"config": AdapterConfig(...)}). "lora": add_lora(model, **kwargs).  "full":
    prepare_full_finetune (no options).
    """
    from .harness import method_name

    method = method_name(method)
    if method == "zero_init":
        from ..adapter import AdapterConfig, add_adapter

        config = kwargs.pop("config", None) or AdapterConfig(**kwargs)
        return add_adapter(model, config, seed=seed)
    if method == "lora":
        return add_lora(model, seed=seed, **kwargs)
    if method == "full":
        if kwargs:
            raise ValueError(f"full fine-tuning takes no options; got {sorted(kwargs)}")
        return prepare_full_finetune(model)
    raise ValueError(f"method must be one of {METHODS}; got {method!r}")


__all__ = [
    "METHODS", "LORA_TARGETS", "LoRAConfig", "LoRALinear", "add_lora", "remove_lora", "merge_lora", "lora_modules",
    "lora_state_dict", "lora_param_count", "save_lora", "load_lora", "prepare_full_finetune", "prepare",
]
