#!/usr/bin/env python
"""LLaMA-7B shape + LLaMA-Adapter (K=10, L=30) training steps under torchrun: DDP and FSDP.

    torchrun --nproc_per_node 1 benchmarks/ddp_7b.py --json ddp_7b.json          # one GPU, nccl
    torchrun --nproc_per_node 8 benchmarks/ddp_7b.py --json ddp_7b_8gpu.json     # the paper's 8 GPUs
    torchrun --nproc_per_node 2 benchmarks/ddp_7b.py --tiny --device cpu         # logic check, gloo

The base has the shape of ``LlamaConfig()`` (LLaMA-7B: 32 layers, width 4096, vocab 32000)
with random bf16 weights: it is built on the meta device (no memory), materialised on the GPU
with ``to_empty`` and filled in place (normal, std 0.02; norms 1), so nothing is read from disk
and start-up takes seconds. The adapter is fp32 and zero-init as in the paper. Each phase runs
2 warm-up and 5 measured steps of the training step of ``adapterlab finetune`` (bf16 autocast,
response-token cross-entropy, AdamW on the adapter only) on random tokens, per rank a batch of
``--batch`` x ``--seq`` (default 8 x 512, the release's padded length):

  single  the model without a wrapper (reference; only when world size is 1)
  ddp     DistributedDataParallel: all-reduces the adapter's gradients only
  fsdp    torch's fully_shard (FSDP2) on every block: the frozen base is sharded

It prints a table (tokens/s over all ranks, step time, peak GPU memory on rank 0) and writes
everything to ``--json`` - after every phase, so a run cut short keeps what it measured. Once
``--budget-s`` seconds are spent, the remaining phases are skipped (and listed as skipped). A
phase that runs out of memory is retried once with activation checkpointing, and reported
either way. This is a benchmark: nothing is asserted.

On the GPU machine, with a hard stop well inside a 3-minute slot:

    timeout 170 python3 -m torch.distributed.run --nproc_per_node 1 benchmarks/ddp_7b.py --json $OUT/ddp_7b.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter  # noqa: E402
from adapterlab import distributed as D  # noqa: E402
from adapterlab.adapter import adapted_layers, trainable_parameters  # noqa: E402
from adapterlab.io.files import atomic_write_text  # noqa: E402
from adapterlab.losses import loss_sum  # noqa: E402
from adapterlab.model import autocast_for  # noqa: E402
from adapterlab.quant import quantize_base  # noqa: E402
from adapterlab.train import make_optimizer, TrainConfig  # noqa: E402

GIB = 2**30


def tiny_config() -> LlamaConfig:
    return LlamaConfig(dim=64, n_layers=4, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=256)


def build(cfg: LlamaConfig, adapter: AdapterConfig, device: torch.device, dtype: torch.dtype, seed: int,
          int8: bool = False) -> Llama:
    """Random model of shape cfg: meta -> to_empty(device) -> filled in place. Base in ``dtype``, adapter fp32;
    int8: then the base's matrices rounded to int8 weight-only (adapterlab.quant)."""
    with torch.device("meta"):
        model = Llama(cfg)
    model.to(dtype)  # still meta: no memory yet
    add_adapter(model, adapter)  # freezes the base; adapter tensors fp32 (on meta)
    if device.type == "meta":
        return model  # shapes only (parameter counts)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("adapter.gate"):
                p.zero_()  # zero-init attention (Eq. 7): the paper's start
            elif name.endswith("adapter.prompt"):
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if int8:
        quantize_base(model)  # the filled bf16 matrices -> int8 + per-channel scales, in place on the device
    return model


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"peak_rss_gib": rss / GIB}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_phase(name: str, model: Llama, env: D.DistEnv, args, checkpointing: bool) -> dict:
    """Wrap ``model`` for ``name``, run warm-up + measured steps, return the measurements."""
    device = env.device
    model.activation_checkpointing = checkpointing
    wrapped = D.wrap_model(model, "none" if name == "single" else name, device)
    reduced = D.reduced_elements(wrapped)
    optimizer = make_optimizer(trainable_parameters(D.unwrap(wrapped)), TrainConfig(steps=1, batch_size=args.batch * env.world_size))
    gen = torch.Generator(device="cpu").manual_seed(1000 + env.rank)
    vocab = model.config.vocab_size
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(3, vocab, (args.batch, args.seq), generator=gen).to(device)
        labels = tokens.clone()
        labels[:, : args.seq // 4] = -100  # a prompt part without loss, as in Alpaca examples
        n_targets = D.all_reduce_sum(float((labels[:, 1:] != -100).sum()))
        sync(device)
        t0 = time.perf_counter()
        with D.collective_guard(f"{name} step {step}"):
            with autocast_for(device):
                loss = loss_sum(wrapped, tokens, labels) / n_targets
            (loss * env.world_size).backward()
            D.sync_gradients(wrapped)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        losses.append(D.all_reduce_sum(loss.item()))
        if step >= args.warmup:
            times.append(dt)
        D.print0(f"  {name:6s} step {step + 1}/{args.warmup + args.steps}: {dt * 1e3:8.1f} ms  loss {losses[-1]:.4f}")
    if args.check_replicas:
        D.check_replicas(wrapped, args.warmup + args.steps)
    mean = statistics.mean(times)
    tokens_per_step = args.batch * args.seq * env.world_size
    result = {
        "phase": name, "activation_checkpointing": checkpointing, "status": "ok",
        "step_ms_mean": mean * 1e3, "step_ms_stdev": (statistics.stdev(times) * 1e3 if len(times) > 1 else 0.0),
        "tokens_per_s": tokens_per_step / mean, "tokens_per_step": tokens_per_step,
        "losses": losses, "losses_finite": all(math.isfinite(x) for x in losses),
        "all_reduced_tensors": reduced["tensors"], "all_reduced_elements": reduced["elements"],
        "ddp_bucket_bytes": reduced["buckets"], **peak_memory(device),
    }
    del optimizer, wrapped
    return result


def guarded_phase(name: str, make_model, env: D.DistEnv, args) -> dict:
    """run_phase; on out-of-memory retry once with activation checkpointing."""
    for checkpointing in ([args.checkpointing] if args.checkpointing else [False, True]):
        model = make_model()
        try:
            return run_phase(name, model, env, args, checkpointing)
        except torch.cuda.OutOfMemoryError as e:
            D.print0(f"  {name}: out of memory{' with activation checkpointing' if checkpointing else ''}: "
                     f"{str(e).splitlines()[0][:160]}")
            failure = {"phase": name, "status": "out of memory", "activation_checkpointing": checkpointing}
        finally:
            del model
            gc.collect()
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
    return failure


def table(rows: list[dict], device: torch.device) -> str:
    mem_key = "peak_allocated_gib" if device.type == "cuda" else "peak_rss_gib"
    lines = [f"{'phase':8s} {'ckpt':>5s} {'tokens/s':>10s} {'step ms':>10s} {'peak GiB':>9s} {'reduced elems':>14s}  status"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['phase']:8s} {str(r['activation_checkpointing']):>5s} {'-':>10s} {'-':>10s} {'-':>9s} "
                         f"{'-':>14s}  {r['status']}")
            continue
        lines.append(f"{r['phase']:8s} {str(r['activation_checkpointing']):>5s} {r['tokens_per_s']:10.0f} "
                     f"{r['step_ms_mean']:10.1f} {r[mem_key]:9.2f} {r['all_reduced_elements']:14,d}  ok")
    return "\n".join(lines)


