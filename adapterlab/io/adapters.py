"""Adapter files in and out: ours, the official LLaMA-Adapter v1 release's ``.pth``, PEFT folders.

Adapters are small (1.2M values at 7B), so they are saved alone (:func:`save_adapter`) and
attached to a base later (:func:`load_adapter`), which also reads the official release's ``.pth``
(the released adapter or a training checkpoint) and Hugging Face PEFT "adaption prompt" folders
(the formats are described in docs/method.md). Every shape is checked against the model before
anything is copied; torch pickles load with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save

from ..adapter import ACTIVATIONS, AdapterConfig, adapted_layers, adapter_state_dict, add_adapter
from .files import atomic_write_bytes, atomic_write_text
from ..model import Llama
from .weights import preview, read_json, read_safetensors, read_torch_file

PathLike = Union[str, os.PathLike]

ADAPTER_FORMAT = "adapterlab-adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OFFICIAL_PROMPT_LEN = 10  # K of the official release; its file does not record it


def save_adapter(model: Llama, path: PathLike) -> Path:
    """Write only the adapter into folder ``path``: adapter.safetensors (fp32) + adapter_config.json.

    The config records the AdapterConfig (gate_activation included), the model shape it fits
    (dim, n_layers, n_heads) and the adapted layer indices, so :func:`load_adapter` can check it
    against a model and rebuild the same forward. Returns the folder.
    """
    layers = adapted_layers(model)
    config: Optional[AdapterConfig] = getattr(model, "adapter_config", None)
    if not layers or config is None:
        raise ValueError("this model carries no adapter; attach one with adapterlab.add_adapter(model, AdapterConfig(...))")
    folder = Path(path)
    if folder.suffix == ".safetensors":
        raise ValueError(f"save_adapter writes a folder; give a folder path instead of {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in adapter_state_dict(model).items()}
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        **config.to_dict(),
        "dim": model.config.dim,
        "n_layers": model.config.n_layers,
        "n_heads": model.config.n_heads,
        "adapted_layers": layers,
    }
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, save(tensors, metadata={"format": ADAPTER_FORMAT}))
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")
    return folder


def load_adapter(model: Llama, path: PathLike, prompt_len: Optional[int] = None,
                 gate_activation: Optional[str] = None) -> Llama:
    """Attach (or fill the already attached) adapter from ``path``; returns the model.

    path may be:
    - our format: a folder written by :func:`save_adapter`, or its adapter.safetensors. The file
      records everything (prompt_len, gate, gate_activation ...);
    - an official LLaMA-Adapter v1 ``.pth``: the released adapter file or a training checkpoint
      of the release's fine-tuning code (its ``"model"`` entry is read). The file records neither
      the prompt length nor the gate activation: prompt_len defaults to 10, the release's K;
      gate_activation chooses between the release's two forwards (below);
    - a PEFT adaption-prompt folder (adapter_config.json + adapter_model.safetensors). One gate
      per layer, no tanh (AdapterConfig(gate="layer", gate_activation="identity")).

    gate_activation (official files only): the release's *fine-tuning* code scales the prompts'
    attention by tanh(g), its *inference* code (``llama/model.py``, ``example.py``, shipped with
    the released adapter) by g itself; the two agree while the gate is 0 and differ once it has
    opened. The default, "tanh", is the forward the weights were trained with (the paper's
    equation, and our own default), so the logits are those the training loss was computed on,
    and tuning further from the file continues the same function. Pass "identity" to reproduce
    the release's inference code (its example.py generations) exactly. The choice is stored in
    ``model.adapter_config.gate_activation``, so :func:`save_adapter` keeps it.

    Every shape is checked against the model first; errors name the file and the field.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter {path} not found")
    if gate_activation is not None and gate_activation not in ACTIVATIONS:
        raise ValueError(f"load_adapter: gate_activation must be one of {ACTIVATIONS} (or None); got {gate_activation!r}")
    folder = path if path.is_dir() else path.parent
    config_file = folder / ADAPTER_CONFIG
    if path.is_file() and path.suffix in (".pth", ".pt"):
        config, tensors = _read_official(model, path, prompt_len or OFFICIAL_PROMPT_LEN, gate_activation or "tanh")
    elif config_file.is_file():
        info = read_json(config_file)
        if info.get("format") == ADAPTER_FORMAT:
            weights = path if path.is_file() else folder / ADAPTER_WEIGHTS
            config, tensors = _read_ours(model, weights, info)
        elif str(info.get("peft_type", "")).upper() == "ADAPTION_PROMPT":
            config, tensors = _read_peft(model, folder, info)
        else:
            raise ValueError(
                f"{config_file} is neither an adapterlab adapter (format={ADAPTER_FORMAT!r}) nor a PEFT "
                f"adaption-prompt adapter (peft_type='ADAPTION_PROMPT'); found format={info.get('format')!r}, "
                f"peft_type={info.get('peft_type')!r}"
            )
        for name, asked in (("prompt_len", prompt_len), ("gate_activation", gate_activation)):
            if asked is not None and asked != getattr(config, name):
                raise ValueError(
                    f"{config_file}: the adapter has {name}={getattr(config, name)!r} but {name}={asked!r} "
                    f"was requested; the file records it, so leave {name} unset for this file"
                )
    else:
        found = sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else []
        raise ValueError(
            f"{path} is not an adapter this package reads. Expected a folder with {ADAPTER_CONFIG} + "
            f"{ADAPTER_WEIGHTS} (save_adapter), a PEFT folder with adapter_config.json + "
            f"adapter_model.safetensors, or an official release .pth file; found {found}"
        )
    _attach_or_fill(model, config, tensors, source=str(path))
    return model


