#!/usr/bin/env python
"""adapterlab against Hugging Face PEFT's adaption prompt, on identical weights, in one run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--json FILE]

For every model shape (CPU default: the embedded tiny-world model and a small LLaMA-shaped
model; CUDA default: LLaMA-7B with random bf16 weights) the run prints and records:

  parity    both models on the same weights give the same logits and greedy tokens
  memory    activation checkpointing on/off: peak memory of one adapter training step
  generate  greedy decoding with the KV cache, 128 new tokens, batch 1 and 8
  train     adapter-training tokens/s and peak memory: adapterlab variants and PEFT,
            alternating A B A B ... over rounds, medians reported
and once per run: padding (tokens computed per real token on Alpaca-like lengths: length-grouped
batches vs the release's padding to 512) and, on CUDA, MFU and the projected wall time of the
paper's recipe.

On CPU, PEFT's model is a transformers LlamaForCausalLM saved with save_pretrained and
adapterlab's is loaded from the same folder with ``load_llama``. On CUDA both are built in
memory from the same random bf16 tensors (writing 13 GB to disk would cost minutes).
With ``--base smollm2`` it measures the real model instead (SmolLM2-135M-Instruct from its GGUF file):
float32, bfloat16 and int8 frozen bases of ours against PEFT and LitGPT on the same weights, training
(K=10, L=8 and 30) and greedy generation, the real-text loss of each base, the machine's bandwidth and
matmul peak; the JSON ends with a ``summary`` object of ratios (see benchmarks/README.md).
This is a benchmark, not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter  # noqa: E402
from adapterlab.adapter import adapted_layers, remove_adapter  # noqa: E402
from adapterlab.io.weights import HF_LAYER_NAMES, HF_TOP_NAMES  # noqa: E402
from adapterlab.losses import IGNORE_INDEX, lm_loss  # noqa: E402
from adapterlab.train import compile_model, uncompile_model  # noqa: E402

GIB = 2**30
H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, H100 SXM, dense (no sparsity)
ALPACA_EXAMPLES = 52_002
RECIPE_EPOCHS = 5
RELEASE_PAD_LEN = 512
PROMPT_FRACTION = 0.45  # Alpaca-like: the first 45% of every row is prompt (label -100), the rest response

FLOP_FORMULA = (
    "model FLOPs per step = forward: 2*N*tokens (N = weights of all linear layers incl. the output "
    "head; the embedding is a lookup) + causal attention 2*B*T^2*C per layer + prompt attention "
    "4*B*T*K*C per adapted layer; plus backward of activation gradients only (frozen weights need no "
    "weight gradient): 2*N_adapted*tokens (N_adapted = linear weights of the L adapted layers and the "
    "head) + 2 x the attention FLOPs of the adapted layers. Recomputation (checkpointing) is not "
    "counted, nor is the output head's saving on prompt tokens. MFU = model FLOPs per step x steps/s "
    "/ bf16 dense peak (H100 SXM: 989 TFLOP/s)."
)


# =========================================================================== shapes
@dataclass
class BenchShape:
    """One benchmark setting: model shape, adapter size, batches and repetitions."""

    name: str
    config: LlamaConfig
    prompt_len: int  # K
    adapter_layers: int  # L
    train_batch: tuple[int, int]  # (B, T) of the adapterlab-vs-PEFT comparison
    ckpt_batch: Optional[tuple[int, int]]  # (B, T) of the activation-checkpointing memory rows
    gen_batches: tuple[int, ...] = (1, 8)
    gen_prompt: int = 32
    gen_new: int = 128
    warmup: int = 2
    steps: int = 3
    rounds: int = 3
    gen_rounds: int = 2
    about: str = ""


def shapes(quick: bool) -> dict[str, BenchShape]:
    # The embedded default model (adapterlab.worlds.tinyworld: dim 128, 4 layers, 640-token vocabulary)
    # with `adapterlab finetune`'s tiny defaults (K=10, all 4 layers, batch 32): what a student's
    # laptop runs.
    tinyworld = BenchShape(
        "tinyworld", LlamaConfig(dim=128, n_layers=4, n_heads=4, vocab_size=640, multiple_of=32, max_seq_len=256),
        prompt_len=10, adapter_layers=4, train_batch=(32, 96), ckpt_batch=(32, 96), gen_batches=(1, 8),
        gen_prompt=32, gen_new=128, warmup=2, steps=5 if quick else 10, rounds=3 if quick else 5,
        gen_rounds=3 if quick else 5, about="the embedded tiny-world model (adapterlab.worlds.tinyworld)",
    )
    # A small LLaMA with LLaMA's vocabulary and proportions (head width 64, SwiGLU 8/3 C), the
    # top 7 of 8 layers adapted (7B: top 30 of 32): matrix products dominate, as at 7B.
    cpu_small = BenchShape(
        "cpu-small", LlamaConfig(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=512),
        prompt_len=10, adapter_layers=7, train_batch=(4, 256), ckpt_batch=(4, 256), gen_batches=(1, 8),
        gen_prompt=32, gen_new=128, warmup=1, steps=3 if quick else 5, rounds=2 if quick else 3,
        gen_rounds=2 if quick else 3, about="LLaMA proportions at 43M parameters",
    )
    # LLaMA-7B with the paper's adapter (K=10, L=30): one short run on one GPU.
    llama7b = BenchShape(
        "7b", LlamaConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=2048),
        prompt_len=10, adapter_layers=30, train_batch=(8, 512), ckpt_batch=(1, 512), gen_batches=(1, 8),
        gen_prompt=64, gen_new=128, warmup=3, steps=5, rounds=2, gen_rounds=2,
        about="LLaMA-7B shape, random bf16 weights",
    )
    # For checking the code paths in seconds (e.g. the CUDA path's logic with --device cpu).
    tiny = BenchShape(
        "tiny", LlamaConfig(dim=64, n_layers=4, n_heads=4, vocab_size=256, multiple_of=16, max_seq_len=128),
        prompt_len=4, adapter_layers=3, train_batch=(2, 32), ckpt_batch=(1, 32), gen_batches=(1, 2),
        gen_prompt=8, gen_new=8, warmup=1, steps=2, rounds=2, gen_rounds=2, about="smoke test",
    )
    return {s.name: s for s in (tinyworld, cpu_small, llama7b, tiny)}


# =========================================================================== machine
def describe_machine(device: torch.device) -> dict:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu_vector_unit": cpu_vector_unit(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda)
    return info


def machine_label(machine: dict) -> str:
    return machine.get("gpu") or f"{machine['cpu']} ({machine['torch_threads']} torch threads)"


# =========================================================================== two models, one set of weights
def hf_config_from(cfg: LlamaConfig, dtype: torch.dtype):
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False, attn_implementation="sdpa",
        bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype,
    )


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from Meta's interleaved rotary pairs to HF's rotated halves (the inverse of
    adapterlab.io.weights.hf_to_meta_rows): row h*d + 2i + c moves to h*d + c*d/2 + i."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, -1).transpose(1, 2).reshape(w.shape)


# Meta name -> Hugging Face name: the loader's maps (adapterlab.io.weights), inverted.
_HF_TOP = {meta: hf for hf, meta in HF_TOP_NAMES.items()}
_HF_LAYER = {meta: hf for hf, meta in HF_LAYER_NAMES.items()}


def meta_to_hf_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our (Meta-named) base weights -> transformers' LlamaForCausalLM names and q/k row order."""
    out = {}
    for name, t in state.items():
        if ".adapter." in name:
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            out[_HF_TOP[name]] = t
            continue
        if m.group(2) == "attention.wq.weight":
            t = meta_to_hf_rows(t, cfg.n_heads)
        elif m.group(2) == "attention.wk.weight":
            t = meta_to_hf_rows(t, cfg.n_kv_heads)
        out[f"model.layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"] = t
    return out


