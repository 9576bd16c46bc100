"""Base weights in and out: Meta folders, Hugging Face folders and GGUF files -> our :class:`Llama`.

:func:`read_llama` reads
- a Meta folder: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards (or the same
  shards as ``consolidated.NN.safetensors``: the bases adapterlab ships, no pickles);
- a Hugging Face folder: ``config.json`` + ``model.safetensors`` (or sharded with
  ``model.safetensors.index.json``); names are converted and the q/k rows un-permuted;
- a GGUF file (llama.cpp's format, quantized or not): see :mod:`adapterlab.io.gguf`.
:func:`save_llama` writes a one-shard Meta folder (what the pretraining commands produce).
Names of embedded or installed models ("tinyworld", "smollm2") are resolved one layer up, in
:func:`adapterlab.worlds.tinyworld.load_llama` (``adapterlab.load_llama``), which hands every path here.

The model is built on the ``meta`` device (no memory) and the loaded tensors are assigned to
it, so a 7B folder costs one copy of the weights, not two. Checkpoints are untrusted input:
torch pickles load with ``weights_only=True``, everything else is safetensors or GGUF.
The readers of untrusted files here (:func:`read_torch_file`, :func:`read_safetensors`,
:func:`read_json`) are shared with :mod:`adapterlab.io.adapters`.
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

from .files import atomic_torch_save, atomic_write_bytes, atomic_write_text
from ..model import Llama, LlamaConfig
from ..tokenizer import Tokenizer, load_tokenizer

PathLike = Union[str, os.PathLike]

# Meta model parallelism: how each weight is split across consolidated.NN.pth shards.
_META_SPLIT_DIM = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # column-parallel: output rows
    "wo": 1, "w2": 1, "tok_embeddings": 1,  # row-parallel (and the embedding): input columns
}  # anything else (the RMSNorm weights) is replicated in every shard
_META_IGNORED = ("rope.freqs",)  # precomputed rotary table in LLaMA-1 shards; we compute our own
WEIGHT_SUFFIXES = ("pth", "safetensors")  # a Meta shard: Meta's pickle, or the same tensors as safetensors


# =========================================================================== base models
def read_llama(
    path: PathLike,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    max_seq_len: Optional[int] = None,
) -> Llama:
    """Read a LLaMA from a Meta folder, a Hugging Face folder or a GGUF file.

    device: None -> CUDA when available, else CPU.  dtype: None keeps the stored dtype
    (LLaMA releases: float16/bfloat16; GGUF: float32, what its quantized blocks decode to);
    pass torch.float32 for exact CPU comparisons.
    max_seq_len: longest sequence the model accepts (default: the folder's
    max_position_embeddings for HF, the file's context_length for GGUF, 2048 for Meta).
    The returned model has ``model.tokenizer``: a :class:`Tokenizer` when the folder holds
    ``tokenizer.model`` or ``tokenizer.json`` (or the GGUF file a tokenizer), else None.
    """
    path = Path(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)

    def place(t: torch.Tensor) -> torch.Tensor:  # move each tensor as soon as it is read
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf import read_gguf  # the gguf library is needed only here

        config, state, tokenizer = read_gguf(path, place)
        if max_seq_len is not None:
            config.max_seq_len = max_seq_len
        model = _assign_weights(config, state, source=str(path))
        model.tokenizer = tokenizer
        return model.eval()
    if not path.is_dir():
        raise FileNotFoundError(
            (f"{path}: no such file. " if path.suffix.lower() == ".gguf" else f"{path} is not a folder or a .gguf file. ") +
            "load_llama expects a Meta LLaMA folder (params.json + "
            "consolidated.NN.pth), a Hugging Face Llama folder (config.json + *.safetensors), a GGUF file "
            "(model.gguf), or (adapterlab.load_llama) a name: 'tinyworld' (the embedded model) or 'smollm2'."
        )
    folder = path
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
            f"model-*.safetensors (Hugging Face); found: {found or 'an empty folder'}. "
            f"(A GGUF file is read by its own path: load_llama('folder/model.gguf').)"
        )
    if max_seq_len is not None:
        config.max_seq_len = max_seq_len

    model = _assign_weights(config, state, source=str(folder))
    # A folder's own tokenizer.model or tokenizer.json (Llama 3, TinyLlama, SmolLM2 ship only the latter);
    # Meta's downloads keep one tokenizer.model beside the size folders (llama/7B, llama/13B ...).
    has_own = (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()
    if has_own:
        model.tokenizer = load_tokenizer(folder)
    elif is_meta and (folder.parent / "tokenizer.model").is_file():
        model.tokenizer = load_tokenizer(folder.parent / "tokenizer.model")
    else:
        model.tokenizer = None
    return model.eval()


def save_llama(model: Llama, tokenizer: Optional[Tokenizer], folder: PathLike,
               extra: Optional[dict[str, dict]] = None, weights: str = "pth") -> Path:
    """Write the base model as a one-shard Meta folder that :func:`read_llama` reads back exactly.

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
        if state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr():
            state["output.weight"] = state["output.weight"].clone()  # tied; safetensors stores no shared tensors
        atomic_write_bytes(folder / "consolidated.00.safetensors", save(state))
    else:
        atomic_torch_save(state, folder / "consolidated.00.pth")
    if tokenizer is not None:  # tokenizer.model (SentencePiece) or tokenizer.json (BPE), + tokenizer_config.json
        for name, data in tokenizer.files().items():
            atomic_write_bytes(folder / name, data)
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
            f"(from its config). Missing tensors: {preview(missing)}; unexpected tensors: "
            f"{preview(unexpected)}. Check that the config file belongs to these weights."
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
    if state["output.weight"] is state["tok_embeddings.weight"]:  # tied (HF tie_word_embeddings, GGUF without output)
        model.output.weight = model.tok_embeddings.weight  # one parameter serves both: one copy in memory, after .to() too
    return model


def preview(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


# --------------------------------------------------------------------------- Meta folders
def read_torch_file(path: Path) -> dict:
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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(_unreadable(path, "a safetensors file", e)) from e


def read_json(path: Path) -> dict:
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
    params = read_json(folder / "params.json")
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
    return read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)


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
            weight_map = read_json(index).get("weight_map", {})
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
            yield from read_torch_file(f).items()


def _read_hf_folder(folder: Path, place: Callable) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    hf = read_json(folder / "config.json")
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
        raise ValueError(f"{folder}: tensors that a Llama checkpoint does not have: {preview(unknown)}")
    if "output.weight" not in state and hf.get("tie_word_embeddings") and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # tied: one tensor serves both
    return config, state
