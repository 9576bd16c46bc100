"""Checkpoints: LLaMA base weights in and out, adapters in and out.

Layer 6 (tooling above the training loop): imports files, model, tokenizer and adapter.

Base weights (:func:`load_llama`) come from
- a Meta folder: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards (or the same
  shards as ``consolidated.NN.safetensors``: the bases adapterlab ships, no pickles);
- a Hugging Face folder: ``config.json`` + ``model.safetensors`` (or sharded with
  ``model.safetensors.index.json``); names are converted and the q/k rows un-permuted.
:func:`save_llama` writes a one-shard Meta folder (what the pretraining commands produce).
The name ``"tinyworld"`` (the embedded model) is resolved one layer up: ``adapterlab.load_llama``
is :func:`adapterlab.worlds.tinyworld.load_llama`, which hands every folder to the function here.

Adapters are small (1.2M values at 7B), so they are saved alone (:func:`save_adapter`) and
attached to a base later (:func:`load_adapter`), which also reads the official LLaMA-Adapter
v1 release ``.pth`` and Hugging Face PEFT "adaption prompt" folders (the formats are described
in docs/method.md).

The model is built on the ``meta`` device (no memory) and the loaded tensors are assigned to
it, so a 7B folder costs one copy of the weights, not two. Checkpoints are untrusted input:
torch pickles load with ``weights_only=True``, everything else is safetensors.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..adapter import ACTIVATIONS, AdapterConfig, adapted_layers, adapter_state_dict, add_adapter
from .files import atomic_torch_save, atomic_write_bytes, atomic_write_text
from ..model import Llama, LlamaConfig
from ..tokenizer import Tokenizer

PathLike = Union[str, os.PathLike]

ADAPTER_FORMAT = "adapterlab-adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OFFICIAL_PROMPT_LEN = 10  # K of the official release; its file does not record it

# Meta model parallelism: how each weight is split across consolidated.NN.pth shards.
_META_SPLIT_DIM = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # column-parallel: output rows
    "wo": 1, "w2": 1, "tok_embeddings": 1,  # row-parallel (and the embedding): input columns
}  # anything else (the RMSNorm weights) is replicated in every shard
_META_IGNORED = ("rope.freqs",)  # precomputed rotary table in LLaMA-1 shards; we compute our own
WEIGHT_SUFFIXES = ("pth", "safetensors")  # a Meta shard: Meta's pickle, or the same tensors as safetensors


# =========================================================================== base models
def load_llama(
    path_or_name: PathLike,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    max_seq_len: Optional[int] = None,
) -> Llama:
    """Load a LLaMA from a Meta folder or a Hugging Face folder.

    device: None -> CUDA when available, else CPU.  dtype: None keeps the stored dtype
    (LLaMA releases: float16/bfloat16); pass torch.float32 for exact CPU comparisons.
    max_seq_len: longest sequence the model accepts (default: the folder's
    max_position_embeddings for HF, 2048 for Meta).
    The returned model has ``model.tokenizer``: a :class:`Tokenizer` when the folder holds
    ``tokenizer.model``, else None.
    """
    folder = Path(path_or_name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder. load_llama expects a Meta LLaMA folder (params.json + "
            f"consolidated.NN.pth), a Hugging Face Llama folder (config.json + *.safetensors), "
            f"or (adapterlab.load_llama) the name 'tinyworld' for the embedded model."
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)

    def place(t: torch.Tensor) -> torch.Tensor:  # move each tensor as soon as it is read
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

    is_meta = (folder / "params.json").is_file()
    if is_meta:
        config, state = _read_meta_folder(folder, place)
    elif (folder / "config.json").is_file():
        config, state = _read_hf_folder(folder, place)
    else:
        found = sorted(p.name for p in folder.iterdir())[:20]
        raise ValueError(
            f"{folder} is neither a Meta LLaMA folder nor a Hugging Face one. Expected either "
            f"params.json + consolidated.00.pth (Meta) or config.json + model.safetensors / "
            f"model-*.safetensors (Hugging Face); found: {found or 'an empty folder'}."
        )
    if max_seq_len is not None:
        config.max_seq_len = max_seq_len

    model = _assign_weights(config, state, source=str(folder))
    # Meta's downloads keep one tokenizer.model beside the size folders (llama/7B, llama/13B ...).
    candidates = [folder / "tokenizer.model"] + ([folder.parent / "tokenizer.model"] if is_meta else [])
    tok_path = next((p for p in candidates if p.is_file()), None)
    model.tokenizer = Tokenizer(tok_path) if tok_path is not None else None
    return model.eval()


def save_llama(model: Llama, tokenizer: Optional[Tokenizer], folder: PathLike,
               extra: Optional[dict[str, dict]] = None, weights: str = "pth") -> Path:
    """Write the base model as a one-shard Meta folder that :func:`load_llama` reads back exactly.

    Files: params.json, consolidated.00.pth (the base weights, an attached adapter left out; with
    weights="safetensors": consolidated.00.safetensors, the same tensors without a pickle),
    tokenizer.model (when a tokenizer is given), and one JSON file per entry of ``extra``
    ({file name: content}, e.g. how the model was made). Every file is written atomically;
    to publish a whole folder at once (a cache that other processes read), call this inside
    :func:`adapterlab.io.files.publish_folder`. Returns the folder.
    """
    if weights not in WEIGHT_SUFFIXES:
        raise ValueError(f"save_llama: weights must be one of {WEIGHT_SUFFIXES}; got {weights!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "vocab_size": c.vocab_size, "multiple_of": c.multiple_of, "ffn_dim_multiplier": c.ffn_dim_multiplier,
              "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "max_seq_len": c.max_seq_len}
    atomic_write_text(folder / "params.json", json.dumps(params, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".adapter." not in k}
    if weights == "safetensors":
        atomic_write_bytes(folder / "consolidated.00.safetensors", save(state))
    else:
        atomic_torch_save(state, folder / "consolidated.00.pth")
    if tokenizer is not None:
        atomic_write_bytes(folder / "tokenizer.model", tokenizer.model_proto)
    for name, content in (extra or {}).items():
        atomic_write_text(folder / name, json.dumps(content, indent=2, default=str))
    return folder


def _assign_weights(config: LlamaConfig, state: dict[str, torch.Tensor], source: str) -> Llama:
    """Build the model without memory (meta device) and hand it the loaded tensors."""
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: the weights do not match a LLaMA with {config.n_layers} layers "
            f"(from its config). Missing tensors: {_preview(missing)}; unexpected tensors: "
            f"{_preview(unexpected)}. Check that the config file belongs to these weights."
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)} but the config "
                f"(dim={config.dim}, n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}, "
                f"vocab_size={config.vocab_size}, ffn hidden={config.ffn_hidden_dim}) expects {shape}. "
                f"Check that the config file belongs to these weights."
            )
    model.load_state_dict(state, assign=True)
    return model


def _preview(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


# --------------------------------------------------------------------------- Meta folders
def _torch_load(path: Path) -> dict:
    """torch.load for untrusted files: tensors only (weights_only=True; plus argparse.Namespace,
    which the official release's training checkpoints hold); memory-mapped when the file allows
    it. A file that cannot be read is an error naming it."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(
            f"{path} holds Python objects other than tensors ({found.group(1) if found else 'see the cause below'}), "
            f"which adapterlab does not load (weights_only=True: no code from a file runs here). Save the "
            f"tensors alone (torch.save(model.state_dict(), path)), or use safetensors."
        ) from e
    except (EOFError, OSError, RuntimeError) as e:
        raise ValueError(_unreadable(path, "a torch checkpoint", e)) from e


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(_unreadable(path, "a safetensors file", e)) from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(_unreadable(path, "JSON", e)) from e