def random_llama(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Llama:
    """Our model with random weights drawn directly on the device (seconds even at 7B on a GPU).
    Matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2): O(1) activations and logits."""
    with torch.device("meta"):
        model = Llama(cfg).to(dtype)
    model.to_empty(device=device)  # uninitialised storage, already in the target dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) / math.sqrt(p.shape[-1]))
    return model


def hf_from_ours(ours: Llama, dtype: torch.dtype):
    """A transformers LlamaForCausalLM holding copies of our base weights (q/k rows permuted)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = hf_config_from(ours.config, dtype)
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    state = meta_to_hf_state_dict(ours.state_dict(), ours.config)
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=hf_cfg).to(ours.device)  # its buffers were on "meta"
    return hf.to(ours.device)


def build_pair_on_disk(shape: BenchShape, device: torch.device, dtype: torch.dtype, seed: int):
    """A transformers model saved with save_pretrained; both models loaded from that folder."""
    from transformers import LlamaForCausalLM

    from adapterlab import load_llama

    source = random_llama(shape.config, torch.device("cpu"), dtype, seed)
    with tempfile.TemporaryDirectory() as folder:
        hf_from_ours(source, dtype).save_pretrained(folder)
        del source
        hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
        ours = load_llama(folder, device=device, dtype=dtype, max_seq_len=shape.config.max_seq_len)
    return ours, hf


def build_pair_in_memory(shape: BenchShape, device: torch.device, dtype: torch.dtype, seed: int):
    ours = random_llama(shape.config, device, dtype, seed)
    return ours, hf_from_ours(ours, dtype)


def attach_adapters(ours: Llama, hf, shape: BenchShape, seed: int):
    """Our paper-default adapter (per-head tanh gate) and PEFT's adaption prompt, both (K, L)."""
    from peft import AdaptionPromptConfig, get_peft_model

    add_adapter(ours, AdapterConfig(prompt_len=shape.prompt_len, layers=shape.adapter_layers), seed=seed)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        hf, AdaptionPromptConfig(adapter_len=shape.prompt_len, adapter_layers=shape.adapter_layers, task_type="CAUSAL_LM")
    )
    return ours, peft_model


def peft_adapter_tensors(peft_model) -> dict[int, dict[str, torch.nn.Parameter]]:
    """{layer index: {"prompt": (1, K, C), "gate": (1,)}} of PEFT's adaption prompt."""
    out: dict[int, dict[str, torch.nn.Parameter]] = {}
    for name, p in peft_model.named_parameters():
        m = re.search(r"layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$", name)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = p
    return out


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# =========================================================================== parity
@torch.no_grad()
def parity_check(ours: Llama, peft_model, shape: BenchShape, device: torch.device, seed: int) -> dict:
    """Give a PEFT-style adapter of ours (one gate per layer, no tanh) PEFT's prompts and the same
    random non-zero gates; compare logits and greedy tokens. Both adapters are restored after."""
    from adapterlab.generate import generate_tokens

    config = ours.adapter_config
    saved_ours = {k: v.clone() for k, v in ours.state_dict().items() if ".adapter." in k}
    remove_adapter(ours)
    add_adapter(ours, AdapterConfig(prompt_len=shape.prompt_len, layers=shape.adapter_layers, gate="layer",
                                    gate_activation="identity"))
    peft_params = peft_adapter_tensors(peft_model)
    saved_peft = {i: {k: p.detach().clone() for k, p in d.items()} for i, d in peft_params.items()}
    gen = torch.Generator().manual_seed(seed)
    try:
        for i in adapted_layers(ours):
            ap = ours.layers[i].attention.adapter
            gate = 0.5 * torch.randn(1, generator=gen)
            peft_params[i]["gate"].copy_(gate)
            ap.gate.copy_(gate)
            ap.prompt.copy_(peft_params[i]["prompt"][0].float())
        ours.eval(), peft_model.eval()
        tokens = torch.randint(3, shape.config.vocab_size, (2, 16), generator=gen).to(device)
        a = ours(tokens).float()
        b = peft_model(input_ids=tokens, use_cache=False).logits.float()
        new = min(16, shape.gen_new)
        ours_greedy = generate_tokens(ours, tokens.tolist(), max_new_tokens=new, greedy=True, stop_at_eos=False)
        peft_greedy = peft_model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0)[:, tokens.shape[1]:]
        same = sum(x == y for r1, r2 in zip(ours_greedy, peft_greedy.tolist()) for x, y in zip(r1, r2))
    finally:  # the paper-default adapter of ours again, PEFT's zero gates again
        remove_adapter(ours)
        add_adapter(ours, config)
        ours.load_state_dict(saved_ours, strict=False)
        for i, d in peft_params.items():
            for k, p in d.items():
                p.copy_(saved_peft[i][k])
    return {
        "logits_max_abs_diff": float((a - b).abs().max()),
        "logits_max_abs": float(b.abs().max()),
        "greedy_tokens_equal": f"{same}/{tokens.shape[0] * new}",
    }


# =========================================================================== memory
class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside and still alive: CPU has no
    max_memory_allocated. Counts what the operations allocate (activations, logits, gradients,
    optimizer temporaries), not the tensors that existed before (weights, optimizer state)."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict[int, tuple[object, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (self._ref(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


# =========================================================================== training
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TrainVariant:
    """One way of running an adapter training step (forward, loss, backward, AdamW step)."""

    name: str
    side: str  # "adapterlab" or "peft"
    make: Callable[[], Callable[[], None]]  # sets the model up, returns the step function
    batch: tuple[int, int]
    other_model_bytes: int  # weights of the idle model sharing the GPU (subtracted from its peak)
    own_bytes: int
    note: str = ""
    compiled: bool = False
    tok_s: list[float] = field(default_factory=list)
    cpu_tok_s: list[float] = field(default_factory=list)  # tokens per second of process CPU time
    warmup_s: list[float] = field(default_factory=list)
    peak_gib: Optional[float] = None
    error: Optional[str] = None

    def median(self) -> Optional[float]:
        return statistics.median(self.tok_s) if self.tok_s else None

    def cpu_median(self) -> Optional[float]:
        return statistics.median(self.cpu_tok_s) if self.cpu_tok_s else None

    def to_json(self) -> dict:
        return {"name": self.name, "side": self.side, "batch": list(self.batch), "tok_s_median": self.median(),
                "tok_s_rounds": self.tok_s, "cpu_time_tok_s_median": self.cpu_median(), "warmup_s_rounds": self.warmup_s, "peak_gib": self.peak_gib,
                "note": self.note, "error": self.error}