def _check(source: str, field: str, found, expected, advice: str) -> None:
    if found != expected:
        raise ValueError(f"{source}: {field} is {found} but the model has {expected}. {advice}")


def _layer_tensors(layer: int, prompt: torch.Tensor, gate: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"layers.{layer}.attention.adapter."
    return {prefix + "prompt": prompt.float(), prefix + "gate": gate.float()}


def _read_official(model: Llama, path: Path, K: int, activation: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Official release: adapter_query.weight (K*L, C) rows grouped by layer, bottom first; a gate
    layers.{i}.attention.gate (1, H, 1, 1) per layer. Training checkpoints hold that state dict
    (with the frozen base) under "model", beside the run's argparse.Namespace under "args"."""
    sd = read_torch_file(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]  # a training checkpoint: {"model": ..., "optimizer": ..., "args": Namespace, ...}
    if not isinstance(sd, dict) or "adapter_query.weight" not in sd:
        keys = list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path} has no 'adapter_query.weight', so it is not an official LLaMA-Adapter file (keys: {keys})")
    N, C, H = model.config.n_layers, model.config.dim, model.config.n_heads
    query = sd["adapter_query.weight"]  # (K*L, C)
    _check(str(path), "the prompt width (adapter_query.weight columns)", query.shape[1], C,
           "The adapter was trained for a LLaMA of another size; load the matching base model.")
    if query.shape[0] % K:
        raise ValueError(
            f"{path}: adapter_query.weight has {query.shape[0]} rows, not a multiple of prompt_len={K}; "
            f"pass the prompt_len the adapter was trained with (load_adapter(..., prompt_len=K))"
        )
    L = query.shape[0] // K
    if L > N:
        raise ValueError(
            f"{path}: {query.shape[0]} rows / prompt_len {K} = {L} adapted layers, but the model has "
            f"n_layers={N}. Load the matching base model, or pass the right prompt_len."
        )
    gates = {int(m.group(1)): v for k, v in sd.items() if (m := re.fullmatch(r"layers\.(\d+)\.attention\.gate", k))}
    wanted = list(range(N - L, N))  # the top L layers
    missing = [i for i in wanted if i not in gates]
    if missing:
        raise ValueError(f"{path}: no gate for adapted layer(s) {missing} (keys layers.{{i}}.attention.gate)")
    gate_kind = "layer" if all(gates[i].numel() == 1 for i in wanted) else "head"
    if gate_kind == "head":  # every adapted layer, not only the first: a wrong one anywhere is named
        for i in wanted:
            _check(str(path), f"the number of heads (the shape of layers.{i}.attention.gate, (1, H, 1, 1))",
                   tuple(gates[i].shape), (1, H, 1, 1),
                   "The adapter was trained for a LLaMA with another head count; load the matching base model.")
    config = AdapterConfig(prompt_len=K, layers=L, gate=gate_kind, gate_activation=activation)
    prompts = query.reshape(L, K, C)
    tensors: dict[str, torch.Tensor] = {}
    for j, i in enumerate(wanted):
        gate = gates[i].reshape((1, H, 1, 1) if gate_kind == "head" else (1,))
        tensors.update(_layer_tensors(i, prompts[j], gate))
    return config, tensors


def _read_peft(model: Llama, folder: Path, info: dict) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """PEFT adaption prompt: adaption_prompt (1, K, C) and adaption_gate (1,) per adapted layer."""
    source = str(folder / ADAPTER_CONFIG)
    N, C = model.config.n_layers, model.config.dim
    K, L = info.get("adapter_len"), info.get("adapter_layers")
    if not isinstance(K, int) or not isinstance(L, int):
        raise ValueError(f"{source}: adapter_len and adapter_layers must be integers; found {K!r}, {L!r}")
    if info.get("target_modules", "self_attn") not in ("self_attn", None):
        raise ValueError(f"{source}: target_modules={info['target_modules']!r}; only Llama's 'self_attn' is supported")
    if L > N:
        raise ValueError(
            f"{source}: adapter_layers is {L} but the model has n_layers={N}. The adapter was trained "
            f"on a deeper model; load the matching base model."
        )
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        sd = read_safetensors(weights)
    elif (folder / "adapter_model.bin").is_file():
        weights = folder / "adapter_model.bin"
        sd = read_torch_file(weights)
    else:
        raise FileNotFoundError(f"{folder}: PEFT adapter_config.json found but no adapter_model.safetensors")
    found: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.search(r"layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$", k)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = v
    wanted = list(range(N - L, N))
    if sorted(found) != wanted:
        raise ValueError(
            f"{weights}: adapted layers are {sorted(found)} but a model with n_layers={N} and adapter_layers={L} "
            f"adapts layers {wanted[0]}..{wanted[-1]}. The adapter belongs to a model with another n_layers; "
            f"load the matching base model."
        )
    tensors: dict[str, torch.Tensor] = {}
    for i in wanted:
        if set(found[i]) != {"prompt", "gate"}:
            raise ValueError(f"{weights}: layer {i} lacks adaption_prompt or adaption_gate")
        prompt, gate = found[i]["prompt"], found[i]["gate"]
        _check(str(weights), f"the prompt width of layer {i} (adaption_prompt shape[-1])", prompt.shape[-1], C,
               "The adapter was trained for a LLaMA of another size; load the matching base model.")
        _check(str(weights), f"adaption_prompt shape of layer {i}", tuple(prompt.shape), (1, K, C),
               f"adapter_config.json says adapter_len={K}; the file and its config disagree.")
        _check(str(weights), f"adaption_gate shape of layer {i}", tuple(gate.shape), (1,), "PEFT gates are one scalar per layer.")
        tensors.update(_layer_tensors(i, prompt[0], gate))
    return AdapterConfig(prompt_len=K, layers=L, gate="layer", gate_activation="identity"), tensors


def _read_ours(model: Llama, weights: Path, info: dict) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    source = str(weights.parent / ADAPTER_CONFIG)
    version = info.get("format_version")
    if not isinstance(version, int) or version > ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"{source}: format_version={version!r}; this adapterlab reads version <= {ADAPTER_FORMAT_VERSION}. "
            f"Upgrade adapterlab."
        )
    advice = "The adapter was saved from a model of another shape; load the base model it was trained on."
    for field in ("dim", "n_layers", "n_heads"):
        _check(source, field, info.get(field), getattr(model.config, field), advice)
    known = AdapterConfig.__dataclass_fields__
    config = AdapterConfig(**{k: v for k, v in info.items() if k in known})
    wanted = list(range(model.config.n_layers - config.layers, model.config.n_layers))
    _check(source, "adapted_layers", info.get("adapted_layers"), wanted, advice)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights.parent}: {ADAPTER_CONFIG} found but {weights.name} is missing")
    return config, read_safetensors(weights)