def _unreadable(path: Path, kind: str, error: Exception) -> str:
    size = path.stat().st_size if path.is_file() else 0
    return (
        f"{path} ({size:,} bytes) cannot be read as {kind}: it is empty or cut short (an interrupted "
        f"download or copy?), or another kind of file. Download or copy it again. "
        f"({type(error).__name__}: {str(error) or 'end of file'})"
    )


def _read_meta_folder(folder: Path, place: Callable) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    params = _read_json(folder / "params.json")
    for field in ("dim", "n_layers", "n_heads"):
        if field not in params:
            raise ValueError(f"{folder / 'params.json'} has no '{field}'; a Meta params.json needs dim, n_layers, n_heads")

    shard_paths: dict[int, Path] = {}
    for p in sorted(folder.glob("consolidated.*")):
        m = re.fullmatch(r"consolidated\.(\d+)\.(pth|safetensors)", p.name)
        if m and int(m.group(1)) in shard_paths:
            raise ValueError(f"{folder} holds shard {m.group(1)} twice ({shard_paths[int(m.group(1))].name} and "
                             f"{p.name}); keep one of them")
        if m:
            shard_paths[int(m.group(1))] = p
    if not shard_paths:
        raise ValueError(f"{folder} has params.json but no consolidated.NN.pth (or .safetensors) weight shards")
    if 0 not in shard_paths:
        raise FileNotFoundError(f"{folder}: shard consolidated.00.pth is missing (found {_names(shard_paths)})")

    shards = [_read_shard(shard_paths[0])]
    if "tok_embeddings.weight" not in shards[0]:
        raise ValueError(f"{shard_paths[0]} has no tok_embeddings.weight; is it a Meta LLaMA shard?")
    # The embedding is split along the width: each shard holds dim / n_shards columns.
    width = shards[0]["tok_embeddings.weight"].shape[1]
    if params["dim"] % width:
        raise ValueError(
            f"{shard_paths[0]}: tok_embeddings.weight has {width} columns, which does not divide "
            f"dim={params['dim']} from params.json; the shard and params.json do not belong together"
        )
    n_shards = params["dim"] // width
    wanted = set(range(n_shards))
    if set(shard_paths) != wanted:
        missing = [f"consolidated.{i:02d}.pth" for i in sorted(wanted - set(shard_paths))]
        extra = [shard_paths[i].name for i in sorted(set(shard_paths) - wanted)]
        raise FileNotFoundError(
            f"{folder}: tok_embeddings.weight in consolidated.00.pth holds {width} of dim={params['dim']} "
            f"columns, so the model was saved as {n_shards} shards (consolidated.00.pth .. "
            f"consolidated.{n_shards - 1:02d}.pth); found {_names(shard_paths)}. "
            + (f"Missing shard(s): {', '.join(missing)}. " if missing else "")
            + (f"Unexpected shard(s): {', '.join(extra)}. " if extra else "")
            + "Download the complete folder."
        )
    shards += [_read_shard(shard_paths[i]) for i in range(1, n_shards)]

    state: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        if name in _META_IGNORED:
            continue
        pieces = []
        for i, shard in enumerate(shards):
            if name not in shard:
                raise ValueError(f"{shard_paths[i]} lacks tensor {name}, which consolidated.00.pth has")
            pieces.append(shard[name])
        split_dim = _META_SPLIT_DIM.get(name.split(".")[-2])
        merged = pieces[0] if len(pieces) == 1 or split_dim is None else torch.cat(pieces, dim=split_dim)
        state[name] = place(merged)
    del shards

    if params.get("vocab_size", -1) in (-1, None):  # LLaMA-1: the vocabulary comes with the tokenizer
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    return LlamaConfig.from_dict(params), state


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    return _load_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)