def make_batch(vocab: int, batch: tuple[int, int], device: torch.device, seed: int, prompt_fraction: float):
    """Random tokens; labels aligned with tokens (both losses shift them), -100 on the prompt part."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, batch, generator=gen)
    labels = tokens.clone()
    labels[:, : int(prompt_fraction * batch[1])] = IGNORE_INDEX
    return tokens.to(device), labels.to(device)


def adam_for(params) -> torch.optim.AdamW:
    # the release's optimizer settings, identical on both sides
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)


def ours_variant(ours: Llama, tokens, labels, *, loss_mode: str, compiled: bool, ckpt: bool):
    def make():
        (compile_model if compiled else uncompile_model)(ours)
        ours.activation_checkpointing = ckpt
        ours.train()
        opt = adam_for(ours.parameters())

        def step():
            opt.zero_grad(set_to_none=True)
            if loss_mode == "logits":  # the readable path: full logits, then cross-entropy
                logits = ours(tokens)  # (B, T, vocab)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            else:
                loss = lm_loss(ours, tokens, labels, mode=loss_mode)
            loss.backward()
            opt.step()

        return step

    return make


def peft_variant(peft_model, tokens, labels):
    def make():
        peft_model.train()
        opt = adam_for(peft_model.parameters())

        def step():
            opt.zero_grad(set_to_none=True)
            loss = peft_model(input_ids=tokens, labels=labels, use_cache=False).loss
            loss.backward()
            opt.step()

        return step

    return make


def run_variant_round(v: TrainVariant, shape: BenchShape, device: torch.device, measure_memory: bool) -> None:
    """Warm up, time ``shape.steps`` steps, record tokens/s and the peak memory."""
    step = None
    try:
        step = v.make()
        sync(device)
        start = time.perf_counter()
        for _ in range(shape.warmup):
            step()
        sync(device)
        v.warmup_s.append(time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(shape.steps):
            step()
        sync(device)
        tokens = v.batch[0] * v.batch[1] * shape.steps
        v.tok_s.append(tokens / (time.perf_counter() - start))
        v.cpu_tok_s.append(tokens / max(time.process_time() - cpu_start, 1e-9))
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - v.other_model_bytes) / GIB
            v.peak_gib = max(v.peak_gib or 0.0, peak)
        elif measure_memory and v.peak_gib is None and not v.compiled:
            tracker = PeakTensorMemory()
            with tracker:
                step()
            v.peak_gib = (v.own_bytes + tracker.peak) / GIB
    except Exception as error:  # one failing variant must not cost the whole (GPU) run
        v.error = f"{type(error).__name__}: {error}"[:500]
        print(f"  ! {v.name}: {v.error}", flush=True)
    finally:
        step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def checkpointing_rows(ours, shape, device, args, own_bytes, log) -> list[TrainVariant]:
    """Peak memory of one training step with and without activation checkpointing (eager, fused CE)."""
    tokens, labels = make_batch(shape.config.vocab_size, shape.ckpt_batch, device, args.seed + 1, PROMPT_FRACTION)
    rows = []
    for ckpt in (True, False):
        v = TrainVariant(
            f"adapterlab {'with' if ckpt else 'without'} activation checkpointing", "adapterlab",
            ours_variant(ours, tokens, labels, loss_mode="fused", compiled=False, ckpt=ckpt), shape.ckpt_batch,
            own_bytes["peft"], own_bytes["adapterlab"], "eager, fused chunked CE")
        run_variant_round(v, shape, device, measure_memory=True)
        rows.append(v)
        if v.tok_s:
            log(f"  {v.name:<48} {shape.ckpt_batch[0]}x{shape.ckpt_batch[1]}  {v.tok_s[-1]:>10,.0f} tokens/s   "
                f"peak {v.peak_gib:.3f} GiB")
    ours.activation_checkpointing = False
    return rows


def train_rows(ours, peft_model, shape, device, args, own_bytes, log, deadline: float) -> list[TrainVariant]:
    B, T = shape.train_batch
    vocab = shape.config.vocab_size
    tokens, labels = make_batch(vocab, shape.train_batch, device, args.seed, PROMPT_FRACTION)
    _, all_labels = make_batch(vocab, shape.train_batch, device, args.seed, 0.0)
    ob, pb = own_bytes["adapterlab"], own_bytes["peft"]

    def ours_row(name, note, labels_, **kw):
        return TrainVariant(name, "adapterlab", ours_variant(ours, tokens, labels_, **kw), (B, T), pb, ob, note,
                            compiled=kw["compiled"])

    # Order inside a round: the peer first, the compiled variant (slow first call, most likely to
    # fail on an unusual setup) last, so a problem there cannot cost the other numbers.
    rows = [TrainVariant("PEFT adaption prompt", "peft", peft_variant(peft_model, tokens, labels), (B, T), ob, pb,
                         "transformers + peft; loss from the full logits")]
    if not args.no_ablations:
        rows += [
            ours_row("adapterlab eager, full logits", "readable path: logits (B,T,V) + F.cross_entropy", labels,
                     loss_mode="logits", compiled=False, ckpt=False),
            ours_row("adapterlab eager, chunked CE 'checkpoint'", "lm_loss(mode='checkpoint')", labels,
                     loss_mode="checkpoint", compiled=False, ckpt=False),
            ours_row("adapterlab eager, fused CE, all tokens labelled", "lm_loss(mode='fused'), no prompt masking",
                     all_labels, loss_mode="fused", compiled=False, ckpt=False),
        ]
    rows.append(ours_row("adapterlab eager, fused CE", "lm_loss(mode='fused')", labels,
                         loss_mode="fused", compiled=False, ckpt=False))
    if args.compile == "on":
        rows.append(ours_row("adapterlab compiled, fused CE", "compile_model + lm_loss(mode='fused')", labels,
                             loss_mode="fused", compiled=True, ckpt=False))

    log(f"  batch {B}x{T}, labels on the last {100 - round(100 * PROMPT_FRACTION)}% of each row; {shape.warmup} "
        f"warm-up + {shape.steps} timed steps per variant and round; {shape.rounds} alternating rounds")
    for r in range(shape.rounds):  # A B A B ...: every variant once per round
        if time.perf_counter() > deadline and r > 0:
            log(f"  time budget reached: stopped after {r} rounds")
            break
        for v in rows:
            if v.error:
                continue
            run_variant_round(v, shape, device, measure_memory=(r == 0))
            if len(v.tok_s) == r + 1:
                log(f"  round {r + 1}: {v.name:<48} {v.tok_s[-1]:>10,.0f} tokens/s  ({v.cpu_tok_s[-1]:,.0f} per CPU "
                    f"second; warm-up {v.warmup_s[-1]:.1f} s)")
    uncompile_model(ours)
    return rows


def fastest_ours(rows: list[TrainVariant], by_cpu_time: bool) -> Optional[TrainVariant]:
    """adapterlab's recommended setting: the faster of eager + fused CE and compiled + fused CE
    (on CPU judged by CPU time, which a shared machine disturbs less than wall time)."""
    candidates = [v for v in rows if v.name in ("adapterlab eager, fused CE", "adapterlab compiled, fused CE")
                  and v.median()]
    key = (lambda v: v.cpu_median()) if by_cpu_time else (lambda v: v.median())
    return max(candidates, key=key) if candidates else None


# =========================================================================== generation
def generate_rows(ours, peft_model, shape, device, args, log) -> list[dict]:
    from adapterlab.generate import generate_tokens

    ours.eval(), peft_model.eval()
    uncompile_model(ours)
    rows = []
    for B in shape.gen_batches:
        prompt = torch.randint(3, shape.config.vocab_size, (B, shape.gen_prompt),
                               generator=torch.Generator().manual_seed(args.seed + B)).to(device)
        prompt_list = prompt.tolist()
        mask = torch.ones_like(prompt)

        def run_ours(new: int):
            return generate_tokens(ours, prompt_list, max_new_tokens=new, greedy=True, stop_at_eos=False)

        def run_peft(new: int):
            return peft_model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=0)

        sides = {"adapterlab": run_ours, "peft": run_peft}
        times: dict[str, list[float]] = {k: [] for k in sides}
        cpu_times: dict[str, list[float]] = {k: [] for k in sides}
        errors: dict[str, str] = {}
        for name, fn in sides.items():  # warm-up: kernels, caches, allocator
            try:
                fn(min(8, shape.gen_new))
            except Exception as error:
                errors[name] = f"{type(error).__name__}: {error}"[:500]
        for _ in range(shape.gen_rounds):  # alternating
            for name, fn in sides.items():
                if name in errors:
                    continue
                sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                fn(shape.gen_new)
                sync(device)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
        row = {"batch": B, "prompt_tokens": shape.gen_prompt, "new_tokens": shape.gen_new, "errors": errors,
               "seconds_rounds": times}
        for name in sides:
            row[f"{name}_tok_s"] = (B * shape.gen_new / statistics.median(times[name])) if times[name] else None
            row[f"{name}_cpu_time_tok_s"] = (B * shape.gen_new / statistics.median(cpu_times[name])
                                             if cpu_times[name] else None)
        if row["adapterlab_tok_s"] and row["peft_tok_s"]:
            row["speedup"] = row["adapterlab_tok_s"] / row["peft_tok_s"]
            row["speedup_cpu_time"] = row["adapterlab_cpu_time_tok_s"] / row["peft_cpu_time_tok_s"]
        rows.append(row)
        log(f"  batch {B}: adapterlab {row['adapterlab_tok_s'] or 0:>9,.1f} tok/s   PEFT {row['peft_tok_s'] or 0:>9,.1f} "
            f"tok/s   ratio {row.get('speedup', float('nan')):.2f}x"
            + (f" (CPU time: {row['speedup_cpu_time']:.2f}x)" if device.type == "cpu" and "speedup" in row else "")
            + (f"  errors: {errors}" if errors else ""))
    return rows


# =========================================================================== padding
def alpaca_like_lengths(n: int, median: float, mean: float, seed: int, lo: int = 45, hi: int = 512) -> list[int]:
    """Synthetic token lengths (prompt template + instruction + input + response): a lognormal with
    the given median and mean, clipped to [lo, hi] (the template alone is ~40 tokens; 512 = max_seq_len)."""
    sigma = math.sqrt(2 * math.log(mean / median))
    gen = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(median) + sigma * torch.randn(n, generator=gen, dtype=torch.float64))
    return x.round().clamp(lo, hi).long().tolist()


def padding_section(args, log) -> dict:
    from adapterlab.data import length_grouped_batches

    lengths = alpaca_like_lengths(ALPACA_EXAMPLES, args.alpaca_median, args.alpaca_mean, args.seed)
    per_gpu = 8  # the release: total batch 64 = 8 GPUs x 8
    batches = length_grouped_batches(lengths, per_gpu, seed=args.seed, epoch=0)
    used = [i for b in batches for i in b]
    real = sum(lengths[i] for i in used)
    grouped = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    gen = torch.Generator().manual_seed(args.seed)
    shuffled = [used[i] for i in torch.randperm(len(used), generator=gen).tolist()]
    unsorted = sum(max(lengths[i] for i in shuffled[j:j + per_gpu]) * per_gpu for j in range(0, len(shuffled), per_gpu))
    out = {
        "examples": ALPACA_EXAMPLES,
        "length_model": f"lognormal, median {args.alpaca_median:g}, mean {args.alpaca_mean:g} tokens, clipped to "
                        "[45, 512]: assumed statistics of Alpaca-52K with the prompt template (synthetic, no download)",
        "mean_real_tokens": real / len(used),
        "batch_per_gpu": per_gpu,
        "pad_to_512": {"computed_per_real": RELEASE_PAD_LEN * len(used) / real,
                       "tokens_per_epoch": RELEASE_PAD_LEN * ALPACA_EXAMPLES},
        "random_batches_pad_to_longest": {"computed_per_real": unsorted / real},
        "length_grouped": {"computed_per_real": grouped / real,
                           "tokens_per_epoch": grouped / len(used) * ALPACA_EXAMPLES},
    }
    # the same with 4x larger sorting groups: less padding, less randomness in the batch order
    wide = length_grouped_batches(lengths, per_gpu, seed=args.seed, epoch=0, group=32)
    out["length_grouped_group32"] = {
        "computed_per_real": sum(len(b) * max(lengths[i] for i in b) for b in wide)
        / sum(lengths[i] for b in wide for i in b)}
    log("\n== padding: " + out["length_model"])
    log(f"  mean real tokens per example {out['mean_real_tokens']:.1f}; batches of {per_gpu} per GPU")
    for k, label in (("pad_to_512", "pad every example to 512 (release)"),
                     ("random_batches_pad_to_longest", "random batches, pad to the longest"),
                     ("length_grouped", "length-grouped batches (adapterlab.data default)"),
                     ("length_grouped_group32", "length-grouped batches, group=32")):
        log(f"  {label:<50} {out[k]['computed_per_real']:.3f} tokens computed per real token")
    return out


# =========================================================================== FLOPs, MFU, projections
def train_flops_per_step(cfg: LlamaConfig, K: int, L: int, B: int, T: int) -> float:
    """Model FLOPs of one adapter training step; see FLOP_FORMULA."""
    C, d = cfg.dim, cfg.head_dim
    per_layer = C * cfg.n_heads * d * 2 + C * cfg.n_kv_heads * d * 2 + 3 * C * cfg.ffn_hidden_dim
    head = cfg.vocab_size * C
    tokens = B * T
    attn = 2 * B * T * T * C  # causal: Q K^T and P V over half of the T x T matrix
    prompt_attn = 4 * B * T * K * C
    forward = 2 * tokens * (cfg.n_layers * per_layer + head) + cfg.n_layers * attn + L * prompt_attn
    backward = 2 * tokens * (L * per_layer + head) + 2 * L * (attn + prompt_attn)
    return float(forward + backward)


def projections(rates: dict[str, float], padding: dict) -> dict:
    """Wall time of the paper's recipe (Alpaca-52K, 5 epochs) from tokens/s measured at 512 tokens
    per row, assuming perfect scaling to 8 GPUs (the adapter's 1.2M gradients make the all-reduce
    negligible). Shorter length-grouped rows have cheaper attention, so that column is conservative."""
    out = {}
    for side, rate in rates.items():
        for batching, key in (("pad to 512", "pad_to_512"), ("length-grouped", "length_grouped")):
            hours = padding[key]["tokens_per_epoch"] * RECIPE_EPOCHS / rate / 3600
            out[f"{side}, {batching}"] = {"1_gpu_hours": hours, "8_gpu_hours": hours / 8}
    return out


# =========================================================================== one shape
def run_shape(shape: BenchShape, device, dtype, build, args, log, deadline: float, padding: Optional[dict]) -> dict:
    res: dict = {"about": shape.about, **shape.config.to_dict(), "prompt_len": shape.prompt_len,
                 "adapter_layers": shape.adapter_layers, "dtype": str(dtype).replace("torch.", ""), "build": build}
    log(f"\n######## shape {shape.name} ({shape.about}): dim {shape.config.dim}, {shape.config.n_layers} layers, "
        f"vocab {shape.config.vocab_size}; adapter K={shape.prompt_len}, L={shape.adapter_layers}; "
        f"{res['dtype']} on {device}; weights via {build}")
    t0 = time.perf_counter()
    builder = build_pair_on_disk if build == "disk" else build_pair_in_memory
    ours, hf = builder(shape, device, dtype, args.seed)
    ours, peft_model = attach_adapters(ours, hf, shape, args.seed)
    int8 = getattr(args, "dtype", None) == "int8"
    if int8:  # ours: the same bf16 weights rounded to int8 per output channel; PEFT keeps them in bf16
        from adapterlab.quant import quantize_base

        quantize_base(ours)
        res["dtype"] = "int8 base (bfloat16 products) vs PEFT bfloat16"
    own_bytes = {"adapterlab": tensor_bytes(ours), "peft": tensor_bytes(peft_model)}
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["weights_gib"] = {k: v / GIB for k, v in own_bytes.items()}
    log(f"built both models in {res['build_s']} s; weights {own_bytes['adapterlab'] / GIB:.3f} GiB each")
    sections = args.section_set

    if "parity" in sections and int8:
        res["parity"] = {"skipped": "int8 base: ours rounds the weights PEFT holds in bf16, so the outputs differ"}
        log(f"\n== parity: {res['parity']['skipped']}")
    elif "parity" in sections:
        try:
            res["parity"] = parity_check(ours, peft_model, shape, device, args.seed)
        except Exception as error:
            res["parity"] = {"error": f"{type(error).__name__}: {error}"[:500]}
        log(f"\n== parity (PEFT-style adapter of ours with PEFT's prompts and gates): {res['parity']}")

    if "memory" in sections and shape.ckpt_batch is not None:
        log("\n== memory: one adapter training step, activation checkpointing on / off")
        res["checkpointing"] = [v.to_json() for v in checkpointing_rows(ours, shape, device, args, own_bytes, log)]

    if "generate" in sections:
        if time.perf_counter() > deadline:
            log("\n== generate: skipped (time budget)")
        else:
            log(f"\n== generate: greedy, prompt {shape.gen_prompt} tokens, {shape.gen_new} new tokens, "
                f"{shape.gen_rounds} alternating rounds")
            res["generate"] = rows = generate_rows(ours, peft_model, shape, device, args, log)
            ratios = [r["speedup"] for r in rows if "speedup" in r]
            if ratios:
                res["generate_speedup_vs_peft"] = statistics.median(ratios)
                if device.type == "cpu":
                    res["generate_speedup_vs_peft_cpu_time"] = statistics.median(r["speedup_cpu_time"] for r in rows
                                                                                 if "speedup" in r)

    if "train" in sections:  # the main comparison: its first round runs whatever the budget says
        log("\n== train: adapterlab vs PEFT, same weights, adapter, batch, labels and dtype")
        rows = train_rows(ours, peft_model, shape, device, args, own_bytes, log, deadline)
        res["train"] = [v.to_json() for v in rows]
        peer, fast = rows[0], fastest_ours(rows, by_cpu_time=device.type == "cpu")
        if fast is not None and peer.median():
            res["train_fast_variant"] = fast.name
            res["train_speedup_vs_peft"] = fast.median() / peer.median()
            if device.type == "cpu":
                res["train_speedup_vs_peft_cpu_time"] = fast.cpu_median() / peer.cpu_median()
        B, T = shape.train_batch
        flops = train_flops_per_step(shape.config, shape.prompt_len, shape.adapter_layers, B, T)
        res["model_flops_per_step"] = flops
        if device.type == "cuda":
            res["mfu"] = {v.name: flops * v.median() / (B * T) / H100_BF16_DENSE_PEAK for v in rows if v.median()}
        if padding is not None and fast is not None and peer.median() and T == RELEASE_PAD_LEN:
            res["recipe_projection"] = projections({"adapterlab": fast.median(), "PEFT": peer.median()}, padding)
        print_train_table(rows + [TrainVariant(**_ckpt_as_row(r)) for r in res.get("checkpointing", [])], log,
                          cpu=device.type == "cpu")

    del ours, hf, peft_model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _ckpt_as_row(r: dict) -> dict:
    return dict(name=r["name"], side=r["side"], make=lambda: None, batch=tuple(r["batch"]), other_model_bytes=0,
                own_bytes=0, note=r["note"], tok_s=r["tok_s_rounds"], peak_gib=r["peak_gib"], error=r["error"],
                cpu_tok_s=[r["cpu_time_tok_s_median"]] if r["cpu_time_tok_s_median"] else [],
                warmup_s=r["warmup_s_rounds"])


# =========================================================================== the real model (--base)
# SmolLM2-135M-Instruct from its installed GGUF file (or, when the file is absent, random weights in its exact
# shape): adapterlab (float32, bfloat16 and int8 frozen bases) against PEFT on transformers and against LitGPT,
# all holding the same weights.
SMOLLM2_CONFIG = LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=1536,
                             norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192)
LITGPT_NAMES = {"smollm2": "SmolLM2-135M-Instruct"}
TEXT_TOKENS = 512  # the real-text loss: the first 512 tokens of Python's bundled docs (adapterlab.worlds.smollm2)


@dataclass
class BaseBench:
    """The real-model run's sizes: adapters (K, both L), train batch, generation, repetitions."""

    prompt_len: int = 10
    layers: tuple[int, ...] = (8, 30)
    train_batch: tuple[int, int] = (4, 256)
    gen_batches: tuple[int, ...] = (1, 8)
    gen_layers: int = 30  # the adapter attached while generating (the paper's L)
    gen_prompt: int = 32
    gen_new: int = 128
    warmup: int = 1
    steps: int = 3
    rounds: int = 3
    gen_rounds: int = 3