def _attach_or_fill(model: Llama, config: AdapterConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    def shape_of(c: AdapterConfig) -> tuple:
        return (c.prompt_len, c.layers, c.gate, c.gate_activation, c.visual_dim, c.visual_hidden)

    # Ungated prompts (a study variant, adapterlab.studies.variants.add_ungated_prompts) have no gate: only
    # adapterlab's own files saved from such a model lack the gates, and only such a model takes them.
    file_gated = any(name.endswith(".adapter.gate") for name in tensors)
    file_ungated = not file_gated and any(name.endswith(".adapter.prompt") for name in tensors)
    model_ungated = [i for i in adapted_layers(model) if model.layers[i].attention.adapter.gate is None]
    if model_ungated and file_gated:
        raise ValueError(
            f"{source}: the model carries ungated prompts in layer(s) {model_ungated} (the study variant "
            f"adapterlab.studies.variants.add_ungated_prompts: prompts in the tokens' softmax, no gate) and the "
            f"file holds a gated adapter (gate={config.gate!r}): there is no gate to load it into. Call "
            f"adapterlab.remove_adapter(model) first, or load into a fresh model."
        )
    if file_ungated and not model_ungated:
        raise ValueError(
            f"{source}: the file holds ungated prompts (no gates: saved from a model with "
            f"adapterlab.studies.variants.add_ungated_prompts) and the model "
            f"{'carries a gated adapter (call adapterlab.remove_adapter(model) first)' if adapted_layers(model) else 'has no adapter'}. "
            f"Attach the variant, add_ungated_prompts(model, AdapterConfig(prompt_len={config.prompt_len}, "
            f"layers={config.layers})), then load the file."
        )
    if adapted_layers(model):
        current = getattr(model, "adapter_config", None)
        if current is None or shape_of(current) != shape_of(config):
            fields = "(prompt_len, layers, gate, gate_activation, visual_dim, visual_hidden)"
            raise ValueError(
                f"{source}: the model already carries an adapter {fields}={shape_of(current) if current else None} "
                f"but the file holds {shape_of(config)}. Call adapterlab.remove_adapter(model) first, "
                f"or load into a fresh model."
            )
    else:
        add_adapter(model, config)
    target = adapter_state_dict(model)  # tensors share storage with the parameters
    missing, unexpected = sorted(set(target) - set(tensors)), sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise ValueError(f"{source}: missing adapter tensors {preview(missing)}; unexpected {preview(unexpected)}")
    for name, value in tensors.items():
        _check(source, f"the shape of {name}", tuple(value.shape), tuple(target[name].shape),
               "The adapter does not fit this model; load the base model it was trained on.")
    with torch.no_grad():
        for name, value in tensors.items():
            target[name].copy_(value)