def write_json(path: Optional[str], info: dict, env: D.DistEnv) -> None:
    if path and env.is_main:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(info, indent=2) + "\n")


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here (rank 0)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step (default 8)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="measured steps (default 5)")
    p.add_argument("--phases", default="single,ddp,fsdp", help="comma-separated subset of single,ddp,fsdp")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["bf16", "fp32", "int8"], default="bf16",
                   help="base weights (adapter is fp32); int8: per-channel int8 weight-only, bf16 products "
                        "(adapterlab.quant; ddp only: fsdp shards parameters, an int8 base holds buffers)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (logic check on CPU)")
    p.add_argument("--prompt-len", type=int, default=10)
    p.add_argument("--adapter-layers", type=int, default=None, help="default 30 (7B), n_layers-1 with --tiny")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing from the start")
    p.add_argument("--check-replicas", action="store_true", help="compare adapter replicas across ranks at the end")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait (default 300)")
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="skip the phases not started after this many seconds (default 120)")
    args = p.parse_args(argv)

    env = D.init_distributed(device=args.device, timeout_s=args.timeout)
    cfg = tiny_config() if args.tiny else LlamaConfig()
    adapter = AdapterConfig(prompt_len=args.prompt_len,
                            layers=args.adapter_layers or (cfg.n_layers - 1 if args.tiny else 30))
    if args.seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} is longer than the model's max_seq_len {cfg.max_seq_len}")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16  # int8: filled in bf16, then rounded
    int8 = args.dtype == "int8"
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(phases) - {"single", "ddp", "fsdp"}
    if unknown:
        raise SystemExit(f"unknown --phases {sorted(unknown)}; choose from single,ddp,fsdp")
    if int8 and "fsdp" in phases:
        phases.remove("fsdp")  # fsdp shards parameters; an int8 base holds its weights as buffers
        D.print0("--dtype int8: the fsdp phase is skipped (an int8 base holds buffers, which fsdp does not shard)")
    if env.world_size > 1 and "single" in phases:
        phases.remove("single")  # a single-process reference only makes sense on one rank
    if "ddp" in phases or "fsdp" in phases:
        if not env.distributed:
            raise SystemExit("ddp/fsdp phases need torchrun (e.g. torchrun --nproc_per_node 1 benchmarks/ddp_7b.py); "
                             "or pass --phases single")

    def make_model() -> Llama:
        return build(cfg, adapter, env.device, dtype, seed=0, int8=int8)

    probe = build(cfg, adapter, torch.device("meta"), dtype, seed=0)
    info = {
        "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "backend": env.backend, "world_size": env.world_size,
        "model": "tiny" if args.tiny else "LLaMA-7B shape (LlamaConfig())", "config": cfg.to_dict(),
        "adapter": adapter.to_dict(), "base_dtype": args.dtype, "batch_per_rank": args.batch, "seq": args.seq,
        "warmup_steps": args.warmup, "measured_steps": args.steps,
        "base_params": sum(p.numel() for p in probe.parameters() if not p.requires_grad),
        "trainable_params": sum(p.numel() for p in probe.parameters() if p.requires_grad),
        "adapted_layers": [adapted_layers(probe)[0], adapted_layers(probe)[-1]],
    }
    del probe
    gc.collect()
    D.print0(f"{info['model']} on {env.world_size} x {info['device']} ({env.backend or 'no process group'}), "
             f"base {info['base_params'] / 1e9:.2f}B {args.dtype}, adapter {info['trainable_params']:,} fp32, "
             f"batch {args.batch} x {args.seq} per rank")
    rows = []
    info["phases"] = rows
    t_start = time.perf_counter()
    for name in phases:
        spent = D.broadcast_object(time.perf_counter() - t_start)  # every rank decides the same
        if spent > args.budget_s:
            rows.append({"phase": name, "status": f"skipped (budget of {args.budget_s:g} s spent)",
                         "activation_checkpointing": None})
        else:
            rows.append(guarded_phase(name, make_model, env, args))
        info["wall_s"] = time.perf_counter() - t_start
        write_json(args.json, info, env)
    D.print0(table(rows, env.device))
    if args.json and env.is_main:
        print(f"wrote {args.json}")
    D.barrier("the end of the benchmark", env)
    D.cleanup()
    return info


if __name__ == "__main__":
    main()