def base_bench(quick: bool) -> BaseBench:
    if quick:  # the same sections and keys, smaller: a few minutes on one thread
        return BaseBench(train_batch=(2, 128), gen_new=32, steps=1, rounds=2, gen_rounds=2)
    return BaseBench()


def cpu_vector_unit() -> dict:
    """What torch dispatches to (its CPU capability) and the flags that decide bf16/int8 matmul speed."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in wanted if f in flags]}


def measure_limits(log, seconds: float = 1.0) -> dict:
    """The machine's physical limits at this thread count: memory bandwidth (a 512 MiB tensor read by a sum,
    and copied) and matmul peak (2048^3 products, float32 and bfloat16); the best of a few repetitions."""
    def best_time(fn, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    n = 128 * 2**20  # 512 MiB of float32: far larger than any cache
    src, dst = torch.ones(n), torch.empty(n)
    read_gbs = n * 4 / best_time(lambda: src.sum(), 5) / 1e9
    copy_gbs = 2 * n * 4 / best_time(lambda: dst.copy_(src), 5) / 1e9  # read + write
    del src, dst
    out = {"memory_read_gb_s": read_gbs, "memory_copy_gb_s": copy_gbs, "memory_bandwidth_gb_s": max(read_gbs, copy_gbs),
           "method": "bandwidth: best of 5 of sum() (bytes read / s) and copy_() ((read + write) / s) over a 512 MiB "
                     "float32 tensor; matmul peak: best of 3 torch.mm of 2048 x 2048 x 2048 (2 n^3 FLOPs)"}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        out[f"matmul_{name}_gflop_s"] = 2 * 2048**3 / best_time(lambda: a @ b, 3) / 1e9
    log(f"  memory bandwidth {out['memory_bandwidth_gb_s']:.1f} GB/s (read {read_gbs:.1f}, copy {copy_gbs:.1f}); "
        f"matmul peak fp32 {out['matmul_fp32_gflop_s']:.0f} GFLOP/s, bf16 {out['matmul_bf16_gflop_s']:.0f} GFLOP/s")
    return out


def linear_weights(cfg: LlamaConfig) -> int:
    """Numbers in the matrices one token passes through: the blocks' seven and the output head."""
    C, d, H = cfg.dim, cfg.head_dim, cfg.ffn_hidden_dim
    per_layer = C * cfg.n_heads * d * 2 + C * cfg.n_kv_heads * d * 2 + 3 * C * H
    return cfg.n_layers * per_layer + cfg.vocab_size * C