def _names(shard_paths: dict[int, Path]) -> str:
    return ", ".join(shard_paths[i].name for i in sorted(shard_paths)) or "none"


# --------------------------------------------------------------------------- Hugging Face folders
# Hugging Face name -> Meta name (ours); benchmarks/run.py inverts them to write HF folders.
HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}


def hf_config_to_llama(hf: dict, source: str = "config.json") -> LlamaConfig:
    """Translate a Hugging Face LlamaConfig dict into our (Meta-named) LlamaConfig."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}; only 'llama' checkpoints are supported")
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (LLaMA uses 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        unsupported.append("attention_bias/mlp_bias=true (LLaMA has no biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        unsupported.append(f"rope_type={rope_type!r} (only plain rotary embeddings are implemented)")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // n_heads):
        unsupported.append(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads={dim // n_heads}")
    if unsupported:
        raise ValueError(f"{source}: this Llama variant is not supported: " + "; ".join(unsupported))

    # Our config derives the SwiGLU width from Meta's rounding rule; choose the rule's inputs
    # so that it lands exactly on intermediate_size.
    hidden, base = hf["intermediate_size"], int(2 * 4 * dim / 3)
    return LlamaConfig(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        vocab_size=hf["vocab_size"],
        multiple_of=hidden,
        ffn_dim_multiplier=hidden / base if base > hidden else None,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        max_seq_len=hf.get("max_position_embeddings", 2048),
    )


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the q/k row permutation of HF's conversion script.

    Meta's rotary pairs are interleaved: row h*d + 2i + c (c = 0, 1) is half c of pair i.
    HF rotates halves: that row sits at h*d + c*d/2 + i. (n_heads*d, C) -> (n_heads*d, C).
    """
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def _hf_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{folder}: {index_name} lists {len(files)} weight shards but {len(missing)} are missing: "
                    f"{', '.join(missing)}. Download the complete folder."
                )
            return [folder / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    found = sorted(p.name for p in folder.iterdir())[:20]
    raise FileNotFoundError(
        f"{folder} has config.json but no weights: expected model.safetensors, or model-*.safetensors "
        f"with model.safetensors.index.json; found {found}"
    )


def _iter_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        if f.suffix == ".safetensors":
            try:
                st = safe_open(str(f), framework="pt", device="cpu")
            except SafetensorError as e:
                raise ValueError(_unreadable(f, "a safetensors file", e)) from e
            with st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        else:
            yield from _torch_load(f).items()


def _read_hf_folder(folder: Path, place: Callable) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    hf = _read_json(folder / "config.json")
    config = hf_config_to_llama(hf, source=str(folder / "config.json"))
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in _iter_hf_tensors(_hf_weight_files(folder)):
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if name in HF_TOP_NAMES:
            ours = HF_TOP_NAMES[name]
        elif m and m.group(2) in HF_LAYER_NAMES:
            ours = f"layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}"
        elif name.endswith("rotary_emb.inv_freq"):  # a buffer older versions saved; recomputed
            continue
        else:
            unknown.append(name)
            continue
        if ours.endswith("attention.wq.weight"):
            t = hf_to_meta_rows(t, config.n_heads)
        elif ours.endswith("attention.wk.weight"):
            t = hf_to_meta_rows(t, config.n_kv_heads)
        state[ours] = place(t)
    if unknown:
        raise ValueError(f"{folder}: tensors that a Llama checkpoint does not have: {_preview(unknown)}")
    if "output.weight" not in state and hf.get("tie_word_embeddings") and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # tied: one tensor serves both
    return config, state


# =========================================================================== adapters
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
        info = _read_json(config_file)
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
    sd = _torch_load(path)
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
        sd = _load_safetensors(weights)
    elif (folder / "adapter_model.bin").is_file():
        weights = folder / "adapter_model.bin"
        sd = _torch_load(weights)
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
    return config, _load_safetensors(weights)


def _attach_or_fill(model: Llama, config: AdapterConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    def shape_of(c: AdapterConfig) -> tuple:
        return (c.prompt_len, c.layers, c.gate, c.gate_activation, c.visual_dim, c.visual_hidden)

    if adapted_layers(model):
        current = getattr(model, "adapter_config", None)
        if current is not None and (current.gate == "none") != (config.gate == "none"):
            raise ValueError(
                f"{source}: the model carries an ungated adapter (AdapterConfig(gate='none'): prompts in the tokens' "
                f"softmax) and the file holds a gated one (gate={config.gate!r}), or the other way round. Official "
                f"LLaMA-Adapter and PEFT adaption-prompt files are always gated; an ungated adapter is stored only "
                f"in adapterlab's own format (save_adapter). Call adapterlab.remove_adapter(model) first."
            )
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
        raise ValueError(f"{source}: missing adapter tensors {_preview(missing)}; unexpected {_preview(unexpected)}")
    for name, value in tensors.items():
        _check(source, f"the shape of {name}", tuple(value.shape), tuple(target[name].shape),
               "The adapter does not fit this model; load the base model it was trained on.")
    with torch.no_grad():
        for name, value in tensors.items():
            target[name].copy_(value)