def load_real_base(name: str, log) -> tuple[Llama, Optional[object], str]:
    """(float32 model, its tokenizer or None, where the weights came from)."""
    from adapterlab import load_llama

    try:
        model = load_llama(name, dtype=torch.float32)
        return model, getattr(model, "tokenizer", None), f"{name} (installed GGUF file)"
    except FileNotFoundError as error:
        log(f"  {error}: random weights in the exact shape instead (speeds hold, quality numbers do not)")
        model = random_llama(SMOLLM2_CONFIG, torch.device("cpu"), torch.float32, seed=0)
        model.output.weight = model.tok_embeddings.weight  # tied, as the file
        return model.requires_grad_(False), None, f"random weights, {name}'s shape (file not installed)"


def litgpt_from_ours(ours: Llama, name: str, K: int, L: int):
    """LitGPT's adapter GPT (its own SmolLM2 config) holding our base weights, converted by LitGPT's own
    Hugging Face converter from the transformers-named copy; only the adapter trains."""
    from litgpt.adapter import GPT, Config, mark_only_adapter_as_trainable
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama

    cfg = ours.config
    config = Config.from_name(LITGPT_NAMES[name], adapter_prompt_length=K, adapter_start_layer=cfg.n_layers - L)
    theirs = (config.n_layer, config.n_embd, config.n_head, config.n_query_groups, config.intermediate_size,
              config.padded_vocab_size, config.rope_base)
    mine = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden_dim, cfg.vocab_size, cfg.rope_theta)
    if theirs != mine:
        raise ValueError(f"LitGPT's config {LITGPT_NAMES[name]} {theirs} is not our model's shape {mine}")
    hf_state = meta_to_hf_state_dict(ours.state_dict(), cfg)
    hf_state.pop("lm_head.weight", None)  # the file ties the head to the embedding: LitGPT ties it too
    state: dict[str, torch.Tensor] = {}
    copy_weights_hf_llama(config, {}, state, hf_state)
    torch.manual_seed(0)
    model = GPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("adapter_wte" not in k and "gating_factor" not in k for k in missing):
        raise ValueError(f"LitGPT conversion: missing {missing[:4]}, unexpected {unexpected[:4]}")
    mark_only_adapter_as_trainable(model)
    return model


def reset_litgpt_prompts(model) -> None:
    """LitGPT's adapter keeps the prompts' keys/values from its first forward for good: clear them, so that
    each training step and each generation computes them (once) from the current prompts."""
    for block in model.transformer.h:
        if hasattr(block.attn, "adapter_kv_cache"):
            block.attn.adapter_kv_cache = None


def litgpt_variant(model, tokens, labels):
    """LitGPT's own adapter fine-tuning step (litgpt/finetune/adapter.py): chunked head, chunked cross-entropy."""
    from litgpt.utils import chunked_cross_entropy

    def make():
        model.clear_kv_cache()
        model.train()
        opt = adam_for(model.parameters())

        def step():
            reset_litgpt_prompts(model)
            opt.zero_grad(set_to_none=True)
            logits = model(tokens, lm_head_chunk_size=128)
            logits[-1] = logits[-1][..., :-1, :]
            loss = chunked_cross_entropy(logits, labels[..., 1:])
            loss.backward()
            opt.step()

        return step

    return make


def litgpt_generate(model, prompt: torch.Tensor, new: int) -> list[list[int]]:
    """Greedy decoding with LitGPT's batched generator and KV cache sized to the request."""
    from litgpt.generate.base import batched_generate_fn

    reset_litgpt_prompts(model)
    model.eval()
    B, P = prompt.shape
    model.max_seq_length = P + new
    model.set_kv_cache(batch_size=B, device=prompt.device)
    try:
        steps = list(batched_generate_fn(model, prompt, max_returned_tokens=P + new, sample_args={"temperature": 0.0},
                                         include_prompt=False, include_eos=True))
    finally:
        model.clear_kv_cache()
    return [[int(step[i]) for step in steps] for i in range(B)]


@torch.no_grad()
def text_loss_full_logits(model, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy on tokens (1, T) from the model's own full forward (the path generation uses)."""
    model.eval()
    logits = model(tokens).float()  # (1, T, V)
    return float(F.cross_entropy(logits[0, :-1], tokens[0, 1:]))


def torchao_int8(model: Llama) -> Llama:
    """torchao's int8 weight-only quantization (per-channel) of every nn.Linear of a copy of the model."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def greedy_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two greedy continuations agree, counted up to each row's first difference
    (after one token differs the contexts differ too)."""
    same = total = 0
    for ra, rb in zip(a, b):
        n = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        same, total = same + n, total + len(ra)
    return same / max(total, 1)


def base_generate_rows(sides: dict[str, Callable], bench: BaseBench, prompts: dict[int, torch.Tensor], log) -> list[dict]:
    """Greedy decoding, alternating rounds over the sides; the first (warm-up) call per side and batch is tracked
    for peak memory and gives the tokens compared between sides."""
    rows = []
    for B in bench.gen_batches:
        prompt = prompts[B]
        times: dict[str, list[float]] = {k: [] for k in sides}
        cpu_times: dict[str, list[float]] = {k: [] for k in sides}
        outputs, peaks, errors = {}, {}, {}
        for name, fn in sides.items():  # warm-up at full length, tracked
            try:
                tracker = PeakTensorMemory()
                with tracker:
                    outputs[name] = fn(prompt, bench.gen_new)
                peaks[name] = tracker.peak / GIB
            except Exception as error:
                errors[name] = f"{type(error).__name__}: {error}"[:500]
                log(f"  ! generate {name}, batch {B}: {errors[name]}")
        for _ in range(bench.gen_rounds):
            for name, fn in sides.items():
                if name in errors:
                    continue
                start, cpu_start = time.perf_counter(), time.process_time()
                fn(prompt, bench.gen_new)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
        row = {"batch": B, "prompt_tokens": prompt.shape[1], "new_tokens": bench.gen_new, "errors": errors,
               "seconds_rounds": times, "peak_activation_gib": peaks, "tok_s": {}, "cpu_time_tok_s": {},
               "greedy_agreement_with_adapterlab_fp32": {}}
        for name in sides:
            row["tok_s"][name] = B * bench.gen_new / statistics.median(times[name]) if times[name] else None
            row["cpu_time_tok_s"][name] = B * bench.gen_new / statistics.median(cpu_times[name]) if cpu_times[name] else None
            if name in outputs and "adapterlab fp32" in outputs:
                row["greedy_agreement_with_adapterlab_fp32"][name] = greedy_agreement(outputs[name],
                                                                                      outputs["adapterlab fp32"])
        rows.append(row)
        log(f"  batch {B}: " + ", ".join(f"{k} {v:,.1f}" if v else f"{k} n/a" for k, v in row["tok_s"].items())
            + " tokens/s")
    return rows


def run_base(name: str, args, log, limits: dict) -> dict:
    """The real model: quality of each frozen base, then training (each L) and generation against the peers."""
    from adapterlab import load_llama
    from adapterlab.generate import generate_tokens
    from adapterlab.quant import base_bytes, quantize_base

    bench = base_bench(args.quick)
    K = bench.prompt_len
    res: dict = {"bench": {k: getattr(bench, k) for k in bench.__dataclass_fields__}}
    t0 = time.perf_counter()
    ours, tokenizer, source = load_real_base(name, log)
    cfg = ours.config
    res.update(source=source, config=cfg.to_dict())
    if tokenizer is not None:
        bf16 = load_llama(name, dtype=torch.bfloat16)
    else:
        bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    int8 = quantize_base(copy.deepcopy(ours))
    ours_models = {"adapterlab fp32": ours, "adapterlab bf16": bf16, "adapterlab int8": int8}
    res["weights_gib"] = {k: base_bytes(m) / GIB for k, m in ours_models.items()}
    res["build_s"] = round(time.perf_counter() - t0, 1)
    log(f"  loaded {source}: weights " + ", ".join(f"{k} {v:.3f} GiB" for k, v in res["weights_gib"].items()))

    # ---- what each frozen base costs in quality (real text, general questions), and torchao's int8 beside ours
    if tokenizer is not None:
        from adapterlab.worlds.smollm2 import accuracy, probe_facts, text_tokens

        text = text_tokens(tokenizer, TEXT_TOKENS)
    else:
        text = torch.randint(3, cfg.vocab_size, (1, TEXT_TOKENS), generator=torch.Generator().manual_seed(0))
    quality: dict = {"text": f"the first {TEXT_TOKENS} tokens of adapterlab.worlds.smollm2.english_text() (Python's "
                             "bundled docs), loss from the model's full forward" if tokenizer is not None else
                     "random tokens (no tokenizer: the file is absent); the losses say nothing about quality",
                     "text_loss": {}}
    torchao_model, torchao_error = None, None
    try:
        torchao_model = torchao_int8(copy.deepcopy(bf16))
    except Exception as error:
        torchao_error = f"{type(error).__name__}: {error}"[:500]
        log(f"  torchao int8 weight-only unavailable: {torchao_error}")
    quality_models = dict(ours_models, **({"torchao int8 (bf16 activations)": torchao_model} if torchao_model else {}))
    for k, m in quality_models.items():
        quality["text_loss"][k] = text_loss_full_logits(m, text)
    fp32_loss = quality["text_loss"]["adapterlab fp32"]
    quality["text_loss_delta_vs_fp32"] = {k: v - fp32_loss for k, v in quality["text_loss"].items()}
    log("  real-text loss: " + ", ".join(f"{k} {v:.4f}" for k, v in quality["text_loss"].items()))
    if tokenizer is not None and not args.quick:  # 66 chat answers per base: minutes on one thread
        quality["general_questions_known"] = {k: accuracy(probe_facts(m, tokenizer), key="known")
                                              for k, m in ours_models.items()}
        quality["general_questions_note"] = ("adapterlab.worlds.smollm2.GENERAL_FACTS: questions kept because the "
                                             "fp32 base answers them, so fp32 is 100% by construction and any change "
                                             "to the base can only lose some")
        log("  general questions answered: " + ", ".join(f"{k} {v:.0%}" for k, v in
                                                         quality["general_questions_known"].items()))
    log(f"  [{time.perf_counter() - t0:.0f} s]")
    res["quality"] = quality

    # ---- the peers, same weights: parity of the plain models first
    probe = text[:, :64]
    hf = hf_from_ours(ours, torch.float32).eval()
    with torch.no_grad():
        res["parity_max_abs_logit_diff"] = {"transformers": float((hf(input_ids=probe).logits - ours(probe)).abs().max())}
    litgpt_error = None
    try:
        import litgpt  # noqa: F401

        res["litgpt_version"] = importlib.metadata.version("litgpt")
    except Exception as error:
        litgpt_error = f"LitGPT is not installed ({type(error).__name__}: {error}); pip install litgpt"
    log(f"  parity with transformers: max |logit diff| {res['parity_max_abs_logit_diff']['transformers']:.2e}")

    prompts = {}
    for B in bench.gen_batches:  # real text, a different slice per row
        starts = [64 + 40 * i for i in range(B)]
        prompts[B] = torch.stack([text[0, s:s + bench.gen_prompt] for s in starts]) if tokenizer is not None else \
            torch.randint(3, cfg.vocab_size, (B, bench.gen_prompt), generator=torch.Generator().manual_seed(B))

    res["train"], res["generate"] = {}, None
    for L in bench.layers:
        log(f"\n== {name}, adapter K={K}, L={L}")
        for m in ours_models.values():
            remove_adapter(m)
            add_adapter(m, AdapterConfig(prompt_len=K, layers=L), seed=args.seed)
        hf_l = hf_from_ours(ours, torch.float32)
        torch.manual_seed(args.seed)
        from peft import AdaptionPromptConfig, get_peft_model

        peft_model = get_peft_model(hf_l, AdaptionPromptConfig(adapter_len=K, adapter_layers=L, task_type="CAUSAL_LM"))
        lit = None
        if litgpt_error is None:
            try:
                lit = litgpt_from_ours(ours, name, K, L)
                if L == bench.layers[0]:
                    lit.eval()
                    reset_litgpt_prompts(lit)
                    with torch.no_grad():
                        res["parity_max_abs_logit_diff"]["litgpt"] = float((lit(probe) - ours(probe)).abs().max())
                    log(f"  parity with LitGPT (zero gates): max |logit diff| "
                        f"{res['parity_max_abs_logit_diff']['litgpt']:.2e}")
            except Exception as error:
                litgpt_error = f"{type(error).__name__}: {error}"[:500]
                log(f"  ! LitGPT: {litgpt_error}")

        # training: every variant once per round, alternating
        shape = BenchShape(name, cfg, K, L, bench.train_batch, None, warmup=bench.warmup, steps=bench.steps,
                           rounds=bench.rounds)
        tokens, labels = make_batch(cfg.vocab_size, bench.train_batch, torch.device("cpu"), args.seed, PROMPT_FRACTION)
        rows = [TrainVariant("PEFT adaption prompt", "peft", peft_variant(peft_model, tokens, labels),
                             bench.train_batch, 0, tensor_bytes(peft_model), "transformers + peft, fp32")]
        if lit is not None:
            rows.append(TrainVariant("LitGPT adapter", "litgpt", litgpt_variant(lit, tokens, labels), bench.train_batch,
                                     0, tensor_bytes(lit), "litgpt.adapter.GPT, fp32, its finetune step"))
        for k, m in ours_models.items():
            rows.append(TrainVariant(k, "adapterlab", ours_variant(m, tokens, labels, loss_mode="fused", compiled=False,
                                                                    ckpt=False), bench.train_batch, 0, base_bytes(m),
                                     f"{k.split()[1]} frozen base, fp32 adapter, lm_loss(mode='fused')"))
        log(f"  train batch {bench.train_batch[0]}x{bench.train_batch[1]}, {bench.warmup} warm-up + {bench.steps} timed "
            f"steps per variant and round, {bench.rounds} alternating rounds")
        for r in range(bench.rounds):
            for v in rows:
                if v.error:
                    continue
                run_variant_round(v, shape, torch.device("cpu"), measure_memory=(r == 0))
                if len(v.tok_s) == r + 1:
                    log(f"  round {r + 1}: {v.name:<24} {v.tok_s[-1]:>8,.1f} tokens/s ({v.cpu_tok_s[-1]:,.1f} per CPU s)")
        B, T = bench.train_batch
        log(f"  [{time.perf_counter() - t0:.0f} s]")
        res["train"][f"L{L}"] = {
            "rows": [v.to_json() for v in rows],
            "model_flops_per_token": train_flops_per_step(cfg, K, L, B, T) / (B * T),
        }
        print_train_table(rows, log, cpu=True)

        if L == bench.gen_layers:
            log(f"\n== {name}, greedy generation, K={K}, L={L}: prompt {bench.gen_prompt} tokens of real text, "
                f"{bench.gen_new} new tokens, {bench.gen_rounds} alternating rounds")
            for m in ours_models.values():
                m.eval()
            sides: dict[str, Callable] = {
                k: (lambda m: lambda p, new: generate_tokens(m, p.tolist(), max_new_tokens=new, greedy=True,
                                                             stop_at_eos=False))(m)
                for k, m in ours_models.items()}
            peft_model.eval()
            sides["PEFT"] = lambda p, new: peft_model.generate(
                input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                pad_token_id=0)[:, p.shape[1]:].tolist()
            if lit is not None:
                sides["LitGPT"] = lambda p, new: litgpt_generate(lit, p, new)
            if torchao_model is not None:
                add_adapter(torchao_model, AdapterConfig(prompt_len=K, layers=L), seed=args.seed)
                sides["torchao int8"] = lambda p, new: generate_tokens(torchao_model, p.tolist(), max_new_tokens=new,
                                                                       greedy=True, stop_at_eos=False)
            res["generate"] = base_generate_rows(sides, bench, prompts, log)
            log(f"  [{time.perf_counter() - t0:.0f} s]")
        del peft_model, hf_l, lit
        gc.collect()

    res["errors"] = {"litgpt": litgpt_error, "torchao": torchao_error}
    res["limits"] = base_limits(cfg, K, bench, limits, res)
    res["summary"] = base_summary(res, bench)
    return res


def base_limits(cfg: LlamaConfig, K: int, bench: BaseBench, limits: dict, res: dict) -> dict:
    """What the hardware allows: weight bytes per decoding step / bandwidth, and model FLOPs per trained token /
    matmul peak (see FLOP_FORMULA; the head's saving on prompt tokens is not counted)."""
    n = linear_weights(cfg)
    bandwidth = limits["memory_bandwidth_gb_s"] * 1e9
    out = {"linear_weights": n, "generate_tokens_per_s_limit": {}, "train_tokens_per_s_limit": {}}
    for side, bytes_per in (("fp32", 4), ("bf16", 2), ("int8", 1 + 4 / cfg.dim)):  # int8: + one fp32 scale per row
        step_bytes = n * bytes_per
        out[f"weight_bytes_per_step_{side}"] = step_bytes
        for B in bench.gen_batches:  # one decoding step reads every weight once, for the whole batch
            out["generate_tokens_per_s_limit"][f"{side}_batch{B}"] = B * bandwidth / step_bytes
    for L in bench.layers:
        flops = res["train"][f"L{L}"]["model_flops_per_token"]
        for side in ("fp32", "bf16"):
            out["train_tokens_per_s_limit"][f"{side}_L{L}"] = limits[f"matmul_{side}_gflop_s"] * 1e9 / flops
    return out


def base_summary(res: dict, bench: BaseBench) -> dict:
    """Ratios measured in this run. Training at L=30 (the paper's) unless absent; generation at batch 1 (the
    chat case); detail holds every L and batch."""
    def train_rate(L: int, name: str) -> Optional[float]:
        rows = res["train"].get(f"L{L}", {}).get("rows", [])
        return next((r["tok_s_median"] for r in rows if r["name"] == name), None)

    def gen_rate(B: int, name: str) -> Optional[float]:
        row = next((r for r in res["generate"] or [] if r["batch"] == B), None)
        return row["tok_s"].get(name) if row else None

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a and b else None

    detail: dict = {}
    for L in bench.layers:
        for peer, key in (("PEFT adaption prompt", "peft"), ("LitGPT adapter", "litgpt")):
            for base in ("fp32", "bf16", "int8"):
                detail[f"train_L{L}_{base}_vs_{key}"] = ratio(train_rate(L, f"adapterlab {base}"), train_rate(L, peer))
        for base in ("bf16", "int8"):
            detail[f"train_L{L}_{base}_vs_fp32"] = ratio(train_rate(L, f"adapterlab {base}"), train_rate(L, "adapterlab fp32"))
    for B in bench.gen_batches:
        for base in ("fp32", "bf16", "int8"):
            for peer, key in (("PEFT", "peft"), ("LitGPT", "litgpt")):
                detail[f"generate_b{B}_{base}_vs_{key}"] = ratio(gen_rate(B, f"adapterlab {base}"), gen_rate(B, peer))
        for base in ("bf16", "int8"):
            detail[f"generate_b{B}_{base}_vs_fp32"] = ratio(gen_rate(B, f"adapterlab {base}"), gen_rate(B, "adapterlab fp32"))
        detail[f"generate_b{B}_int8_vs_torchao_int8"] = ratio(gen_rate(B, "adapterlab int8"), gen_rate(B, "torchao int8"))
    L, B = max(bench.layers), min(bench.gen_batches)
    deltas = res["quality"]["text_loss_delta_vs_fp32"]
    out = {
        "train_vs_peft": detail[f"train_L{L}_fp32_vs_peft"],
        "train_vs_litgpt": detail[f"train_L{L}_fp32_vs_litgpt"],
        "generate_vs_peft": detail[f"generate_b{B}_fp32_vs_peft"],
        "generate_vs_litgpt": detail[f"generate_b{B}_fp32_vs_litgpt"],
        "generate_int8_vs_fp32": detail[f"generate_b{B}_int8_vs_fp32"],
        "generate_int8_vs_litgpt": detail[f"generate_b{B}_int8_vs_litgpt"],
        "int8_text_loss_delta": deltas.get("adapterlab int8"),
        "bf16_text_loss_delta": deltas.get("adapterlab bf16"),
        "measured_at": f"train: L={L}, batch {bench.train_batch[0]}x{bench.train_batch[1]}; generate: batch {B}, "
                       f"{bench.gen_new} new tokens; all fp32 unless named",
        "null_because": {k: v for k, v in res["errors"].items() if v},
        "detail": detail,
    }
    return out


def print_base_summary(res: dict, limits: dict, log) -> None:
    s = res["summary"]
    log("\n######## summary (ratios measured in this run; detail in the JSON)")
    for k in ("train_vs_peft", "train_vs_litgpt", "generate_vs_peft", "generate_vs_litgpt", "generate_int8_vs_fp32",
              "generate_int8_vs_litgpt", "int8_text_loss_delta", "bf16_text_loss_delta"):
        v = s[k]
        log(f"  {k:<26} " + ("n/a" if v is None else f"{v:+.4f}" if "delta" in k else f"{v:.2f}x"))
    log(f"  ({s['measured_at']})")
    for k, v in s["null_because"].items():
        log(f"  {k}: {v}")
    lim = res["limits"]
    log("  limits: generation " + ", ".join(f"{k} {v:,.1f}" for k, v in lim["generate_tokens_per_s_limit"].items())
        + " tokens/s; training " + ", ".join(f"{k} {v:,.0f}" for k, v in lim["train_tokens_per_s_limit"].items())
        + " tokens/s")


# =========================================================================== report
def print_train_table(rows: list[TrainVariant], log, cpu: bool) -> None:
    extra = " tokens per CPU second |" if cpu else ""
    log(f"\n| variant | batch | tokens/s (median) |{extra} peak memory GiB | first warm-up s | note |")
    log("|---|---|---:|" + ("---:|" if cpu else "") + "---:|---:|---|")
    for v in rows:
        rate = f"{v.median():,.0f}" if v.median() else "n/a"
        cpu_rate = (f" {v.cpu_median():,.0f} |" if v.cpu_median() else " n/a |") if cpu else ""
        mem = f"{v.peak_gib:.3f}" if v.peak_gib is not None else "n/a"
        warm = f"{v.warmup_s[0]:.1f}" if v.warmup_s else "n/a"
        note = v.note + (f"; ERROR {v.error}" if v.error else "")
        log(f"| {v.name} | {v.batch[0]}x{v.batch[1]} | {rate} |{cpu_rate} {mem} | {warm} | {note} |")


def summary(result: dict, device: torch.device, log) -> None:
    if not result["shapes"]:  # e.g. --sections padding: nothing to compare
        return
    log("\n######## summary")
    cpu = device.type == "cpu"
    log("| shape | train speedup vs PEFT | generate speedup vs PEFT (per batch size) | fast variant |")
    log("|---|---:|---:|---|")
    for name, res in result["shapes"].items():
        gen = res.get("generate", [])
        per_batch = ", ".join(
            f"B={r['batch']}: " + (f"{r['speedup']:.2f}x" + (f" ({r['speedup_cpu_time']:.2f}x)" if cpu else "")
                                   if "speedup" in r else "n/a") for r in gen) or "n/a"
        train = f"{res['train_speedup_vs_peft']:.2f}x" if "train_speedup_vs_peft" in res else "n/a"
        if cpu and "train_speedup_vs_peft_cpu_time" in res:
            train += f" ({res['train_speedup_vs_peft_cpu_time']:.2f}x)"
        log(f"| {name} | {train} | {per_batch} | {res.get('train_fast_variant', '')} |")
    if cpu:
        log("  (in brackets: the same ratio in tokens per second of process CPU time, which a shared machine "
            "disturbs less than wall time)")
    for name, res in result["shapes"].items():
        for variant, mfu in res.get("mfu", {}).items():
            log(f"  MFU {name} {variant:<48} {100 * mfu:5.1f}%  ({res['model_flops_per_step'] / 1e12:.1f} TFLOP/step)")
        if res.get("recipe_projection"):
            log(f"  paper recipe (Alpaca-52K, 5 epochs), {name}, from tokens/s at 8x512, perfect 8-GPU scaling:")
            for k, v in res["recipe_projection"].items():
                log(f"    {k:<30} 1 GPU {v['1_gpu_hours']:6.2f} h   8 GPUs {v['8_gpu_hours']:5.2f} h")
    if device.type == "cuda" and "H100" not in result["machine"].get("gpu", ""):
        log(f"  note: MFU uses the H100 SXM bf16 peak; this GPU is {result['machine'].get('gpu')}")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CPU: about 5 minutes on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (rewritten after each shape)")
    parser.add_argument("--shape", action="append", choices=sorted(shapes(False)), default=None,
                        help="model shape; repeat for several (default: tinyworld and cpu-small on CPU, 7b on CUDA). "
                             "The first one gives the top-level speedups in the JSON")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "int8"), default=None,
                        help="the frozen base (default: fp32 on CPU, bf16 on CUDA). int8: ours holds an int8 "
                             "weight-only base (adapterlab.quant, bfloat16 products) against PEFT in bf16 on the same "
                             "weights (no parity check: the weights differ by the rounding)")
    parser.add_argument("--build", choices=("disk", "memory"), default=None,
                        help="disk: save_pretrained + load_llama (default on CPU); memory: the same tensors copied "
                             "in memory (default on CUDA)")
    parser.add_argument("--compile", choices=("on", "off"), default="on",
                        help="also measure adapterlab with compile_model (the first warm-up includes compiling)")
    parser.add_argument("--sections", default="parity,memory,generate,train,padding",
                        help="comma-separated subset of parity,memory,generate,train,padding")
    parser.add_argument("--no-ablations", action="store_true", help="measure only what the speedups need")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-time budget: later sections and rounds are skipped once it is spent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpaca-median", type=float, default=130.0, help="assumed median Alpaca example length")
    parser.add_argument("--alpaca-mean", type=float, default=150.0, help="assumed mean Alpaca example length")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--base", choices=sorted(LITGPT_NAMES), default=None,
                        help="the real model instead of the shapes (CPU): training (K=10, L=8 and 30) and generation "
                             "against PEFT and LitGPT, fp32/bf16/int8 frozen bases, quality, the machine's limits")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    table = shapes(args.quick)
    names = args.shape or (["7b"] if device.type == "cuda" else ["tinyworld", "cpu-small"])
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}[args.dtype]  # int8: built in bf16
    build = args.build or ("memory" if device.type == "cuda" else "disk")
    args.section_set = {s.strip() for s in args.sections.split(",") if s.strip()}
    warnings.filterwarnings("ignore", message=".*generation flags.*")
    warnings.filterwarnings("ignore", category=FutureWarning)

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s if args.budget_s else math.inf
    machine = describe_machine(device)
    result: dict = {
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "device": str(device),
        "prompt_fraction_of_labels_ignored": PROMPT_FRACTION,
        "flop_formula": FLOP_FORMULA,
        "memory_method": (
            "CUDA: torch.cuda.max_memory_allocated over the timed steps minus the weights of the other model "
            "(both models stay on the GPU)" if device.type == "cuda" else
            "CPU: the model's weights + the peak of live tensor storages allocated during one training step "
            "(a TorchDispatchMode tracker; not measured for compiled variants)"),
        "shapes": {},
    }
    lines: list[str] = []

    def log(msg: str = "") -> None:
        print(msg, flush=True)
        lines.append(msg)

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        result["log"] = lines
        first = result["shapes"].get(names[0], {})
        for key in ("train_speedup_vs_peft", "generate_speedup_vs_peft", "train_speedup_vs_peft_cpu_time",
                    "generate_speedup_vs_peft_cpu_time"):
            if key in first:
                result[key] = first[key]
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")

    log(f"adapterlab benchmark on {machine_label(machine)}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, peft {machine['peft']}, {result['date']}")

    if args.base:  # the real model: its own sections, one summary at the end of the JSON
        if device.type != "cpu":
            parser.error("--base measures the CPU (the GPU path is benchmarks/gpu_7b.sh); add --device cpu")
        log(f"\n######## {args.base}: the machine's limits ({torch.get_num_threads()} threads)")
        result["limits"] = limits = measure_limits(log)
        try:
            result["base"] = run_base(args.base, args, log, limits)
            print_base_summary(result["base"], limits, log)
            result["summary"] = result["base"]["summary"]
        except Exception as error:
            result["base"] = {"error": f"{type(error).__name__}: {error}"[:1000]}
            log(f"!! --base {args.base} failed: {result['base']['error']}")
        with contextlib.suppress(OSError, AttributeError):
            machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        log(f"total time {time.perf_counter() - t_start:.0f} s")
        summary_last = result.pop("summary", None)
        save()
        if summary_last is not None:  # the summary object closes the JSON
            result.pop("summary", None)
            result["summary"] = summary_last
            save()
        return result

    padding = None
    if "padding" in args.section_set:
        result["padding"] = padding = padding_section(args, log)
        save()
    for name in names if args.section_set & {"parity", "memory", "generate", "train"} else []:
        try:
            result["shapes"][name] = run_shape(table[name], device, dtype, build, args, log, deadline, padding)
        except Exception as error:  # e.g. out of memory while building: keep what the other shapes measured
            result["shapes"][name] = {"error": f"{type(error).__name__}: {error}"[:1000]}
            log(f"!! shape {name} failed: {result['shapes'][name]['error']}")
        save()
    summary(result, device, log)
    with contextlib.suppress(OSError, AttributeError):
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    log(f"total time {time.perf_counter() - t_start:.0f} s")
    save()
    return result


if __name__ == "__main__":
    main()
